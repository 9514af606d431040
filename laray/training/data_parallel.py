"""One process's part of a data-parallel stage 1: which images of each batch it trains on, and the sums it shares.

Stage 1 over W processes (laray.sweep.stage1_ddp starts them with Ray Train, which sets up torch.distributed)
trains what one process would: every process draws the same seeded batches of `batch_size` images, takes
its W-th of each, and DistributedDataParallel averages the gradients, so a step's gradient is the mean
over the whole batch, and the steps per epoch and the learning-rate schedule are one process's. What
differs is batch norm: each process normalises its own part of the batch (batch_size / W images), as
DDP without SyncBatchNorm does (docs/training.md measures what that does to purity).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch


@dataclasses.dataclass(frozen=True)
class DataParallel:
    rank: int  # this process, from 0
    world: int  # processes training together
    device: torch.device = torch.device("cpu")  # this process's: NCCL all-reduces CUDA tensors only

    @property
    def chief(self) -> bool:
        """Rank 0 evaluates, writes the checkpoint and prints the lines: once, not once per process."""
        return self.rank == 0

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model whose backward all-reduces the gradients (gloo on CPUs, NCCL on GPUs)."""
        from torch.nn.parallel import DistributedDataParallel

        cuda = self.device.type == "cuda"
        return DistributedDataParallel(model, device_ids=[self.device.index] if cuda else None)

    def part(self, batches: list[np.ndarray]) -> list[np.ndarray]:
        """This process's part of each batch. A batch that would leave some process fewer than 2 images
        (batch norm needs two) is skipped by all of them alike: every process must take the same steps."""
        parts = []
        for batch in batches:
            split = np.array_split(batch, self.world)
            if min(map(len, split)) >= 2:
                parts.append(split[self.rank])
        return parts

    def sums(self, *values: float) -> list[float]:
        """Each value summed over the processes (the epoch's loss and image count)."""
        total = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(total)
        return total.cpu().tolist()
