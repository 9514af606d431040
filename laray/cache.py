"""Decode a list of image files once, on all cores, into a memory-mapped uint8 cache on disk.

The cache is keyed by a fingerprint of every file's path, size and modification
time plus the image size and the decoder version, so a changed, added or removed
file gives a new key and the old entry is simply not used. Entries are written
under a temporary name and renamed into place, so an interrupted decode leaves no
half-written cache and two processes decoding at once do not clash.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from laray.decode import DecodeError, decode_image

DECODER_VERSION = 2  # bump when decode_image's output changes


@dataclass
class DecodedImages:
    images: np.ndarray  # (n_ok, size, size, 3) uint8, memory-mapped
    kept: np.ndarray  # (n_ok,) positions in the input path list
    original_sizes: np.ndarray  # (n_ok, 2) width, height before resizing
    failed: list[tuple[str, str]]  # (path, reason)
    cache_hit: bool
    key: str  # fingerprint of the files and the image size


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "laray"


def fingerprint(paths: list[str], size: int) -> str:
    digest = hashlib.sha256(f"laray-decoder-{DECODER_VERSION} size={size}\n".encode())
    for p in paths:
        try:
            st = os.stat(p)
            digest.update(f"{os.path.abspath(p)}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{os.path.abspath(p)}\tmissing\n".encode())
    return digest.hexdigest()[:32]


def _decode_one(args: tuple[str, int]):
    path, size = args
    try:
        array, original = decode_image(path, size)
        return array, original, None
    except DecodeError as exc:
        return None, None, str(exc)


def _decode_all(paths: list[str], size: int, workers: int, out_path: Path, desc: str):
    """Decode into a memmap at out_path; returns (kept, original sizes, failed)."""
    images = np.lib.format.open_memmap(out_path, mode="w+", dtype=np.uint8, shape=(len(paths), size, size, 3))
    kept, originals, failed = [], [], []
    jobs = [(p, size) for p in paths]
    bar = tqdm(total=len(paths), desc=desc, unit="img", disable=None)
    if workers > 1 and len(paths) > 1:
        pool = ProcessPoolExecutor(workers)
        results = pool.map(_decode_one, jobs, chunksize=max(1, min(64, len(paths) // (4 * workers))))
    else:
        pool, results = None, map(_decode_one, jobs)
    try:
        for i, (array, original, error) in enumerate(results):
            if error is None:
                images[len(kept)] = array  # packed: row j holds paths[kept[j]]
                kept.append(i)
                originals.append(original)
            else:
                failed.append((paths[i], error))
            bar.update()
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    images.flush()
    del images
    return np.array(kept, dtype=np.int64), np.array(originals, dtype=np.int64).reshape(-1, 2), failed


def decode_cached(paths: list[str], size: int, cache_dir: str | os.PathLike | None = None,
                  workers: int | None = None, desc: str = "decoding") -> DecodedImages:
    """Decoded images of `paths` at `size`, from the cache when its entry exists, else decoded and stored."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = fingerprint(paths, size)
    array_path, meta_path = cache_dir / f"{key}.npy", cache_dir / f"{key}.json"
    if array_path.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        images = np.load(array_path, mmap_mode="r")
        n_ok = len(meta["kept"])
        return DecodedImages(images[:n_ok], np.array(meta["kept"], dtype=np.int64),
                             np.array(meta["original_sizes"], dtype=np.int64).reshape(-1, 2),
                             [tuple(f) for f in meta["failed"]], cache_hit=True, key=key)

    workers = workers or os.cpu_count() or 1
    fd, tmp_name = tempfile.mkstemp(dir=cache_dir, prefix=f".{key}.", suffix=".npy")
    os.close(fd)
    tmp_array = Path(tmp_name)
    os.chmod(tmp_array, 0o644)  # mkstemp makes it private; a cache shared on a cluster must be readable
    try:
        kept, originals, failed = _decode_all(paths, size, workers, tmp_array, desc)
        meta = {"kept": kept.tolist(), "original_sizes": originals.tolist(), "failed": failed, "size": size,
                "n_paths": len(paths)}
        tmp_meta = tmp_array.with_suffix(".json")
        tmp_meta.write_text(json.dumps(meta))
        os.replace(tmp_array, array_path)  # array first: the meta file's presence marks a complete entry
        os.replace(tmp_meta, meta_path)
    finally:
        for leftover in (tmp_array, tmp_array.with_suffix(".json")):
            leftover.unlink(missing_ok=True)
    images = np.load(array_path, mmap_mode="r")
    return DecodedImages(images[:len(kept)], kept, originals, failed, cache_hit=False, key=key)
