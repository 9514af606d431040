"""Held-out scoring: a seeded split stratified by species, and scores computed on each part."""

import numpy as np
import pytest
import torch

from laray.scoring.evaluate import score_codes
from laray.scoring.holdout import holdout_mask, split_tag
from laray.scoring.metrics import cluster_scores


def species(counts):
    return np.repeat(np.arange(len(counts)), counts)


def test_the_split_is_stratified_by_species_and_keeps_one_in_each_selection():
    labels = species([10, 7, 1, 2, 40])
    mask = holdout_mask(labels, 0.5, seed=3)
    held = [int(mask[labels == s].sum()) for s in range(5)]
    assert held == [5, 4, 0, 1, 20]  # round(0.5 * n), at most n - 1: a species of one stays whole
    assert all((~mask[labels == s]).any() for s in range(5))


def test_the_split_is_seeded_and_unlabelled_images_are_never_held_out():
    labels = np.concatenate([species([30, 30]), np.full(10, -1)])
    a, b, c = holdout_mask(labels, 0.3, 0), holdout_mask(labels, 0.3, 0), holdout_mask(labels, 0.3, 1)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert not a[labels == -1].any() and a.sum() == 18


def test_no_split_without_a_fraction_or_labels():
    assert holdout_mask(species([5, 5]), 0.0, 0) is None
    assert holdout_mask(np.full(10, -1), 0.5, 0) is None
    with pytest.raises(ValueError, match="holdout must be in"):
        holdout_mask(species([5]), 1.0, 0)
    assert split_tag(0.0, 7) == "all" and split_tag(0.5, 7) == "h0.5s7"


def test_score_codes_scores_each_part_of_one_clustering():
    gen = torch.Generator().manual_seed(0)
    labels = species([40, 40, 40])
    codes = torch.randn(120, 4, generator=gen) + torch.from_numpy(labels)[:, None].float() * 0.8
    heldout = holdout_mask(labels, 0.5, seed=0)
    plain, assignments = score_codes(codes, labels, seed=0)
    split, same_assignments = score_codes(codes, labels, seed=0, heldout=heldout)
    assert np.array_equal(assignments, same_assignments)  # every image is clustered either way
    assert split["purity"] == pytest.approx(cluster_scores(labels[~heldout], assignments[~heldout])["purity"])
    assert split["heldout_purity"] == pytest.approx(cluster_scores(labels[heldout], assignments[heldout])["purity"])
    assert {"nmi", "ari", "acc", "heldout_nmi", "heldout_ari", "heldout_acc"} <= set(split)
    assert "heldout_purity" not in plain


def test_the_parts_are_disjoint_and_cover_every_labelled_image():
    labels = np.concatenate([species([9, 4, 13]), np.full(5, -1)])
    held = holdout_mask(labels, 0.4, seed=2)
    selection = (labels >= 0) & ~held
    assert not (selection & held).any() and ((selection | held) == (labels >= 0)).all()


def test_the_objective_counts_the_selection_part_only():
    """Codes that cluster the held-out images perfectly and the selection images badly: the plain
    scores must be the selection part's (low), the held-out ones high, and neither the overall mix."""
    labels = species([30, 30, 30])
    heldout = holdout_mask(labels, 0.5, seed=0)
    centres = torch.eye(3) * 10
    gen = torch.Generator().manual_seed(0)
    codes = torch.empty(90, 3)
    codes[heldout] = centres[torch.from_numpy(labels[heldout])]  # on their species' centre
    codes[~heldout] = centres[torch.randint(3, (int((~heldout).sum()),), generator=gen)]  # on a random one
    codes += 0.01 * torch.randn(90, 3, generator=gen)
    scores, assignments = score_codes(codes, labels, seed=0, heldout=heldout)
    overall = cluster_scores(labels, assignments)["purity"]
    assert scores["heldout_purity"] == pytest.approx(1.0)
    assert scores["purity"] < 0.6 and scores["purity"] < overall < scores["heldout_purity"]
    assert scores["purity"] == pytest.approx(cluster_scores(labels[~heldout], assignments[~heldout])["purity"])
