"""`laray analyze`: the tables, pictures and report.md of a sweep, built on results.scores and results.plots.

OUT/trials.csv        one row per trial: id, status, the five LA hyperparameters, purity, nmi, ari, acc
                      (on the selection part; heldout_purity... on the held-out part), purity at 2x and 5x
                      the species count, epochs run, stopped_early (ASHA), time, whether it beats each baseline
OUT/confirmed.csv     one row per confirmed configuration and seed: rank, hyperparameters, seed, scores,
                      and the baselines of that seed
OUT/baselines.csv     k-means on raw pixels, on the auto-encoder's codes, on the pretrained encoder's codes when
                      stage 1 started from pretrained weights (and ImageNet VGG codes if given)
OUT/per_species.csv   the best trial's clusters, species by species
OUT/*.png             objective vs each hyperparameter, optimisation history, parameter importances,
                      species x clusters contingency heatmap, cluster montage of the best trial
OUT/report.md         ties them together
"""

from __future__ import annotations

import filecmp
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from laray.results import plots
from laray.results import scores as analysis
from laray.scoring.holdout import PREFIX

BASELINE_NAMES = {
    "raw_pixels": "k-means on raw pixels",
    "autoencoder": "k-means on the auto-encoder's codes",
    "pretrained": "k-means on the pretrained encoder's codes",  # as loaded, before stage 1 trained it
    "imagenet_vgg16_bn": "k-means on ImageNet VGG-16-bn codes",
}
FEW_TRIALS = 20  # below this many finished trials, parameter importances are mostly noise
NO_LABELS = (
    "The data set has no species labels: purity, NMI, ARI and accuracy need them, so trials are "
    "compared by the silhouette of their codes instead."
)


def baseline_names(ae_epochs: int, pretrained: str | None = None) -> dict:
    """BASELINE_NAMES, the codes' baseline named for what stage 1 was: trained, or no epochs at all.

    With no stage-1 epochs, LA starts from the encoder as it was made: randomly initialised (the CPU
    photo settings), or the pretrained weights, which the "pretrained" baseline scores too.
    """
    if ae_epochs:
        return BASELINE_NAMES
    untrained = "k-means on the pretrained encoder's codes (no stage-1 epochs)" if pretrained else None
    return {**BASELINE_NAMES, "autoencoder": untrained or "k-means on the untrained encoder's codes"}


def relabel(assignments: pd.DataFrame, spec: str, label_column: str, image_root: str | None = None) -> pd.DataFrame:
    """The assignments with `label` taken from another column of the data's CSV (e.g. genus)."""
    from laray.data.sources import resolve

    source = resolve(spec, label_column=label_column, image_root=image_root)
    names = dict(zip(source.paths, (source.class_names[i] if i >= 0 else "" for i in source.labels)))
    out = assignments.copy()
    out["label"] = [names.get(p, "") for p in out["path"]]
    return out


def _imagenet_baseline(dataset, weights: str, seed: int) -> dict:
    import torch

    from laray.method.models import EncoderVGGMerged
    from laray.scoring.evaluate import encode_all, score_codes

    encoder = EncoderVGGMerged("vgg16_bn", pretrained=weights, merger="mean")
    codes = encode_all(encoder, dataset, torch.device("cpu"))
    return score_codes(codes, dataset.labels, seed=seed)[0]


def _same_weights(stage1: dict, weights: str) -> bool:
    """Whether the sweep's stage 1 (its config's autoencoder section) started from the vgg16_bn weights in `weights`.

    `pretrained: imagenet` is torchvision's ImageNet file, which --imagenet-weights holds (`laray weights
    fetch`); a file is the same when it is that file or holds the same bytes.
    """
    pretrained = stage1.get("pretrained")
    if stage1.get("arch") != "vgg16_bn" or pretrained is None:
        return False
    if pretrained == "imagenet":
        return True
    try:
        pretrained, weights = os.path.expanduser(pretrained), os.path.expanduser(weights)
        return os.path.samefile(pretrained, weights) or filecmp.cmp(pretrained, weights, shallow=False)
    except OSError:  # the sweep's file is gone, or on another node: nothing says they are the same
        return False


