"""The landscape: how much each setting moves purity across its range, against the seeds' spread.

Samples configurations of a space's five LA settings and of the fixed settings that plausibly matter
(LA learning rate and epochs, the augmentation's crop, jitter, grey and blur, the merger, the image size,
stage-1 epochs), over wide ranges (WIDE below, relative to the data set's size and to the recipe), by a
scrambled Sobol sequence; runs each over several seeds with `laray train` (one thread a run, --jobs side by
side, stage 1 shared through the store); then prints, per setting, how far purity moves across its range
against the seed-to-seed spread, and the best sampled configuration against the recipe (configuration 0)
over the same seeds:

    python benchmarks/landscape.py --data digits --configs 24 --seeds 0 1 --out landscape_digits.json
    python benchmarks/landscape.py --data PHOTOS --configs 16 --seeds 0 1 --out landscape_photos.json
    python benchmarks/landscape.py --report landscape_digits.json      # the tables again, nothing runs

The JSON file is written after every run and read back on start: a stopped run resumes. It is what
benchmarks/sampler_sim.py replays to compare samplers without training. --small: a few tiny runs (tests).
Scores are purity on the selection half of a 0.5 held-out split (as a sweep's); "held-out" the other half.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from photo_recipe import one_run, settings  # noqa: E402  (the benchmarks folder is not a package)

# Ranges sampled: (kind, low, high) with low/high as numbers or as functions of (n_images, recipe value);
# "choice" lists its options. Wider than the bundled spaces', so that the tables say where the plateau ends.
WIDE = {
    "la.temperature": ("log", 0.02, 0.5),
    "la.mixing_rate": ("log", 0.03, 0.9),
    "la.k_neighbours": ("logint", lambda n, r: max(5, round(0.01 * n)), lambda n, r: round(0.5 * n)),
    "la.clustering_repeats": ("int", 1, 12),
    "la.n_centroids": ("logint", lambda n, r: max(4, round(0.005 * n)), lambda n, r: round(0.3 * n)),
    "la.lr": ("log", lambda n, r: r / 4, lambda n, r: r * 4),
    "la.epochs": ("int", lambda n, r: max(2, r // 2), lambda n, r: r * 3 // 2),
    "la.crop_min_area": ("lin", 0.2, 0.95),
    "la.jitter": ("lin", 0.0, 0.6),
    "la.grey": ("lin", 0.0, 0.5),
    "la.blur": ("lin", 0.0, 0.5),
    "la.merger": ("choice", ["mean", "flatten"]),
    "autoencoder.image_size": ("choice", lambda n, r: sorted({max(32, r * 3 // 4 // 16 * 16), r})),
    "autoencoder.epochs": ("choice", lambda n, r: sorted({0, r, max(2, r * 2)}) if r else [0, 3]),
}
LA_SETTINGS = ("la.temperature", "la.mixing_rate", "la.k_neighbours", "la.clustering_repeats", "la.n_centroids")


def _value(bound, n: int, recipe):
    return bound(n, recipe) if callable(bound) else bound


def ranges(names: list[str], n_images: int, ae, la) -> dict:
    """Each sampled setting's range resolved for this data set: {name: {"kind", "low", "high"} or {"choices"}}."""
    out = {}
    for name in names:
        section, field = name.split(".")
        recipe = getattr(ae if section == "autoencoder" else la, field)
        kind, *bounds = WIDE[name]
        if kind == "choice":
            out[name] = {"kind": "choice", "choices": list(_value(bounds[0], n_images, recipe))}
        else:
            low, high = (_value(b, n_images, recipe) for b in bounds)
            out[name] = {"kind": kind, "low": low, "high": high}
    return out


def point(spec: dict, u: float):
    """The setting's value at the unit coordinate u in [0, 1)."""
    if spec["kind"] == "choice":
        return spec["choices"][min(int(u * len(spec["choices"])), len(spec["choices"]) - 1)]
    low, high = spec["low"], spec["high"]
    if spec["kind"] in ("log", "logint"):
        value = math.exp(math.log(low) + u * (math.log(high) - math.log(low)))
    else:
        value = low + u * (high - low)
    if spec["kind"] in ("int", "logint"):
        return int(min(max(round(value), low), high))
    return float(value)


