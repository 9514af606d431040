"""laray: Local Aggregation clustering of species photos, tuned with Ray Tune and Optuna.

The public API: what users, benchmarks/ and analysis/ may import from `laray` itself. Each name
is loaded when first used (PEP 562), so that `import laray` (the CLI's first step) costs no torch
and no Ray. Everything else is internal and may change.
"""

__version__ = "0.1.0"

_PUBLIC = {
    # settings
    "AutoEncoderConfig": "laray.config",
    "LAConfig": "laray.config",
    "load_config": "laray.config",
    "replace": "laray.config",
    "SearchSpace": "laray.space",
    "load_space": "laray.space",
    "parse_space": "laray.space",
    "choose": "laray.defaults",
    "train_configs": "laray.defaults",
    # data
    "describe": "laray.data",
    "open_dataset": "laray.data",
    "load_dataset": "laray.data",
    "ImageDataset": "laray.data",
    # the method
    "AutoEncoderVGG": "laray.models",
    "EncoderVGGMerged": "laray.models",
    "MemoryBank": "laray.la",
    "LocalAggregationLoss": "laray.la",
    "kmeans": "laray.clustering",
    "score_codes": "laray.evaluate",
    "cluster_scores": "laray.metrics",
    # running it
    "train_run": "laray.run",
    "run_sweep": "laray.sweep",
    "ray_init": "laray.sweep",
    # reading the results
    "analyze": "laray.report",
    "score": "laray.report",
    "predict": "laray.predict",
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
