"""laray.data.prefetch: same batches as synchronous reads, errors surface, no thread left behind.

Plus the training loops with it against the synchronous path, and benchmarks/data_feed.py --quick.
"""

import contextlib
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from numpy.lib.format import open_memmap

import laray.training.stages as train_mod
from laray.data.dataset import ImageDataset, load_dataset, model_batch
from laray.data.prefetch import BatchPrefetcher
from laray.settings.config import AutoEncoderConfig, LAConfig
from laray.training.stages import RunOptions, epoch_batches

ROOT = Path(__file__).resolve().parents[2]


def images_dataset(images: np.ndarray) -> ImageDataset:
    return ImageDataset(images, np.full(len(images), -1), [], [""] * len(images))


@pytest.fixture(scope="module")
def memmapped(tmp_path_factory):
    """200 random 16 px images in a memory-mapped .npy, as laray's cache holds them."""
    path = tmp_path_factory.mktemp("cache") / "images.npy"
    images = open_memmap(path, mode="w+", dtype=np.uint8, shape=(200, 16, 16, 3))
    images[:] = np.random.default_rng(0).integers(0, 256, images.shape, dtype=np.uint8)
    images.flush()
    return images_dataset(np.load(path, mmap_mode="r"))


class Jittery:
    """A dataset whose reads take random short times (to shake the timing), failing at read number `fail_at`."""

    def __init__(self, dataset, fail_at=None, delay=0.002):
        self.dataset, self.fail_at, self.delay, self.reads = dataset, fail_at, delay, 0
        self.rng = np.random.default_rng(1)

    def uint8_batch(self, indices):
        self.reads += 1
        if self.reads == self.fail_at:
            raise OSError(f"cannot read batch {self.reads}")
        time.sleep(self.rng.uniform(0, self.delay))
        return self.dataset.uint8_batch(indices)


def within(seconds, fn):
    """fn() in a helper thread, so that a hang fails the test instead of blocking the suite; re-raises its error."""
    outcome = {}

    def run():
        try:
            outcome["value"] = fn()
        except BaseException as error:
            outcome["error"] = error

    helper = threading.Thread(target=run, daemon=True)
    helper.start()
    helper.join(seconds)
    assert not helper.is_alive(), f"still running after {seconds} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def reader_threads():
    return [t for t in threading.enumerate() if t.name == "laray-prefetch"]


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_batches_equal_synchronous_reads_in_order(memmapped, depth):
    batches = epoch_batches(len(memmapped), 16, seed=4, epoch=2)  # numpy index arrays, the last one short
    with BatchPrefetcher(Jittery(memmapped), batches, "cpu", depth) as feed:
        got = list(feed)
    assert len(got) == len(batches) == len(feed)
    for (indices, images), expected in zip(got, batches):
        assert indices is expected  # the very arrays, in order
        assert images.dtype == torch.uint8 and images.shape == (len(expected), 3, 16, 16)
        assert torch.equal(images, memmapped.uint8_batch(expected))
    assert not reader_threads()


def test_reader_exception_reaches_the_consumer(memmapped):
    batches = np.array_split(np.arange(len(memmapped)), 10)
    received = []

    def consume():
        with BatchPrefetcher(Jittery(memmapped, fail_at=4), batches, "cpu", depth=2) as feed:
            for indices, _ in feed:
                received.append(indices)

    with pytest.raises(OSError, match="cannot read batch 4"):
        within(10, consume)
    assert [len(r) for r in received] == [20, 20, 20]  # the batches read before the failure, then the error
    assert not reader_threads()


@pytest.mark.parametrize("stop", [None, ValueError, KeyboardInterrupt])
def test_leaving_early_stops_the_thread(memmapped, stop):
    """The reader is blocked on a full queue (a slow consumer) when the consumer breaks off or raises."""
    batches = np.array_split(np.arange(len(memmapped)), 50)
    feed = BatchPrefetcher(memmapped, batches, "cpu", depth=2)

    def consume():
        with feed:
            for _ in feed:
                time.sleep(0.1)  # the reader fills the queue meanwhile and waits for room
                if stop:
                    raise stop("consumer stopped")
                break

    with pytest.raises(stop) if stop else contextlib.nullcontext():
        within(5, consume)
    assert not feed._thread.is_alive() and not reader_threads()


