"""Warm start: a new sweep's TPE starts from the finished trials of earlier sweeps (`laray sweep --warm-start DIR`).

    STORAGE/NAME/sweep.json   what makes the sweep's objective values comparable (`sweep_identity`):
                              {"format": 1, "data": data key, "labels": labels key, "autoencoder": {stage-1
                              settings}, "holdout": fraction, "holdout_seed": the sweep's seed (null without
                              a holdout), "la": {LA settings not searched}, "objective": ..., "mode": ...}
    STORAGE/NAME/optuna.db    the earlier study (its only one) is opened read-only; its COMPLETE trials are
                              copied into the new sweep's study with user_attrs {FROM: source folder,
                              NUMBER: trial number there}, and the study's user_attrs[RECORD] says what
                              was taken over (for best.json, also after a resume)

A value is an objective reached with given data, stage-1 settings, held-out split, fixed LA settings
and objective (precision aside, as the device is: HOW_NOT_WHAT): an earlier sweep that differs in
any of these is REFUSED with a one-line error naming the folder and the field. Re-running its trials
under this sweep's settings would cost a full trial each, which is what the new sweep's trials are
for; the user can instead re-run the earlier sweep with matching settings. A setting searched in one
sweep and fixed in the other is checked per trial: the trial is taken when its settings lie in this
sweep's distributions and match this sweep's fixed values; otherwise it counts as "outside this
space".
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from laray.errors import LarayError
from laray.settings.space import SWEEP_SET
from laray.training.run import write_json

IDENTITY_FILE = "sweep.json"
OPTUNA_DB = "optuna.db"  # the sweep's Optuna study, STORAGE/NAME/optuna.db (laray.sweep.driver uses this name)
FORMAT = 1
FROM, NUMBER, RECORD = "warm_start_from", "warm_start_number", "laray_warm_start"


class WarmStartError(LarayError):
    """An earlier sweep that cannot be taken over; the message names its folder and why."""


# How the numbers are computed, not what is trained: like the device (which "auto" ties precision to), it is
# left out, so a bf16 sweep on GPUs may start from an fp32 one on CPUs, and from a sweep.json written before it.
# Likewise how often LA is evaluated: the evaluation leaves the training as it is, and the last epoch is always scored.
HOW_NOT_WHAT = ("precision", "eval_every")


def sweep_identity(data, space, seed: int) -> dict:
    """What must be equal for two sweeps' objective values to be comparable (JSON types: tuples become lists)."""
    searched_or_set = set(space.search) | set(SWEEP_SET) | set(HOW_NOT_WHAT)
    identity = {
        "format": FORMAT,
        "data": data.key,
        "labels": data.labels_key,
        "autoencoder": {k: v for k, v in dataclasses.asdict(space.ae).items() if k not in HOW_NOT_WHAT},
        "holdout": space.la.holdout,
        "holdout_seed": seed if space.la.holdout else None,  # without a holdout the seed splits nothing
        "la": {k: v for k, v in dataclasses.asdict(space.la).items() if k not in searched_or_set},
        "objective": space.objective,
        "mode": space.mode,
    }
    return json.loads(json.dumps(identity))  # as it reads back from sweep.json, so == compares like with like


def write_identity(experiment: Path, identity: dict) -> None:
    write_json(Path(experiment) / IDENTITY_FILE, identity)


@dataclass
class WarmStart:
    trials: list = field(default_factory=list)  # optuna.trial.FrozenTrial, in this sweep's distributions
    sources: list = field(default_factory=list)  # (folder, taken, outside)

    def describe(self) -> str:
        parts = []
        for i, (folder, taken, outside) in enumerate(self.sources):
            what = f"{taken} trial{'s' * (taken != 1)} taken over" if i == 0 else str(taken)
            parts.append(f"{what} from {folder}" + (f" ({outside} outside this space)" if outside else ""))
        return "warm start: " + ", ".join(parts)

    def record(self) -> dict:
        return {
            "trials": len(self.trials),
            "from": [{"dir": folder, "taken": taken, "outside": outside} for folder, taken, outside in self.sources],
        }


def _first_difference(theirs: dict, ours: dict) -> str | None:
    for key in [*ours, *(k for k in theirs if k not in ours)]:  # in sweep.json's order: the data first
        if key == "la":  # settings searched in one sweep are checked per trial (`_params`)
            mine, other = ours.get("la", {}), theirs.get("la", {})
            both = [k for k in mine if k in other]
            found = _first_difference({k: other[k] for k in both}, {k: mine[k] for k in both})
            if found:
                return f"la.{found}"
        elif isinstance(ours.get(key), dict) and isinstance(theirs.get(key), dict):
            found = _first_difference(theirs[key], ours[key])
            if found:
                return f"{key}.{found}"
        elif ours.get(key) != theirs.get(key):
            return f"{key} is {theirs.get(key)!r} there, {ours.get(key)!r} here"
    return None


def _params(trial, fixed_there: dict, distributions: dict, fixed_here: dict) -> dict | None:
    """The trial's LA settings as values of this sweep's distributions, or None when they lie outside them."""
    params = {}
    for name, value in {**fixed_there, **trial.params}.items():
        if name in distributions:
            try:  # the round trip gives the type this distribution stores (an int for an IntDistribution)
                params[name] = distributions[name].to_external_repr(distributions[name].to_internal_repr(value))
            except ValueError:  # not one of the choices, or not a number
                return None
        elif name not in fixed_here or fixed_here[name] != value:  # searched there, fixed (or constant) here
            return None
    return params if params.keys() == distributions.keys() else None  # TPE models only trials with every param


