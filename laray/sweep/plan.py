"""A sweep's plan before anything trains: its work counted, and the wall time that work takes here.

The step costs are measured on this machine (laray.training.plan). On top of one run's work a sweep
has stage 1 once, trials run `max_concurrent` at a time, ASHA stopping some of them at its rungs, and
the confirmation (stage 1 per fresh seed, then the top configurations once per seed). Which trials
ASHA stops depends on their scores: the plan takes the mean over simulated searches whose scores are
drawn at random, ASHA's rule applied to them as Ray Tune applies it. No Ray here: `--plan` starts nothing.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
import os

import numpy as np

from laray.settings.config import replace
from laray.settings.duration import duration
from laray.settings.space import SearchSpace
from laray.settings.stage1_search import STAGE1_SEARCHABLE, stage1_configurations
from laray.training.plan import StepCosts, busy_line, busy_slowdown, count_run, ddp_speedup, la_seconds, stage1_seconds

SIMULATIONS = 400
SLOW_WITHOUT_CUDA_S = 3600  # a plan longer than this on a machine without CUDA says how to get a smaller one


def typical_la(space: SearchSpace, n_images: int):
    """The LA settings of a middling trial: each searched setting at the middle of its range (log-middle if log)."""
    values = {}
    for name, dist in space.search.items():
        if name in STAGE1_SEARCHABLE:  # stage 1's: counted apart (plan_sweep)
            continue
        resolved = dist.resolve(name, n_images)
        if resolved.kind == "categorical":
            choices = list(resolved.args)
            values[name] = choices[len(choices) // 2]
            continue
        low, high = resolved.args
        log = resolved.log or resolved.kind == "loguniform"
        middle = math.sqrt(low * high) if log and low > 0 else (low + high) / 2
        values[name] = round(middle) if resolved.kind == "int" else middle
    return replace(space.la, **values)


def reduction_factor(trials: int, confirm_top: int) -> int:
    """ASHA's reduction factor for a search of `trials`: the recipe (the first trial) and about `confirm_top`
    others expected to run every epoch.

    At each rung ASHA lets about 1/rf of the trials go on. Tune's default, 4, left 1 of the demo's 6
    trials to run its 10 epochs, so the confirmation's second contender was judged after 3 (docs/sweeps.md).
    Between 2 and 4: halving at most, and Tune's default for searches of 4 x (confirm_top + 1) trials and more.
    """
    return max(2, min(4, trials // (confirm_top + 1)))


def confirm_configurations(space: SearchSpace, trials: int) -> int:
    """Configurations the confirmation re-runs: the search's best (other than the recipe) and the recipe."""
    return min(space.confirm_top, max(0, trials - 1)) + 1


def _most_stage1_epochs(space: SearchSpace) -> int:
    """The largest stage-1 epochs a search may ask for: a searched `stage1_epochs`'s top, else the fixed value."""
    dist = space.search.get("stage1_epochs")
    if dist is None:
        return space.ae.epochs
    return int(max(dist.args))


