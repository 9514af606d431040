"""What a training run costs on this machine, worked out before it starts: counted work times measured costs.

Each kind of work is timed here, on this device, with the run's own model and settings, for a few
batches of random images (nothing is decoded, nothing is written): a stage-1 step, an LA step, an
encode, one recluster, one evaluation's k-means, the raw-pixel baseline's k-means, decoding a file,
a fresh worker's imports. `run_seconds` multiplies them by how often a run does each. The sweep's
plan (laray.sweep.plan) adds trials, concurrency, ASHA and the confirmation on top.
"""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
import threading
import time
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F

from laray.data.augment import augment_batch
from laray.data.dataset import model_batch
from laray.data.decode import decode_image
from laray.method.clustering import kmeans
from laray.method.la import LocalAggregationLoss, MemoryBank
from laray.method.models import AutoEncoderVGG, EncoderVGGMerged
from laray.scoring.evaluate import score_codes
from laray.settings.config import AutoEncoderConfig, LAConfig
from laray.training.run import RAW_BASELINE_SIDE
from laray.training.stages import make_optimizer, uses_bf16

SAMPLE_POINTS = 2_000  # k-means is timed on this many points and scaled to N: its cost grows linearly in N
BATCH_PROBE_S = 2.0  # a timed batch takes about this long at most: big models on a CPU are timed on fewer images
DECODE_SAMPLE = 8  # files decoded to time the decode


@dataclasses.dataclass(frozen=True)
class StepCosts:
    """Seconds, measured on this machine with the run's settings."""

    ae_image: float  # stage-1 training per image: forward, backward, step
    la_image: float  # LA training per image: augmentation, encoder forward and backward, the loss, the bank
    la_image_together: float  # the same with as many copies at once as trials will share this machine
    encode_image: float  # one image through the encoder, for an evaluation or the bank's first codes
    ae_kmeans: float  # a stage-1 evaluation's k-means (codes of the mean merger), at this N
    la_kmeans: float  # an LA evaluation's k-means (codes of the run's merger), at this N
    raw_kmeans: float  # the raw-pixel baseline's k-means, at this N
    recluster: float  # one recluster: R k-means runs on the bank, at this N
    decode_image: float  # one file decoded into the cache, all cores at work (0: decoded already)
    worker_start: float  # a fresh Python process importing torch, as each Ray worker does
    # The machine as the steps were timed, not seconds: its 1-minute load average just before, the cores this
    # process may use, and the share of its threads' cores the single-copy steps got (CPU time / wall time /
    # threads; 0: not measured), which busy_slowdown reads to tell timings inflated by other work.
    load: float = 0.0
    cores: int = 0
    cpu_share: float = 0.0


@dataclasses.dataclass(frozen=True)
class RunWork:
    """What one run does, counted: how many images each stage trains on and how often it evaluates."""

    n_images: int
    ae_epochs: int  # 0 when stage 1 comes from the store
    la_epochs: int
    la_evaluations: int
    reclusters: int
    bank_fill: bool
    baselines: int  # mergers whose baselines are scored after stage 1 (0 when stored)
    pretrained: bool = False  # stage 1 from pretrained weights: their codes are a baseline too


def count_run(n_images: int, ae: AutoEncoderConfig, la: LAConfig, stage1: bool = True, mergers: int = 1) -> RunWork:
    """The work of `train_run` on n_images: stage 1 (unless stored), its baselines, LA and its evaluations."""
    steps = math.ceil(n_images / la.batch_size)
    per_epoch = math.ceil(steps / la.recluster_every) if la.recluster_every else 1
    evaluations = sum(1 for e in range(1, la.epochs + 1) if e % la.eval_every == 0 or e == la.epochs)
    return RunWork(
        n_images,
        ae.epochs if stage1 else 0,
        la.epochs,
        max(evaluations, 1),  # zero epochs: the encoder is scored as it is
        per_epoch * la.epochs,
        la.bank_init == "codes",
        mergers if stage1 else 0,
        ae.pretrained is not None,
    )


# What one of several data-parallel stage-1 workers achieves of a lone worker's rate: the gradients' all-reduce
# each step and the chief's evaluation, which the others wait for (docs/training.md measures it on CPUs).
DDP_EFFICIENCY = 0.8


def ddp_speedup(workers: int) -> float:
    """How many times faster `workers` data-parallel workers train stage 1's steps than one."""
    return 1.0 if workers <= 1 else workers * DDP_EFFICIENCY


