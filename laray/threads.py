"""How many threads torch may use: the idle cores of those this process may run on, and one for small work.

torch starts with as many threads as the machine has physical cores, whatever the process may use: under
SLURM's --cpus-per-task, taskset or a container's CPU set that oversubscribes the cores it was given. And
on a busy machine a small parallel operation spends more time in OpenMP's barriers than in its work: in a
profile of `laray analyze` beside another sweep, torch's index_add_ took 1.28 ms a call on 2 threads and
0.08 ms on 1 (benchmarks/analyze_load.py measures the command alone and on a busy machine). So `laray train`,
`analyze` and `predict` take the cores their CPU affinity grants less those the load average says others keep
busy: a lagging 1-minute average, which may leave a core unused for a minute after other work ends.
"""

from __future__ import annotations

import contextlib
import os


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, which SLURM, taskset and containers set), else all."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def idle_cores() -> int:
    """The cores this process may use less those other processes keep busy (the 1-minute load average, rounded),
    at least 1: threads beyond them would wait in OpenMP's barriers for cores that are not free."""
    return max(1, usable_cores() - round(os.getloadavg()[0]))


def size_threads(cores: int | None = None) -> int:
    """torch's threads for this process: `cores`, else the idle ones of those it may use; returns the number set."""
    import torch

    count = max(1, cores or idle_cores())
    torch.set_num_threads(count)
    return count


@contextlib.contextmanager
def threads(count: int):
    """torch on `count` threads inside the block, as before after it."""
    import torch

    before = torch.get_num_threads()
    if count == before:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
