"""The report's pictures: plain arrays and DataFrames in, one PNG file out.

Charts use matplotlib's object-oriented API on an Agg canvas, so importing this
module changes no global backend and never opens a window. The cluster montage
is drawn with numpy and PIL instead, so that every tile sits at a pixel box the
caller is told about and a test can check what each tile shows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image, ImageDraw, ImageFont

from laray.scoring.metrics import contingency

DPI = 100
LOG_SPAN = 20  # a parameter whose positive values span more than this factor gets a log axis
MAX_PANELS_PER_ROW = 5
ANNOTATE_MAX = 15  # write counts in the contingency cells up to this many rows and columns


# ---------------------------------------------------------------- matplotlib helpers


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)  # attaches itself to fig; no pyplot, so no figure is ever left open
    return fig


def _save(fig: Figure, path) -> Path:
    path = Path(path)
    fig.savefig(path, format="png")
    return path


def _message_png(path, text: str) -> Path:
    """A small PNG that says why there is no chart, so the report never has a hole."""
    fig = _figure(6, 2)
    fig.text(0.5, 0.5, text, ha="center", va="center", fontsize=13)
    return _save(fig, path)


# ---------------------------------------------------------------- sweep charts


def _use_log(x: np.ndarray) -> bool:
    """Log axis when all values are positive and span more than LOG_SPAN (temperature, k)."""
    return len(x) > 0 and bool(np.all(x > 0)) and x.max() / x.min() > LOG_SPAN


def plot_objective_vs_params(trials: pd.DataFrame, params: list[str], objective: str, path) -> Path:
    """One scatter panel per parameter: each finished trial's objective against its value.

    Trials that ASHA stopped early (a `stopped_early` column) are drawn hollow: their score is
    from fewer epochs than the others' and is not comparable with them.
    """
    if len(trials) == 0 or not params:
        return _message_png(path, "no finished trials")
    missing = [c for c in [objective, *params] if c not in trials.columns]
    if missing:
        raise ValueError(f"trials have no column(s) {missing}; columns are {list(trials.columns)}")
    y_all = pd.to_numeric(trials[objective], errors="coerce").to_numpy(dtype=float)
    finished = np.isfinite(y_all)
    stopped_all = (
        trials["stopped_early"].fillna(False).to_numpy(dtype=bool)
        if "stopped_early" in trials
        else np.zeros(len(trials), dtype=bool)
    )
    panels = []  # (name, x, y, stopped, numeric) for each parameter
    for name in params:
        col = trials[name]
        if pd.api.types.is_numeric_dtype(col):
            x = col.to_numpy(dtype=float)
            keep = finished & np.isfinite(x)
            panels.append((name, x[keep], y_all[keep], stopped_all[keep], True))
        else:  # categorical choice: matplotlib places the strings at category positions
            keep = finished & col.notna().to_numpy()
            panels.append((name, col[keep].astype(str).to_numpy(), y_all[keep], stopped_all[keep], False))
    if not any(len(x) for _, x, _, _, _ in panels):
        return _message_png(path, "no finished trials")

    ncols = min(MAX_PANELS_PER_ROW, len(params))
    nrows = math.ceil(len(params) / ncols)
    fig = _figure(3.2 * ncols, 3.0 * nrows + 0.5)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (name, x, y, stopped, numeric) in zip(axes, panels):
        if len(x):
            ax.scatter(x[~stopped], y[~stopped], s=18, alpha=0.7, label="ran every epoch")
            if stopped.any():
                ax.scatter(
                    x[stopped], y[stopped], s=18, facecolors="none", edgecolors="grey", label="stopped early by ASHA"
                )
        else:
            ax.text(0.5, 0.5, "no values", ha="center", va="center", transform=ax.transAxes)
        if numeric and _use_log(x):
            ax.set_xscale("log")
        ax.set_xlabel(name)
        ax.set_ylabel(objective)
        ax.grid(alpha=0.3)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    if (finished & stopped_all).any():
        axes[0].legend(fontsize=7, loc="best")
    n, n_stopped = int(finished.sum()), int((finished & stopped_all).sum())
    fig.suptitle(
        f"{objective} against each hyperparameter ({n} trial{'s' * (n != 1)} with a score"
        + (f", {n_stopped} stopped early: hollow" if n_stopped else "")
        + ")"
    )
    fig.tight_layout()
    return _save(fig, path)


def plot_confirmed(runs: pd.DataFrame, baselines: dict, objective: str, path) -> Path:
    """Each confirmed configuration's objective over its seeds, with its mean and 95 % interval,
    beside the recipe's (`laray train`'s settings, rows whose `recipe` is true) and the baselines' means over
    the same seeds.

    runs: one row per configuration and seed with `rank` (1 = the winner) and the objective
    (and heldout_<objective> where scored); baselines: {label: {"<objective>_mean": ...}}.
    """
    from laray.scoring.confirm import interval95

    if len(runs) == 0 or objective not in runs:
        return _message_png(path, "no confirmation runs")
    fig = _figure(max(5.0, 1.4 * runs["rank"].nunique() + 3), 4)
    ax = fig.subplots()
    held = f"heldout_{objective}"
    recipe_ranks = set(runs.loc[runs["recipe"], "rank"]) if "recipe" in runs else set()
    for rank, group in runs.groupby("rank"):
        values = group[objective].to_numpy(dtype=float)
        colour = "C1" if rank in recipe_ranks else "C0"  # the recipe, laray train's settings: the yardstick
        ax.scatter(
            np.full(len(values), rank - 0.08),
            values,
            s=22,
            color=colour,
            alpha=0.8,
            label="selection part, one seed" if rank == 1 else "the recipe, one seed" if rank in recipe_ranks else None,
        )
        interval = interval95(values)
        if interval is not None:
            ax.errorbar(
                rank - 0.08,
                values.mean(),
                yerr=[[values.mean() - interval[0]], [interval[1] - values.mean()]],
                color=colour,
                capsize=4,
                fmt="_",
                markersize=14,
                label="mean, 95 % interval" if rank == 1 else None,
            )
        if held in group and group[held].notna().any():
            ax.scatter(
                np.full(len(group), rank + 0.08),
                group[held].to_numpy(dtype=float),
                s=22,
                marker="x",
                color="C2",
                label="held-out part" if rank == 1 else None,
            )
    for i, (label, base) in enumerate(baselines.items()):
        value = base.get(f"{objective}_mean", base.get(objective))
        if value is not None:
            ax.axhline(value, color=f"C{3 + i}", linestyle="--", linewidth=1, label=label)
    ax.set_xticks(sorted(runs["rank"].unique()))
    ax.set_xticklabels([("recipe" if r in recipe_ranks else f"#{r}") for r in sorted(runs["rank"].unique())])
    ax.set_xlabel("confirmed configuration (by mean)")
    ax.set_ylabel(objective)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    ax.set_title(f"{objective} over {runs.groupby('rank').size().max()} seeds per configuration")
    fig.tight_layout()
    return _save(fig, path)


def running_best(values, mode: str = "max") -> np.ndarray:
    """Best value so far after each trial; non-finite values are skipped, NaN before the first finite one."""
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
    v = np.asarray(values, dtype=float)
    v = np.where(np.isfinite(v), v, np.nan)
    # fmax/fmin ignore NaN, so a failed trial keeps the previous best
    return (np.fmax if mode == "max" else np.fmin).accumulate(v) if len(v) else v


STOPPED_MARKS = {  # how the search stopped a trial (its study's `stopped_by`, laray.sweep.study) -> marker, legend
    "ASHA": ("o", "stopped early by ASHA"),
    "time budget": ("s", "stopped by the time budget"),
}


def plot_history(
    values: list[float], path, objective: str = "purity", mode: str = "max", stopped_by: list | None = None
) -> Path:
    """Optimisation history: each trial's value as a dot, the best so far as a step line.

    stopped_by: each trial's `stopped_by` (laray.sweep.study: "ASHA", "time budget", "none"), when known. Trials
    stopped early are drawn hollow, as in plot_objective_vs_params: their value is from fewer epochs than a full
    run's, so not comparable with it.
    """
    best = running_best(values, mode)
    v = np.asarray(values, dtype=float)
    ok = np.isfinite(v)
    if not ok.any():
        return _message_png(path, "no finished trials")
    if stopped_by is not None and len(stopped_by) != len(v):
        raise ValueError(f"stopped_by has {len(stopped_by)} entries for {len(v)} trials")
    how = np.array(["none" if s is None else str(s) for s in ([None] * len(v) if stopped_by is None else stopped_by)])
    trial = np.arange(1, len(v) + 1)
    fig = _figure(7, 4)
    ax = fig.subplots()
    full = ok & ~np.isin(how, list(STOPPED_MARKS))
    ax.scatter(
        trial[full],
        v[full],
        s=20,
        alpha=0.7,
        zorder=3,
        label=f"trial {objective}" if stopped_by is None else "ran every epoch",
    )
    n_stopped = 0
    for by, (marker, label) in STOPPED_MARKS.items():
        shown = ok & (how == by)
        if shown.any():
            ax.scatter(
                trial[shown], v[shown], s=24, marker=marker, facecolors="none", edgecolors="grey", zorder=3, label=label
            )
            n_stopped += int(shown.sum())
    ax.step(trial, best, where="post", color="C3", label=f"best so far ({mode})")
    ax.set_xlabel("trial")
    ax.set_ylabel(objective)
    ax.set_title(
        f"Optimisation history ({int(ok.sum())} of {len(v)} trials finished"
        + (f", {n_stopped} stopped early: hollow" if n_stopped else "")
        + ")"
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_importances(importances: dict[str, float], path) -> Path:
    """Horizontal bars of hyperparameter importance, the most important on top."""
    items = [(k, float(v)) for k, v in importances.items() if np.isfinite(v)]
    if not items:
        return _message_png(path, "not enough finished trials for importances")
    items.sort(key=lambda kv: kv[1])  # barh draws bottom-up, so ascending puts the largest on top
    names, vals = zip(*items)
    fig = _figure(6, 1.2 + 0.4 * len(items))
    ax = fig.subplots()
    ax.barh(range(len(vals)), vals, color="C0")
    ax.set_yticks(range(len(vals)), names)
    ax.set_xlabel("importance")
    ax.set_title("Hyperparameter importance")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


# ---------------------------------------------------------------- contingency heatmap


def _order_clusters(table: np.ndarray) -> np.ndarray:
    """Column order: by the row of each cluster's majority species, then larger clusters first."""
    majority = table.argmax(axis=0)
    size = table.sum(axis=0)
    return np.lexsort((-size, majority))  # lexsort sorts by the last key first