def _markdown(frame: pd.DataFrame, floats: str = "{:.3f}") -> str:
    """A pandas frame as a GitHub table, without the optional tabulate dependency."""

    def cell(v):
        if isinstance(v, float):
            return "" if math.isnan(v) else floats.format(v)
        return str(v)

    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + " --- |" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


@dataclass
class Scored:
    """The scored sweep that the pictures and the report are made from."""

    experiment: Path
    trials: list
    table: pd.DataFrame
    baselines: dict
    has_labels: bool
    objective: str
    mode: str
    dataset: object  # the decoded images (ImageDataset), or None when they cannot be loaded
    notes: list
    confirmed: pd.DataFrame = field(default_factory=pd.DataFrame)  # analysis.confirmed_table; empty: none
    summary: dict = field(default_factory=dict)  # the sweep's best.json ({} when absent)

    @property
    def baseline_names(self) -> dict:
        """laray.results.report.baseline_names for the stage 1 these trials started from."""
        some = next((t for t in self.trials if t.metrics), None)
        stage1 = some.metrics.get("config", {}).get("autoencoder", {}) if some else {}
        return baseline_names(stage1.get("epochs", 1), stage1.get("pretrained"))

    @property
    def best(self) -> analysis.Trial | None:
        return (
            analysis.best_trial(self.trials, self.table, self.objective, self.mode)
            if self.objective in self.table
            else None
        )


def score(
    experiment: str | Path,
    out: str | Path,
    label_column: str | None = None,
    objective: str = "purity",
    mode: str = "max",
    imagenet_weights: str | None = None,
    cache_dir: str | None = None,
    seed: int = 0,
) -> Scored:
    """Score every trial and the baselines; writes trials.csv and baselines.csv into `out`."""
    experiment, out = Path(experiment), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    trials = analysis.load_trials(experiment)
    some = next((t for t in trials if t.metrics), None)
    spec = some.metrics["data"] if some else None
    if label_column is not None and spec is not None:
        for t in trials:
            if t.assignments is not None:
                t.assignments = relabel(t.assignments, spec, label_column)
    scored_trials = [t for t in trials if t.assignments is not None]
    # Unlabelled only when some trial has assignments and none of them has a label; before any
    # trial finishes an LA epoch, nothing says the data is unlabelled.
    has_labels = not scored_trials or any(analysis.labelled(t.assignments) for t in scored_trials)
    if not has_labels:
        objective, mode = "silhouette", "max"

    baselines = analysis.baselines_of(trials) if label_column is None else {}
    dataset = _load_images(some, cache_dir) if some else None
    if label_column is not None and dataset is not None and has_labels:  # the trials' baselines used the species
        from laray.scoring.evaluate import score_codes
        from laray.training.run import raw_pixel_codes

        labels = pd.factorize(
            relabel(pd.DataFrame({"path": dataset.paths, "label": ""}), spec, label_column)["label"].replace("", np.nan)
        )[0]
        baselines = {"raw_pixels": score_codes(raw_pixel_codes(dataset), labels, seed=seed)[0]}
    imagenet_notes = []
    if imagenet_weights and dataset is not None and has_labels:
        stage1 = some.metrics.get("config", {}).get("autoencoder", {})
        if "pretrained" in baselines and _same_weights(stage1, imagenet_weights):
            # The sweep scored these weights already, on its own split, merger and seed: a second number
            # for the same encoder, scored otherwise, would only make the two look different.
            imagenet_notes.append(
                f"--imagenet-weights was not scored again: the sweep's stage 1 started from the same vgg16_bn "
                f'weights (pretrained: {stage1["pretrained"]}), which "{BASELINE_NAMES["pretrained"]}" scores '
                "as the other baselines are scored (the trials' merger, held-out split and seed)."
            )
        else:
            baselines["imagenet_vgg16_bn"] = _imagenet_baseline(dataset, imagenet_weights, seed)
            if "pretrained" in baselines:
                imagenet_notes.append(
                    f'"{BASELINE_NAMES["imagenet_vgg16_bn"]}" (--imagenet-weights) and '
                    f'"{BASELINE_NAMES["pretrained"]}" score different encoders: the first ImageNet\'s '
                    f"vgg16_bn, mean-merged, on every image with --seed {seed}; the second the weights the "
                    f"sweep's stage 1 started from ({stage1.get('arch')}, pretrained: {stage1.get('pretrained')}), "
                    "as the trials' other baselines."
                )
    table = analysis.trials_table(trials, baselines, objective, with_k=has_labels)
    if not has_labels:
        table = table.drop(columns=[c for c in analysis.SCORES if c in table], errors="ignore")
    table.to_csv(out / "trials.csv", index=False)
    pd.DataFrame([{"baseline": k, **v} for k, v in baselines.items()]).to_csv(out / "baselines.csv", index=False)
    notes = ([] if has_labels else [NO_LABELS]) + imagenet_notes
    if not scored_trials:
        notes.append("No trial has finished an LA epoch yet: scores appear as trials report.")
    confirmed = (
        analysis.confirmed_table(experiment, objective, mode) if has_labels and label_column is None else pd.DataFrame()
    )
    if len(confirmed):
        confirmed.to_csv(out / "confirmed.csv", index=False)
    summary_path = experiment / "best.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    return Scored(experiment, trials, table, baselines, has_labels, objective, mode, dataset, notes, confirmed, summary)


