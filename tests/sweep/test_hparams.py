"""TensorBoard's HPARAMS tab on a sweep (laray.sweep.hparams), read back as TensorBoard serves it.

TrialHparams is driven as Tune drives it (log_trial_start, log_trial_result, log_trial_end) with stand-in
trials, no Ray cluster: under a second. What TensorBoard's HPARAMS tab shows is read through its own hparams
plugin (the routes its frontend calls, /experiment and /session_groups) when tensorboard is installed (the
`dashboard` extra), and from the event files with tensorboardX's protobufs (conftest.tensorboard_hparams)
always. A whole sweep's event files are checked in tests/sweep/test_sweep.py.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from conftest import tensorboard_hparams

from laray.score_names import HELDOUT_SCORES, LABEL_SCORES
from laray.scoring.confirm import RECIPE_MARK
from laray.settings.space import parse_space, settings_label
from laray.sweep.hparams import FLUSH_S, RUN_OWNER, TrialHparams, run_name

NAMES = ["temperature", "mixing_rate", "k_neighbours", "clustering_repeats", "n_centroids"]
BEST = {"temperature": 0.07256, "mixing_rate": 0.2212, "k_neighbours": 294, "clustering_repeats": 7, "n_centroids": 166}
RECIPE = {"temperature": 0.1, "mixing_rate": 0.5, "k_neighbours": 20, "clustering_repeats": 2, "n_centroids": 12}
SEEDS = (1, 2)
OTHERS = ("loss", "images_per_s", "lr", "epoch")
LABELLED = [*LABEL_SCORES, *HELDOUT_SCORES, *OTHERS]  # what a trial on labelled data with a held-out part reports
TAGS = [f"ray/tune/{name}" for name in LABELLED]


class StandIn:
    """What TrialHparams uses of Tune's Trial: its id, config, folders (Tune's driver-side staging folders)."""

    def __init__(self, experiment: Path, trial_id: str, config: dict, folder: str):
        self.trial_id, self.config, self.evaluated_params = trial_id, config, config
        self.local_experiment_path = str(experiment)
        self.local_path = str(experiment / folder)

    def init_local_path(self) -> None:
        Path(self.local_path).mkdir(parents=True, exist_ok=True)


def search_trials(logdir: Path) -> list[StandIn]:
    configs = [BEST, {**BEST, "temperature": 0.3, "k_neighbours": 12}]
    return [
        StandIn(logdir, f"a0{i}", config, f"train_trial_a0{i}_{i + 1}_clustering_repeats=7")
        for i, config in enumerate(configs)
    ]


def confirmation_runs(logdir: Path) -> list[StandIn]:
    """As the confirmation's grid_search gives them: the search's best and the recipe (marked), each seed."""
    grid = [(la, seed) for seed in SEEDS for la in (BEST, {**RECIPE, RECIPE_MARK: True})]
    return [
        StandIn(logdir / "confirm", f"c30a8_0000{i}", {"la": la, "seed": seed}, f"confirm_trial_c30a8_0000{i}_{i}_la=x")
        for i, (la, seed) in enumerate(grid)
    ]


def result(epoch: int, metrics=LABELLED) -> dict:
    return {**{name: 0.5 + epoch / 10 for name in metrics}, "epoch": epoch, "training_iteration": epoch}


def run(callback: TrialHparams, trials: list[StandIn], epochs: int = 2, metrics=LABELLED) -> None:
    for trial in trials:
        callback.log_trial_start(trial)
        for epoch in range(1, epochs + 1):
            callback.log_trial_result(epoch, trial, result(epoch, metrics))
        callback.log_trial_end(trial)


def served(logdir: Path) -> tuple[dict, dict]:
    """What TensorBoard's frontend receives from the hparams plugin for `logdir`: the experiment (the columns) and
    {session group name (the table's "Trial ID"): the group}."""
    pytest.importorskip("tensorboard.plugins.hparams.hparams_plugin", reason="tensorboard: the dashboard extra")
    from tensorboard import context
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.hparams import hparams_plugin
    from werkzeug.test import EnvironBuilder

    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(logdir))
    multiplexer.Reload()
    provider = data_provider.MultiplexerDataProvider(multiplexer, str(logdir))
    plugin = hparams_plugin.HParamsPlugin(
        base_plugin.TBContext(logdir=str(logdir), multiplexer=multiplexer, data_provider=provider)
    )
    routes = plugin.get_plugin_apps()

    def post(route: str, body: dict) -> dict:
        environ = EnvironBuilder(method="POST", data=json.dumps(body), content_type="application/json").get_environ()
        context.set_in_environ(environ, context.RequestContext())
        status = []
        answer = b"".join(routes[route](environ, lambda code, headers: status.append(code)))
        assert status == ["200 OK"], answer
        return json.loads(answer)

    experiment = post("/experiment", {"experimentName": ""})
    statuses = ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"]
    request = {"experimentName": "", "allowedStatuses": statuses, "colParams": [], "startIndex": 0, "sliceSize": 100}
    groups = post("/session_groups", request).get("sessionGroups", [])
    return experiment, {group["name"]: group for group in groups}


def test_tensorboard_shows_every_column_filled_confirmation_runs_by_name_and_integers_as_integers(tmp_path):
    callback = TrialHparams(NAMES, seed=0, metrics=LABELLED)
    search, confirm = search_trials(tmp_path), confirmation_runs(tmp_path)
    run(callback, search + confirm)
    experiment, groups = served(tmp_path)

    # the columns: the settings and the seed, and only the metrics the trials report (no silhouette)
    assert [m["name"]["tag"] for m in experiment["metricInfos"]] == TAGS
    types = {h["name"]: h["type"] for h in experiment["hparamInfos"]}
    assert types == {
        "temperature": "DATA_TYPE_FLOAT64",
        "mixing_rate": "DATA_TYPE_FLOAT64",
        **dict.fromkeys(["k_neighbours", "clustering_repeats", "n_centroids", "seed"], "DATA_TYPE_STRING"),
    }
    # the Trial IDs: the search's trial folders; the confirmation's runs by seed and configuration, apart in the
    # 14 characters or so the table's column shows of them; each run a group of its own
    confirmation = [
        f"seed {seed} {label}" for seed in SEEDS for label in ("tau=0.0726 m=0.221 k=294 R=7 C=166", "recipe")
    ]
    assert set(groups) == {Path(t.local_path).name for t in search} | set(confirmation)
    assert len({name[:14] for name in confirmation}) == len(confirmation)
    assert {name: [s["name"] for s in group["sessions"]] for name, group in groups.items() if name in confirmation} == {
        name: [f"confirm/{name}"]
        for name in confirmation  # the runs, as the run lists name them
    }
    for name, group in groups.items():
        # every column filled in every row: each metric has its last value (epoch 2), each setting its value
        assert {m["name"]["tag"]: m["value"] for m in group["metricValues"]} == pytest.approx(
            {**dict.fromkeys(TAGS, 0.7), "ray/tune/epoch": 2}
        )
        assert set(group["hparams"]) == {*NAMES, "seed"}
        assert [s["status"] for s in group["sessions"]] == ["STATUS_SUCCESS"]
    # integers as text, so that the table shows 294 and 7 (TensorBoard prints any number to 5 digits: 294.00)
    best = groups["seed 2 tau=0.0726 m=0.221 k=294 R=7 C=166"]["hparams"]
    assert best == {
        "temperature": 0.07256,
        "mixing_rate": 0.2212,
        "k_neighbours": "294",
        "clustering_repeats": "7",
        "n_centroids": "166",
        "seed": "2",
    }
    assert groups["seed 1 recipe"]["hparams"]["k_neighbours"] == "20"
    assert groups[Path(search[1].local_path).name]["hparams"]["seed"] == "0"  # a search trial: the sweep's seed


def test_the_event_files_hold_the_runs_under_readable_names_and_the_settings_as_text(tmp_path):
    """The same without TensorBoard: the runs (event files' folders) and their session starts, from the files."""
    callback = TrialHparams(NAMES, seed=0, metrics=LABELLED)
    search, confirm = search_trials(tmp_path), confirmation_runs(tmp_path)
    run(callback, search + confirm)
    found = tensorboard_hparams(tmp_path)
    assert {run for run, parts in found.items() if "experiment" in parts} == {".", "confirm"}
    assert found["."]["experiment"] == found["confirm"]["experiment"]  # whichever TensorBoard reads first
    sessions = {run: parts["session_start_info"] for run, parts in found.items() if "session_start_info" in parts}
    assert sessions["confirm/seed 1 recipe"] == {
        "temperature": 0.1,
        "mixing_rate": 0.5,
        "k_neighbours": "20",
        "clustering_repeats": "2",
        "n_centroids": "12",
        "seed": "1",
    }
    assert len(sessions) == len(search) + len(confirm)
    assert all("session_end_info" in found[run] for run in sessions)
    # Tune's trial folders of the confirmation keep their other files, but no event file: one run per trial
    assert not any(Path(confirm[0].local_path).glob("events.out.tfevents.*"))


@pytest.mark.parametrize("holdout", [0.0, 0.5])
def test_a_sweeps_columns_are_its_label_scores_and_held_out_ones_only_with_a_held_out_part(tmp_path, holdout):
    raw = {
        "holdout": holdout,
        "confirm_top": 0,
        "fixed": {"la": {"epochs": 2}},
        "search": {"temperature": {"uniform": [0.05, 0.5]}},
    }
    callback = TrialHparams.of(parse_space(raw), seed=0)
    reported = [*LABEL_SCORES, *(HELDOUT_SCORES if holdout else ()), *OTHERS]
    assert callback.metrics == reported and "silhouette" not in callback.metrics
    run(callback, search_trials(tmp_path)[:1], metrics=reported)
    experiment, groups = served(tmp_path)
    assert [m["name"]["tag"] for m in experiment["metricInfos"]] == [f"ray/tune/{name}" for name in reported]
    assert all(len(group["metricValues"]) == len(reported) for group in groups.values())


def test_a_trial_shows_once_it_starts_and_columns_follow_what_the_first_result_reports(tmp_path):
    """Data without labels report the silhouette instead of the label scores: the columns are written again."""
    callback = TrialHparams(NAMES, seed=0)
    trial = search_trials(tmp_path)[0]
    callback.log_trial_start(trial)
    # on disk once the writer's thread flushes it (within FLUSH_S; at once with a flush after the thread wrote it)
    deadline = time.monotonic() + 2 * FLUSH_S
    while "session_start_info" not in tensorboard_hparams(tmp_path).get(Path(trial.local_path).name, {}):
        assert time.monotonic() < deadline, "the session start is not on disk"
        time.sleep(0.05)
        callback._trial_writer[trial].flush()
    experiment, groups = served(tmp_path)
    assert list(groups) == [Path(trial.local_path).name]  # running, nothing reported yet
    assert "ray/tune/silhouette" not in [m["name"]["tag"] for m in experiment["metricInfos"]]
    unlabelled = ["silhouette", *OTHERS]
    callback.log_trial_result(1, trial, result(1, unlabelled))
    callback.log_trial_end(trial)
    experiment, groups = served(tmp_path)
    assert [m["name"]["tag"] for m in experiment["metricInfos"]] == [f"ray/tune/{name}" for name in unlabelled]
    assert len(groups[Path(trial.local_path).name]["metricValues"]) == len(unlabelled)


def test_configurations_alike_to_three_digits_get_two_runs_and_a_restarted_trial_keeps_its_own(tmp_path):
    callback = TrialHparams(NAMES, seed=0, metrics=LABELLED)
    near = {**BEST, "temperature": BEST["temperature"] + 1e-5}  # 0.0726 both, to three digits
    first, second = (
        StandIn(tmp_path / "confirm", f"c30a8_0000{i}", {"la": la, "seed": 1}, f"confirm_trial_{i}")
        for i, la in enumerate([BEST, near])
    )
    assert run_name(first.config, NAMES) == run_name(second.config, NAMES)
    run(callback, [first, second])
    callback.log_trial_start(first)  # its worker died: Tune starts it again
    callback.log_trial_result(3, first, result(3))
    callback.log_trial_end(first)
    name = "seed 1 tau=0.0726 m=0.221 k=294 R=7 C=166"
    owners = {p.parent.name: p.read_text() for p in (tmp_path / "confirm").glob(f"*/{RUN_OWNER}")}
    assert owners == {name: "c30a8_00000", f"{name} c30a8_00001": "c30a8_00001"}
    sessions = [run for run, parts in tensorboard_hparams(tmp_path).items() if "session_start_info" in parts]
    assert sorted(sessions) == [f"confirm/{name}", f"confirm/{name} c30a8_00001"]


def test_a_run_name_is_a_folder_name():
    config = {"la": {"merger": "weights/a.pth", "temperature": 0.5, "mixing_rate": 1e-4}, "seed": 3}
    assert run_name(config, ["merger", "temperature", "mixing_rate"]) == "seed 3 merger=weights_a.pth tau=0.5 m=0.0001"
    long = run_name({"la": {"x" * 300: 1}, "seed": 3}, ["x" * 300])
    assert len(long) <= 120


def test_the_run_names_label_a_configuration_as_the_confirmed_table_does():
    """One label for both (laray.settings.space.settings_label): the method's symbols, floats to 3 digits."""
    config = {"temperature": 0.07256, "mixing_rate": 0.2212, "k_neighbours": 294, "merger": "flatten"}
    assert settings_label(config) == "tau=0.0726 m=0.221 k=294 merger=flatten"
    assert run_name({"la": config, "seed": 2}, list(config)) == f"seed 2 {settings_label(config)}"
