"""The analysis layer: `laray analyze`, `laray predict`, the analysis/ scripts, on sweeps built without Ray.

The experiment folder imitates a Tune + Optuna sweep: trial folders named as Tune names them, each
filled by laray.training.run.train_run (tiny vgg11_bn, 32 px, 100 real digits written as PNG files behind a
CSV with a species and a genus column), params.json and result.json as Tune writes them, an errored
trial (params.json and error.txt only), a running trial still in stage 1 (params.json only), an
experiment_state JSON in Tune's format and an optuna.db made with Optuna directly.
"""

import dataclasses
import json
import logging
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import optuna
import pandas as pd
import pytest
import torch
from conftest import write_vgg_weights
from PIL import Image

from laray.cli.main import main
from laray.data.dataset import ImageDataset, load_dataset
from laray.errors import LarayError
from laray.results import plots, report
from laray.results import scores as analysis
from laray.results.predict import find_trial, predict
from laray.scoring.evaluate import score_codes
from laray.scoring.metrics import cluster_scores
from laray.settings.config import AutoEncoderConfig, LAConfig
from laray.training.run import raw_pixel_codes, train_run
from laray.training.stages import RunOptions

ROOT = Path(__file__).resolve().parents[2]
N_IMAGES = 100
DATE = "2026-11-23_04-39-53"
AE = AutoEncoderConfig(arch="vgg11_bn", width=0.125, image_size=32, epochs=1, batch_size=32)
# (trial id, temperature, mixing_rate, k_neighbours, clustering_repeats, n_centroids): every parameter varies
FINISHED = [("1111aaaa", 0.05, 0.3, 8, 2, 10), ("2222bbbb", 0.1, 0.5, 10, 3, 12), ("3333cccc", 0.2, 0.7, 12, 2, 15)]
ERRORED, RUNNING = "4444dddd", "5555eeee"
ERROR_LINE = "laray.training.stages.NonFiniteLossError: non-finite loss nan at local_aggregation epoch 1 step 2"
PARAM_NAMES = ("temperature", "mixing_rate", "k_neighbours", "clustering_repeats", "n_centroids")
SCORES = ("purity", "nmi", "ari", "acc")


@pytest.fixture(autouse=True)
def drop_cli_log_handler():
    """laray.cli.main.main logs to the stderr of its call; a later test's logging must not write to a closed capture."""
    yield
    logger = logging.getLogger("laray")
    for handler in [h for h in logger.handlers if getattr(h, "laray_cli", False)]:
        logger.removeHandler(handler)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def la_config(temperature, mixing_rate, k, repeats, centroids) -> LAConfig:
    return LAConfig(
        epochs=2,
        batch_size=32,
        temperature=temperature,
        mixing_rate=mixing_rate,
        k_neighbours=k,
        clustering_repeats=repeats,
        n_centroids=centroids,
    )


def folder_name(trial_id: str, n: int, params: dict) -> str:
    tag = ",".join(f"{k}={params[k]}" for k in sorted(params))
    return f"train_trial_{trial_id}_{n}_{tag}_{DATE}"


def write_csv_data(root: Path, cache: Path) -> SimpleNamespace:
    """The first N_IMAGES digits as PNG files; data.csv (species, genus) and unlabelled.csv (paths only)."""
    digits = load_dataset("digits", 32, cache_dir=cache)
    rows = []
    for i in range(N_IMAGES):
        label = int(digits.labels[i])
        path = root / "images" / f"digit{label}" / f"img_{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(digits.images[i]).save(path)
        rows.append({"image_path": str(path), "species": f"digit{label}", "genus": "low" if label < 5 else "high"})
    frame = pd.DataFrame(rows)
    frame.to_csv(root / "data.csv", index=False)
    frame[["image_path"]].to_csv(root / "unlabelled.csv", index=False)
    return SimpleNamespace(csv=str(root / "data.csv"), unlabelled_csv=str(root / "unlabelled.csv"), rows=frame)