def plot_sweep(scored: Scored, out: str | Path) -> dict:
    """objective_vs_params.png, history.png, importances.png; returns Optuna's parameter importances."""
    out = Path(out)
    table = scored.table
    params = [p for p in analysis.PARAMS if p in table and table[p].notna().any()]
    plots.plot_objective_vs_params(table, params, scored.objective, out / "objective_vs_params.png")
    history, importances = analysis.optuna_history_and_importances(scored.experiment)
    stopped = analysis.optuna_stopped_by(scored.experiment)  # ASHA's and the time budget's stops drawn hollow
    plots.plot_history(
        history,
        out / "history.png",
        objective=scored.objective,
        mode=scored.mode,
        stopped_by=stopped if stopped is not None and len(stopped) == len(history) else None,
    )
    plots.plot_importances(importances, out / "importances.png")
    if len(scored.confirmed):
        plots.plot_confirmed(scored.confirmed, _confirmed_baselines(scored), scored.objective, out / "confirmed.png")
    return importances


def _confirmed_baselines(scored: Scored) -> dict:
    """{readable name: laray.scoring.confirm.summarize of its scores} of the baselines over the confirmation's seeds."""
    from laray.scoring.confirm import summarize

    per_seed = scored.confirmed.drop_duplicates("seed").to_dict("records")
    out = {}
    for key in ("raw_pixels", "autoencoder", "pretrained"):
        columns = {c.removeprefix(f"{key}_"): c for c in scored.confirmed if c.startswith(f"{key}_")}
        if columns:
            out[scored.baseline_names[key]] = summarize([{s: r[c] for s, c in columns.items()} for r in per_seed])
    return out


def _by_seed(rows: pd.DataFrame, names: list[str], prefix: str = "") -> dict:
    """Confirmation runs (one row per seed) as laray.scoring.confirm.margin_over takes them: the seeds in order
    and, for each of `names`, its values from the column `prefix + name`."""
    rows = rows.sort_values("seed")
    return {"seeds": rows["seed"].tolist(), **{n: rows[prefix + n].tolist() for n in names}}


def _paired(winner_runs: pd.DataFrame, recipe_runs: pd.DataFrame) -> dict:
    """confirm.margin_over of the winner's confirmation runs over the recipe's, paired by seed."""
    from laray.scoring.confirm import SCORES, margin_over

    def scored(rows: pd.DataFrame) -> list[str]:
        return [n for n in (*SCORES, *(PREFIX + s for s in SCORES)) if n in rows and rows[n].notna().all()]

    return margin_over(_by_seed(winner_runs, scored(winner_runs)), _by_seed(recipe_runs, scored(recipe_runs)))


