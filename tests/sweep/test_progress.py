"""The sweep's console (laray.sweep.console): what a line says, from Tune's own trial list."""

from types import SimpleNamespace

import pytest

from laray.settings.duration import duration
from laray.sweep.console import SweepProgress


def trial(trial_id, status, epoch=None):
    return SimpleNamespace(trial_id=trial_id, status=status, last_result={} if epoch is None else {"epoch": epoch})


@pytest.mark.parametrize("seconds, text", [(0, "0 s"), (59.4, "59 s"), (61, "1 min 01 s"), (3725, "1 h 02 min")])
def test_duration(seconds, text):
    assert duration(seconds) == text


def test_lines_count_the_trials_and_bound_the_time_left(capsys):
    progress = SweepProgress("search", epochs=8, objective="purity", concurrency=2)
    progress.setup(num_samples=6, total_num_samples=6)
    a, b = trial("a", "RUNNING", 1), trial("b", "RUNNING", 1)
    progress.on_trial_result(
        0,
        [a, b],
        a,
        {"epoch": 1, "purity": 0.8123, "heldout_purity": 0.8, "images_per_s": 612.4, "time_this_iter_s": 4.0},
    )
    line = capsys.readouterr().out.strip()
    assert line.startswith("[search ") and "trial a epoch 1/8  purity 0.812 (held-out 0.800)  612 img/s" in line
    # 7 + 7 epochs of the two running trials, 4 x 8 of those not started: 46 epochs x 4 s / 2 at once
    assert "0/6 trials ended (2 running, 4 waiting), up to ~1 min 32 s left" in line

    progress.on_step_end(0, [a, b])
    assert capsys.readouterr().out == ""  # nothing ended
    stopped = [trial("a", "RUNNING", 8), trial("b", "TERMINATED", 3)]
    progress.on_step_end(0, stopped)
    line = capsys.readouterr().out.strip()
    assert "trial b stopped by ASHA after 3/8 epochs; 1/6 trials ended (1 running, 1 stopped early, 4 waiting)" in line
    failed = [trial("a", "ERROR", 8), trial("b", "TERMINATED", 3)]
    progress.on_step_end(0, failed)
    line = capsys.readouterr().out.strip()  # b is not announced twice
    assert line.count("\n") == 0 and "trial a FAILED" in line
    assert "2/6 trials ended (1 stopped early, 1 failed, 4 waiting)" in line
    progress.on_experiment_end(failed)
    assert capsys.readouterr().out == ""


def test_a_first_report_after_five_epochs_counts_five_epochs_for_the_time_left(capsys):
    """eval_every 5: a trial reports first at epoch 5, its time since it started spread over five epochs."""
    progress = SweepProgress("confirm", epochs=20, objective="purity", concurrency=2)
    progress.setup(total_num_samples=2)
    a, b = trial("a", "RUNNING", 5), trial("b", "RUNNING", 0)
    first = {"epoch": 5, "purity": 0.4, "time_this_iter_s": 30.0, "training_iteration": 1}
    progress.on_trial_result(0, [a, b], a, first)
    # 6 s an epoch; 15 + 20 epochs left, two at a time: 105 s
    assert "up to ~1 min 45 s left" in capsys.readouterr().out
    progress.on_trial_result(0, [a, b], a, {**first, "epoch": 10, "training_iteration": 2})
    assert progress.epoch_s == [6.0, 6.0]
    resumed = SweepProgress("confirm", epochs=20, objective="purity", concurrency=2)
    resumed.setup(total_num_samples=2)
    resumed.on_trial_result(0, [a, b], a, {**first, "epoch": 15, "training_iteration": 3})
    assert resumed.epoch_s == [30.0]  # its start unseen: its first report here counts one epoch
    restored = SweepProgress("confirm", epochs=20, objective="purity", concurrency=2)
    restored.setup(total_num_samples=2)
    restored.on_trial_start(0, [a, b], trial("a", "RUNNING", 10))  # from its checkpoint at epoch 10
    restored.on_trial_result(0, [a, b], a, {**first, "epoch": 15, "training_iteration": 3})
    assert restored.epoch_s == [6.0]  # the five epochs since


def test_a_resumed_sweep_counts_what_it_had_finished(capsys):
    progress = SweepProgress("confirm", epochs=8, objective="purity", concurrency=2)
    progress.setup(total_num_samples=4)
    trials = [trial("a", "TERMINATED", 8), trial("b", "TERMINATED", 8), trial("c", "RUNNING", 5)]
    progress.on_trial_start(0, trials, trials[2])
    assert "2/4 trials ended (1 running, 2 done, 1 waiting)" in capsys.readouterr().out
    progress.on_step_end(0, trials)
    assert capsys.readouterr().out == ""  # finished before the resume: not announced again
    progress.on_step_end(0, trials[:2] + [trial("c", "TERMINATED", 8)])
    assert "trial c finished; 3/4 trials ended (3 done, 1 waiting)" in capsys.readouterr().out


def test_lines_show_the_time_budget_left_and_the_trials_it_stopped(tmp_path, capsys):
    import json

    from laray.sweep.budget import BUDGET_FILE, BudgetStopper

    (tmp_path / BUDGET_FILE).write_text(json.dumps({"budget_s": 100.0, "spent_s": 40.0, "ended_search": False}))
    progress = SweepProgress("search", epochs=8, objective="purity", concurrency=1, budget_of=str(tmp_path))
    progress.setup(total_num_samples=3)
    a = trial("a", "RUNNING", 1)
    progress.on_trial_start(0, [a], a)
    assert "0/3 trials ended (1 running, 2 waiting); time budget 1 min 00 s left" in capsys.readouterr().out
    progress.on_step_end(0, [a])

    (tmp_path / BUDGET_FILE).write_text(json.dumps({"budget_s": 100.0, "spent_s": 100.5, "ended_search": False}))
    assert BudgetStopper(str(tmp_path))("a", {"epoch": 2}) is True  # what Tune asks at a's next report
    progress.on_step_end(0, [trial("a", "TERMINATED", 2)])
    line = capsys.readouterr().out
    assert "trial a stopped by the time budget after 2/8 epochs" in line and "time budget spent: no new trials" in line