def stage1_seconds(work: RunWork, costs: StepCosts, workers: int = 1) -> float:
    """Stage 1 with an evaluation after each epoch (the chief's), then the baselines of each merger.

    workers: data-parallel workers sharing its steps (laray.training.data_parallel).
    """
    n = work.n_images
    epoch = n * costs.ae_image / ddp_speedup(workers) + n * costs.encode_image + costs.ae_kmeans
    encoders = 2 if work.pretrained else 1  # the auto-encoder's codes, and the pretrained encoder's
    baselines = costs.raw_kmeans + encoders * (n * costs.encode_image + costs.la_kmeans)
    return work.ae_epochs * epoch + work.baselines * baselines


def la_seconds(work: RunWork, costs: StepCosts, epochs: int | None = None) -> float:
    """Stage 2 for `epochs` of its epochs (all by default): training, reclustering, evaluations."""
    n, total = work.n_images, work.la_epochs
    epochs = total if epochs is None else epochs
    share = epochs / total if total else 0.0
    evaluations = work.la_evaluations if epochs == total else max(1, round(work.la_evaluations * share))
    return (
        (n * costs.encode_image if work.bank_fill else 0.0)
        + epochs * n * costs.la_image
        + work.reclusters * share * costs.recluster
        + evaluations * (n * costs.encode_image + costs.la_kmeans)
    )


def run_seconds(work: RunWork, costs: StepCosts) -> float:
    return stage1_seconds(work, costs) + la_seconds(work, costs)


def _seconds_per_call(fn, calls: int = 2) -> float:
    """Mean wall time of `calls` calls after one warm-up call (allocations, kernels chosen)."""
    fn()
    began = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - began) / calls


def _per_image(step, batch_size: int) -> float:
    """Seconds per image of `step(b)`; big models on a slow device are timed on a smaller batch."""
    probe = max(1, min(batch_size, 2))
    once = _seconds_per_call(partial(step, probe), calls=1) / probe
    if once * probe > BATCH_PROBE_S / 2:  # a big model on a slow device: the probe's own time is the measure
        return once
    batch = max(probe, min(batch_size, int(BATCH_PROBE_S / max(once, 1e-9))))
    return _seconds_per_call(partial(step, batch)) / batch


def _kmeans_seconds(n: int, d: int, clusters: int, run, seed: int = 0) -> float:
    """`run(x)` on random unit rows, timed on at most SAMPLE_POINTS of them and scaled to n."""
    sample = min(n, max(SAMPLE_POINTS, 2 * clusters))
    x = F.normalize(torch.randn(sample, d, generator=torch.Generator().manual_seed(seed)), dim=1)
    began = time.perf_counter()
    run(x)
    return (time.perf_counter() - began) * n / sample


BUSY_SHARE = 0.8  # timed steps that got less of their threads' cores than this were slowed by other work


def busy_slowdown(costs: StepCosts) -> float:
    """How many times slower the steps were timed than on a quiet machine (1: it was quiet).

    Measured, not modelled: while its single-copy steps were timed, this process's CPU time over their wall
    time and threads is the share of its cores it got (OpenMP's waiting threads spin, so a quiet machine
    gives about 1 on any number of threads). Beside two busy loops on 2 cores a 1-thread step gets about
    2/3 of a core: 1.5 times slower. The load average is reported beside it, but it lags and counts
    processes waiting on disks.
    """
    if costs.cpu_share <= 0 or costs.cpu_share >= BUSY_SHARE:
        return 1.0
    return 1.0 / costs.cpu_share


def busy_line(costs: StepCosts, estimated_s: float) -> str | None:
    """The plan's line for a machine found busy, with its estimate as found and as quiet; None when quiet."""
    from laray.settings.duration import duration

    slowdown = busy_slowdown(costs)
    if slowdown <= 1.0:
        return None
    return (
        f"  the machine is busy (load {costs.load:.1f} on {costs.cores} cores; the timed steps got "
        f"{costs.cpu_share:.0%} of their cores): {duration(estimated_s)} as found, about "
        f"{duration(estimated_s / slowdown)} on a quiet machine"
    )


def measure(
    ae: AutoEncoderConfig,
    la: LAConfig,
    n_images: int,
    n_species: int,
    device: torch.device,
    threads: int | None = None,
    decode_sample: list[str] = (),
    worker_start: float | None = None,
    together: int = 1,
) -> StepCosts:
    """Time each kind of work once, as the run would do it here (in each stage's precision).

    worker_start: what a fresh worker pays before its first step, when the caller knows it (0 for `laray train`,
    which runs in its own process); None: a fresh Python importing what a trial's worker imports is timed.
    together: trials that will run at once on this machine: the LA step is timed with as many copies at once.
    """
    import os

    from laray.threads import usable_cores

    found = {"load": os.getloadavg()[0], "cores": usable_cores()}  # before this process times anything
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        costs = _measure(ae, la, n_images, n_species, torch.device(device), list(decode_sample), worker_start, together)
    finally:
        torch.set_num_threads(before)
    return dataclasses.replace(costs, **found)


