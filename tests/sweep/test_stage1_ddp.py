"""Stage 1 on 2 data-parallel workers (Ray Train's TorchTrainer over gloo on this CPU).

One run of 2 workers, one of whom is killed (SIGKILL) in its second epoch: the group restarts and resumes
from the last epoch's checkpoint. It is compared with the same stage 1 on one process, and found again in
its folder by a second call (a driver started again), which trains nothing.
"""

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_digit_folder

from laray.data.dataset import describe, open_dataset
from laray.settings.config import AutoEncoderConfig
from laray.training.data_parallel import DataParallel
from laray.training.stages import RunOptions, pretrain_autoencoder

N, EPOCHS, SEED = 600, 6, 0
CFG = AutoEncoderConfig(arch="vgg11_bn", width=0.125, image_size=32, epochs=EPOCHS, batch_size=32)
# 2 workers' stage 1 against one process's, same seed: what benchmarks/stage1_workers.py measured the
# difference to be on this data (docs/training.md), with room for a tiny model on 600 images.
LOSS_TOLERANCE = 0.25  # relative, per epoch
PURITY_TOLERANCE = 0.15


def test_each_worker_takes_its_part_of_every_batch_and_all_skip_the_same_ones():
    batches = [np.arange(0, 8), np.arange(8, 11), np.arange(11, 15)]  # 8, 3 and 4 images
    parts = [DataParallel(rank, 2).part(batches) for rank in (0, 1)]
    # the 3-image batch would leave one worker a single image (batch norm needs 2): both skip it
    assert [p.tolist() for p in parts[0]] == [[0, 1, 2, 3], [11, 12]]
    assert [p.tolist() for p in parts[1]] == [[4, 5, 6, 7], [13, 14]]
    assert DataParallel(0, 2).chief and not DataParallel(1, 2).chief


def _workers_of_this_session() -> list[int]:
    """Ray Train workers started by this test session's Ray (their environment holds its cache folder)."""
    mine = f"LARAY_CACHE_DIR={os.environ['LARAY_CACHE_DIR']}".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if (proc / "cmdline").read_bytes().startswith(b"ray::RayTrainWorker") and mine in (
                proc / "environ"
            ).read_bytes().split(b"\0"):
                pids.append(int(proc.name))
        except (OSError, ValueError):
            continue
    return pids


def _registered_history(run: Path) -> list | None:
    """The history in the latest checkpoint that Ray Train has registered (what a restarted group resumes from)."""
    try:
        snapshot = json.loads((run / "ddp" / "checkpoint_manager_snapshot.json").read_text())
        name = snapshot["latest_checkpoint_result"]["checkpoint_dir_name"]
        return torch.load(run / "ddp" / name / "training.ckpt", map_location="cpu", weights_only=True)["history"]
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, EOFError):
        return None  # none yet, or being written: look again


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return describe(str(write_digit_folder(tmp_path_factory.mktemp("digits"), N)), CFG.image_size)


@pytest.fixture(scope="module")
def killed_run(ray_session, data, tmp_path_factory):
    from laray.sweep.stage1_ddp import read_checkpoint, train_stage1_ddp

    folder = tmp_path_factory.mktemp("stage1_run")
    outcome = {}

    def train():
        try:
            outcome["result"] = read_checkpoint(
                train_stage1_ddp(data.digest(), CFG, SEED, 2, {"cpu": 1, "gpu": 0}, "cpu", 1, None, str(folder))
            )
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=train, daemon=True)
    thread.start()
    deadline, first = time.monotonic() + 300, None
    while first is None:
        assert thread.is_alive(), outcome
        assert time.monotonic() < deadline, "no checkpoint after 300 s"
        time.sleep(0.05)
        first = _registered_history(folder)
    workers = _workers_of_this_session()
    assert len(workers) == 2, workers
    os.kill(workers[-1], signal.SIGKILL)  # mid-epoch, most likely the second: the first's checkpoint is registered
    thread.join(300)
    assert not thread.is_alive() and "error" not in outcome, outcome
    return {"folder": folder, "first": first, "killed": workers[-1], "result": outcome["result"]}


def test_a_killed_worker_is_replaced_and_the_group_resumes_from_the_last_epoch(killed_run):
    state, history = killed_run["result"]
    assert [r["epoch"] for r in history] == list(range(1, EPOCHS + 1))
    assert all(r["workers"] == 2 for r in history)
    # the epochs in the checkpoint registered before the kill, timings included: resumed, not trained again
    assert killed_run["first"] and history[: len(killed_run["first"])] == killed_run["first"]
    assert not Path(f"/proc/{killed_run['killed']}").exists()
    assert {k.split(".")[0] for k in state} == {"encoder", "decoder"}


