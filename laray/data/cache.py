"""Decode a list of image files once, on all cores, into a memory-mapped uint8 cache on disk.

The cache is keyed by a fingerprint of every file's path, size and modification
time plus the image size and the decoder version, so a changed, added or removed
file gives a new key and the old entry is simply not used. Entries are written
under a temporary name and renamed into place, so an interrupted decode leaves no
half-written cache. One process decodes a key at a time (a file lock beside the
entry): on a cluster node, the node's other trials wait for it, then map the entry.
Every decode appends a line to CACHE/decodes.log, so "decoded once per node" can be checked.

An entry is verified before it is mapped, in time independent of its size: the metadata parses
and matches its own checksum, and the array's header gives the expected shape, dtype and order
for a file of exactly the expected length. An entry that fails (a truncated copy, a disk error,
a file edited by hand) is removed and decoded again, with one warning naming the file.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import socket
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from laray.data.decode import DecodeError, decode_image
from laray.errors import BadEntry, naming_full_disk
from laray.filelock import exclusive

DECODER_VERSION = 2  # bump when decode_image's output changes

log = logging.getLogger("laray.data.cache")


@dataclass
class DecodedImages:
    images: np.ndarray  # (n_ok, size, size, 3) uint8, memory-mapped
    kept: np.ndarray  # (n_ok,) positions in the input path list
    original_sizes: np.ndarray  # (n_ok, 2) width, height before resizing
    failed: list[tuple[str, str]]  # (path, reason)
    cache_hit: bool
    key: str  # fingerprint of the files and the image size


def default_cache_dir() -> Path:
    """LARAY_CACHE_DIR (set per node on a cluster: its fast local disk), else $XDG_CACHE_HOME/laray, ~/.cache/laray."""
    if os.environ.get("LARAY_CACHE_DIR"):
        return Path(os.environ["LARAY_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "laray"


def file_stats(paths: list[str]) -> list[tuple[int, int] | None]:
    """(size in bytes, modification time in ns) of each file, None where it cannot be read."""
    stats = []
    for p in paths:
        try:
            st = os.stat(p)
            stats.append((st.st_size, st.st_mtime_ns))
        except OSError:
            stats.append(None)
    return stats


def fingerprint(paths: list[str], size: int, stats: list[tuple[int, int] | None] | None = None) -> str:
    """Key of the decoded images: every file's path, size and mtime (`stats`, else read now), the size, the decoder."""
    digest = hashlib.sha256(f"laray-decoder-{DECODER_VERSION} size={size}\n".encode())
    for p, st in zip(paths, stats if stats is not None else file_stats(paths)):
        digest.update(
            (f"{os.path.abspath(p)}\tmissing\n" if st is None else f"{os.path.abspath(p)}\t{st[0]}\t{st[1]}\n").encode()
        )
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
    preallocate(out_path)
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


def preallocate(path: Path) -> None:
    """Reserve the disk blocks of the (sparse) array file now: a full disk then fails here with ENOSPC.

    Without it the disk fills while pages of the memory map are written, which the kernel
    reports as SIGBUS: the process dies without a word.
    """
    if not hasattr(os, "posix_fallocate"):
        return
    with open(path, "r+b") as handle:
        try:
            os.posix_fallocate(handle.fileno(), 0, os.fstat(handle.fileno()).st_size)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise
            # a file system that cannot preallocate: the entry is written all the same


def _checksum(meta: dict) -> str:
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()


def _write_meta(path: Path, meta: dict) -> None:
    path.write_text(json.dumps({**meta, "checksum": _checksum(meta)}))


def _verified_meta(meta_path: Path, size: int, n_paths: int) -> dict:
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as exc:  # ValueError: not JSON, or not UTF-8
        raise BadEntry(meta_path, f"unreadable metadata ({exc})") from None
    if not isinstance(meta, dict) or "checksum" not in meta:
        raise BadEntry(meta_path, "metadata without its checksum (written by an older laray?)")
    if meta.pop("checksum") != _checksum(meta):
        raise BadEntry(meta_path, "metadata does not match its checksum")
    if meta.get("size") != size or meta.get("n_paths") != n_paths:
        raise BadEntry(
            meta_path,
            f"metadata of {meta.get('n_paths')} images at {meta.get('size')} px, expected {n_paths} at {size} px",
        )
    return meta