def _measure(ae, la, n_images, n_species, device, decode_sample, with_worker_start, together) -> StepCosts:
    fast, la_fast = uses_bf16(ae.precision, device), uses_bf16(la.precision, device)  # as each stage will run
    size = ae.image_size
    gen = torch.Generator().manual_seed(0)

    def images(b: int) -> torch.Tensor:
        return torch.randint(0, 256, (b, 3, size, size), dtype=torch.uint8, generator=gen)

    model = AutoEncoderVGG(ae.arch, None, ae.width).to(device)
    if fast:
        model = model.to(memory_format=torch.channels_last)
    optimizer, _ = make_optimizer(model.parameters(), ae)

    def ae_step(b: int) -> None:
        x = model_batch(images(b), device, channels_last=fast)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=fast):
            out = model(x)
        loss = F.mse_loss(out.float(), x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss.item()

    meter = _CpuShare()
    with meter:
        ae_image = _per_image(ae_step, ae.batch_size)
    encoder = EncoderVGGMerged(ae.arch, None, ae.width, la.merger).to(device)
    if la_fast:
        encoder = encoder.to(memory_format=torch.channels_last)
    d = encoder.code_dim(size)
    d_mean = EncoderVGGMerged.from_encoder(encoder.encoder, "mean").code_dim(size)

    @torch.no_grad()
    def encode(b: int) -> None:
        x = model_batch(images(b), device, channels_last=la_fast)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=la_fast):
            F.normalize(encoder(x).float(), dim=1).cpu()

    encoder.eval()
    with meter:
        encode_image = _per_image(encode, 256)
    encoder.train()
    make_la_step = partial(
        _la_step, ae, la, size, device, la_fast, min(n_images, max(SAMPLE_POINTS, la.k_neighbours + 1, la.n_centroids))
    )
    with meter:
        la_image = _per_image(make_la_step(0), la.batch_size)
    # Concurrent trials share this machine's cores and memory: the step timed sharing it too.
    la_together = _at_once(make_la_step, together, la.batch_size, la_image) if together > 1 else la_image
    labels = np.arange(n_species).repeat(math.ceil(SAMPLE_POINTS / n_species))

    def evaluation(x: torch.Tensor) -> None:
        score_codes(x, labels[: len(x)], n_clusters=min(n_species, len(x)), device=device)

    raw_d = 3 * min(size, RAW_BASELINE_SIDE) ** 2
    la_kmeans = _kmeans_seconds(n_images, d, n_species, evaluation)
    ae_kmeans = la_kmeans if d == d_mean else _kmeans_seconds(n_images, d_mean, n_species, evaluation)

    def recluster(x: torch.Tensor) -> None:
        for r in range(la.clustering_repeats):
            kmeans(x.to(device), min(la.n_centroids, len(x)), seed=r, init="random", max_iter=20)

    return StepCosts(
        ae_image=ae_image,
        la_image=la_image,
        la_image_together=la_together,
        encode_image=encode_image,
        ae_kmeans=ae_kmeans,
        la_kmeans=la_kmeans,
        raw_kmeans=_kmeans_seconds(n_images, raw_d, n_species, evaluation),
        recluster=_kmeans_seconds(n_images, d, la.n_centroids, recluster),
        decode_image=_decode_seconds(decode_sample, size),
        worker_start=worker_start_seconds() if with_worker_start is None else with_worker_start,
        cpu_share=meter.share() if device.type == "cpu" else 0.0,
    )


class _CpuShare:
    """This process's CPU time over the wall time and threads of the blocks it is entered for (see busy_slowdown)."""

    def __init__(self):
        self.cpu = self.wall = 0.0

    def __enter__(self):
        self.threads = torch.get_num_threads()
        self.began = (time.process_time(), time.perf_counter())

    def __exit__(self, *exc):
        self.cpu += time.process_time() - self.began[0]
        self.wall += (time.perf_counter() - self.began[1]) * self.threads

    def share(self) -> float:
        return min(1.0, self.cpu / self.wall) if self.wall > 0 else 0.0


