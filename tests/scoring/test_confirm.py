"""Confirmation statistics: which configurations are re-run, and how their seeds are summarised."""

import math

import numpy as np
import pytest

from laray.scoring.confirm import (
    baselines_over_seeds,
    confirmation_seeds,
    confirmed,
    describe_margin,
    interval95,
    margin_over,
    pick_top,
    summarize,
)

T_975_DF2 = 4.302652729911275  # Student's t, 97.5th percentile, 2 degrees of freedom (a printed table's value)


def test_seeds_are_fresh():
    assert confirmation_seeds(0, 3) == [1, 2, 3] and 7 not in confirmation_seeds(7, 5)


def test_pick_top_ranks_complete_trials_first_then_the_objective_and_skips_repeats():
    a, b, c, d = ({"temperature": t} for t in (0.1, 0.2, 0.3, 0.4))
    trials = [
        (a, {"purity": 0.95, "epoch": 3}),  # stopped by ASHA after 3 of 8 epochs
        (b, {"purity": 0.80, "epoch": 8}),
        (c, {"purity": 0.90, "epoch": 8}),
        (dict(c), {"purity": 0.85, "epoch": 8}),  # the same configuration again
        (d, {"purity": float("nan"), "epoch": 8}),
        (d, {}),
    ]
    assert pick_top(trials, "purity", "max", 8, 2) == [c, b]
    assert pick_top(trials, "purity", "max", 8, 5) == [c, b, a]
    assert pick_top(trials, "purity", "min", 8, 1) == [b]


def test_interval_is_students_t():
    values = [0.80, 0.86, 0.89]
    mean, sd = np.mean(values), np.std(values, ddof=1)
    lo, hi = interval95(values)
    assert lo == pytest.approx(mean - T_975_DF2 * sd / math.sqrt(3))
    assert hi == pytest.approx(mean + T_975_DF2 * sd / math.sqrt(3))
    assert interval95([0.9]) is None


def test_confirmed_groups_by_configuration_and_ranks_by_mean():
    a, b = {"temperature": 0.1}, {"temperature": 0.2}
    runs = [
        (a, 2, {"purity": 0.7, "heldout_purity": 0.6}),
        (b, 1, {"purity": 0.8, "heldout_purity": 0.7}),
        (a, 1, {"purity": 0.9, "heldout_purity": 0.8}),
        (b, 2, {"purity": 0.84, "heldout_purity": 0.76}),
    ]
    first, second = confirmed(runs, "purity", "max")
    assert first["config"] == b and first["seeds"] == [1, 2] and first["purity"] == [0.8, 0.84]
    assert first["purity_mean"] == pytest.approx(0.82) and first["heldout_purity_mean"] == pytest.approx(0.73)
    assert second["config"] == a and second["purity"] == [0.9, 0.7]  # in seed order
    assert second["purity_sd"] == pytest.approx(np.std([0.9, 0.7], ddof=1))
    assert [e["config"] for e in confirmed(runs, "purity", "min")] == [a, b]


def test_summaries_of_one_run_and_of_the_baselines():
    one = summarize([{"purity": 0.5, "nmi": 0.4}])
    assert one["purity_sd"] == 0.0 and one["purity_ci95"] is None and "ari" not in one
    base = baselines_over_seeds(
        {
            2: {"raw_pixels": {"purity": 0.6}, "autoencoder": {"purity": 0.7}},
            1: {"raw_pixels": {"purity": 0.5}, "autoencoder": {"purity": 0.9}},
        }
    )
    assert base["raw_pixels"]["seeds"] == [1, 2] and base["raw_pixels"]["purity"] == [0.5, 0.6]
    assert base["autoencoder"]["purity_mean"] == pytest.approx(0.8)
    assert list(base) == ["raw_pixels", "autoencoder"]  # no pretrained weights: no pretrained baseline


def test_the_pretrained_baseline_is_summarised_over_seeds_beside_the_others():
    base = baselines_over_seeds(
        {
            2: {"raw_pixels": {"purity": 0.6}, "autoencoder": {"purity": 0.7}, "pretrained": {"purity": 0.8}},
            1: {"raw_pixels": {"purity": 0.5}, "autoencoder": {"purity": 0.9}, "pretrained": {"purity": 0.6}},
        }
    )
    assert list(base) == ["raw_pixels", "autoencoder", "pretrained"]
    assert base["pretrained"]["seeds"] == [1, 2] and base["pretrained"]["purity"] == [0.6, 0.8]
    assert base["pretrained"]["purity_mean"] == pytest.approx(0.7)


