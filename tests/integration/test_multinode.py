"""A multi-node rehearsal on one machine: `ray.cluster_utils.Cluster` with a head that runs no trials and two
worker nodes, each with its own node-local cache folder (LARAY_CACHE_DIR in its environment) and no shared
stage-1 store. `laray sweep --address --stage1-workers 2` drives 4 trials from a separate process (stage 1 on
both worker nodes at once), is killed mid-sweep (SIGKILL) and resumed. What real nodes would not share, these
do not use: trials read no folder but their node's cache.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from conftest import write_digit_folder

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
from object_store import object_store_bytes  # noqa: E402

N_IMAGES, SIZE, TRIALS = 1000, 64, 4
SPACE = {
    "num_samples": TRIALS,
    "max_concurrent": 2,
    "grace_period": 2,
    "confirm_top": 0,
    "fixed": {
        "autoencoder": {"arch": "vgg11_bn", "width": 0.125, "image_size": SIZE, "epochs": 1, "batch_size": 50},
        "la": {"epochs": 2, "batch_size": 50},
    },
    "search": {
        "temperature": {"loguniform": [0.05, 0.5]},
        "mixing_rate": {"uniform": [0.3, 0.9]},
        "k_neighbours": {"int": [5, 50]},
        "clustering_repeats": {"int": [1, 2]},
        "n_centroids": {"int": [10, 40]},
    },
}
NAME = "rehearsal"


class PeakSampler(threading.Thread):
    """Samples each local raylet's object-store bytes (an upper bound on its peak) while the sweep runs."""

    def __init__(self, raylets: dict):
        super().__init__(daemon=True)
        self.raylets, self.peak, self.done = raylets, {name: 0 for name in raylets}, threading.Event()

    def run(self):
        while not self.done.wait(0.2):
            used = object_store_bytes()
            for name, pid in self.raylets.items():
                self.peak[name] = max(self.peak[name], used.get(pid, 0))


def _raylet_pid(node) -> int:
    return node.all_processes["raylet"][0].process.pid


def _trial_folders(experiment: Path) -> list[Path]:
    return sorted(f for f in experiment.glob("train_trial_*") if f.is_dir())


def _swept_trials(experiment: Path) -> list[Path]:
    """The sweep's trials as Tune recorded them (a trial the killed driver started but never saved has a
    folder too, which the resumed sweep replaced by a new trial)."""
    from ray.tune import ExperimentAnalysis

    return [Path(t.path) for t in ExperimentAnalysis(str(experiment)).trials]


def _finished(folder: Path) -> bool:
    """Whether the trial has written its last LA epoch's outputs. Read off the metrics.json the trial itself
    writes into its folder every epoch, not Tune's progress.csv: the driver writes that into a staging folder
    and copies it here only every so often, by which time the other trials may have finished as well."""
    from laray.training.stages import STAGE_LA

    try:
        history = json.loads((folder / "metrics.json").read_text())["history"]
    except (OSError, ValueError):  # not written yet (it is replaced atomically, so never torn)
        return False
    return sum(r["stage"] == STAGE_LA for r in history) == SPACE["fixed"]["la"]["epochs"]