def _margin_over_raw_pixels(winner_runs: pd.DataFrame) -> dict:
    """confirm.margin_over of the winner's confirmation runs (one row per seed) over their raw-pixel baselines."""
    from laray.scoring.confirm import margin_over

    names = [c.removeprefix("raw_pixels_") for c in winner_runs if c.startswith("raw_pixels_")]
    names = [n for n in names if n in winner_runs]
    return margin_over(_by_seed(winner_runs, names), _by_seed(winner_runs, names, "raw_pixels_"))


def best_trial_pictures(scored: Scored, out: str | Path, seed: int = 0) -> list[str]:
    """per_species.csv, contingency.png and montage.png of the best trial; returns notes for the report."""
    out, best = Path(out), scored.best
    if best is None or best.assignments is None:
        return ["No trial has finished an LA epoch yet: no best trial to picture."]
    if scored.has_labels:
        analysis.per_species_table(best.assignments).to_csv(out / "per_species.csv", index=False)
        known = best.assignments[best.assignments["label"].astype(str) != ""]
        plots.plot_contingency(
            known["label"].astype(str).to_numpy(), known["cluster"].to_numpy(), out / "contingency.png"
        )
    return _montage(best, scored.dataset, out, seed)


def analyze(
    experiment: str | Path,
    out: str | Path | None = None,
    label_column: str | None = None,
    objective: str = "purity",
    mode: str = "max",
    imagenet_weights: str | None = None,
    cache_dir: str | None = None,
    seed: int = 0,
) -> Path:
    """Write the whole analysis of `experiment` into `out` (default: EXPERIMENT/analysis); returns report.md."""
    out = Path(out) if out is not None else Path(experiment) / "analysis"
    scored = score(experiment, out, label_column, objective, mode, imagenet_weights, cache_dir, seed)
    importances = plot_sweep(scored, out)
    notes = scored.notes + best_trial_pictures(scored, out, seed)
    _write_report(out, scored, importances, notes)
    return out / "report.md"


def _load_images(trial: analysis.Trial, cache_dir: str | None):
    """The trials' data set, decoded at their image size (from the decode cache), or None if it cannot be read."""
    from laray.data.dataset import DataError, load_dataset

    try:
        size = trial.metrics["config"]["autoencoder"]["image_size"]
        return load_dataset(trial.metrics["data"], size, cache_dir=cache_dir)
    except (DataError, KeyError, OSError):
        return None


def _montage(best: analysis.Trial, dataset, out: Path, seed: int) -> list[str]:
    a = best.assignments
    if dataset is None:
        return ["Cluster montage skipped: the data set could not be loaded from where the sweep read it."]
    paths = np.asarray(dataset.paths, dtype=object)
    if len(paths) <= a["idx"].max() or not (paths[a["idx"].to_numpy()] == a["path"].to_numpy()).all():
        return ["Cluster montage skipped: the data set on disk no longer matches the trial's assignments."]
    species = a["label"].astype(str).to_numpy() if analysis.labelled(a) else None
    images = dataset.images[a["idx"].to_numpy()]  # row i of the montage input = assignment row i
    plots.cluster_montage(images, a["cluster"].to_numpy(), out / "montage.png", species=species, seed=seed)
    return []


