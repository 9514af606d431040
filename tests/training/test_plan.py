"""The plan: the work counted against a hand count, ASHA's expected epochs, wall time on slots, --plan writing
nothing, and the measured costs."""

import dataclasses
import math
import os
import subprocess
import sys
import time

import pytest
import torch

from laray.settings.config import AutoEncoderConfig, LAConfig
from laray.settings.duration import duration
from laray.settings.space import SWEEP_SET, parse_space
from laray.sweep.plan import asha_epochs, confirmation_stage1_layout, plan_lines, plan_sweep, typical_la, wall_of
from laray.training.plan import (
    BUSY_SHARE,
    DDP_EFFICIENCY,
    StepCosts,
    busy_slowdown,
    count_run,
    ddp_speedup,
    la_seconds,
    measure,
    run_seconds,
    stage1_seconds,
    train_plan_lines,
)

AE = AutoEncoderConfig(arch="vgg11_bn", width=0.125, image_size=32, epochs=3, batch_size=16)
LA = LAConfig(epochs=4, batch_size=16, k_neighbours=10, n_centroids=5, clustering_repeats=2, eval_every=2)
# Each cost a distinct power of two: a sum of them names which work was counted how often.
COSTS = StepCosts(
    ae_image=1.0, la_image=2.0, la_image_together=2.0, encode_image=4.0, ae_kmeans=8.0, la_kmeans=16.0, raw_kmeans=32.0,
    recluster=64.0, decode_image=128.0, worker_start=256.0,
)  # fmt: skip


def test_a_run_counted_by_hand():
    n = 100
    work = count_run(n, AE, LA)
    assert (work.ae_epochs, work.la_epochs, work.la_evaluations, work.reclusters) == (3, 4, 2, 4)  # eval at 2, 4
    # stage 1: 3 epochs x (100 steps' images + an evaluation: 100 encodes + its k-means), then one merger's
    # baselines: raw k-means + 100 encodes + k-means on the codes
    assert stage1_seconds(work, COSTS) == 3 * (100 * 1 + 100 * 4 + 8) + (32 + 100 * 4 + 16)
    # LA: the bank's first codes (100 encodes), 4 epochs of 100 images, 4 reclusters, 2 evaluations
    assert la_seconds(work, COSTS) == 100 * 4 + 4 * 100 * 2 + 4 * 64 + 2 * (100 * 4 + 16)
    assert run_seconds(work, COSTS) == stage1_seconds(work, COSTS) + la_seconds(work, COSTS)
    # stage 1 from the store: nothing of it counted; reclustering every 3 steps: ceil(7 / 3) = 3 an epoch
    assert stage1_seconds(count_run(n, AE, LA, stage1=False), COSTS) == 0
    # from pretrained weights: their codes are encoded and clustered for a third baseline
    pretrained = count_run(n, AutoEncoderConfig(**{**AE.__dict__, "pretrained": "imagenet", "width": 1.0}), LA)
    assert stage1_seconds(pretrained, COSTS) - stage1_seconds(work, COSTS) == 100 * 4 + 16
    assert count_run(n, AE, LAConfig(**{**LA.__dict__, "recluster_every": 3})).reclusters == 4 * math.ceil(7 / 3)


def test_asha_epochs_follow_tunes_rule():
    assert asha_epochs(1, 10, 3) == [10]  # alone: nothing to compare with
    assert asha_epochs(5, 3, 3) == [3] * 5  # grace period at max_t: no rung, every trial runs to the end
    first, second, *rest = asha_epochs(40, 20, 2)  # rungs at 2 and 8 (rf 4)
    assert first == 20  # the first trial at a rung always goes on
    # above the one score before it at rung 2 half the time, and then above it at rung 8 too: 11 epochs on average
    assert second == pytest.approx(0.5 * 2 + 0.5 * 20, abs=1)
    assert 2 < sum(rest) / len(rest) < 2 + 0.5 * 18  # later trials: mostly stopped at the first rung


