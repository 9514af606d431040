"""benchmarks/sampler_sim.py --small on a synthetic landscape (nothing trained): its table's rows, finite."""

import json
import math
import re

import numpy as np
import pytest
from conftest import load_benchmark

SAMPLERS = ("random", "qmc", "tpe", "tpe-scaled", "tpe-scaled-indep")  # GPSampler apart: a second a trial
SETTINGS = {
    "la.temperature": {"kind": "log", "low": 0.02, "high": 0.5},
    "la.jitter": {"kind": "lin", "low": 0.0, "high": 0.6},
    "la.clustering_repeats": {"kind": "int", "low": 1, "high": 12},
    "la.k_neighbours": {"kind": "logint", "low": 18, "high": 898},
    "la.merger": {"kind": "choice", "choices": ["mean", "flatten"]},
}


def synthetic_landscape(configs: int = 10, seeds=(0, 1)) -> dict:
    """A landscape in landscape.py's format: purity peaks at a temperature of 0.1, plus seed noise of sd 0.01."""
    rng = np.random.default_rng(0)
    points = [{"la.temperature": 0.04, "la.jitter": 0.4, "la.clustering_repeats": 7, "la.k_neighbours": 300}]
    points[0]["la.merger"] = "mean"
    for _ in range(configs - 1):
        points.append(
            {
                "la.temperature": float(math.exp(rng.uniform(math.log(0.02), math.log(0.5)))),
                "la.jitter": float(rng.uniform(0.0, 0.6)),
                "la.clustering_repeats": int(rng.integers(1, 13)),
                "la.k_neighbours": int(round(math.exp(rng.uniform(math.log(18), math.log(898))))),
                "la.merger": str(rng.choice(["mean", "flatten"])),
            }
        )
    runs = []
    for cid, point in enumerate(points):
        truth = 0.9 - 0.05 * math.log(point["la.temperature"] / 0.1) ** 2 - 0.02 * (point["la.merger"] == "flatten")
        for seed in seeds:
            purity = truth + rng.normal(0.0, 0.01)
            runs.append({"config_id": cid, "seed": seed, "purity": purity, "heldout_purity": purity - 0.005})
    return {
        "data": "synthetic",
        "n_images": 1000,
        "seeds": list(seeds),
        "settings": SETTINGS,
        "configs": [{"config_id": i, "config": c} for i, c in enumerate(points)],
        "runs": runs,
    }


def load_script():
    return load_benchmark("sampler_sim")


def rows(out: str, name: str, sizes, repeats: int) -> None:
    """Each (num_samples, recipe first or not) has its row, with finite numbers in range."""
    for n in sizes:
        for enqueue in ("no", "yes"):
            row = re.search(rf"^\| {name} \| {enqueue} \| {n} \| {repeats} \|(.*)\|\s*$", out, re.M)
            assert row, f"no row for {name}, recipe first {enqueue}, {n} samples in:\n{out}"
            values = [float(v) for v in row.group(1).split("|")]
            assert len(values) == 6 and all(math.isfinite(v) for v in values), row.group(0)
            pick, margin, _, win, loss, _ = values
            assert 0.5 < pick < 1.1 and -0.5 < margin < 0.5 and 0 <= win <= 1 and 0 <= loss <= 1, row.group(0)


def test_sampler_sim_small_prints_finite_rows(tmp_path, capsys):
    path = tmp_path / "landscape.json"
    path.write_text(json.dumps(synthetic_landscape()))
    assert load_script().main([str(path), "--small", "--samplers", *SAMPLERS]) == 0
    out = capsys.readouterr().out
    for kernel in ("isotropic", "ARD"):
        loo = re.search(
            rf"^leave-one-out, {kernel}.*: RMSE (\S+), MAE (\S+), Spearman (\S+); .* mean: RMSE (\S+);", out, re.M
        )
        assert loo and all(math.isfinite(float(v.rstrip(",;"))) for v in loo.groups()), out
    assert "(used)" in out, out
    assert re.search(r"^seed noise \(pooled between-seed sd of one run\): 0\.0\d+;", out, re.M), out
    for name in SAMPLERS:
        rows(out, name, (4, 6), 3)
    assert re.search(r"^load average \(1, 5, 15 min\): [\d., ]+; wall time \d+ s$", out, re.M), out


def test_sampler_sim_gp_row(tmp_path, capsys):
    path = tmp_path / "landscape.json"
    path.write_text(json.dumps(synthetic_landscape()))
    argv = [str(path), "--samplers", "gp-scaled", "--num-samples", "3", "--repeats", "2"]
    assert load_script().main(argv) == 0
    rows(capsys.readouterr().out, "gp-scaled", (3,), 2)


def load_landscape():
    return load_benchmark("landscape")  # it imports photo_recipe beside it


def test_landscape_report_by_hand():
    """The seed spread, the per-setting split and the best configuration against the recipe, on a made-up record."""
    landscape = load_landscape()
    record = synthetic_landscape(configs=10)
    means = landscape.config_means(record)
    by_hand = {cid: np.mean([r["purity"] for r in record["runs"] if r["config_id"] == cid]) for cid in range(10)}
    assert means == pytest.approx(by_hand)
    within = [[r["purity"] for r in record["runs"] if r["config_id"] == cid] for cid in range(10)]
    pooled = math.sqrt(sum(np.var(v, ddof=1) for v in within) / 10)  # 2 seeds each: one degree of freedom each
    assert landscape.seed_sd(record) == pytest.approx(pooled)
    best = landscape.best_against_recipe(record)
    top = max(range(1, 10), key=lambda cid: by_hand[cid])
    assert best["best_id"] == top and best["purity"]["recipe"] == pytest.approx(by_hand[0])
    pairs = {(r["config_id"], r["seed"]): r["purity"] for r in record["runs"]}
    assert best["purity"]["paired_diffs"] == pytest.approx([pairs[(top, s)] - pairs[(0, s)] for s in (0, 1)])
    rows = {row["setting"]: row for row in landscape.effects(record)}
    assert set(rows) == set(SETTINGS) and sum(r["fanova"] for r in rows.values()) == pytest.approx(1.0)
    # the made-up purity falls with the merger "flatten" (by 0.02) and peaks at temperature 0.1
    assert rows["la.merger"]["upper_minus_lower"] < 0
    text = landscape.report(record)
    assert "| la.temperature | 0.02–0.5 (log) |" in text and "best sampled configuration" in text


def test_landscape_small_trains_and_records(tmp_path, capsys):
    """--small: the recipe and one sampled configuration, one seed, on 120 digits: two real runs, recorded."""
    from conftest import write_digit_folder

    folder = write_digit_folder(tmp_path / "digits", 120)
    out = tmp_path / "landscape.json"
    argv = ["--small", "--data", str(folder), "--configs", "1", "--seeds", "0", "--jobs", "1"]
    argv += ["--out", str(out), "--workdir", str(tmp_path / "work"), "--cache-dir", str(tmp_path / "cache")]
    assert load_landscape().main(argv) == 0
    record = json.loads(out.read_text())
    assert [(r["config_id"], r["seed"]) for r in record["runs"]] == [(0, 0), (1, 0)]
    assert all(0 < r["purity"] <= 1 and 0 < r["heldout_purity"] <= 1 for r in record["runs"])
    assert record["configs"][0]["config"]["la.temperature"] == record["base"]["la"]["temperature"]  # the recipe
    assert "configuration 1 seed 0: purity" in capsys.readouterr().out
