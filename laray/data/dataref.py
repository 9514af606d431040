"""A data set by reference: what a trial needs to load the images on its own node, never the images.

The driver lists the files and their labels (`describe`: no decoding, one `stat` per file)
into a `DataRef`: the spec, the image size, every path with its size in bytes, the labels
and the decode-cache key. Trials on other nodes receive its `ListingDigest` instead: how to
list the data again and digests of the driver's listing, no per-file entry, so what travels
through Ray's object store does not grow with the number of images (a whole DataRef takes
80 bytes an image: 20 MB at Danish Fungi 2020 size). A node opens either with
`laray.data.dataset.open_dataset`: from a digest it lists its own files (`relist`, one `stat` per
file), refuses them where they are not the driver's, then maps the decoded images from its
own cache folder, decoding them once if that folder lacks them.
"""

from __future__ import annotations

import hashlib
import os
import socket
from dataclasses import dataclass, field, replace

import numpy as np

from laray.data.cache import file_stats, fingerprint
from laray.data.sources import DEFAULT_LABEL_COLUMN, DEFAULT_PATH_COLUMN, DataError, resolve

DIGITS = "digits"
SHOWN_DIFFERENCES = 3  # a mismatch names this many groups of files, and counts the rest
# A digest names where a node differs by group (species, or folder when unlabelled); past this
# many groups it keeps only the totals, so that it stays small whatever the data set.
MAX_GROUPS = 20_000


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
    # How the listing was made, so that a node can make it again (`relist`).
    label_column: str | None = DEFAULT_LABEL_COLUMN
    path_column: str = DEFAULT_PATH_COLUMN
    image_root: str | None = None

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

    def digest(self) -> ListingDigest:
        """What a trial on another node receives: a few hundred bytes plus ~60 per species, never per file."""
        groups = _group_digests(self)
        return ListingDigest(
            self.spec,
            self.image_size,
            self.label_column,
            self.path_column,
            self.image_root,
            len(self),
            self.key,
            _listing_digest(self),
            len(self.skipped),
            tuple(sorted(groups.items())) if len(groups) <= MAX_GROUPS else (),
        )


@dataclass(frozen=True)
class ListingDigest:
    """A DataRef without its per-file entries: how to list the data again, and digests to check a node's files by."""

    spec: str
    image_size: int
    label_column: str | None
    path_column: str
    image_root: str | None
    n: int  # images listed at the driver
    key: str  # the driver's decode-cache key, which every node's cache entry takes
    listing: str  # sha256 of the driver's ordered listing: paths, sizes, labels, class names
    n_skipped: int  # rows the driver's listing skipped
    groups: tuple[tuple[str, tuple[int, str]], ...]  # (species, or folder if unlabelled) -> (files, digest)

    def __len__(self) -> int:
        return self.n

    @property
    def decoded_bytes(self) -> int:
        return self.n * self.image_size * self.image_size * 3


def _group_of(ref: DataRef, i: int) -> str:
    label = int(ref.labels[i])
    return ref.class_names[label] if label >= 0 else os.path.dirname(ref.paths[i])


def _hash(parts) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:32]


def _listing_digest(ref: DataRef) -> str:
    return _hash(
        [
            str(ref.image_size),
            *ref.class_names,
            "|",
            *(f"{p}\t{s}\t{lab}" for p, s, lab in zip(ref.paths, ref.sizes.tolist(), ref.labels.tolist())),
        ]
    )


def _group_digests(ref: DataRef) -> dict[str, tuple[int, str]]:
    members: dict[str, list[str]] = {}
    for i, (path, size) in enumerate(zip(ref.paths, ref.sizes.tolist())):
        members.setdefault(_group_of(ref, i), []).append(f"{path}\t{size}")
    return {group: (len(files), _hash(sorted(files))) for group, files in members.items()}


def digits_key(image_size: int) -> str:
    """The embedded digits' images key: they are built, not read from files."""
    return f"digits-{image_size}"


