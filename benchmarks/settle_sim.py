"""What adding the seeds a verdict names costs and buys: the confirmation's two looks, simulated.

A sweep's verdict calls the search's best better than the recipe when the 95 % paired interval over the
confirmation's S seeds lies above 0 (laray.scoring.confirm.verdict). When it is ahead in the mean but the
interval includes 0, the verdict names the seeds that would settle a margin that size
(laray.scoring.confirm.seeds_to_settle), and `--resume --confirm-seeds N` adds them: a second look at the same
question. This script draws paired differences (normal, a true margin and an sd), applies both looks with
laray's own functions, and prints how often each says "better":

    python benchmarks/settle_sim.py --sd 0.036 --margins 0 0.01 0.02 0.03 --repeats 20000

Under a true margin of 0 the sum of the two columns is the rate of a false "better"; above 0, the power.
Nothing trains; the held-out half is left out (it only makes "better" rarer).
"""

from __future__ import annotations

import argparse

import numpy as np

from laray.scoring.confirm import MOST_SEEDS_SUGGESTED, seeds_to_settle, summarize


def margin_of(diffs: np.ndarray) -> dict:
    """The paired margin as laray.scoring.confirm.margin_over summarises it (the selection half only)."""
    return {"seeds": list(range(len(diffs))), **summarize([{"purity": d} for d in diffs])}


def two_looks(margin: float, sd: float, first: int, repeats: int, seed: int) -> tuple[float, float, float]:
    """(share "better" at the first look, share "better" only after the added seeds, mean seeds run)."""
    rng = np.random.default_rng(seed)
    at_first = after = 0
    seeds_run = 0
    for _ in range(repeats):
        diffs = rng.normal(margin, sd, MOST_SEEDS_SUGGESTED)
        looked = margin_of(diffs[:first])
        seeds_run += first
        if looked["purity_ci95"][0] > 0:
            at_first += 1
            continue
        more = seeds_to_settle(looked, "purity")
        if more is None:
            continue
        seeds_run += more - first
        if margin_of(diffs[:more])["purity_ci95"][0] > 0:
            after += 1
    return at_first / repeats, after / repeats, seeds_run / repeats


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sd", type=float, default=0.036, help="sd of the paired differences (flowers12's: 0.036)")
    parser.add_argument("--margins", type=float, nargs="+", default=[0.0, 0.01, 0.02, 0.03])
    parser.add_argument("--first", type=int, default=5, help="seeds of the first look (the spaces' confirm_seeds)")
    parser.add_argument("--repeats", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(f"paired sd {args.sd}, first look {args.first} seeds, {args.repeats} simulated confirmations each")
    print("| true margin | better at the first look | better after the added seeds | either | seeds run (mean) |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for margin in args.margins:
        first, after, seeds = two_looks(margin, args.sd, args.first, args.repeats, args.seed)
        print(f"| {margin:+.3f} | {first:.3f} | {after:.3f} | {first + after:.3f} | {seeds:.1f} |")


if __name__ == "__main__":
    main()
