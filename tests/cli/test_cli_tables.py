"""The tables `laray sweep` prints at its end (laray.cli.tables), from results made by hand: every baseline shown."""

import re
from types import SimpleNamespace

import pytest

from laray.cli.tables import print_confirmed, print_search_best, print_verdict
from laray.scoring.confirm import baselines_over_seeds, confirmed, margin_over

RAW = {"purity": 0.41, "heldout_purity": 0.40}
CODES = {"purity": 0.52, "heldout_purity": 0.50}
PRETRAINED = {"purity": 0.63, "heldout_purity": 0.61}


def space(pretrained, ae_epochs=1):
    return SimpleNamespace(
        objective="purity",
        la=SimpleNamespace(holdout=0.5),
        ae=SimpleNamespace(epochs=ae_epochs, pretrained=pretrained),
    )


def result(baselines: dict):
    runs = [({"temperature": 0.1}, seed, {"purity": p, "heldout_purity": p - 0.02}) for seed, p in ((1, 0.7), (2, 0.8))]
    entries = confirmed(runs, "purity", "max")
    over_seeds = baselines_over_seeds(
        {1: baselines, 2: {k: {s: v + 0.1 for s, v in b.items()} for k, b in baselines.items()}}
    )
    return SimpleNamespace(
        best_config={"temperature": 0.1},
        best_metrics={"purity": 0.75, "heldout_purity": 0.72},
        baselines=baselines,
        confirmed=entries,
        confirmed_baselines=over_seeds,
        margin=margin_over(entries[0], over_seeds["raw_pixels"]),
        recipe=None,
        verdict=None,
        beat_recipe=False,
    )


def search_table(printed: str) -> tuple[list[str], dict]:
    """The best trial's table: its header's columns, and each score's row of numbers."""
    lines = printed.split("\nconfirmed:")[0].splitlines()
    header = next(i for i, line in enumerate(lines) if "best trial" in line and "k-means" in line)
    rows = {line.split()[0]: [float(x) for x in line.split()[1:]] for line in lines[header + 1 :]}
    return lines[header], rows


def columns_of(line: str) -> list[str]:
    """A table's line cut at every run of two or more spaces: its cells, when columns are two spaces apart."""
    return re.split(r" {2,}", line.strip())


def ends(line: str) -> list[int]:
    """Where each cell of a line ends (its right edge): right-aligned columns end where their headers do."""
    return [m.end() for m in re.finditer(r"\S+(?: \S+)*", line)]


def test_the_pretrained_baseline_has_its_column_and_its_row(capsys):
    shown = result({"raw_pixels": RAW, "autoencoder": CODES, "pretrained": PRETRAINED})
    print_search_best(shown, space("vgg16_bn.pth"))
    print_confirmed(shown, space("vgg16_bn.pth"))
    printed = capsys.readouterr().out
    header, rows = search_table(printed)
    assert (
        header.split("best trial")[1].split()
        == "k-means on raw pixels on the auto-encoder codes on the pretrained encoder".split()
    )
    assert rows["purity"] == [0.75, 0.41, 0.52, 0.63] and rows["heldout_purity"] == [0.72, 0.40, 0.50, 0.61]

    confirmed_rows = {cells[0]: cells[1:] for cells in map(columns_of, printed.split("\nconfirmed:")[1].splitlines())}
    # each baseline's mean over seeds 1 and 2 (the second seed's scores are the first's + 0.1)
    assert confirmed_rows["k-means on raw pixels"][0] == f"{0.46:.3f}"
    assert confirmed_rows["k-means on the auto-encoder's codes"][0] == f"{0.57:.3f}"
    assert confirmed_rows["k-means on the pretrained encoder's codes"][0] == f"{0.68:.3f}"
    assert confirmed_rows["k-means on the pretrained encoder's codes"][-1] == f"{0.66:.3f}"  # held-out mean
    # the margin stays over raw pixels
    assert "winner minus k-means on raw pixels, paired by seed: purity +0.290" in printed


def test_without_pretrained_weights_there_is_no_pretrained_column(capsys):
    shown = result({"raw_pixels": RAW, "autoencoder": CODES})
    print_search_best(shown, space(None))
    print_confirmed(shown, space(None))
    printed = capsys.readouterr().out
    header, rows = search_table(printed)
    assert header.split("best trial")[1].split() == "k-means on raw pixels on the auto-encoder codes".split()
    assert rows["purity"] == [0.75, 0.41, 0.52]
    assert "pretrained" not in printed


@pytest.mark.parametrize(
    "pretrained, label", [(None, "on the untrained encoder"), ("w.pth", "on the encoder, 0 epochs")]
)
def test_a_stage_1_of_no_epochs_names_the_codes_baseline_for_what_it_scored(capsys, pretrained, label):
    baselines = {"raw_pixels": RAW, "autoencoder": CODES, **({"pretrained": CODES} if pretrained else {})}
    print_search_best(result(baselines), space(pretrained, ae_epochs=0))
    header, _ = search_table(capsys.readouterr().out)
    assert label in header


