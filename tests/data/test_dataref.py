"""Data by reference: the driver lists, each node decodes once into its own cache and checks its files."""

import multiprocessing
import os
import pickle
import shutil

import numpy as np
import pytest
from conftest import write_digit_folder

import laray.data.cache
from laray.data.cache import default_cache_dir
from laray.data.dataset import DataError, DataRef, describe, load_dataset, open_dataset


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_digit_folder(tmp_path_factory.mktemp("digits"), 300)


def test_describe_lists_without_decoding(folder, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("describe decoded an image")

    monkeypatch.setattr(laray.data.cache, "decode_image", boom)
    ref = describe(str(folder), 64)
    assert len(ref) == 300 and ref.image_size == 64
    assert ref.class_names == tuple(f"digit{i}" for i in range(10))
    assert all(os.path.isabs(p) for p in ref.paths)
    assert ref.sizes.tolist() == [os.path.getsize(p) for p in ref.paths]
    assert ref.decoded_bytes == 300 * 64 * 64 * 3


def test_a_relative_spec_is_listed_again_from_another_folder(folder, tmp_path, monkeypatch):
    """A trial runs in its own folder: `--data ../photos` typed at the driver must still name the same files."""
    from laray.data.dataref import relist

    monkeypatch.chdir(folder.parent)
    ref = describe(os.path.join(".", folder.name), 32)
    assert ref.spec == str(folder)
    monkeypatch.chdir(tmp_path)  # where a trial runs
    again = relist(ref.digest())
    assert again.spec == ref.spec and again.key == ref.key and len(again) == 300


def test_reference_is_a_small_fraction_of_the_decoded_images(folder):
    ref = describe(str(folder), 64)
    pickled = len(pickle.dumps(ref))
    assert pickled < ref.decoded_bytes / 50  # 300 paths and labels against 3.7 MB of pixels
    assert not any(isinstance(v, np.ndarray) and v.size >= 64 * 64 * 3 for v in vars(ref).values())


def test_open_dataset_equals_load_dataset_and_keys_by_the_driver_listing(folder, tmp_path):
    ref = describe(str(folder), 32)
    opened = open_dataset(ref, tmp_path / "node")
    loaded = load_dataset(str(folder), 32, cache_dir=tmp_path / "local")
    assert opened.decoded_here and loaded.decoded_here  # each decoded into its own cache folder
    assert np.array_equal(np.asarray(opened.images), np.asarray(loaded.images))
    assert opened.paths == loaded.paths and np.array_equal(opened.labels, loaded.labels)
    assert opened.fingerprint == loaded.fingerprint == ref.key
    assert opened.labels_key == loaded.labels_key == ref.labels_key
    again = open_dataset(ref.digest(), tmp_path / "node")  # as a trial on another node opens it
    assert not again.decoded_here  # mapped from the node's cache
    assert again.paths == opened.paths and again.labels_key == ref.labels_key
    assert (tmp_path / "node" / f"{ref.key}.npy").exists()


def test_digits_by_reference():
    ref = describe("digits", 16)
    assert ref.paths == () and len(ref) == 1797
    assert len(pickle.dumps(ref)) < 20_000
    dataset = open_dataset(ref)
    assert len(dataset) == 1797 and dataset.labels_key == ref.labels_key
    assert np.array_equal(dataset.labels, ref.labels)


def _copy_of(folder, to):
    shutil.copytree(folder, to)
    return to


def test_a_node_whose_files_differ_is_refused_naming_them(folder, tmp_path):
    copy = _copy_of(folder, tmp_path / "copy")
    digest = describe(str(copy), 32).digest()
    n3, n7 = (len(os.listdir(copy / f"digit{d}")) for d in (3, 7))
    with open(copy / "digit3" / sorted(os.listdir(copy / "digit3"))[0], "ab") as handle:
        handle.write(b"more bytes")  # same count, another size
    os.remove(copy / "digit7" / sorted(os.listdir(copy / "digit7"))[0])
    with pytest.raises(DataError) as err:
        open_dataset(digest, tmp_path / "cache")
    message = str(err.value)
    assert "differ from the driver's listing" in message and "299 file(s) here, 300 at the driver" in message
    assert (
        f"2 group(s) differ: 'digit3' ({n3} files each: other names or sizes), "
        f"'digit7' ({n7 - 1} here, {n7} at the driver)"
    ) in message
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").glob("*.npy"))  # nothing decoded


def test_a_node_missing_a_whole_species_is_refused_naming_it(folder, tmp_path):
    copy = _copy_of(folder, tmp_path / "copy")
    digest = describe(str(copy), 32).digest()
    n0 = len(os.listdir(copy / "digit0"))
    shutil.rmtree(copy / "digit0")
    with pytest.raises(DataError, match=f"'digit0' \\(0 here, {n0} at the driver\\)"):
        open_dataset(digest, tmp_path / "cache")


def test_a_node_without_the_folder_is_refused_naming_itself(folder, tmp_path):
    copy = _copy_of(folder, tmp_path / "copy")
    digest = describe(str(copy), 32).digest()
    shutil.rmtree(copy)
    with pytest.raises(DataError, match=r"node .+ cannot list the driver's data: .*copy"):
        open_dataset(digest, tmp_path / "cache")


def test_the_digest_does_not_grow_with_the_number_of_files():
    """What travels to every trial: one entry per species, none per file (the object store stays flat in N)."""

    def synthetic(n):
        paths = tuple(f"/data/df20/species{i % 100:03d}/{i:09d}-observation.JPG" for i in range(n))
        return DataRef(
            "/data/df20",
            224,
            paths,
            np.full(n, 40_000, np.int64),
            np.arange(n) % 100,
            tuple(f"species{c:03d}" for c in range(100)),
            "k" * 16,
        )

    small, large = (len(pickle.dumps(synthetic(n).digest())) for n in (1_000, 100_000))
    assert small < 12_000 and large - small < 200  # ~60 bytes a species (the counts take a byte more each)
    assert len(pickle.dumps(synthetic(100_000))) > 100 * large


def test_a_copy_with_other_modification_times_is_accepted(folder, tmp_path):
    copy = _copy_of(folder, tmp_path / "copy")
    ref = describe(str(copy), 32)
    for path in ref.paths:  # e.g. rsync without -t: same bytes, new times
        os.utime(path, ns=(1, 1))
    dataset = open_dataset(ref.digest(), tmp_path / "cache")
    assert len(dataset) == 300 and dataset.fingerprint == ref.key


def test_cache_dir_defaults_to_laray_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("LARAY_CACHE_DIR", str(tmp_path / "node-local"))
    assert default_cache_dir() == tmp_path / "node-local"
    monkeypatch.delenv("LARAY_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "laray"


def _open_in_child(digest, cache, start, results):
    start.wait()
    results.put(open_dataset(digest, cache, workers=1).decoded_here)


def test_processes_opening_at_once_decode_once(folder, tmp_path):
    """The trials of one node start together: one decodes under the lock, the others wait and map."""
    ref = describe(str(folder), 48)
    cache = tmp_path / "cache"
    context = multiprocessing.get_context("fork")
    start, results = context.Event(), context.Queue()
    children = [context.Process(target=_open_in_child, args=(ref.digest(), cache, start, results)) for _ in range(3)]
    for child in children:
        child.start()
    start.set()
    decoded = sorted(results.get(timeout=120) for _ in children)
    for child in children:
        child.join(timeout=60)
        assert child.exitcode == 0
    assert decoded == [False, False, True]
    assert len((cache / "decodes.log").read_text().splitlines()) == 1
