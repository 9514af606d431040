"""Typed, validated configs for the two training stages, loadable from YAML.

It imports no torch, so that the CLI checks settings before paying for that import.

Unknown keys and out-of-range values raise ConfigError naming the field, before
anything trains. A YAML file holds up to two sections, `autoencoder:` and `la:`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from laray.errors import ConfigError

ARCHS = ("vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn")  # torchvision's VGG with batch norm (laray.method.models)
SCHEDULES = ("cosine", "step", "constant")
# How a stage computes: "auto" is bf16 on CUDA and fp32 elsewhere; bf16 is bf16 autocast and channels_last on any
# device (on a CPU it runs the mixed-precision code path, e.g. in CI); fp32 is plain float32 everywhere.
PRECISIONS = ("auto", "bf16", "fp32")
STRING_FIELDS = ("arch", "pretrained", "schedule", "merger", "bank_init", "precision")
UNLABELLED_CLUSTERS = 10  # k-means clusters that score unlabelled data (by silhouette) in laray.scoring.evaluate


def check_enough_images(n_images: int, n_species: int) -> None:
    """Refuse, before anything trains, a data set with no more images than the clusters that score it."""
    clusters = n_species or UNLABELLED_CLUSTERS
    if n_images <= clusters:
        scored = (
            f" for {n_species} species: the clusters are scored with k-means at K = {clusters}"
            if n_species
            else f": unlabelled data are scored with k-means at K = {clusters}"
        )
        raise ConfigError(f"{n_images} images are too few{scored}, which needs at least {clusters + 1} images")


def _require(ok: bool, name: str, message: str, value) -> None:
    if not ok:
        raise ConfigError(f"{name} {message}, got {value!r}")


def _check_precision(precision) -> None:
    _require(precision in PRECISIONS, "precision", f"must be one of {PRECISIONS}", precision)


@dataclass(frozen=True)
class OptimConfig:
    """SGD with momentum; the learning-rate schedule is stepped once per epoch."""

    epochs: int
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"

    def _validate_optim(self) -> None:
        _require(isinstance(self.epochs, int) and self.epochs >= 0, "epochs", "must be an integer >= 0", self.epochs)
        _require(
            isinstance(self.batch_size, int) and self.batch_size >= 2,
            "batch_size",
            "must be an integer >= 2 (batch norm needs two samples)",
            self.batch_size,
        )
        _require(self.lr > 0, "lr", "must be > 0", self.lr)
        _require(0 <= self.momentum < 1, "momentum", "must be in [0, 1)", self.momentum)
        _require(self.weight_decay >= 0, "weight_decay", "must be >= 0", self.weight_decay)
        _require(self.schedule in SCHEDULES, "schedule", f"must be one of {SCHEDULES}", self.schedule)


@dataclass(frozen=True)
class AutoEncoderConfig(OptimConfig):
    """Stage 1: the auto-encoder and how it is pretrained (MSE)."""

    epochs: int = 10
    arch: str = "vgg16_bn"
    width: float = 1.0
    pretrained: str | None = None
    image_size: int = 224
    lr: float = 0.05
    precision: str = "auto"  # PRECISIONS

    def __post_init__(self):
        self._validate_optim()
        _check_precision(self.precision)
        _require(self.arch in ARCHS, "arch", f"must be one of {ARCHS}", self.arch)
        _require(self.width > 0, "width", "must be > 0", self.width)
        _require(
            self.pretrained is None or self.width == 1.0, "width", "must be 1.0 with pretrained weights", self.width
        )
        _require(
            self.pretrained in (None, "imagenet") or os.path.isfile(os.path.expanduser(self.pretrained)),
            "pretrained",
            "must be None, 'imagenet' or an existing state_dict file",
            self.pretrained,
        )
        _require(
            isinstance(self.image_size, int) and self.image_size >= 32,
            "image_size",
            "must be an integer >= 32 (five 2x2 pools)",
            self.image_size,
        )


@dataclass(frozen=True)
class LAConfig(OptimConfig):
    """Stage 2: Local Aggregation fine-tuning of the encoder."""

    epochs: int = 10
    temperature: float = 0.07
    mixing_rate: float = 0.5
    k_neighbours: int = 500
    clustering_repeats: int = 6
    n_centroids: int = 100
    recluster_every: int = 0  # steps between reclusterings; 0 = once per epoch, at its start
    merger: str = "mean"
    bank_init: str = "codes"
    augment: bool = True  # without it LA fell below k-means on raw pixels (docs/experiments.md)
    crop_min_area: float = 0.5  # augmentation's random crops keep at least this share of the image
    flip: bool = True  # augmentation mirrors half the images; off where mirroring changes the class (digits)
    jitter: float = 0.4  # brightness, contrast and saturation factors in [1 - jitter, 1 + jitter]
    grey: float = 0.0  # the share of augmented images turned grey
    blur: float = 0.0  # the share of augmented images blurred (Gaussian, laray.data.augment.BLUR_SIGMA)
    lr: float = 0.01
    eval_every: int = 1  # LA epochs between evaluations (and always the last): at N = 276,000 one costs an epoch
    # Held-out scoring (laray.scoring.holdout): this fraction of each species' images is scored apart
    # (heldout_purity...), drawn with holdout_seed, which a sweep keeps fixed across its trials.
    holdout: float = 0.0
    holdout_seed: int = 0
    precision: str = "auto"  # PRECISIONS

    def __post_init__(self):
        self._validate_optim()
        _check_precision(self.precision)
        _require(self.temperature > 0, "temperature", "must be > 0", self.temperature)
        _require(0 < self.mixing_rate <= 1, "mixing_rate", "must be in (0, 1]", self.mixing_rate)
        _require(
            isinstance(self.k_neighbours, int) and self.k_neighbours >= 1,
            "k_neighbours",
            "must be an integer >= 1",
            self.k_neighbours,
        )
        _require(
            isinstance(self.clustering_repeats, int) and self.clustering_repeats >= 1,
            "clustering_repeats",
            "must be an integer >= 1",
            self.clustering_repeats,
        )
        _require(
            isinstance(self.n_centroids, int) and self.n_centroids >= 1,
            "n_centroids",
            "must be an integer >= 1",
            self.n_centroids,
        )
        _require(
            isinstance(self.recluster_every, int) and self.recluster_every >= 0,
            "recluster_every",
            "must be an integer >= 0",
            self.recluster_every,
        )
        _require(
            isinstance(self.eval_every, int) and self.eval_every >= 1,
            "eval_every",
            "must be an integer >= 1",
            self.eval_every,
        )
        _require(0 < self.crop_min_area <= 1, "crop_min_area", "must be in (0, 1]", self.crop_min_area)
        _require(0 <= self.jitter < 1, "jitter", "must be in [0, 1)", self.jitter)
        _require(0 <= self.grey <= 1, "grey", "must be in [0, 1]", self.grey)
        _require(0 <= self.blur <= 1, "blur", "must be in [0, 1]", self.blur)
        _require(0 <= self.holdout < 1, "holdout", "must be in [0, 1)", self.holdout)
        _require(self.merger in ("mean", "flatten"), "merger", "must be 'mean' or 'flatten'", self.merger)
        _require(self.bank_init in ("codes", "random"), "bank_init", "must be 'codes' or 'random'", self.bank_init)

    def check_data_size(self, n_images: int) -> None:
        """The size-dependent limits: k <= N-1 and C <= N."""
        _require(
            self.k_neighbours <= n_images - 1, "k_neighbours", f"must be <= N-1 = {n_images - 1}", self.k_neighbours
        )
        _require(self.n_centroids <= n_images, "n_centroids", f"must be <= N = {n_images}", self.n_centroids)


def _coerce(name: str, default, value):
    """The value with the type its field's default implies, or ConfigError naming the field."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
        return value
    if isinstance(default, (int, float)):
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads 1e-3 as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{name} must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{name} must be a finite number, got {value!r}")
        if isinstance(default, int):
            if not float(value).is_integer():
                raise ConfigError(f"{name} must be an integer, got {value!r}")
            return int(value)
        return float(value)
    if name in STRING_FIELDS and value is not None and not isinstance(value, str):
        raise ConfigError(f"{name} must be a string, got {value!r}")
    return value


