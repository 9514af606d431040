"""Confirmation: the search's best configurations re-run with fresh seeds, ranked by their mean.

One LA run's purity swings between seeds (docs/experiments.md, benchmarks/photo_recipe.py) as much as
the differences a search ranks trials by, and ASHA judges a trial on one seed. So after the
search, the top K configurations are re-run with S fresh seeds each (both stages seeded: stage 1
is trained once per seed), as a second Tune run beside the search (laray.sweep.driver). Each
configuration is then described by its mean over seeds, the standard deviation and a 95 %
t-interval, mean +- t(0.975, S-1) * sd / sqrt(S) (Student's t: S is small and the spread
unknown), and the winner is the best mean. Pure functions; no Ray here.
"""

from __future__ import annotations

import json
import math

import numpy as np

from laray.score_names import LABEL_SCORES
from laray.scoring.holdout import PREFIX

SCORES = LABEL_SCORES  # what the confirmation summarises over seeds
CONFIRM_DIR = "confirm"  # STORAGE/NAME/confirm/: the confirmation's Tune experiment
# STORAGE/NAME/confirm-seeds-A-B/: seeds A to B, added by a --resume with a larger --confirm-seeds
ADDED_SEEDS_PREFIX = f"{CONFIRM_DIR}-seeds-"
# In a confirmation run's LA settings, marks the recipe (what `laray train` runs), re-run beside the search's best
# over the same seeds; taken out before the settings reach LAConfig (laray.sweep.trainable.confirm_trial).
RECIPE_MARK = "is_recipe"


def same_config(a: dict, b: dict) -> bool:
    """Two configurations alike, floats to 9 significant digits (a value may have passed through Optuna's storage)."""
    a, b = without_mark(a), without_mark(b)
    return a.keys() == b.keys() and all(
        math.isclose(a[k], b[k], rel_tol=1e-9) if isinstance(a[k], float) or isinstance(b[k], float) else a[k] == b[k]
        for k in a
    )


def without_mark(config: dict) -> dict:
    return {k: v for k, v in config.items() if k != RECIPE_MARK}


def contenders(trials: list[tuple[dict, dict]], recipe: dict | None, objective: str, mode: str, epochs: int, top: int):
    """What the confirmation re-runs: the search's `top` best configurations other than the recipe, then the
    recipe itself (marked with RECIPE_MARK), so that the search's best is always measured against it."""
    searched = [(c, m) for c, m in trials if recipe is None or not same_config(c, recipe)]
    chosen = pick_top(searched, objective, mode, epochs, top)
    return chosen + ([{**recipe, RECIPE_MARK: True}] if recipe is not None else [])


def split_recipe(entries: list[dict]) -> tuple[list[dict], dict | None]:
    """`confirmed` entries -> (the searched configurations' entries, the recipe's entry or None), marks removed."""
    searched, recipe = [], None
    for entry in entries:
        if entry["config"].get(RECIPE_MARK):
            recipe = {**entry, "config": without_mark(entry["config"])}
        else:
            searched.append(entry)
    return searched, recipe


def confirmation_seeds(seed: int, count: int) -> list[int]:
    """Fresh seeds: none of them is the search's own."""
    return [seed + 1 + i for i in range(count)]


def pick_top(trials: list[tuple[dict, dict]], objective: str, mode: str, epochs: int, top: int) -> list[dict]:
    """The `top` best distinct configurations of (config, last metrics) pairs.

    Trials that ran every LA epoch rank first: a trial ASHA stopped early was judged on fewer
    epochs, and an early score is not comparable with a final one. Then by the objective.
    """
    sign = 1 if mode == "max" else -1
    scored = [
        (m.get("epoch", 0) >= epochs, sign * m[objective], c)
        for c, m in trials
        if m and isinstance(m.get(objective), (int, float)) and math.isfinite(m[objective])
    ]
    scored.sort(key=lambda row: row[:2], reverse=True)
    chosen = []
    for _, _, config in scored:
        if config not in chosen:
            chosen.append(dict(config))
        if len(chosen) == top:
            break
    return chosen


