"""`laray analyze` of one sweep, alone and on a busy machine, side by side in one run.

Three conditions, each timed as a fresh `laray analyze EXPERIMENT --out ...` process, in turn, `--repeats`
rounds: alone; beside two CPU-bound processes (busy loops, one per core of a 2-core machine); beside a running
`laray sweep` (the demo, started first and timed only once its trials run). The aim (issue 29): at most 10 s
alone on a 2-core machine, and at most twice that in either busy condition.

    python benchmarks/analyze_load.py ~/laray_results/demo-...       # a finished demo sweep's folder
    python benchmarks/analyze_load.py EXPERIMENT --conditions alone busy --repeats 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BUSY = "while True: pass"


def analyze_s(experiment: str, out: Path) -> float:
    began = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "laray", "analyze", experiment, "--out", str(out)], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"laray analyze failed:\n{done.stderr[-2000:]}")
    return time.perf_counter() - began


class Busy:
    """Two busy-loop processes for the time of a `with` block."""

    def __enter__(self):
        self.procs = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(2)]
        time.sleep(1.0)
        return self

    def __exit__(self, *exc):
        for proc in self.procs:
            proc.kill()
            proc.wait()


class Sweeping:
    """A demo `laray sweep` running in the background, from the moment its first trial reported."""

    def __init__(self, folder: Path):
        self.folder = folder

    def __enter__(self):
        self.log = open(self.folder / "sweep.log", "w")
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "laray", "sweep", "--storage", str(self.folder), "--name", "load"],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        deadline = time.monotonic() + 600
        while "[search" not in (self.folder / "sweep.log").read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the sweep did not start its trials:\n{(self.folder / 'sweep.log').read_text()}")
            time.sleep(1)
        return self

    def __exit__(self, *exc):
        self.proc.terminate()  # laray stops cleanly on SIGTERM
        try:
            self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", help="a sweep's folder, STORAGE/NAME")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of the conditions (default: %(default)s)")
    parser.add_argument(
        "--conditions", nargs="+", default=["alone", "busy", "sweep"], choices=["alone", "busy", "sweep"]
    )
    args = parser.parse_args(argv)
    times = {c: [] for c in args.conditions}
    loads = {c: [] for c in args.conditions}
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        for r in range(args.repeats):
            for condition in args.conditions:
                out = work / f"{condition}{r}"
                if condition == "alone":
                    times[condition].append(analyze_s(args.experiment, out))
                elif condition == "busy":
                    with Busy():
                        times[condition].append(analyze_s(args.experiment, out))
                else:
                    (work / f"sweep{r}").mkdir()
                    with Sweeping(work / f"sweep{r}"):
                        times[condition].append(analyze_s(args.experiment, out))
                loads[condition].append(os.getloadavg()[0])
    alone = statistics.median(times["alone"]) if times.get("alone") else None
    print(f"laray analyze {args.experiment}; {os.cpu_count()} cores; {args.repeats} round(s), conditions in turn")
    print(f"{'condition':<34} {'seconds (each round)':<24} {'median':>7} {'x alone':>8} {'load after':>10}")
    names = {"alone": "alone", "busy": "beside 2 busy loops", "sweep": "beside a running laray sweep"}
    for condition, values in times.items():
        median = statistics.median(values)
        ratio = f"{median / alone:.2f}" if alone else "-"
        each = " ".join(f"{v:.1f}" for v in values)
        loaded = " ".join(f"{v:.1f}" for v in loads[condition])
        print(f"{names[condition]:<34} {each:<24} {median:>7.1f} {ratio:>8} {loaded:>10}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
