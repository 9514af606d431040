"""Searching stage-1 settings (stage1_epochs, stage1_lr, stage1_pretrained): parsing, the split of a trial's
configuration into its two stages, the recipe, and how many stage-1 configurations a search may train."""

import math

import pytest
from conftest import write_vgg_weights

from laray.errors import ConfigError
from laray.settings.config import AutoEncoderConfig
from laray.settings.defaults import recipe_point, train_configs
from laray.settings.space import SEARCHABLE, SpaceError, parse_space
from laray.settings.stage1_search import (
    STAGE1_SEARCHABLE,
    ae_config_of,
    la_part,
    searches_stage1,
    stage1_configurations,
)

AE = {"arch": "vgg11_bn", "width": 0.25, "image_size": 32, "epochs": 5, "lr": 0.05}


def space_with(search: dict, recipe: dict | None = None, ae: dict | None = None, **top):
    raw = {
        "fixed": {"autoencoder": {**AE, **(ae or {})}},
        "search": {"temperature": {"loguniform": [0.03, 0.3]}, **search},
        **top,
    }
    if recipe is not None:
        raw["recipe"] = recipe
    return parse_space(raw)


def test_the_stage1_names_are_searchable_beside_the_la_ones():
    assert set(STAGE1_SEARCHABLE) <= set(SEARCHABLE)
    assert STAGE1_SEARCHABLE == {"stage1_epochs": "epochs", "stage1_lr": "lr", "stage1_pretrained": "pretrained"}
    space = space_with({"stage1_epochs": {"categorical": [0, 2]}, "stage1_lr": {"loguniform": ["1e-3", 0.1]}})
    assert space.search["stage1_epochs"].args == (0, 2)
    assert space.search["stage1_lr"].args == (0.001, 0.1)
    assert space.ae.epochs == 5  # the fixed stage 1 stays as given
    assert searches_stage1(space)
    assert not searches_stage1(space_with({}))


def test_a_trials_configuration_splits_into_its_two_stages():
    fixed = AutoEncoderConfig(**AE)
    config = {"temperature": 0.1, "stage1_epochs": 0, "stage1_lr": 0.01, "lr": 0.02}
    ae = ae_config_of(fixed, config)
    assert (ae.epochs, ae.lr, ae.arch, ae.width) == (0, 0.01, "vgg11_bn", 0.25)
    assert la_part(config) == {"temperature": 0.1, "lr": 0.02}  # LA's own lr stays LA's
    assert ae_config_of(fixed, {"temperature": 0.1}) == fixed  # nothing of stage 1 searched: the fixed one
    assert ae_config_of(fixed, {"stage1_epochs": 2.0}).epochs == 2  # as Optuna's storage may give it back


def test_stage1_pretrained_null_means_no_weights(tmp_path):
    weights = write_vgg_weights(tmp_path / "vgg11.pth")
    fixed = AutoEncoderConfig(**{**AE, "width": 1.0, "pretrained": str(weights)})
    assert ae_config_of(fixed, {"stage1_pretrained": None}).pretrained is None  # not ignored, as replace() would
    assert ae_config_of(AutoEncoderConfig(**{**AE, "width": 1.0}), {"stage1_pretrained": str(weights)}).pretrained == (
        str(weights)
    )


@pytest.mark.parametrize(
    "config, named",
    [
        ({"stage1_epochs": -1}, "stage1_epochs"),
        ({"stage1_epochs": 1.5}, "stage1_epochs"),
        ({"stage1_epochs": True}, "stage1_epochs"),
        ({"stage1_lr": 0}, "stage1_lr"),
        ({"stage1_lr": "fast"}, "stage1_lr"),
        ({"stage1_pretrained": "imagenet"}, "stage1_pretrained"),  # width 0.25: weights need 1.0
        ({"stage1_pretrained": "/no/such/weights.pth"}, "stage1_pretrained"),
    ],
)
def test_a_bad_stage1_value_is_one_line_naming_its_key(config, named):
    with pytest.raises(ConfigError) as info:
        ae_config_of(AutoEncoderConfig(**AE), config)
    assert str(info.value).startswith(f"{named}: ") and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "search, named",
    [
        ({"stage1_epochs": {"uniform": [0, 3]}}, "search.stage1_epochs is an integer setting"),
        ({"stage1_epochs": {"int": [-1, 3]}}, "search.stage1_epochs: epochs must be an integer >= 0"),
        ({"stage1_epochs": {"categorical": [0, 2.5]}}, "search.stage1_epochs: epochs must be an integer"),
        ({"stage1_lr": {"uniform": [0, 0.1]}}, "search.stage1_lr: lr must be > 0"),
        ({"stage1_pretrained": {"uniform": [0, 1]}}, "search.stage1_pretrained names weights: use categorical"),
        ({"stage1_pretrained": {"categorical": [None, "imagenet"]}}, "search.stage1_pretrained: width must be 1.0"),
        ({"stage1_width": {"categorical": [0.5, 1.0]}}, "stage1_width"),
    ],
)
def test_a_bad_stage1_distribution_is_a_space_error_naming_its_key(search, named):
    with pytest.raises(SpaceError) as info:
        space_with(search)
    assert named in str(info.value) and "\n" not in str(info.value)