def interval95(values) -> list[float] | None:
    """Student's t 95 % interval of the mean; None with fewer than two values."""
    from scipy.stats import t

    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return None
    half = t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
    return [float(values.mean() - half), float(values.mean() + half)]


def summarize(runs: list[dict]) -> dict:
    """Per score: the values (one per run, in the runs' order), their mean, sd and 95 % interval.

    Held-out scores (heldout_purity...) get only their mean (heldout_purity_mean) and values.
    """
    out = {}
    for name in SCORES:
        values = [float(r[name]) for r in runs if name in r]
        if values:
            out.update(
                {
                    name: values,
                    f"{name}_mean": float(np.mean(values)),
                    f"{name}_sd": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
                    f"{name}_ci95": interval95(values),
                }
            )
        held = [float(r[PREFIX + name]) for r in runs if PREFIX + name in r]
        if held:
            out.update({PREFIX + name: held, f"{PREFIX}{name}_mean": float(np.mean(held))})
    return out


def confirmed(runs: list[tuple[dict, int, dict]], objective: str, mode: str) -> list[dict]:
    """(config, seed, final metrics) of every confirmation run -> one entry per configuration, best mean first."""
    groups: dict[str, list[tuple[int, dict]]] = {}
    configs = {}
    for config, seed, metrics in runs:
        key = json.dumps(config, sort_keys=True)
        configs[key] = config
        groups.setdefault(key, []).append((seed, metrics))
    entries = []
    for key, seeded in groups.items():
        seeded.sort(key=lambda pair: pair[0])
        entries.append({"config": configs[key], "seeds": [s for s, _ in seeded], **summarize([m for _, m in seeded])})
    sign = 1 if mode == "max" else -1
    return sorted(entries, key=lambda e: sign * e.get(f"{objective}_mean", -sign * math.inf), reverse=True)


def baselines_over_seeds(baselines: dict[int, dict]) -> dict:
    """{seed: {"raw_pixels": scores, "autoencoder": scores[, "pretrained": scores]}} -> each summarised over seeds.

    Every baseline that each seed scored, in the first seed's order: the seeds share their stage-1
    settings, so a stage 1 from pretrained weights gives all of them "pretrained" and any other none.
    """
    seeds = sorted(baselines)
    names = [name for name in baselines[seeds[0]] if all(name in baselines[s] for s in seeds)] if seeds else []
    return {name: {"seeds": seeds, **summarize([baselines[s][name] for s in seeds])} for name in names}


def margin_over(winner: dict, baseline: dict) -> dict:
    """The winner's scores minus a baseline's, paired by seed: the same summary as `summarize`, over the differences.

    winner: a `confirmed` entry; baseline: one of `baselines_over_seeds`. Each confirmation seed
    trains its own stage 1 and scores its own baselines, so the differences are paired, and their
    interval says whether the winner beat the baseline beyond the seeds' spread. Held-out scores
    get an interval too (heldout_purity_ci95): the estimate to report needs one most.
    """

    def per_seed(summary: dict) -> dict[int, dict]:
        names = [
            n for n in (*SCORES, *(PREFIX + s for s in SCORES)) if len(summary.get(n, ())) == len(summary["seeds"])
        ]
        return {seed: {n: summary[n][i] for n in names} for i, seed in enumerate(summary["seeds"])}

    won, base = per_seed(winner), per_seed(baseline)
    seeds = [s for s in won if s in base]
    runs = [{n: won[s][n] - base[s][n] for n in won[s] if n in base[s]} for s in seeds]
    out = {"seeds": seeds, **summarize(runs)}
    for name in SCORES:
        if PREFIX + name in out:
            out[f"{PREFIX}{name}_ci95"] = interval95(out[PREFIX + name])
    return out