def plot_contingency(labels_true, clusters, path, max_species: int = 40) -> Path:
    """Heatmap of image counts, species (rows, by name) by cluster (columns, next to their species)."""
    labels_true, clusters = np.asarray(labels_true), np.asarray(clusters)
    if len(labels_true) == 0:
        return _message_png(path, "no labelled images")
    table = contingency(labels_true, clusters).T  # (species, clusters)
    species, cluster_ids = np.unique(labels_true), np.unique(clusters)
    title = f"Species by cluster ({len(labels_true)} images)"
    if len(species) > max_species:
        # the most frequent species; ties go to the earlier name; rows stay in name order
        keep = np.sort(np.argsort(-table.sum(axis=1), kind="stable")[:max_species])
        title = (
            f"Species by cluster: the {max_species} most frequent of {len(species)} species "
            f"({int(table[keep].sum())} of {len(labels_true)} images)"
        )
        table, species = table[keep], species[keep]
        used = table.sum(axis=0) > 0  # clusters holding only dropped species would be empty columns
        table, cluster_ids = table[:, used], cluster_ids[used]
    order = _order_clusters(table)
    table, cluster_ids = table[:, order], cluster_ids[order]

    n_rows, n_cols = table.shape
    fig = _figure(min(4 + 0.3 * n_cols, 30), min(2 + 0.25 * n_rows, 20))
    ax = fig.subplots()
    im = ax.imshow(table, cmap="viridis", aspect="auto", interpolation="nearest")
    fig.colorbar(im, ax=ax, label="images", ticks=MaxNLocator(integer=True))  # counts are whole
    small = 7 if max(n_rows, n_cols) > 30 else 9
    ax.set_yticks(range(n_rows), [str(s) for s in species], fontsize=small)
    ax.set_xticks(range(n_cols), [str(c) for c in cluster_ids], fontsize=small, rotation=90 if n_cols > 15 else 0)
    if n_rows <= ANNOTATE_MAX and n_cols <= ANNOTATE_MAX:
        bright = table.max() / 2
        for i, j in zip(*np.nonzero(table)):  # zeros stay blank so the populated cells stand out
            ax.text(
                j,
                i,
                str(table[i, j]),
                ha="center",
                va="center",
                fontsize=8,
                color="black" if table[i, j] > bright else "white",
            )
    ax.set_xlabel("cluster")
    ax.set_ylabel("species")
    ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path)


