"""Faults in what laray keeps on disk: the decode cache, the stage-1 store and its stored baselines.

Processes killed (kill -9) while decoding, while writing the store and while holding its lock;
damaged files (truncated, garbage, edited by hand); a full disk. Each is detected, warned about
once naming the file, removed and rebuilt, and the run goes on with the same data as a clean
decode or training. Images are small PNGs in tmp_path at 32 px; "models" are a few tensors, but for
the whole store entry damaged under `laray train` (a tiny VGG on 48 digits, one torch thread).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import tiny_train_argv, write_digit_folder

import laray.data.cache
import laray.training.run
from laray.checkpoint import save_atomic
from laray.cli.main import main
from laray.data.cache import decode_cached, fingerprint
from laray.data.dataset import ImageDataset, load_dataset
from laray.errors import DiskFullError, LarayError
from laray.settings.config import AutoEncoderConfig, LAConfig
from laray.training import store as ae_store
from laray.training.run import baselines_path, stored_stage1, train_run
from laray.training.stages import RunOptions
from laray.training.store import get_or_train, read_baselines

REPO = Path(__file__).resolve().parents[2]
SIZE = 32


# ----------------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[str]:
    """300 digit PNGs and one file that does not decode (so the entry holds fewer rows than paths)."""
    root = write_digit_folder(tmp_path_factory.mktemp("digits"), 300)
    (root / "digit0" / "broken.png").write_bytes(b"not a png")
    return sorted(str(p) for p in root.rglob("*.png"))


@pytest.fixture(scope="module")
def clean(images, tmp_path_factory):
    """The decode of `images` into a cache of its own: what every rebuilt entry must equal."""
    return decode_cached(images, SIZE, tmp_path_factory.mktemp("clean"), workers=1)


def _same_images(got, want) -> None:
    assert np.array_equal(np.asarray(got.images), np.asarray(want.images))
    assert got.kept.tolist() == want.kept.tolist()
    assert np.array_equal(got.original_sizes, want.original_sizes)
    assert got.failed == want.failed


def _warnings(caplog, logger: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger and r.levelno >= logging.WARNING]


def _lock_is_free(path: Path) -> bool:
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(handle, fcntl.LOCK_UN)
        return True


def _python(script: str, *args) -> subprocess.Popen:
    """A child interpreter that imports this checkout's laray."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), *map(str, args)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"the child ended (rc {proc.returncode}) before {path.name}: {proc.stderr.read()}")
        if time.time() > deadline:
            proc.kill()
            pytest.fail(f"no {path.name} after {timeout} s")
        time.sleep(0.02)


