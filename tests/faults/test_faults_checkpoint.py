"""Checkpoints and outputs under faults: a kill during a write, a torn checkpoint, a full disk.

Every save keeps the checkpoint it replaces (NAME.prev); resuming falls back to it with a
warning naming both files, and stops with one line when neither reads. A full disk (ENOSPC,
injected by monkeypatching) stops the run with a DiskFullError naming the folder, and every
earlier file stays byte-identical. Tiny models on a few digits, one torch thread.
"""

import errno
import io
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import tiny_train_argv
from PIL import Image

from laray.checkpoint import (
    REQUIRED_KEYS,
    CheckpointError,
    checkpoint_exists,
    checkpoint_problem,
    load_checkpoint,
    load_with_fallback,
    previous_path,
    save_atomic,
)
from laray.cli.main import main
from laray.data.dataset import ImageDataset, load_dataset
from laray.errors import DiskFullError, LarayError
from laray.settings.config import AutoEncoderConfig, LAConfig, replace
from laray.training.run import Stage1, train_run, write_assignments, write_codes, write_json
from laray.training.stages import RunOptions, finetune_la, pretrain_autoencoder

N = 48
AE = AutoEncoderConfig(arch="vgg11_bn", width=0.125, image_size=32, epochs=1, batch_size=16, lr=0.05)
LA = LAConfig(epochs=2, batch_size=16, lr=0.01, k_neighbours=10, n_centroids=5, clustering_repeats=2, augment=True)
LA_KEYS = (*REQUIRED_KEYS, "la")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def enospc():
    return OSError(errno.ENOSPC, "No space left on device")


def full_disk(*args, **kwargs):
    raise enospc()


def files(folder):
    """Every file under `folder` with its bytes: what 'intact' compares."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def truncate(path, size):
    with open(path, "r+b") as handle:
        handle.truncate(size)


@pytest.fixture(scope="module")
def tiny():
    d = load_dataset("digits", 32)
    return ImageDataset(
        np.ascontiguousarray(d.images[:N]),
        d.labels[:N],
        d.class_names,
        d.paths[:N],
        spec="digits-subset",
        fingerprint="digits-32-subset",
    )


@pytest.fixture(scope="module")
def encoder_state(tiny):
    model, _ = pretrain_autoencoder(tiny, AE, run=RunOptions(seed=0, device="cpu", progress=False))
    return {k[len("encoder.") :]: v.clone() for k, v in model.state_dict().items() if k.startswith("encoder.")}


@pytest.fixture(scope="module")
def straight(tiny, encoder_state, tmp_path_factory):
    """Two LA epochs uninterrupted: (result, its folder holding la.ckpt at epoch 2 and la.ckpt.prev at epoch 1)."""
    folder = tmp_path_factory.mktemp("straight")
    result = finetune_la(
        tiny, encoder_state, AE, LA, checkpoint=folder / "la.ckpt", run=RunOptions(seed=5, device="cpu", progress=False)
    )
    return result, folder


# ---------------------------------------------------------------------------------------------- kept checkpoint


def test_each_save_keeps_the_one_before(tmp_path):
    path = tmp_path / "la.ckpt"
    for epoch in (1, 2, 3):
        save_atomic({"epoch": epoch}, path)
    assert load_checkpoint(path, ("epoch",))["epoch"] == 3
    assert load_checkpoint(previous_path(path), ("epoch",))["epoch"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["la.ckpt", "la.ckpt.prev"]


def test_straight_run_leaves_the_last_two_epochs(straight):
    _, folder = straight
    assert load_checkpoint(folder / "la.ckpt", LA_KEYS)["epoch"] == 2
    assert load_checkpoint(folder / "la.ckpt.prev", LA_KEYS)["epoch"] == 1


# ---------------------------------------------------------------------------------------------- kill -9

WRITER = textwrap.dedent("""
    import sys, torch
    from laray.checkpoint import checkpoint_exists, load_with_fallback, save_atomic
    path = sys.argv[1]
    epoch = load_with_fallback(path, required=("epoch",))["epoch"] if checkpoint_exists(path) else 0
    weights = torch.arange(2_000_000, dtype=torch.float32)  # 8 MB: a save lasts long enough to be cut
    while True:
        epoch += 1
        save_atomic({"epoch": epoch, "weights": weights + epoch}, path)
        print(epoch, flush=True)
