"""Every trial's settings in TensorBoard's HPARAMS tab, the search's and the confirmation's under the same names.

Ray Tune's TBXLoggerCallback writes, at each trial's end, three hparams summaries into the
trial's folder: an "experiment" (which hyperparameters and metrics there are), the trial's
"session start" (its values) and "session end". Its names come from `trial.evaluated_params`:
`temperature`, `mixing_rate`... for a search trial (what the searcher suggested), but
`la/temperature`, `la/mixing_rate`..., `seed` for a confirmation run (its grid_search param_space
nests the settings under "la"). TensorBoard's hparams plugin takes the experiment from the first
run it lists that has one (tensorboard/plugins/hparams/backend_context.py, `_find_experiment_tag`):
with the sweep's folder as logdir, a confirmation run's gives the columns la/... and seed, and the
search trials' cells stay empty (a search trial's would leave the confirmation's empty).

`TrialHparams` replaces Tune's callback (Tune adds its own only when none is given,
ray/tune/utils/callback.py) and keeps its scalars, but writes:
- one experiment summary, the same for the search and the confirmation, into the experiment's
  own folder (`EXPERIMENT_RUN`): the searched settings and `seed`, and the reported metrics,
  so that whichever copy TensorBoard finds first, every run's cells are filled;
- each trial's session start when it starts, so a running sweep's trials show already:
  its LA settings under their own names (config["la"] for a confirmation run) and its seed
  (the sweep's seed for a search trial);
- its session end when it ends.
"""

from __future__ import annotations

import time
from pathlib import Path

from ray.tune.logger import TBXLoggerCallback

from laray.settings.space import SearchSpace
from laray.sweep.trainable import REPORTED

EXPERIMENT_RUN = "events.out.tfevents.laray-hparams"  # the experiment summary's file, in the experiment folder
SEED = "seed"


class TrialHparams(TBXLoggerCallback):
    """Tune's TensorBoard logger with hparams that TensorBoard can show for every trial (see the module).

    names: the searched settings; seed: the sweep's seed, a search trial's seed. Plain values
    only: Tune pickles its callbacks with the run config (tuner.pkl) and restores them on --resume.
    """

    def __init__(self, names: list[str], seed: int):
        super().__init__()
        self.names, self.seed = list(names), seed
        self._experiment_written: set[str] = set()

    @classmethod
    def of(cls, space: SearchSpace, seed: int) -> "TrialHparams":
        return cls(list(space.search), seed)

    def hparams(self, config: dict) -> dict:
        """A trial's hparams: its searched settings under their own names, and its seed."""
        settings = config.get("la", config)  # a confirmation run: {"la": {...}, "seed": s}; a search trial: flat
        values = {name: settings[name] for name in self.names if isinstance(settings.get(name), (int, float, str))}
        return {**values, SEED: config.get(SEED, self.seed)}

    def _summaries(self, hparams: dict):
        from tensorboardX.summary import hparams as hparams_summaries

        # Tune's scalar tags, "ray/tune/<name>": the metric columns next to the settings
        metrics = {f"ray/tune/{name}": 0.0 for name in REPORTED}
        return hparams_summaries(hparam_dict=hparams, metric_dict=metrics)

    def _searched_first(self, experiment):
        """The experiment summary with the searched settings marked as differing between trials: TensorBoard lists
        those first and shows the first five at once (the seed, the same in every search trial, is a click away)."""
        from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData

        value = experiment.value[0]
        content = HParamsPluginData.FromString(value.metadata.plugin_data.content)
        for info in content.experiment.hparam_infos:
            if info.name in self.names:
                # HParamInfo's `bool differs = 7` (tensorboard/plugins/hparams/api.proto), which tensorboardX's
                # older copy of the message lacks: merged in as its wire bytes (field 7, varint 1), kept on writing.
                info.MergeFromString(b"\x38\x01")
        value.metadata.plugin_data.content = content.SerializeToString()
        return experiment

    def _write_experiment(self, trial, hparams: dict) -> None:
        """The experiment summary, once per experiment folder (the search's, the confirmation's).

        Its hparams' types (number or text) are those of the first trial's values: every trial draws from the
        same distributions.
        """
        folder = Path(trial.local_experiment_path)
        if str(folder) in self._experiment_written:
            return
        self._experiment_written.add(str(folder))
        if (folder / EXPERIMENT_RUN).exists():  # a resumed sweep: written before
            return
        import struct

        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.record_writer import masked_crc32c

        from laray.checkpoint import write_atomic

        experiment = self._searched_first(self._summaries(hparams)[0])
        data = Event(wall_time=time.time(), summary=experiment).SerializeToString()
        header = struct.pack("<Q", len(data))
        # One TFRecord as a SummaryWriter writes it, through a temporary file renamed: a kill leaves no torn file.
        record = header + struct.pack("<I", masked_crc32c(header)) + data + struct.pack("<I", masked_crc32c(data))
        write_atomic(folder / EXPERIMENT_RUN, lambda f: f.write(record))

    def log_trial_start(self, trial) -> None:
        super().log_trial_start(trial)  # the trial's SummaryWriter
        hparams = self.hparams(trial.config)
        self._write_experiment(trial, hparams)
        _, session_start, _ = self._summaries(hparams)
        self._trial_writer[trial].file_writer.add_summary(session_start)
        self._trial_writer[trial].flush()

    def _try_log_hparams(self, trial, result: dict) -> None:
        """At the trial's end (Tune calls this from log_trial_end): the session end only."""
        _, _, session_end = self._summaries(self.hparams(trial.config))
        self._trial_writer[trial].file_writer.add_summary(session_end)