def _write_report(out: Path, scored: Scored, importances: dict, notes: list[str]) -> None:
    experiment, table, baselines, best = scored.experiment, scored.table, scored.baselines, scored.best
    objective, mode, has_labels = scored.objective, scored.mode, scored.has_labels
    counts = table["status"].value_counts().to_dict()
    lines = [
        f"# Sweep report: {experiment.name}",
        "",
        f"{len(table)} trials ({', '.join(f'{n} {s.lower()}' for s, n in counts.items())}), "
        f"objective **{objective}** ({mode}).",
        "",
    ]
    holdout = scored.summary.get("holdout")
    if holdout and has_labels:
        lines += [
            f"Scores are on the selection part: {holdout:.0%} of each species' images is held out, never "
            f"selected on, and scored apart (heldout_...): the estimate to report.",
            "",
        ]
    lines += [f"> {n}" for n in notes] + ([""] if notes else [])
    lines += _confirmed_section(scored)
    if best is not None:
        row = table[table["trial_id"] == best.trial_id].iloc[0]
        lines += [
            "## Best trial of the search (one seed)",
            "",
            f"`{best.trial_id}` ({best.status}), folder `{best.folder.name}`",
            "",
            "| hyperparameter | value |",
            "| --- | --- |",
        ]
        lines += [
            f"| {p} | {row[p]:.4g} |" if isinstance(row[p], float) else f"| {p} | {row[p]} |"
            for p in analysis.PARAMS
            if p in row
        ]
        scores = [s for s in (*analysis.SCORES, "silhouette") if s in row and not pd.isna(row[s])]
        lines += [
            "",
            "| | " + " | ".join(scores) + " |",
            "|" + " --- |" * (len(scores) + 1),
            "| best trial | " + " | ".join(f"{row[s]:.3f}" for s in scores) + " |",
        ]
        for name, base in baselines.items():
            lines.append(
                f"| {scored.baseline_names.get(name, name)} | "
                + " | ".join(f"{base[s]:.3f}" if s in base else "" for s in scores)
                + " |"
            )
        beats = [scored.baseline_names.get(n, n) for n in baselines if row.get(f"beats_{n}")]
        lines += [
            "",
            f"It beats {', '.join(beats) if beats else 'no baseline'} on {objective}."
            if baselines
            else "No baselines were recorded.",
            "",
        ]
        if has_labels and {"purity_k2x", "purity_k5x"} <= set(row.index):
            lines += [
                f"Purity grows with the number of clusters: {row['purity']:.3f} at K = species, "
                f"{row['purity_k2x']:.3f} at 2x, {row['purity_k5x']:.3f} at 5x (k-means on its codes).",
                "",
            ]
    lines += ["## All trials", "", _markdown(table.drop(columns=["error"], errors="ignore")), ""]
    errored = table[table["status"] == "ERROR"]
    if len(errored):
        lines += (
            ["## Errored trials", ""]
            + [f"- `{r.trial_id}`: {r.error or 'no error message'}" for r in errored.itertuples()]
            + [""]
        )
    pictures = [
        ("Objective against each hyperparameter", "objective_vs_params.png"),
        ("Optimisation history (Optuna)", "history.png"),
        ("Parameter importances (Optuna)", "importances.png"),
        ("Species x clusters, best trial of the search", "contingency.png"),
        ("Cluster montage, best trial of the search", "montage.png"),
    ]
    for title, name in pictures:
        if (out / name).exists():
            lines += [f"## {title}", "", f"![{title}]({name})", ""]
    if importances:
        lines += ["Importances: " + ", ".join(f"{k} {v:.2f}" for k, v in importances.items()), ""]
        finished = int(table[objective].notna().sum()) if objective in table else 0
        if finished < FEW_TRIALS:
            lines += [
                f"> These importances rest on {finished} finished trials, fewer than {FEW_TRIALS}: "
                "read them as a hint, not a finding.",
                "",
            ]
    (out / "report.md").write_text("\n".join(lines))