def test_wall_time_of_tasks_on_slots():
    assert wall_of([10, 10, 10], 1) == 30
    assert wall_of([10, 10, 10], 2) == 20
    assert wall_of([30, 10, 10, 10], 2) == 30  # the short ones fill the second slot
    assert wall_of([], 2) == 0
    # twice as slow with both slots busy: two 10 s tasks take 20 s at once, the same as one after the other
    assert wall_of([10, 10], 2, slowdown=2) == pytest.approx(20)
    # a 10 s and a 30 s task at 1.5x: the short one ends at 15 s, the long one has 20 s left alone: 35 s
    assert wall_of([10, 30], 2, slowdown=1.5) == pytest.approx(35)


def test_a_sweep_plan_adds_stage1_trials_and_the_confirmation():
    raw = {
        "num_samples": 4, "max_concurrent": 2, "grace_period": 4, "confirm_top": 1, "confirm_seeds": 2,
        "fixed": {"autoencoder": AE.__dict__, "la": {k: v for k, v in LA.__dict__.items() if k not in SWEEP_SET}},
        "search": {"temperature": {"loguniform": [0.01, 1.0]}},
    }  # fmt: skip
    space = parse_space(raw)
    assert typical_la(space, 100).temperature == pytest.approx(0.1)  # the log-middle
    plan = plan_sweep(space, 100, 10, COSTS, "cpu", 1, slots=2, decoded=True)
    work = count_run(100, AE, typical_la(space, 100))
    trial = 256 + la_seconds(work, COSTS)  # grace period 4 = max_t 4: ASHA stops no one
    assert plan.seconds["search"] == pytest.approx(2 * trial)  # 4 trials on 2 slots
    assert plan.seconds["stage1"] == pytest.approx(256 + stage1_seconds(work, COSTS))
    # the search's best and the recipe, x 2 seeds: 4 runs on 2 slots, after each seed's stage 1 (at once)
    assert plan.seconds["confirmation"] == pytest.approx((256 + stage1_seconds(work, COSTS)) + 2 * trial)
    assert plan.estimated_s == pytest.approx(sum(plan.seconds.values()))
    assert plan.to_json()["epochs"]["la_search_at_most"] == 16 and plan.to_json()["epochs"]["confirm_runs"] == 4
    assert plan.to_json()["epochs"]["time_budget_affords_trials"] is None
    budgeted = plan_sweep(dataclasses.replace(space, time_budget_s=10 * trial), 100, 10, COSTS, "cpu", 1, slots=2)
    # 10 trials' time on 2 slots, each trial no slower beside another (COSTS times both alike): 20 trials
    assert budgeted.to_json()["epochs"]["time_budget_affords_trials"] == 20


def _space(**extra):
    raw = {
        "num_samples": 4, "max_concurrent": 2, "grace_period": 4, "confirm_top": 1, "confirm_seeds": 2,
        "fixed": {"autoencoder": AE.__dict__, "la": {k: v for k, v in LA.__dict__.items() if k not in SWEEP_SET}},
        "search": {"temperature": {"loguniform": [0.01, 1.0]}},
    }  # fmt: skip
    raw["search"].update(extra)
    return parse_space(raw)


def test_stage1_on_workers_divides_its_steps_and_not_the_chiefs_evaluations():
    space = _space()
    work = count_run(100, AE, typical_la(space, 100))
    one = plan_sweep(space, 100, 10, COSTS, "cpu", 1, slots=2, decoded=True)
    four = plan_sweep(space, 100, 10, COSTS, "cpu", 1, slots=2, decoded=True, stage1_workers=4)
    epochs_steps = AE.epochs * 100 * COSTS.ae_image
    assert ddp_speedup(1) == 1 and ddp_speedup(4) == pytest.approx(4 * DDP_EFFICIENCY)
    assert stage1_seconds(work, COSTS) - stage1_seconds(work, COSTS, 4) == pytest.approx(
        epochs_steps * (1 - 1 / (4 * DDP_EFFICIENCY))
    )
    # the worker group's start besides the driver's first worker
    assert four.seconds["stage1"] == pytest.approx(2 * 256 + stage1_seconds(work, COSTS, 4))
    assert one.seconds["stage1"] == pytest.approx(256 + stage1_seconds(work, COSTS))
    assert four.to_json()["stage1_workers"] == 4 and one.to_json()["stage1_workers"] == 1
    lines = plan_lines(four, space, cuda=False)
    assert f"on 4 workers (data-parallel, {4 * DDP_EFFICIENCY:.1f}x one)" in lines[1]
    # 2 confirmation seeds over 4 workers: here the start of a worker group (256 s) outweighs what 2 workers a
    # seed save, so one worker a seed, both at once
    assert four.to_json()["epochs"]["confirm_stage1_workers"] == 1
    trial = 256 + la_seconds(work, COSTS)
    assert four.seconds["confirmation"] == pytest.approx(256 + stage1_seconds(work, COSTS) + 2 * trial)