def from_dict(cls, values: dict | None):
    """Build a config dataclass from a dict, refusing unknown keys and mistyped values by name."""
    values = dict(values or {})
    known = {f.name: f.default for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} key(s) {unknown}; valid: {sorted(known)}")
    return cls(**{name: _coerce(name, known[name], value) for name, value in values.items()})


def replace(config, **changes):
    """A copy of `config` with `changes` (None values ignored), validated again."""
    return from_dict(
        type(config), {**dataclasses.asdict(config), **{k: v for k, v in changes.items() if v is not None}}
    )


def load_config(
    path: str | Path, base: tuple[AutoEncoderConfig, LAConfig] | None = None
) -> tuple[AutoEncoderConfig, LAConfig]:
    """Read a YAML file with optional `autoencoder:` and `la:` sections, on top of `base` (default: class defaults)."""
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read config {path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path} must be a mapping with 'autoencoder' and/or 'la' sections")
    unknown = sorted(set(raw) - {"autoencoder", "la"})
    if unknown:
        raise ConfigError(f"unknown config section(s) {unknown} in {path}; valid: ['autoencoder', 'la']")
    ae, la = base or (AutoEncoderConfig(), LAConfig())
    for name, section in (("autoencoder", raw.get("autoencoder")), ("la", raw.get("la"))):
        if section is not None and not isinstance(section, dict):
            raise ConfigError(f"section {name!r} of {path} must be a mapping of settings")
    return (
        from_dict(AutoEncoderConfig, {**dataclasses.asdict(ae), **(raw.get("autoencoder") or {})}),
        from_dict(LAConfig, {**dataclasses.asdict(la), **(raw.get("la") or {})}),
    )
