"""Tune's experiment state kept whole across a kill (laray.sweep.tune_state): what counts as torn, the copy
kept after each save, laray's own files kept out of Tune's copying, and the repair before a resume. The
sweep killed with its state torn and resumed: tests/sweep/test_sweep.py."""

import json
import pickle
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from laray.errors import SweepError
from laray.results.scores import tune_trial_states
from laray.sweep.tune_state import KEPT_FILE, KeepTuneState, is_tune_state, is_whole, repair_tune_state

S1, S2 = "2026-12-07_06-36-40", "2026-12-07_06-37-03"
STATE = {"trial_data": [json.dumps({"trial_id": "a", "status": "TERMINATED"})], "note": "1.5 . stop."}


def _pickled() -> bytes:
    # strings with '.', pickle's STOP opcode byte, so that a cut after one of them is not taken for the end
    return pickle.dumps({"sampler": "tpe.", "trials": [1.0, 2.5, "x.y."], "nested": {"a": b"..."}})


def test_a_state_file_is_whole_only_when_all_of_it_is_there():
    # Tune pickles its search generators' state into .json files (basic-variant-state-*.json): by content, not name
    for data in (json.dumps(STATE).encode(), _pickled(), pickle.dumps({"iterators": [1, 2]}, protocol=2)):
        assert is_whole(data)
        assert not any(is_whole(data[:cut]) for cut in range(len(data))), data  # every prefix: torn


def test_which_files_are_tunes_state():
    tunes = [f"experiment_state-{S1}.json", f"search_gen_state-{S1}.json", f"searcher-state-{S1}.pkl"]
    tunes += [f"callback-states-{S1}.pkl", f"basic-variant-state-{S1}.json", "tuner.pkl"]
    assert all(is_tune_state(n) for n in tunes)
    lays = ["asha.json", "budget.json", "plan.json", "sweep.json", "best.json", "events.out.tfevents.laray-hparams"]
    assert not any(is_tune_state(n) for n in lays + [KEPT_FILE, f"experiment_state-{S1}.json.torn"])


def _staging(tmp_path: Path) -> tuple[Path, list]:
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / f"experiment_state-{S1}.json").write_text(json.dumps(STATE))
    (staging / f"searcher-state-{S1}.pkl").write_bytes(_pickled())
    (staging / "tuner.pkl").write_bytes(_pickled())
    (staging / "train_trial_1").mkdir()
    return staging, [SimpleNamespace(local_experiment_path=str(staging))]


def test_each_save_is_kept_whole_beside_the_experiment_and_only_when_it_changed(tmp_path):
    staging, trials = _staging(tmp_path)
    experiment = tmp_path / "results" / "sweep"
    experiment.mkdir(parents=True)
    keeper = KeepTuneState(str(experiment))
    keeper.on_step_end(iteration=0, trials=[])  # no trial yet: nothing to keep
    assert not (experiment / KEPT_FILE).exists()
    keeper.on_step_end(iteration=1, trials=trials)
    kept = experiment / KEPT_FILE
    with zipfile.ZipFile(kept) as archive:
        assert sorted(archive.namelist()) == sorted(
            [f"experiment_state-{S1}.json", f"searcher-state-{S1}.pkl", "tuner.pkl"]
        )
        assert archive.read(f"searcher-state-{S1}.pkl") == _pickled()
    first = kept.stat().st_mtime_ns
    keeper.on_step_end(iteration=2, trials=trials)  # Tune saved nothing since: not written again
    assert kept.stat().st_mtime_ns == first
    (staging / f"experiment_state-{S1}.json").write_text(json.dumps({**STATE, "more": 1}))
    keeper.on_step_end(iteration=3, trials=trials)
    with zipfile.ZipFile(kept) as archive:
        assert json.loads(archive.read(f"experiment_state-{S1}.json"))["more"] == 1
    (staging / f"experiment_state-{S1}.json").write_text(json.dumps({**STATE, "more": 2}))  # Tune's last save
    keeper.on_experiment_end(trials=trials)
    with zipfile.ZipFile(kept) as archive:
        assert json.loads(archive.read(f"experiment_state-{S1}.json"))["more"] == 2