def _la_step(ae, la, size, device, bf16, bank_n, seed):
    """One copy of an LA step with its own encoder, bank, loss and optimiser: step(b) trains on b random images."""
    gen = torch.Generator().manual_seed(seed)
    encoder = EncoderVGGMerged(ae.arch, None, ae.width, la.merger).to(device)
    if bf16:
        encoder = encoder.to(memory_format=torch.channels_last)
    bank = MemoryBank(bank_n, encoder.code_dim(size), la.mixing_rate, device=device)
    loss_fn = LocalAggregationLoss(
        bank, la.temperature, min(la.k_neighbours, bank_n - 1), la.clustering_repeats, min(la.n_centroids, bank_n)
    )
    optimizer, _ = make_optimizer(encoder.parameters(), la)
    augment = dict(min_area=la.crop_min_area, jitter=la.jitter, flip=la.flip, grey=la.grey, blur=la.blur)
    transform = partial(augment_batch, gen=torch.Generator().manual_seed(seed + 1), **augment) if la.augment else None

    def step(b: int) -> None:
        images = torch.randint(0, 256, (b, 3, size, size), dtype=torch.uint8, generator=gen)
        x = model_batch(images, device, channels_last=bf16, transform=transform)
        idx = torch.randint(0, bank_n, (b,), generator=gen).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            v = encoder(x)
        loss = loss_fn(v.float(), idx)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bank.update(idx, v.detach())
        loss.item()

    return step


def _at_once(make_step, copies: int, batch_size: int, alone: float) -> float:
    """Seconds per image of a step when `copies` independent copies run at once, one thread each.

    Torch releases the GIL inside its kernels, so the threads contend for cores, caches and memory bandwidth
    as concurrent trials' processes do. `alone`: the step's seconds per image by itself, to size the batch.
    """
    batch = max(1, min(batch_size, int(BATCH_PROBE_S / max(alone, 1e-9))))
    steps = [make_step(seed) for seed in range(copies)]
    for step in steps:
        step(batch)  # warm-up, one copy at a time
    barrier, seconds = threading.Barrier(copies), [0.0] * copies

    def timed(i: int) -> None:
        barrier.wait()
        began = time.perf_counter()
        for _ in range(2):
            steps[i](batch)
        seconds[i] = (time.perf_counter() - began) / (2 * batch)

    threads = [threading.Thread(target=timed, args=(i,)) for i in range(copies)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return max(seconds)


def _decode_seconds(paths: list[str], size: int) -> float:
    """Per file, with every core decoding (laray.data.cache decodes on all of them)."""
    if not paths:
        return 0.0
    import os

    began = time.perf_counter()
    for path in paths:
        try:
            decode_image(path, size)
        except Exception:  # a bad file costs about as much to find bad; the count is what matters here
            pass
    return (time.perf_counter() - began) / len(paths) / max(1, os.cpu_count() or 1)


def worker_start_seconds() -> float:
    """A fresh Python importing what a trial's worker imports (torch, Ray Tune, the trainable), as every Ray
    worker (stage 1, each trial) does before its first step."""
    began = time.perf_counter()
    imports = "import torch, ray.tune, laray.sweep.trainable"
    subprocess.run([sys.executable, "-c", imports], check=False, capture_output=True)
    return time.perf_counter() - began


def train_plan_lines(work: RunWork, costs: StepCosts, ae: AutoEncoderConfig, la: LAConfig, device: str) -> tuple:
    """(expected seconds, the lines `laray train` prints) for one run: decode, stage 1 unless stored, LA."""
    from laray.settings.duration import duration

    decode = work.n_images * costs.decode_image
    stage1, stage2 = stage1_seconds(work, costs), la_seconds(work, costs)
    total = decode + stage1 + stage2
    first = (
        f"{work.ae_epochs} epochs of {ae.arch} (width {ae.width:g}, {ae.image_size} px) and its baselines: "
        f"{duration(stage1)}"
        if work.ae_epochs
        else f"no epochs, its baselines: {duration(stage1)}"
        if work.baselines
        else "from the store: 0 s"
    )
    lines = [
        f"plan: {work.n_images:,} images on {device}"
        + (f"; decoding them first: {duration(decode)}" if decode else ""),
        f"  stage 1: {first}",
        f"  local aggregation: {work.la_epochs} epochs, {work.la_evaluations} evaluations: {duration(stage2)}",
        f"  expected wall time on this machine: {duration(total)} (measured here: stage-1 step "
        f"{costs.ae_image * 1e3:.2g} ms/image, LA step {costs.la_image * 1e3:.2g} ms/image)",
    ]
    busy = busy_line(costs, total) if device == "cpu" else None
    if busy:
        lines.append(busy)
    return total, lines
