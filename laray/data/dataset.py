"""Species-labelled image sets: one string names a data set everywhere.

    digits           scikit-learn's bundled 8x8 digits (1,797 images, 10 labels), upscaled to RGB
    a folder         one sub-folder per species, images inside (nested deeper allowed)
    a CSV file       a path column and a label column, as the Danish Fungi 2020 metadata

`load_dataset` returns an `ImageDataset` whose items are
`{"image": float (3, H, W) normalised with ImageNet statistics, "idx": int, "label": int}`.
Images are decoded once into a uint8 cache; bad files are skipped with one warning
naming each of them (or, with strict=True, refused with a DataError listing them).
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from laray.checkpoint import write_atomic
from laray.data.augment import augment_batch
from laray.data.cache import decode_cached, default_cache_dir
from laray.data.dataref import DIGITS, DataRef, ListingDigest, describe, digits_key, relist
from laray.data.dataref import labels_key as labels_key_of
from laray.data.sources import DEFAULT_LABEL_COLUMN, DEFAULT_PATH_COLUMN, DataError
from laray.errors import DataWarning

__all__ = [
    "DataError",
    "DataRef",
    "ImageDataset",
    "ListingDigest",
    "describe",
    "load_dataset",
    "open_dataset",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]

log = logging.getLogger("laray.data.dataset")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def standardize(images01: torch.Tensor) -> torch.Tensor:
    """float images in [0, 1] (..., 3, H, W) -> ImageNet-normalised, in place."""
    std = torch.tensor(IMAGENET_STD, device=images01.device, dtype=images01.dtype).view(3, 1, 1)
    mean = torch.tensor(IMAGENET_MEAN, device=images01.device, dtype=images01.dtype).view(3, 1, 1)
    return images01.sub_(mean).div_(std)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (..., 3, H, W) -> float, ImageNet-normalised. Works on a batch, on any device, in any memory format."""
    return standardize(images.float().div_(255.0))


def model_batch(
    images: torch.Tensor, device: torch.device, channels_last: bool = False, transform=None
) -> torch.Tensor:
    """uint8 (b, 3, H, W) from the cache -> device -> [0, 1] -> `transform` (augmentation) -> normalised.

    non_blocking: from pinned memory (laray.data.prefetch pins on CUDA) the copy overlaps with the GPU's
    work; from pageable memory it is a plain copy.
    """
    x = images.to(device, non_blocking=True).float().div_(255.0)
    if transform is not None:
        x = transform(x)
    x = standardize(x)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()


class ImageDataset(Dataset):
    """Decoded images (uint8, N x H x W x 3, often memory-mapped) with their labels and sources."""

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        class_names: list[str],
        paths: list[str],
        skipped: list[tuple[str, str]] | None = None,
        original_sizes: np.ndarray | None = None,
        augment: bool = False,
        spec: str = "",
        fingerprint: str = "",
        labels_key: str | None = None,
    ):
        if len(images) != len(labels) or len(images) != len(paths):
            raise ValueError(
                f"images ({len(images)}), labels ({len(labels)}) and paths ({len(paths)}) differ in length"
            )
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        self.class_names = list(class_names)
        self.paths = list(paths)
        self.skipped = list(skipped or [])
        self.original_sizes = original_sizes
        self.image_size = images.shape[1]
        self.spec = spec
        self.fingerprint = fingerprint  # identifies the decoded images: keys the reuse of a trained auto-encoder
        self.augment = augment  # per-item random crop, flip and colour jitter (laray.data.augment), for training
        # Keys the baselines computed for these labels; open_dataset passes its reference's (the listing's).
        self.labels_key = labels_key or labels_key_of(fingerprint, self.labels, self.class_names)
        self.decoded_here = False  # whether loading it decoded the images (else: mapped from the cache, or built)

    @property
    def labelled(self) -> bool:
        return bool(self.class_names)

    def __len__(self) -> int:
        return len(self.images)

    def uint8_batch(self, indices) -> torch.Tensor:
        """uint8 (b, 3, H, W) images (channels-last in memory) for a batch of indices.

        The fast path for training: read uint8 from the cache and normalise on the device.
        """
        return torch.from_numpy(self.images[np.asarray(indices)]).permute(0, 3, 1, 2)

    def __getitem__(self, idx: int) -> dict:
        image = torch.from_numpy(np.array(self.images[idx])).permute(2, 0, 1).float().div_(255.0)  # (3, H, W)
        if self.augment:
            image = augment_batch(image[None], torch.default_generator)[0]
        return {"image": standardize(image), "idx": int(idx), "label": int(self.labels[idx])}

    def summary(self) -> str:
        return f"{len(self)} images loaded, {len(self.skipped)} skipped, {len(self.class_names)} labels"


