"""Search spaces: a YAML file naming the objective, the distributions of the hyperparameters and fixed settings.

    objective: purity            # purity (default), nmi, ari or acc
    mode: max                    # max (default) or min
    num_samples: 8               # trials, unless --num-samples says otherwise
    max_concurrent: 2            # trials at once
    grace_period: 2              # ASHA: LA epochs a trial runs before it may be stopped
    holdout: 0.5                 # fraction of each species scored apart, never selected on (0: off)
    confirm_top: 3               # after the search, re-run the best 3 configurations...
    confirm_seeds: 5             # ...with 5 fresh seeds each (0 for either: no confirmation)
    time_budget: 6h              # optional: no new search trial after 6 h of search (laray.sweep.budget)
    stage1_workers: 4            # optional: stage 1 data-parallel on 4 workers (default: every GPU; 1 without)
    track: mlflow                # optional: each run in MLflow, STORAGE/NAME/mlflow.db or a tracking URI (--track)
    data: digits                 # data spec, unless --data says otherwise
    fixed:                       # settings every trial shares (AutoEncoderConfig / LAConfig fields)
      autoencoder: {arch: vgg16_bn, image_size: 224, epochs: 10}
      la: {epochs: 10, augment: true}
    search:                      # one distribution per LA hyperparameter (and stage1_* ones)
      temperature: {loguniform: [0.03, 0.3]}
      mixing_rate: {uniform: [0.2, 0.9]}
      k_neighbours: {int: [20, 500], log: true}     # clipped to N-1
      clustering_repeats: {int: [1, 8]}
      n_centroids: {fraction: [0.02, 0.2]}          # of the data set size N, so valid for any N
      merger: {categorical: [mean, flatten]}
      stage1_epochs: {categorical: [0, 10]}         # stage 1 too: stage1_epochs, stage1_lr, stage1_pretrained
    recipe:                      # optional: one value per searched setting, for `laray train` (laray.settings.defaults)
      temperature: 0.07

Stage-1 settings are searched under the names of laray.settings.stage1_search (`stage1_epochs`,
`stage1_lr`, `stage1_pretrained`, categorical only); each distinct stage-1 configuration is trained once.
A malformed file fails before Ray starts, with a SpaceError naming the key.
Size-dependent ranges are resolved against N when the sweep starts, so that no
trial is ever invalid: `k_neighbours` is clipped to [1, N-1], `n_centroids` to
[1, N], and `fraction` ranges become integer ranges.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import yaml

from laray.errors import SpaceError
from laray.score_names import LABEL_SCORES
from laray.settings.config import AutoEncoderConfig, ConfigError, LAConfig, from_dict
from laray.settings.duration import BudgetError, parse_duration
from laray.settings.stage1_search import STAGE1_CATEGORICAL_ONLY, STAGE1_INT, STAGE1_SEARCHABLE, ae_config_of, la_part

OBJECTIVES = LABEL_SCORES
KINDS = ("uniform", "loguniform", "int", "categorical", "fraction")
SIZE_LIMITS = {"k_neighbours": lambda n: (1, n - 1), "n_centroids": lambda n: (1, n)}
TOP_KEYS = (
    "objective",
    "mode",
    "num_samples",
    "max_concurrent",
    "grace_period",
    "holdout",
    "confirm_top",
    "confirm_seeds",
    "time_budget",
    "stage1_workers",
    "track",
    "data",
    "fixed",
    "search",
    "recipe",
)
DEFAULT_HOLDOUT, DEFAULT_CONFIRM_TOP, DEFAULT_CONFIRM_SEEDS = 0.5, 3, 5
SWEEP_SET = ("holdout", "holdout_seed")  # LAConfig fields the sweep sets for all trials alike
# LAConfig's fields under their own names, then stage 1's under stage1_* (laray.settings.stage1_search)
SEARCHABLE = (*(f.name for f in dataclasses.fields(LAConfig) if f.name not in SWEEP_SET), *STAGE1_SEARCHABLE)
# The method's symbols, so that a configuration fits on one line: `laray sweep`'s confirmed table and the
# confirmation runs' names in TensorBoard label a configuration alike (settings_label)
SYMBOLS = {"temperature": "tau", "mixing_rate": "m", "k_neighbours": "k", "clustering_repeats": "R", "n_centroids": "C"}


def settings_label(settings: dict) -> str:
    """`tau=0.0726 m=0.221 k=294`: each setting by its symbol (else its name), floats to 3 significant digits."""
    return " ".join(
        f"{SYMBOLS.get(name, name)}={value:.3g}" if isinstance(value, float) else f"{SYMBOLS.get(name, name)}={value}"
        for name, value in settings.items()
    )


SPACES_DIR = Path(__file__).resolve().parent.parent / "search_spaces"  # package data: there in every install


@dataclass(frozen=True)
class Distribution:
    kind: str
    args: tuple  # (low, high) or the categorical choices
    log: bool = False

    def resolve(self, name: str, n_images: int) -> "Distribution":
        """Integer ranges of size-dependent parameters made valid for a data set of n_images."""
        if name not in SIZE_LIMITS:
            return self
        low_limit, high_limit = SIZE_LIMITS[name](n_images)
        if self.kind == "fraction":
            low, high = (max(1, round(f * n_images)) for f in self.args)
            kind = "int"
        elif self.kind == "int":
            (low, high), kind = self.args, "int"
        elif self.kind == "categorical":
            kept = tuple(c for c in self.args if low_limit <= c <= high_limit) or (
                min(max(self.args[0], low_limit), high_limit),
            )
            return Distribution("categorical", kept)
        else:
            return self
        low, high = min(max(low, low_limit), high_limit), min(max(high, low_limit), high_limit)
        return Distribution(kind, (low, high), self.log)


@dataclass(frozen=True)
class SearchSpace:
    search: dict  # name -> Distribution
    ae: AutoEncoderConfig
    la: LAConfig
    objective: str = "purity"
    mode: str = "max"
    num_samples: int = 8
    max_concurrent: int = 2
    grace_period: int = 1
    data: str | None = "digits"  # None: the user names the data
    source: str = ""
    confirm_top: int = DEFAULT_CONFIRM_TOP  # configurations re-run after the search (laray.scoring.confirm); 0: none
    confirm_seeds: int = DEFAULT_CONFIRM_SEEDS  # fresh seeds each
    recipe: dict = dataclasses.field(default_factory=dict)  # searched setting -> the value `laray train` takes
    time_budget_s: float | None = None  # seconds of search before no new trial starts (laray.sweep.budget); None: none
    # workers that train stage 1 together (laray.sweep.stage1_ddp), unless --stage1-workers says otherwise;
    # None: every GPU the cluster offers when stage 1 starts, 1 without GPUs
    stage1_workers: int | None = None
    # MLflow tracking unless --track says otherwise (laray.sweep.tracking): "mlflow" (STORAGE/NAME/mlflow.db) or a
    # tracking URI; None: none
    track: str | None = None

    def overridden(
        self,
        holdout: float | None = None,
        confirm_top: int | None = None,
        confirm_seeds: int | None = None,
        time_budget_s: float | None = None,
        precision: str | None = None,
        stage1_workers: int | None = None,
        track: str | None = None,
    ) -> SearchSpace:
        """This space with the command line's values where given; precision is both stages' (and every trial's)."""
        la = self.la if holdout is None else dataclasses.replace(self.la, holdout=holdout)
        ae = self.ae
        if precision is not None:  # dataclasses.replace validates: a bad value is a ConfigError naming it
            ae, la = dataclasses.replace(ae, precision=precision), dataclasses.replace(la, precision=precision)
        return dataclasses.replace(
            self,
            ae=ae,
            la=la,
            confirm_top=self.confirm_top if confirm_top is None else confirm_top,
            confirm_seeds=self.confirm_seeds if confirm_seeds is None else confirm_seeds,
            time_budget_s=self.time_budget_s if time_budget_s is None else time_budget_s,
            stage1_workers=self.stage1_workers if stage1_workers is None else stage1_workers,
            track=self.track if track is None else track,
        )

    @property
    def confirms(self) -> bool:
        return self.confirm_top > 0 and self.confirm_seeds > 0

    def check_data_size(self, n_images: int) -> None:
        """Fixed (not searched) k_neighbours and n_centroids must fit the data set; searched ones are clipped."""
        searched = {name: 1 for name in SIZE_LIMITS if name in self.search}
        try:
            dataclasses.replace(self.la, **searched).check_data_size(n_images)
        except ConfigError as exc:
            raise SpaceError(f"fixed.la.{exc}") from None

    def mergers(self) -> list[str]:
        """The mergers trials may use (fixed, or searched): stage 1's baselines are scored for each."""
        merger = self.search.get("merger")
        return sorted(set(merger.args)) if merger is not None and merger.kind == "categorical" else [self.la.merger]


def _number(value):
    """YAML 1.1 reads 1e-3 as a string: numeric strings become numbers (ints when integral)."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return value
        return int(value) if value.is_integer() else value
    return value


INT_SETTINGS = (
    *(f.name for f in dataclasses.fields(LAConfig) if isinstance(f.default, int) and not isinstance(f.default, bool)),
    *STAGE1_INT,
)


def _distribution(name: str, spec) -> Distribution:
    where = f"search.{name}"
    if not isinstance(spec, dict) or not (set(spec) - {"log"}):
        raise SpaceError(f"{where} must be a mapping like {{uniform: [low, high]}}, got {spec!r}")
    kinds = [k for k in spec if k != "log"]
    if len(kinds) != 1 or kinds[0] not in KINDS:
        raise SpaceError(f"{where} needs exactly one of {KINDS}, got {sorted(spec)}")
    kind, args, log = kinds[0], spec[kinds[0]], spec.get("log", False)
    if isinstance(args, list):
        args = [_number(a) for a in args]
    if name in INT_SETTINGS and kind in ("uniform", "loguniform"):
        raise SpaceError(
            f"{where} is an integer setting: use int: [low, high] (with log: true for a log scale), not {kind}"
        )
    if not isinstance(log, bool):
        raise SpaceError(f"{where}.log must be true or false, got {log!r}")
    if name in STAGE1_CATEGORICAL_ONLY and kind != "categorical":
        raise SpaceError(f"{where} names weights: use categorical: [null, imagenet, or a file], not {kind}")
    if kind == "categorical":
        if not isinstance(args, list) or not args:
            raise SpaceError(f"{where}.categorical must be a non-empty list, got {args!r}")
        return Distribution(kind, tuple(args))
    if not (
        isinstance(args, list)
        and len(args) == 2
        and all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)
    ):
        raise SpaceError(f"{where}.{kind} must be [low, high] numbers, got {args!r}")
    low, high = args
    if low > high:
        raise SpaceError(f"{where}.{kind} has low {low} > high {high}")
    if kind == "loguniform" and low <= 0:
        raise SpaceError(f"{where}.loguniform needs low > 0, got {low}")
    if kind == "int" and not all(float(a).is_integer() for a in args):
        raise SpaceError(f"{where}.int must be [low, high] integers, got {args!r}")
    if kind == "int" and log and low < 1:
        raise SpaceError(f"{where}.int with log needs low >= 1, got {low}")
    if kind == "fraction":
        if name not in SIZE_LIMITS:
            raise SpaceError(f"{where}.fraction is only for {sorted(SIZE_LIMITS)}")
        if not 0 < low <= high <= 1:
            raise SpaceError(f"{where}.fraction needs 0 < low <= high <= 1, got {args!r}")
    return Distribution(kind, (int(low), int(high)) if kind == "int" else (low, high), log)


def _check_values(search: dict, ae: AutoEncoderConfig, la: LAConfig) -> None:
    """Every value a distribution can produce must make a valid LAConfig (size limits aside), or a valid
    AutoEncoderConfig for a stage1_* setting."""
    for name, dist in search.items():
        values = dist.args if dist.kind == "categorical" else () if dist.kind == "fraction" else dist.args
        for value in values:
            try:
                if name in STAGE1_SEARCHABLE:
                    ae_config_of(ae, {name: value})  # its message begins with the name
                else:
                    from_dict(LAConfig, {**dataclasses.asdict(la), name: value})
            except ConfigError as exc:
                raise SpaceError(f"search.{exc}" if name in STAGE1_SEARCHABLE else f"search.{name}: {exc}") from None


def parse_space(raw, source: str = "") -> SearchSpace:
    if not isinstance(raw, dict):
        raise SpaceError(f"search space {source} must be a mapping of {TOP_KEYS}")
    unknown = sorted(set(raw) - set(TOP_KEYS))
    if unknown:
        raise SpaceError(f"unknown key(s) {unknown} in search space {source}; valid: {list(TOP_KEYS)}")
    objective, mode = raw.get("objective", "purity"), raw.get("mode", "max")
    if objective not in OBJECTIVES:
        raise SpaceError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if mode not in ("max", "min"):
        raise SpaceError(f"mode must be 'max' or 'min', got {mode!r}")
    counts = {}
    for key, default in (("num_samples", 8), ("max_concurrent", 2), ("grace_period", 1)):
        value = raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SpaceError(f"{key} must be an integer >= 1, got {value!r}")
        counts[key] = value
    for key, default in (("confirm_top", DEFAULT_CONFIRM_TOP), ("confirm_seeds", DEFAULT_CONFIRM_SEEDS)):
        value = raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise SpaceError(f"{key} must be an integer >= 0 (0: no confirmation), got {value!r}")
        counts[key] = value
    holdout = _number(raw.get("holdout", DEFAULT_HOLDOUT))  # fixed.la.holdout is refused below: one place
    if isinstance(holdout, bool) or not isinstance(holdout, (int, float)) or not 0 <= holdout < 1:
        raise SpaceError(f"holdout must be a fraction in [0, 1) (0: no held-out part), got {holdout!r}")
    data = raw.get("data", "digits")  # null: the space fits any photos, named with --data
    if data is not None and not isinstance(data, str):
        raise SpaceError(f"data must be a data spec string, got {data!r}")
    fixed = raw.get("fixed") or {}
    if not isinstance(fixed, dict) or set(fixed) - {"autoencoder", "la"}:
        raise SpaceError(f"fixed must be a mapping with 'autoencoder' and/or 'la', got {fixed!r}")
    if isinstance(fixed.get("la"), dict) and set(fixed["la"]) & set(SWEEP_SET):
        raise SpaceError(
            f"fixed.la: {sorted(set(fixed['la']) & set(SWEEP_SET))} are set by the sweep: use the "
            f"top-level key holdout (the split's seed is the sweep's --seed)"
        )
    try:
        ae = from_dict(AutoEncoderConfig, fixed.get("autoencoder"))
        la = from_dict(LAConfig, {**(fixed.get("la") or {}), "holdout": float(holdout)})
    except (ConfigError, TypeError) as exc:
        raise SpaceError(f"fixed: {exc}") from None
    search = raw.get("search") or {}
    if not isinstance(search, dict) or not search:
        raise SpaceError("search must be a non-empty mapping of LA hyperparameters to distributions")
    bad = sorted(set(search) - set(SEARCHABLE))
    if bad:
        raise SpaceError(f"search key(s) {bad} are not LA settings nor stage1_* ones; valid: {list(SEARCHABLE)}")
    distributions = {name: _distribution(name, spec) for name, spec in search.items()}
    _check_values(distributions, ae, la)
    recipe = raw.get("recipe") or {}
    if not isinstance(recipe, dict):
        raise SpaceError(f"recipe must be a mapping of searched settings to values, got {recipe!r}")
    if set(recipe) - set(search):
        raise SpaceError(
            f"recipe key(s) {sorted(set(recipe) - set(search))} are not searched; the recipe gives "
            f"one value for each of {sorted(search)}"
        )
    recipe = {k: _number(v) for k, v in recipe.items()}
    try:
        with_recipe = from_dict(LAConfig, {**dataclasses.asdict(la), **la_part(recipe)})
        ae_recipe = ae_config_of(ae, recipe)
    except ConfigError as exc:
        raise SpaceError(f"recipe: {exc}") from None
    recipe = {
        name: getattr(ae_recipe, STAGE1_SEARCHABLE[name]) if name in STAGE1_SEARCHABLE else getattr(with_recipe, name)
        for name in recipe
    }
    workers = raw.get("stage1_workers")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise SpaceError(f"stage1_workers must be an integer >= 1 (null: every GPU), got {workers!r}")
    track = raw.get("track")
    if track is not None and tracking_target(track) is None:
        raise SpaceError(f"track must be 'mlflow' or an MLflow tracking URI such as http://HOST:5000, got {track!r}")
    budget = raw.get("time_budget")
    try:
        time_budget_s = None if budget is None else parse_duration(budget)
    except BudgetError as exc:
        raise SpaceError(f"time_budget: {exc}") from None
    return SearchSpace(
        distributions,
        ae,
        la,
        objective,
        mode,
        data=data,
        source=source,
        recipe=recipe,
        time_budget_s=time_budget_s,
        stage1_workers=workers,
        track=track,
        **counts,
    )


def tracking_target(value) -> str | None:
    """`track` (--track): "mlflow", the sweep folder's own store, or an MLflow tracking URI (scheme://..., or
    databricks); None when it is neither."""
    import re

    if not isinstance(value, str):
        return None
    if value == "mlflow" or value == "databricks" or re.match(r"[A-Za-z][A-Za-z0-9+.-]*://\S+$", value):
        return value
    return None


def bundled_spaces() -> list[str]:
    """The names of the search spaces that come with laray (`--space demo`, `--space default`)."""
    return sorted(p.stem for p in SPACES_DIR.glob("*.yaml"))


def load_space(path: str | Path) -> SearchSpace:
    """A YAML search space; a bare name like 'demo' means the bundled laray/search_spaces/demo.yaml.

    A file of that name in the working folder wins; a folder of that name does not (a `demo` folder
    beside the user once broke every command, whose --help reads the bundled spaces).
    """
    path = Path(path)
    if not path.is_file() and not path.suffix:
        if str(path) not in bundled_spaces():
            raise SpaceError(
                f"no search space {str(path)!r}: not a file, nor one of the bundled spaces "
                f"({', '.join(bundled_spaces())})"
            )
        path = SPACES_DIR / f"{path}.yaml"
    if not path.exists():  # a typo, or a bundled name with its .yaml: say what there is
        raise SpaceError(
            f"no search space file {str(path)!r}; the bundled spaces are {', '.join(bundled_spaces())} "
            f"(--space NAME), or give the path of a YAML file"
        )
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise SpaceError(f"cannot read search space {path}: {str(exc).splitlines()[0]}") from None
    return parse_space(raw, str(path))