def describe_margin(margin: dict, objective: str) -> str:
    """One line: the winner's margin over k-means on raw pixels, its interval, held-out, and what it means."""

    def part(name: str) -> str:
        ci = margin.get(f"{name}_ci95")
        return f"{margin[f'{name}_mean']:+.3f}" + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "")

    text = f"{objective} {part(objective)}"
    if f"{PREFIX}{objective}_mean" in margin:
        text += f", held-out {part(PREFIX + objective)}"
    ci = margin.get(f"{objective}_ci95")
    if ci is None:
        verdict = "one seed: no interval"
    elif ci[0] > 0:
        verdict = "LA beat raw pixels on these images"
    elif ci[1] < 0:
        verdict = "LA did worse than raw pixels on these images"
    else:
        verdict = "not shown to beat raw pixels: the interval includes 0"
    return f"winner minus k-means on raw pixels, paired by seed: {text} (95 % intervals); {verdict}"


# The most seeds a verdict suggests: a margin that needs more is too small beside its spread to be worth the runs
MOST_SEEDS_SUGGESTED = 30


def seeds_to_settle(margin: dict | None, objective: str) -> int | None:
    """How many seeds would put the paired interval above 0, were the margin's mean and sd to hold; else None.

    Only for a margin ahead in the mean (held-out too) whose interval includes 0: the smallest S with
    t(0.975, S-1) * sd / sqrt(S) < mean, at most MOST_SEEDS_SUGGESTED. A planning figure, not a promise: more
    seeds measure the mean again, and it may shrink.
    """
    from scipy.stats import t

    if not margin or not margin.get(f"{objective}_ci95") or not margin.get(f"{objective}_sd"):
        return None
    mean, sd = margin[f"{objective}_mean"], margin[f"{objective}_sd"]
    held = margin.get(f"{PREFIX}{objective}_mean")
    if mean <= 0 or (held is not None and held <= 0) or margin[f"{objective}_ci95"][0] > 0:
        return None
    for seeds in range(len(margin["seeds"]) + 1, MOST_SEEDS_SUGGESTED + 1):
        if t.ppf(0.975, seeds - 1) * sd / math.sqrt(seeds) < mean:
            return seeds
    return None


def verdict(winner: dict, margin: dict | None, objective: str) -> tuple[bool, str]:
    """Whether the search's confirmed best beat the recipe, and the sentence that says so.

    Better means: its mean minus the recipe's, paired by seed, has a 95 % interval above 0, and the held-out
    half (when there is one) agrees in sign. Anything less and `laray train` with the recipe is the answer:
    a winner within the seeds' spread of the recipe is no winner.
    """
    if margin is None or not margin.get("seeds"):
        return False, "the recipe was not re-run with the search's best: no verdict"

    def part(name: str) -> str:
        ci = margin.get(f"{name}_ci95")
        return f"{margin[f'{name}_mean']:+.3f}" + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "")

    text = f"{objective} {part(objective)}"
    held = margin.get(f"{PREFIX}{objective}_mean")
    if held is not None:
        text += f", held-out {part(PREFIX + objective)}"
    count = len(margin["seeds"])
    over = f"over the recipe, paired by seed ({count} seed{'s' if count > 1 else ''}): {text}"
    ci = margin.get(f"{objective}_ci95")
    if ci is not None and ci[0] > 0 and (held is None or held > 0):
        settings = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in winner["config"].items())
        return True, f"the search found settings better than the recipe ({settings}): {over}"
    if ci is None:
        why = "one seed: no interval"
    elif ci[1] < 0:
        why = "the recipe did better"
    elif ci[0] > 0:
        why = "the held-out half does not agree"
    else:
        why = "the interval includes 0"
        settle = seeds_to_settle(margin, objective)
        if settle is not None:
            over += f"; {settle} seeds would settle a margin this size (--resume --confirm-seeds {settle} adds them)"
    return False, f"the search's best is no better than the recipe ({why}): `laray train` with it is the answer; {over}"
