"""Can one reader thread feed the GPU? Images/s read from the uint8 cache against what a training step consumes.

Writes a synthetic decoded cache (an N x S x S x 3 uint8 .npy, memory-mapped as laray's cache is;
default 9,000 images at 224 px, 1.35 GB) and reads it in batches in a seeded random order (the
order training uses, laray.training.stages.epoch_batches):

  feed     one reader thread (laray.data.prefetch.BatchPrefetcher) and synchronous reads, the consumer
           only taking batches, from a warm cache (the file read once before: in the page cache)
           and a cold one (its pages evicted before the pass);
  overlap  a consumer that sleeps a fixed time per batch (a simulated GPU step), with and without
           the thread: the thread hides the read when the total is the steps' time, not the sum;
  need     the images/s that a vgg16_bn auto-encoder training step consumes on an H100 at 40 % of
           its dense bf16 peak: a projection from FLOPs counted with FlopCounterMode, not a measurement.

    python benchmarks/data_feed.py           # 9,000 images at 224 px, batch 128 (about a minute)
    python benchmarks/data_feed.py --quick   # 300 images at 64 px, batch 32 (seconds; what the tests run)
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from numpy.lib.format import open_memmap
from torch.utils.flop_counter import FlopCounterMode

from laray.data.dataset import ImageDataset
from laray.data.prefetch import BatchPrefetcher
from laray.method.models import AutoEncoderVGG
from laray.settings.config import AutoEncoderConfig, LAConfig
from laray.training.stages import epoch_batches

H100_BF16_PEAK = 989e12  # H100 SXM, dense (no sparsity), FLOP/s, from NVIDIA's data sheet


def write_cache(path: str, n: int, size: int) -> None:
    """Random pixels: a read costs the same whatever the content (the cache is not compressed)."""
    rng = np.random.default_rng(0)
    images = open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, size, size, 3))
    for start in range(0, n, 256):
        images[start : start + 256] = rng.integers(0, 256, images[start : start + 256].shape, dtype=np.uint8)
    images.flush()
    del images


def open_cache(path: str) -> ImageDataset:
    images = np.load(path, mmap_mode="r")
    return ImageDataset(images, np.full(len(images), -1), [], [""] * len(images))


def evict(path: str) -> str:
    """Drop the file's pages from the page cache ("cold"); returns what fincore says is left, if it is installed.

    Only clean pages that no process maps are dropped: fsync first, and call it with no mapping open.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    if not shutil.which("fincore"):
        return "fincore not installed"
    left = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--output", "RES", path], capture_output=True, text=True
    ).stdout.strip()
    return f"{left or '?'} bytes still cached per fincore"


def read_ahead(path: str) -> str:
    """The read-ahead of the block device holding `path`: how much a page fault on a cold file pulls in."""
    device = os.stat(path).st_dev
    block = f"/sys/dev/block/{os.major(device)}:{os.minor(device)}"
    for setting in (f"{block}/queue/read_ahead_kb", f"{block}/../queue/read_ahead_kb"):  # a disk, a partition
        if os.path.exists(setting):
            return f"{Path(setting).read_text().strip()} KB"
    return "unknown"


def one_pass(path: str, batches, device, depth: int, step_s: float = 0.0) -> tuple[float, float]:
    """(seconds for one pass over `batches`, seconds waited for the first batch); the consumer sleeps step_s a batch."""
    dataset = open_cache(path)  # a fresh mapping each pass, closed after it: a mapping keeps pages from eviction
    began = time.perf_counter()
    first = None
    with BatchPrefetcher(dataset, batches, device, depth) as feed:
        for _ in feed:
            first = time.perf_counter() - began if first is None else first
            time.sleep(step_s)
    return time.perf_counter() - began, first


def warm_up(path: str) -> None:
    with open(path, "rb") as handle:
        while handle.read(1 << 24):
            pass