def labels_key(images_key: str, labels: np.ndarray, class_names) -> str:
    """Identifies the images and their labels: the same files scored by another label column differ."""
    digest = hashlib.sha256(images_key.encode())
    digest.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    digest.update("\n".join(class_names).encode())
    return digest.hexdigest()[:16]


def describe(
    spec: str,
    image_size: int,
    label_column: str | None = DEFAULT_LABEL_COLUMN,
    path_column: str = DEFAULT_PATH_COLUMN,
    image_root: str | None = None,
) -> DataRef:
    """List the data set that `spec` names (see laray.data.dataset) without decoding it."""
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 1:
        raise DataError(f"image_size must be a positive integer, got {image_size!r}")
    if spec == DIGITS:
        from sklearn.datasets import load_digits

        labels = load_digits().target.astype(np.int64)
        return DataRef(
            DIGITS,
            int(image_size),
            (),
            np.zeros(0, np.int64),
            labels,
            tuple(str(c) for c in range(10)),
            digits_key(image_size),
            label_column=label_column,
            path_column=path_column,
            image_root=image_root,
        )
    # Absolute, so that a trial, which runs in its own folder, lists the same files as the driver's cwd named.
    spec = os.path.abspath(os.path.expanduser(spec))
    image_root = None if image_root is None else os.path.abspath(os.path.expanduser(image_root))
    source = resolve(spec, label_column, path_column, image_root)
    paths = tuple(os.path.abspath(p) for p in source.paths)
    stats = file_stats(list(paths))
    gone = [(p, "unreadable") for p, st in zip(paths, stats) if st is None]
    if gone:  # listed a moment ago: something removed them meanwhile
        raise DataError(f"{len(gone)} listed file(s) of {spec} cannot be read, e.g. {gone[0][0]}", gone)
    return DataRef(
        spec,
        int(image_size),
        paths,
        np.array([st[0] for st in stats], dtype=np.int64),
        source.labels,
        tuple(source.class_names),
        fingerprint(list(paths), image_size, stats),
        tuple(source.skipped),
        tuple(source.notes),
        label_column,
        path_column,
        image_root,
    )


def relist(digest: ListingDigest) -> DataRef:
    """This node's listing of the data that `digest` describes, keyed like the driver's; a DataError where they differ.

    A copy may have other modification times (rsync without -t, a fresh download); its paths,
    sizes and labels must be the driver's. The message names the groups (species, or folders
    when unlabelled) that differ, so that a user knows what to copy again.
    """
    try:
        local = describe(digest.spec, digest.image_size, digest.label_column, digest.path_column, digest.image_root)
    except DataError as exc:  # e.g. the folder is not on this node at all
        raise DataError(f"node {socket.gethostname()} cannot list the driver's data: {exc}", exc.skipped) from None
    if _listing_digest(local) != digest.listing:
        raise DataError(
            f"the files of {digest.spec} on node {socket.gethostname()} differ from the driver's listing: "
            + _differences(local, digest)
        )
    return replace(local, key=digest.key)


def _differences(local: DataRef, digest: ListingDigest) -> str:
    here, there = _group_digests(local), dict(digest.groups)
    counts = f"{len(local):,} file(s) here, {digest.n:,} at the driver"
    if local.skipped and len(local.skipped) > digest.n_skipped:
        path, reason = local.skipped[0]
        counts += f"; {len(local.skipped)} listed row(s) unusable here, e.g. {path} ({reason})"
    if not digest.groups:
        return counts
    differing = []
    for group in sorted(set(here) | set(there)):
        n_here, digest_here = here.get(group, (0, ""))
        n_there, digest_there = there.get(group, (0, ""))
        if digest_here != digest_there:
            differing.append(
                f"{group!r} ({n_here} here, {n_there} at the driver)"
                if n_here != n_there
                else f"{group!r} ({n_here} files each: other names or sizes)"
            )
    if not differing:
        return counts + "; the same files, listed in another order"
    more = len(differing) - SHOWN_DIFFERENCES
    return f"{counts}; {len(differing)} group(s) differ: {', '.join(differing[:SHOWN_DIFFERENCES])}" + (
        f" and {more} more" if more > 0 else ""
    )
