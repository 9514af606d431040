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
