"""Score every trial of a sweep against the species labels, from the files the trials left behind.

Scores come from each trial's assignments.csv (never from re-running a model);
purity at other cluster counts from its codes.npy; baselines from the trials'
metrics.json. Works on a finished sweep, a running one (partial results) and
with errored trials (listed, not fatal). Ray is not imported: the trial status
is read from Tune's experiment_state JSON.
"""

from __future__ import annotations

import glob
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from laray.score_names import LABEL_SCORES
from laray.scoring.confirm import ADDED_SEEDS_PREFIX, CONFIRM_DIR, RECIPE_MARK
from laray.scoring.evaluate import score_codes
from laray.scoring.holdout import PREFIX
from laray.scoring.metrics import cluster_scores, contingency
from laray.settings.space import SEARCHABLE
from laray.training.stages import STAGE_LA

FIVE = ("temperature", "mixing_rate", "k_neighbours", "clustering_repeats", "n_centroids")
# Every setting a space may search, LA's five first: a table has a column for each that its trials searched.
# Not "epochs": the trials table's column of that name is the LA epochs a trial ran.
PARAMS = (*FIVE, *(name for name in SEARCHABLE if name not in (*FIVE, "epochs")))
SCORES = LABEL_SCORES
K_MULTIPLES = (2, 5)  # purity also at 2x and 5x the number of species: purity grows with K
# k-means restarts for those two extra columns: the best inertia of 5, not of the 20 a trial's own score takes;
# 20 made them half of `laray analyze`'s time on the demo (benchmarks/analyze_load.py)
K_MULTIPLES_N_INIT = 5


@dataclass
class Trial:
    trial_id: str
    status: str
    folder: Path
    params: dict
    metrics: dict | None  # our metrics.json, None before the first LA epoch ends
    assignments: pd.DataFrame | None
    error: str | None = None
    results: list = field(default_factory=list)  # Tune's result.json rows


def tune_trial_states(experiment: Path) -> list[dict]:
    """Tune's own record of each trial (id, status, config, folder) from the newest whole experiment_state file
    (a driver killed while Tune copied it there leaves it torn: laray.sweep.tune_state)."""
    for state in sorted(glob.glob(str(Path(experiment) / "experiment_state-*.json")), reverse=True):
        try:
            entries = json.loads(Path(state).read_text()).get("trial_data", [])
        except ValueError:
            continue
        return [json.loads(e[0] if isinstance(e, list) else e) for e in entries]
    return []


def _statuses(experiment: Path) -> dict[str, tuple[str, str]]:
    """Trial folder name -> (trial id, status)."""
    return {
        Path(t.get("relative_logdir", "")).name: (t.get("trial_id", ""), t.get("status", "UNKNOWN"))
        for t in tune_trial_states(experiment)
    }


def _read_json_lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written right now
            pass
    return rows


def load_trials(experiment: str | Path) -> list[Trial]:
    """Every trial folder of the experiment (those with params.json), in trial-id order."""
    experiment = Path(experiment)
    if not experiment.is_dir():
        raise FileNotFoundError(f"no experiment folder {experiment}")
    statuses = _statuses(experiment)
    trials = []
    for folder in sorted(p.parent for p in experiment.glob("*/params.json")):
        trial_id, status = statuses.get(
            folder.name, (folder.name.split("_")[2] if folder.name.count("_") >= 2 else folder.name, "UNKNOWN")
        )
        metrics_path, assignments_path = folder / "metrics.json", folder / "assignments.csv"
        error_file = folder / "error.txt"
        error = error_file.read_text().strip().splitlines()[-1] if error_file.exists() else None
        if error and status == "UNKNOWN":
            status = "ERROR"
        trials.append(
            Trial(
                trial_id,
                status,
                folder,
                json.loads((folder / "params.json").read_text()),
                json.loads(metrics_path.read_text()) if metrics_path.exists() else None,
                pd.read_csv(assignments_path, keep_default_na=False) if assignments_path.exists() else None,
                error,
                _read_json_lines(folder / "result.json"),
            )
        )
    if not trials:
        raise FileNotFoundError(f"{experiment} holds no trial folders (params.json): not a laray sweep?")
    return trials


def labelled(assignments: pd.DataFrame) -> bool:
    return bool((assignments["label"].astype(str) != "").any())


