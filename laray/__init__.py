"""laray: Local Aggregation clustering of species photos, tuned with Ray Tune and Optuna.

The public API: what users, benchmarks/ and analysis/ may import from `laray` itself. Each name
is loaded when first used (PEP 562), so that `import laray` (the CLI's first step) costs no torch
and no Ray. Everything else is internal and may change.
"""

__version__ = "0.1.0"

_PUBLIC = {
    # settings
    "AutoEncoderConfig": "laray.settings.config",
    "LAConfig": "laray.settings.config",
    "load_config": "laray.settings.config",
    "replace": "laray.settings.config",
    "SearchSpace": "laray.settings.space",
    "load_space": "laray.settings.space",
    "parse_space": "laray.settings.space",
    "choose": "laray.settings.defaults",
    "train_configs": "laray.settings.defaults",
    # data
    "describe": "laray.data.dataset",
    "open_dataset": "laray.data.dataset",
    "load_dataset": "laray.data.dataset",
    "ImageDataset": "laray.data.dataset",
    # the method
    "AutoEncoderVGG": "laray.method.models",
    "EncoderVGGMerged": "laray.method.models",
    "MemoryBank": "laray.method.la",
    "LocalAggregationLoss": "laray.method.la",
    "kmeans": "laray.method.clustering",
    "score_codes": "laray.scoring.evaluate",
    "cluster_scores": "laray.scoring.metrics",
    # running it
    "train_run": "laray.training.run",
    "run_sweep": "laray.sweep.driver",
    "SweepRun": "laray.sweep.driver",
    "TrialResources": "laray.sweep.driver",
    "ray_init": "laray.sweep.ray_setup",
    # reading the results
    "analyze": "laray.results.report",
    "score": "laray.results.report",
    "predict": "laray.results.predict",
    # what goes wrong
    "LarayError": "laray.errors",
}
__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'laray' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value  # once loaded, a plain attribute
    return value


def __dir__():
    return sorted(__all__)
