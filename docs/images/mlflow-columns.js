// For docs/images/screenshot.py --script: the MLflow UI's runs table of experiment 1 with the columns that
// docs/sweeps.md#experiment-tracking-mlflow shows (the UI keeps them in the browser's localStorage), its
// assistant panel closed, then the page reloaded to draw them.
(() => {
  const key = 'MLflowLocalStorage-1.1-ExperimentPage-["1"]-ReactComponentState';
  const state = JSON.parse(localStorage.getItem(key));
  state.selectedColumns = [
    'metrics.`purity`', 'metrics.`heldout_purity`', 'metrics.`epoch`',
    'params.`k_neighbours`', 'params.`lr`', 'params.`mixing_rate`',
    'tags.`laray.stopped_by`', 'tags.`laray.winner`',
  ];
  localStorage.setItem(key, JSON.stringify(state));
  localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');
  location.reload();
})()