def confirmation_stage1_layout(seeds: int, workers: int, seconds=None) -> int:
    """Workers each confirmation seed's stage 1 takes, out of `workers`: the layout that ends soonest.

    w workers a seed run workers // w seeds at a time, in ceil(seeds / (workers // w)) rounds of
    seconds(w) each: one seed's stage 1 on w workers (default: 1 / ddp_speedup(w) of one worker's, its
    steps alone; the plan passes its estimate, in which the chief's evaluations do not shrink with w).
    A tie goes to fewer workers (less communication).
    """
    workers = max(1, workers)
    seconds = seconds or (lambda w: 1 / ddp_speedup(w))

    def wall(w: int) -> float:
        return math.ceil(seeds / (workers // w)) * seconds(w)

    return min(range(1, workers + 1), key=lambda w: (round(wall(w), 9), w))


def asha_epochs(trials: int, max_t: int, grace: int, seed: int = 0, rf: int = 4) -> list[float]:
    """Mean LA epochs each trial runs (in the order trials start) under ASHA, over simulated searches.

    Tune's rule (ray.tune.schedulers.async_hyperband): at each rung a trial goes on when its score is at
    least the (1 - 1/rf) quantile of the scores recorded there before it; the first always goes on.
    Trials reach the rungs in the order they started (they train at the same speed).
    """
    rungs = []
    grace = max(1, min(grace, max_t))
    k = 0
    while grace * rf**k < max_t:
        rungs.append(grace * rf**k)
        k += 1
    rng = np.random.default_rng(seed)
    total = np.zeros(trials)
    for _ in range(SIMULATIONS):
        recorded = {rung: [] for rung in rungs}  # each kept sorted
        for i, score in enumerate(rng.random(trials)):
            epochs = max_t
            for rung in rungs:
                seen = recorded[rung]
                stop = bool(seen) and score < _quantile(seen, 1 - 1 / rf)
                bisect.insort(seen, score)
                if stop:
                    epochs = rung
                    break
            total[i] += epochs
    return list(total / SIMULATIONS)


def _quantile(ordered: list[float], q: float) -> float:
    """numpy.percentile's default (linear) quantile of a sorted list, without numpy's per-call cost."""
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def wall_of(durations: list[float], slots: int, slowdown: float = 1.0) -> float:
    """Wall time of tasks started in order, each on the first slot to come free.

    durations: each task's seconds alone. slowdown: how much slower each runs with every slot busy (measured:
    the LA step with as many copies at once); with k of the slots busy, 1 + (slowdown - 1)(k - 1)/(slots - 1).
    """
    slots = max(1, slots)
    queue, running, now = list(durations), [], 0.0  # running: seconds of work (alone) each still has
    while queue or running:
        while queue and len(running) < slots:
            running.append(queue.pop(0))
        k = len(running)
        pace = 1 + (slowdown - 1) * (k - 1) / (slots - 1) if slots > 1 else 1.0
        step = min(running) * pace  # until the first running task ends
        now += step
        running = [left - step / pace for left in running if left - step / pace > 1e-9]
    return now


@dataclasses.dataclass(frozen=True)
class SweepPlan:
    n_images: int
    n_species: int
    trials: int
    concurrency: int
    device: str
    threads: int
    epochs: dict  # counted work: stage-1 epochs, LA epochs of all trials (mean under ASHA, and at most)
    seconds: dict  # start-up, stage 1, search, confirmation
    costs: StepCosts

    @property
    def estimated_s(self) -> float:
        return sum(self.seconds.values())

    @property
    def estimated_quiet_s(self) -> float:
        """The estimate for this machine when quiet (laray.training.plan.busy_slowdown)."""
        return self.estimated_s / busy_slowdown(self.costs)

    def to_json(self) -> dict:
        return {
            "estimated_s": round(self.estimated_s, 1),
            "estimated_quiet_s": round(self.estimated_quiet_s, 1),  # the same on a quiet machine (busy_slowdown)
            "load": round(self.costs.load, 2),  # the 1-minute load average as the steps were timed
            "parts_s": {k: round(v, 1) for k, v in self.seconds.items()},
            "images": self.n_images,
            "species": self.n_species,
            "trials": self.trials,
            "concurrency": self.concurrency,
            "device": self.device,
            "threads_per_trial": self.threads,
            "stage1_workers": self.epochs.get("stage1_workers", 1),
            "epochs": self.epochs,
            "step_costs_s": dataclasses.asdict(self.costs),
        }


def plan_sweep(
    space: SearchSpace,
    n_images: int,
    n_species: int,
    costs: StepCosts,
    device: str,
    threads: int,
    num_samples: int | None = None,
    slots: int | None = None,
    decoded: bool = False,
    stage1_workers: int = 1,
) -> SweepPlan:
    """The plan of a new sweep; `slots`: trials the cluster can run at once (default: this machine's).

    stage1_workers: data-parallel workers of stage 1 (laray.sweep.stage1_ddp), the confirmation's seeds laid
    out over them (confirmation_stage1_layout).
    """
    trials = num_samples or space.num_samples
    la = typical_la(space, n_images)
    slots = min(space.max_concurrent, slots or max(1, (os.cpu_count() or 1) // max(1, threads)))
    mergers = len(space.mergers())
    work = count_run(n_images, space.ae, la, mergers=mergers)
    decode = 0.0 if decoded else n_images * costs.decode_image

    def one_stage1(w: int) -> float:  # on w workers: a worker group's start too, when data-parallel
        return costs.worker_start * (2 if w > 1 else 1) + stage1_seconds(work, costs, w)

    stage1 = decode + one_stage1(stage1_workers)
    rf = reduction_factor(trials, space.confirm_top)
    epochs = asha_epochs(trials, max(1, la.epochs), space.grace_period, rf=rf)
    trial_s = [costs.worker_start + la_seconds(work, costs, round(e)) for e in epochs]
    # A searched stage 1: each further stage-1 configuration is trained once, by the first trial that asks for it
    # (laray.settings.stage1_search); at its largest searched epochs, an upper bound.
    own_stage1 = stage1_configurations(space, trials) - 1
    if own_stage1:
        longest = count_run(n_images, replace(space.ae, epochs=_most_stage1_epochs(space)), la, mergers=mergers)
        for i in range(own_stage1):
            trial_s[1 + i] += stage1_seconds(longest, costs)
    slowdown = costs.la_image_together / costs.la_image if costs.la_image else 1.0
    search = wall_of(trial_s, slots, slowdown)
    affords = None
    if space.time_budget_s is not None:  # no trial starts once it is spent; running ones end at their epoch's end
        search = min(search, space.time_budget_s + max(trial_s) / max(1, la.epochs))
        # the trials of a middling length (under ASHA) that the budget's slots hold, each slowed by its neighbours
        affords = math.floor(space.time_budget_s * slots / (float(np.mean(trial_s)) * max(1.0, slowdown)))
    confirm, per_seed = 0.0, 1
    if space.confirms:
        runs = confirm_configurations(space, trials) * space.confirm_seeds
        per_seed = confirmation_stage1_layout(space.confirm_seeds, stage1_workers, one_stage1)
        at_once = max(1, stage1_workers // per_seed) if per_seed > 1 else slots
        seeds = wall_of([one_stage1(per_seed)] * space.confirm_seeds, at_once, slowdown if per_seed == 1 else 1.0)
        confirm = seeds + wall_of([costs.worker_start + la_seconds(work, costs)] * runs, slots, slowdown)
    return SweepPlan(
        n_images,
        n_species,
        trials,
        slots,
        device,
        threads,
        {
            "stage1": space.ae.epochs,
            "stage1_workers": stage1_workers,
            "stage1_trained_by_trials": own_stage1,  # further stage-1 configurations, when stage 1 is searched
            "confirm_stage1_workers": per_seed,  # each confirmation seed's stage 1: the layout that ends soonest
            "la_per_trial": la.epochs,
            "la_search_mean": round(float(sum(epochs)), 1),
            "la_search_at_most": trials * la.epochs,
            "confirm_runs": confirm_configurations(space, trials) * space.confirm_seeds if space.confirms else 0,
            "asha_reduction_factor": rf,
            "time_budget_affords_trials": affords,
        },
        {"start": 2 * costs.worker_start, "stage1": stage1, "search": search, "confirmation": confirm},
        costs,
    )


def _over(workers: int) -> str:
    return f" on {workers} workers (data-parallel, {ddp_speedup(workers):.1f}x one)" if workers > 1 else ""


def plan_lines(plan: SweepPlan, space: SearchSpace, cuda: bool) -> list[str]:
    """The plan as the console shows it, one part a line, the total last."""
    ae, s, e = space.ae, plan.seconds, plan.epochs
    steps = math.ceil(plan.n_images / ae.batch_size)
    lines = [
        f"plan: {plan.n_images:,} images of {plan.n_species} species on {plan.device}, "
        f"{plan.threads} thread(s) per trial, {plan.concurrency} trial(s) at a time",
        f"  stage 1: {e['stage1']} epochs x {steps} steps of {ae.batch_size} ({ae.arch}, width {ae.width:g}, "
        f"{ae.image_size} px){_over(e.get('stage1_workers', 1))}, then its baselines: {duration(s['stage1'])}"
        if e["stage1"]
        else f"  stage 1: no epochs (LA starts from the encoder as it is), its baselines: {duration(s['stage1'])}",
        f"  search: {plan.trials} trials of up to {e['la_per_trial']} LA epochs, about {e['la_search_mean']:g} of "
        f"{e['la_search_at_most']} epochs run under ASHA: {duration(s['search'])}",
    ]
    if e.get("stage1_trained_by_trials"):
        lines.append(
            f"    and up to {e['stage1_trained_by_trials']} more stage-1 configuration(s) (stage 1 is searched), "
            "each trained once by the first trial that asks for it, counted in the search"
        )
    if e.get("time_budget_affords_trials") is not None:
        lines.append(
            f"  the time budget ({duration(space.time_budget_s)}) affords about {e['time_budget_affords_trials']} "
            f"trials of this length, {plan.trials} asked"
        )
    if e["confirm_runs"]:
        lines.append(
            f"  confirmation: {e['confirm_runs']} runs ({e['confirm_runs'] // space.confirm_seeds} configurations, "
            f"the recipe among them, x {space.confirm_seeds} seeds), stage 1 once per seed: "
            f"{duration(s['confirmation'])}"
        )
    c = plan.costs
    lines.append(
        f"  expected wall time on this machine: {duration(plan.estimated_s)} (measured here: stage-1 step "
        f"{c.ae_image * 1e3:.2g} ms/image, LA step {c.la_image * 1e3:.2g} ms/image, "
        f"encode {c.encode_image * 1e3:.2g} ms/image, a worker's start {c.worker_start:.1f} s)"
    )
    busy = None if cuda else busy_line(plan.costs, plan.estimated_s)
    if busy:
        lines.append(busy)
    if plan.estimated_s > SLOW_WITHOUT_CUDA_S and not cuda:
        lines.append(
            "  that is long for a machine without CUDA: fewer trials (--num-samples), a time budget "
            "(--time-budget 1h), or smaller settings (--space photos-cpu, or a space with fewer epochs, a smaller "
            "image_size or width) give a smaller plan"
        )
    return lines
