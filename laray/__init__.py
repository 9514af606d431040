"""laray: Local Aggregation clustering of species photos, tuned with Ray Tune and Optuna."""
__version__ = "0.1.0"
