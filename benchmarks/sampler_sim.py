"""Which Optuna sampler for a sweep of a few trials: simulated searches over a recorded landscape, nothing trained.

Replays a landscape recorded by benchmarks/landscape.py: a Gaussian process fitted on its per-configuration mean
purity stands for the true mean purity as a function of the settings (its leave-one-out error is printed, to
say how far to trust it), and each simulated trial observes that plus Gaussian seed noise with the landscape's
pooled between-seed sd (a trial is one run, one seed). A simulated search is an Optuna study over the
landscape's ranges, num_samples trials asked `--concurrency` at a time before any is told (the real sweep runs
2 side by side), with and without the recipe enqueued as its first trial. Its outcome is the true (surrogate)
value of the configuration it would pick, the best observed, and that value's margin over the recipe's:

    python benchmarks/sampler_sim.py /work/runs/landscape_digits.json --num-samples 6 12 20 40 --repeats 100
    python benchmarks/sampler_sim.py LANDSCAPE.json --search la.temperature la.mixing_rate   # the rest at the recipe
    python benchmarks/sampler_sim.py LANDSCAPE.json --small                                   # a few repeats (tests)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from landscape import config_means, seed_sd  # noqa: E402  (the benchmarks folder is not a package)

WIN = 0.03  # a margin over the recipe worth a sweep


def scaled(n: int) -> int:
    """Random start-up trials before the model takes over, scaled to the budget."""
    return max(2, n // 3)


def _tpe(share: int, multivariate: bool):
    """TPE with max(2, n // share) random start-up trials; multivariate and constant liar together or neither."""
    flags = f"multivariate={multivariate}, constant_liar={multivariate}"
    return (
        f"TPESampler(n_startup_trials=max(2, n // {share}), {flags})",
        lambda seed, n: _samplers().TPESampler(
            seed=seed, n_startup_trials=max(2, n // share), multivariate=multivariate, constant_liar=multivariate
        ),
    )


# name: (description, factory(seed, num_samples)); imports inside, so that --help does not load torch
SAMPLERS = {
    "random": ("RandomSampler", lambda seed, n: _samplers().RandomSampler(seed=seed)),
    "qmc": (
        "QMCSampler (scrambled Sobol)",
        lambda seed, n: _samplers().QMCSampler(scramble=True, seed=seed, warn_independent_sampling=False),
    ),
    "tpe": (
        "TPESampler() defaults: 10 start-up (Optuna 5: multivariate, constant liar)",
        lambda seed, n: _samplers().TPESampler(seed=seed),
    ),
    "tpe-scaled": _tpe(3, multivariate=True),
    "tpe-half": _tpe(2, multivariate=True),
    "tpe-scaled-indep": _tpe(3, multivariate=False),
    "gp-scaled": (
        "GPSampler(n_startup_trials=max(2, n // 3)) (no constant liar: concurrent asks may coincide)",
        lambda seed, n: _samplers().GPSampler(seed=seed, n_startup_trials=scaled(n), warn_independent_sampling=False),
    ),
}


def _samplers():
    import optuna

    return optuna.samplers


def distributions(settings: dict) -> dict:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out = {}
    for name, spec in settings.items():
        if spec["kind"] == "choice":
            out[name] = CategoricalDistribution(spec["choices"])
        elif spec["kind"] in ("int", "logint"):
            out[name] = IntDistribution(spec["low"], spec["high"], log=spec["kind"] == "logint")
        else:
            out[name] = FloatDistribution(spec["low"], spec["high"], log=spec["kind"] == "log")
    return out


def encode(settings: dict, configs: list[dict]) -> np.ndarray:
    """Configurations as rows in the unit cube: log scale where the kind is log, one column per choice."""
    columns = []
    for name, spec in sorted(settings.items()):
        values = [c[name] for c in configs]
        if spec["kind"] == "choice":
            columns += [[float(v == choice) for v in values] for choice in spec["choices"]]
        elif spec["kind"] in ("log", "logint"):
            lo, hi = math.log(spec["low"]), math.log(spec["high"])
            columns.append([(math.log(v) - lo) / (hi - lo) for v in values])
        else:
            columns.append([(v - spec["low"]) / (spec["high"] - spec["low"]) for v in values])
    return np.array(columns, dtype=float).T


def fit(x: np.ndarray, y: np.ndarray, ard: bool):
    """A Gaussian process on the unit cube: one length scale for all settings, or one each (ARD)."""
    from sklearn.gaussian_process import GaussianProcessRegressor
    from sklearn.gaussian_process.kernels import ConstantKernel, Matern, WhiteKernel

    scale = np.ones(x.shape[1]) if ard else 1.0
    kernel = ConstantKernel(1.0, (1e-2, 1e2)) * Matern(scale, (0.2, 50.0), nu=2.5) + WhiteKernel(0.1, (1e-4, 0.5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bounds reached on a landscape of a dozen points: expected
        return GaussianProcessRegressor(kernel, normalize_y=True, n_restarts_optimizer=3, random_state=0).fit(x, y)


def loo(x: np.ndarray, y: np.ndarray, ard: bool) -> dict:
    """Leave-one-out: the surrogate refitted without each configuration, against predicting the others' mean."""
    from scipy.stats import spearmanr

    pred = [float(fit(np.delete(x, i, 0), np.delete(y, i), ard).predict(x[i : i + 1])[0]) for i in range(len(y))]
    pred, mean = np.array(pred), np.array([np.delete(y, i).mean() for i in range(len(y))])
    return {
        "rmse": float(np.sqrt(np.mean((pred - y) ** 2))),
        "mae": float(np.mean(np.abs(pred - y))),
        "rmse_mean": float(np.sqrt(np.mean((mean - y) ** 2))),
        "spearman": float(spearmanr(pred, y).statistic),
    }


def search(factory, dists, recipe, surrogate, noise, n, concurrency, enqueue, seed) -> float:
    """One simulated search: the true value of the configuration it picks (the best observed)."""
    import optuna

    rng = np.random.default_rng(1_000_003 + seed)
    study = optuna.create_study(direction="maximize", sampler=factory(seed, n))
    if enqueue:
        study.enqueue_trial({k: recipe[k] for k in dists})
    best_seen, best_true = -math.inf, math.nan
    while len(study.trials) < n:
        trials = [study.ask(dists) for _ in range(min(concurrency, n - len(study.trials)))]
        true = surrogate([{**recipe, **t.params} for t in trials])
        for trial, value, seen in zip(trials, true, true + rng.normal(0.0, noise, len(trials))):
            study.tell(trial, float(seen))
            if seen > best_seen:
                best_seen, best_true = seen, float(value)
    return best_true


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("landscape", help="a JSON record of benchmarks/landscape.py")
    parser.add_argument("--num-samples", type=int, nargs="+", default=[6, 12, 20])
    parser.add_argument("--repeats", type=int, default=100, help="simulated searches per cell")
    parser.add_argument("--gp-repeats", type=int, help="for gp-* samplers, slower (default: min(repeats, 20))")
    parser.add_argument("--concurrency", type=int, default=2, help="trials asked before any is told")
    parser.add_argument("--samplers", nargs="+", choices=list(SAMPLERS), default=list(SAMPLERS))
    parser.add_argument("--search", nargs="+", help="settings searched (default all); the others at the recipe")
    parser.add_argument("--score", default="purity", help="the runs' score (purity or heldout_purity)")
    parser.add_argument("--small", action="store_true", help="3 repeats, num_samples 4 and 6 (tests)")
    args = parser.parse_args(argv)
    if args.small:
        args.repeats, args.num_samples = 3, [4, 6]
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):  # one BLAS thread: light beside the measurements sharing the CPU, and faster here
        return simulate(args, parser)


def simulate(args, parser) -> int:
    gp_repeats = args.gp_repeats or min(args.repeats, 20)
    began = time.perf_counter()

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message=".*independent.*")  # categorical settings sampled apart by GP/QMC

    if any(name.startswith("gp") for name in args.samplers):
        import torch

        torch.set_num_threads(1)  # a light load beside the measurements that share this CPU; GP fits are small
    record = json.loads(Path(args.landscape).read_text())
    settings = record["settings"]
    means = config_means(record, args.score)
    configs = {c["config_id"]: c["config"] for c in record["configs"]}
    ids = sorted(means)
    if 0 not in means or len(ids) < 4:
        parser.error(f"{args.landscape}: {len(ids)} configurations with all seeds, the recipe (0) among them? need 4")
    noise = seed_sd(record, args.score)
    x, y = encode(settings, [configs[i] for i in ids]), np.array([means[i] for i in ids])
    errors = {ard: loo(x, y, ard) for ard in (False, True)}
    ard = errors[True]["rmse"] < errors[False]["rmse"]  # the kernel that predicts left-out configurations better
    model = fit(x, y, ard)

    def surrogate(batch: list[dict]) -> np.ndarray:
        return model.predict(encode(settings, batch))

    recipe = configs[0]
    searched = args.search or sorted(settings)
    if set(searched) - set(settings):
        parser.error(f"--search {sorted(set(searched) - set(settings))}: not in the landscape's {sorted(settings)}")
    dists = distributions({k: settings[k] for k in searched})
    true_recipe = float(surrogate([recipe])[0])
    rng = np.random.default_rng(0)
    cloud = [{**recipe, **{k: d.to_external_repr(_draw(d, rng)) for k, d in dists.items()}} for _ in range(20000)]
    ceiling = float(surrogate(cloud).max())
    runs_done = len(record["runs"])
    print(
        f"landscape {args.landscape}: {record.get('data')}, {len(ids)} configurations with all of seeds "
        f"{record['seeds']} ({runs_done} runs); score {args.score}"
    )
    print(
        f"seed noise (pooled between-seed sd of one run): {noise:.4f}; configuration means "
        f"{y.min():.3f}–{y.max():.3f}, recipe {means[0]:.3f}"
    )
    print(f"surrogate: Gaussian process, the kernel with the lower leave-one-out RMSE: {model.kernel_}")
    floor = noise / math.sqrt(len(record["seeds"]))
    for kind, err in errors.items():
        print(
            f"leave-one-out, {'ARD' if kind else 'isotropic'}{' (used)' if kind == ard else ''}: "
            f"RMSE {err['rmse']:.4f}, "
            f"MAE {err['mae']:.4f}, Spearman {err['spearman']:+.2f}; predicting the others' mean: RMSE "
            f"{err['rmse_mean']:.4f}; a {len(record['seeds'])}-seed mean's own noise: {floor:.4f}"
        )
    if ard:  # a setting's shortest length scale over its columns: short (near 0.2) moves purity, 50 is flat
        scales = iter(np.atleast_1d(model.kernel_.k1.k2.length_scale))
        widths = {k: min(next(scales) for _ in spec.get("choices", [0])) for k, spec in sorted(settings.items())}
        print("ARD length scales: " + ", ".join(f"{k} {v:.2g}" for k, v in sorted(widths.items(), key=lambda i: i[1])))
    best_sampled = float(model.predict(x).max())
    print(
        f"surrogate values: recipe {true_recipe:.4f}; best landscape configuration {best_sampled:.4f}; "
        f"best of 20000 random points of the searched space {ceiling:.4f} (+{ceiling - true_recipe:.4f})"
    )
    print(f"searched: {', '.join(searched)}; concurrency {args.concurrency}; a 'win' beats the recipe by >= {WIN}")
    print()
    print(
        "| sampler | recipe first | num_samples | searches | true value of pick | margin over recipe | ± se "
        "| share >= +0.03 | share <= -0.03 | s / search |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name in args.samplers:
        factory = SAMPLERS[name][1]
        repeats = gp_repeats if name.startswith("gp") else args.repeats
        for n in args.num_samples:
            for enqueue in (False, True):
                start = time.perf_counter()
                picks = np.array(
                    [
                        search(factory, dists, recipe, surrogate, noise, n, args.concurrency, enqueue, seed)
                        for seed in range(repeats)
                    ]
                )
                margin = picks - true_recipe
                se = margin.std(ddof=1) / math.sqrt(repeats) if repeats > 1 else math.nan
                print(
                    f"| {name} | {'yes' if enqueue else 'no'} | {n} | {repeats} | {picks.mean():.4f} "
                    f"| {margin.mean():+.4f} | {se:.4f} | {np.mean(margin >= WIN):.2f} | {np.mean(margin <= -WIN):.2f} "
                    f"| {(time.perf_counter() - start) / repeats:.2f} |",
                    flush=True,
                )
    print()
    for name in args.samplers:
        print(f"{name}: {SAMPLERS[name][0]}")
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"load average (1, 5, 15 min): {load}; wall time {time.perf_counter() - began:.0f} s")
    return 0


def _draw(dist, rng):
    """A uniform draw from an Optuna distribution (log-uniform where log), in its internal representation."""
    from optuna.distributions import CategoricalDistribution, IntDistribution

    if isinstance(dist, CategoricalDistribution):
        return float(rng.integers(len(dist.choices)))
    lo, hi = (math.log(dist.low), math.log(dist.high)) if dist.log else (dist.low, dist.high)
    value = math.exp(rng.uniform(lo, hi)) if dist.log else rng.uniform(lo, hi)
    return float(min(max(round(value), dist.low), dist.high)) if isinstance(dist, IntDistribution) else float(value)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
