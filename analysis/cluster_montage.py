"""Picture the best trial's clusters: a montage of sample images per cluster and the species x clusters heatmap.

python analysis/cluster_montage.py ~/laray_results/demo-20261123-0450 [--out DIR]
"""

import argparse
import sys

from laray.cli.options import add_experiment_options
from laray.results.report import best_trial_pictures, score


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_experiment_options(parser)
    parser.add_argument("--seed", type=int, default=0, help="which sample of each cluster is shown")
    args = parser.parse_args(argv)
    out = args.out or f"{args.experiment.rstrip('/')}/analysis"
    scored = score(args.experiment, out, objective=args.objective, cache_dir=args.cache_dir)
    for note in best_trial_pictures(scored, out, seed=args.seed):
        print(note)
    print(
        f"wrote {out}/montage.png, contingency.png, per_species.csv (best trial {scored.best.trial_id})"
        if scored.best
        else f"no best trial in {args.experiment}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