def trial_scores(assignments: pd.DataFrame) -> dict:
    """purity, nmi, ari, acc of a trial's clusters against the species, from its assignments.csv.

    With a held-out split (a `heldout` column, laray.scoring.holdout) these count the selection part,
    and heldout_purity... the held-out part.
    """
    known = assignments[assignments["label"].astype(str) != ""]
    if known.empty:
        return {}
    if "heldout" not in known:
        return cluster_scores(known["label"].astype(str).to_numpy(), known["cluster"].to_numpy())
    held = known["heldout"].astype(str).str.lower() == "true"  # read back from CSV as bool or text
    scores = cluster_scores(known.loc[~held, "label"].astype(str).to_numpy(), known.loc[~held, "cluster"].to_numpy())
    if held.any():
        scores.update(
            {
                PREFIX + k: v
                for k, v in cluster_scores(
                    known.loc[held, "label"].astype(str).to_numpy(), known.loc[held, "cluster"].to_numpy()
                ).items()
            }
        )
    return scores


def purity_at_k(codes: np.ndarray, labels: np.ndarray, n_species: int, seed: int = 0) -> dict:
    """Purity of k-means on the codes with K = m x the number of species, for m in K_MULTIPLES."""
    out = {}
    codes_t = torch.from_numpy(np.ascontiguousarray(codes, dtype=np.float32))  # once for every K
    for m in K_MULTIPLES:
        k = min(m * n_species, len(codes))
        scores, _ = score_codes(codes_t, labels, k, seed=seed, n_init=K_MULTIPLES_N_INIT)
        out[f"purity_k{m}x"] = scores.get("purity", float("nan"))
    return out


def per_species_table(assignments: pd.DataFrame) -> pd.DataFrame:
    """Per species: images, the cluster holding most of them, the share it holds, and that cluster's purity."""
    known = assignments[assignments["label"].astype(str) != ""]
    species = np.array(sorted(known["label"].astype(str).unique()))
    clusters = np.sort(known["cluster"].unique())
    table = contingency(known["label"].astype(str), known["cluster"]).T  # (species, clusters), both sorted
    rows = []
    for i, name in enumerate(species):
        j = int(table[i].argmax())
        rows.append(
            {
                "species": name,
                "images": int(table[i].sum()),
                "main_cluster": int(clusters[j]),
                "share_in_main_cluster": table[i, j] / table[i].sum(),
                "main_cluster_purity": table[:, j].max() / table[:, j].sum(),
                "main_cluster_majority": species[int(table[:, j].argmax())],
            }
        )
    return pd.DataFrame(rows).sort_values("share_in_main_cluster", ascending=False, ignore_index=True)


def baselines_of(trials: list[Trial]) -> dict:
    """The baselines the trials computed (the same for all: they share stage 1)."""
    for trial in trials:
        if trial.metrics and trial.metrics.get("baselines"):
            return trial.metrics["baselines"]
    return {}


def trials_table(trials: list[Trial], baselines: dict, objective: str = "purity", with_k: bool = True) -> pd.DataFrame:
    rows = []
    for t in trials:
        row = {"trial_id": t.trial_id, "status": t.status, **{p: t.params[p] for p in PARAMS if p in t.params}}
        scores = trial_scores(t.assignments) if t.assignments is not None else {}
        row.update({s: scores.get(s, math.nan) for s in SCORES})
        if any(PREFIX + s in scores for s in SCORES):
            row.update({PREFIX + s: scores.get(PREFIX + s, math.nan) for s in SCORES})
        if t.metrics and "silhouette" in t.metrics:
            row["silhouette"] = t.metrics["silhouette"]
        la_epochs = [r for r in (t.metrics or {}).get("history", []) if r.get("stage") == STAGE_LA]
        row["epochs"] = len(la_epochs)
        planned = (t.metrics or {}).get("config", {}).get("la", {}).get("epochs")
        # ASHA's stop ends a trial TERMINATED like a full run: fewer epochs than planned tells them apart.
        row["stopped_early"] = bool(t.status == "TERMINATED" and planned is not None and len(la_epochs) < planned)
        row["time_s"] = t.results[-1].get("time_total_s", math.nan) if t.results else math.nan
        if with_k and t.assignments is not None and scores and (t.folder / "codes.npy").exists():
            n_species = t.assignments["label"].astype(str).replace("", np.nan).nunique()
            labels = pd.factorize(t.assignments["label"].astype(str).replace("", np.nan))[0]
            row.update(purity_at_k(np.load(t.folder / "codes.npy"), labels, n_species))
        for name, base in baselines.items():
            if objective in base and not math.isnan(row.get(objective, math.nan)):
                row[f"beats_{name}"] = bool(row[objective] > base[objective])
        row["error"] = t.error or ""
        rows.append(row)
    return pd.DataFrame(rows)