def write_tune_files(folder: Path, params: dict, results: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.json").write_text(json.dumps(params, indent=2))
    if results:
        (folder / "result.json").write_text("".join(json.dumps(r) + "\n" for r in results))


def write_experiment_state(exp: Path, entries: list[tuple[str, str, str]]) -> None:
    """Tune's experiment_state: trial_data is a list of [trial JSON, runtime JSON] pairs."""
    data = [
        [json.dumps({"trial_id": tid, "status": status, "relative_logdir": name, "config": {}}), "{}"]
        for tid, status, name in entries
    ]
    (exp / f"experiment_state-{DATE}.json").write_text(json.dumps({"trial_data": data, "runner_data": {}}))


def distributions():
    d = optuna.distributions
    return {
        "temperature": d.FloatDistribution(0.01, 1.0, log=True),
        "mixing_rate": d.FloatDistribution(0.0, 1.0),
        "k_neighbours": d.IntDistribution(2, 50),
        "clustering_repeats": d.IntDistribution(1, 10),
        "n_centroids": d.IntDistribution(2, 50),
    }


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A finished-and-running sweep: 3 finished trials, 1 errored, 1 still in stage 1."""
    root = tmp_path_factory.mktemp("sweep")
    cache = root / "cache"
    data = write_csv_data(root, cache)
    dataset = load_dataset(data.csv, 32, cache_dir=cache)
    assert len(dataset) == N_IMAGES and dataset.spec == data.csv
    exp = root / "exp"
    exp.mkdir()
    trials, entries = {}, []
    for n, (tid, *values) in enumerate(FINISHED, start=1):
        params = dict(zip(PARAM_NAMES, values))
        folder = exp / folder_name(tid, n, params)
        metrics = train_run(
            dataset,
            folder,
            AE,
            la_config(*values),
            store_dir=root / "store",
            run=RunOptions(seed=0, device="cpu", progress=False),
        )
        results = [
            {"training_iteration": 1, "time_total_s": 10.0 * n, "purity": 0.0, "trial_id": tid},
            {"training_iteration": 2, "time_total_s": 20.0 * n, "purity": metrics["purity"], "trial_id": tid},
        ]
        write_tune_files(folder, params, results)
        trials[tid] = SimpleNamespace(folder=folder, params=params, metrics=metrics, time_s=20.0 * n)
        entries.append((tid, "TERMINATED", folder.name))
    # the last finished trial's result.json ends in a line Tune is writing right now
    with open(trials[FINISHED[-1][0]].folder / "result.json", "a") as handle:
        handle.write('{"training_iteration": 3, "time_total_')
    errored_params = dict(zip(PARAM_NAMES, (0.9, 0.1, 20, 5, 30)))
    errored = exp / folder_name(ERRORED, 4, errored_params)
    write_tune_files(errored, errored_params, [])
    (errored / "error.txt").write_text(
        "Failure # 1 (occurred at 2026-11-23_04-41-00)\n"
        "Traceback (most recent call last):\n"
        '  File "laray/training/stages.py", line 210, in finetune_la\n' + ERROR_LINE + "\n"
    )
    entries.append((ERRORED, "ERROR", errored.name))
    running_params = dict(zip(PARAM_NAMES, (0.07, 0.4, 9, 4, 11)))
    running = exp / folder_name(RUNNING, 5, running_params)
    write_tune_files(running, running_params, [])  # still in stage 1: no metrics.json, no assignments.csv yet
    entries.append((RUNNING, "RUNNING", running.name))
    write_experiment_state(exp, entries)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=f"sqlite:///{exp}/optuna.db", study_name="demo", direction="maximize")
    for tid, *_ in FINISHED:
        t = trials[tid]
        study.add_trial(
            optuna.trial.create_trial(params=t.params, distributions=distributions(), value=t.metrics["purity"])
        )
    study.add_trial(
        optuna.trial.create_trial(
            params=errored_params, distributions=distributions(), state=optuna.trial.TrialState.FAIL
        )
    )
    return SimpleNamespace(
        root=root,
        exp=exp,
        cache=cache,
        data=data,
        dataset=dataset,
        trials=trials,
        errored=errored,
        running=running,
        store=root / "store",
    )


@pytest.fixture(scope="module")
def analyzed(sweep):
    out = sweep.root / "analysis"
    code = main(["analyze", str(sweep.exp), "--out", str(out), "--cache-dir", str(sweep.cache)])
    assert code == 0
    return SimpleNamespace(
        out=out, table=pd.read_csv(out / "trials.csv", dtype={"trial_id": str}), report=(out / "report.md").read_text()
    )


def assignments_of(folder: Path) -> pd.DataFrame:
    return pd.read_csv(folder / "assignments.csv", keep_default_na=False)


def expected_scores(folder: Path, column: str = "label", labels=None) -> dict:
    a = assignments_of(folder)
    truth = a[column].astype(str).to_numpy() if labels is None else a["path"].map(labels).to_numpy()
    return cluster_scores(truth, a["cluster"].to_numpy())


def row(table: pd.DataFrame, trial_id: str) -> pd.Series:
    rows = table[table["trial_id"] == trial_id]
    assert len(rows) == 1, f"{trial_id} appears {len(rows)} times in trials.csv"
    return rows.iloc[0]


def is_png(path: Path) -> bool:
    with Image.open(path) as image:
        return image.format == "PNG" and image.size[0] > 50 and image.size[1] > 50


# ---------------------------------------------------------------- laray analyze on a sweep


def test_analyze_writes_every_file(sweep, analyzed):
    out = analyzed.out
    for name in ("trials.csv", "baselines.csv", "per_species.csv", "report.md"):
        assert (out / name).is_file(), name
    for name in ("objective_vs_params.png", "history.png", "importances.png", "contingency.png", "montage.png"):
        assert is_png(out / name), name
    columns = set(analyzed.table.columns)
    assert {
        "trial_id",
        "status",
        *PARAM_NAMES,
        *SCORES,
        "epochs",
        "stopped_early",
        "time_s",
        "purity_k2x",
        "purity_k5x",
        "beats_raw_pixels",
        "beats_autoencoder",
    } <= columns
    assert not analyzed.table["stopped_early"].any()  # every finished trial ran its 2 planned epochs
    assert sorted(analyzed.table["trial_id"]) == sorted([t[0] for t in FINISHED] + [ERRORED, RUNNING])
    baselines = pd.read_csv(out / "baselines.csv")
    assert list(baselines["baseline"]) == ["raw_pixels", "autoencoder"]
    recorded = sweep.trials[FINISHED[0][0]].metrics["baselines"]
    for _, b in baselines.iterrows():
        for s in SCORES:
            assert b[s] == pytest.approx(recorded[b["baseline"]][s])
    per_species = pd.read_csv(out / "per_species.csv")
    assert sorted(per_species["species"]) == sorted(f"digit{d}" for d in range(10))
    assert per_species["images"].sum() == N_IMAGES
    assert per_species["share_in_main_cluster"].between(0, 1).all()


def test_report_names_best_trial_baselines_and_errored_trial(sweep, analyzed):
    text = analyzed.report
    best = max(FINISHED, key=lambda t: row(analyzed.table, t[0])["purity"])[0]
    assert "## Best trial" in text and f"`{best}`" in text.split("## Best trial")[1].split("\n\n")[1]
    assert "| k-means on raw pixels |" in text and "| k-means on the auto-encoder's codes |" in text
    assert "## Confirmed winner" not in text  # this sweep had no confirmation
    assert "## Errored trials" in text
    errored_section = text.split("## Errored trials")[1]
    assert f"- `{ERRORED}`: {ERROR_LINE}" in errored_section
    assert f"`{RUNNING}`" not in errored_section  # running is not an error
    for picture in ("objective_vs_params.png", "history.png", "importances.png", "contingency.png", "montage.png"):
        assert f"]({picture})" in text
    assert "5 trials" in text


def test_trial_scores_come_from_each_trials_assignments(sweep, analyzed):
    table = analyzed.table
    for tid, *values in FINISHED:
        t, r = sweep.trials[tid], row(table, tid)
        expected = expected_scores(t.folder)
        for s in SCORES:
            assert r[s] == pytest.approx(expected[s], abs=1e-12), (tid, s)
            assert r[s] == pytest.approx(t.metrics[s])  # the score the trial reported for the same clusters
        assert r["status"] == "TERMINATED"
        for name, value in zip(PARAM_NAMES, values):
            assert r[name] == pytest.approx(value)
        assert r["epochs"] == 2
        assert r["time_s"] == pytest.approx(t.time_s)  # the last complete result.json line
        # purity at 2x and 5x K: k-means on the trial's codes.npy, K = 20 and 50
        labels = pd.factorize(assignments_of(t.folder)["label"].astype(str))[0]
        at_k = analysis.purity_at_k(np.load(t.folder / "codes.npy"), labels, 10)
        assert r["purity_k2x"] == pytest.approx(at_k["purity_k2x"])
        assert r["purity_k5x"] == pytest.approx(at_k["purity_k5x"])
        assert r["purity_k5x"] >= r["purity"]  # 50 clusters of 100 images are purer than 10
        for name, base in t.metrics["baselines"].items():
            assert bool(r[f"beats_{name}"]) == (r["purity"] > base["purity"])
    bad = row(table, ERRORED)
    assert bad["status"] == "ERROR" and all(math.isnan(bad[s]) for s in SCORES)
    assert bad["error"] == ERROR_LINE
    scored = table[table["purity"].notna()]
    best_id = scored.loc[scored["purity"].idxmax(), "trial_id"]
    assert best_id in dict((t[0], t) for t in FINISHED)
    trials = analysis.load_trials(sweep.exp)
    assert analysis.best_trial(trials, analysis.trials_table(trials, {}, with_k=False)).trial_id == best_id


def test_running_trial_is_listed_without_scores(sweep, analyzed):
    r = row(analyzed.table, RUNNING)
    assert r["status"] == "RUNNING"
    assert all(math.isnan(r[s]) for s in SCORES)
    assert math.isnan(r["purity_k2x"]) and math.isnan(r["time_s"]) and r["epochs"] == 0
    assert r["temperature"] == pytest.approx(0.07)
    assert f"| {RUNNING} | RUNNING |" in analyzed.report


def test_statuses_without_experiment_state(sweep, tmp_path):
    """A sweep whose experiment_state is not written yet: ids from folder names, errors from error.txt."""
    exp = tmp_path / "exp"
    shutil.copytree(sweep.exp, exp)
    for state in exp.glob("experiment_state-*.json"):
        state.unlink()
    trials = {t.trial_id: t for t in analysis.load_trials(exp)}
    assert sorted(trials) == sorted([t[0] for t in FINISHED] + [ERRORED, RUNNING])
    assert trials[ERRORED].status == "ERROR" and trials[ERRORED].error == ERROR_LINE
    assert trials[RUNNING].status == "UNKNOWN" and trials[RUNNING].metrics is None
    assert main(["analyze", str(exp), "--out", str(tmp_path / "out"), "--cache-dir", str(sweep.cache)]) == 0
    assert (tmp_path / "out" / "montage.png").is_file()


def test_sweep_with_no_finished_trial_yet(sweep, tmp_path, capsys):
    """The first minutes of a sweep: every trial still in stage 1 (or errored)."""
    exp = tmp_path / "exp"
    shutil.copytree(sweep.running, exp / sweep.running.name)
    shutil.copytree(sweep.errored, exp / sweep.errored.name)
    code = main(["analyze", str(exp), "--out", str(tmp_path / "out"), "--cache-dir", str(sweep.cache)])
    assert code == 0, capsys.readouterr().err
    text = (tmp_path / "out" / "report.md").read_text()
    assert "No trial has finished an LA epoch yet" in text
    assert report.NO_LABELS not in text  # no assignments yet says nothing about the labels
    assert f"- `{ERRORED}`: {ERROR_LINE}" in text
    assert not (tmp_path / "out" / "montage.png").exists()


def test_optuna_history_and_importances(sweep, analyzed):
    values, importances = analysis.optuna_history_and_importances(sweep.exp)
    assert len(values) == 4 and math.isnan(values[-1])
    assert values[:3] == pytest.approx([sweep.trials[t[0]].metrics["purity"] for t in FINISHED])
    assert importances and set(importances) <= set(PARAM_NAMES)
    assert sum(importances.values()) == pytest.approx(1.0, abs=1e-6)
    assert "Importances: " in analyzed.report
    assert "These importances rest on 3 finished trials, fewer than 20" in analyzed.report


def test_per_species_table_of_best_trial(sweep, analyzed):
    best = analyzed.table.loc[analyzed.table["purity"].idxmax(), "trial_id"]
    a = assignments_of(sweep.trials[best].folder)
    expected = analysis.per_species_table(a)
    written = pd.read_csv(analyzed.out / "per_species.csv")
    pd.testing.assert_frame_equal(written, expected, check_dtype=False)
    for r in written.itertuples():
        mine = a[a["label"] == r.species]
        assert r.images == len(mine)
        assert r.share_in_main_cluster == pytest.approx((mine["cluster"] == r.main_cluster).mean())
        in_cluster = a[a["cluster"] == r.main_cluster]["label"]
        assert r.main_cluster_purity == pytest.approx(in_cluster.value_counts().iloc[0] / len(in_cluster))


def test_nonexistent_experiment_exits_1_with_one_line(tmp_path, capsys):
    assert main(["analyze", str(tmp_path / "nonexistent"), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("laray: error: ") and "nonexistent" in err and len(err.splitlines()) == 1


def test_folder_without_trials_exits_1(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["analyze", str(tmp_path / "empty")]) == 1
    err = capsys.readouterr().err.strip()
    assert "no trial folders" in err and len(err.splitlines()) == 1


# ---------------------------------------------------------------- other label columns


def test_relabel_maps_paths_to_another_csv_column(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")  # resolve only checks that the files exist
    (tmp_path / "b.png").write_bytes(b"")
    pd.DataFrame(
        {
            "image_path": ["a.png", "b.png"],
            "species": ["Amanita muscaria", "Boletus edulis"],
            "genus": ["Amanita", "Boletus"],
        }
    ).to_csv(tmp_path / "meta.csv", index=False)
    assignments = pd.DataFrame(
        {
            "idx": [0, 1, 2],
            "path": [str(tmp_path / "b.png"), str(tmp_path / "a.png"), str(tmp_path / "gone.png")],
            "label": ["Boletus edulis", "Amanita muscaria", "x"],
            "cluster": [1, 0, 1],
        }
    )
    out = report.relabel(assignments, str(tmp_path / "meta.csv"), "genus")
    assert list(out["label"]) == ["Boletus", "Amanita", ""]  # a path the CSV no longer has: unlabelled
    assert list(assignments["label"])[0] == "Boletus edulis"  # the input is not changed
    assert list(out["cluster"]) == [1, 0, 1]


def test_analyze_with_label_column_scores_against_genus(sweep, tmp_path):
    out = tmp_path / "genus"
    assert (
        main(["analyze", str(sweep.exp), "--out", str(out), "--label-column", "genus", "--cache-dir", str(sweep.cache)])
        == 0
    )
    table = pd.read_csv(out / "trials.csv", dtype={"trial_id": str})
    genus = dict(zip(sweep.data.rows["image_path"], sweep.data.rows["genus"]))
    for tid, *_ in FINISHED:
        expected = expected_scores(sweep.trials[tid].folder, labels=genus)
        r = row(table, tid)
        for s in SCORES:
            assert r[s] == pytest.approx(expected[s], abs=1e-12)
        assert r["purity"] >= sweep.trials[tid].metrics["purity"] - 1e-12  # two genera are coarser than ten species
    # the raw-pixel baseline is recomputed against the genus; the auto-encoder's would need its codes
    baselines = pd.read_csv(out / "baselines.csv")
    assert list(baselines["baseline"]) == ["raw_pixels"]
    labels = pd.factorize(np.array([genus[p] for p in sweep.dataset.paths]))[0]
    raw = score_codes(raw_pixel_codes(sweep.dataset), labels, seed=0)[0]
    assert baselines.iloc[0]["purity"] == pytest.approx(raw["purity"])
    assert set(pd.read_csv(out / "per_species.csv")["species"]) == {"low", "high"}


# ---------------------------------------------------------------- unlabelled data


@pytest.fixture(scope="module")
def unlabelled_sweep(sweep):
    root = sweep.root / "unlabelled"
    dataset = load_dataset(sweep.data.unlabelled_csv, 32, cache_dir=sweep.cache)
    assert not dataset.labelled and (dataset.labels == -1).all()
    exp = root / "exp"
    entries = []
    for n, (tid, *values) in enumerate(FINISHED[:2], start=1):
        params = dict(zip(PARAM_NAMES, values))
        folder = exp / folder_name(tid, n, params)
        # own store: the labelled sweep's store holds baselines scored against the species (see the xfail below)
        train_run(
            dataset,
            folder,
            AE,
            la_config(*values),
            store_dir=root / "store",
            run=RunOptions(seed=0, device="cpu", progress=False),
        )
        write_tune_files(folder, params, [{"training_iteration": 1, "time_total_s": 5.0}])
        entries.append((tid, "TERMINATED", folder.name))
    write_experiment_state(exp, entries)
    return SimpleNamespace(exp=exp, dataset=dataset, root=root)


def test_unlabelled_sweep_is_reported_by_silhouette(sweep, unlabelled_sweep, tmp_path):
    exp = unlabelled_sweep.exp
    for tid, *_ in FINISHED[:2]:
        folder = next(exp.glob(f"train_trial_{tid}_*"))
        assert (assignments_of(folder)["label"] == "").all()  # the empty label column
    out = tmp_path / "out"
    assert main(["analyze", str(exp), "--out", str(out), "--cache-dir", str(sweep.cache)]) == 0
    table = pd.read_csv(out / "trials.csv", dtype={"trial_id": str})
    assert not set(SCORES + ("purity_k2x", "purity_k5x")) & set(table.columns)
    assert "silhouette" in table and table["silhouette"].notna().all()
    for r in table.itertuples():
        metrics = json.loads((next(exp.glob(f"train_trial_{r.trial_id}_*")) / "metrics.json").read_text())
        assert r.silhouette == pytest.approx(metrics["silhouette"])
    text = (out / "report.md").read_text()
    assert report.NO_LABELS in text
    assert "objective **silhouette**" in text
    best = table.loc[table["silhouette"].idxmax(), "trial_id"]
    assert f"`{best}`" in text.split("## Best trial")[1]
    assert "purity" not in text.split("## All trials")[1].split("\n")[2]  # the table's header
    assert is_png(out / "montage.png")  # no species needed to picture clusters
    assert not (out / "per_species.csv").exists() and not (out / "contingency.png").exists()


def test_unlabelled_report_compares_silhouette_with_baselines(sweep, unlabelled_sweep, tmp_path):
    exp = tmp_path / "exp"
    shutil.copytree(unlabelled_sweep.exp, exp)
    for path in exp.glob("*/metrics.json"):  # a raw-pixel baseline that every trial beats
        metrics = json.loads(path.read_text())
        assert set(metrics["baselines"]["raw_pixels"]) == {"silhouette"}
        metrics["baselines"]["raw_pixels"]["silhouette"] = -0.5
        metrics["baselines"]["autoencoder"]["silhouette"] = 0.99
        path.write_text(json.dumps(metrics))
    text = report.analyze(exp, tmp_path / "out", cache_dir=str(sweep.cache)).read_text()
    assert "It beats k-means on raw pixels on silhouette." in text


def test_predict_on_unlabelled_sweep_uses_best_silhouette(sweep, unlabelled_sweep, tmp_path):
    frame = predict(unlabelled_sweep.exp, sweep.data.unlabelled_csv, tmp_path / "p.csv", cache_dir=str(sweep.cache))
    trials = analysis.load_trials(unlabelled_sweep.exp)
    best = max(trials, key=lambda t: t.metrics["silhouette"])
    a = assignments_of(best.folder)
    assert (frame["path"].to_numpy() == a["path"].to_numpy()).all()
    assert (frame["cluster"].to_numpy() == a["cluster"].to_numpy()).mean() >= 0.95


# ---------------------------------------------------------------- laray predict


def test_predict_reproduces_best_trials_assignments(sweep, analyzed, tmp_path, capsys):
    out = tmp_path / "pred" / "best.csv"
    assert (
        main(
            [
                "predict",
                "--experiment",
                str(sweep.exp),
                "--data",
                sweep.data.csv,
                "--out",
                str(out),
                "--cache-dir",
                str(sweep.cache),
            ]
        )
        == 0
    )
    frame = pd.read_csv(out)
    assert list(frame.columns) == ["path", "cluster", "distance"]
    assert len(frame) == N_IMAGES
    assert (frame["distance"] >= 0).all() and np.isfinite(frame["distance"]).all()
    best = analyzed.table.loc[analyzed.table["purity"].idxmax(), "trial_id"]
    a = assignments_of(sweep.trials[best].folder)
    assert (frame["path"].to_numpy() == a["path"].to_numpy()).all()
    agree = (frame["cluster"].to_numpy() == a["cluster"].to_numpy()).mean()
    assert agree >= 0.95, f"predict reproduces only {agree:.0%} of trial {best}'s clusters"
    assert "wrote" in capsys.readouterr().out


def test_predict_by_trial_id_prefix(sweep, analyzed, tmp_path):
    best = analyzed.table.loc[analyzed.table["purity"].idxmax(), "trial_id"]
    other = next(t[0] for t in FINISHED if t[0] != best)
    out = tmp_path / "other.csv"
    assert (
        main(
            [
                "predict",
                "--experiment",
                str(sweep.exp),
                "--trial",
                other[:5],
                "--data",
                sweep.data.csv,
                "--out",
                str(out),
                "--cache-dir",
                str(sweep.cache),
            ]
        )
        == 0
    )
    frame = pd.read_csv(out)
    a = assignments_of(sweep.trials[other].folder)
    assert (frame["cluster"].to_numpy() == a["cluster"].to_numpy()).mean() >= 0.95
    assert set(frame["cluster"]) <= set(a["cluster"])


@pytest.mark.parametrize("trial", ["ffff0000", "7", ERRORED, RUNNING])
def test_predict_unknown_or_unfinished_trial_exits_1_with_one_line(sweep, tmp_path, capsys, trial):
    # "7" matches no id; ERRORED and RUNNING have no finished LA epoch to predict with
    code = main(
        [
            "predict",
            "--experiment",
            str(sweep.exp),
            "--trial",
            trial,
            "--data",
            sweep.data.csv,
            "--out",
            str(tmp_path / "x.csv"),
            "--cache-dir",
            str(sweep.cache),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert err.startswith("laray: error: ") and len(err.splitlines()) == 1
    assert not (tmp_path / "x.csv").exists()


def test_predict_ambiguous_prefix_is_refused(sweep):
    assert find_trial(sweep.exp, "2222").trial_id == "2222bbbb"
    assert find_trial(sweep.exp, sweep.trials["3333cccc"].folder.name).trial_id == "3333cccc"
    with pytest.raises(LarayError, match="matches 0 trials"):
        find_trial(sweep.exp, "9")


# ---------------------------------------------------------------- the cluster montage shows each cluster's images

COLOURS = np.array([(255, 0, 0), (0, 200, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255)], dtype=np.uint8)
SIZES = (11, 9, 14, 6, 3, 8)  # images per cluster: rows are ordered by size, not by id


def solid_colour_data(seed=0):
    """Images whose colour is their cluster's, the clusters shuffled over the indices."""
    rng = np.random.default_rng(seed)
    clusters = rng.permutation(np.repeat(np.arange(len(SIZES)), SIZES))
    images = np.ascontiguousarray(np.broadcast_to(COLOURS[clusters][:, None, None, :], (len(clusters), 20, 20, 3)))
    return images, clusters


def assert_tiles_have_cluster_colours(png: Path, boxes: dict, colour_of: dict):
    pixels = np.asarray(Image.open(png).convert("RGB")).astype(int)
    assert boxes
    for c, cluster_boxes in boxes.items():
        assert cluster_boxes
        for x0, y0, x1, y1 in cluster_boxes:
            centre = pixels[y0 + 6 : y1 - 6, x0 + 6 : x1 - 6]
            assert np.abs(centre - colour_of[c]).max() <= 2, f"a tile of cluster {c} is not its colour"


def test_cluster_montage_tiles_show_their_clusters_images(tmp_path):
    images, clusters = solid_colour_data()
    montage = plots.cluster_montage(images, clusters, tmp_path / "m.png", per_cluster=8, seed=3)
    assert set(montage.indices) == set(range(len(SIZES)))
    for c, shown in montage.indices.items():
        assert (clusters[shown] == c).all()
        assert len(shown) == min(8, SIZES[c]) == len(montage.boxes[c])
    assert_tiles_have_cluster_colours(montage.path, montage.boxes, {c: COLOURS[c] for c in range(len(SIZES))})


@pytest.mark.parametrize("shuffle_rows", [False, True])
def test_best_trial_montage_aligns_images_with_assignments(tmp_path, shuffle_rows):
    """The report's montage reads images by the assignments' idx, whatever the rows' order."""
    images, clusters = solid_colour_data(seed=1)
    n = len(images)
    paths = [f"/data/img_{i:03d}.jpg" for i in range(n)]
    species = np.array([f"sp{c}" for c in clusters])
    dataset = ImageDataset(images, clusters, [f"sp{c}" for c in range(len(SIZES))], paths, spec="solid")
    order = np.random.default_rng(2).permutation(n) if shuffle_rows else np.arange(n)
    # cluster ids as a model would number them: not the colour index
    cluster_id = {c: 10 * c + 7 for c in range(len(SIZES))}
    assignments = pd.DataFrame(
        {
            "idx": order,
            "path": [paths[i] for i in order],
            "label": species[order],
            "cluster": [cluster_id[c] for c in clusters[order]],
        }
    )
    folder = tmp_path / "train_trial_abcd1234_1_x"
    folder.mkdir()
    assignments.to_csv(folder / "assignments.csv", index=False)
    trial = analysis.Trial(
        "abcd1234",
        "TERMINATED",
        folder,
        {},
        {"data": "solid"},
        pd.read_csv(folder / "assignments.csv", keep_default_na=False),
    )
    table = analysis.trials_table([trial], {}, with_k=False)
    scored = report.Scored(tmp_path, [trial], table, {}, True, "purity", "max", dataset, [])
    out = tmp_path / "out"
    out.mkdir()
    assert report.best_trial_pictures(scored, out, seed=5) == []
    # the tiles' boxes depend only on the clusters and species, so a montage of the same rows tells them
    layout = plots.cluster_montage(
        np.zeros((n, 4, 4, 3), np.uint8),
        assignments["cluster"].to_numpy(),
        tmp_path / "layout.png",
        species=assignments["label"].to_numpy(),
        seed=5,
    )
    assert Image.open(out / "montage.png").size == Image.open(layout.path).size
    assert_tiles_have_cluster_colours(
        out / "montage.png", layout.boxes, {cluster_id[c]: COLOURS[c] for c in range(len(SIZES))}
    )
    assert is_png(out / "contingency.png") and (out / "per_species.csv").is_file()


def test_montage_when_the_data_set_grew_since_the_sweep(sweep, tmp_path):
    """The CSV got new rows after the sweep: the trained images are still its first rows, unchanged."""
    exp = tmp_path / "exp"
    tid = FINISHED[0][0]
    shutil.copytree(sweep.trials[tid].folder, exp / sweep.trials[tid].folder.name)
    grown = sweep.data.rows.copy()
    extra = grown.iloc[:10].copy()
    for i, p in enumerate(extra["image_path"]):
        new = tmp_path / f"new_{i}.png"
        shutil.copy(p, new)
        extra.iloc[i, 0] = str(new)
    pd.concat([grown, extra]).to_csv(tmp_path / "grown.csv", index=False)
    metrics_path = exp / sweep.trials[tid].folder.name / "metrics.json"
    metrics = json.loads(metrics_path.read_text())
    metrics["data"] = str(tmp_path / "grown.csv")
    metrics_path.write_text(json.dumps(metrics))
    report.analyze(exp, tmp_path / "out", cache_dir=str(sweep.cache))  # raises ValueError: clusters must have shape
    assert (tmp_path / "out" / "montage.png").is_file()


def test_montage_skipped_with_a_note_when_data_cannot_be_loaded(sweep, tmp_path):
    exp = tmp_path / "exp"
    tid = FINISHED[1][0]
    shutil.copytree(sweep.trials[tid].folder, exp / sweep.trials[tid].folder.name)
    metrics_path = exp / sweep.trials[tid].folder.name / "metrics.json"
    metrics = json.loads(metrics_path.read_text())
    metrics["data"] = str(tmp_path / "moved_away.csv")
    metrics_path.write_text(json.dumps(metrics))
    text = report.analyze(exp, tmp_path / "out", cache_dir=str(sweep.cache)).read_text()
    assert "Cluster montage skipped: the data set could not be loaded" in text
    assert not (tmp_path / "out" / "montage.png").exists()
    assert (tmp_path / "out" / "trials.csv").is_file() and (tmp_path / "out" / "contingency.png").is_file()


# ---------------------------------------------------------------- baselines and labellings


def test_baselines_follow_the_label_column(sweep, tmp_path):
    species = load_dataset(sweep.data.csv, 32, cache_dir=sweep.cache)
    genus = load_dataset(sweep.data.csv, 32, label_column="genus", cache_dir=sweep.cache)
    la = dataclasses.replace(la_config(*FINISHED[0][1:]), epochs=1)
    store = tmp_path / "store"
    first = train_run(
        species, tmp_path / "species", AE, la, store_dir=store, run=RunOptions(seed=0, device="cpu", progress=False)
    )
    second = train_run(
        genus, tmp_path / "genus", AE, la, store_dir=store, run=RunOptions(seed=0, device="cpu", progress=False)
    )
    expected = score_codes(raw_pixel_codes(genus), genus.labels, seed=0)[0]
    assert first["baselines"]["raw_pixels"]["purity"] != pytest.approx(expected["purity"])  # the test can tell
    assert second["baselines"]["raw_pixels"]["purity"] == pytest.approx(expected["purity"])


def as_if_pretrained(sweep, exp: Path, stage1: dict) -> dict:
    """A copy of the sweep whose stage 1 started from pretrained weights (`stage1`: the config's autoencoder
    keys): every trial's metrics.json gains the pretrained baseline that stage 1 would have scored. Its purity
    lies between the trials' lowest and highest, so that some trials beat it and some do not."""
    shutil.copytree(sweep.exp, exp)
    purities = [t.metrics["purity"] for t in sweep.trials.values()]
    assert min(purities) < max(purities)
    scores = {"purity": (min(purities) + max(purities)) / 2, "nmi": 0.3125, "ari": 0.1875, "acc": 0.4375}
    for path in exp.glob("*/metrics.json"):
        metrics = json.loads(path.read_text())
        metrics["baselines"]["pretrained"] = scores
        metrics["config"]["autoencoder"].update(stage1)
        path.write_text(json.dumps(metrics))
    return scores


def test_report_shows_the_pretrained_baseline(sweep, tmp_path):
    weights = tmp_path / "vgg11_bn.pth"
    weights.write_bytes(b"read by nothing here")
    scores = as_if_pretrained(sweep, tmp_path / "exp", {"width": 1.0, "pretrained": str(weights)})
    out = tmp_path / "out"
    assert main(["analyze", str(tmp_path / "exp"), "--out", str(out), "--cache-dir", str(sweep.cache)]) == 0
    baselines = pd.read_csv(out / "baselines.csv")
    assert list(baselines["baseline"]) == ["raw_pixels", "autoencoder", "pretrained"]
    assert baselines.set_index("baseline").loc["pretrained", list(SCORES)].to_dict() == pytest.approx(scores)
    table = pd.read_csv(out / "trials.csv", dtype={"trial_id": str})
    scored = table[table["purity"].notna()]
    assert (scored["beats_pretrained"] == (scored["purity"] > scores["purity"])).all()
    assert scored["beats_pretrained"].any() and not scored["beats_pretrained"].all()
    text = (out / "report.md").read_text()
    row_of_it = "| k-means on the pretrained encoder's codes | " + " | ".join(f"{scores[s]:.3f}" for s in SCORES) + " |"
    assert row_of_it in text.split("## Best trial")[1].splitlines()
    best = row(table, text.split("## Best trial")[1].split("`")[1])
    beaten = "k-means on the pretrained encoder's codes" in text.split("It beats ")[1].split("\n")[0]
    assert beaten == bool(best["beats_pretrained"])


def test_imagenet_weights_the_sweep_started_from_are_not_scored_twice(sweep, tmp_path):
    weights = tmp_path / "vgg16_bn.pth"
    write_vgg_weights(weights, "vgg16_bn")
    scores = as_if_pretrained(sweep, tmp_path / "exp", {"arch": "vgg16_bn", "width": 1.0, "pretrained": str(weights)})
    scored = report.score(tmp_path / "exp", tmp_path / "same", imagenet_weights=str(weights), cache_dir=sweep.cache)
    assert (
        list(scored.baselines) == ["raw_pixels", "autoencoder", "pretrained"]
        and scored.baselines["pretrained"] == scores
    )
    assert any("--imagenet-weights was not scored again" in note and str(weights) in note for note in scored.notes)

    # other weights: both baselines, and a note saying how they differ
    other = tmp_path / "other_vgg16_bn.pth"
    write_vgg_weights(other, "vgg16_bn", seed=1)
    scored = report.score(tmp_path / "exp", tmp_path / "other", imagenet_weights=str(other), cache_dir=sweep.cache)
    assert list(scored.baselines) == ["raw_pixels", "autoencoder", "pretrained", "imagenet_vgg16_bn"]
    assert any("score different encoders" in note for note in scored.notes)


def test_same_weights_tells_the_sweeps_pretrained_weights_apart(tmp_path):
    first, copy, other = tmp_path / "a.pth", tmp_path / "b.pth", tmp_path / "c.pth"
    first.write_bytes(b"weights one")
    copy.write_bytes(b"weights one")
    other.write_bytes(b"weights two")
    same = report._same_weights
    assert same({"arch": "vgg16_bn", "pretrained": "imagenet"}, str(other))  # torchvision's file: what the flag holds
    assert same({"arch": "vgg16_bn", "pretrained": str(first)}, str(first))
    assert same({"arch": "vgg16_bn", "pretrained": str(first)}, str(copy))  # the same bytes elsewhere
    assert not same({"arch": "vgg16_bn", "pretrained": str(first)}, str(other))
    assert not same({"arch": "vgg11_bn", "pretrained": str(first)}, str(first))  # the flag's weights are vgg16_bn's
    assert not same({"arch": "vgg16_bn", "pretrained": None}, str(first))
    assert not same({"arch": "vgg16_bn", "pretrained": str(tmp_path / "gone.pth")}, str(first))


# ---------------------------------------------------------------- the analysis/ scripts


def script_env(sweep):
    env = dict(os.environ, XDG_CACHE_HOME=str(sweep.root / "xdg"))  # the scripts have no --cache-dir
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.mark.parametrize("script", ["score_runs.py", "plot_sweep.py", "cluster_montage.py"])
def test_script_help(script):
    done = subprocess.run(
        [sys.executable, str(ROOT / "analysis" / script), "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "EXPERIMENT" in done.stdout and "--out" in done.stdout


def test_score_runs_script_writes_trials_csv(sweep, analyzed, tmp_path):
    out = tmp_path / "scored"
    done = subprocess.run(
        [sys.executable, str(ROOT / "analysis" / "score_runs.py"), str(sweep.exp), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=script_env(sweep),
    )
    assert done.returncode == 0, done.stderr
    table = pd.read_csv(out / "trials.csv", dtype={"trial_id": str})
    pd.testing.assert_frame_equal(table, analyzed.table)  # the same table as laray analyze's
    assert (out / "baselines.csv").is_file()
    assert "wrote" in done.stdout and ERRORED in done.stdout


def test_imagenet_baseline_from_local_weights(sweep, tmp_path):
    # A local torchvision vgg16_bn state_dict (random here: no downloads in tests) adds a third baseline.
    import torchvision

    weights = tmp_path / "vgg16_bn.pth"
    torch.save(torchvision.models.vgg16_bn(weights=None).state_dict(), weights)
    out = tmp_path / "out"
    assert (
        main(
            [
                "analyze",
                str(sweep.exp),
                "--out",
                str(out),
                "--cache-dir",
                str(sweep.cache),
                "--imagenet-weights",
                str(weights),
            ]
        )
        == 0
    )
    baselines = pd.read_csv(out / "baselines.csv").set_index("baseline")
    assert {"raw_pixels", "autoencoder", "imagenet_vgg16_bn"} <= set(baselines.index)
    assert 0 < baselines.loc["imagenet_vgg16_bn", "purity"] <= 1
    table = pd.read_csv(out / "trials.csv")
    scored = table[table["purity"].notna()]
    assert (
        scored["beats_imagenet_vgg16_bn"] == (scored["purity"] > baselines.loc["imagenet_vgg16_bn", "purity"])
    ).all()


def test_the_codes_baseline_is_named_for_what_stage_1_was():
    from laray.results.report import BASELINE_NAMES, baseline_names

    assert baseline_names(5) == BASELINE_NAMES
    untrained = baseline_names(0)
    assert untrained["autoencoder"] == "k-means on the untrained encoder's codes"
    # no epochs from pretrained weights: the codes' baseline scored the pretrained encoder
    assert (
        baseline_names(0, "vgg16_bn.pth")["autoencoder"]
        == "k-means on the pretrained encoder's codes (no stage-1 epochs)"
    )
    assert baseline_names(5, "vgg16_bn.pth") == BASELINE_NAMES
    assert {k: v for k, v in untrained.items() if k != "autoencoder"} == {
        k: v for k, v in BASELINE_NAMES.items() if k != "autoencoder"
    }


def test_the_report_and_picture_set_the_recipe_beside_the_confirmed_winner(tmp_path):
    """A confirmation with the recipe re-run over the same seeds (as laray.results.scores.confirmed_table
    gives it): its row, the verdict from the runs paired by seed, and the picture's own column."""
    winner = dict(zip(PARAM_NAMES, (0.1, 0.2, 30, 5, 20)))
    recipe = dict(zip(PARAM_NAMES, (0.07, 0.5, 40, 6, 10)))
    won, base = {1: 0.80, 2: 0.86, 3: 0.83}, {1: 0.76, 2: 0.81, 3: 0.80}  # winner - recipe: 0.04, 0.05, 0.03
    rows = [
        {"rank": rank, "recipe": rank == 2, **params, "seed": s, "purity": p, "heldout_purity": p - 0.01}
        | {"raw_pixels_purity": 0.5, "raw_pixels_heldout_purity": 0.5}
        for rank, params, values in ((1, winner, won), (2, recipe, base))
        for s, p in values.items()
    ]
    scored = SimpleNamespace(
        confirmed=pd.DataFrame(rows), objective="purity", baseline_names={"raw_pixels": "k-means on raw pixels"}
    )
    text = "\n".join(report._confirmed_section(scored))
    half = 4.302652729911275 * np.std([0.04, 0.05, 0.03], ddof=1) / math.sqrt(3)
    assert "| the recipe (`laray train`'s settings, same seeds) | 0.790 |" in text
    assert (
        "**Verdict**: The search found settings better than the recipe (temperature=0.1 mixing_rate=0.2 "
        "k_neighbours=30 clustering_repeats=5 n_centroids=20): over the recipe, paired by seed (3 seeds): "
        f"purity +0.040 [{0.04 - half:+.3f}, {0.04 + half:+.3f}], held-out +0.040" in text
    )
    assert "| recipe | 0.07 | 0.5 | 40 | 6 | 10 | 0.790 |" in text  # last in the table of all confirmed
    png = plots.plot_confirmed(scored.confirmed, {}, "purity", tmp_path / "confirmed.png")
    assert png.stat().st_size > 0


def test_history_png_is_told_how_the_search_ended_each_trial(tmp_path, monkeypatch):
    """laray analyze hands plot_history each trial's `stopped_by` from the study, in Optuna's order."""
    from laray.results import plots, report
    from laray.results import scores as analysis

    study = optuna.create_study(study_name="s", storage=f"sqlite:///{tmp_path / 'optuna.db'}", direction="maximize")
    for value, ended in ((0.5, "ASHA"), (0.7, None), (0.6, "time budget"), (0.8, "none")):
        trial = study.ask()
        if ended is not None:
            trial.set_user_attr("stopped_by", ended)
        study.tell(trial, value)
    assert analysis.optuna_stopped_by(tmp_path) == ["ASHA", "none", "time budget", "none"]
    assert analysis.optuna_stopped_by(tmp_path / "elsewhere") is None
    drawn = {}
    monkeypatch.setattr(plots, "plot_history", lambda values, path, **kw: drawn.update(values=values, **kw))
    for name in ("plot_objective_vs_params", "plot_importances"):
        monkeypatch.setattr(plots, name, lambda *a, **k: None)
    scored = SimpleNamespace(experiment=tmp_path, table=pd.DataFrame(), objective="purity", mode="max", confirmed=[])
    report.plot_sweep(scored, tmp_path)
    assert drawn["values"] == [0.5, 0.7, 0.6, 0.8] and drawn["stopped_by"] == ["ASHA", "none", "time budget", "none"]
