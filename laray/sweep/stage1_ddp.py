"""Stage 1 over several workers at once: a Ray Train TorchTrainer (DDP), before the search, as a plain run.

Each worker opens the data set from its reference on its own node (that node's decode cache, as a trial
does) and trains its part of every batch (laray.training.data_parallel); the global batch and the
learning-rate schedule are one worker's. The chief reports a checkpoint every epoch into the run's
folder, STORAGE/NAME/autoencoders/KEY/ddp/ (the sweep's storage, which every node can write), beside the
store entry it becomes: a worker that dies is replaced and the group resumes from the last epoch
(FailureConfig), and a driver stopped and started again (--resume) resumes from it too, since Ray Train
(V2) restores a run of the same name and storage. What comes back is the last checkpoint, from which
read_checkpoint gives the state_dict and history one process's stage 1 returns, kept in the store like any
other.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from laray.data.dataset import ListingDigest
from laray.settings.config import AutoEncoderConfig

RUN_NAME = "ddp"  # STORE/KEY/ddp: Ray Train's folder of the run, checkpoints included
CHECKPOINT_FILE = "training.ckpt"
MAX_FAILURES = 2  # worker groups restarted after a worker dies, before the stage fails


def _worker(config: dict) -> None:
    """One worker's stage 1 (Ray Train's train_loop_per_worker)."""
    import logging

    import ray.train
    import ray.train.torch
    import torch

    from laray.data.dataset import open_dataset
    from laray.training.data_parallel import DataParallel
    from laray.training.epoch_progress import stage1_epoch_line
    from laray.training.stages import RunOptions, pretrain_autoencoder

    # "Reporting training result N: TrainingReport(...)" from every worker, each epoch: laray's line says it once.
    # Ray Train logs it under its module's file path, outside "ray.train", so LoggingConfig does not reach it.
    try:
        from ray.train.v2._internal.execution import context as train_context

        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    except ImportError:  # another Ray: its lines show, nothing else changes
        pass
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(config["threads"])
    device = ray.train.torch.get_device() if config["device"] == "cuda" else torch.device("cpu")
    parallel = DataParallel(rank, world, device)
    dataset = open_dataset(config["data"], config["cache_dir"])
    tag = f"stage 1 ({world} workers, seed {config['seed']})"

    with tempfile.TemporaryDirectory() as folder:
        local = Path(folder) / CHECKPOINT_FILE
        restored = ray.train.get_checkpoint()
        if restored is not None:  # a new worker group, or a new driver: from the last epoch reported
            with restored.as_directory() as saved:
                shutil.copyfile(Path(saved) / CHECKPOINT_FILE, local)

        def report(record: dict) -> None:  # every worker reports each epoch (Ray Train waits for all)
            if not parallel.chief:
                ray.train.report({"epoch": record["epoch"]})
                return
            print(stage1_epoch_line(tag, record), flush=True)
            with tempfile.TemporaryDirectory() as publish:
                os.link(local, Path(publish) / CHECKPOINT_FILE)  # local is replaced by a rename, never rewritten
                ray.train.report(
                    {k: v for k, v in record.items() if isinstance(v, (int, float))},
                    checkpoint=ray.train.Checkpoint.from_directory(publish),
                )

        run = RunOptions(
            seed=config["seed"],
            device=str(device),
            resume=restored is not None,
            callback=report,
            progress=False,
            on_progress=(lambda line: print(f"{tag}: {line}", flush=True)) if parallel.chief else None,
            progress_s=config["progress_s"],
            data_parallel=parallel,
        )
        pretrain_autoencoder(dataset, config["ae_cfg"], run, local)


def train_stage1_ddp(
    data: ListingDigest,
    ae_cfg: AutoEncoderConfig,
    seed: int,
    workers: int,
    resources: dict,
    device: str,
    threads: int,
    cache_dir: str | None,
    run_folder: str,
    progress_s: float | None = None,
) -> "Checkpoint":  # noqa: F821 (ray.train's, imported when it runs)
    """The last checkpoint of stage 1 trained by `workers` DDP workers (read_checkpoint reads it).

    resources: what each worker asks for ({"cpu": c, "gpu": g}, a trial's). run_folder: where Ray Train keeps
    the run (STORAGE/NAME/autoencoders/KEY, a folder or a cloud URI every worker can write, as the sweep's
    storage is); a run found there is resumed from its last checkpoint.
    """
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from laray.errors import LarayError

    cuda = device == "cuda" or resources["gpu"] > 0
    trainer = TorchTrainer(
        _worker,
        train_loop_config={
            "data": data,
            "ae_cfg": ae_cfg,
            "seed": seed,
            "device": "cuda" if cuda else "cpu",
            "threads": threads,
            "cache_dir": cache_dir,
            "progress_s": progress_s,
        },
        torch_config=TorchConfig(backend="nccl" if cuda else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=workers,
            use_gpu=cuda,
            resources_per_worker={"CPU": resources["cpu"], **({"GPU": resources["gpu"]} if cuda else {})},
        ),
        run_config=RunConfig(
            name=RUN_NAME,
            storage_path=str(run_folder),
            failure_config=FailureConfig(max_failures=MAX_FAILURES),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            # its INFO lines (resources requested, the worker group started, each report) say what laray's do
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )
    result = trainer.fit()
    if result.error is not None or result.checkpoint is None:
        raise LarayError(f"stage 1 on {workers} workers failed: {result.error or 'no checkpoint reported'}")
    return result.checkpoint


def read_checkpoint(checkpoint) -> tuple[dict, list]:
    """(auto-encoder state_dict, stage-1 history) from a Ray Train checkpoint of stage 1, on any node."""
    import torch

    with checkpoint.as_directory() as folder:
        state = torch.load(Path(folder) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    return state["model"], state["history"]


def drop_run(run_folder: str) -> None:
    """Ray Train's folder of a stage 1 now stored (a local folder or a cloud URI): its checkpoints are twice the
    weights' size."""
    import pyarrow.fs

    if "://" in run_folder and not run_folder.startswith("file://"):
        filesystem, path = pyarrow.fs.FileSystem.from_uri(run_folder)
    else:
        filesystem, path = pyarrow.fs.LocalFileSystem(), str(Path(run_folder.removeprefix("file://")).resolve())
    try:
        filesystem.delete_dir(f"{path}/{RUN_NAME}")
    except (FileNotFoundError, OSError):  # none there: stage 1 trained in one task, or stored before
        pass


def stage1_workers(requested: int | None, cpus: float, gpus: float) -> int:
    """How many workers train stage 1: those asked for, else every GPU the cluster offers now (in a trial's share,
    `gpus` each), 1 without GPUs. More than the cluster's nodes together can hold is refused in one line:
    Ray Train would wait forever for them (unless an autoscaler adds nodes: then nothing is checked)."""
    import ray

    from laray.errors import SweepError
    from laray.sweep.ray_setup import autoscaling

    total = ray.cluster_resources()
    if requested is None:
        return max(1, int(total.get("GPU", 0) // gpus)) if gpus > 0 else 1
    if not autoscaling():
        for key, each in (("CPU", cpus), ("GPU", gpus)):
            if each > 0 and requested * each > total.get(key, 0):
                raise SweepError(
                    f"--stage1-workers {requested}: {requested} workers of {each:g} {key} each need "
                    f"{requested * each:g} {key}s and this Ray cluster has {total.get(key, 0):g}"
                )
    return requested
