"""A data set by reference: what a trial needs to load the images on its own node, never the images.

The driver lists the files and their labels (`describe`: no decoding, one `stat` per file)
and hands trials a `DataRef`: the spec, the image size, every path with its size in bytes,
the labels and the decode-cache key. A node opens it with `laray.data.open_dataset`: it
checks that its files are the driver's (`check_files`), then maps the decoded images from
its own cache folder, decoding them once if that folder lacks them. At Danish Fungi 2020
size (276,000 files) a reference takes about 20 MB (80 bytes an image); the decoded images at 224 px take 41 GB.
"""
from __future__ import annotations

import hashlib
import os
import socket
from dataclasses import dataclass, field

import numpy as np

from laray.cache import file_stats, fingerprint
from laray.sources import DEFAULT_LABEL_COLUMN, DEFAULT_PATH_COLUMN, DataError, resolve

DIGITS = "digits"
SHOWN_DIFFERENCES = 3  # a mismatch names this many files, and counts the rest


@dataclass(frozen=True, eq=False)
class DataRef:
    spec: str
    image_size: int
    paths: tuple[str, ...]  # absolute paths as the driver listed them; () for the embedded digits
    sizes: np.ndarray  # (n,) int64 bytes of each file at the driver: a node's copy must have the same
    labels: np.ndarray  # (n,) int64, -1 when unlabelled
    class_names: tuple[str, ...]
    key: str  # the decode-cache entry: fingerprint of paths, sizes, mtimes, image size and decoder version
    skipped: tuple[tuple[str, str], ...] = ()  # listed rows that name no usable file, with the reason
    notes: tuple[str, ...] = field(default=(), compare=False)

    def __len__(self) -> int:
        """Images listed; files that then fail to decode are dropped on the node, so at most this many load."""
        return len(self.labels)

    @property
    def decoded_bytes(self) -> int:
        """What the decoded images take (in a node's cache, and what a copy through the object store would)."""
        return len(self) * self.image_size * self.image_size * 3

    @property
    def labels_key(self) -> str:
        return labels_key(self.key, self.labels, self.class_names)


def digits_key(image_size: int) -> str:
    """The embedded digits' images key: they are built, not read from files."""
    return f"digits-{image_size}"


def labels_key(images_key: str, labels: np.ndarray, class_names) -> str:
    """Identifies the images and their labels: the same files scored by another label column differ."""
    digest = hashlib.sha256(images_key.encode())
    digest.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    digest.update("\n".join(class_names).encode())
    return digest.hexdigest()[:16]


def describe(spec: str, image_size: int, label_column: str | None = DEFAULT_LABEL_COLUMN,
             path_column: str = DEFAULT_PATH_COLUMN, image_root: str | None = None) -> DataRef:
    """List the data set that `spec` names (see laray.data) without decoding it."""
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 1:
        raise DataError(f"image_size must be a positive integer, got {image_size!r}")
    if spec == DIGITS:
        from sklearn.datasets import load_digits

        labels = load_digits().target.astype(np.int64)
        return DataRef(DIGITS, int(image_size), (), np.zeros(0, np.int64), labels,
                       tuple(str(c) for c in range(10)), digits_key(image_size))
    source = resolve(spec, label_column, path_column, image_root)
    paths = tuple(os.path.abspath(p) for p in source.paths)
    stats = file_stats(list(paths))
    gone = [(p, "unreadable") for p, st in zip(paths, stats) if st is None]
    if gone:  # listed a moment ago: something removed them meanwhile
        raise DataError(f"{len(gone)} listed file(s) of {spec} cannot be read, e.g. {gone[0][0]}", gone)
    return DataRef(spec, int(image_size), paths, np.array([st[0] for st in stats], dtype=np.int64),
                   source.labels, tuple(source.class_names), fingerprint(list(paths), image_size, stats),
                   tuple(source.skipped), tuple(source.notes))


def check_files(ref: DataRef) -> None:
    """Refuse to go on where this node's files are not the driver's: a DataError naming the differences.

    A copy may have another modification time (rsync without -t, a fresh download); its size must match.
    """
    differences = []
    for path, size, st in zip(ref.paths, ref.sizes.tolist(), file_stats(list(ref.paths))):
        if st is None:
            differences.append(f"{path}: missing")
        elif st[0] != size:
            differences.append(f"{path}: {st[0]} bytes here, {size} at the driver")
    if differences:
        more = len(differences) - SHOWN_DIFFERENCES
        raise DataError(f"{len(differences)} of {len(ref.paths)} file(s) of {ref.spec} on node {socket.gethostname()} "
                        f"differ from the driver's listing: {'; '.join(differences[:SHOWN_DIFFERENCES])}"
                        + (f"; and {more} more" if more > 0 else ""))
