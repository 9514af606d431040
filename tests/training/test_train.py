"""The training layer: configs, both stages, checkpoints and exact resumption, auto-encoder reuse, `laray train`.

Everything runs on the CPU with tiny models (vgg11_bn at width 0.125, 32 px) on a few dozen
real digits, one torch thread (on a shared 2-core machine, two threads fighting another
process for the cores run ~100x slower than one).
"""

import functools
import json
import math
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import tiny_train_argv, write_vgg_weights
from PIL import Image

import laray.training.stages as train_mod
from laray.checkpoint import REQUIRED_KEYS, load_checkpoint, save_atomic
from laray.cli.main import main
from laray.data.dataset import ImageDataset, load_dataset
from laray.errors import CheckpointError
from laray.method.la import LocalAggregationLoss, MemoryBank
from laray.method.models import AutoEncoderVGG, EncoderVGGMerged
from laray.scoring import metrics
from laray.scoring.evaluate import encode_all
from laray.settings.config import AutoEncoderConfig, ConfigError, LAConfig, from_dict, load_config, replace
from laray.training import store as ae_store
from laray.training.run import Stage1, baselines_path, stored_stage1, train_run
from laray.training.stages import NonFiniteLossError, RunOptions, finetune_la, pretrain_autoencoder

N = 48  # tiny subset: 3 batches of 16 per epoch
STEPS = 3
AE = AutoEncoderConfig(arch="vgg11_bn", width=0.125, image_size=32, epochs=1, batch_size=16, lr=0.05)
LA = LAConfig(
    epochs=1, batch_size=16, lr=0.01, k_neighbours=10, n_centroids=5, clustering_repeats=2, augment=True
)  # augmentation on: resumption must replay its randomness too
SCORES = ("purity", "nmi", "ari", "acc")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", 32)


def subset(digits, n=N, fingerprint="digits-32-subset", labelled=True):
    labels = digits.labels[:n] if labelled else np.full(n, -1)
    return ImageDataset(
        np.ascontiguousarray(digits.images[:n]),
        labels,
        digits.class_names if labelled else [],
        digits.paths[:n],
        spec="digits-subset",
        fingerprint=fingerprint,
    )


@pytest.fixture(scope="module")
def tiny(digits):
    return subset(digits)


@pytest.fixture(scope="module")
def encoder_state(tiny):
    """The encoder of an auto-encoder pretrained one epoch on `tiny`."""
    model, _ = pretrain_autoencoder(tiny, AE, run=RunOptions(seed=0, device="cpu", progress=False))
    return {k[len("encoder.") :]: v.clone() for k, v in model.state_dict().items() if k.startswith("encoder.")}


def without_timing(history):
    """Records minus the fields that measure the machine rather than the training."""
    return [{k: v for k, v in record.items() if k not in ("images_per_s", "epoch_s", "eval_s")} for record in history]


def assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def check_record(record, stage, epoch):
    assert record["stage"] == stage and record["epoch"] == epoch
    assert math.isfinite(record["loss"]) and record["loss"] >= 0
    assert record["images_per_s"] > 0 and math.isfinite(record["images_per_s"])
    assert record["lr"] >= 0
    for name in ("purity", "nmi", "acc"):
        assert 0 <= record[name] <= 1, name
    assert -1 <= record["ari"] <= 1
    assert record["purity"] >= 0.1  # 10 species, K = 10: purity is at least the largest species' share


@pytest.fixture
def spy(monkeypatch):
    """Wraps make_optimizer: logs every optimizer step (with the lr it used) and scheduler step in `events`."""
    log = {"events": [], "lrs": [], "scheduler_steps": 0, "schedulers": []}
    make = train_mod.make_optimizer

    def spying_make_optimizer(params, cfg):
        optimizer, scheduler = make(params, cfg)
        opt_step, sched_step = optimizer.step, scheduler.step

        @functools.wraps(opt_step)  # keeps the scheduler's mark on optimizer.step
        def step(*args, **kwargs):
            log["events"].append("step")
            log["lrs"].append(optimizer.param_groups[0]["lr"])
            return opt_step(*args, **kwargs)

        def scheduler_step(*args, **kwargs):
            log["events"].append("epoch_end")
            log["scheduler_steps"] += 1
            return sched_step(*args, **kwargs)

        optimizer.step, scheduler.step = step, scheduler_step
        log["schedulers"].append(scheduler)
        return optimizer, scheduler

    monkeypatch.setattr(train_mod, "make_optimizer", spying_make_optimizer)
    return log


# ---------------------------------------------------------------------------------------------- 1. both stages


def test_pretrain_records_and_per_epoch_cosine_schedule(tiny, spy):
    cfg = replace(AE, epochs=2, schedule="cosine")
    received = []
    model, history = pretrain_autoencoder(
        tiny, cfg, run=RunOptions(seed=0, device="cpu", callback=received.append, progress=False)
    )
    assert isinstance(model, AutoEncoderVGG)
    assert len(history) == 2 and received == history
    for epoch, record in enumerate(history, 1):
        check_record(record, "autoencoder", epoch)
    # Stepped once per epoch, never per batch: the lr is constant within an epoch.
    assert spy["scheduler_steps"] == 2 and spy["schedulers"][0].last_epoch == 2
    assert spy["events"] == (["step"] * STEPS + ["epoch_end"]) * 2
    cosine = [cfg.lr * (1 + math.cos(math.pi * e / 2)) / 2 for e in range(3)]  # 0.05, 0.025, 0
    assert spy["lrs"] == pytest.approx([cosine[0]] * STEPS + [cosine[1]] * STEPS, rel=1e-12, abs=1e-15)
    # Each record carries the lr that epoch trained at.
    assert [r["lr"] for r in history] == pytest.approx(cosine[:2], rel=1e-12, abs=1e-15)


def test_pretrain_unlabelled_reports_silhouette(digits):
    data = subset(digits, labelled=False)
    _, history = pretrain_autoencoder(data, AE, run=RunOptions(seed=0, device="cpu", progress=False))
    (record,) = history
    assert record["stage"] == "autoencoder" and math.isfinite(record["loss"])
    assert not set(SCORES) & set(record)
    assert -1 <= record["silhouette"] <= 1


