"""laray.results.plots: every picture is a valid PNG, edge cases included; montage tiles sit where they say."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from laray.results.plots import (
    Montage,
    _order_clusters,
    cluster_montage,
    plot_contingency,
    plot_history,
    plot_importances,
    plot_objective_vs_params,
    running_best,
)


def assert_png(path, min_w=200, min_h=100):
    """A readable PNG of at least min_w x min_h pixels."""
    assert path.exists() and path.stat().st_size > 0
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.load()  # decodes the whole file, so a truncated PNG fails here
        assert im.width >= min_w and im.height >= min_h
        return im.size


# ---------------------------------------------------------------- sweep charts


@pytest.fixture
def trials():
    rng = np.random.default_rng(0)
    df = pd.DataFrame(
        {
            "temperature": 10 ** rng.uniform(-2, 0, 20),  # spans 100x: log axis
            "k_neighbours": rng.integers(5, 500, 20),
            "lr": rng.uniform(0.01, 0.05, 20),
            "optimizer": rng.choice(["sgd", "adam"], 20),  # a categorical choice
            "purity": rng.uniform(0.3, 0.8, 20),
        }
    )
    df.loc[[2, 7], "purity"] = np.nan  # failed or pruned trials
    df.loc[4, "lr"] = np.nan
    return df


def test_objective_vs_params(tmp_path, trials):
    path = plot_objective_vs_params(
        trials, ["temperature", "k_neighbours", "lr", "optimizer"], "purity", tmp_path / "p.png"
    )
    assert path == tmp_path / "p.png"
    assert_png(path, 800, 200)


def test_objective_vs_params_wraps_into_a_grid(tmp_path, trials):
    one_row = assert_png(plot_objective_vs_params(trials, ["lr"] * 5, "purity", tmp_path / "a.png"))
    two_rows = assert_png(plot_objective_vs_params(trials, ["lr"] * 7, "purity", tmp_path / "b.png"))
    assert two_rows[1] > one_row[1] * 1.5


@pytest.mark.parametrize("case", ["empty", "all_nan_objective", "all_nan_param", "no_params"])
def test_objective_vs_params_without_finished_trials(tmp_path, trials, case):
    if case == "empty":
        trials, params = trials.iloc[:0], ["lr"]
    elif case == "all_nan_objective":
        trials, params = trials.assign(purity=np.nan), ["lr", "temperature"]
    elif case == "all_nan_param":
        trials, params = trials.assign(lr=np.nan), ["lr"]
    else:
        params = []
    assert_png(plot_objective_vs_params(trials, params, "purity", tmp_path / "p.png"))


def test_objective_vs_params_names_a_missing_column(tmp_path, trials):
    with pytest.raises(ValueError, match="momentum"):
        plot_objective_vs_params(trials, ["momentum"], "purity", tmp_path / "p.png")


def test_running_best_by_hand():
    values = [np.nan, 0.5, 0.3, np.nan, 0.7, 0.6, np.inf]
    np.testing.assert_array_equal(running_best(values, "max"), [np.nan, 0.5, 0.5, 0.5, 0.7, 0.7, 0.7])
    np.testing.assert_array_equal(running_best(values, "min"), [np.nan, 0.5, 0.3, 0.3, 0.3, 0.3, 0.3])
    assert len(running_best([], "max")) == 0
    with pytest.raises(ValueError, match="'max' or 'min'"):
        running_best(values, "best")


@pytest.mark.parametrize("values", [[0.4, np.nan, 0.6, 0.5], [0.7], [], [np.nan, np.nan]])
@pytest.mark.parametrize("mode", ["max", "min"])
def test_history(tmp_path, values, mode):
    assert_png(plot_history(values, tmp_path / "h.png", objective="nmi", mode=mode))


def drawn(monkeypatch, plot, *args, **kwargs):
    """The figure a plot function saves, as matplotlib holds it: its artists, not only its pixels."""
    from laray.results import plots

    figures = []
    with monkeypatch.context() as patched:
        patched.setattr(plots, "_save", lambda fig, path: figures.append(fig) or path)
        plot(*args, **kwargs)
    assert len(figures) == 1
    return figures[0]


def hollow(collection) -> bool:
    """A scatter drawn with no fill (facecolors="none"): every marker's face fully transparent."""
    faces = collection.get_facecolors()
    return len(faces) == 0 or bool((faces[:, 3] == 0).all())


