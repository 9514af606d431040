"""The sweep: Ray Tune, Optuna and ASHA around the training run. The only layer that imports Ray.

driver (`run_sweep`), stage1 (stage 1 once per sweep, as a Ray task), lock (one driver per sweep),
console (what the user sees), asha, budget (a time budget), warm_start (earlier sweeps' trials).
"""
