"""Data layer (issue 3): sources (folder, CSV, digits), robust decoding, the decode-once cache, load_dataset.

Every image is generated in tmp_path; every load passes cache_dir under tmp_path so the
user's cache is never touched. Images are tiny and image_size is 16-32, so the file runs fast.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, features

import laray.data.cache
from laray.data.cache import decode_cached, fingerprint
from laray.data.dataset import IMAGENET_MEAN, IMAGENET_STD, DataError, DataWarning, ImageDataset, load_dataset
from laray.data.decode import DecodeError, decode_image

RED, GREEN, BLUE, WHITE, BLACK = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0)


# ----------------------------------------------------------------------------------------- helpers


def _solid(path: Path, color=RED, size=(8, 8), mode="RGB", **save) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, **save)
    return path


def _noise(path: Path, size=(32, 32), seed=0, **save) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, **save)
    return path


def _jpeg_bytes(size=(32, 32), seed=0) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _close(pixel, color, tol=8) -> bool:
    return bool(np.all(np.abs(np.asarray(pixel, dtype=int) - np.asarray(color, dtype=int)) <= tol))


def _listed(message) -> str:
    """The file a DataWarning names as listing every skipped file (the warning itself names the first few)."""
    return Path(re.search(r"all of them in (\S+)\)", str(message)).group(1)).read_text()


def _data_warnings(record) -> list:
    return [w for w in record if issubclass(w.category, DataWarning)]


def _load_quiet(spec, image_size, **kw) -> ImageDataset:
    """load_dataset, failing the test if it emits a DataWarning (nothing should have been skipped)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        return load_dataset(str(spec), image_size, **kw)


