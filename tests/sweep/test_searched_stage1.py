"""A space that searches stage-1 settings: each distinct stage-1 configuration is trained once, in the sweep's store.

120 of the digits as PNG files, a tiny VGG (vgg11_bn at width 0.125, 32 px), LA of one or two epochs, on the
session's local Ray instance with 2 CPUs. A trial whose stage-1 settings are the shipped stage 1's starts from
it; any other trains its own in the store (under its lock) or loads it from there.
"""

import json
import re
from pathlib import Path

import pandas as pd
import pytest
from conftest import write_digit_folder

from laray.data.dataset import describe, open_dataset
from laray.settings.space import parse_space
from laray.settings.stage1_search import ae_config_of
from laray.sweep.trainable import _own_stage1, stage1_label, train_trial
from laray.training import store as ae_store
from laray.training.run import stored_stage1
from laray.training.store import store_key

N, SEED = 120, 0
AE = {"arch": "vgg11_bn", "width": 0.125, "image_size": 32, "epochs": 2, "batch_size": 32}
LA = {"epochs": 1, "batch_size": 32, "k_neighbours": 10, "n_centroids": 12, "clustering_repeats": 1}


def raw_space(num_samples: int, la_epochs: int = 1) -> dict:
    """stage1_epochs searched among 0 and the fixed stage 1's 2 (the recipe): no confirmation."""
    return {
        "num_samples": num_samples,
        "max_concurrent": 2,
        "grace_period": 1,
        "confirm_top": 0,
        "fixed": {"autoencoder": dict(AE), "la": {**LA, "epochs": la_epochs}},
        "search": {"temperature": {"loguniform": [0.05, 0.5]}, "stage1_epochs": {"categorical": [0, 2]}},
        "recipe": {"temperature": 0.1, "stage1_epochs": 2},
    }


@pytest.fixture(scope="module")
def sub(tmp_path_factory):
    return describe(str(write_digit_folder(tmp_path_factory.mktemp("digits"), N)), 32)


def trial_records(experiment: Path) -> list[dict]:
    """Each search trial's metrics.json and worker.json, with its folder."""
    return [
        {
            "folder": folder,
            "metrics": json.loads((folder / "metrics.json").read_text()),
            "worker": json.loads((folder / "worker.json").read_text()),
        }
        for folder in sorted(Path(experiment).glob("train_trial_*"))
        if (folder / "metrics.json").exists()
    ]


def store_entries(store: Path) -> dict[str, int]:
    """{key: trainings} of every auto-encoder in the store."""
    return {p.name: ae_store.trainings(store, p.name) for p in sorted(store.iterdir()) if p.is_dir()}


def test_a_trials_own_stage1_is_trained_once_then_loaded_and_its_lines_name_it(sub, tmp_path, one_torch_thread):
    """In one process, no Ray: the first ask trains (its epoch lines say which stage 1), the next loads."""
    space = parse_space(raw_space(1))
    dataset = open_dataset(sub.digest(), tmp_path / "cache")
    ae = ae_config_of(space.ae, {"stage1_epochs": 1, "stage1_lr": 0.01})
    lines = []
    first = _own_stage1(dataset, ae, space.la, SEED, "cpu", str(tmp_path / "store"), lines.append, None)
    assert first.trained_in_this_run and first.key == store_key(sub.key, ae, SEED)
    assert len(lines) == 1
    assert re.fullmatch(
        rf"stage 1 \(epochs 1, lr 0\.01\): epoch 1 loss {first.history[0]['loss']:.4f} \d+ img/s", lines[0]
    )
    lines.clear()
    again = _own_stage1(dataset, ae, space.la, SEED, "cpu", str(tmp_path / "store"), lines.append, None)
    assert not again.trained_in_this_run and again.key == first.key and lines == [f"{stage1_label(ae)}: from the store"]
    assert store_entries(tmp_path / "store") == {first.key: 1}
    assert stage1_label(ae_config_of(space.ae, {"stage1_epochs": 0})) == "stage 1 (epochs 0, lr 0.05)"


