"""Decode-once cache: first-pass decoding against an epoch read from the cache.

Generates a folder of photo-like JPEGs (default 2,000 of 500 x 375 px in 10 species
folders), loads it with an empty cache (decoding on all cores), loads it again (a
cache hit), and reads one full epoch from the cache in two ways: item by item
through a DataLoader (float, normalised: what `dataset[i]` gives) and in uint8
batches (`dataset.uint8_batch`, normalised per batch: the training loop's path).

    python benchmarks/data_cache.py            # 2,000 images at 224 px
    python benchmarks/data_cache.py --quick    # 100 small images, seconds (what the tests run)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from laray.data.dataset import load_dataset, normalize


def make_jpegs(root: str, n: int, width: int, height: int, n_species: int = 10) -> None:
    """Smooth colour gradients with mild noise: compress and decode like photos, unlike pure noise."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    patterns = []
    for a, b, c in rng.uniform(0.5, 3.0, (16, 3)):
        base = np.stack(
            [np.sin(xx / width * a * 6), np.cos(yy / height * b * 6), np.sin((xx + yy) / width * c * 4)], -1
        )
        patterns.append(base * 100 + 128)
    for i in range(n):
        folder = os.path.join(root, f"species_{i % n_species:02d}")
        os.makedirs(folder, exist_ok=True)
        noise = rng.integers(-12, 13, (height, width, 3), dtype=np.int16)
        pixels = np.roll(patterns[i % len(patterns)], i, axis=1) + noise
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(os.path.join(folder, f"img_{i:05d}.jpg"), quality=90)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="100 images of 160 x 120 at 64 px (seconds)")
    parser.add_argument("--n", type=int, default=2000, help="number of JPEGs")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="decoding processes")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    n, (w, h), size = (100, (160, 120), 64) if args.quick else (args.n, (500, 375), args.image_size)

    with tempfile.TemporaryDirectory(prefix="laray-bench-") as tmp:
        images_dir, cache_dir = os.path.join(tmp, "images"), os.path.join(tmp, "cache")
        _, gen_s = timed(lambda: make_jpegs(images_dir, n, w, h))
        print(
            f"{n} JPEGs of {w} x {h} px generated in {gen_s:.1f} s; {args.workers} decoding processes, "
            f"torch {torch.__version__} with {torch.get_num_threads()} threads"
        )
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a skipped file would make the figures meaningless
            dataset, decode_s = timed(lambda: load_dataset(images_dir, size, cache_dir=cache_dir, workers=args.workers))
            _, hit_s = timed(lambda: load_dataset(images_dir, size, cache_dir=cache_dir))
        assert len(dataset) == n, f"expected {n} images, loaded {len(dataset)}"

        loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=0)

        def epoch(read_batch):
            """One pass over a random order; batches are dropped as a training loop would drop them."""
            order = torch.randperm(len(dataset)).numpy()
            for i in range(0, len(dataset), args.batch_size):
                read_batch(order[i : i + args.batch_size])

        def items_epoch():
            for _ in loader:
                pass

        # uint8_batch copies every pixel of the batch out of the memory map: that copy is the read.
        _, uint8_s = timed(lambda: epoch(dataset.uint8_batch))
        _, normalised_s = timed(lambda: epoch(lambda b: normalize(dataset.uint8_batch(b))))
        _, items_s = timed(items_epoch)

    print(f"first pass, decode + resize to {size} px + cache:  {decode_s:7.2f} s  {n / decode_s:8.0f} images/s")
    print(f"second load (cache hit, memory-mapped):         {hit_s:7.2f} s")
    for name, seconds in [
        ("uint8 batches (normalised on the device)", uint8_s),
        ("uint8 batches + float normalise on CPU", normalised_s),
        ("float items via DataLoader (dataset[i])", items_s),
    ]:
        print(
            f"epoch from cache, {name:<41} {seconds:7.2f} s  {n / seconds:8.0f} images/s"
            f"  {decode_s / seconds:6.1f}x faster than decoding"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