def _take_from(folder: Path, identity: dict, distributions: dict) -> tuple[list, int]:
    import optuna
    from sqlalchemy.exc import SQLAlchemyError

    if not folder.is_dir():
        raise WarmStartError(f"warm start from {folder}: no such folder")
    if not (folder / IDENTITY_FILE).exists():
        raise WarmStartError(
            f"warm start from {folder}: no {IDENTITY_FILE} (not a laray sweep folder, or one made by "
            "an older laray), so its objective values cannot be checked as comparable"
        )
    try:
        theirs = json.loads((folder / IDENTITY_FILE).read_text())
        if not isinstance(theirs, dict) or not isinstance(theirs.get("la"), dict):
            raise ValueError("not what laray writes")
    except (OSError, ValueError) as exc:
        raise WarmStartError(f"warm start from {folder}: cannot read {IDENTITY_FILE}: {exc}") from None
    difference = _first_difference(theirs, identity)
    if difference:
        raise WarmStartError(
            f"warm start from {folder}: {difference}; its objective values are not comparable with "
            "this sweep's (run it again with this sweep's settings to use it)"
        )
    if not (folder / OPTUNA_DB).exists():
        raise WarmStartError(f"warm start from {folder}: no {OPTUNA_DB}, so no trials to take over")
    try:  # read-only: never migrate, create tables in or lock the earlier sweep's study
        storage = optuna.storages.RDBStorage(
            f"sqlite:///file:{(folder / OPTUNA_DB).resolve()}?mode=ro&uri=true", skip_table_creation=True
        )
        names = optuna.get_all_study_names(storage)
        if len(names) != 1:
            raise WarmStartError(
                f"warm start from {folder}: {len(names)} studies in {OPTUNA_DB}, a laray sweep has one"
            )
        done = optuna.load_study(study_name=names[0], storage=storage).get_trials(
            deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)
        )
    except (RuntimeError, ValueError, optuna.exceptions.OptunaError, SQLAlchemyError) as exc:
        raise WarmStartError(f"warm start from {folder}: cannot read {OPTUNA_DB}: {str(exc).splitlines()[0]}") from None
    fixed_there = {k: v for k, v in theirs["la"].items() if k not in HOW_NOT_WHAT}  # as an older sweep.json has them
    taken = []
    for trial in done:
        params = _params(trial, fixed_there, distributions, identity["la"])
        if params is None:
            continue
        try:  # create_trial checks that each value lies in its distribution's range
            taken.append(
                optuna.trial.create_trial(
                    params=params,
                    distributions=distributions,
                    value=trial.value,
                    user_attrs={FROM: str(folder), NUMBER: trial.number},
                )
            )
        except ValueError:  # beyond a range of this sweep
            pass
    return taken, len(done) - len(taken)


def take_over(dirs, identity: dict, distributions: dict) -> WarmStart:
    """The finished trials of the earlier sweeps `dirs` that lie in `distributions` (name -> Optuna distribution).

    `distributions` must be the ones OptunaSearch samples this sweep from
    (`OptunaSearch.convert_search_space(param_space)`): Optuna refuses a parameter whose
    distribution kind changes between trials, and multivariate TPE models only the parameters
    whose distributions are the same in every trial. Raises WarmStartError for the first folder
    that is not comparable (`sweep_identity`) or cannot be read.
    """
    warm = WarmStart()
    for folder in dict.fromkeys(Path(d).expanduser().resolve() for d in dirs):  # a folder named twice counts once
        taken, outside = _take_from(folder, identity, distributions)
        warm.trials += taken
        warm.sources.append((str(folder), len(taken), outside))
    return warm


def seed_study(storage, study_name: str, mode: str, warm: WarmStart) -> None:
    """Add the taken-over trials to this sweep's study, creating it; call it before OptunaSearch is made.

    OptunaSearch creates its study with load_if_exists=True, so it samples from this one and
    TPE counts these trials (10 or more: no random start-up trials). Trials already taken over
    (same folder and number, say after a driver killed before Tune saved the sweep) are not
    added again. storage: a URL or an optuna storage; mode: "max" or "min".
    """
    import optuna

    study = optuna.create_study(
        storage=storage,
        study_name=study_name,
        load_if_exists=True,
        direction="maximize" if mode == "max" else "minimize",
    )
    there = {(t.user_attrs.get(FROM), t.user_attrs.get(NUMBER)) for t in study.get_trials(deepcopy=False)}
    study.add_trials([t for t in warm.trials if (t.user_attrs[FROM], t.user_attrs[NUMBER]) not in there])
    study.set_user_attr(RECORD, warm.record())


def recorded(storage, study_name: str) -> dict | None:
    """What seed_study took over into this study (WarmStart.record()), for a resumed sweep's best.json; or None."""
    import optuna

    try:
        return optuna.load_study(study_name=study_name, storage=storage).user_attrs.get(RECORD)
    except KeyError:  # no study yet
        return None
