"""What one LA step costs in memory and time as N grows: laray's chunked step against plain autograd.

laray's loss (laray.method.la) scores the batch against the bank a few rows at a time and keeps only the
chosen (batch x (1+k)) scores, forward and backward. The plain way, written here as laray first
had it, runs autograd through `v @ M.T`: a (batch x N) product, a copy for the top-k, and a
(batch x N) gradient. Each (way, N) runs in its own process: the peak resident memory a step
adds above the bank (the kernel's peak, VmHWM, reset before the steps; Linux), and the median time
of a loss + backward, on the same batches.

    python benchmarks/step_memory.py            # N = 5,400, 50,000, 276,000 (about a minute on 2 cores)
    python benchmarks/step_memory.py --quick    # N = 2,000 and 8,000, seconds (what the tests run)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from laray.method.la import LocalAggregationLoss, MemoryBank

BATCH, DIM, K = 256, 128, 300


def plain_loss(loss_fn: LocalAggregationLoss, codes: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The same loss through autograd on the whole (batch x N) product."""
    M = loss_fn.bank.vectors
    v = F.normalize(codes, dim=1)
    sims = v @ M.T  # (b, N), kept alive by the graph until backward
    masked = sims.detach().clone()
    masked[torch.arange(len(v)), indices] = float("-inf")
    B = torch.cat([indices[:, None], masked.topk(loss_fn.k, dim=1, sorted=False).indices], dim=1)
    L = loss_fn.cluster_labels
    close = (L[:, B] == L[:, indices][:, :, None]).any(0)
    logits = sims.gather(1, B) / loss_fn.tau
    return (torch.logsumexp(logits, 1) - torch.logsumexp(logits.masked_fill(~close, float("-inf")), 1)).mean()


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def _reset_peak_rss() -> int:
    """Reset the kernel's peak resident memory of this process to its current value (Linux); KiB."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    return _status_kb("VmRSS")


def measure(way: str, n: int, steps: int) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    bank = MemoryBank(n, DIM, 0.5, seed=0)
    loss_fn = LocalAggregationLoss(bank, 0.07, min(K, n - 1), 1, max(2, n // 100), seed=0)
    loss_fn.recluster()
    step = loss_fn if way == "laray" else lambda c, i: plain_loss(loss_fn, c, i)
    gen = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(BATCH, DIM, generator=gen), torch.randperm(n, generator=gen)[:BATCH]) for _ in range(steps + 1)
    ]
    before = _reset_peak_rss()  # the bank's creation and k-means peaked higher than a step may: start afresh
    times, losses = [], []
    for codes, indices in batches:
        codes = codes.clone().requires_grad_()
        began = time.perf_counter()
        loss = step(codes, indices)
        loss.backward()
        times.append(time.perf_counter() - began)
        losses.append(loss.item())
    added = (_status_kb("VmHWM") - before) / 1024
    return {
        "way": way,
        "n": n,
        "step_ms": 1000 * float(np.median(times[1:])),
        "added_mb": added,
        "bank_mb": n * DIM * 4 / 2**20,
        "losses": losses,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="N = 2,000 and 8,000, 3 steps")
    parser.add_argument("--steps", type=int, default=7, help="timed steps per point (the first is a warm-up)")
    parser.add_argument("--point", help=argparse.SUPPRESS)  # internal: way:N, run in a child process
    args = parser.parse_args(argv)
    if args.point:
        way, n = args.point.split(":")
        print(json.dumps(measure(way, int(n), args.steps)))
        return 0
    sizes, steps = ((2_000, 8_000), 3) if args.quick else ((5_400, 50_000, 276_000), args.steps)
    print(f"batch {BATCH}, d {DIM}, k {K}, one LA step (loss + backward), {steps} steps per point, 2 threads")
    print(
        f"{'N':>8} {'bank MB':>8} {'plain MB':>9} {'laray MB':>9} {'plain ms':>9} {'laray ms':>9} {'max |dloss|':>12}"
    )
    for n in sizes:
        rows = {}
        for way in ("plain", "laray"):
            done = subprocess.run(
                [sys.executable, __file__, "--point", f"{way}:{n}", "--steps", str(steps)],
                capture_output=True,
                text=True,
                check=True,
            )
            rows[way] = json.loads(done.stdout.strip().splitlines()[-1])
        plain, ours = rows["plain"], rows["laray"]
        gap = max(abs(a - b) for a, b in zip(plain["losses"], ours["losses"]))
        print(
            f"{n:>8,} {ours['bank_mb']:>8.1f} {plain['added_mb']:>9.0f} {ours['added_mb']:>9.0f} "
            f"{plain['step_ms']:>9.1f} {ours['step_ms']:>9.1f} {gap:>12.2e}"
        )
    print("MB: peak resident memory the steps added above the bank; ms: median step time")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
