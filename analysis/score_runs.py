"""Score every trial of a sweep against the species labels: trials.csv, baselines.csv, per_species.csv.

python analysis/score_runs.py ~/laray_results/demo-20261123-0450 [--out DIR] [--label-column genus]
"""

import argparse
import sys

from laray.cli.options import add_experiment_options
from laray.results.report import score


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_experiment_options(parser)
    parser.add_argument("--label-column", metavar="COL", help="score against another CSV column, e.g. genus")
    args = parser.parse_args(argv)
    out = args.out or f"{args.experiment.rstrip('/')}/analysis"
    scored = score(
        args.experiment, out, label_column=args.label_column, objective=args.objective, cache_dir=args.cache_dir
    )
    shown = [c for c in scored.table.columns if c not in ("error",)]
    print(scored.table[shown].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    for name, base in scored.baselines.items():
        print(f"baseline {name}: " + " ".join(f"{k} {v:.3f}" for k, v in base.items()))
    print(f"wrote {out}/trials.csv, baselines.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
