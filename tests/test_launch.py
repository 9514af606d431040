"""The cluster launchers: cluster.yaml (Ray on AWS) and slurm/laray.sbatch (Ray on SLURM)."""
import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "slurm" / "laray.sbatch"


def cluster():
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def nodes(config):
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    return head, [n for k, n in types.items() if k != config["head_node_type"]]


def commands(config):
    keys = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands")
    return [c for k in keys for c in config.get(k) or []]


def sweep_options() -> set:
    from laray.cli import build_parser

    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return set(subparsers.choices["sweep"]._option_string_actions)


def sbatch_commands() -> list[str]:
    """The script's logical lines: continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", SBATCH.read_text())
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_cluster_yaml_launches_a_cpu_head_and_autoscaling_gpu_workers():
    config = cluster()
    head, workers = nodes(config)
    assert config["provider"]["type"] == "aws"
    assert "GPU" not in head.get("resources", {}) and head["resources"].get("CPU") == 0  # no trials on the head
    assert workers and all(isinstance(w["resources"]["GPU"], int) and w["resources"]["GPU"] >= 1 for w in workers)
    assert all(w["node_config"]["InstanceType"] == "g5.2xlarge" and w["resources"]["GPU"] == 1 for w in workers)
    assert all(w["min_workers"] < w["max_workers"] for w in workers)  # autoscaling
    assert any("pip install -e" in c for c in config["setup_commands"])  # installs this project
    assert "." in config["file_mounts"].values()  # ... copied from this checkout
    assert "--dashboard-host=127.0.0.1" in " ".join(config["head_start_ray_commands"])  # not opened to the internet


def test_cluster_yaml_is_a_valid_ray_cluster_config_with_valid_shell_commands():
    jsonschema = pytest.importorskip("jsonschema")
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cluster(), schema)
    for command in commands(cluster()):
        check = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
        assert check.returncode == 0, f"{command}\n{check.stderr}"


def test_workers_decode_into_their_local_nvme_disk():
    config = cluster()
    start = " ".join(config["worker_start_ray_commands"])
    match = re.search(r"LARAY_CACHE_DIR=(\S+)\s+ray start --address=\$RAY_HEAD_IP:6379", start)
    assert match, start
    mount = "/mnt/local"
    assert match.group(1).startswith(mount + "/")
    setup = " ".join(config["worker_setup_commands"])
    assert f"mount \"$dev\" {mount}" in setup and "Instance Storage" in setup  # the instance store, not EBS
    assert "mountpoint -q " + mount in setup and "blkid" in setup  # formats only a disk without a file system
    assert "LARAY_CACHE_DIR" not in " ".join(config["head_start_ray_commands"])  # the head decodes nothing


def test_slurm_script_is_valid_bash_and_starts_ray_the_documented_way():
    check = subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    lines = sbatch_commands()
    head = [c for c in lines if c.startswith("srun ") and "ray start --head" in c]
    workers = [c for c in lines if c.startswith("srun ") and re.search(r"ray start --address[= ]", c)]
    assert len(head) == 1 and "--num-gpus=0" in head[0] and head[0].endswith("&")  # no trials on the head
    assert len(workers) == 1 and "--block" in workers[0] and workers[0].endswith("&")
    assert any(re.match(r"laray sweep --address \"?\$ip_head", c) for c in lines)
    assert any(re.match(r"export LARAY_CACHE_DIR=", c) for c in lines)
    sbatch = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", SBATCH.read_text(), flags=re.M))
    assert int(sbatch["nodes"]) >= 2


def test_slurm_script_uses_only_options_that_laray_sweep_has():
    sweep = next(c for c in sbatch_commands() if c.startswith("laray sweep "))
    used = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", sweep))
    assert {"--address", "--storage", "--name", "--resume", "--gpus-per-trial", "--data", "--space"} <= used
    assert used <= sweep_options(), sorted(used - sweep_options())


@pytest.mark.slow
def test_slurm_script_runs_a_sweep_with_fake_slurm_commands(tmp_path):
    """The whole script on this machine: srun and scontrol faked, two Ray nodes, the demo on CPU."""
    if shutil.which("ray") is None:
        pytest.skip("ray's command line is not installed")
    short = Path(tempfile.mkdtemp(prefix="lr"))  # Ray's socket paths must stay short
    bin_dir, pids = short / "bin", short / "pids"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/bash\ntr ',' '\\n' <<< \"$3\"\n")
    (bin_dir / "srun").write_text(
        "#!/bin/bash\nwhile [[ $# -gt 0 && \"$1\" == -* ]]; do case \"$1\" in -w|-N|-n|-c) shift 2;; *) shift;; esac; done\n"
        f"echo $$ >> {pids}\nexec \"$@\"\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    script = short / "cpu.sbatch"
    script.write_text(SBATCH.read_text().replace("--gpus-per-trial 1", "--gpus-per-trial 0"))
    env = {**os.environ, "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
           "SLURM_JOB_NODELIST": "nodeA,nodeB", "SLURM_CPUS_PER_TASK": "1", "LARAY_DIR": str(ROOT), "DATA": "digits",
           "SPACE": "demo", "STORAGE": str(tmp_path / "results"), "NAME": "slurm", "TMPDIR": str(short),
           "RAY_PORT": "6479"}
    env.pop("LARAY_CACHE_DIR", None)
    log = short / "job.log"
    try:
        with open(log, "w") as out:  # a file, not a pipe: the Ray nodes left in the background keep a pipe open
            run = subprocess.run(["bash", str(script)], env=env, stdout=out, stderr=subprocess.STDOUT, timeout=900)
    finally:
        for pid in pids.read_text().split() if pids.exists() else []:  # what SLURM does at the job's end
            try:
                os.kill(int(pid), signal.SIGTERM)
            except ProcessLookupError:
                pass
    output = log.read_text()
    shutil.rmtree(short, ignore_errors=True)
    assert run.returncode == 0, output[-5000:]
    assert re.search(r"\d+ trials \(0 errored\)", output)
    records = [json.loads(p.read_text()) for p in (tmp_path / "results" / "slurm").glob("*/worker.json")]
    assert records and all(r["cache_dir"].startswith(str(short)) for r in records)  # LARAY_CACHE_DIR reached the trials