def test_trials_train_each_stage1_configuration_once_and_report_la_epochs_only(ray_session, sub, tmp_path):
    """Four trials two at a time through Tune, as the driver runs them: stage1_epochs 0 twice and 2 twice, none the
    shipped stage 1's (1 epoch). Each configuration is trained once in the store; the second trial asking for it,
    concurrent or later, loads it; metrics.json records the trial's own stage 1; Tune sees LA epochs only."""
    import ray
    from ray import tune

    from laray.sweep.ray_setup import run_config

    space = parse_space(
        {**raw_space(4, la_epochs=2), "fixed": {"autoencoder": {**AE, "epochs": 1}, "la": {**LA, "epochs": 2}}}
    )
    store = tmp_path / "store"
    dataset = open_dataset(sub.digest())
    shipped = stored_stage1(dataset, space.ae, ["mean"], SEED, "cpu", store, progress=False)
    trainable = tune.with_parameters(
        train_trial,
        data=sub.digest(),
        stage1=ray.put(shipped),
        space=space,
        seed=SEED,
        device="cpu",
        threads=1,
        quiet=True,
        store_dir=str(store),
    )
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": 1, "gpu": 0}),
        param_space={"temperature": 0.1, "stage1_epochs": tune.grid_search([0, 2, 0, 2])},
        tune_config=tune.TuneConfig(max_concurrent_trials=2, reuse_actors=True),
        run_config=run_config("own", str(tmp_path / "sweeps"), 0, 0, "search", space),
    )
    results = tuner.fit()
    assert not results.errors, results.errors
    keys = {e: store_key(sub.key, ae_config_of(space.ae, {"stage1_epochs": e}), SEED) for e in (0, 1, 2)}
    assert store_entries(store) == {keys[e]: 1 for e in (0, 1, 2)}  # the shipped one (1 epoch) and one per value
    for e in (0, 1, 2):
        assert len((store / keys[e] / "trainings.log").read_text().splitlines()) == 1
    records = trial_records(tmp_path / "sweeps" / "own")
    assert len(records) == 4
    by_epochs = {}
    for record in records:
        metrics, worker = record["metrics"], record["worker"]
        epochs = metrics["config"]["autoencoder"]["epochs"]
        by_epochs.setdefault(epochs, []).append(metrics["autoencoder"]["trained_in_this_run"])
        assert metrics["autoencoder"]["key"] == worker["stage1_key"] == keys[epochs]
        assert worker["stage1"] in ("trained", "store")
        assert len([h for h in metrics["history"] if h["stage"] == "autoencoder"]) == epochs
        assert "stage1_epochs" not in metrics["config"]["la"]  # LA's settings only
        reported = pd.read_csv(record["folder"] / "progress.csv")
        assert list(reported["epoch"]) == [1, 2]  # LA epochs, the stage-1 epochs never reported
    assert sorted(by_epochs) == [0, 2]
    assert all(sorted(trained) == [False, True] for trained in by_epochs.values())  # trained once, loaded once


def test_a_sweep_trains_each_stage1_configuration_it_samples_once(ray_session, sub, tmp_path):
    """`run_sweep` over stage1_epochs in {0, 2}: the recipe's 2 is the fixed stage 1, which the driver trains
    before the trials; a sampled 0 is trained by the first trial that asks. One store entry per distinct value,
    each trained once."""
    from laray.sweep.driver import SweepRun, run_sweep

    space = parse_space(raw_space(4))
    result = run_sweep(sub, space, run=SweepRun(str(tmp_path), "stage1", seed=SEED, verbose=0))
    experiment = tmp_path / "stage1"
    assert result.n_trials == 4 and result.n_errored == 0
    records = trial_records(experiment)
    assert len(records) == 4
    ran = {r["metrics"]["config"]["autoencoder"]["epochs"] for r in records}
    assert ran == {0, 2}  # the recipe (2) first, and the sampler's 0 among the three others (seed 0)
    store = experiment / "autoencoders"
    keys = {e: store_key(sub.key, ae_config_of(space.ae, {"stage1_epochs": e}), SEED) for e in ran}
    assert store_entries(store) == {keys[e]: 1 for e in ran}
    for record in records:
        metrics = record["metrics"]
        epochs = metrics["config"]["autoencoder"]["epochs"]
        assert metrics["autoencoder"]["key"] == keys[epochs]
        assert metrics["autoencoder"]["source"] == (
            "object store" if epochs == AE["epochs"] else record["worker"]["stage1"]
        )