# ---------------------------------------------------------------- cluster montage

PAD = 4  # pixels between tiles and around the rows
TEXT_GAP = 2  # pixels between a tile and its caption


@dataclass
class Montage:
    """Where a cluster montage was written and what each tile shows.

    indices[c][i] is the image shown by tile i of cluster c, boxes[c][i] its
    (x0, y0, x1, y1) pixel box in the PNG, ends exclusive.
    """

    path: Path
    indices: dict[int, list[int]]
    boxes: dict[int, list[tuple[int, int, int, int]]]


def _square_tile(image: np.ndarray, tile: int) -> Image.Image:
    """Centre square crop, then resize: the tile keeps the subject's proportions."""
    h, w = image.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    crop = np.ascontiguousarray(image[top : top + s, left : left + s])
    return Image.fromarray(crop, mode="RGB").resize((tile, tile), Image.BILINEAR)


def _fit(text: str, font, width: int) -> str:
    """Shorten text with '..' until it fits width pixels, so captions never run into the next one."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "..") > width:
        text = text[:-1]
    return text + ".."


def cluster_montage(
    images: np.ndarray,
    clusters: np.ndarray,
    path,
    species: np.ndarray | None = None,
    per_cluster: int = 8,
    max_clusters: int | None = None,
    tile: int = 64,
    seed: int = 0,
) -> Montage:
    """One row per cluster, largest first: a label, then a seeded sample of its images."""
    clusters = np.asarray(clusters)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    if clusters.shape != (len(images),):
        raise ValueError(f"clusters must have shape ({len(images)},), got {clusters.shape}")
    if species is not None and np.shape(species) != (len(images),):
        raise ValueError(f"species must have shape ({len(images)},), got {np.shape(species)}")
    for name, value in (("per_cluster", per_cluster), ("tile", tile), ("max_clusters", max_clusters)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    path = Path(path)
    if len(images) == 0:
        empty = Image.new("RGB", (240, 40), "white")
        ImageDraw.Draw(empty).text((PAD, PAD), "no images", fill="black", font=ImageFont.load_default())
        empty.save(path, format="PNG")
        return Montage(path, {}, {})

    ids, sizes = np.unique(clusters, return_counts=True)
    rows = ids[np.lexsort((ids, -sizes))]  # size descending, then cluster id
    if max_clusters is not None:
        rows = rows[:max_clusters]

    # pick the tiles and write the labels first: the margin is as wide as the longest label
    rng = np.random.default_rng(seed)
    indices, labels = {}, {}
    for c in rows:
        members = np.flatnonzero(clusters == c)
        shown = members if len(members) <= per_cluster else np.sort(rng.choice(members, per_cluster, replace=False))
        indices[int(c)] = [int(i) for i in shown]
        label = f"cluster {int(c)} · {len(members)} images"
        if species is not None:
            _, counts = np.unique(np.asarray(species)[members], return_counts=True)
            label += f" · purity {counts.max() / len(members):.2f}"
        labels[int(c)] = label

    font = ImageFont.load_default()
    _, top, _, bottom = font.getbbox("Agjy|")  # tallest glyphs and deepest descenders
    line_h = bottom - top
    margin = PAD + max(int(math.ceil(font.getlength(t))) for t in labels.values()) + 2 * PAD
    caption_h = TEXT_GAP + line_h + TEXT_GAP if species is not None else 0
    row_h = tile + caption_h + PAD
    n_cols = max(len(v) for v in indices.values())
    width = margin + n_cols * (tile + PAD)
    height = PAD + len(rows) * row_h

    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    boxes = {}
    for r, c in enumerate(indices):
        y0 = PAD + r * row_h
        # subtracting the bbox top puts the glyphs' top, not the font's ascent line, where we aim
        draw.text((PAD, y0 + (tile - line_h) // 2 - top), labels[c], fill="black", font=font)
        boxes[c] = []
        for j, i in enumerate(indices[c]):
            x0 = margin + j * (tile + PAD)
            canvas.paste(_square_tile(images[i], tile), (x0, y0))
            boxes[c].append((x0, y0, x0 + tile, y0 + tile))
            if species is not None:  # in the strip below the tile, never on the image itself
                draw.text((x0, y0 + tile + TEXT_GAP - top), _fit(str(species[i]), font, tile), fill="black", font=font)
    canvas.save(path, format="PNG")
    return Montage(path, indices, boxes)
