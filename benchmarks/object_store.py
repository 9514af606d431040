"""How much of Ray's object store holds data right now, per node, read off this machine's /proc.

Each Ray node's raylet keeps its object store in one shared-memory file (/dev/shm/plasma..., unlinked
once mapped). A tmpfs file only takes memory for pages that were written, and freed objects do not
give their pages back, so the file's allocated blocks bound from above what the node's store ever
held at once: at least its peak (here, 30 MB put, freed, then 20 MB put read 50 MB). A small reading
therefore proves a small peak. Works for every Ray node started on this machine, which is how the
benchmarks and the multi-node rehearsal run them; Linux only.
"""

from __future__ import annotations

import os
from pathlib import Path


def _raylet_pids() -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if (proc / "comm").read_text().strip() == "raylet":
                    pids.append(int(proc.name))
            except OSError:  # the process ended meanwhile
                continue
    return pids


def object_store_bytes() -> dict[int, int]:
    """{raylet pid: bytes its object store's shared-memory file has allocated}, one entry per local Ray node."""
    used = {}
    for pid in _raylet_pids():
        total = 0
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                try:
                    if os.readlink(fd).startswith("/dev/shm/plasma"):
                        total = max(total, os.stat(fd).st_blocks * 512)  # the same file may be open twice
                except OSError:
                    continue
        except OSError:
            continue
        used[pid] = total
    return used