def flops_per_image(count_size: int) -> tuple[float, str]:
    """(FLOPs of one vgg16_bn auto-encoder training step per image at count_size px, how they were counted).

    Counted on the CPU at batch 2 (batch norm trains on two) by benchmarks/train_throughput.py's stage_steps
    and measure (the step `laray.training.stages` runs); if that module does not import, the same way here.
    """
    cpu = torch.device("cpu")
    try:
        path = Path(__file__).with_name("train_throughput.py")
        spec = importlib.util.spec_from_file_location("train_throughput", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except Exception as error:  # noqa: BLE001 - any breakage there: count here
        model, x = AutoEncoderVGG("vgg16_bn", None, 1.0), torch.randn(2, 3, count_size, count_size)
        with FlopCounterMode(display=False) as counter:
            F.mse_loss(model(x), x).backward()  # forward + backward; the SGD step adds no counted FLOPs
        return counter.get_total_flops() / 2, f"FlopCounterMode here: train_throughput did not import ({error!r})"
    step = module.stage_steps(AutoEncoderConfig(image_size=count_size), LAConfig(), 2, 64, cpu)["autoencoder"]
    _, flops = module.measure(step, 1, cpu)
    return flops / 2, "train_throughput.measure with FlopCounterMode"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="300 images at 64 px, batch 32, FLOPs counted at 32 px")
    parser.add_argument("--n", type=int, default=9000, help="images in the synthetic cache")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--depth", type=int, default=3, help="batches the reader thread reads ahead")
    parser.add_argument("--step-ms", type=float, help="simulated GPU step per batch (default: the projected H100 step)")
    parser.add_argument("--mfu", type=float, default=0.4, help="fraction of the bf16 peak the projection assumes")
    parser.add_argument("--repeat", type=int, help="passes per figure, the median shown (default 3; quick 1)")
    parser.add_argument("--dir", help="where the cache file goes (a disk, not tmpfs, for 'cold' to mean anything)")
    args = parser.parse_args(argv)
    n, size, batch = (300, 64, 32) if args.quick else (args.n, args.image_size, args.batch_size)
    count_size = 32 if args.quick else size
    args.repeat = args.repeat or (1 if args.quick else 3)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # cuda: the thread pins each batch

    flops, counter = flops_per_image(count_size)
    flops *= (size / count_size) ** 2  # convolutions only: FLOPs scale with the pixels
    need = args.mfu * H100_BF16_PEAK / flops  # images/s
    step_s = args.step_ms / 1e3 if args.step_ms is not None else batch / need
    batches = epoch_batches(n, batch, seed=0, epoch=0)
    megabytes = size * size * 3 / 1e6  # per image

    rows, left = {}, set()
    with tempfile.TemporaryDirectory(prefix="laray-feed-", dir=args.dir) as tmp:
        path = os.path.join(tmp, "images.npy")
        write_cache(path, n, size)
        ahead = read_ahead(path)
        for cache, depth, step in itertools.product(("warm", "cold"), (0, args.depth), (0.0, step_s)):
            runs = []
            for _ in range(args.repeat):
                left.add(evict(path)) if cache == "cold" else warm_up(path)
                runs.append(one_pass(path, batches, device, depth, step))
            rows[cache, depth, step] = sorted(runs)[len(runs) // 2]  # the median pass

    print(
        f"cache: {n} images of {size} x {size} x 3 uint8 ({n * megabytes:,.0f} MB) in {tmp}; "
        f"{len(batches)} batches of {batch} in a seeded random order; torch {torch.__version__}, "
        f"{os.cpu_count()} CPUs; pinned memory: {'yes' if device.type == 'cuda' else 'no (no CUDA)'}; "
        f"median of {args.repeat} passes"
    )
    print(
        f'"cold": before each pass, fsync + os.posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED) evict the file\'s '
        f"pages from the page cache ({'; '.join(sorted(left))}; the disk's read-ahead: {ahead}); "
        f'"warm": the file read once before each pass'
    )

    images = sum(len(b) for b in batches)
    print(f"\n{'feed (the consumer only takes batches)':<46} {'cache':<5} {'seconds':>8} {'images/s':>9} {'MB/s':>7}")
    for cache in ("warm", "cold"):
        for depth, name in (
            (0, "synchronous reads, in the consumer's thread"),
            (args.depth, f"one reader thread (BatchPrefetcher, depth {args.depth})"),
        ):
            seconds = rows[cache, depth, 0.0][0]
            print(
                f"{name:<46} {cache:<5} {seconds:>8.3f} {images / seconds:>9.0f} {images * megabytes / seconds:>7.0f}"
            )
    print(
        f"{'need: vgg16_bn auto-encoder step on an H100':<46} {'':<5} {'':>8} {need:>9.0f} {need * megabytes:>7.0f}"
        f"   projected, see below"
    )

    print(
        f"\noverlap: the consumer sleeps {step_s * 1e3:.1f} ms per batch"
        f"{'' if args.step_ms is not None else ' (the projected H100 step)'}, {len(batches)} batches; "
        f"read hidden = (read + steps - thread) / read; first = the wait for the first batch, which nothing hides"
    )
    print(
        f"{'cache':<5} {'read s':>7} {'steps s':>8} {'sum s':>7} {'sync s':>7} {'thread s':>9} {'first s':>8} "
        f"{'read hidden':>12}"
    )
    for cache in ("warm", "cold"):
        read, steps = rows[cache, 0, 0.0][0], len(batches) * step_s
        sync, (thread, first) = rows[cache, 0, step_s][0], rows[cache, args.depth, step_s]
        print(
            f"{cache:<5} {read:>7.3f} {steps:>8.3f} {read + steps:>7.3f} {sync:>7.3f} {thread:>9.3f} {first:>8.3f} "
            f"{(read + steps - thread) / read:>12.0%}"
        )

    counted = f"counted at {count_size} px and scaled by pixels" if count_size != size else f"counted at {size} px"
    print(
        f"\nneed (a projection from counted FLOPs, not a measurement): vgg16_bn auto-encoder training step at "
        f"{size} px, {flops / 1e9:.1f} GFLOP per image ({counter}, {counted}); H100 SXM dense bf16 peak "
        f"{H100_BF16_PEAK / 1e12:.0f} TFLOP/s x {args.mfu:.0%} = {args.mfu * H100_BF16_PEAK / 1e12:.0f} TFLOP/s "
        f"-> {need:.0f} images/s ({batch / need * 1e3:.1f} ms per batch of {batch})"
    )
    feed = images / rows["warm", args.depth, 0.0][0]
    verdict = "exceeds" if feed > need else "does NOT reach"
    print(
        f"verdict: one reader thread from a warm cache delivers {feed:.0f} images/s, {feed / need:.1f}x the "
        f"{need:.0f} images/s the H100 step consumes: it {verdict} the consumption"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
