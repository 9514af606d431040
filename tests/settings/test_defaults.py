"""The bundled settings chosen by the data and the devices, and the first console line that says so."""

import dataclasses

import pytest
from conftest import write_digit_folder

from laray.cli.main import main
from laray.errors import LarayError
from laray.settings.defaults import CPU_PHOTOS, DEMO, GPU_PHOTOS, choose, demo_configs, fit_to_size, train_configs
from laray.settings.space import SpaceError, load_space, parse_space


@pytest.mark.parametrize(
    "spec, cuda, space",
    [
        ("digits", False, DEMO),
        ("digits", True, DEMO),
        ("photos/", False, CPU_PHOTOS),
        ("fungi.csv", False, CPU_PHOTOS),
        ("photos/", True, GPU_PHOTOS),
    ],
)
def test_settings_are_chosen_by_the_data_and_cuda(spec, cuda, space):
    assert choose(spec, cuda).space == space


def test_the_announcement_names_the_settings_the_reason_and_how_to_choose_others():
    line = choose("photos/", cuda=False).announcement("--space FILE")
    assert line == (
        "settings: photos-cpu (search_spaces/photos-cpu.yaml): photos and no CUDA device here, so sized "
        "for a CPU; choose others with --space FILE"
    )


def test_every_bundled_space_has_a_recipe_for_each_searched_setting():
    for name in (DEMO, CPU_PHOTOS, GPU_PHOTOS):
        space = load_space(name)
        assert set(space.recipe) == set(space.search), name
        ae, la = train_configs(space)
        assert ae == space.ae and la.holdout == 0.0  # laray train scores every image
        assert all(getattr(la, k) == v for k, v in space.recipe.items())


def test_the_digits_defaults_are_the_demo_recipe():
    ae, la = demo_configs()
    assert (ae.arch, ae.width, ae.image_size, ae.epochs) == ("vgg11_bn", 0.25, 32, 5)
    assert (la.temperature, la.mixing_rate, la.k_neighbours, la.clustering_repeats, la.n_centroids) == (
        0.04,
        0.1,
        300,
        7,
        240,
    )
    assert (la.epochs, la.flip, la.augment) == (10, False, True)


def test_photo_settings_for_a_cpu_are_cpu_sized_and_mirror():
    ae, la = train_configs(load_space(CPU_PHOTOS))
    assert ae.pretrained is None and ae.image_size <= 96 and ae.width < 1 and la.flip
    assert load_space(CPU_PHOTOS).data is None  # it fits any photos: --data names them


def test_a_recipe_must_name_searched_settings_with_valid_values():
    raw = {"search": {"temperature": {"loguniform": [0.03, 0.3]}}}
    assert parse_space({**raw, "recipe": {"temperature": "5e-2"}}).recipe == {"temperature": 0.05}
    with pytest.raises(SpaceError, match=r"recipe key\(s\) \['mixing_rate'\] are not searched"):
        parse_space({**raw, "recipe": {"mixing_rate": 0.1}})
    with pytest.raises(SpaceError, match="recipe: temperature must be > 0"):
        parse_space({**raw, "recipe": {"temperature": -1}})
    with pytest.raises(SpaceError, match="recipe must be a mapping"):
        parse_space({**raw, "recipe": [0.1]})


def test_fit_to_size_clips_only_the_bundled_values():
    _, defaults = train_configs(load_space(GPU_PHOTOS))  # k 500, C 100
    fitted = fit_to_size(defaults, defaults, 60)
    assert (fitted.k_neighbours, fitted.n_centroids) == (59, 60)
    mine = dataclasses.replace(defaults, k_neighbours=80)  # the user's value: left for check_data_size to refuse
    assert fit_to_size(mine, defaults, 60).k_neighbours == 80
    assert fit_to_size(defaults, defaults, 10_000) == defaults


@pytest.fixture
def photos(tmp_path):
    return write_digit_folder(tmp_path / "photos", 24, size=40)


@pytest.mark.parametrize("cuda, space", [(False, CPU_PHOTOS), (True, GPU_PHOTOS)])
def test_laray_train_takes_the_chosen_settings_and_says_so_first(photos, tmp_path, capsys, monkeypatch, cuda, space):
    monkeypatch.setattr("laray.settings.defaults.cuda_available", lambda: cuda)
    taken = {}

    def fake_run(dataset, out, ae_cfg, la_cfg, **kwargs):
        taken.update(ae=ae_cfg, la=la_cfg, n=len(dataset))
        raise LarayError("stopped before training")

    monkeypatch.setattr("laray.training.run.train_run", fake_run)
    argv = ["train", "--data", str(photos), "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")]
    assert main(argv) == 1
    stdout = capsys.readouterr().out
    assert stdout.splitlines()[0].startswith(f"settings: {space} (search_spaces/{space}.yaml): photos")
    ae, la = train_configs(load_space(space))
    assert taken["ae"] == ae and taken["n"] == 24
    assert taken["la"] == fit_to_size(la, la, 24)  # the recipe, clipped to 24 images where it must be


