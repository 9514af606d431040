"""Warm start (laray.sweep.warm_start): earlier sweeps' finished trials handed to the new sweep's TPE.

Earlier "sweeps" are folders with a sweep.json and an optuna.db written directly with Optuna,
so no Ray cluster runs: the checks of what OptunaSearch then samples call it as Tune does
(set_search_properties, then suggest). A few seconds.
"""

import dataclasses
import json
from pathlib import Path

import optuna
import pytest
from conftest import write_digit_folder
from optuna.trial import TrialState, create_trial

from laray.data.dataset import describe
from laray.settings.space import parse_space
from laray.sweep.tune_space import tune_space
from laray.sweep.warm_start import (
    FROM,
    IDENTITY_FILE,
    NUMBER,
    OPTUNA_DB,
    WarmStartError,
    recorded,
    seed_study,
    sweep_identity,
    take_over,
    write_identity,
)

N = 40
SEED = 0
AE = {"arch": "vgg11_bn", "width": 0.125, "image_size": 32, "epochs": 1, "batch_size": 32}
SEARCH = {
    "temperature": {"loguniform": [0.05, 0.5]},
    "mixing_rate": {"uniform": [0.3, 0.9]},
    "k_neighbours": {"int": [5, 30]},
    "clustering_repeats": {"int": [1, 3]},
    "n_centroids": {"fraction": [0.1, 0.5]},  # 4 to 20 at N = 40
}
# The earlier sweep: a wider temperature range, and clustering_repeats as choices (another kind of distribution).
EARLIER = {**SEARCH, "temperature": {"loguniform": [0.01, 1.0]}, "clustering_repeats": {"categorical": [1, 2, 3]}}
IN = {"temperature": 0.1, "mixing_rate": 0.5, "k_neighbours": 10, "clustering_repeats": 2, "n_centroids": 8}


def space_of(search=None, la=None, holdout=0.5, objective="purity", ae=None):
    return parse_space(
        {
            "objective": objective,
            "holdout": holdout,
            "confirm_top": 0,
            "fixed": {"autoencoder": {**AE, **(ae or {})}, "la": {"epochs": 2, "batch_size": 32, **(la or {})}},
            "search": search or SEARCH,
        }
    )


def distributions_of(space):
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch.convert_search_space(tune_space(space, N))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return describe(str(write_digit_folder(tmp_path_factory.mktemp("digits"), N)), 32)


def earlier_sweep(folder: Path, identity: dict, space, trials: list[tuple[dict, float]], extra: bool = True) -> Path:
    """A finished sweep: sweep.json, and optuna.db's study (named after the folder) with these COMPLETE trials.

    extra: also a FAIL and a RUNNING trial, neither of which may be taken over.
    """
    folder.mkdir(parents=True)
    write_identity(folder, identity)
    dists = distributions_of(space)
    study = optuna.create_study(storage=f"sqlite:///{folder / OPTUNA_DB}", study_name=folder.name, direction="maximize")
    study.add_trials([create_trial(params=p, distributions=dists, value=v) for p, v in trials])
    if extra:
        study.add_trial(create_trial(params=IN, distributions=dists, state=TrialState.FAIL))
        study.ask(fixed_distributions=dists)  # left RUNNING
    return folder


def test_identity_is_what_sweep_json_holds(data, tmp_path):
    space = space_of()
    identity = sweep_identity(data, space, SEED)
    write_identity(tmp_path, identity)
    assert json.loads((tmp_path / IDENTITY_FILE).read_text()) == identity
    assert identity["data"] == data.key and identity["labels"] == data.labels_key
    assert identity["autoencoder"]["arch"] == "vgg11_bn"
    assert identity["holdout"] == 0.5 and identity["holdout_seed"] == 0
    assert identity["la"]["epochs"] == 2 and not set(identity["la"]) & {*SEARCH, "holdout", "holdout_seed"}
    assert sweep_identity(data, space_of(holdout=0), 3)["holdout_seed"] is None  # no split for the seed to draw


def test_takes_over_the_complete_trials_in_this_space(data, tmp_path):
    identity = sweep_identity(data, space_of(), SEED)
    inside = [({**IN, "temperature": 0.06 + 0.01 * i}, 0.5 + 0.01 * i) for i in range(4)]
    first = earlier_sweep(
        tmp_path / "demo-1", identity, space_of(EARLIER), inside + [({**IN, "temperature": 0.9}, 0.9)]
    )  # beyond this space's 0.5
    second = earlier_sweep(tmp_path / "demo-2", identity, space_of(EARLIER), inside[:1], extra=False)
    ours = distributions_of(space_of())
    warm = take_over([first, str(second), first], identity, ours)  # a folder named twice counts once
    assert warm.sources == [(str(first), 4, 1), (str(second), 1, 0)]
    assert warm.describe() == f"warm start: 4 trials taken over from {first} (1 outside this space), 1 from {second}"
    assert warm.record() == {
        "trials": 5,
        "from": [{"dir": str(first), "taken": 4, "outside": 1}, {"dir": str(second), "taken": 1, "outside": 0}],
    }
    assert [t.user_attrs for t in warm.trials[:2]] == [{FROM: str(first), NUMBER: 0}, {FROM: str(first), NUMBER: 1}]
    for trial in warm.trials:
        assert trial.state == TrialState.COMPLETE and trial.distributions == ours  # ours, not the earlier sweep's
        assert type(trial.params["clustering_repeats"]) is int and type(trial.params["k_neighbours"]) is int
    assert [t.value for t in warm.trials] == [0.5, 0.51, 0.52, 0.53, 0.5]