def sample(space: dict, count: int, seed: int) -> list[dict]:
    """count configurations by a scrambled Sobol sequence over the settings' unit cube."""
    from scipy.stats import qmc

    names = sorted(space)
    units = qmc.Sobol(d=len(names), scramble=True, seed=seed).random(count)
    return [{name: point(space[name], u) for name, u in zip(names, row)} for row in units]


def recipe_point(names: list[str], ae, la) -> dict:
    return {n: getattr(ae if n.startswith("autoencoder.") else la, n.split(".")[1]) for n in names}


def applied(ae, la, config: dict):
    from laray.settings.config import replace

    ae_changes = {k.split(".")[1]: v for k, v in config.items() if k.startswith("autoencoder.")}
    la_changes = {k.split(".")[1]: v for k, v in config.items() if k.startswith("la.")}
    return replace(ae, **ae_changes), replace(la, **la_changes)


def _save(path: Path, record: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)


# --- the report: pure functions over the recorded runs ---------------------------------------------------------


def config_means(record: dict, score: str = "purity") -> dict[int, float]:
    by: dict[int, list[float]] = {}
    for run in record["runs"]:
        by.setdefault(run["config_id"], []).append(run[score])
    return {cid: float(np.mean(v)) for cid, v in by.items() if len(v) == len(record["seeds"])}


def seed_sd(record: dict, score: str = "purity") -> float:
    """The pooled within-configuration standard deviation: what one run's purity moves from seed to seed."""
    by: dict[int, list[float]] = {}
    for run in record["runs"]:
        by.setdefault(run["config_id"], []).append(run[score])
    groups = [v for v in by.values() if len(v) > 1]
    dof = sum(len(v) - 1 for v in groups)
    return float(math.sqrt(sum(np.var(v, ddof=1) * (len(v) - 1) for v in groups) / dof)) if dof else float("nan")


def effects(record: dict, score: str = "purity") -> list[dict]:
    """Per setting: configuration means with its value in the lower against the upper half of its range.

    The difference (upper minus lower) with its standard error from the two groups' spread, which holds both
    the seeds' noise and the other settings' variation; the rank correlation; fANOVA's share of variance.
    """
    from scipy.stats import spearmanr

    means = config_means(record, score)
    configs = {c["config_id"]: c["config"] for c in record["configs"]}
    ids = [cid for cid in sorted(means) if cid != 0]  # the recipe (0) is not a sample of the ranges
    importances = fanova(record, ids, means)
    rows = []
    for name, spec in record["settings"].items():
        values = [configs[cid][name] for cid in ids]
        ys = np.array([means[cid] for cid in ids])
        if spec["kind"] == "choice":
            order = {c: i for i, c in enumerate(spec["choices"])}
            coded = np.array([order[v] for v in values], dtype=float)
            split = (len(spec["choices"]) - 1) / 2
        else:
            log = spec["kind"] in ("log", "logint")
            coded = np.log(np.array(values, dtype=float)) if log else np.array(values, dtype=float)
            lo, hi = (math.log(spec["low"]), math.log(spec["high"])) if log else (spec["low"], spec["high"])
            split = (lo + hi) / 2
        low, high = ys[coded <= split], ys[coded > split]
        if len(low) < 2 or len(high) < 2:
            diff = se = float("nan")
        else:
            diff = float(high.mean() - low.mean())
            se = float(math.sqrt(low.var(ddof=1) / len(low) + high.var(ddof=1) / len(high)))
        rho = float(spearmanr(coded, ys).statistic) if len(set(coded)) > 1 else float("nan")
        rows.append(
            {"setting": name, "upper_minus_lower": diff, "se": se, "spearman": rho, "fanova": importances.get(name)}
        )
    return sorted(rows, key=lambda r: -(r["fanova"] or 0))


