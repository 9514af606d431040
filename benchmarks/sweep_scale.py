"""How a one-trial sweep scales with the data set: object store, worker memory, start-up, evaluation, LA epoch.

For each size N it writes N synthetic PNGs in species folders (each species its own colour and
stripe pattern, plus per-image noise; reused under --workdir), then, in a fresh process with a
fresh local Ray (2 CPUs), opens the data once (the decode into the cache folder: "first open")
and runs a one-trial, one-LA-epoch sweep with the demo's model (vgg11_bn, width 0.25), stage 1
of 1 epoch, LA batch 256, k_neighbours 300 (clipped to N-1), 1 clustering repeat, N/100 centroids.
While the sweep runs, a thread reads the local raylet's object-store bytes every 0.2 s
(benchmarks/object_store.py: an upper bound on the store's peak). The trial's worker.json and
metrics.json give its peak resident memory, start-up, one evaluation and one LA epoch.

Above --stage1-task-max images, stage 1 is not trained: an untrained encoder and empty baselines
are put in the sweep's store first (it then reaches the trial through the object store as
usual), because stage 1's k-means baselines (20 restarts with K = species, on raw pixels too)
would take hours on 2 cores. A point that runs past --point-timeout is cut and shows what it had.

    python benchmarks/sweep_scale.py --workdir DIR    # 5,000 to 276,000 images at 32 px + 2,000 at 224 px
    python benchmarks/sweep_scale.py --workdir DIR --report   # the table of the points DIR holds, again
    python benchmarks/sweep_scale.py --quick          # 300 and 600 at 32 px, 200 at 64 px (about a minute)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from object_store import object_store_bytes  # noqa: E402

MB = 1e6
AE = {"arch": "vgg11_bn", "width": 0.25, "epochs": 1, "batch_size": 64, "lr": 0.05}


def _write_species(job) -> None:
    """The images of some species: a smooth colour/stripe pattern per species, noise per image."""
    from PIL import Image

    folder, species, n, n_species, size = job
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    for s in species:
        rng = np.random.default_rng(s)
        colour, amp, phase = rng.uniform(40, 215, 3), rng.uniform(20, 60, 3), rng.uniform(0, 6.3, 3)
        fx, fy = rng.uniform(-4, 4, 2)
        wave = np.sin(2 * np.pi * (fx * xx + fy * yy)[..., None] + phase)
        pattern = colour + amp * wave * (1 if s % 2 else np.sign(np.sin(6 * np.pi * xx))[..., None])
        (folder / f"sp{s:04d}").mkdir(exist_ok=True)
        for i in range(s, n, n_species):
            pixels = pattern + rng.normal(0, 12, pattern.shape)
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(
                folder / f"sp{s:04d}" / f"{i:06d}.png", compress_level=1
            )


def make_images(root: Path, n: int, n_species: int, size: int) -> tuple[Path, float]:
    """(folder of n PNGs of size px in n_species folders, seconds to write them; 0 when reused)."""
    folder = root / f"images_n{n}_s{n_species}_px{size}"
    if folder.exists():
        return folder, 0.0
    began, tmp = time.perf_counter(), folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    workers = os.cpu_count() or 1
    jobs = [(tmp, range(k, n_species, 8 * workers), n, n_species, size) for k in range(min(n_species, 8 * workers))]
    with Pool(workers) as pool:
        pool.map(_write_species, jobs)
    tmp.rename(folder)
    return folder, time.perf_counter() - began


def preset_stage1(experiment: Path, ref, space) -> None:
    """An untrained encoder and empty baselines in the sweep's store: the sweep loads it, trains nothing."""
    import torch

    from laray.method.models import AutoEncoderVGG
    from laray.training.run import baselines_path, write_json
    from laray.training.store import store_key

    key = store_key(ref.key, space.ae, 0)
    (experiment / "autoencoders" / key).mkdir(parents=True)
    model = AutoEncoderVGG(space.ae.arch, None, space.ae.width)
    torch.save({"model": model.state_dict(), "history": []}, experiment / "autoencoders" / key / "autoencoder.pt")
    write_json(
        baselines_path(experiment / "autoencoders", key, "mean", ref.labels_key), {"raw_pixels": {}, "autoencoder": {}}
    )