def test_a_bad_stage1_recipe_value_is_a_space_error_naming_its_key():
    with pytest.raises(SpaceError, match=r"^recipe: stage1_epochs: epochs must be an integer >= 0"):
        space_with({"stage1_epochs": {"int": [0, 3]}}, recipe={"stage1_epochs": -2})
    with pytest.raises(SpaceError, match=r"recipe key\(s\) \['stage1_lr'\] are not searched"):
        space_with({"stage1_epochs": {"int": [0, 3]}}, recipe={"stage1_lr": 0.1})


def test_the_recipe_takes_its_stage1_values_else_the_fixed_stage1():
    searched = {"stage1_epochs": {"categorical": [0, 2]}, "stage1_lr": {"loguniform": [0.001, 0.1]}}
    space = space_with(searched, recipe={"temperature": 0.07, "stage1_epochs": "2"})
    assert space.recipe == {"temperature": 0.07, "stage1_epochs": 2}
    # stage1_lr has no recipe value: the fixed auto-encoder's, the stage 1 the sweep trains before its trials
    assert recipe_point(space, 1797) == {"temperature": 0.07, "stage1_epochs": 2, "stage1_lr": 0.05}
    ae, la = train_configs(space)  # what `laray train` runs with this space
    assert (ae.epochs, ae.lr) == (2, 0.05) and la.temperature == 0.07
    assert train_configs(space_with(searched))[0] == space.ae  # no recipe: the fixed stage 1
    assert recipe_point(space_with(searched), 1797) == {"temperature": 0.07, "stage1_epochs": 5, "stage1_lr": 0.05}


def test_stage1_pretrained_is_searched_among_the_weights_given(tmp_path):
    weights = str(write_vgg_weights(tmp_path / "vgg11.pth"))
    space = space_with(
        {"stage1_pretrained": {"categorical": [None, weights]}}, recipe={"stage1_pretrained": None}, ae={"width": 1.0}
    )
    assert space.search["stage1_pretrained"].args == (None, weights)
    assert recipe_point(space, 100)["stage1_pretrained"] is None
    assert train_configs(space)[0].pretrained is None


@pytest.mark.parametrize(
    "search, trials, configurations",
    [
        ({}, 10, 1),  # nothing of stage 1 searched: the sweep's one stage 1
        ({"stage1_epochs": {"categorical": [0, 2]}}, 10, 2),
        ({"stage1_epochs": {"categorical": [0, 2, 2]}}, 10, 2),  # a choice given twice is one configuration
        ({"stage1_epochs": {"categorical": [0, 2]}}, 1, 1),  # never more than the trials
        ({"stage1_epochs": {"int": [1, 3]}, "stage1_lr": {"categorical": [0.01, 0.1]}}, 10, 6),
        ({"stage1_epochs": {"int": [1, 3]}, "stage1_lr": {"categorical": [0.01, 0.1]}}, 4, 4),
        ({"stage1_lr": {"loguniform": [0.001, 0.1]}}, 7, 7),  # continuous: each trial its own
        ({"stage1_epochs": {"int": [2, 2]}}, 5, 1),
    ],
)
def test_stage1_configurations_bound_what_a_search_may_train(search, trials, configurations):
    result = stage1_configurations(space_with(search), trials)
    assert result == configurations and isinstance(result, int) and not math.isinf(result)
