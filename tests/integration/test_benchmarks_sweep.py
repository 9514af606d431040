"""benchmarks/sweep_scale.py --quick: one-trial sweeps at three small sizes print their rows and verdicts."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NUMBER = r"(\d+(?:\.\d+)?)"


@pytest.mark.slow  # about 2 minutes on 2 cores: the default suite must stay under 15
def test_sweep_scale_quick_prints_rows_and_verdicts():
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "sweep_scale.py"), "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for n, size in ((300, 32), (600, 32), (200, 64)):
        # N, px, species, then 12 numbers: decode s ... LA epoch s, point s
        row = re.search(rf"^\s*{n}\s+{size}\s+20" + rf"\s+{NUMBER}\*?" * 12 + r"\s*$", done.stdout, re.M)
        assert row, f"no complete row for N={n} at {size} px in:\n{done.stdout[-3000:]}"
        values = [float(v) for v in row.groups()]
        cache_mb, store_mb, rss_mb, bank_mb, epoch_s = values[1], values[2], values[4], values[5], values[10]
        assert cache_mb > 0 and store_mb > 0 and rss_mb > 0 and bank_mb > 0 and epoch_s > 0, row.group(0)
        assert abs(cache_mb - n * size * size * 3 / 1e6) < 0.05, row.group(0)  # the cache is the decoded set
    assert re.search(r"^object store: (flat in N|GROWS WITH N): peak [\d.]+ MB at N=600", done.stdout, re.M), (
        done.stdout
    )
    assert re.search(r"^worker memory: (within|ABOVE) the target: peak RSS grew", done.stdout, re.M), done.stdout
    assert re.search(r"^evaluation vs LA epoch at N=600: ", done.stdout, re.M), done.stdout


def test_sweep_overhead_quick_compares_laray_with_a_bare_tune_trainable():
    """benchmarks/sweep_overhead.py --quick --reuse on: 3 tiny trials each of a bare trainable and of laray's, reused
    workers (about a minute on 2 cores; --reuse both, the default, adds fresh workers)."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "sweep_overhead.py"), "--quick", "--reuse", "on"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    signed = r"(-?\d+(?:\.\d+)?)"
    load = rf"load average \(1, 5, 15 min\) at the (start|end): {NUMBER} {NUMBER} {NUMBER}"
    assert len(re.findall(load, done.stdout)) == 2, done.stdout
    assert re.search(rf"^direct run \(train_run, 1 LA epochs\): {NUMBER} s before", done.stdout, re.M), done.stdout
    assert re.search(rf"^stage 1's ray.get in a worker, as each trial pays it: {NUMBER} s$", done.stdout, re.M)
    # experiment, wall s, before the first trial s, fixed s per trial, the same after the first (, laray's parts)
    bare = re.search(rf"^bare Tune, reused workers\s+{NUMBER}\s+{NUMBER}\s+{signed}\s+{signed}\s*$", done.stdout, re.M)
    laray = re.search(
        rf"^laray, reused workers\s+{NUMBER}\s+{NUMBER}\s+{signed}\s+{signed}\s+{NUMBER}\s+{NUMBER}\s*$",
        done.stdout,
        re.M,
    )
    assert bare and laray, done.stdout
    assert "fresh workers" not in done.stdout
    wall, before_first, per_trial = (float(v) for v in laray.groups()[:3])
    assert wall > before_first > 0 and per_trial < wall / 3