def run_point(args) -> None:
    """One point, in its own process: first open (decode), then a one-trial sweep on a fresh local Ray."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    import ray

    from laray.data.dataset import describe, open_dataset
    from laray.method.models import EncoderVGGMerged
    from laray.settings.space import parse_space
    from laray.sweep.driver import SweepRun, TrialResources, run_sweep

    n, size = (int(v) for v in args.point.split(":"))
    out, cache, storage = Path(args.out), Path(args.workdir) / "cache", Path(args.workdir) / "sweeps"
    row = {"n": n, "size": size, "species": min(args.species, n // 2)}
    save = lambda: out.write_text(json.dumps(row))  # noqa: E731  (read by the parent, even after a cut)
    ref = describe(args.folder, size)
    began = time.perf_counter()
    open_dataset(ref, cache, workers=os.cpu_count())  # dropped at once: the trial maps the cache on its own
    row["open_s"] = time.perf_counter() - began
    logged = [line.split() for line in (cache / "decodes.log").read_text().splitlines() if f" {ref.key} " in line]
    row["decode_s"] = float(logged[-1][-2]) if logged else None  # the decode of this key (an earlier run's if reused)
    row["cache_bytes"], row["decoded_bytes"] = (cache / f"{ref.key}.npy").stat().st_size, ref.decoded_bytes
    row["bank_bytes"] = n * EncoderVGGMerged(AE["arch"], None, AE["width"], "mean").code_dim(size) * 4
    row["codes_bytes"] = row["bank_bytes"]  # an evaluation's codes, mapped from the trial's codes.npy (N x d float32)
    space = parse_space(
        {
            "num_samples": 1,
            "max_concurrent": 1,
            "grace_period": 1,
            "holdout": 0,
            "confirm_top": 0,
            "fixed": {
                "autoencoder": {**AE, "image_size": size},
                "la": {"epochs": 1, "batch_size": 256, "lr": 0.01, "augment": True, "merger": "mean"},
            },
            "search": {
                "k_neighbours": {"categorical": [min(300, n - 1)]},
                "clustering_repeats": {"categorical": [1]},
                "n_centroids": {"categorical": [max(2, n // 100)]},
                "temperature": {"categorical": [0.07]},
                "mixing_rate": {"categorical": [0.5]},
            },
        }
    )
    name = f"n{n}_px{size}_{time.strftime('%H%M%S')}"
    row["stage1"] = "trained" if n <= args.stage1_task_max else "preset"
    if row["stage1"] == "preset":
        preset_stage1(storage / name, ref, space)
    save()
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        configure_logging=False,
        log_to_driver=False,
        object_store_memory=max(200 * 2**20, 2 * ref.decoded_bytes),
    )
    raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
    done, peak = threading.Event(), [0]

    def sample():
        ticks = 0
        while not done.wait(0.2):
            peak[0], ticks = max(peak[0], object_store_bytes().get(raylet, 0)), ticks + 1
            if ticks % 25 == 0:  # every 5 s, so that a cut point still shows its peak so far
                row["store_peak_bytes"] = peak[0]
                save()

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    began = time.time()
    result = run_sweep(
        ref,
        space,
        run=SweepRun(str(storage), name, seed=0, verbose=0),
        trial=TrialResources(cpus=2, device="cpu", cache_dir=str(cache)),
    )
    row["sweep_s"] = time.time() - began
    done.set()
    sampler.join()
    peak[0] = max(peak[0], object_store_bytes().get(raylet, 0))
    row["store_peak_bytes"], row["errored"] = peak[0], result.n_errored
    trial = next((storage / name).glob("*/worker.json")).parent
    row.update(json.loads((trial / "worker.json").read_text()))
    history = json.loads((trial / "metrics.json").read_text())["history"]
    la = [h for h in history if h["stage"] == "local_aggregation"][0]
    row["eval_s"], row["epoch_s"], row["la_img_s"] = la.get("eval_s"), la.get("epoch_s"), la.get("images_per_s")
    last = json.loads((trial / "result.json").read_text().splitlines()[-1])  # trial start = report - its run time
    row["stage1_s"] = last["timestamp"] - last["time_total_s"] - began  # sweep start to trial start
    save()
    ray.shutdown()


def fmt(value, scale=1.0, digits=1) -> str:
    return "n/a" if value is None else f"{value / scale:.{digits}f}"


COLUMNS = [
    "N",
    "px",
    "species",
    "decode s",
    "cache MB",
    "store peak MB",
    "store/data %",
    "worker RSS MB",
    "bank MB",
    "mapped MB",
    "start-up s",
    "stage-1 s",
    "eval s",
    "LA epoch s",
    "point s",
]


def rss_bytes(r: dict) -> float | None:
    return None if r.get("peak_rss_mb") is None else r["peak_rss_mb"] * 2**20  # the worker records MiB


def mapped_bytes(r: dict) -> int:
    """What the worker maps: the decoded cache, and the codes.npy an evaluation writes (older points: cache only)."""
    return r["cache_bytes"] + r.get("codes_bytes", 0)


def cells(r: dict) -> list[str]:
    ratio = None if r.get("store_peak_bytes") is None else 100 * r["store_peak_bytes"] / r["decoded_bytes"]
    return [
        str(r["n"]),
        str(r["size"]),
        str(r["species"]),
        fmt(r.get("decode_s")),
        fmt(r.get("cache_bytes"), MB),
        fmt(r.get("store_peak_bytes"), MB),
        fmt(ratio, digits=2),
        fmt(rss_bytes(r), MB, digits=0),
        fmt(r.get("bank_bytes"), MB),
        fmt(mapped_bytes(r) if "cache_bytes" in r else None, MB),
        fmt(r.get("startup_s")),
        fmt(r.get("stage1_s")) + ("" if r.get("stage1") != "preset" else "*"),
        fmt(r.get("eval_s")),
        fmt(r.get("epoch_s")),
        fmt(r.get("point_s"), digits=0) + (" CUT" if r.get("cut") else ""),
    ]


def verdicts(rows: list[dict], size: int) -> None:
    done = [r for r in rows if r.get("epoch_s") is not None and r["size"] == size]
    store = [r for r in rows if r.get("store_peak_bytes") and r["size"] == size]
    if len(store) >= 2:
        lo, hi = store[0], store[-1]
        per_added = (hi["store_peak_bytes"] - lo["store_peak_bytes"]) / (hi["n"] - lo["n"])
        per_image = hi["decoded_bytes"] / hi["n"]
        # Flat: what travels (the listing's digest, stage 1's weights) holds nothing per file.
        verdict = "flat in N" if per_added < 1 else "GROWS WITH N"
        print(
            f"object store: {verdict}: peak {hi['store_peak_bytes'] / MB:.1f} MB at N={hi['n']} "
            f"({hi['decoded_bytes'] / MB:.0f} MB decoded) vs {lo['store_peak_bytes'] / MB:.1f} MB at N={lo['n']} "
            f"({lo['decoded_bytes'] / MB:.1f} MB decoded): {per_added:.2f} bytes per added image against "
            f"{per_image:.0f} bytes per decoded image"
        )
    else:
        print("object store: n/a (fewer than two points measured)")
    if len(done) >= 2:
        lo, hi = done[0], done[-1]
        rss = (rss_bytes(hi) - rss_bytes(lo)) / MB
        data = (hi["bank_bytes"] + mapped_bytes(hi) - lo["bank_bytes"] - mapped_bytes(lo)) / MB
        verdict = "within" if rss <= data else "ABOVE"
        print(
            f"worker memory: {verdict} the target: peak RSS grew {rss:.0f} MB from N={lo['n']} to N={hi['n']}; "
            f"bank + mapped files (cache, codes) grew {data:.0f} MB ({rss / data:.2f} MB of RSS per MB of them)"
        )
        more = hi["eval_s"] > hi["epoch_s"]
        print(
            f"evaluation vs LA epoch at N={hi['n']}: one evaluation {hi['eval_s']:.1f} s, one LA epoch "
            f"{hi['epoch_s']:.1f} s: evaluation costs {'MORE' if more else 'less'} than an epoch "
            f"({hi['eval_s'] / hi['epoch_s']:.2f}x){': an eval_every setting is needed' if more else ''}"
        )
    else:
        print("worker memory / evaluation vs LA epoch: n/a (fewer than two complete points)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="300 and 600 images at 32 px, 200 at 64 px, 20 species")
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 20000, 50000, 276000])
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--species", type=int, default=1604, help="capped so every species has >= 2 images")
    parser.add_argument("--big-point", default="2000:224", help="one more point N:size ('' for none)")
    parser.add_argument(
        "--stage1-task-max",
        type=int,
        default=5000,
        help="largest N whose stage 1 is trained (a Ray task); above it, preset (see the docstring)",
    )
    parser.add_argument(
        "--point-timeout",
        type=float,
        default=4500,
        help="seconds before a point is cut (276,000 images took 1,808 s on 2 cores)",
    )
    parser.add_argument("--workdir", help="images, cache and sweeps here, reused across runs (default: temporary)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary workdir")
    parser.add_argument("--report", action="store_true", help="only print the table of the points in --workdir")
    parser.add_argument("--point", help=argparse.SUPPRESS)  # internal: N:size, run in a child process
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.point:
        run_point(args)
        return 0
    if args.quick:
        args.sizes, args.image_size, args.species, args.big_point = [300, 600], 32, 20, "200:64"
    points = [(n, args.image_size) for n in args.sizes]  # the big point first: the largest N may be cut
    points = ([tuple(int(v) for v in args.big_point.split(":"))] if args.big_point else []) + points
    work = Path(args.workdir or tempfile.mkdtemp(prefix="laray-scale-")).resolve()
    rows = []
    try:
        for n, size in [] if args.report else points:
            species = min(args.species, n // 2)
            folder, gen_s = make_images(work / "images", n, species, size)
            print(
                f"N={n} at {size} px, {species} species: images {'written in %.1f s' % gen_s if gen_s else 'reused'}",
                flush=True,
            )
            out = work / f"point_{n}_{size}.json"
            out.unlink(missing_ok=True)
            command = [
                sys.executable,
                __file__,
                "--point",
                f"{n}:{size}",
                "--folder",
                str(folder),
                "--out",
                str(out),
                "--workdir",
                str(work),
                "--species",
                str(args.species),
                "--stage1-task-max",
                str(args.stage1_task_max),
            ]
            began, cut = time.perf_counter(), False
            child = subprocess.Popen(command, start_new_session=True)
            try:
                child.wait(timeout=args.point_timeout)
            except subprocess.TimeoutExpired:
                for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
                    try:  # the child's own session: its driver, the Ray it started, the trial's worker
                        if os.getsid(pid) == child.pid:
                            os.kill(pid, 9)
                    except OSError:
                        pass
                child.wait()
                cut = True
            row = (
                json.loads(out.read_text())
                if out.exists()
                else {"n": n, "size": size, "species": species, "decoded_bytes": n * size * size * 3}
            )
            trial = max(work.glob(f"sweeps/n{n}_px{size}_*/*/worker.json"), key=os.path.getmtime, default=None)
            if cut and trial is not None:  # written at the trial's start: its peak RSS by then
                row.update({k: v for k, v in json.loads(trial.read_text()).items() if k == "peak_rss_mb"})
            row.update(point_s=time.perf_counter() - began, cut=cut, failed=child.returncode != 0 and not cut)
            rows.append(row)
            out.write_text(json.dumps(row))  # --report reads it back
            print(
                f"N={n} at {size} px: {'CUT after' if cut else 'done in'} {row['point_s']:.0f} s"
                f"{' (FAILED: exit %d)' % child.returncode if row['failed'] else ''}",
                flush=True,
            )
    finally:
        if not (args.workdir or args.keep):
            shutil.rmtree(work, ignore_errors=True)
    if args.report:
        rows = [
            json.loads((work / f"point_{n}_{size}.json").read_text())
            for n, size in points
            if (work / f"point_{n}_{size}.json").exists()
        ]
    rows = [r for r in rows if r["size"] == args.image_size] + [r for r in rows if r["size"] != args.image_size]
    table = [COLUMNS] + [cells(r) for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    print()
    for line in table:
        print("  ".join(c.rjust(w) for c, w in zip(line, widths)))
    print(
        "store/data %: the object store's peak over the decoded images' size; * stage 1 preset, not trained;"
        " CUT: stopped at --point-timeout"
    )
    verdicts(rows, args.image_size)
    return 1 if any(r.get("failed") for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
