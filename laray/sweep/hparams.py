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
  own folder (`EXPERIMENT_RUN`) when its first trial starts: the searched settings and `seed`, and
  the metrics the trials report (`ray/tune/purity`...), so that, whichever copy TensorBoard finds
  first, every run's cells are filled, and no column stays empty: a sweep's data have labels (its
  objective is a label score), so no `silhouette`; held-out scores only with a held-out part. Should
  the first result report other metrics, the summary is written again with those;
- each trial's session start when it starts, so a running sweep's trials show already:
  its LA settings under their own names (config["la"] for a confirmation run) and its seed
  (the sweep's seed for a search trial);
- its session end when it ends.

What TensorBoard shows (tensorboard 2.21's frontend):
- a run's name is its folder relative to the logdir. A confirmation run's scalars and session go to
  a folder named by its seed and configuration, as `laray sweep`'s confirmed table labels it,
  `confirm/seed 2 tau=0.0726 m=0.221 k=294 R=7 C=166` or `confirm/seed 2 recipe` (`run_folder`), rather
  than Tune's trial folder (`confirm/confirm_trial_c30a8_00000_0_la=...`): the run lists show them apart.
  The HPARAMS table's "Trial ID" column, 10em wide, shows about 14 characters of a session's group
  name, or of its run's name when it has none (`confirm/confirm…` for every one of Tune's): a
  confirmation run's group is named as its folder without `confirm/`, `seed 2 tau=0.0…`, `seed 2 recipe`;
- every number is printed to five significant digits (`toPrecision(5)`: 7.0000, 294.00) and there is no
  integer type (tensorboard/plugins/hparams/summary_v2.py: "TODO(#1998): Add int dtype"), so integer
  settings and the seed are written as text (`shown`): 7, 294. The table sorts and filters those
  columns as text.
"""

from __future__ import annotations

import numbers
import time
from pathlib import Path

from ray.tune.logger import TBXLoggerCallback

from laray.score_names import HELDOUT_PREFIX
from laray.scoring.confirm import RECIPE_MARK
from laray.settings.space import SearchSpace, settings_label
from laray.sweep.trainable import REPORTED

EXPERIMENT_RUN = "events.out.tfevents.laray-hparams"  # the experiment summary's file, in the experiment folder
SEED = "seed"
RUN_OWNER = ".laray-trial"  # in a confirmation run's folder: the id of the trial that writes there
# The writer's thread writes what it is given at once but flushes it to disk at most this often (Tune's: 30 s): a
# trial's session start, its first event, shows within this time. Each result is flushed at once (Tune's).
FLUSH_S = 5
MAX_RUN_NAME = 120  # characters of a confirmation run's folder name (a file system allows 255 bytes)


def shown(value):
    """A setting's value as TensorBoard should show it: an integer as text ("7", where a number shows 7.0000)."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return str(int(value))
    return value


def run_name(config: dict, names: list[str]) -> str:
    """A confirmation run's name in TensorBoard: its seed, then its configuration as `laray sweep`'s confirmed table
    labels it (`seed 2 tau=0.0726 m=0.221 k=294 R=7 C=166`), or `seed 2 recipe` for the recipe. A folder's name:
    no "/", at most MAX_RUN_NAME characters."""
    settings = config.get("la", {})
    label = (
        "recipe"
        if settings.get(RECIPE_MARK)
        else settings_label({name: settings[name] for name in names if name in settings})
    )
    return f"seed {config.get(SEED)} {label}".strip().replace("/", "_").replace("\0", "_")[:MAX_RUN_NAME].rstrip()


class TrialHparams(TBXLoggerCallback):
    """Tune's TensorBoard logger with hparams that TensorBoard can show for every trial (see the module).

    names: the searched settings; seed: the sweep's seed, a search trial's seed; metrics: what the trials
    report (of REPORTED; default: all but silhouette). Plain values only: Tune pickles its callbacks with the
    run config (tuner.pkl) and restores them on --resume.
    """

    def __init__(self, names: list[str], seed: int, metrics: list[str] | None = None):
        super().__init__()
        self.names, self.seed = list(names), seed
        self.metrics = list(metrics) if metrics is not None else [m for m in REPORTED if m != "silhouette"]
        self._declared: dict[str, list[str]] = {}  # experiment folder -> the metrics its summary declares
        self._checked: set[str] = set()  # experiment folders whose first result was checked against them

    @classmethod
    def of(cls, space: SearchSpace, seed: int) -> "TrialHparams":
        """The sweep's: its objective is a label score, so the data have labels (no silhouette); held-out scores
        when it holds a part out."""
        holdout = bool(space.la.holdout)
        metrics = [m for m in REPORTED if m != "silhouette" and (holdout or not m.startswith(HELDOUT_PREFIX))]
        return cls(list(space.search), seed, metrics)

    def hparams(self, config: dict) -> dict:
        """A trial's hparams: its searched settings under their own names, and its seed; integers as text."""
        settings = config.get("la", config)  # a confirmation run: {"la": {...}, "seed": s}; a search trial: flat
        values = {
            name: shown(settings[name]) for name in self.names if isinstance(settings.get(name), (numbers.Real, str))
        }
        return {**values, SEED: shown(config.get(SEED, self.seed))}

    def run_folder(self, trial) -> Path:
        """Where a trial's event files go: a search trial's own folder (Tune's), a confirmation run's folder named
        by its seed and configuration (`run_name`) beside the trial folders. Two configurations whose names agree
        (alike to three digits) are told apart by the second one's trial id."""
        if not isinstance(trial.config.get("la"), dict):
            return Path(trial.local_path)
        name = run_name(trial.config, self.names)
        folder = Path(trial.local_experiment_path) / name
        if (folder / RUN_OWNER).exists() and (folder / RUN_OWNER).read_text() != trial.trial_id:
            folder = folder.with_name(f"{name} {trial.trial_id}")  # another trial's
        folder.mkdir(parents=True, exist_ok=True)
        (folder / RUN_OWNER).write_text(trial.trial_id)  # a restarted trial (its worker died) finds its own again
        return folder

    def _summaries(self, hparams: dict, reported=()):
        from tensorboardX.summary import hparams as hparams_summaries

        # Tune's scalar tags, "ray/tune/<name>": the metric columns next to the settings
        metrics = {f"ray/tune/{name}": 0.0 for name in reported}
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

    @staticmethod
    def _grouped_as(session_start, name: str):
        """The session start with its group's name: what the HPARAMS table shows as its Trial ID (the run's name
        when there is none), about 14 characters of it at the column's width: `seed 2 recipe`, `seed 2 tau=0.0…`.
        Names are distinct, so each run is a group of its own, as before."""
        from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData

        value = session_start.value[0]
        content = HParamsPluginData.FromString(value.metadata.plugin_data.content)
        content.session_start_info.group_name = name
        value.metadata.plugin_data.content = content.SerializeToString()
        return session_start

    def _write_experiment(self, trial, hparams: dict, metrics: list[str], again: bool = False) -> None:
        """The experiment summary, once per experiment folder (the search's, the confirmation's); again: replaced.

        Its hparams' types (number or text) are those of the first trial's values: every trial draws from the
        same distributions.
        """
        folder = Path(trial.local_experiment_path)
        if str(folder) in self._declared and not again:
            return
        if (folder / EXPERIMENT_RUN).exists() and not again:  # a resumed sweep: written before
            self._declared[str(folder)] = list(metrics)
            return
        self._declared[str(folder)] = list(metrics)
        import struct

        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.record_writer import masked_crc32c

        from laray.checkpoint import write_atomic

        experiment = self._searched_first(self._summaries(hparams, metrics)[0])
        data = Event(wall_time=time.time(), summary=experiment).SerializeToString()
        header = struct.pack("<Q", len(data))
        # One TFRecord as a SummaryWriter writes it, through a temporary file renamed: a kill leaves no torn file.
        record = header + struct.pack("<I", masked_crc32c(header)) + data + struct.pack("<I", masked_crc32c(data))
        write_atomic(folder / EXPERIMENT_RUN, lambda f: f.write(record))

    def log_trial_start(self, trial) -> None:
        # Tune's own (ray/tune/logger/tensorboardx.py), its SummaryWriter in run_folder rather than the trial's folder
        if trial in self._trial_writer:
            self._trial_writer[trial].close()
        trial.init_local_path()
        folder = self.run_folder(trial)
        self._trial_writer[trial] = self._summary_writer_cls(str(folder), flush_secs=FLUSH_S)
        self._trial_result[trial] = {}
        hparams = self.hparams(trial.config)
        self._write_experiment(trial, hparams, self.metrics)
        _, session_start, _ = self._summaries(hparams)
        if folder != Path(trial.local_path):  # a confirmation run: the table's Trial ID without "confirm/"
            session_start = self._grouped_as(session_start, folder.name)
        self._trial_writer[trial].file_writer.add_summary(session_start)
        self._trial_writer[trial].flush()

    def log_trial_result(self, iteration: int, trial, result: dict) -> None:
        super().log_trial_result(iteration, trial, result)  # the scalars
        folder = str(Path(trial.local_experiment_path))
        if folder not in self._checked:  # the experiment's first result: are its metrics those declared?
            self._checked.add(folder)
            reported = [name for name in REPORTED if name in result]
            if reported != self._declared.get(folder):
                self._write_experiment(trial, self.hparams(trial.config), reported, again=True)

    def _try_log_hparams(self, trial, result: dict) -> None:
        """At the trial's end (Tune calls this from log_trial_end): the session end only."""
        _, _, session_end = self._summaries(self.hparams(trial.config))
        self._trial_writer[trial].file_writer.add_summary(session_end)