def test_margin_over_raw_pixels_pairs_runs_with_their_seeds_baselines():
    winner = confirmed(
        [
            ({"temperature": 0.1}, seed, {"purity": p, "heldout_purity": h})
            for seed, p, h in ((3, 0.50, 0.46), (1, 0.47, 0.45), (2, 0.44, 0.40))
        ],
        "purity",
        "max",
    )[0]
    raw = baselines_over_seeds(
        {
            1: {"raw_pixels": {"purity": 0.35, "heldout_purity": 0.33}, "autoencoder": {}},
            2: {"raw_pixels": {"purity": 0.36, "heldout_purity": 0.34}, "autoencoder": {}},
            3: {"raw_pixels": {"purity": 0.34, "heldout_purity": 0.30}, "autoencoder": {}},
        }
    )
    margin = margin_over(winner, raw["raw_pixels"])
    # by hand, seeds 1, 2, 3: 0.47 - 0.35, 0.44 - 0.36, 0.50 - 0.34
    assert margin["seeds"] == [1, 2, 3] and margin["purity"] == pytest.approx([0.12, 0.08, 0.16])
    assert margin["purity_mean"] == pytest.approx(0.12)
    sd = np.std([0.12, 0.08, 0.16], ddof=1)
    assert margin["purity_sd"] == pytest.approx(0.04)
    assert margin["purity_ci95"] == pytest.approx(
        [0.12 - T_975_DF2 * sd / math.sqrt(3), 0.12 + T_975_DF2 * sd / math.sqrt(3)]
    )
    assert margin["heldout_purity"] == pytest.approx([0.12, 0.06, 0.16])
    assert margin["heldout_purity_mean"] == pytest.approx(0.34 / 3)
    assert margin["heldout_purity_ci95"] == pytest.approx(interval95([0.12, 0.06, 0.16]))


def test_margin_over_skips_seeds_the_baseline_lacks_and_scores_one_of_them_lacks():
    winner = {"seeds": [1, 2], "purity": [0.5, 0.6]}  # no held-out scores: a sweep without a held-out part
    margin = margin_over(winner, {"seeds": [2], "purity": [0.4], "heldout_purity": [0.3]})
    assert margin["seeds"] == [2] and margin["purity"] == pytest.approx([0.2]) and margin["purity_ci95"] is None
    assert "heldout_purity" not in margin


@pytest.mark.parametrize(
    "interval, verdict",
    [
        ([0.02, 0.2], "LA beat raw pixels"),
        ([-0.05, 0.2], "interval includes 0"),
        ([-0.2, -0.01], "LA did worse than raw pixels"),
    ],
)
def test_describe_margin_says_whether_la_beat_raw_pixels(interval, verdict):
    margin = {
        "purity_mean": 0.11,
        "purity_ci95": interval,
        "heldout_purity_mean": 0.09,
        "heldout_purity_ci95": [0.01, 0.17],
    }
    line = describe_margin(margin, "purity")
    assert line.startswith(
        f"winner minus k-means on raw pixels, paired by seed: purity +0.110 "
        f"[{interval[0]:+.3f}, {interval[1]:+.3f}], held-out +0.090 [+0.010, +0.170]"
    )
    assert verdict in line and "\n" not in line


def test_the_recipe_joins_the_top_configurations_once_and_marked():
    from laray.scoring.confirm import RECIPE_MARK, contenders

    recipe, a, b = {"temperature": 0.07}, {"temperature": 0.1}, {"temperature": 0.2}
    trials = [
        (dict(recipe), {"purity": 0.99, "epoch": 8}),  # the recipe's own search trial: not counted in the top
        (a, {"purity": 0.9, "epoch": 8}),
        (b, {"purity": 0.8, "epoch": 8}),
    ]
    assert contenders(trials, recipe, "purity", "max", 8, 2) == [a, b, {"temperature": 0.07, RECIPE_MARK: True}]
    assert contenders(trials, {"temperature": 0.07 + 1e-12}, "purity", "max", 8, 1)[0] == a  # alike to 9 digits
    assert contenders(trials, None, "purity", "max", 8, 1) == [recipe]


def _recipe_runs():
    from laray.scoring.confirm import RECIPE_MARK

    winner, recipe = {"temperature": 0.1}, {"temperature": 0.07, RECIPE_MARK: True}
    won = {1: (0.80, 0.78), 2: (0.86, 0.83), 3: (0.83, 0.84)}  # seed: (purity, held-out purity)
    base = {1: (0.76, 0.75), 2: (0.81, 0.80), 3: (0.80, 0.79)}
    runs = [(winner, s, {"purity": p, "heldout_purity": h}) for s, (p, h) in won.items()]
    runs += [(recipe, s, {"purity": p, "heldout_purity": h}) for s, (p, h) in base.items()]
    return runs, won, base