def _verify_array(array_path: Path, meta: dict) -> None:
    """Header and length of the .npy file; its pixels are not read (the cache may hold tens of GB)."""
    expected = (meta["n_paths"], meta["size"], meta["size"], 3)
    with open(array_path, "rb") as handle:
        try:
            version = np.lib.format.read_magic(handle)
            if version == (1, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(handle)
            elif version == (2, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(handle)
            else:
                raise ValueError(f"npy format version {version}")
        except (ValueError, EOFError) as exc:
            raise BadEntry(array_path, f"unreadable array header ({exc})") from None
        if shape != expected or dtype != np.uint8 or fortran_order:
            raise BadEntry(
                array_path,
                f"array of shape {shape}, dtype {dtype}"
                f"{', Fortran order' if fortran_order else ''}; expected {expected} uint8",
            )
        length, wanted = os.fstat(handle.fileno()).st_size, handle.tell() + int(np.prod(expected))
        if length != wanted:
            raise BadEntry(array_path, f"{length} bytes where its header says {wanted} (truncated?)")


def _read_entry(array_path: Path, meta_path: Path, key: str, size: int, n_paths: int) -> DecodedImages:
    """The entry, verified then mapped; BadEntry when it fails, FileNotFoundError when a file is absent."""
    meta = _verified_meta(meta_path, size, n_paths)
    _verify_array(array_path, meta)
    images = np.load(array_path, mmap_mode="r")
    n_ok = len(meta["kept"])
    return DecodedImages(
        images[:n_ok],
        np.array(meta["kept"], dtype=np.int64),
        np.array(meta["original_sizes"], dtype=np.int64).reshape(-1, 2),
        [tuple(f) for f in meta["failed"]],
        cache_hit=True,
        key=key,
    )


def cache_folder(cache_dir: str | os.PathLike | None = None) -> Path:
    """The decode cache's folder: the one given, else this node's default."""
    return Path(cache_dir) if cache_dir is not None else default_cache_dir()


def has_entry(key: str, cache_dir: str | os.PathLike | None = None) -> bool:
    """Whether the cache holds a complete entry `key`: its meta file is written last (_decode_entry)."""
    return (cache_folder(cache_dir) / f"{key}.json").exists()


def decode_cached(
    paths: list[str],
    size: int,
    cache_dir: str | os.PathLike | None = None,
    workers: int | None = None,
    desc: str = "decoding",
    key: str | None = None,
) -> DecodedImages:
    """Decoded images of `paths` at `size`, from the cache when its entry exists, else decoded and stored.

    key: the entry's name when the caller has it already (a trial gets the driver's fingerprint),
    else the fingerprint of the files as they are now.
    """
    cache_dir = cache_folder(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = key or fingerprint(paths, size)
    array_path, meta_path = cache_dir / f"{key}.npy", cache_dir / f"{key}.json"
    try:
        return _read_entry(array_path, meta_path, key, size, len(paths))
    except (FileNotFoundError, BadEntry):
        pass  # absent, being written, or bad: judged again under the lock, where removing it is safe
    with naming_full_disk(cache_dir, f"the decoded images {key}.npy"), exclusive(cache_dir / f"{key}.lock"):
        # the node's other processes wait here, then map the entry
        try:
            return _read_entry(array_path, meta_path, key, size, len(paths))
        except FileNotFoundError:
            present, absent = (array_path, meta_path) if array_path.exists() else (meta_path, array_path)
            if present.exists():  # e.g. killed between the two renames of _decode_entry
                log.warning("decode cache entry %s: no %s beside it; removed it, decoding again", present, absent.name)
        except BadEntry as bad:
            log.warning("decode cache entry %s; removed it, decoding again", bad)
        _remove_entry(cache_dir, key)
        return _decode_entry(paths, size, cache_dir, workers, desc, key)


def _remove_entry(cache_dir: Path, key: str) -> None:
    """The entry's files and the temporaries of a decode that was killed; only the lock's holder calls this."""
    for path in [cache_dir / f"{key}.npy", cache_dir / f"{key}.json", *cache_dir.glob(f".{key}.*")]:
        path.unlink(missing_ok=True)


def _decode_entry(
    paths: list[str], size: int, cache_dir: Path, workers: int | None, desc: str, key: str
) -> DecodedImages:
    array_path, meta_path = cache_dir / f"{key}.npy", cache_dir / f"{key}.json"
    workers = workers or os.cpu_count() or 1
    began = time.perf_counter()
    fd, tmp_name = tempfile.mkstemp(dir=cache_dir, prefix=f".{key}.", suffix=".npy")
    os.close(fd)
    tmp_array = Path(tmp_name)
    os.chmod(tmp_array, 0o644)  # mkstemp makes it private; a cache shared on a cluster must be readable
    try:
        kept, originals, failed = _decode_all(paths, size, workers, tmp_array, desc)
        meta = {
            "kept": kept.tolist(),
            "original_sizes": originals.tolist(),
            "failed": failed,
            "size": size,
            "n_paths": len(paths),
        }
        tmp_meta = tmp_array.with_suffix(".json")
        _write_meta(tmp_meta, meta)
        os.replace(tmp_array, array_path)  # array first: the meta file's presence marks a complete entry
        os.replace(tmp_meta, meta_path)
        with open(cache_dir / "decodes.log", "a") as log:
            log.write(
                f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {socket.gethostname()} pid {os.getpid()} {key} "
                f"{len(kept)} images {time.perf_counter() - began:.1f} s\n"
            )
    finally:
        for leftover in (tmp_array, tmp_array.with_suffix(".json")):
            leftover.unlink(missing_ok=True)
    images = np.load(array_path, mmap_mode="r")
    return DecodedImages(images[: len(kept)], kept, originals, failed, cache_hit=False, key=key)
