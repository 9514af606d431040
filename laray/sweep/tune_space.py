"""A search space as Ray Tune's distributions: kept here so that laray.settings never imports Ray."""

from __future__ import annotations

from ray import tune

from laray.settings.space import Distribution, SearchSpace


def to_tune(dist: Distribution):
    """One distribution as Tune's; an integer range clipped to one value is a constant."""
    if dist.kind == "uniform":
        return tune.uniform(*dist.args)
    if dist.kind == "loguniform":
        return tune.loguniform(*dist.args)
    if dist.kind == "categorical":
        return tune.choice(list(dist.args))
    low, high = dist.args
    if low == high:
        return low
    # Tune's integer ranges exclude their upper end; ours include it.
    return tune.lograndint(low, high + 1) if dist.log else tune.randint(low, high + 1)


def tune_space(space: SearchSpace, n_images: int) -> dict:
    """Ray Tune's param_space: size-dependent ranges resolved for n_images."""
    return {name: to_tune(dist.resolve(name, n_images)) for name, dist in space.search.items()}
