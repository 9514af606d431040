"""The two training stages as plain functions: the same with or without Ray, on CPU or CUDA.

Stage 1 pretrains the SegNet-style auto-encoder with MSE; stage 2 fine-tunes its
encoder with Local Aggregation. Both: SGD with momentum, the learning-rate
schedule stepped per epoch, the config's precision (bf16 autocast and channels_last,
by default on CUDA only, or plain float32; the memory bank, the losses and k-means are
float32 either way), evaluation every epoch (k-means with K = number of species on
the unit codes of all images), a full checkpoint every epoch, exact resumption,
and a line of progress inside an epoch that runs long (laray.training.epoch_progress).
Every epoch's randomness (batch order, augmentation) derives from (seed, epoch),
so 1 epoch + resume + 1 epoch equals 2 epochs straight.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import math
import time
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from laray.checkpoint import checkpoint_exists, load_with_fallback, rng_state, save_atomic, set_rng_state
from laray.data.augment import augment_batch
from laray.data.dataset import ImageDataset, model_batch
from laray.data.prefetch import BatchPrefetcher
from laray.errors import CheckpointError, LarayError
from laray.method.la import LocalAggregationLoss, MemoryBank
from laray.method.models import AutoEncoderVGG, EncoderVGGMerged
from laray.scoring.evaluate import encode_all, score_codes
from laray.scoring.holdout import holdout_mask
from laray.settings.config import AutoEncoderConfig, LAConfig
from laray.training.data_parallel import DataParallel
from laray.training.epoch_progress import EpochReporter, ProgressSink, progress_interval_s

Callback = Callable[[dict], None]


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """How a stage or a whole run goes, as opposed to what it trains (the configs)."""

    seed: int = 0
    device: str = "auto"  # "auto": CUDA when there is one
    resume: bool = False  # continue from the checkpoint when there is one
    callback: Callback | None = None  # called with each epoch's record
    progress: bool = True  # a progress bar on the console
    # Given an EpochProgress (images done, img/s, time left) at most every progress_s seconds inside an
    # epoch, the first only after progress_s: apart from `callback`, whose records are whole epochs.
    on_progress: ProgressSink | None = None
    progress_s: float | None = None  # None: $LARAY_PROGRESS_S, else 30 s (laray.training.epoch_progress)
    # Stage 1 only: this process's part of a data-parallel stage 1 (laray.training.data_parallel); None: alone
    data_parallel: DataParallel | None = None


PREFETCH_DEPTH = 3  # batches read ahead by a background thread while a step runs; 0 reads in the loop

# The `stage` of a training record (the history in metrics.json, the callbacks' records).
STAGE_AUTOENCODER, STAGE_LA = "autoencoder", "local_aggregation"


def _load_libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


_LIBC = _load_libc()


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc's malloc_trim; elsewhere nothing).

    glibc keeps what a phase freed (the step's blocks, k-means' buffers) for later mallocs, so
    without it a worker's resident memory carries the peak of one phase into the next
    (benchmarks/sweep_scale.py measures the worker's peak).
    """
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


class NonFiniteLossError(LarayError, RuntimeError):
    """Training produced a NaN or infinite loss; the message names the epoch, step and hyperparameters."""


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """'auto' (CUDA when there is one), or the device named; one that this machine lacks is a LarayError."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise LarayError(f"--device {device}: not a device name; use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise LarayError(
            f"--device {device}: this machine has no CUDA device that PyTorch can use; use --device cpu (or auto)"
        )
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise LarayError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if resolved.type not in ("cpu", "cuda"):
        raise LarayError(f"--device {device}: laray runs on cpu or cuda")
    return resolved


def uses_bf16(precision: str, device: torch.device) -> bool:
    """Whether a stage with this precision setting (laray.settings.config.PRECISIONS) runs bf16 on `device`.

    bf16 means autocast to bfloat16 and channels_last for the model and its batches; "auto" is bf16 on CUDA
    only, where a GPU's dense bf16 peak is 2 (A10G) to 15 (H100) times its float32 one (docs/benchmarks.md); on a CPU
    without bf16 instructions bf16 is emulated, 3 to 4 times slower than float32 (docs/training.md).
    """
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def _bar_off(progress: bool) -> bool | None:
    """tqdm's `disable`: off when not asked for; when asked for, None, which is off unless stderr is a terminal. A
    log file gets the plain lines (each epoch's, and laray.training.epoch_progress's inside a long one), not bars
    redrawn with carriage returns."""
    return None if progress else True


def _epoch_seed(seed: int, epoch: int, salt: int) -> int:
    return (seed * 1_000_003 + epoch * 101 + salt) % (2**63)


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """A seeded permutation cut into batches; a last batch of one image is dropped (batch norm needs two)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(_epoch_seed(seed, epoch, 1))).numpy()
    batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    return [b for b in batches if len(b) >= 2]