@pytest.mark.parametrize(
    "seeds, workers, each",
    [(5, 8, 8), (2, 8, 4), (1, 2, 2), (5, 1, 1), (8, 8, 1), (5, 2, 1), (3, 4, 4)],
)
def test_the_confirmations_stage1_takes_the_layout_that_ends_soonest(seeds, workers, each):
    """Rounds of seeds at a time, each round 1 / speed-up of one worker's stage 1, ties to fewer workers."""
    assert confirmation_stage1_layout(seeds, workers) == each
    best = min(math.ceil(seeds / (workers // w)) / ddp_speedup(w) for w in range(1, workers + 1))
    assert math.ceil(seeds / (workers // each)) / ddp_speedup(each) == pytest.approx(best)


def test_when_evaluations_dominate_stage1_each_seed_keeps_one_worker():
    """The paper model's 8 A10Gs: the chief's evaluations 65 % of one worker's stage 1, which workers do not share."""

    def seconds(w: int) -> float:
        return 0.35 / ddp_speedup(w) + 0.65

    assert confirmation_stage1_layout(5, 8, seconds) == 1  # 1 round of 1.0 against 5 rounds of 0.71 on all 8
    assert confirmation_stage1_layout(1, 8, seconds) == 8  # one seed: every worker helps a little


def test_a_searched_stage1_is_counted_once_per_configuration_in_the_search():
    space = _space(stage1_epochs={"categorical": [0, 2, 5]})
    plan = plan_sweep(space, 100, 10, COSTS, "cpu", 1, slots=2, decoded=True)
    fixed = plan_sweep(_space(), 100, 10, COSTS, "cpu", 1, slots=2, decoded=True)
    la = typical_la(space, 100)
    assert la == typical_la(_space(), 100)  # stage 1's settings are no LA setting
    longest = stage1_seconds(count_run(100, dataclasses.replace(AE, epochs=5), la), COSTS)
    trial = 256 + la_seconds(count_run(100, AE, la), COSTS)
    # 4 trials on 2 slots; trials 2 and 3 each train one more stage 1 (at most 5 epochs): one per slot
    assert plan.to_json()["epochs"]["stage1_trained_by_trials"] == 2
    assert plan.seconds["search"] == pytest.approx(wall_of([trial, trial + longest, trial + longest, trial], 2))
    assert fixed.to_json()["epochs"]["stage1_trained_by_trials"] == 0
    lines = plan_lines(plan, space, cuda=False)
    assert any("up to 2 more stage-1 configuration(s) (stage 1 is searched)" in line for line in lines)


def test_measured_costs_are_positive_and_quick(one_torch_thread):
    costs = measure(AE, LA, 200, 10, torch.device("cpu"), threads=1, worker_start=0.0)
    for name, seconds in costs.__dict__.items():
        if name not in ("decode_image", "worker_start", "load", "cores"):
            assert 0 < seconds < 5, name
    assert costs.decode_image == 0 and costs.worker_start == 0
    assert costs.cores == len(os.sched_getaffinity(0)) and costs.load >= 0  # the machine as it was timed


def test_a_plan_timed_on_a_busy_machine_says_so_with_its_quiet_estimate():
    space = _space()
    busy = dataclasses.replace(COSTS, load=3.0, cores=2, cpu_share=0.5)  # the timed steps got half their cores
    plan = plan_sweep(space, 100, 10, busy, "cpu", 1, slots=2, decoded=True)
    assert busy_slowdown(busy) == 2.0
    assert plan.to_json()["estimated_quiet_s"] == pytest.approx(plan.estimated_s / 2, abs=0.1)
    assert plan.to_json()["load"] == 3.0
    line = next(line for line in plan_lines(plan, space, cuda=False) if "busy" in line)
    assert line.startswith("  the machine is busy (load 3.0 on 2 cores; the timed steps got 50% of their cores): ")
    assert line.endswith(f"as found, about {duration(plan.estimated_s / 2)} on a quiet machine")
    for quiet_costs in (dataclasses.replace(COSTS, load=3.0, cores=2, cpu_share=0.9), COSTS):  # 0.9, or not measured
        quiet = plan_sweep(space, 100, 10, quiet_costs, "cpu", 1, slots=2)
        assert quiet.estimated_quiet_s == quiet.estimated_s
        assert not any("busy" in line for line in plan_lines(quiet, space, cuda=False))
    total, lines = train_plan_lines(count_run(100, AE, LA), busy, AE, LA, "cpu")
    assert lines[-1].startswith("  the machine is busy (load 3.0 on 2 cores")


def test_the_cpu_share_of_timed_steps_falls_beside_busy_loops(one_torch_thread):
    """Measured alone, then beside two busy-loop processes per core of this machine."""
    alone = measure(AE, LA, 200, 10, torch.device("cpu"), threads=1, worker_start=0.0)
    # two per core, started before the timing begins (a Python's start takes a moment)
    loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2 * (os.cpu_count() or 2))]
    time.sleep(1.0)
    try:
        beside = measure(AE, LA, 200, 10, torch.device("cpu"), threads=1, worker_start=0.0)
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()
    assert 0 < alone.cpu_share <= 1
    # two busy loops per core beside a 1-thread step leave it about n / (2n + 1) of a core (0.4 on 2 cores), and
    # other work on the machine only less; the margin to 0.8 covers the process's own helper threads
    assert 0 < beside.cpu_share < BUSY_SHARE and busy_slowdown(beside) == pytest.approx(1 / beside.cpu_share)


@pytest.mark.parametrize("command", ["train", "sweep"])
def test_plan_prints_and_writes_nothing(tmp_path, command):
    argv = [sys.executable, "-m", "laray", command, "--plan", "--image-size", "32"]
    if command == "train":
        argv += ["--out", str(tmp_path / "out"), "--store", str(tmp_path / "store"), "--width", "0.125"]
    else:
        argv += ["--storage", str(tmp_path / "results"), "--name", "planned", "--num-samples", "2"]
        argv.remove("--image-size"), argv.remove("32")
    env = {"HOME": str(tmp_path), "LARAY_CACHE_DIR": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"}
    env["OMP_NUM_THREADS"] = "1"  # a busy 2-core machine: two threads wait on each other far longer
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "expected wall time on this machine:" in done.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"] or not any(tmp_path.iterdir()), list(
        tmp_path.rglob("*")
    )
    assert "took" not in done.stdout


def test_the_simulation_quantile_is_numpys():
    import numpy as np

    from laray.sweep.plan import _quantile

    rng = np.random.default_rng(0)
    for m in range(1, 12):
        values = sorted(rng.random(m))
        assert _quantile(values, 0.75) == pytest.approx(np.percentile(values, 75))


def test_ashas_reduction_factor_leaves_about_confirm_top_trials_their_every_epoch():
    from laray.sweep.plan import reduction_factor

    # the recipe and confirm_top others: 6 trials, confirm_top 1 -> rf 3, about 2 of 6 run every epoch
    assert reduction_factor(6, 1) == 3 and reduction_factor(12, 2) == 4 and reduction_factor(40, 3) == 4
    assert reduction_factor(6, 2) == 2 and reduction_factor(6, 0) == 4  # halving at most; Tune's default at most
    # the demo's 6 trials, 10 epochs, grace 3: with rf 3 about two run all 10 epochs, with Tune's 4 about one
    full = [sum(e == 10 for e in asha_epochs(6, 10, 3, rf=rf, seed=s)) for rf in (3, 4) for s in (0,)]
    assert asha_epochs(6, 10, 3, rf=3)[0] == 10 and full[0] >= full[1]
