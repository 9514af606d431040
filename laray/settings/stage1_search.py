"""Stage-1 settings a search space may search beside the LA ones: `stage1_epochs`, `stage1_lr`, `stage1_pretrained`.

A trial's configuration is one flat dict (Tune's and Optuna's), so the stage-1 settings carry a prefix
that keeps them apart from LA's own `epochs` and `lr`. The trainable splits a configuration in two:
`ae_config_of` gives the trial's AutoEncoderConfig, `la_part` what goes to LAConfig. Each distinct
stage-1 configuration is trained once and kept in the sweep's store (laray.training.store is keyed by
it); `stage1_configurations` bounds how many a search may train, for the plan. No torch, no Ray.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

from laray.errors import ConfigError
from laray.settings.config import AutoEncoderConfig, from_dict

if TYPE_CHECKING:
    from laray.settings.space import SearchSpace

# A searched name -> the AutoEncoderConfig field it sets
STAGE1_SEARCHABLE = {"stage1_epochs": "epochs", "stage1_lr": "lr", "stage1_pretrained": "pretrained"}
STAGE1_INT = ("stage1_epochs",)  # integer settings: int ranges, not uniform ones
STAGE1_CATEGORICAL_ONLY = ("stage1_pretrained",)  # weights are named, not drawn from a range


def searches_stage1(space: SearchSpace) -> bool:
    """Whether the trials of `space` may differ in stage 1 (and so train stage 1 themselves)."""
    return any(name in STAGE1_SEARCHABLE for name in space.search)


def ae_config_of(space_ae: AutoEncoderConfig, config: dict) -> AutoEncoderConfig:
    """The space's fixed stage 1 with the configuration's stage1_* values: what this trial's encoder starts from.

    Values are checked one name at a time, so that a ConfigError names the stage1_* key that made the
    configuration invalid (e.g. `stage1_pretrained: width must be 1.0 with pretrained weights, got 0.25`).
    Unlike laray.settings.config.replace, a None value is kept: `stage1_pretrained: null` means no weights.
    """
    values = dataclasses.asdict(space_ae)
    for name, field in STAGE1_SEARCHABLE.items():
        if name not in config:
            continue
        try:
            ae = from_dict(AutoEncoderConfig, {**values, field: config[name]})
        except (ConfigError, TypeError) as exc:
            raise ConfigError(f"{name}: {exc}") from None
        values[field] = getattr(ae, field)
    return from_dict(AutoEncoderConfig, values)


def la_part(config: dict) -> dict:
    """The configuration without its stage1_* keys: what LAConfig takes."""
    return {k: v for k, v in config.items() if k not in STAGE1_SEARCHABLE}


def stage1_configurations(space: SearchSpace, trials: int) -> int:
    """How many distinct stage-1 configurations a search of `trials` trials may train at most (for the plan).

    The product of the searched stage-1 settings' sizes (a categorical's choices, an int range's values;
    a continuous range has as many as there are trials), capped at `trials`; 1 when nothing of stage 1
    is searched: the sweep's one stage 1.
    """
    sizes = []
    for name, dist in space.search.items():
        if name not in STAGE1_SEARCHABLE:
            continue
        if dist.kind == "categorical":
            sizes.append(len(set(dist.args)))
        elif dist.kind == "int":
            low, high = dist.args
            sizes.append(high - low + 1)
        else:
            sizes.append(math.inf)
    if not sizes:
        return 1
    return int(min(math.prod(sizes), max(1, trials)))
