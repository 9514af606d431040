"""The CUDA path, checked on the day a GPU is lent: does laray train and sweep on it, and how fast is each step?

1. `laray train` on the digits with small settings on cuda (bf16 autocast and channels_last, pinned memory,
   non-blocking copies: the path CUDA takes), then a 2-trial `laray sweep` with a GPU per trial, then, where
   the machine has 2 GPUs or more, the same sweep with stage 1 data-parallel on 2 workers
   (`--stage1-workers 2`: Ray Train, DDP over NCCL), which plan.json and the console must say;
2. each kind of step timed with vgg16_bn at 224 px (laray.training.plan.measure, as the plan times them),
   as images/s beside the paper model's projection at 40 % of the GPU's bf16 peak (benchmarks/paper_model.py);
3. the peak GPU memory of those steps.

Any failure exits non-zero; without CUDA it says so in one line and exits 2. Nothing here runs in CI
(no GPU there): on a machine with one,

    python benchmarks/gpu_check.py                  # everything, a few minutes
    python benchmarks/gpu_check.py --steps-only     # only the timed steps
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SMALL = ["--arch", "vgg11_bn", "--width", "0.25", "--image-size", "32", "--ae-epochs", "2", "--la-epochs", "2"]
SWEEP_SPACE = """\
num_samples: 2
max_concurrent: 2
grace_period: 1
confirm_top: 1
confirm_seeds: 1
data: digits
fixed:
  autoencoder: {arch: vgg11_bn, width: 0.25, image_size: 32, epochs: 2, batch_size: 64}
  la: {epochs: 2, batch_size: 64}
search:
  temperature: {loguniform: [0.03, 0.15]}
"""


def laray(*args: str, timeout: float) -> tuple[bool, str, str]:
    """Run the `laray` command in a fresh process; (succeeded, its last lines, its whole output)."""
    began = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "laray", *args], capture_output=True, text=True, timeout=timeout)
    output = done.stdout + done.stderr
    tail = "\n".join(output.strip().splitlines()[-6:])
    print(f"  laray {args[0]}: exit {done.returncode} after {time.perf_counter() - began:.0f} s")
    return done.returncode == 0, tail, output


def check_commands(work: Path) -> list[str]:
    failures = []
    ok, tail, _ = laray("train", "--device", "cuda", "--out", str(work / "train"), "--store", str(work / "store"),
                     *SMALL, timeout=900)  # fmt: skip
    metrics = work / "train" / "metrics.json"
    if not ok or not metrics.exists():
        failures.append(f"laray train on cuda failed:\n{tail}")
    else:
        print(f"  laray train: purity {json.loads(metrics.read_text())['purity']:.3f}")
    space = work / "space.yaml"
    space.write_text(SWEEP_SPACE)
    ok, tail, _ = laray("sweep", "--space", str(space), "--gpus-per-trial", "1", "--storage", str(work / "results"),
                        "--name", "gpu", timeout=1800)  # fmt: skip
    best = work / "results" / "gpu" / "best.json"
    if not ok or not best.exists():
        failures.append(f"laray sweep on cuda failed:\n{tail}")
    else:
        workers = [json.loads(p.read_text()) for p in (work / "results" / "gpu").glob("*/worker.json")]
        print(f"  laray sweep: best.json written; {len(workers)} trial workers")
    return failures


def check_stage1_ddp(work: Path) -> list[str]:
    """The small sweep with stage 1 data-parallel on 2 workers (one GPU each); skipped in one line with fewer."""
    gpus = torch.cuda.device_count()
    if gpus < 2:
        print(f"  2-worker stage 1: skipped, {gpus} GPU(s) here (it needs 2)")
        return []
    space = work / "space.yaml"
    space.write_text(SWEEP_SPACE)
    ok, tail, output = laray("sweep", "--space", str(space), "--gpus-per-trial", "1", "--stage1-workers", "2",
                             "--storage", str(work / "results"), "--name", "ddp", timeout=1800)  # fmt: skip
    best, plan = work / "results" / "ddp" / "best.json", work / "results" / "ddp" / "plan.json"
    if not ok or not best.exists():
        return [f"laray sweep --stage1-workers 2 failed:\n{tail}"]
    failures = []
    workers = json.loads(plan.read_text()).get("stage1_workers") if plan.exists() else None
    if workers != 2:
        failures.append(f"plan.json's stage1_workers is {workers!r}, not 2")
    said = [line for line in output.splitlines() if "stage 1 on 2 workers" in line]
    if not said:
        failures.append("the console never said 'stage 1 on 2 workers'")
    if not failures:
        print(f"  laray sweep --stage1-workers 2: best.json written, plan.json's stage1_workers 2, {said[0]!r}")
    return failures


def check_steps() -> list[str]:
    """Images/s of each step with vgg16_bn at 224 px on this GPU, beside the paper model's projection."""
    sys.path.insert(0, str(Path(__file__).parent))
    from paper_model import ENCODE, LA_STEP_BF16, PEAKS, STAGE1_STEP

    from laray.settings.config import AutoEncoderConfig, LAConfig
    from laray.training.plan import measure

    name = torch.cuda.get_device_name(0)
    ae = AutoEncoderConfig(arch="vgg16_bn", image_size=224, batch_size=64)
    la = LAConfig(batch_size=64, k_neighbours=4096, n_centroids=1000)
    torch.cuda.reset_peak_memory_stats()
    costs = measure(ae, la, 20_000, 100, torch.device("cuda"), worker_start=0.0)
    peak_gib = torch.cuda.max_memory_allocated() / 2**30
    same_peak = {"H200": "H100 SXM"}  # the same dense bf16 peak as the H100 SXM's
    known = next((gpu for gpu in PEAKS if gpu.split()[0] in name), None)
    known = known or next((model for alias, model in same_peak.items() if alias in name), None)
    print(f"  {name}: vgg16_bn at 224 px, batch 64, bf16; peak GPU memory {peak_gib:.1f} GiB")
    print(f"  {'step':<22}{'measured img/s':>16}{'paper model img/s':>20}")
    failures = []
    for label, seconds, flop in (
        ("stage 1 (train)", costs.ae_image, STAGE1_STEP),
        ("stage 2 (LA train)", costs.la_image, LA_STEP_BF16),
        ("encode", costs.encode_image, ENCODE),
    ):
        projected = f"{PEAKS[known][0] / flop:>20,.0f}" if known else f"{'(no model for it)':>20}"
        print(f"  {label:<22}{1 / seconds:>16,.0f}{projected}")
        if not seconds > 0:
            failures.append(f"{label}: no time measured")
    return failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps-only", action="store_true", help="only time the steps (no train, no sweep)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False); run it on a machine with a GPU")
        return 2
    failures = []
    with tempfile.TemporaryDirectory(prefix="laray-gpu-check-") as work:
        if not args.steps_only:
            print("the commands on cuda:")
            failures += check_commands(Path(work))
            failures += check_stage1_ddp(Path(work))
        print("each step's images/s (measured) beside the paper model (PROJECTION at 40 % of peak):")
        try:
            failures += check_steps()
        except Exception as exc:  # an OOM or a kernel the GPU lacks: a failure to report, not to hide
            failures.append(f"timing the steps failed: {type(exc).__name__}: {exc}")
    for failure in failures:
        print(f"FAILED: {failure}")
    print("gpu_check: " + ("all passed" if not failures else f"{len(failures)} failure(s)"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