def test_finetune_la_order_of_recluster_step_and_bank_update(tiny, encoder_state, spy, monkeypatch):
    """Bank filled from the codes once; each epoch: recluster at its start, a bank update after every step."""
    events = spy["events"]
    for cls, name in ((MemoryBank, "fill"), (MemoryBank, "update"), (LocalAggregationLoss, "recluster")):
        original = getattr(cls, name)

        def logged(self, *args, _original=original, _name=name, **kwargs):
            events.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, name, logged)

    cfg = replace(LA, epochs=2, schedule="step")
    received = []
    result = finetune_la(
        tiny, encoder_state, AE, cfg, run=RunOptions(seed=0, device="cpu", callback=received.append, progress=False)
    )
    epoch = ["recluster"] + ["step", "update"] * STEPS + ["epoch_end"]
    assert events == ["fill"] + epoch * 2
    assert int(result.loss_fn.n_reclusters) == 2
    assert len(result.history) == 2 and received == result.history
    for e, record in enumerate(result.history, 1):
        check_record(record, "local_aggregation", e)
    # "step" over 2 epochs: x0.1 after every ceil(2/3) = 1 epoch.
    assert spy["scheduler_steps"] == 2
    assert spy["lrs"] == pytest.approx([0.01] * STEPS + [0.001] * STEPS, rel=1e-12)
    assert [r["lr"] for r in result.history] == pytest.approx([0.01, 0.001], rel=1e-12)
    # The result: unit codes of every image, K = 10 clusters, the last record's scores.
    assert result.codes.shape == (N, result.encoder.code_dim(32))
    torch.testing.assert_close(result.codes.norm(dim=1), torch.ones(N))
    assert result.assignments.shape == (N,) and set(result.assignments) <= set(range(10))
    assert result.scores == {k: result.history[-1][k] for k in SCORES}
    assert metrics.purity(tiny.labels, result.assignments) == result.scores["purity"]


def test_bank_is_initialised_from_the_encoder_codes(tiny, encoder_state):
    codes_cfg = replace(LA, epochs=0)
    result = finetune_la(tiny, encoder_state, AE, codes_cfg, run=RunOptions(seed=0, device="cpu", progress=False))
    assert result.history == [] and int(result.loss_fn.n_reclusters) == 0
    bank = result.loss_fn.bank.vectors
    assert bank.shape == result.codes.shape
    torch.testing.assert_close(bank, result.codes)

    random = finetune_la(
        tiny,
        encoder_state,
        AE,
        replace(LA, epochs=0, bank_init="random"),
        run=RunOptions(seed=0, device="cpu", progress=False),
    )
    torch.testing.assert_close(random.codes, result.codes)  # same encoder, same codes
    random_bank = random.loss_fn.bank.vectors
    assert torch.equal(random_bank, MemoryBank(N, bank.shape[1], LA.mixing_rate, seed=0).vectors)
    assert (random_bank - result.codes).abs().max() > 0.5


# ---------------------------------------------------------------------------------------------- 2. resumption


class Stop(Exception):
    pass


def stop_after_first_epoch(record):
    if record["epoch"] == 1:
        raise Stop


def test_pretrain_resume_equals_straight_run(tiny, tmp_path):
    cfg = replace(AE, epochs=2)
    model_a, history_a = pretrain_autoencoder(
        tiny, cfg, checkpoint=tmp_path / "a.ckpt", run=RunOptions(seed=3, device="cpu", progress=False)
    )
    ckpt = tmp_path / "b.ckpt"
    with pytest.raises(Stop):
        pretrain_autoencoder(
            tiny,
            cfg,
            checkpoint=ckpt,
            run=RunOptions(seed=3, device="cpu", callback=stop_after_first_epoch, progress=False),
        )
    assert load_checkpoint(ckpt)["epoch"] == 1
    received = []
    model_b, history_b = pretrain_autoencoder(
        tiny,
        cfg,
        checkpoint=ckpt,
        run=RunOptions(seed=3, device="cpu", resume=True, callback=received.append, progress=False),
    )
    assert [r["epoch"] for r in received] == [2]  # only the epoch left was trained
    assert_same_state(model_a.state_dict(), model_b.state_dict())
    assert without_timing(history_b) == without_timing(history_a)

    a, b = load_checkpoint(tmp_path / "a.ckpt"), load_checkpoint(ckpt)
    assert set(REQUIRED_KEYS) <= set(a) and a["epoch"] == b["epoch"] == 2
    assert a["scheduler"] == b["scheduler"]
    for slot_a, slot_b in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(slot_a["momentum_buffer"], slot_b["momentum_buffer"])
    # No temporary files left; each checkpoint kept the one before it.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.ckpt", "a.ckpt.prev", "b.ckpt", "b.ckpt.prev"]

    # A finished checkpoint resumes to the same model without training; another config is refused.
    again, history_c = pretrain_autoencoder(
        tiny,
        cfg,
        checkpoint=ckpt,
        run=RunOptions(seed=3, device="cpu", resume=True, callback=received.append, progress=False),
    )
    assert len(received) == 1 and history_c == history_b
    assert_same_state(again.state_dict(), model_b.state_dict())
    with pytest.raises(CheckpointError, match="another config"):
        pretrain_autoencoder(
            tiny,
            replace(cfg, lr=0.02),
            checkpoint=ckpt,
            run=RunOptions(seed=3, device="cpu", resume=True, progress=False),
        )


