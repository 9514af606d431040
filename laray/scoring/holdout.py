"""Held-out scoring: select hyperparameters on one part of the labels, report on the other.

A sweep ranks trials by a score computed against the species labels; the winner's score
on those same labels is optimistic (it was chosen for being high). So the labelled images
are split once per sweep, by a seeded draw stratified by species, into a selection part
and a held-out part. Every image is still trained on and clustered (labels never enter
training); only the scoring is split: the objective that Optuna and ASHA see is computed on
the selection part, and the held-out scores, which no choice was made on, are the estimate
to report.
"""

from __future__ import annotations

import numpy as np

from laray.score_names import HELDOUT_PREFIX as PREFIX  # noqa: F401 (the prefix of held-out scores)

NO_HOLDOUT = (0.0, 0)  # (fraction, seed): score every labelled image together


def holdout_mask(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray | None:
    """True for the held-out images: `fraction` of each species' images, drawn with `seed`; None for no split.

    Each species keeps at least one image in the selection part (a species of one image stays
    there whole). Unlabelled images (label -1) are never held out: they are scored by neither part.
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"holdout must be in [0, 1), got {fraction}")
    labels = np.asarray(labels)
    if fraction == 0 or not (labels >= 0).any():
        return None
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(labels), dtype=bool)
    for species in np.unique(labels[labels >= 0]):
        members = np.flatnonzero(labels == species)
        n_out = min(int(round(fraction * len(members))), len(members) - 1)
        mask[rng.choice(members, n_out, replace=False)] = True
    return mask


def split_tag(fraction: float, seed: int) -> str:
    """Names a split in file names (scores cached for one split must not serve another)."""
    return "all" if fraction == 0 else f"h{fraction:g}s{seed}"
