"""Cluster scores against species labels: pure functions on arrays, CPU only.

Labels may be ints or strings, and the number of clusters need not equal the
number of species.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from laray.score_names import LABEL_SCORES, SCORE_NAMES  # noqa: F401 (imported from here by name)


def contingency(labels_true, labels_pred) -> np.ndarray:
    """Counts (n_clusters, n_species): row = predicted cluster, column = true species."""
    labels_true, labels_pred = np.asarray(labels_true), np.asarray(labels_pred)
    if labels_true.ndim != 1 or labels_true.shape != labels_pred.shape:
        raise ValueError(
            f"label arrays must be 1-D and of equal length, got shapes {labels_true.shape} and {labels_pred.shape}"
        )
    if len(labels_true) == 0:
        raise ValueError("cannot score an empty set of labels")
    _, species = np.unique(labels_true, return_inverse=True)
    _, clusters = np.unique(labels_pred, return_inverse=True)
    table = np.zeros((clusters.max() + 1, species.max() + 1), dtype=np.int64)
    np.add.at(table, (clusters, species), 1)
    return table


def _purity(table: np.ndarray) -> float:
    return float(table.max(axis=1).sum() / table.sum())


def _accuracy(table: np.ndarray) -> float:
    rows, cols = linear_sum_assignment(table, maximize=True)
    return float(table[rows, cols].sum() / table.sum())


def purity(labels_true, labels_pred) -> float:
    """(1/N) sum over clusters of the count of the cluster's most common species."""
    return _purity(contingency(labels_true, labels_pred))


def hungarian_accuracy(labels_true, labels_pred) -> float:
    """Accuracy under the best one-to-one matching of clusters to species (unmatched ones count as wrong)."""
    return _accuracy(contingency(labels_true, labels_pred))


def cluster_scores(labels_true, labels_pred) -> dict[str, float]:
    """purity, nmi, ari and acc of a clustering against the true labels."""
    table = contingency(labels_true, labels_pred)  # validates the inputs once for all four
    return {
        "purity": _purity(table),
        "nmi": float(normalized_mutual_info_score(labels_true, labels_pred)),
        "ari": float(adjusted_rand_score(labels_true, labels_pred)),
        "acc": _accuracy(table),
    }