def test_finetune_la_resume_equals_straight_run(tiny, encoder_state, tmp_path):
    cfg = replace(LA, epochs=2)
    a = finetune_la(
        tiny,
        encoder_state,
        AE,
        cfg,
        checkpoint=tmp_path / "a.ckpt",
        run=RunOptions(seed=5, device="cpu", progress=False),
    )
    ckpt = tmp_path / "b.ckpt"
    with pytest.raises(Stop):
        finetune_la(
            tiny,
            encoder_state,
            AE,
            cfg,
            checkpoint=ckpt,
            run=RunOptions(seed=5, device="cpu", callback=stop_after_first_epoch, progress=False),
        )
    first = load_checkpoint(ckpt, required=(*REQUIRED_KEYS, "la"))
    assert first["epoch"] == 1 and int(first["la"]["n_reclusters"]) == 1
    received = []
    b = finetune_la(
        tiny,
        encoder_state,
        AE,
        cfg,
        checkpoint=ckpt,
        run=RunOptions(seed=5, device="cpu", resume=True, callback=received.append, progress=False),
    )
    assert [r["epoch"] for r in received] == [2]
    assert_same_state(a.encoder.state_dict(), b.encoder.state_dict())
    assert_same_state(a.loss_fn.state_dict(), b.loss_fn.state_dict())  # bank, cluster labels, recluster count
    assert int(b.loss_fn.n_reclusters) == 2
    assert without_timing(b.history) == without_timing(a.history)
    assert torch.equal(a.codes, b.codes)
    assert np.array_equal(a.assignments, b.assignments) and a.scores == b.scores
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.ckpt", "a.ckpt.prev", "b.ckpt", "b.ckpt.prev"]

    with pytest.raises(CheckpointError, match="another config"):
        finetune_la(
            tiny,
            encoder_state,
            AE,
            replace(cfg, temperature=0.1),
            checkpoint=ckpt,
            run=RunOptions(seed=5, device="cpu", resume=True, progress=False),
        )


def test_crop_and_flip_settings_reach_the_augmentation(tiny, encoder_state, monkeypatch):
    import laray.training.stages
    from laray.data.augment import augment_batch

    seen = []

    def recording(images, gen, min_area=0.5, jitter=0.4, flip=True, grey=0.0, blur=0.0):
        seen.append((min_area, jitter, flip, grey, blur))
        return augment_batch(images, gen, min_area, jitter, flip, grey, blur)

    monkeypatch.setattr(laray.training.stages, "augment_batch", recording)
    cfg = replace(LA, epochs=1, augment=True, crop_min_area=0.8, flip=False, jitter=0.6, grey=0.2, blur=0.3)
    finetune_la(tiny, encoder_state, AE, cfg, run=RunOptions(seed=0, device="cpu", progress=False))
    assert seen and set(seen) == {(0.8, 0.6, False, 0.2, 0.3)}
    for field, bad in (("crop_min_area", 0.0), ("jitter", 1.0), ("jitter", -0.1), ("grey", 1.5), ("blur", -0.5)):
        with pytest.raises(ConfigError, match=field):
            replace(LA, **{field: bad})


def test_flip_off_leaves_every_image_unmirrored_and_every_other_draw_as_it_was():
    from laray.data.augment import augment_batch

    images = torch.rand(32, 3, 16, 16)
    flipped = augment_batch(images, torch.Generator().manual_seed(3), min_area=0.6, flip=True)
    plain = augment_batch(images, torch.Generator().manual_seed(3), min_area=0.6, flip=False)
    # Same seed, same crops and jitter: each image is either the same or its left-right mirror.
    same = [torch.allclose(f, p, atol=1e-5) for f, p in zip(flipped, plain)]
    mirrored = [torch.allclose(f, p.flip(-1), atol=1e-5) for f, p in zip(flipped, plain)]
    assert all(s or m for s, m in zip(same, mirrored))
    assert 4 <= sum(mirrored) <= 28 and 4 <= sum(same) <= 28  # about half were mirrored, half not


def test_grey_turns_a_share_of_images_grey_and_leaves_every_other_draw_as_it_was():
    from laray.data.augment import GREY_WEIGHTS, augment_batch

    images = torch.rand(64, 3, 16, 16)
    coloured = augment_batch(images, torch.Generator().manual_seed(4), grey=0.0)
    all_grey = augment_batch(images, torch.Generator().manual_seed(4), grey=1.0)
    luma = (coloured * torch.tensor(GREY_WEIGHTS).view(1, 3, 1, 1)).sum(1, keepdim=True)
    assert torch.allclose(all_grey, luma.expand_as(coloured), atol=1e-6)  # the same crops and jitter, then grey
    some = augment_batch(images, torch.Generator().manual_seed(4), grey=0.5)
    grey = [bool(torch.allclose(x[0], x[1]) and torch.allclose(x[1], x[2])) for x in some]
    assert 16 <= sum(grey) <= 48
    for x, was_grey, plain in zip(some, grey, coloured):
        assert was_grey or torch.equal(x, plain)
    again = augment_batch(images, torch.Generator().manual_seed(4), grey=0.5)
    assert torch.equal(some, again)  # seeded


def test_blur_smooths_a_share_of_images_with_a_seeded_width():
    from laray.data.augment import BLUR_SIGMA, augment_batch, gaussian_blur

    # At 224 px the widths are SimCLR's, 0.1-2 px: all but the narrowest visibly change an image.
    images = torch.rand(32, 3, 224, 224)
    plain = augment_batch(images, torch.Generator().manual_seed(6), blur=0.0)
    blurred = augment_batch(images, torch.Generator().manual_seed(6), blur=0.5)
    assert torch.equal(blurred, augment_batch(images, torch.Generator().manual_seed(6), blur=0.5))  # seeded
    changed = [not torch.equal(b, p) for b, p in zip(blurred, plain)]
    assert 8 <= sum(changed) <= 24

    def roughness(x):  # mean absolute difference between neighbouring pixels
        return (x[..., 1:] - x[..., :-1]).abs().mean()

    assert all(roughness(b) < roughness(p) for b, p, c in zip(blurred, plain, changed) if c)
    # The blur itself: a constant image stays constant, brightness is kept, a larger sigma smooths more.
    flat = torch.full((2, 3, 32, 32), 0.3)
    assert torch.allclose(gaussian_blur(flat, torch.tensor([0.5, 2.0])), flat, atol=1e-6)
    noise = torch.rand(2, 3, 32, 32)
    smooth = gaussian_blur(noise, torch.tensor([0.5, 2.0]))
    assert torch.allclose(smooth.mean((1, 2, 3)), noise.mean((1, 2, 3)), atol=0.01)
    assert roughness(smooth[1]) < roughness(smooth[0]) < roughness(noise[0])
    assert BLUR_SIGMA[0] * 224 == pytest.approx(0.1) and BLUR_SIGMA[1] * 224 == pytest.approx(2.0)


