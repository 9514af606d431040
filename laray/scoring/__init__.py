"""Scores: cluster purity and its kin (metrics), the held-out split (holdout), scoring a model's codes
(evaluate) and the confirmation's arithmetic over seeds (confirm). metrics, holdout and confirm are pure
functions on arrays."""