def make_optimizer(params, cfg) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, cfg.epochs))
    elif cfg.schedule == "step":  # x0.1 at 1/3 and 2/3 of the epochs
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, math.ceil(cfg.epochs / 3)), gamma=0.1)
    else:
        scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    return optimizer, scheduler


def _check_finite(loss: torch.Tensor, stage: str, epoch: int, step: int, cfg) -> None:
    if not torch.isfinite(loss):
        settings = ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(cfg).items())
        raise NonFiniteLossError(
            f"non-finite loss ({loss.item()}) in {stage}, epoch {epoch + 1}, step {step + 1}; settings: {settings}"
        )


def _evaluate(
    encoder: EncoderVGGMerged,
    dataset: ImageDataset,
    device,
    fast: bool,
    seed: int,
    heldout=None,
    out: torch.Tensor | None = None,
):
    """(codes, scores, assignments, wall seconds); heldout: the images scored apart (laray.scoring.holdout).

    out: the (N, d) tensor the codes are written into (see finetune_la's codes_buffer).
    """
    began = time.perf_counter()
    codes = encode_all(encoder, dataset, device, autocast=fast, prefetch=PREFETCH_DEPTH, out=out)
    scores, assignments = score_codes(codes, dataset.labels, seed=seed, device=device, heldout=heldout)
    release_free_memory()
    return codes, scores, assignments, time.perf_counter() - began


def _save(path, model, optimizer, scheduler, epoch, cfg, history, **extra) -> None:
    if path is not None:
        save_atomic(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "epoch": epoch,
                "config": dataclasses.asdict(cfg),
                "history": history,
                "rng": rng_state(),
                **extra,
            },
            path,
        )


def _resume(path, model, optimizer, scheduler, cfg, required=()) -> tuple[int, list, dict]:
    """Restore a checkpoint written by _save (or the one before it, when it is unreadable).

    Returns (epochs done, history, the whole state).
    """
    state = load_with_fallback(
        path, required=("model", "optimizer", "scheduler", "epoch", "config", "history", "rng", *required)
    )
    # A checkpoint written before the precision setting existed trained as "auto" does.
    if {"precision": "auto", **state["config"]} != dataclasses.asdict(cfg):
        raise CheckpointError(
            f"checkpoint {path} was written with another config; start afresh or use the same settings"
        )
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state["epoch"], state["history"], state