def confirmed_table(experiment: Path, objective: str = "purity", mode: str = "max") -> pd.DataFrame:
    """One row per confirmation run (STORAGE/NAME/confirm/, and confirm-seeds-A-B/ for seeds a resume added,
    laray.sweep.confirmation): rank of its configuration by mean objective (the recipe last, its `recipe` column
    true), the hyperparameters, the seed, its scores (from assignments.csv) and the baselines of its seed."""
    folders = [Path(experiment) / CONFIRM_DIR, *sorted(Path(experiment).glob(f"{ADDED_SEEDS_PREFIX}*"))]
    folders = [f for f in folders if f.is_dir() and any(f.glob("*/params.json"))]
    if not folders:
        return pd.DataFrame()
    rows = []
    for t in (t for folder in folders for t in load_trials(folder)):
        if t.assignments is None or not t.params.get("la"):
            continue
        config = t.params["la"]
        row = {
            "config": json.dumps(config, sort_keys=True),
            "recipe": bool(config.get(RECIPE_MARK)),  # laray train's settings, re-run beside the search's best
            **{p: config[p] for p in PARAMS if p in config},
            "seed": t.params.get("seed"),
            "status": t.status,
            **trial_scores(t.assignments),
        }
        for name, base in ((t.metrics or {}).get("baselines") or {}).items():
            row.update({f"{name}_{s}": v for s, v in base.items() if s.removeprefix(PREFIX) in SCORES})
        rows.append(row)
    frame = pd.DataFrame(rows)
    if frame.empty or objective not in frame:
        return frame
    # The search's configurations ranked by their mean; the recipe after them, as the yardstick, not a contender.
    means = frame.groupby(["recipe", "config"])[objective].mean().reset_index()
    means = means.sort_values(["recipe", objective], ascending=[True, mode == "min"])
    frame["rank"] = frame["config"].map({c: i + 1 for i, c in enumerate(means["config"])})
    frame = frame.sort_values(["rank", "seed"], ignore_index=True)
    return frame[["rank", *[c for c in frame.columns if c not in ("rank", "config")]]]


def best_trial(trials: list[Trial], table: pd.DataFrame, objective: str = "purity", mode: str = "max") -> Trial | None:
    scored = table[table[objective].notna()]
    if scored.empty:
        return None
    row = scored[objective].idxmax() if mode == "max" else scored[objective].idxmin()
    return trials[row]


def _sweep_study(experiment: Path):
    """The sweep's Optuna study from STORAGE/NAME/optuna.db, or None when it has none."""
    db = experiment / "optuna.db"
    if not db.exists():
        return None
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{db}"
    summaries = optuna.get_all_study_summaries(storage)
    if not summaries:
        return None
    return optuna.load_study(study_name=summaries[0].study_name, storage=storage)


def optuna_stopped_by(experiment: Path) -> list[str] | None:
    """How the search ended each trial, in Optuna's order: its `stopped_by` user attribute (laray.sweep.study writes
    "ASHA", "time budget" or "none"; the key is spelled here because results may not import the sweep layer).
    None without a study; "none" for a trial whose end was not recorded (running, or an older laray's)."""
    study = _sweep_study(experiment)
    return None if study is None else [t.user_attrs.get("stopped_by", "none") for t in study.trials]


def optuna_history_and_importances(experiment: Path) -> tuple[list[float], dict]:
    """Trial values in Optuna's order and parameter importances (empty when too few finished trials)."""
    study = _sweep_study(experiment)
    if study is None:
        return [], {}
    import optuna

    values = [t.value if t.value is not None else math.nan for t in study.trials]
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    importances = {}
    if len(complete) >= 2 and len({t.value for t in complete}) > 1:
        try:
            importances = dict(optuna.importance.get_param_importances(study))
        except (RuntimeError, ValueError):  # e.g. a parameter that never varied
            importances = {}
    return values, importances