def test_a_setting_searched_in_one_sweep_and_fixed_in_the_other_is_checked_per_trial(data, tmp_path):
    # Earlier: merger searched, clustering_repeats fixed at 2. Now: merger fixed (mean), clustering_repeats searched.
    earlier = space_of(
        {
            **{k: v for k, v in SEARCH.items() if k != "clustering_repeats"},
            "merger": {"categorical": ["mean", "flatten"]},
        },
        la={"clustering_repeats": 2},
    )
    folder = earlier_sweep(
        tmp_path / "earlier",
        sweep_identity(data, earlier, SEED),
        earlier,
        [
            ({**{k: v for k, v in IN.items() if k != "clustering_repeats"}, "merger": m}, 0.5)
            for m in ("mean", "flatten", "mean")
        ],
        extra=False,
    )
    ours = space_of()
    warm = take_over([folder], sweep_identity(data, ours, SEED), distributions_of(ours))
    assert warm.sources == [(str(folder), 2, 1)]  # flatten is not this sweep's fixed merger
    assert [t.params["clustering_repeats"] for t in warm.trials] == [2, 2]  # the earlier sweep's fixed value
    assert all("merger" not in t.params for t in warm.trials)


def test_precision_is_no_part_of_the_identity_so_an_fp32_sweep_warm_starts_a_bf16_one(data, tmp_path):
    """Precision is how the numbers are computed, as the device is: a sweep.json written before the setting
    existed (none there) and an fp32 sweep both hand their trials to a bf16 sweep."""
    fp32 = space_of().overridden(precision="fp32")
    identity = sweep_identity(data, fp32, SEED)
    assert "precision" not in identity["autoencoder"] and "precision" not in identity["la"]
    folder = earlier_sweep(tmp_path / "fp32", identity, fp32, [(IN, 0.5)], extra=False)
    bf16 = space_of().overridden(precision="bf16")
    warm = take_over([folder], sweep_identity(data, bf16, SEED), distributions_of(bf16))
    assert warm.sources == [(str(folder), 1, 0)]


def test_how_often_la_is_evaluated_is_no_part_of_the_identity(data, tmp_path):
    """The evaluation leaves the training as it is and the last epoch is always scored: a sweep evaluated every
    epoch (as sweep.json files written before recorded) hands its trials to one evaluated every 5th."""
    every = space_of(la={"eval_every": 1})
    identity = sweep_identity(data, every, SEED)
    identity["la"]["eval_every"] = 1  # as an older sweep.json holds it
    folder = earlier_sweep(tmp_path / "every", identity, every, [(IN, 0.5)], extra=False)
    fifth = space_of(la={"eval_every": 5})
    assert "eval_every" not in sweep_identity(data, fifth, SEED)["la"]
    warm = take_over([folder], sweep_identity(data, fifth, SEED), distributions_of(fifth))
    assert warm.sources == [(str(folder), 1, 0)]


@pytest.mark.parametrize(
    "change, field",
    [
        (lambda d, s: (dataclasses.replace(d, key="another listing"), s, SEED), "data is"),
        (lambda d, s: (d, space_of(ae={"epochs": 3}), SEED), "autoencoder.epochs is 3 there, 1 here"),
        (lambda d, s: (d, space_of(holdout=0.3), SEED), "holdout is 0.3 there, 0.5 here"),
        (lambda d, s: (d, s, SEED + 1), "holdout_seed is 1 there, 0 here"),
        (lambda d, s: (d, space_of(la={"epochs": 5}), SEED), "la.epochs is 5 there, 2 here"),
        (lambda d, s: (d, space_of(objective="nmi"), SEED), "objective is 'nmi' there, 'purity' here"),
    ],
)
def test_an_earlier_sweep_that_differs_is_refused_naming_the_folder_and_field(data, tmp_path, change, field):
    space = space_of()
    folder = earlier_sweep(tmp_path / "other", sweep_identity(*change(data, space)), space, [(IN, 0.5)])
    with pytest.raises(WarmStartError) as caught:
        take_over([folder], sweep_identity(data, space, SEED), distributions_of(space))
    message = str(caught.value)
    assert "\n" not in message and str(folder) in message and field in message, message