def pretrain_autoencoder(
    dataset: ImageDataset,
    cfg: AutoEncoderConfig,
    run: RunOptions = RunOptions(),
    checkpoint: str | Path | None = None,
) -> tuple[AutoEncoderVGG, list]:
    """Stage 1: train AutoEncoderVGG with per-pixel MSE; returns (model, history).

    With run.data_parallel, this process trains its part of each batch beside the others (the model it
    returns is the same in each); only the chief evaluates, keeps the history and writes `checkpoint`,
    which every process resumes from.
    """
    seed, device, resume, callback, progress = run.seed, run.device, run.resume, run.callback, run.progress
    device = resolve_device(device)
    fast = uses_bf16(cfg.precision, device)
    interval_s = progress_interval_s(run.progress_s)
    parallel = run.data_parallel
    chief = parallel is None or parallel.chief
    torch.manual_seed(seed)
    model = AutoEncoderVGG(cfg.arch, cfg.pretrained, cfg.width).to(device)
    if fast:
        model = model.to(memory_format=torch.channels_last)
    optimizer, scheduler = make_optimizer(model.parameters(), cfg)
    start, history = 0, []
    if resume and checkpoint is not None and checkpoint_exists(checkpoint):
        start, history, _ = _resume(checkpoint, model, optimizer, scheduler, cfg)
    stepped = model if parallel is None else parallel.wrap(model)  # wrapped after resuming: the same keys saved

    for epoch in range(start, cfg.epochs):
        model.train()
        batches = epoch_batches(len(dataset), cfg.batch_size, seed, epoch)
        if parallel is not None:
            batches = parallel.part(batches)
        total, seen, began = 0.0, 0, time.perf_counter()
        report = EpochReporter("autoencoder", epoch + 1, sum(map(len, batches)), run.on_progress, interval_s)
        with BatchPrefetcher(dataset, batches, device, PREFETCH_DEPTH) as feed:
            for step, (idx, images) in enumerate(
                tqdm(feed, desc=f"autoencoder {epoch + 1}/{cfg.epochs}", leave=False, disable=_bar_off(progress))
            ):
                x = model_batch(images, device, channels_last=fast)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=fast):
                    out = stepped(x)
                loss = F.mse_loss(out.float(), x)  # bf16 reconstructions: the loss against float32 pixels
                _check_finite(loss, "autoencoder", epoch, step, cfg)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total, seen = total + loss.item() * len(idx), seen + len(idx)
                report(len(idx))
        epoch_s = time.perf_counter() - began  # loss.item() waits for the GPU every step: no sync needed
        if parallel is not None:
            total, seen = parallel.sums(total, seen)
        lr = optimizer.param_groups[0]["lr"]  # the rate this epoch trained at
        scheduler.step()
        record = {
            "stage": STAGE_AUTOENCODER,
            "epoch": epoch + 1,
            "loss": total / max(seen, 1),
            "images_per_s": seen / epoch_s,
            "lr": lr,
        }
        if chief:  # the others go on to the next epoch, whose first all-reduce waits for the chief
            _, scores, _, eval_s = _evaluate(
                EncoderVGGMerged.from_encoder(model.encoder, "mean"), dataset, device, fast, seed
            )
            record.update(scores, epoch_s=epoch_s, eval_s=eval_s)
            if parallel is not None:
                record["workers"] = parallel.world
        else:
            record["epoch_s"] = epoch_s
        history.append(record)
        if chief:
            _save(checkpoint, model, optimizer, scheduler, epoch + 1, cfg, history)
        if callback is not None:
            callback(record)
    return model, history


@dataclasses.dataclass
class LAResult:
    encoder: EncoderVGGMerged
    loss_fn: LocalAggregationLoss
    history: list
    codes: torch.Tensor  # (N, d) unit codes of every image, after the last epoch
    assignments: np.ndarray  # (N,) k-means clusters (K = number of species) of those codes
    scores: dict