""")


def test_kill_9_while_saving_leaves_a_checkpoint_that_loads_and_resumes(tmp_path):
    """A process saving in a loop (resuming from the last checkpoint) is killed -9 three times at various moments."""
    path = tmp_path / "la.ckpt"
    for delay in (0.0, 0.03, 0.07):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        first = proc.stdout.readline()
        second = proc.stdout.readline()  # two saves done: a .prev exists
        assert second, proc.stderr.read()
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        rest, _ = proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGKILL
        last = int((first + second + rest).split()[-1])  # the last save that printed; one more may have finished
        state = load_with_fallback(path, required=("epoch",))
        assert state["epoch"] in (last, last + 1)
        assert torch.equal(state["weights"], torch.arange(2_000_000, dtype=torch.float32) + state["epoch"])
        if path.exists():  # not killed between the two renames: both load strictly
            assert load_checkpoint(path, ("epoch",))["epoch"] == state["epoch"]
            assert load_checkpoint(previous_path(path), ("epoch",))["epoch"] == state["epoch"] - 1
    save_atomic({"epoch": 0}, path)  # the next save clears what the killed ones left half-written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["la.ckpt", "la.ckpt.prev"]


class Killed(BaseException):
    """Stands for kill -9: nothing after it runs (the temporary file is left too; see the test above)."""


def test_kill_between_the_two_renames_leaves_the_previous_one_to_resume_from(tmp_path, monkeypatch, caplog):
    path = tmp_path / "la.ckpt"
    save_atomic({"epoch": 1}, path)
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the old checkpoint is now .prev, the new one not yet in place
            raise Killed
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(Killed):
        save_atomic({"epoch": 2}, path)
    monkeypatch.undo()
    assert not path.exists() and checkpoint_exists(path)
    with caplog.at_level(logging.WARNING, logger="laray.checkpoint"):
        assert load_with_fallback(path, ("epoch",))["epoch"] == 1
    assert str(path) in caplog.text and "missing" in caplog.text and str(previous_path(path)) in caplog.text


# ---------------------------------------------------------------------------------------------- unreadable


CORRUPTIONS = {
    "empty": lambda path: truncate(path, 0),
    "first 10 bytes": lambda path: truncate(path, 10),
    "half": lambda path: truncate(path, path.stat().st_size // 2),
    "all but the last byte": lambda path: truncate(path, path.stat().st_size - 1),
    "not a checkpoint": lambda path: path.write_bytes(b"\x00garbage" * 100),
    "pickle, not weights": lambda path: torch.save({"epoch": 9, "code": print}, path),
}


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=list(CORRUPTIONS))
def test_unreadable_checkpoint_falls_back_with_a_warning_naming_both(tmp_path, caplog, corrupt):
    path = tmp_path / "la.ckpt"
    weights = torch.arange(100_000, dtype=torch.float32)
    for epoch in (1, 2):
        save_atomic({"epoch": epoch, "weights": weights}, path)
    CORRUPTIONS[corrupt](path)
    with caplog.at_level(logging.WARNING, logger="laray.checkpoint"):
        state = load_with_fallback(path, ("epoch",))
    assert state["epoch"] == 1 and torch.equal(state["weights"], weights)
    [record] = [r for r in caplog.records if r.name == "laray.checkpoint"]
    assert record.levelno == logging.WARNING
    assert str(path) in record.getMessage() and str(previous_path(path)) in record.getMessage()
    assert "unreadable" in record.getMessage()


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=list(CORRUPTIONS))
def test_checkpoint_problem_says_in_one_line_what_is_wrong(tmp_path, corrupt):
    """What the stage-1 store asks of a training checkpoint before it resumes from it."""
    path = tmp_path / "training.ckpt"
    save_atomic({"epoch": 1, "weights": torch.ones(1000)}, path)
    assert checkpoint_problem(path, ("epoch", "weights")) is None
    assert checkpoint_problem(path, ("epoch", "model")) == "not a laray checkpoint of this stage"
    CORRUPTIONS[corrupt](path)
    problem = checkpoint_problem(path, ("epoch",))
    assert problem.startswith("unreadable (") and "\n" not in problem, problem


@pytest.mark.parametrize("damage", ["truncated", "only .prev left", "garbage"])
def test_resume_after_damage_continues_from_the_previous_epoch_exactly(
    tiny, encoder_state, straight, tmp_path, caplog, damage
):
    """la.ckpt (epoch 2) torn or gone: resuming loads la.ckpt.prev (epoch 1), trains epoch 2 again, as straight."""
    expected, folder = straight
    for name in ("la.ckpt", "la.ckpt.prev"):
        shutil.copy(folder / name, tmp_path / name)
    ckpt = tmp_path / "la.ckpt"
    if damage == "truncated":
        truncate(ckpt, ckpt.stat().st_size // 3)
    elif damage == "garbage":
        ckpt.write_bytes(bytes(range(256)) * 16)
    else:
        ckpt.unlink()
    received = []
    with caplog.at_level(logging.WARNING, logger="laray.checkpoint"):
        result = finetune_la(
            tiny,
            encoder_state,
            AE,
            LA,
            checkpoint=ckpt,
            run=RunOptions(seed=5, device="cpu", resume=True, callback=received.append, progress=False),
        )
    assert str(ckpt) in caplog.text and str(previous_path(ckpt)) in caplog.text
    assert [r["epoch"] for r in received] == [2]
    for name, value in expected.encoder.state_dict().items():
        assert torch.equal(result.encoder.state_dict()[name], value), name
    assert torch.equal(result.codes, expected.codes)
    assert load_checkpoint(ckpt, LA_KEYS)["epoch"] == 2  # written again, whole


@pytest.mark.parametrize("prev", ["truncated", "missing"])
def test_nothing_readable_stops_with_one_line_naming_the_file(tiny, encoder_state, straight, tmp_path, prev):
    _, folder = straight
    ckpt = tmp_path / "la.ckpt"
    shutil.copy(folder / "la.ckpt", ckpt)
    truncate(ckpt, 100)
    if prev == "truncated":
        shutil.copy(folder / "la.ckpt.prev", previous_path(ckpt))
        truncate(previous_path(ckpt), 1000)
    with pytest.raises(CheckpointError) as caught:
        finetune_la(
            tiny,
            encoder_state,
            AE,
            LA,
            checkpoint=ckpt,
            run=RunOptions(seed=5, device="cpu", resume=True, progress=False),
        )
    message = str(caught.value)
    assert isinstance(caught.value, LarayError) and "\n" not in message
    assert str(ckpt) in message and "la.ckpt.prev is " + ("unreadable" if prev == "truncated" else "missing") in message
    assert f"delete {ckpt}" in message and "without --resume" in message
    assert (str(previous_path(ckpt)) in message) == (prev == "truncated")  # only what exists is to delete


def test_another_config_is_still_refused_not_fallen_back(tiny, encoder_state, straight, tmp_path):
    _, folder = straight
    for name in ("la.ckpt", "la.ckpt.prev"):
        shutil.copy(folder / name, tmp_path / name)
    with pytest.raises(CheckpointError, match="another config"):
        finetune_la(
            tiny,
            encoder_state,
            AE,
            replace(LA, temperature=0.5),
            checkpoint=tmp_path / "la.ckpt",
            run=RunOptions(seed=5, device="cpu", resume=True, progress=False),
        )


def test_laray_train_resume_on_a_truncated_checkpoint(tmp_path, caplog):
    """The issue's case: a torn checkpoints/la.ckpt, then `laray train --resume`: the run ends, from the one before."""
    digits = load_dataset("digits", 32)
    data = tmp_path / "data"
    for i in range(N):
        folder = data / str(digits.labels[i])
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(digits.images[i]).save(folder / f"img{i:03d}.png")
    out = tmp_path / "out"
    argv = tiny_train_argv(data, out, tmp_path / "store", tmp_path / "cache", la_epochs=2)
    assert main(argv) == 0
    codes = np.load(out / "codes.npy")
    ckpt = out / "checkpoints" / "la.ckpt"
    truncate(ckpt, ckpt.stat().st_size // 2)
    with caplog.at_level(logging.WARNING, logger="laray.checkpoint"):
        assert main(argv + ["--resume"]) == 0
    assert str(ckpt) in caplog.text and str(previous_path(ckpt)) in caplog.text
    assert load_checkpoint(ckpt, LA_KEYS)["epoch"] == 2
    assert np.array_equal(np.load(out / "codes.npy"), codes)  # epoch 2 again, the same


# ---------------------------------------------------------------------------------------------- full disk


def torn_torch_save(obj, file):
    file.write(b"the first bytes of a checkpoint")
    raise enospc()


@pytest.mark.parametrize("where", ["torch.save", "fsync"])
def test_full_disk_while_saving_names_the_folder_and_keeps_both_checkpoints(tmp_path, monkeypatch, where):
    folder = tmp_path / "checkpoints"
    path = folder / "la.ckpt"
    for epoch in (1, 2):
        save_atomic({"epoch": epoch, "weights": torch.ones(1000) * epoch}, path)
    before = files(folder)
    if where == "torch.save":
        monkeypatch.setattr(torch, "save", torn_torch_save)
    else:
        monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(DiskFullError) as caught:
        save_atomic({"epoch": 3, "weights": torch.ones(1000) * 3}, path)
    monkeypatch.undo()
    assert isinstance(caught.value, LarayError) and "\n" not in str(caught.value)
    assert str(folder) in str(caught.value) and "la.ckpt" in str(caught.value)
    assert files(folder) == before  # the same two files, byte for byte, and no temporary one


OUTPUTS = {
    "metrics.json": lambda out, dataset: write_json(out / "metrics.json", {"purity": 0.5, "history": [1, 2]}),
    "assignments.csv": lambda out, dataset: write_assignments(out / "assignments.csv", dataset, np.arange(N) % 3),
    "codes.npy": lambda out, dataset: write_codes(out / "codes.npy", torch.nn.functional.normalize(torch.randn(N, 8))),
}


def torn_np_save(file, array, *args, **kwargs):
    file.write(b"\x93NUMPY half")
    raise enospc()


def torn_to_csv(self, file, *args, **kwargs):
    file.write(b"idx,path,la")
    raise enospc()


@pytest.mark.parametrize(
    "name, where", [(name, "fsync") for name in OUTPUTS] + [("codes.npy", "writer"), ("assignments.csv", "writer")]
)
def test_full_disk_while_writing_an_output_names_the_folder_and_keeps_the_files(
    tiny, tmp_path, monkeypatch, name, where
):
    out = tmp_path / "out"
    out.mkdir()
    for write in OUTPUTS.values():
        write(out, tiny)
    before = files(out)
    if where == "fsync":
        monkeypatch.setattr(os, "fsync", full_disk)
    elif name == "codes.npy":
        monkeypatch.setattr(np, "save", torn_np_save)
    else:
        monkeypatch.setattr(pd.DataFrame, "to_csv", torn_to_csv)
    with pytest.raises(DiskFullError) as caught:
        OUTPUTS[name](out, tiny)
    monkeypatch.undo()
    assert str(out) in str(caught.value) and name in str(caught.value) and "\n" not in str(caught.value)
    assert files(out) == before


class AlmostFullDisk(io.FileIO):
    """A file with `room` bytes left on its disk: a short write, then ENOSPC, as the kernel does."""

    def __init__(self, file, room: int):
        super().__init__(file, "wb")
        self.room = room

    def write(self, data):
        if self.room == 0:
            raise enospc()
        data = memoryview(data).cast("B")[: self.room]
        self.room -= len(data)
        return super().write(data)


@pytest.mark.parametrize("room", ["none", "100 bytes", "half the file"])
@pytest.mark.parametrize("name", ["la.ckpt", "codes.npy", "assignments.csv", "metrics.json"])
def test_enospc_is_recognised_whatever_the_library_makes_of_it(tiny, tmp_path, monkeypatch, name, room):
    """torch's writer turns a short write then ENOSPC into a RuntimeError, numpy's into an OSError without errno."""
    writes = {
        **OUTPUTS,
        "la.ckpt": lambda out, dataset: save_atomic({"weights": torch.ones(100_000)}, out / "la.ckpt"),
        "codes.npy": lambda out, dataset: write_codes(out / "codes.npy", torch.ones(N, 1000)),
        "metrics.json": lambda out, dataset: write_json(out / "metrics.json", {"history": list(range(9999))}),
    }
    out = tmp_path / "out"
    out.mkdir()
    for write in writes.values():
        write(out, tiny)
    before = files(out)
    left = {"none": 0, "100 bytes": 100, "half the file": len(before[name]) // 2}[room]
    monkeypatch.setattr(
        "laray.checkpoint.open", lambda file, mode: io.BufferedWriter(AlmostFullDisk(file, left)), raising=False
    )
    with pytest.raises(DiskFullError) as caught:
        writes[name](out, tiny)
    monkeypatch.undo()
    assert str(out) in str(caught.value) and name in str(caught.value)
    assert files(out) == before


def test_full_disk_mid_run_stops_naming_the_folder_then_resumes(tiny, encoder_state, straight, tmp_path, monkeypatch):
    """train_run (the code of `laray train` and of a sweep's trial): the disk fills while saving LA epoch 2."""
    out = tmp_path / "out"
    stage1 = Stage1("key", encoder_state, [], {"mean": {}})
    before = {}

    def fill_the_disk_after_epoch_1(record):
        if record["epoch"] == 1:
            before.update(files(out))
            monkeypatch.setattr(torch, "save", torn_torch_save)

    with pytest.raises(DiskFullError) as caught:
        train_run(
            tiny,
            out,
            AE,
            LA,
            stage1=stage1,
            run=RunOptions(seed=5, device="cpu", callback=fill_the_disk_after_epoch_1, progress=False),
        )
    monkeypatch.undo()
    assert str(out / "checkpoints") in str(caught.value)
    assert sorted(before) == ["assignments.csv", "checkpoints/la.ckpt", "codes.npy", "metrics.json"]
    assert files(out) == before  # epoch 1's checkpoint and outputs, byte for byte

    # Space freed: the same run with resume ends as the uninterrupted one.
    metrics = train_run(
        tiny, out, AE, LA, stage1=stage1, run=RunOptions(seed=5, device="cpu", resume=True, progress=False)
    )
    assert [r["epoch"] for r in metrics["history"]] == [1, 2]
    assert np.array_equal(np.load(out / "codes.npy"), straight[0].codes.numpy())