def test_margin_over_the_recipe_by_hand_and_the_verdict_both_ways():
    from laray.scoring.confirm import split_recipe, verdict

    runs, won, base = _recipe_runs()
    searched, recipe = split_recipe(confirmed(runs, "purity", "max"))
    assert [e["config"] for e in searched] == [{"temperature": 0.1}] and recipe["config"] == {"temperature": 0.07}
    margin = margin_over(searched[0], recipe)
    diffs = [won[s][0] - base[s][0] for s in (1, 2, 3)]  # 0.04, 0.05, 0.03
    held = [won[s][1] - base[s][1] for s in (1, 2, 3)]  # 0.03, 0.03, 0.05
    half = T_975_DF2 * np.std(diffs, ddof=1) / math.sqrt(3)  # 2.484 * 0.01 = 0.0248
    assert margin["seeds"] == [1, 2, 3] and margin["purity"] == pytest.approx(diffs)
    assert margin["purity_mean"] == pytest.approx(0.04)
    assert margin["purity_ci95"] == pytest.approx([0.04 - half, 0.04 + half])
    assert margin["heldout_purity_mean"] == pytest.approx(np.mean(held))
    beat, text = verdict(searched[0], margin, "purity")
    assert beat and text.startswith("the search found settings better than the recipe (temperature=0.1)")
    assert f"paired by seed (3 seeds): purity +0.040 [{0.04 - half:+.3f}, {0.04 + half:+.3f}], held-out +0.037" in text

    # the same runs, the recipe now the better one by 0.04 on every seed: no winner
    swapped = [({"temperature": 0.1} if c.get("is_recipe") else {**c, "is_recipe": True}, s, m) for c, s, m in runs]
    searched, recipe = split_recipe(confirmed(swapped, "purity", "max"))
    beat, text = verdict(searched[0], margin_over(searched[0], recipe), "purity")
    assert not beat and "no better than the recipe (the recipe did better): `laray train` with it is the answer" in text
    assert "purity -0.040" in text


@pytest.mark.parametrize(
    "purity, ci, held, why",
    [
        ([0.05], None, 0.05, "one seed: no interval"),
        ([0.01, 0.02], [-0.05, 0.08], 0.02, "the interval includes 0"),
        ([0.05, 0.06], [0.01, 0.1], -0.01, "the held-out half does not agree"),
    ],
)
def test_no_winner_within_the_seeds_spread(purity, ci, held, why):
    from laray.scoring.confirm import verdict

    margin = {"seeds": list(range(len(purity))), "purity_mean": float(np.mean(purity)), "purity_ci95": ci}
    margin |= {"heldout_purity_mean": held, "heldout_purity_ci95": None}
    beat, text = verdict({"config": {"temperature": 0.1}}, margin, "purity")
    assert not beat and f"no better than the recipe ({why})" in text
    assert verdict({"config": {}}, None, "purity") == (
        False,
        "the recipe was not re-run with the search's best: no verdict",
    )


def _margin(mean: float, sd: float, seeds: int = 5, held: float | None = 0.03) -> dict:
    half = 2.776 * sd / math.sqrt(seeds)  # t(0.975, 4) from a printed table: only its sign matters here
    return {
        "seeds": list(range(1, seeds + 1)),
        "purity_mean": mean,
        "purity_sd": sd,
        "purity_ci95": [mean - half, mean + half],
        "heldout_purity_mean": held,
    }


def test_seeds_to_settle_a_margin_ahead_inside_its_spread_by_hand():
    from laray.scoring.confirm import seeds_to_settle

    # mean 0.02, sd 0.04: t(0.975, S-1) / sqrt(S) must fall below 0.5. From a printed t table:
    # S = 17: 2.120 / 4.123 = 0.514; S = 18: 2.110 / 4.243 = 0.497
    assert seeds_to_settle(_margin(0.02, 0.04), "purity") == 18
    assert seeds_to_settle(_margin(0.005, 0.04), "purity") is None  # beyond MOST_SEEDS_SUGGESTED (about 250)
    assert seeds_to_settle(_margin(-0.02, 0.04), "purity") is None  # behind the recipe: no seeds make it a winner
    assert seeds_to_settle(_margin(0.02, 0.04, held=-0.01), "purity") is None  # the held-out half disagrees
    assert seeds_to_settle(_margin(0.05, 0.01), "purity") is None  # already settled: interval above 0
    assert seeds_to_settle(None, "purity") is None


def test_the_verdict_names_the_seeds_that_would_settle_it():
    from laray.scoring.confirm import verdict

    beat, text = verdict({"config": {"lr": 0.01}}, _margin(0.02, 0.04), "purity")
    assert not beat and "no better than the recipe (the interval includes 0)" in text
    assert text.endswith("; 18 seeds would settle a margin this size (--resume --confirm-seeds 18 adds them)")
    beat, text = verdict({"config": {"lr": 0.01}}, _margin(-0.02, 0.04), "purity")
    assert "would settle" not in text
