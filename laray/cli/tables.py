"""The tables `laray sweep` prints at its end: the search's best trial and the confirmed configurations, each beside
the baselines."""

from __future__ import annotations

from laray.score_names import HELDOUT_PREFIX, LABEL_SCORES
from laray.settings.space import settings_label

# The search's table is narrow: the baselines by short names, in the order stage 1 scored them.
SHORT_BASELINES = {
    "raw_pixels": "k-means on raw pixels",
    "autoencoder": "on the auto-encoder codes",
    "pretrained": "on the pretrained encoder",
}


GAP = "  "  # between two columns: headers never run together


def print_search_best(result, space) -> None:
    part = " on the selection part" if space.la.holdout else ""
    print(f"best trial of the search ({space.objective}{part}, one seed):")
    names = max([20, *(len(key) for key in result.best_config)])
    for key, value in result.best_config.items():
        print(f"  {key:<{names}}{GAP}{value:.4g}" if isinstance(value, float) else f"  {key:<{names}}{GAP}{value}")
    labels = dict(SHORT_BASELINES)
    if space.ae.epochs == 0:
        labels["autoencoder"] = (
            "on the untrained encoder" if space.ae.pretrained is None else "on the encoder, 0 epochs"
        )
    # one column for the best trial, one per baseline, each as wide as its header
    columns = [("best trial", result.best_metrics)]
    columns += [(labels.get(name, name), scores) for name, scores in result.baselines.items()]
    widths = [max(6, len(label)) for label, _ in columns]
    print(f"  {'':<20}" + "".join(f"{GAP}{label:>{w}}" for (label, _), w in zip(columns, widths)))
    for key in (*LABEL_SCORES, HELDOUT_PREFIX + "purity"):
        if key in result.best_metrics:
            print(
                f"  {key:<20}"
                + "".join(f"{GAP}{scores.get(key, float('nan')):>{w}.3f}" for (_, scores), w in zip(columns, widths))
            )


def print_confirmed(result, space) -> None:
    """The confirmed configurations (mean, 95 % interval over seeds, held-out mean) beside the baselines."""
    from laray.results.report import baseline_names

    objective = space.objective
    seeds = result.confirmed[0]["seeds"]
    print(f"\nconfirmed: {len(result.confirmed)} configuration(s) x {len(seeds)} seeds {seeds}, by mean {objective}:")
    rows = [
        (
            f"#{i + 1} {settings_label(entry['config'])}",
            entry,
        )
        for i, entry in enumerate(result.confirmed)
    ]
    if result.recipe is not None:  # what `laray train` runs, over the same seeds
        rows.append(("the recipe (laray train's settings)", result.recipe))
    names = baseline_names(space.ae.epochs, space.ae.pretrained)
    rows += [(names.get(name, name), summary) for name, summary in result.confirmed_baselines.items()]
    width = min(60, max(len(label) for label, _ in rows))  # the labels' column; a longer label is cut
    print(f"  {'':<{width}}{GAP}{'mean':>6}{GAP}{'sd':>6}{GAP}{'95 % interval':>15}{GAP}{'held-out':>8}")
    for label, entry in rows:
        interval = entry.get(f"{objective}_ci95")
        shown = f"[{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "n/a"
        held = entry.get(f"heldout_{objective}_mean")
        print(
            f"  {label[:width]:<{width}}{GAP}{entry[f'{objective}_mean']:>6.3f}{GAP}{entry[f'{objective}_sd']:>6.3f}"
            f"{GAP}{shown:>15}{GAP}{'' if held is None else f'{held:.3f}':>8}"
        )
    winner = result.confirmed[0]
    held = winner.get(f"heldout_{objective}_mean")
    # Only a configuration that beat the recipe is a winner; otherwise the verdict names the recipe as the answer.
    label = "winner" if result.recipe is None or result.beat_recipe else "the search's best, no better than the recipe"
    print(
        f"{label}: #1, mean {objective} {winner[f'{objective}_mean']:.3f}"
        + (
            f"; held-out {objective} {held:.3f} (the estimate to report: no choice was made on it)"
            if held is not None
            else ""
        )
    )
    if result.margin and result.margin["seeds"]:
        from laray.scoring.confirm import describe_margin

        print(describe_margin(result.margin, objective))


def print_verdict(result) -> None:
    """The console's last line: whether the search beat the recipe, in words, with the paired margin."""
    if result.verdict:
        print(f"\nverdict: {result.verdict}")