def _kill9(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


# ----------------------------------------------------------------------------------------- decode cache


def _truncate(path: Path, keep: int) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(keep)


def _halve(path: Path) -> None:
    _truncate(path, path.stat().st_size // 2)


def _edit_meta(path: Path, change) -> None:
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


CACHE_DAMAGE = {  # name: (file damaged, file the warning names, damage)
    "npy truncated to half": ("npy", "npy", _halve),
    "npy one byte short": ("npy", "npy", lambda p: _truncate(p, p.stat().st_size - 1)),
    "npy truncated inside its header": ("npy", "npy", lambda p: _truncate(p, 20)),
    "npy header garbage": ("npy", "npy", lambda p: p.write_bytes(b"\x00garbage" * 16 + p.read_bytes()[128:])),
    "npy of another shape": ("npy", "npy", lambda p: np.save(p, np.zeros((3, SIZE, SIZE, 3), np.uint8))),
    "npy of another dtype": ("npy", "npy", lambda p: np.save(p, np.zeros((301, SIZE, SIZE, 3), np.int16))),
    "npy removed": ("npy", "json", lambda p: p.unlink()),
    "json truncated": ("json", "json", _halve),
    "json garbage bytes": ("json", "json", lambda p: p.write_bytes(bytes(range(256)))),
    "json edited": ("json", "json", lambda p: _edit_meta(p, lambda m: m["kept"].reverse())),
    "json without checksum": ("json", "json", lambda p: _edit_meta(p, lambda m: m.pop("checksum"))),
    "json of a list": ("json", "json", lambda p: p.write_text("[1, 2, 3]")),
    "json removed": ("json", "npy", lambda p: p.unlink()),
}


@pytest.mark.parametrize("damage", list(CACHE_DAMAGE))
def test_damaged_cache_entry_is_rebuilt_with_one_warning(images, clean, tmp_path, caplog, damage):
    cache = tmp_path / "cache"
    first = decode_cached(images, SIZE, cache, workers=1)
    assert not first.cache_hit and len(first.kept) == 300 and len(first.failed) == 1
    damaged, named, act = CACHE_DAMAGE[damage]
    act(cache / f"{first.key}.{damaged}")

    caplog.set_level(logging.WARNING, logger="laray.data.cache")
    again = decode_cached(images, SIZE, cache, workers=1)
    said = _warnings(caplog, "laray.data.cache")
    assert len(said) == 1, said
    assert str(cache / f"{again.key}.{named}") in said[0]
    assert not again.cache_hit
    _same_images(again, clean)
    assert len((cache / "decodes.log").read_text().splitlines()) == 2
    assert not [p.name for p in cache.iterdir() if p.name.startswith(".")]  # no temporaries

    caplog.clear()
    third = decode_cached(images, SIZE, cache, workers=1)
    assert third.cache_hit and not _warnings(caplog, "laray.data.cache")
    _same_images(third, clean)


def test_verification_reads_no_pixels(images, tmp_path, caplog):
    """Pixels overwritten in place (same length) are not detected: checking is O(1), the cache may hold 41 GB."""
    cache = tmp_path / "cache"
    key = decode_cached(images, SIZE, cache, workers=1).key
    with open(cache / f"{key}.npy", "r+b") as handle:
        handle.seek((cache / f"{key}.npy").stat().st_size // 2)  # inside the kept images
        handle.write(b"\xff" * 1000)
    caplog.set_level(logging.WARNING, logger="laray.data.cache")
    assert decode_cached(images, SIZE, cache, workers=1).cache_hit and not _warnings(caplog, "laray.data.cache")


DECODER = """
    import sys, time
    from pathlib import Path
    import laray.data.cache as cache

    listing, cache_dir, marker = sys.argv[1:4]
    real, done = cache.decode_image, []

    def slow_after_100(path, size):  # then slowly, so that the kill lands mid-way
        done.append(path)
        if len(done) == 100:
            Path(marker).touch()
        if len(done) >= 100:
            time.sleep(0.05)
        return real(path, size)

    cache.decode_image = slow_after_100
    cache.decode_cached(Path(listing).read_text().splitlines(), 32, cache_dir, workers=1)
"""


def test_kill_during_decoding_leaves_no_entry(images, clean, tmp_path, caplog):
    cache, marker, listing = tmp_path / "cache", tmp_path / "decoding", tmp_path / "paths.txt"
    listing.write_text("\n".join(images))
    proc = _python(DECODER, listing, cache, marker)
    _wait_for(marker, proc)
    _kill9(proc)
    key = fingerprint(images, SIZE)
    assert list(cache.glob(f".{key}.*.npy"))  # killed mid-way: its temporary is there
    assert not (cache / f"{key}.npy").exists() and not (cache / f"{key}.json").exists()
    assert _lock_is_free(cache / f"{key}.lock")  # the kernel released the dead decoder's lock

    caplog.set_level(logging.WARNING, logger="laray.data.cache")
    fresh = decode_cached(images, SIZE, cache, workers=1)
    assert not fresh.cache_hit and not _warnings(caplog, "laray.data.cache")
    _same_images(fresh, clean)
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        [f"{key}.npy", f"{key}.json", f"{key}.lock", "decodes.log"]
    )  # the killed decode's temporary is gone
    assert len((cache / "decodes.log").read_text().splitlines()) == 1


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("where", ["open_memmap", "posix_fallocate", "metadata"])
def test_full_disk_while_writing_a_cache_entry(images, tmp_path, monkeypatch, where):
    cache = tmp_path / "cache"
    other = decode_cached(images[:20], SIZE, cache, workers=1)
    before = {p.name: p.stat().st_size for p in cache.iterdir()}
    target = {
        "open_memmap": (np.lib.format, "open_memmap"),
        "posix_fallocate": (os, "posix_fallocate"),
        "metadata": (laray.data.cache, "_write_meta"),
    }[where]
    monkeypatch.setattr(*target, _no_space)

    with pytest.raises(DiskFullError) as raised:
        decode_cached(images, SIZE, cache, workers=1)
    assert isinstance(raised.value, LarayError)
    assert str(cache) in str(raised.value) and len(str(raised.value).splitlines()) == 1
    key = fingerprint(images, SIZE)
    after = {p.name: p.stat().st_size for p in cache.iterdir()}
    assert after == {**before, f"{key}.lock": 0}  # no entry, no temporary; the other entry untouched

    monkeypatch.undo()
    again = decode_cached(images[:20], SIZE, cache, workers=1)
    assert again.cache_hit
    _same_images(again, other)
    assert not decode_cached(images, SIZE, cache, workers=1).cache_hit  # space again: decoded and kept


# ----------------------------------------------------------------------------------------- stage-1 store


def _trainer(calls: list):
    """A stand-in for stage 1: the same weights every time, and a count of the trainings."""

    def train(checkpoint):
        calls.append(checkpoint)
        return {"encoder.w": torch.arange(50_000.0), "decoder.b": torch.ones(7)}, [{"epoch": 1, "loss": 0.5}]

    return train


def _same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _flip_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


STORE_DAMAGE = {
    "truncated to half": lambda folder: _halve(folder / "autoencoder.pt"),
    "truncated to nothing": lambda folder: _truncate(folder / "autoencoder.pt", 0),
    "one byte flipped": lambda folder: _flip_middle_byte(folder / "autoencoder.pt"),  # loads, with other weights
    "garbage": lambda folder: (folder / "autoencoder.pt").write_bytes(os.urandom(4096)),
    "hash file garbage": lambda folder: (folder / "autoencoder.sha256").write_bytes(b"\xff\xfe"),
    "another pickle, hash updated": lambda folder: (
        torch.save([1, 2, 3], folder / "autoencoder.pt"),
        (folder / "autoencoder.sha256").write_text(
            hashlib.sha256((folder / "autoencoder.pt").read_bytes()).hexdigest() + "  autoencoder.pt\n"
        ),
    ),
}


@pytest.mark.parametrize("damage", list(STORE_DAMAGE))
def test_damaged_autoencoder_is_retrained_with_one_warning(tmp_path, caplog, damage):
    store, calls = tmp_path / "store", []
    state, history, trained = get_or_train(store, "k", _trainer(calls))
    assert trained and (store / "k" / "autoencoder.sha256").exists()
    stale = store / "k" / "baselines_mean_x_all.json"
    stale.write_text(json.dumps({"raw_pixels": {}, "autoencoder": {}}))
    STORE_DAMAGE[damage](store / "k")

    caplog.set_level(logging.WARNING, logger="laray.store")
    again, history2, trained2 = get_or_train(store, "k", _trainer(calls))
    said = _warnings(caplog, "laray.store")
    assert len(said) == 1 and str(store / "k" / "autoencoder.pt") in said[0], said
    assert trained2 and len(calls) == 2 and ae_store.trainings(store, "k") == 2
    _same_state(again, state)
    assert history2 == history
    assert not stale.exists()  # it scored the removed auto-encoder

    caplog.clear()
    third, _, trained3 = get_or_train(store, "k", _trainer(calls))
    assert not trained3 and len(calls) == 2 and not _warnings(caplog, "laray.store")
    _same_state(third, state)


def test_autoencoder_without_recorded_hash_is_kept_and_hashed(tmp_path, caplog):
    """Stored before hashes were recorded, or its writer killed between the two renames: it loads, so it is kept."""
    store, calls = tmp_path / "store", []
    state, _, _ = get_or_train(store, "k", _trainer(calls))
    digest = store / "k" / "autoencoder.sha256"
    digest.unlink()
    caplog.set_level(logging.WARNING, logger="laray.store")
    again, _, trained = get_or_train(store, "k", _trainer(calls))
    assert not trained and len(calls) == 1 and not _warnings(caplog, "laray.store")
    _same_state(again, state)
    assert (
        digest.read_text()
        == hashlib.sha256((store / "k" / "autoencoder.pt").read_bytes()).hexdigest() + "  autoencoder.pt\n"
    )  # sha256sum's format: `sha256sum -c autoencoder.sha256` checks it


STORE_WRITER = """
    import os, sys, time
    from pathlib import Path
    import torch
    from laray.training.store import get_or_train

    store, marker, hang_at = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    real, calls = os.fsync, []

    def fsync(fd):  # the store's writes flush before their rename: be killed there
        calls.append(fd)
        if len(calls) == hang_at:
            marker.touch()
            time.sleep(600)
        real(fd)

    os.fsync = fsync
    get_or_train(store, "k", lambda checkpoint: ({"encoder.w": torch.arange(50_000.0), "decoder.b": torch.ones(7)},
                                                [{"epoch": 1, "loss": 0.5}]))
"""


@pytest.mark.parametrize("killed_writing", ["autoencoder.pt", "autoencoder.sha256"])
def test_kill_during_the_store_write(tmp_path, caplog, killed_writing):
    store, marker, calls = tmp_path / "store", tmp_path / "writing", []
    proc = _python(STORE_WRITER, store, marker, 1 if killed_writing == "autoencoder.pt" else 2)
    _wait_for(marker, proc)
    _kill9(proc)
    folder = store / "k"
    assert list(folder.glob(f".{killed_writing}.*.tmp"))  # killed with its temporary written, not renamed
    assert not (folder / killed_writing).exists() and ae_store.trainings(store, "k") == 0
    assert _lock_is_free(folder / "lock")

    caplog.set_level(logging.WARNING, logger="laray.store")
    state, history, trained = get_or_train(store, "k", _trainer(calls))
    assert not _warnings(caplog, "laray.store")
    # killed before autoencoder.pt was in place: trained here; after: kept, its hash recorded now
    assert trained == (killed_writing == "autoencoder.pt") and len(calls) == int(trained)
    _same_state(state, _trainer([])(None)[0])
    assert (folder / "autoencoder.sha256").read_text().split()[0] == hashlib.sha256(
        (folder / "autoencoder.pt").read_bytes()
    ).hexdigest()
    assert not list(folder.glob(".*.tmp"))  # the killed writer's temporary removed under the lock


LOCK_HOLDER = """
    import sys, time
    from pathlib import Path
    from laray.training.store import get_or_train

    def train(checkpoint):  # holds the store's lock while it "trains"
        Path(sys.argv[2]).touch()
        time.sleep(600)

    get_or_train(sys.argv[1], "k", train)
"""

WAITER = """
    import json, sys
    from pathlib import Path
    import torch
    from laray.training.store import get_or_train

    store, ready, out = sys.argv[1:4]
    Path(ready).touch()
    state, history, trained = get_or_train(store, "k", lambda checkpoint: ({"w": torch.ones(3)}, [{"epoch": 1}]))
    Path(out).write_text(json.dumps({"trained": trained, "w": state["w"].tolist(), "history": history}))
"""


def test_killed_lock_holder_hands_over_to_the_waiting_process(tmp_path):
    store = tmp_path / "store"
    holder = _python(LOCK_HOLDER, store, tmp_path / "holding")
    _wait_for(tmp_path / "holding", holder)
    lock = store / "k" / "lock"
    assert not _lock_is_free(lock)

    waiter = _python(WAITER, store, tmp_path / "ready", tmp_path / "out.json")
    _wait_for(tmp_path / "ready", waiter)
    time.sleep(1.0)
    assert waiter.poll() is None  # blocked on the holder's lock
    _kill9(holder)
    _, err = waiter.communicate(timeout=60)
    assert waiter.returncode == 0, err
    got = json.loads((tmp_path / "out.json").read_text())
    assert got == {"trained": True, "w": [1.0, 1.0, 1.0], "history": [{"epoch": 1}]}
    assert ae_store.trainings(store, "k") == 1 and _lock_is_free(lock)


def test_full_disk_while_writing_the_store(tmp_path, monkeypatch):
    store, calls = tmp_path / "store", []
    monkeypatch.setattr(os, "fsync", _no_space)
    with pytest.raises(DiskFullError, match=re.escape(str(store / "k"))):
        get_or_train(store, "k", _trainer(calls))
    assert sorted(p.name for p in (store / "k").iterdir()) == ["lock"]  # no file of the auto-encoder, no temporary
    monkeypatch.undo()
    assert get_or_train(store, "k", _trainer(calls))[2] and len(calls) == 2


# ----------------------------------------------------------------------------------------- stored baselines

SCORES = {"raw_pixels": {"purity": 0.5, "nmi": 0.25}, "autoencoder": {"purity": 0.75, "nmi": 0.5}}

BASELINES_DAMAGE = {
    "truncated": _halve,
    "empty": lambda p: _truncate(p, 0),
    "garbage bytes": lambda p: p.write_bytes(bytes(range(256))),
    "a list": lambda p: p.write_text("[1, 2]"),
    "no autoencoder scores": lambda p: p.write_text(json.dumps({"raw_pixels": {"purity": 0.5}})),
}


@pytest.fixture
def fake_stage1(monkeypatch):
    """stored_stage1 with stand-ins for training and scoring; returns the list of scorings."""
    scored = []
    monkeypatch.setattr(laray.training.run, "train_autoencoder", lambda *a, **k: _trainer([])(None))

    def compute_baselines(dataset, encoder_state, ae_cfg, merger, seed, device, holdout):
        scored.append(merger)
        return json.loads(json.dumps(SCORES))

    monkeypatch.setattr(laray.training.run, "compute_baselines", compute_baselines)
    return scored


@pytest.mark.parametrize("damage", list(BASELINES_DAMAGE))
def test_damaged_baselines_are_scored_again(tmp_path, caplog, fake_stage1, damage):
    dataset, cfg, store = SimpleNamespace(fingerprint="fp", labels_key="labels"), AutoEncoderConfig(), tmp_path / "s"
    first = stored_stage1(dataset, cfg, ["mean"], 0, "cpu", store)
    assert first.baselines == {"mean": SCORES} and fake_stage1 == ["mean"]
    path = baselines_path(store, first.key, "mean", "labels")
    BASELINES_DAMAGE[damage](path)

    caplog.set_level(logging.WARNING, logger="laray.store")
    second = stored_stage1(dataset, cfg, ["mean"], 0, "cpu", store)
    said = _warnings(caplog, "laray.store")
    assert len(said) == 1 and str(path) in said[0], said
    assert second.baselines == {"mean": SCORES} and fake_stage1 == ["mean", "mean"]
    assert read_baselines(path) == SCORES  # rewritten

    caplog.clear()
    assert stored_stage1(dataset, cfg, ["mean"], 0, "cpu", store).baselines == {"mean": SCORES}
    assert fake_stage1 == ["mean", "mean"] and not _warnings(caplog, "laray.store")


def test_baselines_stored_without_the_pretrained_one_are_scored_again(tmp_path, caplog, monkeypatch):
    """A stage 1 from pretrained weights whose baselines an earlier laray stored (without "pretrained"): scored
    again, once, with a warning naming the file, rather than read back without the pretrained baseline."""
    with_pretrained = {**SCORES, "pretrained": {"purity": 0.625, "nmi": 0.375}}
    scored = []
    monkeypatch.setattr(laray.training.run, "train_autoencoder", lambda *a, **k: _trainer([])(None))

    def compute_baselines(dataset, encoder_state, ae_cfg, merger, seed, device, holdout):
        scored.append(merger)
        return json.loads(json.dumps(with_pretrained if ae_cfg.pretrained else SCORES))

    monkeypatch.setattr(laray.training.run, "compute_baselines", compute_baselines)
    weights = tmp_path / "vgg16_bn.pth"
    weights.write_bytes(b"weights")  # never loaded: the scoring is a stand-in
    dataset, store = SimpleNamespace(fingerprint="fp", labels_key="labels"), tmp_path / "s"
    cfg = AutoEncoderConfig(pretrained=str(weights))
    key = stored_stage1(dataset, cfg, ["mean"], 0, "cpu", store).key
    path = baselines_path(store, key, "mean", "labels")
    path.write_text(json.dumps(SCORES))  # as an earlier laray left it

    caplog.set_level(logging.WARNING, logger="laray.store")
    again = stored_stage1(dataset, cfg, ["mean"], 0, "cpu", store)
    said = _warnings(caplog, "laray.store")
    assert len(said) == 1 and str(path) in said[0] and "pretrained" in said[0], said
    assert again.baselines == {"mean": with_pretrained} and scored == ["mean", "mean"]
    assert read_baselines(path, ("raw_pixels", "autoencoder", "pretrained")) == with_pretrained  # rewritten

    caplog.clear()
    assert stored_stage1(dataset, cfg, ["mean"], 0, "cpu", store).baselines == {"mean": with_pretrained}
    assert scored == ["mean", "mean"] and not _warnings(caplog, "laray.store")


def test_read_baselines(tmp_path, caplog):
    path = tmp_path / "baselines_mean_x_all.json"
    assert read_baselines(path) is None  # absent: no warning
    path.write_text(json.dumps(SCORES))
    assert read_baselines(path) == SCORES
    path.write_text("{")
    caplog.set_level(logging.WARNING, logger="laray.store")
    assert read_baselines(path) is None and not path.exists()
    assert len(_warnings(caplog, "laray.store")) == 1


# ----------------------------------------------------------------------------------------- stage 1's checkpoint


def _checkpointing_trainer(calls: list):
    """_trainer that checkpoints as stage 1 does: training.ckpt and its .prev are there when it returns."""

    def train(checkpoint):
        for epoch in (1, 2):
            save_atomic({"epoch": epoch}, checkpoint)
        return _trainer(calls)(checkpoint)

    return train


def test_stage1_checkpoints_go_once_the_autoencoder_is_stored(tmp_path):
    store, calls = tmp_path / "store", []
    assert get_or_train(store, "k", _checkpointing_trainer(calls))[2] and len(calls) == 1
    assert sorted(p.name for p in (store / "k").iterdir()) == [
        "autoencoder.pt",
        "autoencoder.sha256",
        "lock",
        "trainings.log",
    ]


@pytest.mark.parametrize("hash_recorded", [True, False])
def test_checkpoints_an_older_laray_left_are_removed_without_a_warning(tmp_path, caplog, hash_recorded):
    store, calls = tmp_path / "store", []
    state, _, _ = get_or_train(store, "k", _trainer(calls))
    for epoch in (1, 2):  # what laray kept after stage 1 before it removed them
        save_atomic({"epoch": epoch, "weights": torch.ones(1000)}, store / "k" / "training.ckpt")
    if not hash_recorded:
        (store / "k" / "autoencoder.sha256").unlink()
    caplog.set_level(logging.WARNING, logger="laray")
    again, _, trained = get_or_train(store, "k", _trainer(calls))
    assert not trained and len(calls) == 1 and not _warnings(caplog, "laray.store")
    _same_state(again, state)
    assert sorted(p.name for p in (store / "k").iterdir()) == [
        "autoencoder.pt",
        "autoencoder.sha256",
        "lock",
        "trainings.log",
    ]


# ----------------------------------------------------------------------------------------- a whole entry damaged

AE = AutoEncoderConfig(arch="vgg11_bn", width=0.125, image_size=SIZE, epochs=2, batch_size=16, lr=0.05)
LA = LAConfig(epochs=0, batch_size=16, k_neighbours=10, n_centroids=5, clustering_repeats=2)


class _Killed(BaseException):
    """Stands for kill -9: nothing after it runs."""


@pytest.fixture(scope="module")
def tiny():
    d = load_dataset("digits", SIZE)
    return ImageDataset(
        np.ascontiguousarray(d.images[:48]),
        d.labels[:48],
        d.class_names,
        d.paths[:48],
        spec="digits-subset",
        fingerprint="digits-32-subset-48",
    )


def _train(dataset, store: Path, out: Path, epochs: list | None = None) -> dict:
    """`laray train` without --resume (its train_run); `epochs` gets the stage-1 epochs trained."""

    def record(r):
        if epochs is not None and r["stage"] == "autoencoder":
            epochs.append(r["epoch"])

    return train_run(
        dataset, out, AE, LA, store_dir=store, run=RunOptions(seed=0, device="cpu", callback=record, progress=False)
    )


def _kill_before_storing(monkeypatch) -> None:
    """Stage 1 killed after its last checkpoint, before autoencoder.pt is written."""

    def killed(path, data):
        raise _Killed

    monkeypatch.setattr(ae_store, "_write_atomic", killed)


@pytest.fixture(scope="module")
def entries(tiny, one_torch_thread, tmp_path_factory):
    """(key, {kind: a store entry}) for tests to copy: "interrupted" holds training.ckpt (2 epochs) and its .prev
    (1 epoch) and no autoencoder.pt; "finished" is what the next run, resuming it, left."""
    kept, store = tmp_path_factory.mktemp("entries"), tmp_path_factory.mktemp("store")
    with pytest.MonkeyPatch.context() as patch:
        _kill_before_storing(patch)
        with pytest.raises(_Killed):
            _train(tiny, store, kept / "out")
    [folder] = store.iterdir()
    assert sorted(p.name for p in folder.iterdir()) == ["lock", "training.ckpt", "training.ckpt.prev"]
    shutil.copytree(folder, kept / "interrupted")
    epochs = []
    assert _train(tiny, store, kept / "out", epochs)["autoencoder"]["trained_in_this_run"] and epochs == []
    shutil.copytree(folder, kept / "finished")
    return folder.name, {"interrupted": kept / "interrupted", "finished": kept / "finished"}


def test_a_finished_stage1_leaves_no_training_checkpoint(entries):
    _, entry = entries
    names = sorted(p.name for p in entry["finished"].iterdir())
    assert [n for n in names if not n.startswith("baselines_")] == [
        "autoencoder.pt",
        "autoencoder.sha256",
        "lock",
        "trainings.log",
    ]
    assert len(names) == 5  # and one baselines file


def _autoencoder(folder: Path) -> dict:
    return torch.load(folder / "autoencoder.pt", map_location="cpu", weights_only=True)["model"]


def _names(message: str, path: Path) -> bool:
    """Whether `message` names `path` (not only a longer path it begins: training.ckpt in training.ckpt.prev)."""
    return re.search(re.escape(str(path)) + r"(?![\w.])", message) is not None


WHOLE_ENTRY_DAMAGE = {  # name: (entry, files cut to half, stage-1 epochs trained; None: loaded from the store)
    "autoencoder.pt": ("finished", ["autoencoder.pt"], [1, 2]),
    "autoencoder.sha256": ("finished", ["autoencoder.sha256"], [1, 2]),
    "training.ckpt": ("interrupted", ["training.ckpt"], [2]),  # resumed from .prev, which holds epoch 1
    "training.ckpt.prev": ("interrupted", ["training.ckpt.prev"], []),  # training.ckpt holds both epochs
    "a baselines file": ("finished", ["baselines"], None),
    # the issue's: an older laray kept training.ckpt (without .prev, here) beside the auto-encoder
    "autoencoder.pt and a left training.ckpt": ("finished", ["autoencoder.pt", "training.ckpt"], [1, 2]),
}


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("damage", list(WHOLE_ENTRY_DAMAGE))
def test_damaged_store_entry_heals_without_resume(tiny, entries, tmp_path, caplog, capsys, damage):
    key, entry = entries
    start, cut, trained_epochs = WHOLE_ENTRY_DAMAGE[damage]
    store = tmp_path / "store"
    folder = store / key
    shutil.copytree(entry[start], folder)
    if start == "finished" and "training.ckpt" in cut:
        shutil.copy(entry["interrupted"] / "training.ckpt", folder)
        assert not (folder / "training.ckpt.prev").exists()  # as reported
    damaged = [next(folder.glob("baselines_*.json")) if name == "baselines" else folder / name for name in cut]
    for path in damaged:
        _halve(path)
    trainings = ae_store.trainings(store, key)

    caplog.set_level(logging.INFO)
    epochs = []
    first = _train(tiny, store, tmp_path / "run1", epochs)
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(said) == len(damaged), said
    for path in damaged:
        assert sum(_names(message, path) for message in said) == 1, (path, said)
    out, err = capsys.readouterr()
    assert "--resume" not in caplog.text + out + err
    assert epochs == (trained_epochs or [])
    assert first["autoencoder"]["trained_in_this_run"] == (trained_epochs is not None)
    assert ae_store.trainings(store, key) == trainings + (trained_epochs is not None)
    assert [r["epoch"] for r in first["history"] if r["stage"] == "autoencoder"] == [1, 2]
    _same_state(_autoencoder(folder), _autoencoder(entry["finished"]))  # as the undamaged entry's
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in entry["finished"].iterdir())

    caplog.clear()
    epochs.clear()
    second = _train(tiny, store, tmp_path / "run2", epochs)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING] and epochs == []
    assert second["autoencoder"] == {"key": key, "source": "store", "trained_in_this_run": False}
    assert ae_store.trainings(store, key) == trainings + (trained_epochs is not None)
    assert second["baselines"] == first["baselines"]