def _sweep_command(address: str, tmp: Path, data: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "laray.cli.main",
        "sweep",
        "--address",
        address,
        "--space",
        str(tmp / "space.yaml"),
        "--data",
        str(data),
        "--storage",
        str(tmp / "results"),
        "--name",
        NAME,
        "--stage1-workers",  # one on each worker node: stage 1 data-parallel across the two (Ray Train over gloo)
        "2",
        *extra,
    ]


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    from ray.cluster_utils import Cluster

    tmp = tmp_path_factory.mktemp("multinode")
    data = write_digit_folder(tmp / "photos", N_IMAGES, SIZE)
    (tmp / "space.yaml").write_text(yaml.safe_dump(SPACE))
    store_memory = 100 * 1024**2
    saved = os.environ.get("LARAY_CACHE_DIR")
    cluster = Cluster(
        initialize_head=True,
        connect=False,
        head_node_args={"num_cpus": 0, "include_dashboard": False, "object_store_memory": store_memory},
    )
    workers = {}
    try:
        for name in ("worker_a", "worker_b"):
            os.environ["LARAY_CACHE_DIR"] = str(tmp / name / "cache")  # what `ray start` on that node would get
            workers[name] = cluster.add_node(num_cpus=1, object_store_memory=store_memory)
    finally:
        if saved is None:
            os.environ.pop("LARAY_CACHE_DIR", None)
        else:
            os.environ["LARAY_CACHE_DIR"] = saved
    cluster.wait_for_nodes()
    raylets = {"head": _raylet_pid(cluster.head_node), **{n: _raylet_pid(w) for n, w in workers.items()}}
    sampler = PeakSampler(raylets)
    sampler.start()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["LARAY_CACHE_DIR"] = str(tmp / "driver" / "cache")  # the driver must not decode: this stays empty
    experiment = tmp / "results" / NAME
    try:
        with open(tmp / "first.log", "w") as log:
            first = subprocess.Popen(
                _sweep_command(cluster.address, tmp, data), stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp
            )
        deadline = time.monotonic() + 300
        while not any(_finished(f) for f in _trial_folders(experiment)):
            assert first.poll() is None, (tmp / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (tmp / "first.log").read_text()[-3000:]
            time.sleep(0.2)
        first.send_signal(signal.SIGKILL)  # the driver dies mid-sweep: nothing saved on the way out
        first.wait()
        finished_before = sum(_finished(f) for f in _trial_folders(experiment))
        resumed = subprocess.run(
            _sweep_command(cluster.address, tmp, data, "--resume"),
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp,
            timeout=600,
        )
        sampler.done.set()
        sampler.join()
        yield {
            "tmp": tmp,
            "experiment": experiment,
            "data": data,
            "resumed": resumed,
            "peak": sampler.peak,
            "finished_before": finished_before,
            "worker_ids": {n: w.node_id for n, w in workers.items()},
            "head_id": cluster.head_node.node_id,
        }
    finally:
        sampler.done.set()
        cluster.shutdown()


def test_resumed_sweep_ends_with_the_requested_trials_and_one_study(rehearsal):
    import optuna
    from ray.tune import ExperimentAnalysis

    resumed = rehearsal["resumed"]
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert rehearsal["finished_before"] < TRIALS, "the sweep finished before the driver was killed"
    assert f"{TRIALS} trials (0 errored)" in resumed.stdout
    experiment = rehearsal["experiment"]
    trials = ExperimentAnalysis(str(experiment)).trials
    assert len(trials) == TRIALS and all(t.status == "TERMINATED" for t in trials)
    storage = f"sqlite:///{experiment / 'optuna.db'}"
    assert [s.study_name for s in optuna.get_all_study_summaries(storage)] == [NAME]
    study = optuna.load_study(study_name=NAME, storage=storage)
    states = [t.state.name for t in study.trials]
    assert states.count("COMPLETE") == TRIALS and set(states) <= {"COMPLETE", "FAIL"}  # nothing left RUNNING


def test_trials_ran_on_both_workers_and_never_on_the_head(rehearsal):
    records = [json.loads((f / "worker.json").read_text()) for f in _swept_trials(rehearsal["experiment"])]
    assert len(records) == TRIALS
    assert {r["node_id"] for r in records} == set(rehearsal["worker_ids"].values())
    caches = {n: str(rehearsal["tmp"] / n / "cache") for n in rehearsal["worker_ids"]}
    by_node = {rehearsal["worker_ids"][n]: c for n, c in caches.items()}
    assert all(r["cache_dir"] == by_node[r["node_id"]] for r in records)  # each used its own node's folder


def test_each_node_decoded_the_data_once_and_the_driver_never(rehearsal):
    from laray.data.dataset import describe

    key = describe(str(rehearsal["data"]), SIZE).key
    for name in rehearsal["worker_ids"]:
        log = rehearsal["tmp"] / name / "cache" / "decodes.log"
        assert [line.split()[4] for line in log.read_text().splitlines()] == [key], name
    driver_cache = rehearsal["tmp"] / "driver" / "cache"
    assert not driver_cache.exists() or not list(driver_cache.iterdir())


def test_stage1_trained_once_for_the_sweep_on_both_worker_nodes_at_once(rehearsal):
    import torch

    store = rehearsal["experiment"] / "autoencoders"
    logs = list(store.glob("*/trainings.log"))
    assert len(logs) == 1 and len(logs[0].read_text().splitlines()) == 1
    # 2 workers of 1 CPU each, on a cluster whose head has none: one on each worker node
    history = torch.load(logs[0].parent / "autoencoder.pt", map_location="cpu", weights_only=True)["history"]
    assert [r["workers"] for r in history] == [2] * SPACE["fixed"]["autoencoder"]["epochs"]
    assert "stage 1 on 2 workers (data-parallel, Ray Train)" in (rehearsal["tmp"] / "first.log").read_text()
    for folder in _swept_trials(rehearsal["experiment"]):
        metrics = json.loads((folder / "metrics.json").read_text())
        assert metrics["autoencoder"]["source"] == "object store"


def test_the_object_store_never_held_the_images(rehearsal):
    decoded = N_IMAGES * SIZE * SIZE * 3
    assert set(rehearsal["peak"]) == {"head", "worker_a", "worker_b"}
    print(f"object store peak per node (bytes): {rehearsal['peak']}; decoded images: {decoded}")
    for node, peak in rehearsal["peak"].items():
        assert peak < decoded / 10, f"{node}: {peak} bytes in its object store, decoded images {decoded}"
