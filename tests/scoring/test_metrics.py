"""laray.scoring.metrics on hand-computed examples.

Contingency tables are written rows = predicted cluster (sorted ids),
columns = true species (sorted names), as laray.scoring.metrics.contingency returns them.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from laray.scoring.metrics import cluster_scores, contingency, hungarian_accuracy, purity

# true = [a, a, a, b, b, c], pred = [0, 0, 1, 1, 1, 2]
#
#              a  b  c
#   cluster 0  2  0  0
#   cluster 1  1  2  0
#   cluster 2  0  0  1
#
# purity = (max row 0 + max row 1 + max row 2) / N = (2 + 2 + 1) / 6 = 5/6
# acc: best one-to-one matching 0->a (2), 1->b (2), 2->c (1) = 5/6
#      (any matching with 1->a scores at most 1 + 0 + 1 = 2, e.g. 1->a, 0->b, 2->c)
# ARI: sum_ij C(n_ij, 2) = C(2,2) + C(2,2) = 2
#      rows   (cluster sizes 2, 3, 1): C(2,2)+C(3,2)+C(1,2) = 1 + 3 + 0 = 4
#      cols   (species sizes 3, 2, 1): C(3,2)+C(2,2)+C(1,2) = 3 + 1 + 0 = 4
#      expected = 4 * 4 / C(6,2) = 16/15, max = (4 + 4)/2 = 4
#      ARI = (2 - 16/15) / (4 - 16/15) = (14/15) / (44/15) = 7/22
# NMI (arithmetic mean of entropies, sklearn's default), natural logs:
#      MI = sum p_ij ln(p_ij / (p_i p_j))
#         = 2/6 ln((2/6)/((2/6)(3/6)))   cluster 0, a
#         + 1/6 ln((1/6)/((3/6)(3/6)))   cluster 1, a
#         + 2/6 ln((2/6)/((3/6)(2/6)))   cluster 1, b
#         + 1/6 ln((1/6)/((1/6)(1/6)))   cluster 2, c
#         = 1/3 ln2 + 1/6 ln(2/3) + 1/3 ln2 + 1/6 ln6 = 2/3 ln2 + 1/6 ln4 = ln2
#      H(true) = H(pred) = entropy of (1/2, 1/3, 1/6)
#         = 1/2 ln2 + 1/3 ln3 + 1/6 ln6 = 2/3 ln2 + 1/2 ln3
#      NMI = ln2 / (2/3 ln2 + 1/2 ln3)  (~0.6853)
TRUE_1 = ["a", "a", "a", "b", "b", "c"]
PRED_1 = [0, 0, 1, 1, 1, 2]
PURITY_1 = 5 / 6
ACC_1 = 5 / 6
ARI_1 = 7 / 22
NMI_1 = math.log(2) / (2 / 3 * math.log(2) + 1 / 2 * math.log(3))


def test_contingency_hand_example():
    table = contingency(TRUE_1, PRED_1)
    assert table.dtype.kind == "i"
    np.testing.assert_array_equal(table, [[2, 0, 0], [1, 2, 0], [0, 0, 1]])


def test_contingency_rows_are_clusters_columns_species():
    # 2 clusters, 3 species -> shape (2, 3); labels need not be contiguous ints
    table = contingency(["x", "y", "z", "x"], [10, 10, 42, 42])
    #            x  y  z
    # cluster 10 1  1  0
    # cluster 42 1  0  1
    np.testing.assert_array_equal(table, [[1, 1, 0], [1, 0, 1]])
    assert table.sum() == 4


def test_hand_example_scores():
    assert purity(TRUE_1, PRED_1) == pytest.approx(PURITY_1)
    assert hungarian_accuracy(TRUE_1, PRED_1) == pytest.approx(ACC_1)
    scores = cluster_scores(TRUE_1, PRED_1)
    assert set(scores) == {"purity", "nmi", "ari", "acc"}
    assert all(type(v) is float for v in scores.values())
    assert scores["purity"] == pytest.approx(PURITY_1)
    assert scores["acc"] == pytest.approx(ACC_1)
    assert scores["ari"] == pytest.approx(ARI_1)
    assert scores["nmi"] == pytest.approx(NMI_1)


def test_nmi_ari_equal_sklearn():
    true = ["a", "a", "b", "b", "b", "c", "c", "a", "c", "b"]
    pred = [1, 1, 0, 0, 2, 2, 2, 1, 0, 0]
    scores = cluster_scores(true, pred)
    assert scores["nmi"] == pytest.approx(normalized_mutual_info_score(true, pred), abs=1e-12)
    assert scores["ari"] == pytest.approx(adjusted_rand_score(true, pred), abs=1e-12)
    assert 0 < scores["nmi"] < 1 and 0 < scores["ari"] < 1


def test_purity_differs_from_accuracy():
    # true = [a, a, a, a, a, b], pred = [0, 0, 0, 1, 1, 1]
    #              a  b
    #   cluster 0  3  0
    #   cluster 1  2  1
    # purity = (3 + 2) / 6 = 5/6  (both clusters vote for a)
    # acc: one-to-one, 0->a (3) + 1->b (1) = 4  vs  1->a (2) + 0->b (0) = 2  ->  4/6 = 2/3
    true = ["a"] * 5 + ["b"]
    pred = [0, 0, 0, 1, 1, 1]
    assert purity(true, pred) == pytest.approx(5 / 6)
    assert hungarian_accuracy(true, pred) == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    "pred",
    [
        [0, 0, 1, 1, 2],  # same ids
        [2, 2, 0, 0, 1],  # permuted ids
        [7, 7, -3, -3, 100],  # arbitrary ids
        ["q", "q", "p", "p", "r"],  # string cluster ids
    ],
)
def test_perfect_clustering_scores_one(pred):
    true = ["a", "a", "b", "b", "c"]
    scores = cluster_scores(true, pred)
    for name in ("purity", "nmi", "ari", "acc"):
        assert scores[name] == pytest.approx(1.0), name
    assert purity(true, pred) == pytest.approx(1.0)
    assert hungarian_accuracy(true, pred) == pytest.approx(1.0)


def test_more_clusters_than_species_singletons():
    # true = [a, a, b, b], pred = [0, 1, 2, 3]: every image its own cluster
    #              a  b
    #   cluster 0  1  0
    #   cluster 1  1  0
    #   cluster 2  0  1
    #   cluster 3  0  1
    # purity = (1 + 1 + 1 + 1) / 4 = 1.0  (singletons are trivially pure)
    # acc: only 2 of the 4 clusters can be matched one-to-one, each worth 1 -> 2/4 = 0.5
    # ARI: sum C(n_ij,2) = 0; rows 0; cols C(2,2)+C(2,2) = 2; expected = 0 * 2 / 6 = 0;
    #      max = (0 + 2)/2 = 1 -> ARI = (0 - 0)/(1 - 0) = 0
    true = ["a", "a", "b", "b"]
    pred = [0, 1, 2, 3]
    assert contingency(true, pred).shape == (4, 2)
    scores = cluster_scores(true, pred)
    assert scores["purity"] == pytest.approx(1.0)
    assert scores["acc"] == pytest.approx(0.5)
    assert scores["ari"] == pytest.approx(0.0, abs=1e-12)


def test_more_clusters_than_species_mixed():
    # true = [a, a, a, b, b, b], pred = [0, 0, 1, 2, 2, 3]
    #              a  b
    #   cluster 0  2  0
    #   cluster 1  1  0
    #   cluster 2  0  2
    #   cluster 3  0  1
    # purity = (2 + 1 + 2 + 1)/6 = 1.0; acc = (0->a 2 + 2->b 2)/6 = 4/6
    true = ["a", "a", "a", "b", "b", "b"]
    pred = [0, 0, 1, 2, 2, 3]
    assert purity(true, pred) == pytest.approx(1.0)
    assert hungarian_accuracy(true, pred) == pytest.approx(4 / 6)


def test_fewer_clusters_than_species():
    # true = [a, a, b, b, c, c], pred = [0, 0, 0, 0, 1, 1]
    #              a  b  c
    #   cluster 0  2  2  0
    #   cluster 1  0  0  2
    # purity = (2 + 2) / 6 = 2/3
    # acc: 0->a (or b) 2 + 1->c 2 = 4, one species left unmatched -> 4/6 = 2/3
    # ARI: sum C(n_ij,2) = 1 + 1 + 1 = 3; rows C(4,2)+C(2,2) = 6 + 1 = 7;
    #      cols 1 + 1 + 1 = 3; expected = 7 * 3 / C(6,2) = 21/15 = 7/5;
    #      max = (7 + 3)/2 = 5 -> ARI = (3 - 7/5)/(5 - 7/5) = (8/5)/(18/5) = 4/9
    true = ["a", "a", "b", "b", "c", "c"]
    pred = [0, 0, 0, 0, 1, 1]
    assert contingency(true, pred).shape == (2, 3)
    scores = cluster_scores(true, pred)
    assert scores["purity"] == pytest.approx(2 / 3)
    assert scores["acc"] == pytest.approx(2 / 3)
    assert scores["ari"] == pytest.approx(4 / 9)


def test_fewer_clusters_acc_below_purity():
    # true = [a, a, b, b, b, c], pred = [0, 0, 0, 0, 0, 1]  (one cluster absorbs a and b)
    #              a  b  c
    #   cluster 0  2  3  0
    #   cluster 1  0  0  1
    # purity = (3 + 1)/6 = 2/3; acc = 0->b (3) + 1->c (1) = 4/6 = 2/3
    true = ["a", "a", "b", "b", "b", "c"]
    pred = [0, 0, 0, 0, 0, 1]
    assert purity(true, pred) == pytest.approx(2 / 3)
    assert hungarian_accuracy(true, pred) == pytest.approx(2 / 3)


def test_single_cluster():
    # true = [a, a, b, b], pred = [5, 5, 5, 5]: table [[2, 2]]
    # purity = 2/4; acc = 2/4; one cluster carries no information: nmi = ari = 0
    true, pred = ["a", "a", "b", "b"], [5, 5, 5, 5]
    scores = cluster_scores(true, pred)
    assert scores["purity"] == pytest.approx(0.5)
    assert scores["acc"] == pytest.approx(0.5)
    assert scores["nmi"] == pytest.approx(0.0, abs=1e-12)
    assert scores["ari"] == pytest.approx(0.0, abs=1e-12)


def test_string_and_int_labels_give_same_scores():
    true_str = np.array(TRUE_1)
    true_int = np.array([0, 0, 0, 1, 1, 2])
    pred_int = np.array(PRED_1)
    pred_str = np.array(["x", "x", "y", "y", "y", "z"])
    reference = cluster_scores(true_int, pred_int)
    for t, p in [(true_str, pred_int), (true_int, pred_str), (true_str, pred_str), (TRUE_1, PRED_1)]:
        scores = cluster_scores(t, p)
        assert scores == pytest.approx(reference)
        np.testing.assert_array_equal(contingency(t, p), contingency(true_int, pred_int))
    assert reference["purity"] == pytest.approx(PURITY_1)
    assert reference["acc"] == pytest.approx(ACC_1)


def test_scores_are_not_symmetric_in_purity():
    # Swapping the roles of true and pred transposes the table, so purity changes.
    # purity(true=[a]*5+[b], pred=[0,0,0,1,1,1]) = 5/6 (see test_purity_differs_from_accuracy).
    # Swapped: true' = [0,0,0,1,1,1], pred' = [a,a,a,a,a,b]
    #              0  1
    #   cluster a  3  2
    #   cluster b  0  1
    #   purity' = (3 + 1)/6 = 2/3
    true = ["a"] * 5 + ["b"]
    pred = [0, 0, 0, 1, 1, 1]
    assert purity(true, pred) == pytest.approx(5 / 6)
    assert purity(pred, true) == pytest.approx(2 / 3)


@pytest.mark.parametrize("fn", [purity, hungarian_accuracy, cluster_scores, contingency])
def test_mismatched_lengths_raise(fn):
    with pytest.raises(ValueError, match="equal length"):
        fn(["a", "b", "c"], [0, 1])
    with pytest.raises(ValueError):
        fn([0, 1], [0, 1, 2])


@pytest.mark.parametrize("fn", [purity, hungarian_accuracy, cluster_scores, contingency])
def test_empty_raises(fn):
    with pytest.raises(ValueError, match="empty"):
        fn([], [])
    with pytest.raises(ValueError, match="empty"):
        fn(np.array([], dtype=int), np.array([], dtype=int))


@pytest.mark.parametrize("fn", [purity, hungarian_accuracy, cluster_scores, contingency])
def test_two_dimensional_labels_raise(fn):
    with pytest.raises(ValueError, match="1-D"):
        fn([[0, 1], [1, 0]], [[0, 1], [1, 0]])