@pytest.mark.usefixtures("one_torch_thread")
def test_laray_train_heals_the_reported_entry(tmp_path, caplog, capsys, monkeypatch):
    """The issue's case through the command: autoencoder.pt and a left training.ckpt both cut to half, no .prev.

    Before, `laray train` without --resume stopped advising --resume, and so did every later run."""
    data = write_digit_folder(tmp_path / "data", 48)
    store = tmp_path / "store"
    argv = tiny_train_argv(data, tmp_path / "out", store, tmp_path / "cache", ae_epochs=2)
    with monkeypatch.context() as patch:  # a checkpoint as an older laray left it: stage 1 killed before storing
        _kill_before_storing(patch)
        with pytest.raises(_Killed):
            main(argv)
    [folder] = store.iterdir()
    left = (folder / "training.ckpt").read_bytes()
    assert main(argv) == 0
    (folder / "training.ckpt").write_bytes(left)
    (folder / "training.ckpt.prev").unlink(missing_ok=True)  # as reported: none beside it
    for name in ("autoencoder.pt", "training.ckpt"):
        _halve(folder / name)
    capsys.readouterr()

    caplog.set_level(logging.INFO)
    assert main(argv) == 0
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(said) == 2, said
    assert _names(said[0], folder / "autoencoder.pt") and _names(said[1], folder / "training.ckpt"), said
    out, err = capsys.readouterr()
    assert "--resume" not in caplog.text + out + err
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["autoencoder"]["trained_in_this_run"]
    assert not (folder / "training.ckpt").exists()

    caplog.clear()
    assert main(argv) == 0  # and the next run loads it
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["autoencoder"]["source"] == "store"