def test_jitter_zero_keeps_colours_and_jitter_changes_them():
    from laray.data.augment import augment_batch

    flat = torch.tensor([0.2, 0.5, 0.7]).view(1, 3, 1, 1).expand(16, 3, 12, 12).contiguous()
    kept = augment_batch(flat, torch.Generator().manual_seed(2), jitter=0.0)
    assert torch.allclose(kept, flat, atol=1e-6)  # crops and mirrors of one colour, unjittered
    moved = augment_batch(flat, torch.Generator().manual_seed(2), jitter=0.4)
    assert sum(not torch.allclose(m, f, atol=1e-3) for m, f in zip(moved, flat)) >= 12


def test_eval_every_evaluates_every_kth_epoch_and_the_last(tiny, encoder_state):
    evaluated, received = [], []
    result = finetune_la(
        tiny,
        encoder_state,
        AE,
        replace(LA, epochs=5, eval_every=2),
        on_evaluated=lambda history, codes, assignments: evaluated.append(history[-1]["epoch"]),
        run=RunOptions(seed=5, device="cpu", callback=received.append, progress=False),
    )
    assert [r["epoch"] for r in received] == [1, 2, 3, 4, 5]  # every epoch trains and is checkpointed
    assert evaluated == [2, 4, 5]
    assert [r["epoch"] for r in result.history if "purity" in r] == [2, 4, 5]
    assert all("eval_s" not in r and "purity" not in r for r in result.history if r["epoch"] in (1, 3))
    assert result.scores == {k: result.history[-1][k] for k in SCORES}
    with pytest.raises(ConfigError, match="eval_every"):
        replace(LA, eval_every=0)