def test_laray_train_on_digits_says_demo_and_names_config_laid_over(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(
        "laray.settings.defaults.cuda_available", lambda: True
    )  # digits take the demo's settings anyway
    monkeypatch.setattr("laray.training.run.train_run", lambda *a, **k: (_ for _ in ()).throw(LarayError("stop")))
    config = tmp_path / "c.yaml"
    config.write_text("la: {epochs: 2}\n")
    assert main(["train", "--out", str(tmp_path / "out"), "--config", str(config)]) == 1
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("settings: demo (search_spaces/demo.yaml): the embedded digits")
    assert first.endswith(f"--config {config} is laid over them")


@pytest.mark.parametrize(
    "argv, cuda, space, gpus",
    [
        ([], True, DEMO, 1),
        (["--data", "PHOTOS"], False, CPU_PHOTOS, 0),
        (["--data", "PHOTOS"], True, GPU_PHOTOS, 1),
        (["--data", "PHOTOS", "--device", "cpu"], True, CPU_PHOTOS, 0),
        (["--data", "PHOTOS", "--gpus-per-trial", "0.5"], False, GPU_PHOTOS, 0.5),
    ],
)
def test_laray_sweep_chooses_by_data_and_the_trials_gpus_and_says_so_first(
    photos, tmp_path, capsys, monkeypatch, argv, cuda, space, gpus
):
    monkeypatch.setattr("laray.settings.defaults.cuda_available", lambda: cuda)
    chosen = {}

    def fake_sweep(data, space, *args, **kwargs):
        chosen.update(space=space, gpus=kwargs["trial"].gpus)
        raise LarayError("stopped before the search")

    monkeypatch.setattr("laray.sweep.ray_setup.ray_init", lambda *a, **k: None)
    monkeypatch.setattr("laray.sweep.driver.run_sweep", fake_sweep)
    argv = ["sweep", "--storage", str(tmp_path)] + [str(photos) if a == "PHOTOS" else a for a in argv]
    assert main(argv) == 1
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith(f"settings: {space} (search_spaces/{space}.yaml): ")
    assert first.endswith("choose others with --space FILE (laray sweep --help)")
    assert chosen["space"].source == str(load_space(space).source) and chosen["gpus"] == gpus


def test_laray_sweep_with_a_space_prints_no_choice_and_a_space_without_data_asks_for_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("laray.sweep.driver.run_sweep", lambda *a, **k: (_ for _ in ()).throw(AssertionError("ran")))
    assert main(["sweep", "--space", CPU_PHOTOS, "--storage", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.strip() == (
        f"laray: error: the search space {load_space(CPU_PHOTOS).source} names no data set: give --data FOLDER_OR_CSV"
    )


class FakeNVML:
    """libnvidia-ml as ctypes loads it: init, a device count written through a pointer, shutdown."""

    def __init__(self, devices: int, init_status: int = 0):
        self.devices, self.init_status, self.shut = devices, init_status, False

    def nvmlInit_v2(self):
        return self.init_status

    def nvmlDeviceGetCount_v2(self, count_pointer):
        count_pointer._obj.value = self.devices
        return 0

    def nvmlShutdown(self):
        self.shut = True


@pytest.mark.parametrize(
    "devices, visible, expected", [(2, None, True), (0, None, False), (2, "", False), (2, "-1", False), (1, "0", True)]
)
def test_cuda_available_asks_the_nvidia_driver_and_honours_cuda_visible_devices(
    monkeypatch, devices, visible, expected
):
    import laray.settings.defaults

    nvml = FakeNVML(devices)
    monkeypatch.setattr(
        laray.settings.defaults.ctypes, "CDLL", lambda name: nvml if name == "libnvidia-ml.so.1" else None
    )
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert laray.settings.defaults.cuda_available() is expected


def test_cuda_available_is_false_without_a_driver_or_when_it_fails_to_start(monkeypatch):
    import laray.settings.defaults

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)

    def no_library(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(laray.settings.defaults.ctypes, "CDLL", no_library)
    assert laray.settings.defaults.cuda_available() is False
    monkeypatch.setattr(
        laray.settings.defaults.ctypes, "CDLL", lambda name: FakeNVML(2, init_status=9)
    )  # driver not loaded
    assert laray.settings.defaults.cuda_available() is False


def test_the_recipe_point_is_what_laray_train_runs_clipped_to_the_data():
    from laray.settings.defaults import recipe_point

    space = load_space("demo")
    point = recipe_point(space, 1797)
    assert point == dict(space.recipe) and set(point) == set(space.search)
    _, la = train_configs(space)
    assert all(getattr(la, name) == value for name, value in point.items())
    raw = {
        "fixed": {"la": {"n_centroids": 240}},
        "search": {"k_neighbours": {"int": [10, 500]}, "n_centroids": {"fraction": [0.1, 0.5]}},
        "recipe": {"k_neighbours": 300},
    }
    spaced = parse_space(raw)  # n_centroids: no recipe value, so the fixed one
    assert recipe_point(spaced, 1797) == {"k_neighbours": 300, "n_centroids": 240}
    assert recipe_point(spaced, 200) == {"k_neighbours": 199, "n_centroids": 200}  # clipped to what N allows