def test_two_workers_train_what_one_process_would(killed_run, data, one_torch_thread):
    _, two = killed_run["result"]
    _, one = pretrain_autoencoder(open_dataset(data.digest()), CFG, RunOptions(seed=SEED, device="cpu", progress=False))
    for a, b in zip(one, two):
        assert abs(b["loss"] - a["loss"]) / a["loss"] < LOSS_TOLERANCE, (one, two)
    assert [r["loss"] for r in two] == sorted((r["loss"] for r in two), reverse=True)  # it learns, epoch by epoch
    assert abs(two[-1]["purity"] - one[-1]["purity"]) < PURITY_TOLERANCE
    assert [r["lr"] for r in two] == [r["lr"] for r in one]  # one worker's schedule


def test_a_run_found_in_its_folder_is_resumed_not_trained_again(killed_run, data):
    """A driver started again (--resume) calls it with the same folder: Ray Train restores the finished run."""
    from laray.sweep.stage1_ddp import read_checkpoint, train_stage1_ddp

    again = read_checkpoint(
        train_stage1_ddp(data.digest(), CFG, SEED, 2, {"cpu": 1, "gpu": 0}, "cpu", 1, None, str(killed_run["folder"]))
    )
    assert again[1] == killed_run["result"][1]  # the same records, timings included
    assert all(torch.equal(again[0][k], v) for k, v in killed_run["result"][0].items())


@pytest.mark.slow  # 60 s; tests/integration/test_multinode.py sweeps with 2 stage-1 workers by default
def test_a_sweep_with_two_stage1_workers_trains_stage1_data_parallel_and_completes(ray_session, data, tmp_path, capsys):
    """The search's stage 1 on 2 workers, and the confirmation's one seed on both too (its layout's choice)."""
    from laray.settings.space import parse_space
    from laray.sweep.driver import SweepRun, TrialResources, run_sweep

    space = parse_space(
        {
            "num_samples": 2,
            "max_concurrent": 2,
            "confirm_top": 1,
            "confirm_seeds": 1,
            "fixed": {"autoencoder": {**vars(CFG), "epochs": 2}, "la": {"epochs": 1, "batch_size": 32}},
            "search": {"temperature": {"loguniform": [0.05, 0.5]}},
            "recipe": {"temperature": 0.1},
        }
    )
    result = run_sweep(
        data,
        space,
        run=SweepRun(str(tmp_path), "ddp", seed=SEED, verbose=1),
        trial=TrialResources(cpus=1, device="cpu", stage1_workers=2),
    )
    out = capsys.readouterr().out
    assert f"stage 1 on 2 workers (data-parallel, Ray Train), seed {SEED}" in out
    assert (
        "[confirm] 2 configuration(s), the recipe among them, with seeds [1]; first stage 1 for each seed "
        "(2 workers each, 1 at a time)" in out
    )
    assert result.n_trials == 2 and result.n_errored == 0 and result.recipe is not None
    entries = sorted((tmp_path / "ddp" / "autoencoders").glob("*/autoencoder.pt"))
    assert len(entries) == 2  # the search's seed and the confirmation's
    for entry in entries:
        history = torch.load(entry, map_location="cpu", weights_only=True)["history"]
        assert [(r["epoch"], r["workers"]) for r in history] == [(1, 2), (2, 2)]
        assert not (entry.parent / "ddp").exists()  # Ray Train's run folder goes once stage 1 is stored
        assert len((entry.parent / "trainings.log").read_text().splitlines()) == 1


def _space_with_workers(workers):
    from laray.settings.space import parse_space

    raw = {"fixed": {"autoencoder": vars(CFG)}, "search": {"temperature": {"loguniform": [0.05, 0.5]}}}
    return parse_space({**raw, **({} if workers == "absent" else {"stage1_workers": workers})})


def test_a_space_names_its_stage1_workers_or_leaves_them_to_the_cluster():
    from laray.settings.space import SpaceError

    assert _space_with_workers(3).stage1_workers == 3
    assert _space_with_workers(None).stage1_workers is None
    assert _space_with_workers("absent").stage1_workers is None
    for bad in (0, -2, 1.5, True, "all"):
        with pytest.raises(SpaceError, match=r"^stage1_workers must be an integer >= 1 \(null: every GPU\), got "):
            _space_with_workers(bad)


def test_more_stage1_workers_than_the_cluster_holds_are_refused_in_one_line(ray_session):
    from laray.errors import SweepError
    from laray.sweep.stage1_ddp import stage1_workers

    assert stage1_workers(None, 1, 0) == 1  # no GPUs: one worker
    assert stage1_workers(2, 1, 0) == 2
    with pytest.raises(SweepError) as refused:
        stage1_workers(3, 1, 0)  # the session's Ray has 2 CPUs
    assert str(refused.value) == ("--stage1-workers 3: 3 workers of 1 CPU each need 3 CPUs and this Ray cluster has 2")
    assert "\n" not in str(refused.value)