def _confirmed_section(scored: Scored) -> list[str]:
    """The report's lead: the confirmed winner over seeds, its held-out score, the baselines on the same seeds."""
    from laray.scoring.confirm import summarize

    runs, objective = scored.confirmed, scored.objective
    if not len(runs):
        return []
    held = f"heldout_{objective}"
    is_recipe = runs["recipe"] if "recipe" in runs else pd.Series(False, index=runs.index)
    entries = [(rank, group, summarize(group.to_dict("records"))) for rank, group in runs[~is_recipe].groupby("rank")]
    recipe = runs[is_recipe]
    if not entries:
        return []
    seeds = sorted(runs["seed"].unique().tolist())

    def interval(summary) -> str:
        ci = summary.get(f"{objective}_ci95")
        return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "n/a (one seed)"

    _, group, winner = entries[0]
    config = group.iloc[0]
    lines = [
        "## Confirmed winner",
        "",
        f"The search's {len(entries)} best configurations, each re-run with {len(seeds)} fresh seeds "
        f"({', '.join(map(str, seeds))}; both stages seeded), ranked by their mean {objective}. "
        f"Intervals are Student's t 95 % intervals of the mean over seeds.",
        "",
        "| hyperparameter | value |",
        "| --- | --- |",
    ]
    lines += [
        f"| {p} | {config[p]:.4g} |" if isinstance(config[p], float) else f"| {p} | {config[p]} |"
        for p in analysis.PARAMS
        if p in config and not pd.isna(config[p])
    ]
    lines += [
        "",
        f"| | mean {objective} | sd | 95 % interval | held-out {objective} (mean) |",
        "| --- | --- | --- | --- | --- |",
    ]

    def line(label, summary):
        held_mean = summary.get(f"{held}_mean")
        return (
            f"| {label} | {summary[f'{objective}_mean']:.3f} | {summary[f'{objective}_sd']:.3f} | "
            f"{interval(summary)} | {'' if held_mean is None else f'{held_mean:.3f}'} |"
        )

    beat, said = True, None
    if len(recipe):
        from laray.scoring.confirm import verdict

        shown = {p: config[p] for p in analysis.PARAMS if p in config and not pd.isna(config[p])}
        beat, said = verdict({"config": shown}, _paired(group, recipe), objective)
    # Only a configuration that beat the recipe is a winner; otherwise the verdict names the recipe as the answer.
    lines.append(
        line("**LA, confirmed winner**" if beat else "LA, the search's best (no better than the recipe)", winner)
    )
    if len(recipe):
        lines.append(line("the recipe (`laray train`'s settings, same seeds)", summarize(recipe.to_dict("records"))))
    for name, base in _confirmed_baselines(scored).items():
        if f"{objective}_mean" in base:
            lines.append(line(name + " (same seeds)", base))
    if winner.get(f"{held}_mean") is not None:
        lines += [
            "",
            f"The held-out {objective}, {winner[f'{held}_mean']:.3f}, is the figure to report: the selection "
            f"{objective} was used to choose this configuration, so it is optimistic.",
        ]
    margin = _margin_over_raw_pixels(group)
    if margin["seeds"]:
        from laray.scoring.confirm import describe_margin

        text = describe_margin(margin, objective)
        lines += ["", text[0].upper() + text[1:] + "."]
    if said:
        lines += ["", "**Verdict**: " + said[0].upper() + said[1:] + "."]
    searched = [p for p in analysis.PARAMS if p in runs and runs[p].notna().any()]
    lines += [
        "",
        "All confirmed configurations:",
        "",
        "| rank | " + " | ".join(searched) + f" | mean {objective} | sd | 95 % interval | held-out |",
        "|" + " --- |" * (len(searched) + 5),
    ]
    if len(recipe):
        entries.append(("recipe", recipe, summarize(recipe.to_dict("records"))))
    for rank, group, summary in entries:
        first = group.iloc[0]
        values = " | ".join(f"{first[p]:.4g}" if isinstance(first[p], float) else str(first[p]) for p in searched)
        held_mean = summary.get(f"{held}_mean")
        lines.append(
            f"| {rank} | {values} | {summary[f'{objective}_mean']:.3f} | {summary[f'{objective}_sd']:.3f} | "
            f"{interval(summary)} | {'' if held_mean is None else f'{held_mean:.3f}'} |"
        )
    lines += ["", "![Confirmed configurations over seeds](confirmed.png)", ""]
    return lines
