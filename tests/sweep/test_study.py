"""The sweep's Optuna study as optuna-dashboard shows it (laray.sweep.study): the objective's name, how trials ended.

The searcher is called as Tune calls it (set_search_properties, suggest, on_trial_complete), with no
Ray cluster: about a second. A whole sweep's study is checked in tests/sweep/test_sweep.py.
"""

import optuna
import pytest
from optuna.trial import TrialState

from laray.settings.space import parse_space
from laray.sweep import budget
from laray.sweep.study import (
    EPOCHS_RUN,
    STOPPED_BY,
    create_study,
    name_stored_objective,
    optuna_search,
    stopped_by,
)
from laray.sweep.tune_space import tune_space

N = 40
EPOCHS = 3
SEARCH = {"temperature": {"loguniform": [0.05, 0.5]}, "mixing_rate": {"uniform": [0.3, 0.9]}}


def space_of(objective="purity"):
    return parse_space(
        {
            "objective": objective,
            "confirm_top": 0,
            "fixed": {"autoencoder": {"arch": "vgg11_bn", "width": 0.125}, "la": {"epochs": EPOCHS}},
            "search": SEARCH,
        }
    )


def test_who_stopped_a_trial():
    assert stopped_by(EPOCHS, EPOCHS, budget_stopped=False) == "none"
    assert stopped_by(1, EPOCHS, budget_stopped=False) == "ASHA"
    assert stopped_by(1, EPOCHS, budget_stopped=True) == "time budget"
    assert stopped_by(EPOCHS, EPOCHS, budget_stopped=True) == "none"  # it ran every epoch all the same


def test_the_searchers_study_names_its_objective_and_records_how_each_trial_ended(tmp_path):
    storage, experiment = f"sqlite:///{tmp_path / 'optuna.db'}", str(tmp_path)
    space = space_of("nmi")
    search = optuna_search(space, storage, "sweep", seed=0, experiment=experiment)
    assert search.set_search_properties(None, None, tune_space(space, N))  # as Tune does: the study is loaded
    ids = [f"trial_{i}" for i in range(4)]
    for trial_id in ids:
        search.suggest(trial_id)
    budget._stopped.setdefault(budget._key(experiment), set()).add("trial_2")  # as BudgetStopper records it
    try:
        search.on_trial_complete("trial_0", {"nmi": 0.8, "epoch": EPOCHS, "training_iteration": EPOCHS})
        search.on_trial_complete("trial_1", {"nmi": 0.6, "epoch": 1, "training_iteration": 1})
        search.on_trial_complete("trial_2", {"nmi": 0.7, "epoch": 2, "training_iteration": 2})
        search.on_trial_complete("trial_3", error=True)
    finally:
        budget._stopped.pop(budget._key(experiment))
    study = optuna.load_study(study_name="sweep", storage=storage)
    assert study.metric_names == ["nmi"]
    seen = [(t.state, t.value, t.user_attrs.get(STOPPED_BY), t.user_attrs.get(EPOCHS_RUN)) for t in study.trials]
    assert seen == [
        (TrialState.COMPLETE, 0.8, "none", EPOCHS),
        (TrialState.COMPLETE, 0.6, "ASHA", 1),  # still COMPLETE: TPE weighs it as before
        (TrialState.COMPLETE, 0.7, "time budget", 2),
        (TrialState.FAIL, None, None, None),
    ]


def test_a_resumed_or_warm_started_study_is_named_too(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    name_stored_objective(storage, "sweep", "purity")  # no study yet (stopped in stage 1): nothing, no error
    optuna.create_study(storage=storage, study_name="sweep", direction="maximize")  # as an older laray left it
    assert optuna.load_study(study_name="sweep", storage=storage).metric_names is None
    name_stored_objective(storage, "sweep", "purity")
    assert optuna.load_study(study_name="sweep", storage=storage).metric_names == ["purity"]
    # a new sweep's study, created before a warm start adds trials to it, keeps its name and direction
    study = create_study(f"sqlite:///{tmp_path / 'new.db'}", "new", space_of("ari"))
    assert study.metric_names == ["ari"] and study.direction == optuna.study.StudyDirection.MAXIMIZE


def test_naming_is_quiet(tmp_path, recwarn):
    """Optuna marks set_metric_names experimental; its warning must not reach the sweep's console."""
    create_study(f"sqlite:///{tmp_path / 'optuna.db'}", "sweep", space_of())
    assert [w for w in recwarn if issubclass(w.category, optuna.exceptions.ExperimentalWarning)] == []


@pytest.mark.parametrize("mode", ["max", "min"])
def test_the_study_is_created_in_the_spaces_direction(tmp_path, mode):
    raw = {"mode": mode, "confirm_top": 0, "fixed": {"la": {"epochs": EPOCHS}}, "search": SEARCH}
    study = create_study(f"sqlite:///{tmp_path / 'optuna.db'}", "sweep", parse_space(raw))
    assert study.direction.name == {"max": "MAXIMIZE", "min": "MINIMIZE"}[mode]


@pytest.mark.parametrize(
    "num_samples, concurrent, startup, liar",
    [(6, 2, 2, True), (12, 2, 4, True), (40, 4, 10, True), (100, 1, 10, False), (1, 1, 2, False)],
)
def test_the_sampler_is_sized_for_the_trials_it_has(num_samples, concurrent, startup, liar):
    from laray.sweep.study import sampler_settings

    settings = sampler_settings(num_samples, concurrent)
    assert settings == {"n_startup_trials": startup, "multivariate": True, "constant_liar": liar}
    assert settings["n_startup_trials"] < max(3, num_samples)  # TPE models something before the budget ends


def test_the_recipe_is_the_first_trial_and_the_sampler_is_configured(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    space = space_of()
    recipe = {"temperature": 0.07, "mixing_rate": 0.5}
    search = optuna_search(space, storage, "sweep", seed=0, experiment=str(tmp_path), num_samples=9, first=recipe)
    assert search.set_search_properties(None, None, tune_space(space, N))
    first, second = search.suggest("trial_0"), search.suggest("trial_1")
    assert first == recipe and second != recipe
    sampler = search._sampler
    assert sampler._n_startup_trials == 3 and sampler._multivariate and sampler._constant_liar


def test_a_recipe_a_categorical_does_not_offer_is_not_enqueued(tmp_path):
    raw = {
        "confirm_top": 0,
        "fixed": {"autoencoder": {"arch": "vgg11_bn", "width": 0.125}, "la": {"epochs": EPOCHS}},
        "search": {**SEARCH, "merger": {"categorical": ["flatten"]}},
    }
    space = parse_space(raw)
    recipe = {"temperature": 0.07, "mixing_rate": 0.5, "merger": "mean"}
    search = optuna_search(space, f"sqlite:///{tmp_path / 'o.db'}", "s", seed=0, experiment=str(tmp_path), first=recipe)
    assert search.set_search_properties(None, None, tune_space(space, N))
    assert search.suggest("trial_0")["merger"] == "flatten"