def test_the_recipe_has_its_row_and_the_verdict_is_the_last_line(capsys):
    shown = result({"raw_pixels": RAW, "autoencoder": CODES})
    recipe_runs = [
        ({"temperature": 0.07}, seed, {"purity": p, "heldout_purity": p}) for seed, p in ((1, 0.6), (2, 0.7))
    ]
    shown.recipe = confirmed(recipe_runs, "purity", "max")[0]
    shown.verdict = "the search found settings better than the recipe (temperature=0.1): ..."
    print_confirmed(shown, space(None))
    print_verdict(shown)
    printed = capsys.readouterr().out
    row = next(line for line in printed.splitlines() if line.strip().startswith("the recipe (laray train's settings)"))
    assert row.split(")")[1].split()[:2] == ["0.650", "0.071"]  # mean and sd over seeds 1 and 2
    assert printed.rstrip().splitlines()[-1] == f"verdict: {shown.verdict}"
    # no winner unless it beat the recipe (here: not recorded as beaten)
    assert "\nthe search's best, no better than the recipe: #1, mean purity 0.750" in printed
    assert "\nwinner: #1" not in printed
    shown.beat_recipe = True
    print_confirmed(shown, space(None))
    assert "\nwinner: #1, mean purity 0.750" in capsys.readouterr().out
    shown.verdict = None  # no confirmation: nothing to say
    print_verdict(shown)
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("pretrained", [None, "vgg16_bn.pth"])
def test_every_header_is_two_spaces_from_the_next_and_over_its_column(capsys, pretrained):
    """`best trial k-means on raw pixels on the auto-encoder codes` read as one header: now two spaces at least
    between any two columns, headers and cells, and each number right under the end of its header."""
    baselines = {"raw_pixels": RAW, "autoencoder": CODES, **({"pretrained": PRETRAINED} if pretrained else {})}
    shown = result(baselines)
    recipe_runs = [
        ({"temperature": 0.07}, seed, {"purity": p, "heldout_purity": p}) for seed, p in ((1, 0.6), (2, 0.7))
    ]
    shown.recipe = confirmed(recipe_runs, "purity", "max")[0]
    print_search_best(shown, space(pretrained))
    print_confirmed(shown, space(pretrained))
    search, confirmation = capsys.readouterr().out.split("\nconfirmed:")

    header, rows = search_table(search)
    labels = ["best trial", "k-means on raw pixels", "on the auto-encoder codes"]
    labels += ["on the pretrained encoder"] if pretrained else []
    assert columns_of(header) == labels
    numbers = [line for line in search.splitlines() if line.split()[0] in rows]
    assert [columns_of(line)[1:] for line in numbers] == [
        [f"{x:.3f}" for x in rows[line.split()[0]]] for line in numbers
    ]
    assert all(ends(line)[1:] == ends(header) for line in numbers)

    lines = confirmation.splitlines()[1:]
    header = next(line for line in lines if "mean" in line)
    assert columns_of(header) == ["mean", "sd", "95 % interval", "held-out"]
    body = lines[lines.index(header) + 1 : lines.index(header) + 1 + 2 + len(baselines)]  # #1, the recipe, baselines
    assert [columns_of(line)[0] for line in body][:2] == ["#1 tau=0.1", "the recipe (laray train's settings)"]
    for line in body:
        assert len(columns_of(line)) == 5, line  # the label, then four cells, each two spaces from the next
        assert ends(line)[-4:] == ends(header), line


def test_a_verdict_ahead_inside_the_spread_ends_with_the_command_that_adds_the_seeds():
    from laray.cli.sweep import more_seeds_command
    from laray.scoring.confirm import summarize

    # the flowers12 sweep's paired differences: mean +0.0234, sd 0.0355. From a printed t table, 11 seeds:
    # 2.228 / sqrt(11) * 0.0355 = 0.0238, above the mean; 12 seeds: 2.201 / sqrt(12) * 0.0355 = 0.0226, below it
    runs = [{"purity": p, "heldout_purity": p} for p in (0.0, 0.083, -0.006, 0.019, 0.021)]
    margin = {"seeds": [1, 2, 3, 4, 5], **summarize(runs)}
    argv = ["sweep", "--data", "photos", "--confirm-seeds", "5", "--num-samples", "6", "--warm-start", "a", "b"]
    assert more_seeds_command(margin, "purity", argv, "flowers") == (
        "laray sweep --data photos --resume --name flowers --confirm-seeds 12"
    )
    behind = {"seeds": [1, 2, 3, 4, 5], **summarize([{"purity": -p, "heldout_purity": -p} for p in (0.01, 0.02, 0.0)])}
    assert more_seeds_command(behind, "purity", argv, "flowers") is None
    assert more_seeds_command(None, "purity", argv, "flowers") is None