def finetune_la(
    dataset: ImageDataset,
    encoder_state: dict,
    ae_cfg: AutoEncoderConfig,
    cfg: LAConfig,
    run: RunOptions = RunOptions(),
    checkpoint: str | Path | None = None,
    on_evaluated: Callable[[list, torch.Tensor, np.ndarray], None] | None = None,
    codes_buffer: Callable[[int, int], torch.Tensor] | None = None,
) -> LAResult:
    """Stage 2: fine-tune the auto-encoder's encoder (`encoder_state`) with the Local Aggregation loss.

    After each epoch's checkpoint (and its evaluation, every `cfg.eval_every` epochs and at the last),
    `on_evaluated(history, codes, assignments)` runs after an evaluation (to write outputs that must
    exist even if the run is stopped at the report), then `callback(record)` after every epoch; a
    record without scores is an epoch that was not evaluated.
    codes_buffer(n, d): where an evaluation writes its (N, d) codes (laray.training.run maps the codes.npy
    it writes anyway), instead of a new array beside the memory bank.
    """
    seed, device, resume, callback, progress = run.seed, run.device, run.resume, run.callback, run.progress
    device = resolve_device(device)
    fast = uses_bf16(cfg.precision, device)
    interval_s = progress_interval_s(run.progress_s)
    n = len(dataset)
    cfg.check_data_size(n)
    heldout = holdout_mask(dataset.labels, cfg.holdout, cfg.holdout_seed)
    torch.manual_seed(seed + 1)
    model = EncoderVGGMerged(ae_cfg.arch, None, ae_cfg.width, cfg.merger)
    model.encoder.load_state_dict(encoder_state)
    model = model.to(device)
    if fast:
        model = model.to(memory_format=torch.channels_last)
    bank = MemoryBank(n, model.code_dim(dataset.image_size), cfg.mixing_rate, seed=seed, device=device)
    loss_fn = LocalAggregationLoss(
        bank, cfg.temperature, cfg.k_neighbours, cfg.clustering_repeats, cfg.n_centroids, seed=seed
    )
    optimizer, scheduler = make_optimizer(model.parameters(), cfg)
    start, history = 0, []
    if resume and checkpoint is not None and checkpoint_exists(checkpoint):
        start, history, state = _resume(checkpoint, model, optimizer, scheduler, cfg, required=("la",))
        loss_fn.load_state_dict(state["la"])
    elif cfg.bank_init == "codes":
        # straight into the bank: no second N x d array (encode_all's codes are unit rows already)
        bank.fill(encode_all(model, dataset, device, autocast=fast, prefetch=PREFETCH_DEPTH, out=bank.vectors))

    codes = scores = assignments = None
    new_codes = (lambda: codes_buffer(n, bank.vectors.shape[1])) if codes_buffer is not None else (lambda: None)
    steps_per_epoch = len(epoch_batches(n, cfg.batch_size, seed, 0))
    for epoch in range(start, cfg.epochs):
        model.train()
        gen = torch.Generator().manual_seed(_epoch_seed(seed, epoch, 2)) if cfg.augment else None
        total, seen, began = 0.0, 0, time.perf_counter()
        batches = epoch_batches(n, cfg.batch_size, seed, epoch)
        report = EpochReporter("local aggregation", epoch + 1, sum(map(len, batches)), run.on_progress, interval_s)
        transform = (
            None
            if gen is None
            else partial(
                augment_batch,
                gen=gen,
                min_area=cfg.crop_min_area,
                jitter=cfg.jitter,
                flip=cfg.flip,
                grey=cfg.grey,
                blur=cfg.blur,
            )
        )
        with BatchPrefetcher(dataset, batches, device, PREFETCH_DEPTH) as feed:
            for step, (idx, images) in enumerate(
                tqdm(feed, desc=f"local aggregation {epoch + 1}/{cfg.epochs}", leave=False, disable=_bar_off(progress))
            ):
                every = cfg.recluster_every or steps_per_epoch  # 0: once per epoch, at its start
                if (epoch * steps_per_epoch + step) % every == 0:
                    loss_fn.recluster()
                x = model_batch(images, device, channels_last=fast, transform=transform)
                indices = torch.from_numpy(idx).to(device)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=fast):
                    v = model(x)
                # bf16 codes under autocast: the loss (against the bank) and the bank's update are float32
                v = v.float()
                loss = loss_fn(v, indices)
                _check_finite(loss, "local aggregation", epoch, step, cfg)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                bank.update(indices, v.detach())
                total, seen = total + loss.item() * len(idx), seen + len(idx)
                report(len(idx))
        epoch_s = time.perf_counter() - began
        release_free_memory()  # the step's blocks, before the evaluation makes its own
        lr = optimizer.param_groups[0]["lr"]  # the rate this epoch trained at
        scheduler.step()
        record = {
            "stage": STAGE_LA,
            "epoch": epoch + 1,
            "loss": total / max(seen, 1),
            "images_per_s": seen / epoch_s,
            "lr": lr,
        }
        evaluated = (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs
        if evaluated:  # every eval_every epochs and at the last: at large N one evaluation costs about an epoch
            codes = assignments = None  # the last evaluation's (N, d) codes go before the next are made
            codes, scores, assignments, eval_s = _evaluate(model, dataset, device, fast, seed, heldout, new_codes())
            record.update(scores, eval_s=eval_s)
        record["epoch_s"] = epoch_s
        history.append(record)
        _save(checkpoint, model, optimizer, scheduler, epoch + 1, cfg, history, la=loss_fn.state_dict())
        if evaluated and on_evaluated is not None:
            on_evaluated(history, codes, assignments)
        if callback is not None:
            callback(record)
    if codes is None:  # nothing left to train (zero epochs, or resumed after the last): evaluate as is
        codes, scores, assignments, _ = _evaluate(model, dataset, device, fast, seed, heldout, new_codes())
    return LAResult(model, loss_fn, history, codes, assignments, scores)