def _bad_files(folder: Path) -> dict[str, str]:
    """Every kind of undecodable file, in `folder`; returns {path: expected words in the reason}."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty.jpg").write_bytes(b"")
    full = _jpeg_bytes((48, 48), seed=3)
    (folder / "truncated.jpg").write_bytes(full[: len(full) // 2])
    png = io.BytesIO()
    Image.fromarray(np.random.default_rng(4).integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(png, format="PNG")
    (folder / "truncated_png.png").write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    (folder / "text.png").write_text("this is not a PNG, just some text\n" * 20)
    (folder / "random.jpg").write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return {
        str(folder / "empty.jpg"): "empty",
        str(folder / "truncated.jpg"): "truncated",
        str(folder / "truncated_png.png"): "truncated",
        str(folder / "text.png"): "not an image",
        str(folder / "random.jpg"): "not an image",
    }


# ----------------------------------------------------------------------------------------- decode_image: modes


def test_grayscale_L_becomes_rgb(tmp_path):
    path = _solid(tmp_path / "g.png", 100, mode="L")
    arr, original = decode_image(str(path), 16)
    assert arr.shape == (16, 16, 3) and arr.dtype == np.uint8
    assert np.all(arr == 100)
    assert tuple(original) == (8, 8)


def test_palette_without_transparency(tmp_path):
    img = Image.new("P", (8, 8), 1)
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    img.save(tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").mode == "P"
    arr, _ = decode_image(str(tmp_path / "p.png"), 16)
    assert np.all(arr == np.array(BLUE, dtype=np.uint8))


def test_palette_with_transparency_composites_on_white(tmp_path):
    img = Image.new("P", (8, 8), 0)
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    img.paste(1, (0, 0, 4, 8))  # left half index 1 (blue, opaque), right half index 0 (red, transparent)
    img.save(tmp_path / "pt.png", transparency=0)
    reread = Image.open(tmp_path / "pt.png")
    assert reread.mode == "P" and "transparency" in reread.info
    arr, _ = decode_image(str(tmp_path / "pt.png"), 8)
    assert np.all(arr[:, :4] == np.array(BLUE, dtype=np.uint8))
    assert np.all(arr[:, 4:] == np.array(WHITE, dtype=np.uint8))  # transparent red -> white, not red


def test_rgba_transparent_pixels_become_white(tmp_path):
    a = np.zeros((8, 8, 4), dtype=np.uint8)
    a[:, :4] = (0, 0, 255, 255)  # opaque blue
    a[:, 4:] = (255, 0, 0, 0)  # fully transparent red
    Image.fromarray(a, "RGBA").save(tmp_path / "a.png")
    arr, _ = decode_image(str(tmp_path / "a.png"), 8)
    assert np.all(arr[:, :4] == np.array(BLUE, dtype=np.uint8))
    assert np.all(arr[:, 4:] == np.array(WHITE, dtype=np.uint8))


def test_rgba_half_transparent_blends_with_white(tmp_path):
    _solid(tmp_path / "h.png", (255, 0, 0, 128), mode="RGBA")
    arr, _ = decode_image(str(tmp_path / "h.png"), 8)
    assert _close(arr[4, 4], (255, 127, 127), tol=2)


def test_grayscale_with_alpha_LA(tmp_path):
    a = np.zeros((8, 8, 2), dtype=np.uint8)
    a[..., 0], a[..., 1] = 0, 0  # black but fully transparent
    Image.fromarray(a, "LA").save(tmp_path / "la.png")
    arr, _ = decode_image(str(tmp_path / "la.png"), 8)
    assert np.all(arr == 255)


@pytest.mark.parametrize("ext", ["jpg", "tif"])
def test_cmyk(tmp_path, ext):
    path = _solid(tmp_path / f"c.{ext}", (0, 255, 255, 0), mode="CMYK")  # pure red in CMYK
    assert Image.open(path).mode == "CMYK"
    arr, _ = decode_image(str(path), 16)
    assert arr.shape == (16, 16, 3)
    assert _close(arr[8, 8], RED, tol=10)


@pytest.mark.parametrize("value, expected", [(65535, 255), (32768, 128), (0, 0), (4096, 16)])
def test_16bit_png_is_scaled_not_clipped(tmp_path, value, expected):
    Image.fromarray(np.full((8, 8), value, dtype=np.uint16)).save(tmp_path / "i16.png")
    assert Image.open(tmp_path / "i16.png").mode.startswith("I")
    arr, _ = decode_image(str(tmp_path / "i16.png"), 8)
    assert np.all(np.abs(arr.astype(int) - expected) <= 1), arr[0, 0]


def test_16bit_gradient_keeps_its_ordering(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 16).astype(np.uint16), (16, 1))
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    arr, _ = decode_image(str(tmp_path / "ramp.png"), 16)
    row = arr[8, :, 0].astype(int)
    assert row[0] <= 1 and row[-1] >= 254
    assert np.all(np.diff(row) >= 0) and len(np.unique(row)) == 16  # scaled, so no two levels collapse at 255


def test_dark_16bit_png_is_scaled_too(tmp_path):
    # A 16-bit PNG whose brightest pixel is 255/65535 is almost black: the declared 16-bit range
    # is scaled, whatever the content (the mapping must not jump when one pixel passes 255).
    Image.fromarray(np.full((8, 8), 255, dtype=np.uint16)).save(tmp_path / "dark16.png")
    arr, _ = decode_image(str(tmp_path / "dark16.png"), 8)
    assert arr.max() <= 2


@pytest.mark.parametrize(
    "orientation, quadrants",
    [
        # decoded (top-left, top-right, bottom-left, bottom-right) of a stored TL red / TR green / BL blue / BR white
        (1, (RED, GREEN, BLUE, WHITE)),
        (6, (BLUE, RED, WHITE, GREEN)),  # 6: display rotated 90 degrees clockwise
        (8, (GREEN, WHITE, RED, BLUE)),  # 8: display rotated 90 degrees counter-clockwise
    ],
)
def test_exif_orientation_is_applied(tmp_path, orientation, quadrants):
    a = np.zeros((32, 48, 3), dtype=np.uint8)  # stored 48 wide x 32 high
    a[:16, :24], a[:16, 24:], a[16:, :24], a[16:, 24:] = RED, GREEN, BLUE, WHITE
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(a).save(tmp_path / "o.jpg", exif=exif, quality=95, subsampling=0)
    arr, original = decode_image(str(tmp_path / "o.jpg"), 32)  # shorter side 32: nothing rescaled, only cropped
    assert tuple(original) == ((48, 32) if orientation == 1 else (32, 48))  # the size as displayed
    tl, tr, bl, br = arr[8, 8], arr[8, 24], arr[24, 8], arr[24, 24]
    for got, want in zip((tl, tr, bl, br), quadrants):
        assert _close(got, want, tol=40), (orientation, got, want)


def test_one_pixel_image(tmp_path):
    path = _solid(tmp_path / "one.png", GREEN, size=(1, 1))
    arr, original = decode_image(str(path), 24)
    assert arr.shape == (24, 24, 3)
    assert np.all(arr == np.array(GREEN, dtype=np.uint8))
    assert tuple(original) == (1, 1)


def _big_jpeg(path: Path) -> Path:
    a = np.empty((1800, 2500, 3), dtype=np.uint8)
    a[:, :1250], a[:, 1250:] = RED, BLUE
    Image.fromarray(a).save(path, quality=90)
    return path


def test_few_megapixel_jpeg(tmp_path):
    path = _big_jpeg(tmp_path / "big.jpg")
    arr, _ = decode_image(str(path), 32)
    assert arr.shape == (32, 32, 3)
    assert _close(arr[16, 2], RED, tol=20) and _close(arr[16, 29], BLUE, tol=20)


def test_few_megapixel_jpeg_reports_its_original_size(tmp_path):
    # Regression: the size used to be read after img.draft() had shrunk the JPEG, giving (313, 225).
    path = _big_jpeg(tmp_path / "big.jpg")
    _, original = decode_image(str(path), 32)
    assert tuple(original) == (2500, 1800)


@pytest.mark.parametrize(
    "name, save",
    [
        ("x.JPG", {}),
        ("x.PNG", {}),
        ("x.JPEG", {}),
        ("x.tif", {}),
        ("x.TIFF", {}),
        ("x.bmp", {}),
        pytest.param(
            "x.webp",
            {"lossless": True},
            marks=pytest.mark.skipif(not features.check("webp"), reason="no WebP in this Pillow"),
        ),
    ],
)
def test_extensions(tmp_path, name, save):
    path = tmp_path / name
    fmt = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "tif": "TIFF", "tiff": "TIFF", "bmp": "BMP", "webp": "WEBP"}[
        name.rsplit(".", 1)[1].lower()
    ]
    Image.new("RGB", (12, 10), GREEN).save(path, format=fmt, **save)
    arr, original = decode_image(str(path), 16)
    assert arr.shape == (16, 16, 3)
    assert _close(arr[8, 8], GREEN, tol=6)
    assert tuple(original) == (12, 10)


@pytest.mark.parametrize("wide", [True, False])
def test_shorter_side_resize_then_centre_crop(tmp_path, wide):
    a = np.zeros((32, 96, 3), dtype=np.uint8)
    a[:, :32], a[:, 32:64], a[:, 64:] = RED, GREEN, BLUE  # three bands, left to right
    if not wide:
        a = a.transpose(1, 0, 2).copy()  # tall: bands top to bottom
    Image.fromarray(a).save(tmp_path / "bands.png")
    arr, original = decode_image(str(tmp_path / "bands.png"), 16)
    assert arr.shape == (16, 16, 3)
    assert tuple(original) == ((96, 32) if wide else (32, 96))
    inner = arr[1:-1, 1:-1]  # only the centre band survives; the outermost row/column may blend a little
    assert np.all(inner == np.array(GREEN, dtype=np.uint8))
    assert arr[..., 1].min() >= 200 and arr[..., 0].max() <= 40 and arr[..., 2].max() <= 40


@pytest.mark.parametrize(
    "kind, words",
    [
        ("empty", "empty"),
        ("truncated", "truncated"),
        ("truncated_png", "truncated"),
        ("text", "not an image"),
        ("random", "not an image"),
    ],
)
def test_decode_image_bad_files_raise_decode_error(tmp_path, kind, words):
    bad = _bad_files(tmp_path)
    path = next(p for p in bad if Path(p).stem == kind)
    with pytest.raises(DecodeError) as info:
        decode_image(path, 16)
    assert words in str(info.value).lower()


def test_decode_image_missing_file(tmp_path):
    with pytest.raises(DecodeError, match="not found"):
        decode_image(str(tmp_path / "nope.jpg"), 16)


# ----------------------------------------------------------------------------------------- folder sources


def _species_folder(root: Path) -> dict[str, tuple]:
    """Three species; some images nested deeper; each image a unique colour. Returns {path: colour}."""
    colours = {}
    layout = {
        "Amanita muscaria": ["a1.jpg", "a2.PNG", "deep/er/a3.png"],
        "Boletus edulis": ["b1.png", "sub/b2.JPG"],
        "Cantharellus": ["c1.tif", "c2.bmp"],
    }
    k = 0
    for species, names in layout.items():
        for name in names:
            k += 1
            colour = (20 * k, 255 - 20 * k, (60 * k) % 256)
            path = root / species / name
            path.parent.mkdir(parents=True, exist_ok=True)
            fmt = {"jpg": "JPEG", "png": "PNG", "tif": "TIFF", "bmp": "BMP"}[name.rsplit(".", 1)[1].lower()]
            Image.new("RGB", (10, 14), colour).save(path, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
            colours[str(path)] = colour
    (root / "Boletus edulis" / "notes.txt").write_text("found in the forest\n")
    (root / "README.md").write_text("not an image\n")
    (root / "Cantharellus" / ".hidden.jpg").write_bytes(b"")  # hidden files are not images of the set
    (root / ".thumbs").mkdir()
    _solid(root / ".thumbs" / "t.png")  # nor are hidden folders species
    return colours


def test_folder_labels_are_first_level_folder_names(tmp_path):
    colours = _species_folder(tmp_path / "data")
    ds = _load_quiet(tmp_path / "data", 16, cache_dir=tmp_path / "cache", workers=1)
    assert ds.class_names == ["Amanita muscaria", "Boletus edulis", "Cantharellus"]
    assert len(ds) == len(colours) == 7
    assert ds.skipped == []
    assert sorted(ds.paths) == sorted(colours)  # nested-deeper images count; notes.txt, README.md, .hidden ignored
    assert ds.labels.dtype == np.int64 and len(ds.labels) == len(ds)
    for i, path in enumerate(ds.paths):
        first_level = Path(path).relative_to(tmp_path / "data").parts[0]
        assert ds.class_names[ds.labels[i]] == first_level
        assert ds[i]["label"] == ds.labels[i]
        assert _close(ds.images[i][7, 7], colours[path], tol=6)  # image row i belongs to paths[i]
    assert np.bincount(ds.labels).tolist() == [3, 2, 2]


def test_flat_folder_is_unlabelled(tmp_path):
    for i in range(3):
        _solid(tmp_path / "flat" / f"{i}.png", (i * 50, 0, 0))
    (tmp_path / "flat" / "notes.txt").write_text("x")
    ds = _load_quiet(tmp_path / "flat", 16, cache_dir=tmp_path / "cache", workers=1)
    assert len(ds) == 3
    assert ds.class_names == [] and not ds.labelled
    assert ds.labels.tolist() == [-1, -1, -1]
    assert all(ds[i]["label"] == -1 for i in range(3))


def test_folder_with_every_mode_and_extension_loads_everything(tmp_path):
    root = tmp_path / "modes" / "sp"
    _solid(root / "l.png", 90, mode="L")
    p = Image.new("P", (8, 8), 0)
    p.putpalette([10, 200, 30] + [0] * 765)
    p.save(root / "p.png")
    p.save(root / "pt.png", transparency=0)
    _solid(root / "rgba.png", (255, 0, 0, 0), mode="RGBA")
    _solid(root / "cmyk.jpg", (0, 255, 255, 0), mode="CMYK")
    _solid(root / "cmyk.tif", (0, 255, 255, 0), mode="CMYK")
    Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)).save(root / "i16.png")
    _solid(root / "one.png", BLUE, size=(1, 1))
    _big_jpeg(root / "BIG.JPG")
    _solid(root / "upper.PNG", GREEN)
    _solid(root / "t.tif", GREEN)
    if features.check("webp"):
        _solid(root / "w.webp", GREEN, lossless=True)
    n = sum(1 for f in root.iterdir())
    ds = _load_quiet(tmp_path / "modes", 16, cache_dir=tmp_path / "cache", workers=1)
    assert len(ds) == n and ds.skipped == []
    assert ds.images.shape == (n, 16, 16, 3) and ds.images.dtype == np.uint8
    by_name = {Path(p).name: ds.images[i] for i, p in enumerate(ds.paths)}
    assert np.all(by_name["rgba.png"] == 255)
    assert np.all(by_name["pt.png"] == 255)
    assert _close(by_name["p.png"][4, 4], (10, 200, 30), tol=0)
    assert _close(by_name["cmyk.jpg"][8, 8], RED, tol=10) and _close(by_name["cmyk.tif"][8, 8], RED, tol=0)
    assert np.all(by_name["i16.png"] == 255)
    assert np.all(by_name["l.png"] == 90)
    assert tuple(ds.original_sizes[ds.paths.index(str(root / "one.png"))]) == (1, 1)


def test_empty_folder_is_a_data_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no image files"):
        load_dataset(str(tmp_path / "empty"), 16, cache_dir=tmp_path / "cache", workers=1)


def test_folder_with_only_non_images_is_a_data_error(tmp_path):
    (tmp_path / "d" / "sp").mkdir(parents=True)
    (tmp_path / "d" / "sp" / "notes.txt").write_text("x")
    (tmp_path / "d" / "sp" / "table.csv").write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match="no image files"):
        load_dataset(str(tmp_path / "d"), 16, cache_dir=tmp_path / "cache", workers=1)


def test_nonexistent_spec_and_non_csv_file_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="neither"):
        load_dataset(str(tmp_path / "nowhere"), 16, cache_dir=tmp_path / "cache")
    (tmp_path / "list.txt").write_text("a.jpg\n")
    with pytest.raises(DataError, match="not a .csv"):
        load_dataset(str(tmp_path / "list.txt"), 16, cache_dir=tmp_path / "cache")


# ----------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("workers", [1, 2])
def test_bad_files_are_skipped_with_one_warning(tmp_path, workers):
    root = tmp_path / "data"
    colours = {}
    for i, sp in enumerate(["alpha", "beta"]):
        for j in range(3):
            colour = (40 * (3 * i + j) + 10, 30, 200 - 30 * j)
            colours[str(_solid(root / sp / f"good{j}.png", colour))] = colour
    bad = {**_bad_files(root / "alpha"), **_bad_files(root / "beta" / "deeper")}
    (root / "alpha" / "notes.txt").write_text("ignored, not an image extension")
    total = len(colours) + len(bad)

    with pytest.warns(DataWarning) as record:
        ds = load_dataset(str(root), 16, cache_dir=tmp_path / "cache", workers=workers)
    ours = _data_warnings(record)
    assert len(ours) == 1
    message = str(ours[0].message)
    listing = _listed(message)  # the warning names 3
    for path in bad:
        assert path in listing
    assert "notes.txt" not in message + listing
    assert f"skipped {len(bad)} of {total}" in message

    assert len(ds) + len(ds.skipped) == total
    assert len(ds) == len(colours)
    skipped = dict(ds.skipped)
    assert set(skipped) == set(bad)
    for path, words in bad.items():
        assert words in skipped[path].lower(), (path, skipped[path])
    assert not any("notes.txt" in p for p in skipped)
    # Packed images stay aligned with their paths although bad files sit between good ones.
    assert sorted(ds.paths) == sorted(colours)
    for i, path in enumerate(ds.paths):
        assert _close(ds.images[i][8, 8], colours[path], tol=0)
    assert ds.class_names == ["alpha", "beta"]
    assert ds.summary().startswith(f"{len(colours)} images loaded, {len(bad)} skipped")


def test_strict_raises_listing_every_bad_file(tmp_path):
    root = tmp_path / "data"
    _solid(root / "sp" / "ok.png")
    bad = _bad_files(root / "sp")
    with pytest.raises(DataError) as info:
        load_dataset(str(root), 16, strict=True, cache_dir=tmp_path / "cache", workers=1)
    message = str(info.value)
    assert "strict" in message and f"{len(bad)} unusable" in message
    for path in bad:
        assert path in message
    assert set(dict(info.value.skipped)) == set(bad)


def test_many_bad_files_are_summarised_and_all_listed_in_a_file(tmp_path):
    # One short warning however many files are bad (laray train --data /tmp once printed 149 lines): the count,
    # the first few, and the file that names every one; the strict error names every one.
    _solid(tmp_path / "data" / "sp" / "ok.png")
    n = 60
    for i in range(n):
        (tmp_path / "data" / "sp" / f"empty{i:03d}.jpg").write_bytes(b"")
    with pytest.warns(DataWarning) as record:
        ds = load_dataset(str(tmp_path / "data"), 16, cache_dir=tmp_path / "cache", workers=2)
    ours = _data_warnings(record)
    assert len(ours) == 1
    message = str(ours[0].message)
    listing = re.search(r"all of them in (\S+)\)", message).group(1)
    assert f"skipped {n} of {n + 1}" in message and f"and {n - 3} more" in message
    assert len(message.splitlines()) == 5  # the count, 3 files, "... and 57 more"
    listed = dict(line.split("\t") for line in Path(listing).read_text().splitlines())
    assert sorted(Path(p).name for p in listed) == [f"empty{i:03d}.jpg" for i in range(n)]
    assert len(ds) == 1 and len(ds.skipped) == n
    with pytest.raises(DataError) as info:
        load_dataset(str(tmp_path / "data"), 16, strict=True, cache_dir=tmp_path / "cache", workers=1)
    assert f"{n} unusable" in str(info.value) and len(info.value.skipped) == n
    assert all(f"empty{i:03d}.jpg" in str(info.value) for i in range(n))


def test_strict_without_bad_files_loads(tmp_path):
    _solid(tmp_path / "data" / "sp" / "ok.png")
    ds = _load_quiet(tmp_path / "data", 16, strict=True, cache_dir=tmp_path / "cache", workers=1)
    assert len(ds) == 1


def test_folder_whose_every_image_is_bad(tmp_path):
    bad = _bad_files(tmp_path / "data" / "sp")
    with pytest.raises(DataError) as info:
        load_dataset(str(tmp_path / "data"), 16, cache_dir=tmp_path / "cache", workers=1)
    message = str(info.value)
    assert "no usable image" in message
    for path in bad:
        assert path in message
    assert set(dict(info.value.skipped)) == set(bad)


def test_images_beside_species_folders_are_skipped_and_counted(tmp_path):
    _solid(tmp_path / "data" / "sp" / "a.png")
    stray = _solid(tmp_path / "data" / "stray.png")
    with pytest.warns(DataWarning, match="stray.png"):
        ds = load_dataset(str(tmp_path / "data"), 16, cache_dir=tmp_path / "cache", workers=1)
    assert len(ds) == 1 and ds.skipped == [(str(stray), "not inside a species sub-folder")]


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file_is_skipped(tmp_path):
    _solid(tmp_path / "data" / "sp" / "ok.png")
    locked = _solid(tmp_path / "data" / "sp" / "locked.png")
    locked.chmod(0)
    try:
        with pytest.warns(DataWarning, match="locked.png"):
            ds = load_dataset(str(tmp_path / "data"), 16, cache_dir=tmp_path / "cache", workers=1)
        assert dict(ds.skipped)[str(locked)] == "permission denied"
    finally:
        locked.chmod(0o644)


# ----------------------------------------------------------------------------------------- CSV sources

DF20_ROWS = [  # image_path, species, genus, family
    ("img/a1.png", "Amanita muscaria", "Amanita", "Amanitaceae"),
    ("img/a2.png", "Amanita phalloides", "Amanita", "Amanitaceae"),
    ("img/b1.png", "Boletus edulis", "Boletus", "Boletaceae"),
    ("img/c1.png", "Cantharellus cibarius", "Cantharellus", "Cantharellaceae"),
    ("img/c2.png", "Cantharellus cibarius", "Cantharellus", "Cantharellaceae"),
]


def _df20(
    folder: Path,
    rows=DF20_ROWS,
    columns=("image_path", "species", "genus", "family"),
    make_images=True,
    image_folder: Path | None = None,
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = [",".join(columns)]
    for k, row in enumerate(rows):
        lines.append(",".join(row[: len(columns)]))
        if make_images:
            _solid((image_folder or folder) / row[0], (10 + 40 * k, 100, 200 - 30 * k))
    csv = folder / "metadata.csv"
    csv.write_text("\n".join(lines) + "\n")
    return csv


@pytest.mark.parametrize(
    "column, class_names, labels",
    [
        (
            "species",
            ["Amanita muscaria", "Amanita phalloides", "Boletus edulis", "Cantharellus cibarius"],
            [0, 1, 2, 3, 3],
        ),
        ("genus", ["Amanita", "Boletus", "Cantharellus"], [0, 0, 1, 2, 2]),
        ("family", ["Amanitaceae", "Boletaceae", "Cantharellaceae"], [0, 0, 1, 2, 2]),
    ],
)
def test_csv_label_column_selection(tmp_path, column, class_names, labels):
    csv = _df20(tmp_path / "df20")
    ds = _load_quiet(csv, 16, label_column=column, cache_dir=tmp_path / "cache", workers=1)
    assert ds.class_names == class_names
    assert ds.labels.tolist() == labels
    # relative paths resolved against the CSV's folder, in row order
    assert ds.paths == [str(tmp_path / "df20" / row[0]) for row in DF20_ROWS]
    assert [ds[i]["label"] for i in range(len(ds))] == labels


def test_csv_default_label_column_is_species(tmp_path):
    csv = _df20(tmp_path / "df20")
    ds = _load_quiet(csv, 16, cache_dir=tmp_path / "cache", workers=1)
    assert ds.class_names[ds.labels[0]] == "Amanita muscaria" and len(ds.class_names) == 4


def test_csv_image_root_overrides_the_csv_folder(tmp_path):
    images = tmp_path / "elsewhere"
    csv = _df20(tmp_path / "meta", image_folder=images)
    with pytest.raises(DataError, match="no usable image"):  # nothing under the CSV's own folder
        load_dataset(str(csv), 16, cache_dir=tmp_path / "cache", workers=1)
    ds = _load_quiet(csv, 16, image_root=str(images), cache_dir=tmp_path / "cache", workers=1)
    assert len(ds) == len(DF20_ROWS)
    assert ds.paths == [str(images / row[0]) for row in DF20_ROWS]


def test_csv_absolute_paths(tmp_path):
    _solid(tmp_path / "pics" / "x.png")
    csv = tmp_path / "meta" / "m.csv"
    csv.parent.mkdir()
    csv.write_text(f"image_path,species\n{tmp_path / 'pics' / 'x.png'},sp\n")
    ds = _load_quiet(csv, 16, cache_dir=tmp_path / "cache", workers=1)
    assert ds.paths == [str(tmp_path / "pics" / "x.png")] and ds.class_names == ["sp"]


def test_csv_without_species_column_is_unlabelled(tmp_path):
    csv = _df20(tmp_path / "df20", columns=("image_path",))
    ds = _load_quiet(csv, 16, cache_dir=tmp_path / "cache", workers=1)
    assert len(ds) == len(DF20_ROWS)
    assert ds.class_names == [] and ds.labels.tolist() == [-1] * len(DF20_ROWS)


def test_csv_label_column_none_is_unlabelled(tmp_path):
    csv = _df20(tmp_path / "df20")
    ds = _load_quiet(csv, 16, label_column=None, cache_dir=tmp_path / "cache", workers=1)
    assert ds.class_names == [] and set(ds.labels.tolist()) == {-1}


def test_csv_requested_label_column_missing_is_a_data_error(tmp_path):
    csv = _df20(tmp_path / "df20", columns=("image_path", "species"))
    with pytest.raises(DataError, match="genus") as info:
        load_dataset(str(csv), 16, label_column="genus", cache_dir=tmp_path / "cache", workers=1)
    assert "label column" in str(info.value)


def test_csv_missing_path_column_is_a_data_error(tmp_path):
    csv = tmp_path / "m.csv"
    csv.write_text("filename,species\na.png,x\n")
    with pytest.raises(DataError, match="image_path") as info:
        load_dataset(str(csv), 16, cache_dir=tmp_path / "cache", workers=1)
    assert "path column" in str(info.value)
    # ... and a custom path column is honoured
    _solid(tmp_path / "a.png")
    ds = _load_quiet(csv, 16, path_column="filename", cache_dir=tmp_path / "cache", workers=1)
    assert len(ds) == 1 and ds.class_names == ["x"]


def test_csv_row_with_missing_file_is_skipped_and_listed(tmp_path):
    rows = DF20_ROWS + [("img/gone.png", "Ghost", "Ghost", "Ghostaceae")]
    csv = _df20(tmp_path / "df20", rows=rows, make_images=False)
    for k, row in enumerate(DF20_ROWS):
        _solid(tmp_path / "df20" / row[0], (10 * k, 0, 0))
    bad = _bad_files(tmp_path / "df20" / "img")  # also rows naming undecodable files
    with csv.open("a") as f:
        for path in bad:
            f.write(f"img/{Path(path).name},Broken,Broken,Brokenaceae\n")
    total = len(rows) + len(bad)
    gone = str(tmp_path / "df20" / "img" / "gone.png")

    with pytest.warns(DataWarning) as record:
        ds = load_dataset(str(csv), 16, cache_dir=tmp_path / "cache", workers=1)
    ours = _data_warnings(record)
    assert len(ours) == 1
    listed = _listed(ours[0].message)
    for path in [gone, *bad]:
        assert path in listed
    skipped = dict(ds.skipped)
    assert set(skipped) == {gone, *bad}
    assert "not found" in skipped[gone] and "line 7" in skipped[gone]
    assert len(ds) == len(DF20_ROWS) and len(ds) + len(ds.skipped) == total
    # a label whose files failed to decode keeps its index; a row whose file is missing adds no label
    assert "Broken" in ds.class_names and "Ghost" not in ds.class_names
    assert all(ds.class_names[label] not in ("Ghost", "Broken") for label in ds.labels)

    with pytest.raises(DataError) as info:
        load_dataset(str(csv), 16, strict=True, cache_dir=tmp_path / "cache", workers=1)
    for path in [gone, *bad]:
        assert path in str(info.value)


def test_csv_whose_every_row_is_missing(tmp_path):
    csv = _df20(tmp_path / "df20", make_images=False)
    with pytest.raises(DataError, match="no usable image") as info:
        load_dataset(str(csv), 16, cache_dir=tmp_path / "cache", workers=1)
    assert "file not found" in str(info.value)


@pytest.mark.parametrize("content", [b"", b"image_path,species\n", b"\x89\xff\x00\xfe" * 64])
def test_unusable_csv_is_a_data_error_not_a_pandas_traceback(tmp_path, content):
    csv = tmp_path / "bad.csv"
    csv.write_bytes(content)
    with pytest.raises(DataError):
        load_dataset(str(csv), 16, cache_dir=tmp_path / "cache", workers=1)


# ----------------------------------------------------------------------------------------- items and batches


def test_items_are_normalised_dicts(tmp_path):
    _solid(tmp_path / "data" / "a" / "white.png", WHITE)
    _solid(tmp_path / "data" / "b" / "black.png", BLACK)
    ds = _load_quiet(tmp_path / "data", 20, cache_dir=tmp_path / "cache", workers=1)
    assert isinstance(ds, torch.utils.data.Dataset) and len(ds) == 2
    white = ds[ds.paths.index(str(tmp_path / "data" / "a" / "white.png"))]
    black = ds[ds.paths.index(str(tmp_path / "data" / "b" / "black.png"))]
    assert set(white) == {"image", "idx", "label"}
    assert white["image"].dtype == torch.float32 and white["image"].shape == (3, 20, 20)
    assert isinstance(white["idx"], int) and isinstance(white["label"], int)
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    for c in range(3):
        assert torch.allclose(white["image"][c], ((1 - mean[c]) / std[c]).expand(20, 20), atol=1e-5)
        assert torch.allclose(black["image"][c], (-mean[c] / std[c]).expand(20, 20), atol=1e-5)
    assert ds.class_names[white["label"]] == "a" and ds.class_names[black["label"]] == "b"
    assert [ds[i]["idx"] for i in range(2)] == [0, 1]


def test_dataloader_batches_items(tmp_path):
    for i in range(5):
        _solid(tmp_path / "data" / f"s{i % 2}" / f"{i}.png", (i * 40, 0, 0))
    ds = _load_quiet(tmp_path / "data", 16, cache_dir=tmp_path / "cache", workers=1)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=5, shuffle=False)))
    assert batch["image"].shape == (5, 3, 16, 16) and batch["image"].dtype == torch.float32
    assert batch["idx"].tolist() == [0, 1, 2, 3, 4]
    assert batch["label"].tolist() == ds.labels.tolist()


def test_uint8_batch_keeps_the_requested_order(tmp_path):
    for i in range(6):
        _noise(tmp_path / "data" / "sp" / f"{i}.png", size=(16, 16), seed=i)
    ds = _load_quiet(tmp_path / "data", 16, cache_dir=tmp_path / "cache", workers=1)
    indices = [4, 0, 5, 2, 2, 1]
    batch = ds.uint8_batch(indices)
    assert batch.dtype == torch.uint8 and batch.shape == (len(indices), 3, 16, 16)
    for row, i in zip(batch, indices):
        assert torch.equal(row, torch.from_numpy(np.array(ds.images[i])).permute(2, 0, 1))
    # normalising the fast path's batch gives the items' tensors
    from laray.data.dataset import normalize

    assert torch.allclose(normalize(batch[0]), ds[4]["image"])
    assert torch.equal(ds.uint8_batch(np.array([3])), ds.uint8_batch([3]))


def test_augment_off_by_default_and_random_when_on(tmp_path):
    _noise(tmp_path / "data" / "sp" / "n.png", size=(32, 32), seed=7)
    plain = _load_quiet(tmp_path / "data", 24, cache_dir=tmp_path / "cache", workers=1)
    torch.manual_seed(0)
    a = plain[0]["image"]
    torch.manual_seed(1)
    b = plain[0]["image"]
    assert torch.equal(a, b)

    aug = _load_quiet(tmp_path / "data", 24, augment=True, cache_dir=tmp_path / "cache", workers=1)
    torch.manual_seed(0)
    c = aug[0]["image"]
    torch.manual_seed(1)
    d = aug[0]["image"]
    assert c.shape == d.shape == (3, 24, 24) and c.dtype == torch.float32
    assert not torch.equal(c, d)
    torch.manual_seed(0)
    assert torch.equal(aug[0]["image"], c)  # seeded: reproducible
    assert np.array_equal(np.array(aug.images[0]), np.array(plain.images[0]))  # the cache itself is untouched


# ----------------------------------------------------------------------------------------- cache


def _cache_files(cache_dir: Path) -> list[str]:
    """Entries and temporaries; not the per-key decode locks nor the decode log, which stay by design."""
    return sorted(p.name for p in cache_dir.iterdir() if p.suffix != ".lock" and p.name != "decodes.log")


def test_cache_miss_then_hit(tmp_path, monkeypatch):
    paths = [str(_noise(tmp_path / "img" / f"{i}.png", size=(20, 20), seed=i)) for i in range(3)]
    bad = _bad_files(tmp_path / "img")
    paths += list(bad)
    cache = tmp_path / "cache"

    first = decode_cached(paths, 16, cache, workers=1)
    assert not first.cache_hit
    files = _cache_files(cache)
    assert files == sorted([f"{first.key}.npy", f"{first.key}.json"])  # no temporary files left behind
    assert (cache / f"{first.key}.lock").exists()
    assert len((cache / "decodes.log").read_text().splitlines()) == 1
    assert first.kept.tolist() == [0, 1, 2]
    assert first.images.shape == (3, 16, 16, 3)

    def boom(*args, **kwargs):
        raise AssertionError("decode_image called on a cache hit")

    monkeypatch.setattr(laray.data.cache, "decode_image", boom)
    second = decode_cached(paths, 16, cache, workers=1)
    assert second.cache_hit
    assert np.array_equal(np.asarray(second.images), np.asarray(first.images))
    assert second.kept.tolist() == first.kept.tolist()
    assert np.array_equal(second.original_sizes, first.original_sizes)
    assert second.failed == first.failed and {p for p, _ in second.failed} == set(bad)
    assert _cache_files(cache) == files


def test_load_dataset_uses_the_cache(tmp_path, monkeypatch):
    for i in range(3):
        _noise(tmp_path / "data" / "sp" / f"{i}.png", size=(20, 20), seed=i)
    bad = _bad_files(tmp_path / "data" / "sp")
    cache = tmp_path / "cache"
    with pytest.warns(DataWarning):
        first = load_dataset(str(tmp_path / "data"), 16, cache_dir=cache, workers=1)
    files = _cache_files(cache)
    assert files and not any(f.startswith(".") for f in files)

    monkeypatch.setattr(laray.data.cache, "decode_image", lambda *a, **k: pytest.fail("decoded again on a hit"))
    with pytest.warns(DataWarning) as record:  # the skipped files are still reported from the cache
        second = load_dataset(str(tmp_path / "data"), 16, cache_dir=cache, workers=1)
    assert len(_data_warnings(record)) == 1
    assert second.paths == first.paths and second.skipped == first.skipped and set(dict(second.skipped)) == set(bad)
    assert np.array_equal(np.asarray(second.images), np.asarray(first.images))
    assert np.array_equal(second.labels, first.labels)
    assert _cache_files(cache) == files


def test_changed_file_invalidates_the_cache(tmp_path):
    # BMP: same dimensions give the same byte count, so only the modification time tells the change.
    paths = [str(_solid(tmp_path / "img" / f"{i}.bmp", (50 * i, 0, 0))) for i in range(3)]
    cache = tmp_path / "cache"
    first = decode_cached(paths, 16, cache, workers=1)
    assert not first.cache_hit and np.all(first.images[1] == (50, 0, 0))
    assert decode_cached(paths, 16, cache, workers=1).cache_hit

    before = os.stat(paths[1])
    _solid(Path(paths[1]), (0, 0, 222))
    os.utime(paths[1], ns=(before.st_atime_ns, before.st_mtime_ns + 5_000_000_000))
    assert os.stat(paths[1]).st_size == before.st_size
    changed = decode_cached(paths, 16, cache, workers=1)
    assert not changed.cache_hit
    assert np.all(changed.images[1] == (0, 0, 222))  # the new content, not the cached one
    assert np.all(changed.images[0] == (0, 0, 0)) and np.all(changed.images[2] == (100, 0, 0))
    assert decode_cached(paths, 16, cache, workers=1).cache_hit


def test_changed_file_invalidates_load_dataset(tmp_path):
    path = _solid(tmp_path / "data" / "sp" / "a.png", RED)
    _solid(tmp_path / "data" / "sp" / "b.png", GREEN)
    cache = tmp_path / "cache"
    ds = _load_quiet(tmp_path / "data", 16, cache_dir=cache, workers=1)
    assert np.all(ds.images[ds.paths.index(str(path))] == RED)
    _solid(path, BLUE, size=(9, 9))
    os.utime(path, (1_000_000_000, 1_000_000_000))
    ds = _load_quiet(tmp_path / "data", 16, cache_dir=cache, workers=1)
    assert np.all(ds.images[ds.paths.index(str(path))] == BLUE)
    assert tuple(ds.original_sizes[ds.paths.index(str(path))]) == (9, 9)


def test_interrupted_decode_leaves_no_cache_entry(tmp_path, monkeypatch):
    paths = [str(_solid(tmp_path / "img" / f"{i}.png", (30 * i, 0, 0))) for i in range(3)]
    cache = tmp_path / "cache"
    real = laray.data.cache.decode_image
    calls = []

    def dies_on_the_second(path, size):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(path, size)

    monkeypatch.setattr(laray.data.cache, "decode_image", dies_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        decode_cached(paths, 16, cache, workers=1)
    assert _cache_files(cache) == []  # neither a half-written entry nor a temporary file
    monkeypatch.setattr(laray.data.cache, "decode_image", real)
    again = decode_cached(paths, 16, cache, workers=1)
    assert not again.cache_hit and again.kept.tolist() == [0, 1, 2]
    assert np.all(again.images[2] == (60, 0, 0))


def test_other_image_size_or_file_list_is_a_miss(tmp_path):
    paths = [str(_noise(tmp_path / "img" / f"{i}.png", size=(20, 20), seed=i)) for i in range(2)]
    cache = tmp_path / "cache"
    assert not decode_cached(paths, 16, cache, workers=1).cache_hit
    other = decode_cached(paths, 24, cache, workers=1)
    assert not other.cache_hit and other.images.shape == (2, 24, 24, 3)
    assert decode_cached(paths, 24, cache, workers=1).cache_hit
    assert not decode_cached(paths[:1], 16, cache, workers=1).cache_hit
    assert fingerprint(paths, 16) != fingerprint(paths, 24) != fingerprint(paths[::-1], 24)
    assert len(_cache_files(cache)) == 6 and not any(f.startswith(".") for f in _cache_files(cache))


def test_process_pool_matches_single_process(tmp_path):
    paths = [str(_noise(tmp_path / "img" / f"{i}.png", size=(24, 18), seed=i)) for i in range(9)]
    bad = _bad_files(tmp_path / "img")
    paths = paths[:4] + list(bad)[:2] + paths[4:] + list(bad)[2:]
    one = decode_cached(paths, 16, tmp_path / "c1", workers=1)
    two = decode_cached(paths, 16, tmp_path / "c2", workers=2)
    assert not two.cache_hit
    assert np.array_equal(np.asarray(one.images), np.asarray(two.images))
    assert one.kept.tolist() == two.kept.tolist() == [0, 1, 2, 3, 6, 7, 8, 9, 10]
    assert len(one.failed) == len(bad) and {p for p, _ in one.failed} == set(bad)
    assert np.array_equal(one.original_sizes, two.original_sizes)
    assert two.original_sizes.tolist() == [[24, 18]] * 9
    assert one.failed == two.failed
    assert not any(f.startswith(".") for f in _cache_files(tmp_path / "c2"))


def test_nothing_written_outside_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    _solid(tmp_path / "data" / "sp" / "a.png")
    _load_quiet(tmp_path / "data", 16, cache_dir=tmp_path / "mine", workers=1)
    assert not (tmp_path / "xdg").exists()
    assert _cache_files(tmp_path / "mine")


# ----------------------------------------------------------------------------------------- digits and arguments


def test_digits(tmp_path):
    from sklearn.datasets import load_digits

    ds = load_dataset("digits", 16, cache_dir=tmp_path / "cache")
    target = load_digits().target
    assert len(ds) == 1797 and len(ds.images) == 1797
    assert ds.class_names == [str(c) for c in range(10)]
    assert np.array_equal(ds.labels, target)
    item = ds[5]
    assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.float32
    assert item["label"] == int(target[5]) and item["idx"] == 5
    raw = np.array(ds.images[5])
    assert (
        raw.dtype == np.uint8 and np.array_equal(raw[..., 0], raw[..., 1]) and np.array_equal(raw[..., 0], raw[..., 2])
    )
    assert raw.max() > 100  # upscaled grey levels, not 0..16
    assert ds.uint8_batch([3, 1]).shape == (2, 3, 16, 16)


def test_digits_other_size_and_augment(tmp_path):
    ds = load_dataset("digits", 28, cache_dir=tmp_path / "cache")
    assert ds[0]["image"].shape == (3, 28, 28) and ds.image_size == 28
    assert torch.equal(ds[0]["image"], ds[0]["image"])
    aug = load_dataset("digits", 28, augment=True, cache_dir=tmp_path / "cache")
    torch.manual_seed(0)
    a = aug[0]["image"]
    torch.manual_seed(1)
    assert a.shape == (3, 28, 28) and not torch.equal(a, aug[0]["image"])


@pytest.mark.parametrize("size", [0, -1, 3.5, "32", None])
def test_bad_image_size_is_a_data_error(tmp_path, size):
    _solid(tmp_path / "data" / "sp" / "a.png")
    with pytest.raises(DataError, match="image_size"):
        load_dataset("digits", size, cache_dir=tmp_path / "cache")
    with pytest.raises(DataError, match="image_size"):
        load_dataset(str(tmp_path / "data"), size, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_bool_image_size_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="image_size"):
        load_dataset("digits", True, cache_dir=tmp_path / "cache")