def test_save_atomic_never_leaves_a_torn_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "x.ckpt"
    save_atomic({"epoch": 1}, path)

    def torn_save(obj, file):
        file.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError, match="disk full"):
        save_atomic({"epoch": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.ckpt"]


# ---------------------------------------------------------------------------------------------- 3. non-finite loss


def poison(monkeypatch, cls, bad_call):
    """Make the `bad_call`-th call of cls.forward (counting from 1) return NaN, keeping the graph."""
    original, calls = cls.forward, []

    def forward(self, *args, **kwargs):
        calls.append(1)
        out = original(self, *args, **kwargs)
        return out * float("nan") if len(calls) == bad_call else out

    monkeypatch.setattr(cls, "forward", forward)


@pytest.mark.parametrize("bad_call, epoch, step", [(1, 1, 1), (STEPS + 2, 2, 2)])
def test_nonfinite_loss_in_la_names_epoch_step_and_settings(
    tiny, encoder_state, tmp_path, monkeypatch, bad_call, epoch, step
):
    poison(monkeypatch, LocalAggregationLoss, bad_call)
    ckpt = tmp_path / "la.ckpt"
    with pytest.raises(NonFiniteLossError) as info:
        finetune_la(
            tiny,
            encoder_state,
            AE,
            replace(LA, epochs=2),
            checkpoint=ckpt,
            run=RunOptions(seed=0, device="cpu", progress=False),
        )
    message = str(info.value)
    assert f"local aggregation, epoch {epoch}, step {step};" in message
    for setting in (
        "temperature=0.07",
        "k_neighbours=10",
        "n_centroids=5",
        "mixing_rate=0.5",
        "lr=0.01",
        "batch_size=16",
    ):
        assert setting in message
    # The run stopped: the last checkpoint is that of the last finished epoch.
    assert (load_checkpoint(ckpt)["epoch"] if ckpt.exists() else 0) == epoch - 1


@pytest.mark.parametrize("bad_call, epoch, step", [(1, 1, 1), (STEPS + 3, 2, 3)])
def test_nonfinite_loss_in_pretraining_names_epoch_and_step(tiny, tmp_path, monkeypatch, bad_call, epoch, step):
    poison(monkeypatch, AutoEncoderVGG, bad_call)
    ckpt = tmp_path / "ae.ckpt"
    with pytest.raises(NonFiniteLossError, match=f"autoencoder, epoch {epoch}, step {step};") as info:
        pretrain_autoencoder(
            tiny, replace(AE, epochs=2), checkpoint=ckpt, run=RunOptions(seed=0, device="cpu", progress=False)
        )
    assert "lr=0.05" in str(info.value) and "arch=vgg11_bn" in str(info.value)
    assert (load_checkpoint(ckpt)["epoch"] if ckpt.exists() else 0) == epoch - 1


def test_diverging_learning_rate_raises_nonfinite(tiny):
    with pytest.raises(NonFiniteLossError, match=r"autoencoder, epoch 1, step \d+;.*lr=1e\+30"):
        pretrain_autoencoder(tiny, replace(AE, lr=1e30), run=RunOptions(seed=0, device="cpu", progress=False))


# ---------------------------------------------------------------------------------------------- 4. reuse


def test_get_or_train_trains_once_per_key(tmp_path):
    store, calls = tmp_path / "store", []

    def train(checkpoint):
        calls.append(checkpoint)
        return {"w": torch.arange(4.0) + len(calls)}, [{"epoch": 1, "loss": 0.5}]

    state, history, trained = ae_store.get_or_train(store, "key1", train)
    assert trained and len(calls) == 1 and calls[0] == store / "key1" / "training.ckpt"
    again, history2, trained2 = ae_store.get_or_train(store, "key1", train)
    assert not trained2 and len(calls) == 1
    assert_same_state(state, again) and history2 == history
    assert ae_store.trainings(store, "key1") == 1
    _, _, trained3 = ae_store.get_or_train(store, "key2", train)
    assert trained3 and len(calls) == 2 and ae_store.trainings(store, "key2") == 1
    assert ae_store.trainings(store, "never") == 0


def test_store_key_depends_on_data_config_and_seed():
    key = ae_store.store_key("fp", AE, 0)
    assert key == ae_store.store_key("fp", replace(AE), 0)
    others = {
        ae_store.store_key("fp", AE, 1),
        ae_store.store_key("other-fp", AE, 0),
        ae_store.store_key("fp", replace(AE, lr=0.02), 0),
        ae_store.store_key("fp", replace(AE, epochs=2), 0),
    }
    assert key not in others and len(others) == 4


CONCURRENT = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    import torch
    from laray.training.store import get_or_train

    store, key, me, peer, out = sys.argv[1:6]
    Path(me).touch()
    deadline = time.time() + 90
    while not Path(peer).exists():  # start together
        if time.time() > deadline:
            sys.exit("the other process never started")
        time.sleep(0.005)

    def train(checkpoint):
        time.sleep(1.0)
        return {"w": torch.full((3,), float(os.getpid()))}, [{"pid": os.getpid()}]

    state, history, trained = get_or_train(store, key, train)
    torch.save({"state": state, "history": history, "trained": trained, "pid": os.getpid()}, out)
""")


def test_two_processes_asking_at_once_train_once(tmp_path):
    store = tmp_path / "store"
    args = [
        [
            sys.executable,
            "-c",
            CONCURRENT,
            str(store),
            "k",
            str(tmp_path / f"ready{i}"),
            str(tmp_path / f"ready{1 - i}"),
            str(tmp_path / f"out{i}.pt"),
        ]
        for i in range(2)
    ]
    procs = [subprocess.Popen(a, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for a in args]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    results = [torch.load(tmp_path / f"out{i}.pt", weights_only=True) for i in range(2)]
    assert sorted(r["trained"] for r in results) == [False, True]
    trainer = next(r for r in results if r["trained"])
    assert ae_store.trainings(store, "k") == 1
    for r in results:  # both got the trainer's weights
        assert torch.equal(r["state"]["w"], torch.full((3,), float(trainer["pid"])))
        assert r["history"] == [{"pid": trainer["pid"]}]


def test_train_run_reuses_the_autoencoder(tiny, tmp_path):
    store = tmp_path / "store"
    first = train_run(
        tiny, tmp_path / "run1", AE, LA, store_dir=store, run=RunOptions(seed=0, device="cpu", progress=False)
    )
    second = train_run(
        tiny, tmp_path / "run2", AE, LA, store_dir=store, run=RunOptions(seed=0, device="cpu", progress=False)
    )
    assert first["autoencoder"]["trained_in_this_run"] is True
    assert second["autoencoder"]["trained_in_this_run"] is False
    key = first["autoencoder"]["key"]
    assert key == second["autoencoder"]["key"] == ae_store.store_key(tiny.fingerprint, AE, 0)
    assert ae_store.trainings(store, key) == 1
    assert first["history"][0] == second["history"][0]  # the stored stage-1 history, identical
    assert [r["stage"] for r in first["history"]] == ["autoencoder", "local_aggregation"]
    # Same auto-encoder, same seed: the same LA run.
    assert np.array_equal(np.load(tmp_path / "run1" / "codes.npy"), np.load(tmp_path / "run2" / "codes.npy"))
    assert {k: first[k] for k in SCORES} == {k: second[k] for k in SCORES}
    assert first["baselines"] == second["baselines"]

    # Another seed is another key: stage 1 trains again.
    third = train_run(
        tiny,
        tmp_path / "run3",
        AE,
        replace(LA, epochs=0),
        store_dir=store,
        run=RunOptions(seed=1, device="cpu", progress=False),
    )
    assert third["autoencoder"]["trained_in_this_run"] is True and third["autoencoder"]["key"] != key


@pytest.fixture(scope="module")
def vgg11_weights(tmp_path_factory):
    """A local vgg11_bn state_dict in torchvision's format (seeded random weights): `pretrained: FILE`."""
    return write_vgg_weights(tmp_path_factory.mktemp("weights") / "vgg11_bn.pth")


def pretrained_codes(weights, dataset) -> torch.Tensor:
    """Unit codes of torchvision's own vgg11_bn feature stack holding `weights`, mean-merged: computed apart from
    laray's encoder, so that a baseline equal to their k-means scores these weights as loaded."""
    import torch.nn.functional as F
    from torchvision.models import vgg

    from laray.data.dataset import model_batch

    features = vgg.make_layers(vgg.cfgs["A"], batch_norm=True).eval()  # vgg11_bn's `features`
    features.load_state_dict({k.removeprefix("features."): v for k, v in torch.load(weights).items()})
    with torch.no_grad():
        maps = features(model_batch(dataset.uint8_batch(np.arange(len(dataset))), torch.device("cpu")))
    return F.normalize(maps.mean(dim=(2, 3)), dim=1)


def test_pretrained_baseline_scores_the_weights_as_loaded_before_any_training(digits, vgg11_weights, tmp_path):
    from laray.scoring.evaluate import score_codes
    from laray.scoring.holdout import holdout_mask

    data = subset(digits, 60, fingerprint="digits-32-pretrained")
    cfg = replace(AE, width=1.0, pretrained=str(vgg11_weights))  # pretrained weights need width 1.0
    store, holdout = tmp_path / "store", (0.5, 3)
    stage1 = stored_stage1(data, cfg, ["mean"], 0, "cpu", store, progress=False, holdout=holdout)
    baselines = stage1.baselines["mean"]
    assert list(baselines) == ["raw_pixels", "autoencoder", "pretrained"]

    # stage 1 trained the encoder away from the file's weights: the baseline scores the file's, not the stored ones
    loaded = torch.load(vgg11_weights)
    assert not torch.equal(stage1.encoder_state["features.0.weight"], loaded["features.0.weight"])
    heldout = holdout_mask(data.labels, *holdout)
    expected = score_codes(pretrained_codes(vgg11_weights, data), data.labels, seed=0, heldout=heldout)[0]
    assert set(expected) == {
        "purity",
        "nmi",
        "ari",
        "acc",
        "heldout_purity",
        "heldout_nmi",
        "heldout_ari",
        "heldout_acc",
    }
    assert baselines["pretrained"] == pytest.approx(expected)
    assert baselines["pretrained"] != baselines["autoencoder"]

    # kept in the store beside the auto-encoder, and read back from there
    path = baselines_path(store, stage1.key, "mean", data.labels_key, holdout)
    assert json.loads(path.read_text()) == baselines
    again = stored_stage1(data, cfg, ["mean"], 0, "cpu", store, progress=False, holdout=holdout)
    assert again.source == "store" and again.baselines == {"mean": baselines}

    # without pretrained weights: the two baselines, as before
    plain = stored_stage1(data, AE, ["mean"], 0, "cpu", store, progress=False, holdout=holdout)
    assert list(plain.baselines["mean"]) == ["raw_pixels", "autoencoder"]


def test_each_evaluation_writes_its_codes_into_the_mapped_codes_file(tiny, encoder_state, tmp_path, monkeypatch):
    """train_run's evaluations encode straight into a memory map of the codes.npy they publish: the codes
    that k-means clusters are the file's pages, no N x d array of the worker's own; a run stopped by an
    error leaves the last published codes.npy whole and no partial file."""
    stage1 = Stage1("key", encoder_state, [], {"mean": {}})
    seen = []
    real_score_codes = train_mod.score_codes

    def spy(codes, *args, **kwargs):
        seen.append((codes.data_ptr(), sorted(p.name for p in (tmp_path / "out").iterdir())))
        return real_score_codes(codes, *args, **kwargs)

    monkeypatch.setattr(train_mod, "score_codes", spy)
    metrics = train_run(
        tiny,
        tmp_path / "out",
        AE,
        replace(LA, epochs=2),
        stage1=stage1,
        run=RunOptions(seed=0, device="cpu", progress=False),
    )
    assert [r["epoch"] for r in metrics["history"]] == [1, 2] and len(seen) == 2
    assert all(".codes.npy.partial" in names for _, names in seen)  # clustered while they were being written
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["assignments.csv", "checkpoints", "codes.npy", "metrics.json"]
    codes = np.load(tmp_path / "out" / "codes.npy")
    assert codes.dtype == np.float32 and codes.shape == (N, 8 * 8)  # width 0.125: 64 channels, mean merger
    np.testing.assert_allclose(np.linalg.norm(codes, axis=1), 1.0, rtol=1e-5)
    # The same codes as a run that keeps them in memory, bit for bit.
    plain = finetune_la(
        tiny, encoder_state, AE, replace(LA, epochs=2), run=RunOptions(seed=0, device="cpu", progress=False)
    )
    assert np.array_equal(codes, plain.codes.numpy())

    seen.clear()

    def fail_in_the_second_evaluation(codes, *args, **kwargs):
        if len(seen) == 1:
            raise Stop
        return spy(codes, *args, **kwargs)

    monkeypatch.setattr(train_mod, "score_codes", fail_in_the_second_evaluation)
    before = (tmp_path / "out" / "codes.npy").read_bytes()
    with pytest.raises(Stop):
        train_run(
            tiny,
            tmp_path / "out",
            AE,
            replace(LA, epochs=2, temperature=0.2),
            stage1=stage1,
            run=RunOptions(seed=0, device="cpu", progress=False),
        )
    assert not (tmp_path / "out" / ".codes.npy.partial").exists()
    assert (tmp_path / "out" / "codes.npy").read_bytes() != before  # epoch 1's codes of this run, published
    np.load(tmp_path / "out" / "codes.npy")  # whole


def test_encode_all_fills_the_tensor_it_is_given(tiny, encoder_state):
    model = EncoderVGGMerged(AE.arch, None, AE.width, "mean")
    model.encoder.load_state_dict(encoder_state)
    out = torch.full((N, model.code_dim(32)), float("nan"))
    codes = encode_all(model, tiny, torch.device("cpu"), batch_size=7, out=out)
    assert codes is out and torch.isfinite(out).all()
    torch.testing.assert_close(out, encode_all(model, tiny, torch.device("cpu")), rtol=0, atol=0)


def test_train_run_checks_data_size_before_training(tiny, tmp_path):
    store = tmp_path / "store"
    for change, field in (({"k_neighbours": N}, "k_neighbours"), ({"n_centroids": N + 1}, "n_centroids")):
        with pytest.raises(ConfigError, match=field):
            train_run(
                tiny,
                tmp_path / "run",
                AE,
                replace(LA, **change),
                store_dir=store,
                run=RunOptions(device="cpu", progress=False),
            )
    assert not store.exists() or not any(store.iterdir())


# ---------------------------------------------------------------------------------------------- 5. configs


@pytest.mark.parametrize(
    "cls, values, field",
    [
        (LAConfig, {"temperature": 0}, "temperature"),
        (LAConfig, {"temperature": -1.0}, "temperature"),
        (LAConfig, {"temperature": float("nan")}, "temperature"),
        (LAConfig, {"temperature": "warm"}, "temperature"),  # numeric strings are numbers (YAML reads 1e-3 so)
        (LAConfig, {"temperature": float("inf")}, "temperature"),
        (LAConfig, {"mixing_rate": 0}, "mixing_rate"),
        (LAConfig, {"mixing_rate": 1.5}, "mixing_rate"),
        (LAConfig, {"k_neighbours": 0}, "k_neighbours"),
        (LAConfig, {"k_neighbours": 2.5}, "k_neighbours"),
        (LAConfig, {"n_centroids": 0}, "n_centroids"),
        (LAConfig, {"clustering_repeats": 0}, "clustering_repeats"),
        (LAConfig, {"recluster_every": -1}, "recluster_every"),
        (LAConfig, {"epochs": -1}, "epochs"),
        (LAConfig, {"epochs": True}, "epochs"),
        (LAConfig, {"batch_size": 1}, "batch_size"),
        (LAConfig, {"lr": 0}, "lr"),
        (LAConfig, {"momentum": 1.0}, "momentum"),
        (LAConfig, {"weight_decay": -0.1}, "weight_decay"),
        (LAConfig, {"schedule": "linear"}, "schedule"),
        (LAConfig, {"merger": "max"}, "merger"),
        (LAConfig, {"bank_init": "zeros"}, "bank_init"),
        (LAConfig, {"augment": "yes"}, "augment"),
        (AutoEncoderConfig, {"arch": "resnet50"}, "arch"),
        (AutoEncoderConfig, {"width": 0}, "width"),
        (AutoEncoderConfig, {"width": 0.5, "pretrained": "imagenet"}, "width"),
        (AutoEncoderConfig, {"image_size": 16}, "image_size"),
        (AutoEncoderConfig, {"pretrained": "/no/such/weights.pth"}, "pretrained"),
        (AutoEncoderConfig, {"pretrained": 5}, "pretrained"),
        (AutoEncoderConfig, {"epochs": -2}, "epochs"),
        (AutoEncoderConfig, {"schedule": "warmup"}, "schedule"),
    ],
)
def test_invalid_values_raise_naming_the_field(cls, values, field):
    with pytest.raises(ConfigError, match=rf"^{field}\b"):
        from_dict(cls, values)


def test_unknown_key_is_named_and_integral_floats_are_accepted():
    with pytest.raises(ConfigError, match="temprature"):
        from_dict(LAConfig, {"temprature": 0.1})
    with pytest.raises(ConfigError, match="k_neighbors"):
        from_dict(LAConfig, {"k_neighbors": 10})
    cfg = from_dict(LAConfig, {"k_neighbours": 10.0, "temperature": 1})
    assert cfg.k_neighbours == 10 and isinstance(cfg.k_neighbours, int) and cfg.temperature == 1
    assert issubclass(ConfigError, ValueError)
    assert replace(LA, temperature=None) == LA  # None means "not given"
    with pytest.raises(ConfigError, match="temperature"):
        replace(LA, temperature=-1.0)


def test_load_config_yaml(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("autoencoder:\n  arch: vgg11_bn\n  epochs: 3\nla:\n  temperature: 0.2\n  k_neighbours: 50\n")
    ae, la = load_config(good)
    assert (ae.arch, ae.epochs, ae.width) == ("vgg11_bn", 3, 1.0)
    assert (la.temperature, la.k_neighbours, la.n_centroids) == (0.2, 50, LAConfig().n_centroids)
    ae2, la2 = load_config(good, base=(AE, LA))  # on top of a base
    assert (ae2.width, ae2.epochs, la2.n_centroids, la2.temperature) == (0.125, 3, 5, 0.2)
    only_la = tmp_path / "la.yaml"
    only_la.write_text("la:\n  mixing_rate: 0.3\n")
    assert load_config(only_la, base=(AE, LA)) == (AE, replace(LA, mixing_rate=0.3))

    cases = {
        "typo.yaml": ("la:\n  temprature: 0.2\n", "temprature"),
        "section.yaml": ("autoencoder: {}\ntraining:\n  epochs: 3\n", "training"),
        "list.yaml": ("- la\n- autoencoder\n", "mapping"),
        "scalar_section.yaml": ("la: 5\n", "'la'"),
        "bad_value.yaml": ("la:\n  n_centroids: 0\n", "n_centroids"),
        "broken.yaml": ("la: [unclosed\n", "cannot read config"),
    }
    for name, (text, expected) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ConfigError, match=re.escape(expected)):
            load_config(tmp_path / name)
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")


def test_yaml_exponent_notation_is_a_number(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("la:\n  lr: 1e-3\n  epochs: 1e1\n")
    _, la = load_config(path)
    assert la.lr == 0.001 and la.epochs == 10


def test_unhashable_arch_raises_config_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("autoencoder:\n  arch: [vgg11_bn]\n")
    with pytest.raises(ConfigError, match="arch"):
        load_config(path)


def test_non_string_pretrained_raises_config_error():
    with pytest.raises(ConfigError, match="pretrained"):
        from_dict(AutoEncoderConfig, {"pretrained": 5})


def test_check_data_size_names_the_field():
    cfg = LAConfig(k_neighbours=10, n_centroids=5)
    cfg.check_data_size(11)  # k = N-1 and C <= N are fine
    with pytest.raises(ConfigError, match=r"^k_neighbours must be <= N-1 = 9"):
        cfg.check_data_size(10)
    with pytest.raises(ConfigError, match=r"^n_centroids must be <= N = 4"):
        LAConfig(k_neighbours=2, n_centroids=5).check_data_size(4)


def test_cli_rejects_invalid_settings_before_loading_data(tmp_path, capsys, monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("data loaded or training started despite an invalid setting")

    monkeypatch.setattr("laray.data.dataset.load_dataset", must_not_run)
    monkeypatch.setattr("laray.training.run.train_run", must_not_run)
    out = tmp_path / "X"
    assert main(["train", "--temperature", "-1", "--out", str(out)]) == 1
    stdout, stderr = capsys.readouterr()
    assert stdout == ""
    (line,) = stderr.strip().splitlines()
    assert line.startswith("laray: error: temperature must be > 0")

    config = tmp_path / "c.yaml"
    config.write_text("la:\n  mixng_rate: 0.3\n")
    assert main(["train", "--config", str(config), "--out", str(out)]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("laray: error:") and "mixng_rate" in line
    assert main(["train", "--batch-size", "1", "--out", str(out)]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "batch_size" in line
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cli_device_without_cuda_fails_in_one_line_before_anything_is_created(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LARAY_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("LARAY_DEBUG", raising=False)
    out, store = tmp_path / "out", tmp_path / "store"
    argv = ["train", "--device", "cuda", "--out", str(out), "--store", str(store)]
    assert main(argv) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("laray: error: --device cuda: this machine has no CUDA device")
    assert main(["train", "--device", "tpu:x", "--out", str(out)]) == 1
    assert "--device tpu:x: not a device name" in capsys.readouterr().err
    assert not out.exists() and not store.exists() and not (tmp_path / "cache").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("how", ["--debug after the command", "--debug before it", "LARAY_DEBUG=1"])
def test_debug_shows_the_traceback_of_an_expected_failure(tmp_path, capsys, monkeypatch, how):
    from laray.errors import LarayError

    monkeypatch.delenv("LARAY_DEBUG", raising=False)
    argv = ["train", "--device", "cuda", "--out", str(tmp_path / "out")]
    if how == "LARAY_DEBUG=1":
        monkeypatch.setenv("LARAY_DEBUG", "1")
    else:
        argv = argv + ["--debug"] if how.endswith("command") else ["--debug"] + argv
    with pytest.raises(LarayError, match="no CUDA device"):  # raised, so Python prints its traceback
        main(argv)


# ---------------------------------------------------------------------------------------------- 6. laray train


def test_train_help_exits_zero(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--help"])
    assert info.value.code == 0
    help_text = capsys.readouterr().out
    for flag in ("--out", "--store", "--resume", "--temperature", "--k-neighbours", "--ae-epochs", "--config"):
        assert flag in help_text


def test_laray_train_end_to_end_and_resume(digits, tmp_path, capsys):
    data = tmp_path / "data"
    n = 60
    for i in range(n):
        folder = data / str(digits.labels[i])
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(digits.images[i]).save(folder / f"img{i:03d}.png")
    out, store = tmp_path / "out", tmp_path / "store"
    argv = tiny_train_argv(data, out, store, tmp_path / "cache")
    assert main(argv) == 0
    stdout, _ = capsys.readouterr()
    epoch_lines = [line.split() for line in stdout.splitlines() if re.search(r"\bepoch\s+\d+\s+loss\b", line)]
    assert [words[:3] for words in epoch_lines] == [["autoencoder", "epoch", "1"], ["local_aggregation", "epoch", "1"]]
    assert "final: purity" in stdout

    for name in ("metrics.json", "assignments.csv", "codes.npy", "checkpoints/la.ckpt"):
        assert (out / name).is_file(), name
    result = json.loads((out / "metrics.json").read_text())
    table = pd.read_csv(out / "assignments.csv", dtype={"label": str})
    assert list(table.columns) == ["idx", "path", "label", "cluster"]
    assert len(table) == n and table["idx"].tolist() == list(range(n))
    species = [os.path.basename(os.path.dirname(p)) for p in table["path"]]
    assert table["label"].tolist() == species  # the species name, i.e. the sub-folder
    assert sorted(set(species)) == [str(d) for d in range(10)]
    assert table["cluster"].between(0, 9).all()
    codes = np.load(out / "codes.npy")
    assert codes.dtype == np.float32 and codes.ndim == 2 and codes.shape[0] == n
    np.testing.assert_allclose(np.linalg.norm(codes, axis=1), 1.0, rtol=1e-5)

    truth, clusters = table["label"].to_numpy(), table["cluster"].to_numpy()
    assert result["purity"] == metrics.purity(truth, clusters)
    assert result["acc"] == metrics.hungarian_accuracy(truth, clusters)
    recomputed = metrics.cluster_scores(truth, clusters)
    assert result["nmi"] == pytest.approx(recomputed["nmi"], rel=1e-12)
    assert result["ari"] == pytest.approx(recomputed["ari"], rel=1e-12)
    assert [(r["stage"], r["epoch"]) for r in result["history"]] == [("autoencoder", 1), ("local_aggregation", 1)]
    assert {k: result["history"][-1][k] for k in SCORES} == {k: result[k] for k in SCORES}
    assert result["n_images"] == n and result["n_labels"] == 10
    assert result["autoencoder"]["trained_in_this_run"] is True
    assert ae_store.trainings(store, result["autoencoder"]["key"]) == 1
    assert result["config"]["la"]["k_neighbours"] == 10 and result["config"]["autoencoder"]["width"] == 0.125
    assert load_checkpoint(out / "checkpoints" / "la.ckpt")["epoch"] == 1

    # --resume: nothing left to train, the same results.
    assert main(argv + ["--resume"]) == 0
    stdout, _ = capsys.readouterr()
    assert not re.search(r"\bepoch\s+\d+\s+loss\b", stdout)
    resumed = json.loads((out / "metrics.json").read_text())
    assert resumed["autoencoder"]["trained_in_this_run"] is False
    assert ae_store.trainings(store, result["autoencoder"]["key"]) == 1
    for name in (*SCORES, "history", "baselines", "config"):
        assert resumed[name] == result[name], name
    assert np.array_equal(np.load(out / "codes.npy"), codes)
    assert pd.read_csv(out / "assignments.csv", dtype={"label": str}).equals(table)
    assert list(result["baselines"]) == ["raw_pixels", "autoencoder"]  # no pretrained weights: no such baseline


def test_laray_train_from_pretrained_weights_writes_and_prints_the_pretrained_baseline(
    digits, vgg11_weights, tmp_path, capsys
):
    data = tmp_path / "data"
    for i in range(60):
        folder = data / str(digits.labels[i])
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(digits.images[i]).save(folder / f"img{i:03d}.png")
    out = tmp_path / "out"
    argv = tiny_train_argv(data, out, tmp_path / "store", tmp_path / "cache")
    assert main(argv + ["--width", "1.0", "--pretrained", str(vgg11_weights)]) == 0  # the last --width counts
    stdout, _ = capsys.readouterr()
    result = json.loads((out / "metrics.json").read_text())
    assert result["config"]["autoencoder"]["pretrained"] == str(vgg11_weights)
    assert list(result["baselines"]) == ["raw_pixels", "autoencoder", "pretrained"]
    pretrained = result["baselines"]["pretrained"]
    printed = "baseline pretrained: " + " ".join(f"{k} {v:.3f}" for k, v in pretrained.items())
    assert printed in stdout.splitlines()
    assert 0.1 <= pretrained["purity"] <= 1  # 10 species, K = 10: at least the largest species' share