def _digits(image_size: int) -> ImageDataset:
    """scikit-learn's bundled 8x8 digits, 0..16 grey levels, upscaled to RGB uint8."""
    from PIL import Image
    from sklearn.datasets import load_digits

    bunch = load_digits()
    grey = (bunch.images * (255.0 / 16.0)).round().astype(np.uint8)  # (1797, 8, 8)
    images = np.empty((len(grey), image_size, image_size, 3), dtype=np.uint8)
    for i, g in enumerate(grey):
        images[i] = np.asarray(Image.fromarray(g).resize((image_size, image_size), Image.Resampling.BILINEAR))[
            ..., None
        ]
    paths = [f"digits:{i}" for i in range(len(grey))]
    return ImageDataset(
        images,
        bunch.target.astype(np.int64),
        [str(c) for c in range(10)],
        paths,
        original_sizes=np.full((len(grey), 2), 8),
        spec="digits",
        fingerprint=digits_key(image_size),
    )


def _listing(items: list[tuple[str, str]]) -> str:
    return "\n".join(f"  {path}: {reason}" for path, reason in items)


SKIPPED_SHOWN = 3  # bad files named in the warning; all of them go to a file beside the decode cache


def _skipped_summary(ref: DataRef, skipped: list[tuple[str, str]], total: int, cache_dir) -> str:
    """One warning for any number of bad files: the count, the first few, and the file that lists them all."""
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    listing = folder / f"skipped-{ref.key[:16]}.txt"
    text = "".join(f"{path}\t{reason}\n" for path, reason in skipped)
    try:
        write_atomic(listing, lambda f: f.write(text.encode()))
        where = f"all of them in {listing}"
    except OSError:  # a read-only cache folder: the summary still stands
        where = f"all of them: laray data check {ref.spec}"
    shown = _listing(skipped[:SKIPPED_SHOWN])
    more = f"\n  ... and {len(skipped) - SKIPPED_SHOWN} more" if len(skipped) > SKIPPED_SHOWN else ""
    return f"{ref.spec}: skipped {len(skipped)} of {total} file(s) ({where}):\n{shown}{more}"


def load_dataset(
    spec: str,
    image_size: int,
    label_column: str | None = DEFAULT_LABEL_COLUMN,
    path_column: str = DEFAULT_PATH_COLUMN,
    image_root: str | None = None,
    strict: bool = False,
    cache_dir: str | os.PathLike | None = None,
    augment: bool | None = None,
    workers: int | None = None,
) -> ImageDataset:
    """Load the data set that `spec` names (see the module docstring), decoded at `image_size` pixels square.

    label_column: the CSV column holding the label; when it is the default ("species") and
    absent, or None, the data loads unlabelled (labels -1, class_names []).
    """
    ref = describe(spec, image_size, label_column, path_column, image_root)
    for note in ref.notes:
        log.warning(note)
    return open_dataset(ref, cache_dir, strict=strict, augment=augment, workers=workers)


def open_dataset(
    ref: DataRef | ListingDigest,
    cache_dir: str | os.PathLike | None = None,
    strict: bool = False,
    augment: bool | None = None,
    workers: int | None = None,
) -> ImageDataset:
    """The images that `ref` lists, mapped from `cache_dir` (decoded there first if absent, once per folder).

    On a cluster node this is where a trial gets its data, from the driver's `ListingDigest`: the
    node lists its files again and they must be the driver's (else a DataError naming the
    differences); the cache folder is the node's own unless told otherwise.
    """
    if isinstance(ref, ListingDigest):
        ref = relist(ref)
    if ref.spec == DIGITS:
        dataset = _digits(ref.image_size)
        dataset.augment = bool(augment)
        log.info("digits: %s", dataset.summary())
        return dataset
    decoded = decode_cached(
        list(ref.paths), ref.image_size, cache_dir, workers, key=ref.key, desc=f"decoding {os.path.basename(ref.spec)}"
    )
    skipped = list(ref.skipped) + decoded.failed
    if strict and skipped:
        raise DataError(f"{len(skipped)} unusable file(s) in {ref.spec} (strict mode):\n{_listing(skipped)}", skipped)
    if len(decoded.kept) == 0:
        raise DataError(
            f"no usable image in {ref.spec}: all {len(skipped)} file(s) failed:\n{_listing(skipped)}", skipped
        )
    labels = ref.labels[decoded.kept]
    dataset = ImageDataset(
        decoded.images,
        labels,
        list(ref.class_names),
        [ref.paths[i] for i in decoded.kept],
        skipped,
        decoded.original_sizes,
        augment=bool(augment),
        spec=ref.spec,
        fingerprint=ref.key,
        labels_key=ref.labels_key,
    )
    dataset.decoded_here = not decoded.cache_hit
    if dataset.class_names:
        # A species whose every image failed keeps its index so labels stay stable; say so.
        present = set(np.unique(labels).tolist())
        empty = [name for i, name in enumerate(dataset.class_names) if i not in present]
        if empty:
            log.warning("labels with no usable image: %s", ", ".join(empty))
    if skipped:
        warnings.warn(_skipped_summary(ref, skipped, len(skipped) + len(dataset), cache_dir), DataWarning, stacklevel=2)
    log.info("%s: %s%s", ref.spec, dataset.summary(), " (from cache)" if decoded.cache_hit else "")
    return dataset