def test_close_without_iterating_and_twice(memmapped):
    feed = BatchPrefetcher(memmapped, np.array_split(np.arange(len(memmapped)), 50), "cpu", depth=1)
    time.sleep(0.05)  # the queue is full, the reader waits
    within(5, feed.close)
    within(5, feed.close)
    assert not feed._thread.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        next(iter(feed))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_are_pinned_and_equal(memmapped):
    batches = np.array_split(np.arange(len(memmapped)), 4)
    with BatchPrefetcher(memmapped, batches, "cuda") as feed:
        for indices, images in feed:
            assert images.is_pinned()
            x = model_batch(images, torch.device("cuda"), channels_last=True)
            expected = model_batch(memmapped.uint8_batch(indices), torch.device("cpu"), channels_last=True)
            assert torch.equal(x.cpu(), expected)


@pytest.mark.usefixtures("one_torch_thread")
def test_training_with_the_reader_equals_synchronous_reads(monkeypatch):
    digits = load_dataset("digits", 32)
    tiny = ImageDataset(
        np.ascontiguousarray(digits.images[:40]), digits.labels[:40], digits.class_names, digits.paths[:40]
    )
    ae = AutoEncoderConfig(arch="vgg11_bn", width=0.125, image_size=32, epochs=1, batch_size=16)
    la = LAConfig(epochs=1, batch_size=16, k_neighbours=5, n_centroids=4, clustering_repeats=1, augment=True)
    runs = []
    for depth in (0, 3):
        monkeypatch.setattr(train_mod, "PREFETCH_DEPTH", depth)
        model, history = train_mod.pretrain_autoencoder(tiny, ae, run=RunOptions(seed=2, device="cpu", progress=False))
        encoder = {k[len("encoder.") :]: v for k, v in model.state_dict().items() if k.startswith("encoder.")}
        result = train_mod.finetune_la(tiny, encoder, ae, la, run=RunOptions(seed=2, device="cpu", progress=False))
        runs.append((model.state_dict(), result.encoder.state_dict(), result.codes, history + result.history))
    (ae0, la0, codes0, history0), (ae1, la1, codes1, history1) = runs
    assert all(torch.equal(ae0[k], ae1[k]) for k in ae0) and all(torch.equal(la0[k], la1[k]) for k in la0)
    assert torch.equal(codes0, codes1)
    timings = ("images_per_s", "epoch_s", "eval_s")
    for a, b in zip(history0, history1):
        assert {k: v for k, v in a.items() if k not in timings} == {k: v for k, v in b.items() if k not in timings}
        assert a["epoch_s"] > 0 and a["eval_s"] > 0 and a["images_per_s"] == pytest.approx(40 / a["epoch_s"])
    assert not reader_threads()


def test_data_feed_benchmark_quick():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "data_feed.py"), "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "POSIX_FADV_DONTNEED" in out and "not a measurement" in out
    for reader in ("synchronous reads", "one reader thread"):
        for cache in ("warm", "cold"):
            match = re.search(rf"^{reader}.*\s{cache}\s+([\d.]+)\s+(\d+)\s+(\d+)$", out, re.M)
            assert match and all(float(x) > 0 for x in match.groups()), (reader, cache, out)
    need = re.search(r"^need: .*\s(\d+)\s+(\d+)\s+projected", out, re.M)
    assert need and int(need.group(1)) > 0
    for cache in ("warm", "cold"):
        assert re.search(rf"^{cache}(\s+-?[\d.]+){{7}}%$", out, re.M), out
    assert re.search(r"GFLOP per image .*counted at 32 px and scaled by pixels", out)
    assert re.search(
        r"^verdict: one reader thread from a warm cache delivers \d+ images/s, [\d.]+x the \d+ "
        r"images/s .*: it (exceeds|does NOT reach) the consumption$",
        out,
        re.M,
    )
