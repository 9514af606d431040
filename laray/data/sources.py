"""Turn a data spec (a folder or a CSV file) into the list of image files and their labels.

Nothing is decoded here; files that cannot be used (a CSV row whose file does not
exist, a row without a path) are returned as `skipped` with a reason, so that the
caller reports them together with the files that fail to decode.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from laray.data.decode import IMAGE_EXTENSIONS
from laray.errors import DataError

DEFAULT_LABEL_COLUMN = "species"
DEFAULT_PATH_COLUMN = "image_path"


@dataclass
class Source:
    paths: list[str]
    labels: np.ndarray  # (n,) int64, -1 when unlabelled
    class_names: list[str]  # index = label; [] when unlabelled
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    notes: list[str] = field(default_factory=list)  # things the user should hear about, e.g. "no species column"


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _encode(names: list[str]) -> tuple[np.ndarray, list[str]]:
    class_names = sorted(set(names))
    lookup = {name: i for i, name in enumerate(class_names)}
    return np.array([lookup[n] for n in names], dtype=np.int64), class_names


def from_folder(root: Path) -> Source:
    """One sub-folder per species (images nested deeper count), or a flat folder of unlabelled images."""
    # Hidden files and folders (.thumbs/, .DS_Store...) are never species or images.
    files = sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and _is_image(p) and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if not files:
        raise DataError(f"no image files ({' '.join(IMAGE_EXTENSIONS)}) under {root}")
    at_root = [p for p in files if p.parent == root]
    nested = [p for p in files if p.parent != root]
    if not nested:
        return Source(
            [str(p) for p in at_root],
            np.full(len(at_root), -1, dtype=np.int64),
            [],
            notes=[f"{root} has no species sub-folders: loading {len(at_root)} images unlabelled"],
        )
    names = [p.relative_to(root).parts[0] for p in nested]
    labels, class_names = _encode(names)
    skipped = [(str(p), "not inside a species sub-folder") for p in at_root]
    return Source([str(p) for p in nested], labels, class_names, skipped)


def from_csv(csv_path: Path, label_column: str | None, path_column: str, image_root: str | None) -> Source:
    """One row per image; relative paths resolve against `image_root`, else the CSV's own folder."""
    import pandas as pd

    try:
        table = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except Exception as exc:  # pandas' parser errors are long; keep the first line
        raise DataError(f"cannot read CSV {csv_path}: {str(exc).splitlines()[0]}") from None
    columns = list(table.columns)
    if path_column not in columns:
        raise DataError(f"CSV {csv_path} has no path column {path_column!r}; its columns: {columns}")
    notes = []
    if label_column is not None and label_column not in columns:
        if label_column != DEFAULT_LABEL_COLUMN:
            raise DataError(f"CSV {csv_path} has no label column {label_column!r}; its columns: {columns}")
        notes.append(f"CSV {csv_path} has no {label_column!r} column: loading unlabelled")
        label_column = None
    if table.empty:
        raise DataError(f"CSV {csv_path} has no rows")

    base = Path(image_root) if image_root is not None else csv_path.parent
    paths, names, skipped = [], [], []
    label_values = table[label_column] if label_column is not None else [""] * len(table)
    for row_number, (rel, name) in enumerate(zip(table[path_column], label_values), start=2):  # line 1: header
        rel, name = rel.strip(), name.strip()
        if not rel:
            skipped.append((f"{csv_path}:{row_number}", f"empty {path_column!r}"))
            continue
        full = str(base / os.path.expanduser(rel))
        if not os.path.isfile(full):
            skipped.append((full, f"file not found (CSV line {row_number})"))
            continue
        if label_column is not None:
            if not name:
                skipped.append((full, f"empty {label_column!r} (CSV line {row_number})"))
                continue
            names.append(name)
        paths.append(full)
    if label_column is None:
        return Source(paths, np.full(len(paths), -1, dtype=np.int64), [], skipped, notes)
    labels, class_names = _encode(names)
    return Source(paths, labels, class_names, skipped, notes)


def resolve(
    spec: str,
    label_column: str | None = DEFAULT_LABEL_COLUMN,
    path_column: str = DEFAULT_PATH_COLUMN,
    image_root: str | None = None,
) -> Source:
    """A folder or a CSV file; anything else is a DataError naming the spec."""
    path = Path(os.path.expanduser(spec))
    if path.is_dir():
        return from_folder(path)
    if path.is_file() and path.suffix.lower() == ".csv":
        return from_csv(path, label_column, path_column, image_root)
    if path.is_file():
        raise DataError(f"data spec {spec!r} is a file but not a .csv")
    raise DataError(f"data spec {spec!r} is neither 'digits', a folder, nor a CSV file")
