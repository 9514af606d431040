"""benchmarks/gpu_check.py on a machine without CUDA: one line that says so, and a non-zero exit; its 2-worker
stage 1 skipped in one line with fewer than 2 GPUs, and what it checks after the sweep."""

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_gpu_check_without_cuda_says_so_in_one_line():
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py")], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    assert done.stdout.strip().splitlines() == [
        "gpu_check: no CUDA device here (torch.cuda.is_available() is False); run it on a machine with a GPU"
    ]
    assert done.stderr == ""


def _gpu_check(monkeypatch, gpus: int):
    """benchmarks/gpu_check.py as a module, with `gpus` CUDA devices as far as it can tell."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    gpu_check = importlib.import_module("gpu_check")
    monkeypatch.setattr(gpu_check.torch.cuda, "device_count", lambda: gpus)
    return gpu_check


@pytest.mark.parametrize("gpus", [0, 1])
def test_two_worker_stage1_skips_in_one_line_with_fewer_than_two_gpus(monkeypatch, tmp_path, capsys, gpus):
    gpu_check = _gpu_check(monkeypatch, gpus)
    monkeypatch.setattr(gpu_check, "laray", lambda *a, **k: pytest.fail("ran laray with fewer than 2 GPUs"))
    assert gpu_check.check_stage1_ddp(tmp_path) == []
    assert capsys.readouterr().out.splitlines() == [f"  2-worker stage 1: skipped, {gpus} GPU(s) here (it needs 2)"]


@pytest.mark.parametrize(
    "workers, console, failures",
    [
        (2, "stage 1 on 2 workers (data-parallel, Ray Train), seed 0", []),
        (1, "stage 1 on 2 workers (data-parallel, Ray Train), seed 0", ["plan.json's stage1_workers is 1, not 2"]),
        (2, "stage 1: from the store", ["the console never said 'stage 1 on 2 workers'"]),
    ],
)
def test_two_worker_stage1_reads_plan_json_and_the_console(monkeypatch, tmp_path, workers, console, failures):
    """With 2 GPUs it runs `laray sweep --stage1-workers 2` (faked here) and checks what it left."""
    gpu_check = _gpu_check(monkeypatch, 2)
    ran = []

    def sweep(*args, timeout):
        ran.append(args)
        folder = Path(args[args.index("--storage") + 1]) / args[args.index("--name") + 1]
        folder.mkdir(parents=True)
        (folder / "plan.json").write_text(json.dumps({"stage1_workers": workers}))
        (folder / "best.json").write_text("{}")
        return True, console, f"plan: ...\n{console}\n2 trials (0 errored)"

    monkeypatch.setattr(gpu_check, "laray", sweep)
    assert gpu_check.check_stage1_ddp(tmp_path) == failures
    (args,) = ran
    assert args[0] == "sweep" and args[args.index("--stage1-workers") + 1] == "2"