def test_history_draws_the_trials_asha_or_the_time_budget_stopped_hollow(tmp_path, monkeypatch):
    values = [0.5, 0.7, np.nan, 0.6, 0.8, 0.65]
    stopped_by = ["none", "ASHA", None, "ASHA", "none", "time budget"]  # None: failed, the study recorded nothing
    fig = drawn(monkeypatch, plot_history, values, tmp_path / "h.png", "purity", "max", stopped_by=stopped_by)
    ax = fig.axes[0]
    scatters = {c.get_label(): c for c in ax.collections}
    assert list(scatters) == ["ran every epoch", "stopped early by ASHA", "stopped by the time budget"]
    assert [hollow(c) for c in scatters.values()] == [False, True, True]
    points = {label: c.get_offsets().tolist() for label, c in scatters.items()}
    assert points == {
        "ran every epoch": [[1, 0.5], [5, 0.8]],
        "stopped early by ASHA": [[2, 0.7], [4, 0.6]],
        "stopped by the time budget": [[6, 0.65]],
    }
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [*scatters, "best so far (max)"]
    assert ax.get_title() == "Optimisation history (5 of 6 trials finished, 3 stopped early: hollow)"
    assert_png(plot_history(values, tmp_path / "h.png", stopped_by=stopped_by))  # and the file is written


def test_history_without_how_trials_ended_draws_them_alike(tmp_path, monkeypatch):
    fig = drawn(monkeypatch, plot_history, [0.5, 0.7], tmp_path / "h.png", "nmi")
    assert [c.get_label() for c in fig.axes[0].collections] == ["trial nmi"]
    with pytest.raises(ValueError, match="stopped_by has 1 entries for 2 trials"):
        plot_history([0.5, 0.7], tmp_path / "h.png", stopped_by=["ASHA"])


@pytest.mark.parametrize("importances", [{"temperature": 0.6, "lr": 0.1, "k_neighbours": 0.3}, {"lr": 1.0}, {}])
def test_importances(tmp_path, importances):
    assert_png(plot_importances(importances, tmp_path / "i.png"))


# ---------------------------------------------------------------- contingency


def test_contingency_string_labels_any_cluster_ids(tmp_path):
    species = np.array(["Boletus edulis"] * 6 + ["Amanita muscaria"] * 5 + ["Morchella"] * 3)
    clusters = np.array([7, 7, 7, 7, -1, 42, 42, 42, 42, 3, 3, 100, 100, 100])
    assert_png(plot_contingency(species, clusters, tmp_path / "c.png"), 400, 200)


def test_contingency_keeps_the_most_frequent_species(tmp_path):
    rng = np.random.default_rng(1)
    species = np.array([f"species {i:02d}" for i in rng.integers(0, 60, 3000)])
    clusters = rng.integers(0, 80, 3000)
    assert_png(plot_contingency(species, clusters, tmp_path / "c.png", max_species=40), 800, 400)
    assert_png(plot_contingency(species, clusters, tmp_path / "d.png", max_species=3))


def test_cluster_order_by_hand():
    #              cluster 0  1  2  3
    table = np.array(
        [
            [0, 5, 0, 2],  # species a
            [4, 1, 0, 3],  # species b
            [0, 0, 6, 0],
        ]
    )  # species c
    # majority rows: 0 -> b, 1 -> a, 2 -> c, 3 -> b; sizes 4, 6, 6, 5
    # so a: [1], then b with the larger cluster first: [3, 0], then c: [2]
    np.testing.assert_array_equal(_order_clusters(table), [1, 3, 0, 2])
    table[1, 0] = 9  # cluster 0 (9 images) now outgrows cluster 3 (5)
    np.testing.assert_array_equal(_order_clusters(table), [1, 0, 3, 2])


def test_contingency_empty(tmp_path):
    assert_png(plot_contingency([], [], tmp_path / "c.png"))


# ---------------------------------------------------------------- montage

COLOURS = np.array([[230, 25, 75], [60, 180, 75], [0, 130, 200], [245, 130, 48], [145, 30, 180]], np.uint8)
CLUSTER_IDS = np.array([11, -3, 0, 7, 250])  # any ints, not 0..K-1
SIZES = np.array([13, 11, 5, 20, 9])  # 5 is smaller than per_cluster


@pytest.fixture
def solid(tmp_path):
    """Each cluster a solid colour, 16x16 images in shuffled order, one species name per cluster."""
    rng = np.random.default_rng(3)
    members = np.repeat(np.arange(len(SIZES)), SIZES)
    rng.shuffle(members)
    images = np.broadcast_to(COLOURS[members][:, None, None, :], (len(members), 16, 16, 3)).copy()
    # a memmap, as the image cache hands it over
    mm = np.lib.format.open_memmap(tmp_path / "images.npy", mode="w+", dtype=np.uint8, shape=images.shape)
    mm[:] = images
    species = np.array([f"Species number {k}" for k in members])
    species[np.flatnonzero(members == 1)[:4]] = "Intruder"  # purity below 1 somewhere
    return mm, CLUSTER_IDS[members], species, {int(c): k for k, c in enumerate(CLUSTER_IDS)}


def tile_colours(path, montage: Montage):
    """Pixels inside each tile box of the saved PNG: {cluster: [array (h, w, 3)]}."""
    with Image.open(path) as im:
        pixels = np.asarray(im.convert("RGB"))
    return pixels, {c: [pixels[y0:y1, x0:x1] for x0, y0, x1, y1 in boxes] for c, boxes in montage.boxes.items()}


