"""One training recipe over several seeds: LA's purity beside k-means on raw pixels and on the auto-encoder's codes.

Each seed is one `laray train` run (both stages seeded) on one thread; --jobs runs run side by side,
as a sweep's trials do. The row it prints is what docs/photos.md's recipe table holds:

    python benchmarks/photo_recipe.py --data PHOTOS --seeds 0 1 2 --set la.jitter=0.2 --label "jitter 0.2"

Settings: the data's defaults for this machine (laray.settings.defaults), then --config, then each --set
SECTION.FIELD=VALUE. Scores are on the selection half of a 0.5 held-out split; "held-out" the other half.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import tempfile
import time
from pathlib import Path

import yaml


def _parse_set(text: str) -> tuple[str, str, object]:
    key, _, value = text.partition("=")
    section, _, field = key.partition(".")
    if section not in ("autoencoder", "la") or not field or not value:
        raise argparse.ArgumentTypeError(f"--set {text!r}: expected autoencoder.FIELD=VALUE or la.FIELD=VALUE")
    return section, field, yaml.safe_load(value)


def settings(data: str, config: str | None, sets: list) -> tuple:
    from laray.settings.config import load_config, replace
    from laray.settings.defaults import choose, train_configs
    from laray.settings.space import load_space

    ae, la = train_configs(load_space(choose(data, cuda=False).space))
    if config:
        ae, la = load_config(config, base=(ae, la))
    for section, field, value in sets:
        if section == "autoencoder":
            ae = replace(ae, **{field: value})
        else:
            la = replace(la, **{field: value})
    return ae, replace(la, holdout=0.5, holdout_seed=0)


def one_run(job: tuple) -> dict:
    data, ae, la, seed, workdir, store, cache_dir = job
    import torch

    torch.set_num_threads(1)  # one core per run, as one sweep trial gets
    from laray.data.dataset import describe, open_dataset
    from laray.training.run import train_run
    from laray.training.stages import RunOptions

    dataset = open_dataset(describe(data, ae.image_size), cache_dir)
    began = time.perf_counter()
    metrics = train_run(
        dataset,
        Path(workdir) / f"seed{seed}",
        ae,
        la,
        store_dir=store,
        run=RunOptions(seed=seed, device="cpu", progress=False),
    )
    base = metrics["baselines"]
    return {
        "seed": seed,
        "purity": metrics["purity"],
        "heldout": metrics["heldout_purity"],
        "raw": base["raw_pixels"]["purity"],
        "ae": base["autoencoder"]["purity"],
        "seconds": time.perf_counter() - began,
    }


def _mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="a folder of species folders, or a CSV (as laray train)")
    parser.add_argument("--config", help="YAML with autoencoder:/la: sections, on top of the data's defaults")
    parser.add_argument(
        "--set",
        dest="sets",
        type=_parse_set,
        action="append",
        default=[],
        metavar="S.F=V",
        help="one setting, e.g. la.epochs=20 or autoencoder.image_size=48 (repeatable)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2, help="runs side by side, one thread each")
    parser.add_argument("--label", default="", help="the row's name in the table")
    parser.add_argument("--workdir", help="run folders and the stage-1 store (default: a temporary folder)")
    parser.add_argument(
        "--store", help="trained auto-encoders, shared between recipes with the same stage 1 (default: WORKDIR/store)"
    )
    parser.add_argument("--cache-dir", help="decode cache (default: laray's)")
    args = parser.parse_args(argv)

    ae, la = settings(args.data, args.config, args.sets)
    workdir = args.workdir or tempfile.mkdtemp(prefix="photo_recipe_")
    from laray.data.dataset import describe, open_dataset

    open_dataset(describe(args.data, ae.image_size), args.cache_dir)  # decode once, before the runs share it
    store = args.store or Path(workdir) / "store"
    jobs = [(args.data, ae, la, seed, workdir, store, args.cache_dir) for seed in args.seeds]
    began = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
        runs = []
        for run in pool.imap_unordered(one_run, jobs):
            runs.append(run)
            print(
                f"  seed {run['seed']}: purity {run['purity']:.3f} held-out {run['heldout']:.3f}  raw pixels "
                f"{run['raw']:.3f}  auto-encoder {run['ae']:.3f}  {run['seconds']:.0f} s",
                flush=True,
            )
    column = {key: [r[key] for r in runs] for key in runs[0]}
    margin = [p - r for p, r in zip(column["purity"], column["raw"])]
    print(
        f"| {args.label or ' '.join(' '.join(map(str, s)) for s in args.sets) or 'defaults'} "
        f"| {_mean_sd(column['purity'])} | {_mean_sd(column['heldout'])} | {_mean_sd(column['raw'])} "
        f"| {_mean_sd(column['ae'])} | {_mean_sd(margin)} | {statistics.mean(column['seconds']):.0f} |"
    )
    print(f"({len(runs)} seeds, {time.perf_counter() - began:.0f} s wall, {args.jobs} side by side, in {workdir})")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