def fanova(record: dict, ids: list[int], means: dict) -> dict:
    """Optuna's fANOVA importances on the per-configuration means (a study built from them, nothing trained)."""
    import optuna

    if len(ids) < 4:
        return {}
    dists = {}
    for name, spec in record["settings"].items():
        if spec["kind"] == "choice":
            dists[name] = optuna.distributions.CategoricalDistribution(spec["choices"])
        elif spec["kind"] in ("int", "logint"):
            dists[name] = optuna.distributions.IntDistribution(spec["low"], spec["high"], log=spec["kind"] == "logint")
        else:
            dists[name] = optuna.distributions.FloatDistribution(spec["low"], spec["high"], log=spec["kind"] == "log")
    configs = {c["config_id"]: c["config"] for c in record["configs"]}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize")
    for cid in ids:
        study.add_trial(optuna.trial.create_trial(params=configs[cid], distributions=dists, value=means[cid]))
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
    return {k: float(v) for k, v in optuna.importance.get_param_importances(study, evaluator=evaluator).items()}


def best_against_recipe(record: dict) -> dict | None:
    """The best sampled configuration's mean and the recipe's, over the same seeds, paired by seed."""
    means = config_means(record)
    if 0 not in means or len(means) < 2:
        return None
    best = max((cid for cid in means if cid != 0), key=lambda cid: means[cid])
    per = {(r["config_id"], r["seed"]): r for r in record["runs"]}
    out = {"best_id": best}
    for score in ("purity", "heldout_purity"):
        diffs = [per[(best, s)][score] - per[(0, s)][score] for s in record["seeds"]]
        out[score] = {"best": config_means(record, score)[best], "recipe": config_means(record, score)[0]}
        out[score]["paired_diffs"] = diffs
    return out