def test_a_folder_that_is_no_laray_sweep_is_refused(data, tmp_path):
    identity, dists = sweep_identity(data, space_of(), SEED), distributions_of(space_of())
    old = earlier_sweep(tmp_path / "old", identity, space_of(), [(IN, 0.5)])
    (old / IDENTITY_FILE).unlink()  # as an older laray left it
    no_db = tmp_path / "no-db"
    no_db.mkdir()
    write_identity(no_db, identity)
    for folder, reason in ((old, "no sweep.json"), (tmp_path / "missing", "no such folder"), (no_db, "no optuna.db")):
        with pytest.raises(WarmStartError, match=reason) as caught:
            take_over([folder], identity, dists)
        assert str(folder) in str(caught.value)


def test_the_earlier_study_is_not_modified(data, tmp_path):
    identity = sweep_identity(data, space_of(), SEED)
    folder = earlier_sweep(tmp_path / "demo", identity, space_of(), [(IN, 0.5)])
    before = (folder / OPTUNA_DB).read_bytes()
    take_over([folder], identity, distributions_of(space_of()))
    assert (folder / OPTUNA_DB).read_bytes() == before


def test_seeding_twice_adds_nothing_the_second_time(data, tmp_path):
    identity = sweep_identity(data, space_of(), SEED)
    folder = earlier_sweep(tmp_path / "demo", identity, space_of(), [(IN, 0.5), ({**IN, "k_neighbours": 20}, 0.6)])
    warm = take_over([folder], identity, distributions_of(space_of()))
    storage = f"sqlite:///{tmp_path / 'new' / OPTUNA_DB}"
    (tmp_path / "new").mkdir()
    assert recorded(storage, "new") is None
    for _ in range(2):
        seed_study(storage, "new", "max", warm)
        study = optuna.load_study(study_name="new", storage=storage)
        assert [(t.params, t.value, t.state) for t in study.trials] == [
            (t.params, t.value, t.state) for t in warm.trials
        ]
    assert recorded(storage, "new") == warm.record()
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE


def _optuna_search(storage: str, name: str, space, seed: int = 0):
    """The sweep's searcher (laray.sweep.study.optuna_search), set up as Tune sets it up (which loads the study)."""
    from laray.sweep.study import optuna_search

    search = optuna_search(space, storage, name, seed, experiment=str(Path(storage.removeprefix("sqlite:///")).parent))
    assert search.set_search_properties(None, None, tune_space(space, N))
    return search


def test_optuna_search_samples_from_what_was_taken_over(data, tmp_path):
    """12 trials taken over, the best two near temperature 0.3 and mixing_rate 0.85: TPE's suggestions go there.

    Drawn at random from this space (as TPE's first 10 trials are, without a warm start) a
    suggestion lands in that corner (temperature > 0.2, mixing_rate > 0.7) about one time in 8,
    five in a row once in 24,000.
    """
    space = space_of()
    identity = sweep_identity(data, space, SEED)
    good = [({**IN, "temperature": t, "mixing_rate": m}, 0.9) for t, m in ((0.3, 0.85), (0.32, 0.87))]
    bad = [({**IN, "temperature": 0.06 + 0.01 * i, "mixing_rate": 0.3 + 0.04 * i}, 0.2) for i in range(10)]
    folder = earlier_sweep(tmp_path / "demo", identity, space, good + bad)
    suggested = {}
    for warm_start in (True, False):
        storage = f"sqlite:///{tmp_path / str(warm_start)}.db"
        if warm_start:
            seed_study(storage, "new", space.mode, take_over([folder], identity, distributions_of(space)))
        search = _optuna_search(storage, "new", space)
        suggested[warm_start] = [search.suggest(f"trial_{i}") for i in range(5)]
        trials = optuna.load_study(study_name="new", storage=storage).trials
        assert len(trials) == 12 * warm_start + 5
        # Tune's trial config and the new Optuna trials: the same kinds of values
        assert all(
            type(s["k_neighbours"]) is int and type(s["clustering_repeats"]) is int for s in suggested[warm_start]
        )
        for i in range(5):  # completing a new trial works with the taken-over ones in the study
            search.on_trial_complete(f"trial_{i}", {space.objective: 0.5, "training_iteration": 1})
        trials = optuna.load_study(study_name="new", storage=storage).trials
        assert sum(t.state == TrialState.COMPLETE for t in trials) == 12 * warm_start + 5

    def in_corner(s):
        return s["temperature"] > 0.2 and s["mixing_rate"] > 0.7

    assert all(in_corner(s) for s in suggested[True]), suggested[True]
    assert not all(in_corner(s) for s in suggested[False]), suggested[False]