def test_lays_own_files_leave_the_staging_folder_before_tunes_first_save(tmp_path):
    staging, trials = _staging(tmp_path)
    for name in ("asha.json", "budget.json", "plan.json"):  # copies Tune's restore made of laray's files
        (staging / name).write_text("{}")
    (staging / "events.out.tfevents.laray-hparams").write_bytes(b"tb")  # laray writes this one there itself
    KeepTuneState(str(tmp_path)).on_step_begin(iteration=0, trials=trials)
    left = sorted(p.name for p in staging.iterdir())
    assert left == sorted(
        [f"experiment_state-{S1}.json", f"searcher-state-{S1}.pkl", "tuner.pkl", "train_trial_1"]
        + ["events.out.tfevents.laray-hparams"]
    )


def _experiment(tmp_path: Path) -> Path:
    """An experiment resumed once (sessions S1, S2), with the copy kept after S2's last save."""
    experiment = tmp_path / "sweep"
    experiment.mkdir()
    files = {
        f"experiment_state-{S1}.json": json.dumps(STATE).encode(),
        f"searcher-state-{S1}.pkl": _pickled(),
        f"experiment_state-{S2}.json": json.dumps({**STATE, "session": 2}).encode(),
        f"searcher-state-{S2}.pkl": pickle.dumps({"session": 2}),
        "tuner.pkl": _pickled(),
    }
    with zipfile.ZipFile(experiment / KEPT_FILE, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    for name, data in files.items():
        (experiment / name).write_bytes(data)
    return experiment


def test_a_torn_session_is_set_aside_and_taken_whole_from_the_kept_copy(tmp_path):
    experiment = _experiment(tmp_path)
    state2 = experiment / f"experiment_state-{S2}.json"
    whole = state2.read_bytes()
    state2.write_bytes(whole[: len(whole) // 2])  # the kill came while Tune copied it
    (experiment / f"searcher-state-{S2}.pkl").write_bytes(pickle.dumps({"session": 2, "newer": True}))  # whole
    s1_before = (experiment / f"experiment_state-{S1}.json").stat().st_mtime_ns
    taken = repair_tune_state(experiment)
    # both of S2's files from one save (a whole but newer searcher beside an older state would not match)
    assert sorted(taken) == sorted([f"experiment_state-{S2}.json", f"searcher-state-{S2}.pkl"])
    assert state2.read_bytes() == whole
    assert pickle.loads((experiment / f"searcher-state-{S2}.pkl").read_bytes()) == {"session": 2}
    assert (experiment / f"experiment_state-{S2}.json.torn").read_bytes() == whole[: len(whole) // 2]
    assert (experiment / f"experiment_state-{S1}.json").stat().st_mtime_ns == s1_before  # S1 was whole: untouched


def test_nothing_torn_leaves_the_experiment_as_it_is(tmp_path):
    experiment = _experiment(tmp_path)
    before = {p.name: p.read_bytes() for p in experiment.iterdir()}
    assert repair_tune_state(experiment) == []
    assert {p.name: p.read_bytes() for p in experiment.iterdir()} == before


def test_a_torn_state_without_a_kept_copy_is_one_error_naming_the_file_and_what_to_do(tmp_path):
    experiment = _experiment(tmp_path)
    (experiment / KEPT_FILE).unlink()
    for session in (S1, S2):
        (experiment / f"experiment_state-{session}.json").write_text('{"trial_data": [')
    with pytest.raises(SweepError) as error:
        repair_tune_state(experiment)
    message = str(error.value)
    assert "\n" not in message and f"experiment_state-{S2}.json" in message
    assert f"--warm-start {experiment}" in message


def test_the_trial_states_come_from_the_newest_whole_experiment_state(tmp_path):
    experiment = _experiment(tmp_path)
    assert tune_trial_states(experiment) == [{"trial_id": "a", "status": "TERMINATED"}]
    (experiment / f"experiment_state-{S1}.json").write_text(json.dumps({"trial_data": []}))
    (experiment / f"experiment_state-{S2}.json").write_text('{"trial_data": [')  # the newest, torn
    assert tune_trial_states(experiment) == []  # S1's, not an error
