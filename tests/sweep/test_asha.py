"""laray.sweep.asha: ASHA's rungs survive a resume (Ray Tune saves the searcher's state, not the scheduler's)."""

import pickle
from types import SimpleNamespace

from laray.sweep.asha import STATE_FILE, ResumableASHA


def asha(folder):
    return ResumableASHA(folder, time_attr="epoch", metric="purity", mode="max", max_t=4, grace_period=1)


def test_a_restored_scheduler_decides_as_the_one_before_the_stop(tmp_path):
    first = asha(tmp_path)
    pickled = pickle.dumps(first)  # as Tune keeps it in tuner.pkl, when the sweep begins
    a, b = SimpleNamespace(trial_id="a"), SimpleNamespace(trial_id="b")
    for trial in (a, b):
        first.on_trial_add(None, trial)
    assert first.on_trial_result(None, a, {"epoch": 1, "purity": 0.7}) == "CONTINUE"
    assert first.on_trial_result(None, b, {"epoch": 1, "purity": 0.6}) == "STOP"  # below a's at the first rung
    assert (tmp_path / STATE_FILE).exists()

    def after_resume(scheduler) -> str:
        """a resumes at epoch 2 (0.9), then c reaches the first rung at 0.68."""
        scheduler.on_trial_add(None, a)
        c = SimpleNamespace(trial_id="c")
        scheduler.on_trial_add(None, c)
        assert scheduler.on_trial_result(None, a, {"epoch": 2, "purity": 0.9}) == "CONTINUE"
        return scheduler.on_trial_result(None, c, {"epoch": 1, "purity": 0.68})

    # Restored, the first rung holds a's 0.7 and b's 0.6 (cutoff 0.675): c goes on, as without the stop.
    assert after_resume(pickle.loads(pickled)) == "CONTINUE"  # what Tuner.restore brings back, the file read
    # Without the file, a's epoch-2 score lands in the empty first rung and stops c.
    (tmp_path / STATE_FILE).unlink()
    assert after_resume(pickle.loads(pickled)) == "STOP"
