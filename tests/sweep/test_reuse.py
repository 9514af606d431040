"""laray's trainable in workers that Tune reuses across trials (TuneConfig(reuse_actors=True)).

The same three trials (three temperatures, one at a time) run twice through Tune, as the driver runs
them (tune.with_parameters, laray's RunConfig), once with a fresh worker per trial and once with one
worker for all: each trial must leave the same results and files either way, and the reused worker
must have opened the data set once. 120 of the digits as PNG files, a tiny VGG: about a minute on 2 cores.
"""

import json
from pathlib import Path

import pytest
from conftest import write_digit_folder

from laray.data.dataset import describe, open_dataset
from laray.settings.space import parse_space
from laray.sweep.trainable import train_trial
from laray.training.run import stored_stage1

TEMPERATURES = [0.07, 0.2, 0.5]
SPACE = {
    "num_samples": 3,
    "max_concurrent": 1,
    "grace_period": 2,
    "confirm_top": 0,
    "fixed": {
        "autoencoder": {"arch": "vgg11_bn", "width": 0.125, "image_size": 32, "epochs": 1, "batch_size": 32},
        "la": {"epochs": 2, "batch_size": 32, "k_neighbours": 10, "n_centroids": 12, "clustering_repeats": 1},
    },
    "search": {"temperature": {"categorical": TEMPERATURES}},
}


def run_trials(storage: Path, name: str, reuse: bool, data, stage1, space) -> dict:
    """{temperature: the trial's folder} of three trials, one at a time, workers reused or not."""
    from ray import tune

    from laray.sweep.ray_setup import run_config

    trainable = tune.with_parameters(
        train_trial, data=data.digest(), stage1=stage1, space=space, seed=0, device="cpu", threads=1, quiet=True
    )
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": 1, "gpu": 0}),
        param_space={"temperature": tune.grid_search(TEMPERATURES)},
        tune_config=tune.TuneConfig(max_concurrent_trials=1, reuse_actors=reuse),
        run_config=run_config(name, str(storage), 0, 0, "search", space),
    )
    results = tuner.fit()
    assert not results.errors, results.errors
    return {r.config["temperature"]: Path(r.path) for r in results}


@pytest.fixture(scope="module")
def both(ray_session, tmp_path_factory):
    import ray

    folder = write_digit_folder(tmp_path_factory.mktemp("digits"), 120)
    data = describe(str(folder), 32)
    space = parse_space(SPACE)
    store = tmp_path_factory.mktemp("store")
    stage1 = ray.put(stored_stage1(open_dataset(data), space.ae, [space.la.merger], 0, "cpu", store, progress=False))
    storage = tmp_path_factory.mktemp("sweeps")
    return {reuse: run_trials(storage, f"reuse-{reuse}", reuse, data, stage1, space) for reuse in (False, True)}


def read(folder: Path, name: str) -> dict:
    return json.loads((folder / name).read_text())


def test_a_reused_worker_gives_the_same_trial_results_as_fresh_ones(both):
    for t in TEMPERATURES:
        fresh, reused = read(both[False][t], "metrics.json"), read(both[True][t], "metrics.json")
        assert reused["config"]["la"]["temperature"] == t
        assert [h["loss"] for h in reused["history"]] == pytest.approx([h["loss"] for h in fresh["history"]], rel=1e-6)
        for score in ("purity", "nmi", "ari", "acc"):
            assert reused[score] == pytest.approx(fresh[score], rel=1e-6), (t, score)
        for name in ("assignments.csv", "codes.npy", "worker.json", "progress.csv"):  # in the trial's own folder
            assert (both[True][t] / name).exists(), (t, name)
        assert (both[True][t] / "assignments.csv").read_text() == (both[False][t] / "assignments.csv").read_text()


def test_a_reused_worker_runs_every_trial_and_opens_the_data_once(both):
    fresh = sorted((read(f, "worker.json") for f in both[False].values()), key=lambda w: w["started_at"])
    reused = sorted((read(f, "worker.json") for f in both[True].values()), key=lambda w: w["started_at"])
    assert [w["trial_in_worker"] for w in fresh] == [1, 1, 1]
    assert len({w["pid"] for w in fresh}) == 3
    assert not any(w["data_reused"] for w in fresh)
    assert [w["trial_in_worker"] for w in reused] == [1, 2, 3]
    assert len({w["pid"] for w in reused}) == 1
    assert [w["data_reused"] for w in reused] == [False, True, True]
    assert not any(w["decoded_here"] for w in reused[1:])  # only a trial that opened the data can have decoded it
    for w in reused:
        assert w["startup_s"] >= w["open_data_s"] >= 0
