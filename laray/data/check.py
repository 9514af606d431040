"""Validate a data set before anything trains: decode every image, count, and list the bad files.

`check_dataset` returns a JSON-serialisable report; `format_report` renders it for people.
"""

from __future__ import annotations

import os
import warnings

import numpy as np

from laray.data.dataset import DataWarning, load_dataset
from laray.data.sources import DEFAULT_LABEL_COLUMN, DEFAULT_PATH_COLUMN, DataError

__all__ = ["check_dataset", "format_report"]


def _size_stats(original_sizes: np.ndarray) -> dict:
    """min / median / max of the original widths and heights."""
    sizes = np.asarray(original_sizes).reshape(-1, 2)
    return {
        axis: {"min": int(sizes[:, i].min()), "median": float(np.median(sizes[:, i])), "max": int(sizes[:, i].max())}
        for i, axis in enumerate(("width", "height"))
    }


def check_dataset(
    spec: str,
    image_size: int = 64,
    label_column: str | None = DEFAULT_LABEL_COLUMN,
    path_column: str = DEFAULT_PATH_COLUMN,
    image_root: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    workers: int | None = None,
) -> dict:
    """Decode every image of `spec` at `image_size` and report counts, original sizes and bad files.

    Never raises DataError: an unusable data set gives usable=False and a one-line "reason".
    """
    report = {
        "spec": spec,
        "image_size": image_size,
        "usable": True,
        "reason": None,
        "labelled": False,
        "n_images": 0,
        "n_skipped": 0,
        "per_label": {},
        "image_sizes": None,
        "bad_files": [],
    }
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DataWarning)  # the report lists the skipped files itself
            dataset = load_dataset(
                spec,
                image_size,
                label_column=label_column,
                path_column=path_column,
                image_root=image_root,
                strict=False,
                cache_dir=cache_dir,
                workers=workers,
            )
    except DataError as exc:
        bad = exc.skipped  # every bad file, though the message names only the first few dozen
        report.update(
            usable=False,
            reason=str(exc).splitlines()[0].rstrip(":"),
            n_skipped=len(bad),
            bad_files=[{"path": p, "reason": r} for p, r in bad],
        )
        return report

    counts = np.bincount(dataset.labels, minlength=len(dataset.class_names)) if dataset.labelled else []
    report.update(
        labelled=dataset.labelled,
        n_images=len(dataset),
        n_skipped=len(dataset.skipped),
        # Every label, including one whose images all failed (count 0): that is worth seeing.
        per_label={name: int(counts[i]) for i, name in sorted(enumerate(dataset.class_names), key=lambda t: t[1])},
        image_sizes=_size_stats(dataset.original_sizes),
        bad_files=[{"path": p, "reason": r} for p, r in dataset.skipped],
    )
    return report


def _table(header: tuple[str, ...], rows: list[tuple], right: tuple[bool, ...]) -> list[str]:
    """Plain aligned columns, two-space indent; `right` marks numeric columns."""
    cells = [tuple(str(c) for c in header)] + [tuple(str(c) for c in row) for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for row in cells:
        parts = [c.rjust(w) if r else c.ljust(w) for c, w, r in zip(row, widths, right)]
        lines.append(("  " + "  ".join(parts)).rstrip())
    return lines


def format_report(report: dict) -> str:
    """The report as text: images per label, original sizes, and every bad file with its reason."""
    status = "usable" if report["usable"] else f"NOT usable: {report['reason']}"
    labels = f"{len(report['per_label'])} labels" if report["labelled"] else "unlabelled"
    lines = [f"{report['spec']}: {status}"]
    if report["usable"]:
        lines.append(f"{report['n_images']} images loaded, {report['n_skipped']} bad file(s) skipped, {labels}")
    if report["per_label"]:
        rows = list(report["per_label"].items()) + [("total", report["n_images"])]
        lines += ["", "images per label"] + _table(("label", "images"), rows, (False, True))
    if report["image_sizes"]:
        rows = [(axis, s["min"], f"{s['median']:g}", s["max"]) for axis, s in report["image_sizes"].items()]
        lines += ["", "original image size (pixels)"] + _table(
            ("", "min", "median", "max"), rows, (False, True, True, True)
        )
    if report["bad_files"]:
        rows = [(b["path"], b["reason"]) for b in report["bad_files"]]
        lines += ["", f"bad files ({len(rows)})"] + _table(("path", "reason"), rows, (False, False))
    return "\n".join(lines)
