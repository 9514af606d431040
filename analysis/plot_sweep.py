"""Plot a sweep: objective against each hyperparameter, Optuna's optimisation history and parameter importances.

python analysis/plot_sweep.py ~/laray_results/demo-20261123-0450 [--out DIR]
"""

import argparse
import sys

from laray.cli.options import add_experiment_options
from laray.results.report import plot_sweep, score


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_experiment_options(parser)
    args = parser.parse_args(argv)
    out = args.out or f"{args.experiment.rstrip('/')}/analysis"
    importances = plot_sweep(score(args.experiment, out, objective=args.objective, cache_dir=args.cache_dir), out)
    print(f"wrote {out}/objective_vs_params.png, history.png, importances.png")
    for name, value in importances.items():
        print(f"  importance {name:<20} {value:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
