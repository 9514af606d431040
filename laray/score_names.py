"""The names of the cluster scores, in one place.

scoring.metrics computes them, a search space picks its objective among them, a trial reports them,
the console and the report print them. No imports, so that every layer may use it.
"""

LABEL_SCORES = ("purity", "nmi", "ari", "acc")  # against species labels
SCORE_NAMES = (*LABEL_SCORES, "silhouette")  # silhouette: without labels
HELDOUT_PREFIX = "heldout_"  # held-out scores carry it beside the selection scores: purity, heldout_purity
HELDOUT_SCORES = tuple(HELDOUT_PREFIX + name for name in LABEL_SCORES)