@pytest.mark.parametrize("with_species", [True, False])
def test_montage_tiles_show_their_images(tmp_path, solid, with_species):
    images, clusters, species, colour_of = solid
    per_cluster = 8
    m = cluster_montage(
        images,
        clusters,
        tmp_path / "m.png",
        species=species if with_species else None,
        per_cluster=per_cluster,
        tile=32,
    )
    assert m.path == tmp_path / "m.png"
    # rows by size descending
    assert list(m.indices) == [7, 11, -3, 250, 0]
    assert list(m.boxes) == list(m.indices)
    pixels, tiles = tile_colours(m.path, m)
    for c, shown in m.indices.items():
        size = int((clusters == c).sum())
        assert len(shown) == min(per_cluster, size) == len(m.boxes[c])
        assert len(set(shown)) == len(shown)
        assert all(clusters[i] == c for i in shown)
        for i, box, tile in zip(shown, m.boxes[c], tiles[c]):
            assert box[2] - box[0] == 32 and box[3] - box[1] == 32
            expected = COLOURS[colour_of[c]]
            # the whole tile, not only its centre: a caption drawn over the image would show up here
            assert np.abs(tile.astype(int) - images[i][0, 0]).max() <= 2
            assert np.abs(tile.astype(int) - expected).max() <= 2
    # boxes are pairwise disjoint
    all_boxes = [b for bs in m.boxes.values() for b in bs]
    for a in range(len(all_boxes)):
        for b in range(a + 1, len(all_boxes)):
            (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = all_boxes[a], all_boxes[b]
            assert ax1 <= bx0 or bx1 <= ax0 or ay1 <= by0 or by1 <= ay0
    # the labels and captions are really drawn, outside every tile
    outside = np.ones(pixels.shape[:2], bool)
    for x0, y0, x1, y1 in all_boxes:
        outside[y0:y1, x0:x1] = False
    dark = (pixels.max(axis=2) < 100) & outside
    margin = min(b[0] for b in all_boxes)
    assert dark[:, :margin].any()  # row labels
    x0, y0, x1, y1 = m.boxes[7][0]
    strip = dark[y1 : y1 + 20, x0:x1]
    assert strip.any() == with_species  # the species caption lies in the strip under the tile


def test_montage_each_tile_is_its_own_image(tmp_path):
    """Every image its own colour: tile i of a cluster must show exactly image indices[c][i]."""
    n = 60
    rng = np.random.default_rng(5)
    colours = np.stack([np.arange(n) * 4, 255 - np.arange(n) * 4, (np.arange(n) * 37) % 256], 1).astype(np.uint8)
    images = np.broadcast_to(colours[:, None, None, :], (n, 12, 12, 3)).copy()
    clusters = rng.integers(0, 4, n) * 10
    m = cluster_montage(images, clusters, tmp_path / "m.png", per_cluster=6, tile=20)
    _, tiles = tile_colours(m.path, m)
    for c, shown in m.indices.items():
        for i, tile in zip(shown, tiles[c]):
            assert np.abs(tile.astype(int) - colours[i]).max() <= 2, (c, i)


def test_montage_limits_rows_and_is_seeded(tmp_path, solid):
    images, clusters, species, _ = solid
    a = cluster_montage(images, clusters, tmp_path / "a.png", species=species, per_cluster=4, max_clusters=2)
    b = cluster_montage(images, clusters, tmp_path / "b.png", species=species, per_cluster=4, max_clusters=2)
    c = cluster_montage(images, clusters, tmp_path / "c.png", species=species, per_cluster=4, max_clusters=2, seed=1)
    assert list(a.indices) == [7, 11]
    assert a.indices == b.indices and a.boxes == b.boxes
    assert a.indices != c.indices
    with Image.open(a.path) as im:
        # two rows of 64-pixel tiles with their captions: the third row is not drawn
        assert 2 * 64 < im.height < 3 * 64
        assert im.width >= max(x1 for bs in a.boxes.values() for _, _, x1, _ in bs)


def test_montage_wide_images_and_empty_input(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (6, 30, 50, 3), dtype=np.uint8)  # not square: centre-cropped
    m = cluster_montage(
        images,
        np.array([5, 5, 5, 9, 9, 5]),
        tmp_path / "m.png",
        species=np.array(["a very long species name indeed"] * 6),
        tile=24,
    )
    assert [len(v) for v in m.indices.values()] == [4, 2]
    assert_png(m.path, 100, 50)
    e = cluster_montage(np.zeros((0, 8, 8, 3), np.uint8), np.zeros(0, int), tmp_path / "e.png")
    assert e.indices == {} and e.boxes == {}
    assert_png(e.path, 100, 20)


def test_montage_rejects_bad_input(tmp_path):
    images = np.zeros((4, 8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="uint8"):
        cluster_montage(images.astype(float), np.zeros(4, int), tmp_path / "m.png")
    with pytest.raises(ValueError, match="clusters"):
        cluster_montage(images, np.zeros(3, int), tmp_path / "m.png")
    with pytest.raises(ValueError, match="per_cluster"):
        cluster_montage(images, np.zeros(4, int), tmp_path / "m.png", per_cluster=0)