def report(record: dict) -> str:
    means = config_means(record)
    sd = seed_sd(record)
    lines = [
        f"{record['data']}: {len(means)} configurations x {len(record['seeds'])} seeds {record['seeds']} "
        f"(configuration 0 is the recipe), N = {record['n_images']}",
        f"between-seed sd of one run (pooled): {sd:.3f}; of a {len(record['seeds'])}-seed mean: "
        f"{sd / math.sqrt(len(record['seeds'])):.3f}",
        f"configuration means: min {min(means.values()):.3f}, median {float(np.median(list(means.values()))):.3f}, "
        f"max {max(means.values()):.3f}; recipe {means.get(0, float('nan')):.3f}",
        "",
        "| setting | range | fANOVA share | upper minus lower half | ± se | Spearman | moves purity? |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in effects(record):
        spec = record["settings"][row["setting"]]
        rng = (
            "/".join(map(str, spec["choices"]))
            if spec["kind"] == "choice"
            else f"{spec['low']:.3g}–{spec['high']:.3g}{' (log)' if spec['kind'] in ('log', 'logint') else ''}"
        )
        diff, se = row["upper_minus_lower"], row["se"]
        moves = "yes" if abs(diff) > max(2 * se, sd) else "no"
        share = "" if row["fanova"] is None else f"{row['fanova']:.2f}"
        lines.append(
            f"| {row['setting']} | {rng} | {share} | {diff:+.3f} | {se:.3f} | {row['spearman']:+.2f} | {moves} |"
        )
    best = best_against_recipe(record)
    if best:
        configs = {c["config_id"]: c["config"] for c in record["configs"]}
        lines += ["", f"best sampled configuration ({best['best_id']}): {json.dumps(configs[best['best_id']])}"]
        for score, label in (("purity", "selection half"), ("heldout_purity", "held-out half")):
            b = best[score]
            diffs = ", ".join(f"{d:+.3f}" for d in b["paired_diffs"])
            lines.append(
                f"{label}: best {b['best']:.3f} against the recipe {b['recipe']:.3f}, paired by seed: {diffs} "
                f"(chosen as the best of {len(means) - 1} on these same seeds: an optimistic figure)"
            )
    return "\n".join(lines)


# --- the runs --------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="digits", help="digits, a folder of species folders, or a CSV")
    parser.add_argument("--configs", type=int, default=16, help="configurations sampled besides the recipe")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--settings", nargs="+", default=list(WIDE), help=f"which to sample (default: {list(WIDE)})")
    parser.add_argument("--jobs", type=int, default=2, help="runs side by side, one thread each")
    parser.add_argument("--sample-seed", type=int, default=0, help="the Sobol sequence's scrambling seed")
    parser.add_argument("--out", help="the JSON record (default: landscape_DATA.json here)")
    parser.add_argument("--workdir", help="run folders and the stage-1 store (default: a temporary folder)")
    parser.add_argument("--cache-dir", help="decode cache (default: laray's)")
    parser.add_argument("--report", metavar="JSON", help="print the tables of a recorded landscape and stop")
    parser.add_argument("--small", action="store_true", help="tiny runs: 2 configurations, 1 LA and 1 AE epoch")
    args = parser.parse_args(argv)
    if args.report:
        print(report(json.loads(Path(args.report).read_text())))
        return 0
    unknown = sorted(set(args.settings) - set(WIDE))
    if unknown:
        parser.error(f"--settings {unknown}: not sampled here; choose from {list(WIDE)}")

    from laray.data.dataset import describe, open_dataset
    from laray.settings.config import replace
    from laray.settings.defaults import fit_to_size

    ae, la = settings(args.data, None, [])
    if args.small:
        ae, la = replace(ae, epochs=1), replace(la, epochs=2)
        args.configs = min(args.configs, 2)
    n_images = len(open_dataset(describe(args.data, ae.image_size), args.cache_dir))
    la = fit_to_size(la, la, n_images)  # the recipe's k and C clipped to the data set, as laray train does
    names = sorted(args.settings)
    space = {k: v for k, v in ranges(names, n_images, ae, la).items() if len(v.get("choices", (0, 1))) > 1}
    if args.small:  # one LA epoch at most: ranges that keep the runs tiny
        space = {k: v for k, v in space.items() if k not in ("la.epochs", "autoencoder.epochs")}
        names = sorted(space)
    out = Path(args.out or f"landscape_{Path(args.data).name}.json")
    configs = [recipe_point(names, ae, la), *sample(space, args.configs, args.sample_seed)]
    record = {
        "data": args.data,
        "n_images": n_images,
        "seeds": args.seeds,
        "settings": space,
        "base": {"autoencoder": dataclasses.asdict(ae), "la": dataclasses.asdict(la)},
        "configs": [{"config_id": i, "config": c} for i, c in enumerate(configs)],
        "runs": [],
    }
    if out.exists():  # resume: keep the runs of the same configurations
        old = json.loads(out.read_text())
        if old["configs"] == record["configs"] and old["seeds"] == record["seeds"]:
            record["runs"] = old["runs"]
    done = {(r["config_id"], r["seed"]) for r in record["runs"]}
    workdir = args.workdir or tempfile.mkdtemp(prefix="landscape_")
    store = Path(workdir) / "store"
    jobs, keys = [], []
    for cid, config in enumerate(configs):
        ae_c, la_c = applied(ae, la, config)
        for seed in args.seeds:
            if (cid, seed) not in done:
                jobs.append((args.data, ae_c, la_c, seed, f"{workdir}/c{cid}", store, args.cache_dir))
                keys.append(cid)
    for size in sorted({j[1].image_size for j in jobs}):  # decode once per size, before the runs share it
        open_dataset(describe(args.data, size), args.cache_dir)
    print(f"{len(jobs)} runs to go ({len(done)} recorded) in {workdir}; recording to {out}", flush=True)
    began = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
        for cid, run in zip(keys, pool.imap(one_run, jobs)):
            record["runs"].append({"config_id": cid, **run, "heldout_purity": run["heldout"]})
            _save(out, record)
            print(
                f"  configuration {cid} seed {run['seed']}: purity {run['purity']:.3f} held-out {run['heldout']:.3f} "
                f"({run['seconds']:.0f} s; {time.perf_counter() - began:.0f} s so far)",
                flush=True,
            )
    print(report(record))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
