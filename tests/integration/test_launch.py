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
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SBATCH = ROOT / "slurm" / "laray.sbatch"


def cluster():
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def nodes(config):
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    return head, [n for k, n in types.items() if k != config["head_node_type"]]


def commands(config):
    keys = (
        "initialization_commands",
        "setup_commands",
        "head_setup_commands",
        "worker_setup_commands",
        "head_start_ray_commands",
        "worker_start_ray_commands",
    )
    return [c for k in keys for c in config.get(k) or []]


def sweep_options() -> set:
    from laray.cli.main import build_parser

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
    assert f'mount "$dev" {mount}' in setup and "Instance Storage" in setup  # the instance store, not EBS
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
        '#!/bin/bash\nwhile [[ $# -gt 0 && "$1" == -* ]]; do\n'
        '  case "$1" in -w|-N|-n|-c) shift 2;; *) shift;; esac\ndone\n'
        f'echo $$ >> {pids}\nexec "$@"\n'
    )
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    script = short / "cpu.sbatch"
    script.write_text(SBATCH.read_text().replace("--gpus-per-trial 1", "--gpus-per-trial 0"))
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
        "SLURM_JOB_NODELIST": "nodeA,nodeB",
        "SLURM_CPUS_PER_TASK": "1",
        "LARAY_DIR": str(ROOT),
        "DATA": "digits",
        "SPACE": "demo",
        "STORAGE": str(tmp_path / "results"),
        "NAME": "slurm",
        "TMPDIR": str(short),
        "RAY_PORT": "6479",
    }
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


# --- The job brings itself back: a rehearsal of slurm/laray.sbatch's stop, requeue and resume, with stand-ins
# for SLURM (srun, scontrol), Ray (ray, python) and laray itself. Fast: time in the script runs 100 times faster.

JOB_ID = "4242"
FAKE_LARAY = r"""#!/bin/bash
# laray's exit statuses: 0 finished (best.json), 1 an error, 143 stopped by SIGTERM after saving Tune's state.
log="$FAKE_LOG/calls"
echo "laray $*" >> "$log"
storage="" name=""
while [[ $# -gt 0 ]]; do
    case "$1" in --storage) storage="$2"; shift ;; --name) name="$2"; shift ;; esac
    shift
done
exp="$storage/$name"
mkdir -p "$exp"
case "$FAKE_LARAY" in
    finish) echo '{}' > "$exp/best.json"; echo "laray exit 0" >> "$log"; exit 0 ;;
    fail) echo "laray: error: the space is wrong" >&2; echo "laray exit 1" >> "$log"; exit 1 ;;
esac
stop() {
    echo "laray got TERM" >> "$log"
    [[ "$FAKE_LARAY" == hang || -n "${stopping:-}" ]] && return
    stopping=1
    REAL_SLEEP 0.3  # saving Tune's state takes a while
    echo '{}' > "$exp/experiment_state-x.json"
    touch "$exp/tuner.pkl"
    echo "laray exit 143" >> "$log"
    exit 143
}
trap stop TERM
touch "$FAKE_LOG/laray.running"
while :; do REAL_SLEEP 0.05; done
"""
FAKE_COMMANDS = {
    "srun": r"""#!/bin/bash
while [[ $# -gt 0 && "$1" == -* ]]; do case "$1" in -w|-N|-n|-c) shift 2 ;; *) shift ;; esac; done
echo "srun $*" >> "$FAKE_LOG/calls"
if [[ "$1" == hostname ]]; then echo 127.0.0.1; exit 0; fi
exec "$@"
""",
    "ray": '#!/bin/bash\necho "ray $*" >> "$FAKE_LOG/calls"\n',
    "scontrol": r"""#!/bin/bash
echo "scontrol $*" >> "$FAKE_LOG/calls"
case "$1 $2" in
    "show hostnames") tr ',' '\n' <<< "$3" ;;
    "show job") echo "JobId=$3 JobName=laray"; echo "   JobState=${FAKE_JOB_STATE:-RUNNING} Reason=None" ;;
    requeue*) exit "${FAKE_REQUEUE_STATUS:-0}" ;;
esac
""",
    # the job's token, and the number of GPUs that joined Ray
    "python": r"""#!/bin/bash
case "$*" in
    *secrets*) echo 0123456789abcdef ;;
    *cluster_resources*) touch "$FAKE_LOG/gpu.poll"; echo "${FAKE_GPUS:-4}" ;;
    *) echo "unexpected python $*" >&2; exit 2 ;;
esac
""",
    "sleep": '#!/bin/bash\nexec REAL_SLEEP "$(awk -v s="$1" \'BEGIN { print s / 100 }\')"\n',  # time 100 times faster
    "laray": FAKE_LARAY,
}


class FakeJob:
    """slurm/laray.sbatch run as SLURM would, batch shell first in its own process group, with stand-ins."""

    def __init__(self, tmp_path: Path):
        self.log_dir, self.bin_dir, project = tmp_path / "log", tmp_path / "bin", tmp_path / "laray"
        for d in (self.log_dir, self.bin_dir, project / ".venv" / "bin"):
            d.mkdir(parents=True)
        (project / ".venv" / "bin" / "activate").write_text("# the stand-ins stay first on PATH\n")
        real_sleep = shutil.which("sleep")
        for name, text in FAKE_COMMANDS.items():
            (self.bin_dir / name).write_text(text.replace("REAL_SLEEP", real_sleep))
            (self.bin_dir / name).chmod(0o755)
        self.experiment = tmp_path / "results" / "sweep"
        self.env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("SLURM_", "FAKE_"))
            and k not in ("MAX_REQUEUES", "STOP_TIMEOUT", "RESUME", "LARAY_CACHE_DIR", "RAY_ADDRESS")
        }
        self.env.update(
            PATH=f"{self.bin_dir}:{os.environ['PATH']}",
            FAKE_LOG=str(self.log_dir),
            LARAY_DIR=str(project),
            SLURM_JOB_ID=JOB_ID,
            SLURM_JOB_NODELIST="nodeA,nodeB,nodeC",
            SLURM_CPUS_PER_TASK="2",
            DATA="photos.csv",
            SPACE="demo",
            STORAGE=str(tmp_path / "results"),
            NAME="sweep",
            TMPDIR=str(tmp_path),
        )
        self.output = tmp_path / "job.log"

    def start(self, **env) -> subprocess.Popen:
        (self.log_dir / "laray.running").unlink(missing_ok=True)
        self.calls_before = len(self.calls())
        with open(self.output, "a") as out:
            return subprocess.Popen(
                ["bash", str(SBATCH)],
                env={**self.env, **env},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def run(self, **env) -> int:
        return self.start(**env).wait(timeout=30)

    def stop(self, job: subprocess.Popen, everyone: bool = False, when: str = "laray.running") -> int:
        """SIGTERM to the batch shell (--signal=B:TERM), or to every process of the job, once `when` exists."""
        for _ in range(300):
            if (self.log_dir / when).exists() or job.poll() is not None:
                break
            time.sleep(0.02)
        assert job.poll() is None, self.text()
        if everyone:
            os.killpg(job.pid, signal.SIGTERM)
        else:
            job.send_signal(signal.SIGTERM)
        return job.wait(timeout=30)

    def calls(self) -> list[str]:
        path = self.log_dir / "calls"
        return path.read_text().splitlines() if path.exists() else []

    def new_calls(self) -> list[str]:
        return self.calls()[self.calls_before :]

    def text(self) -> str:
        return self.output.read_text()


def test_slurm_script_asks_for_requeue_and_a_warning_signal_before_its_time_limit():
    text = SBATCH.read_text()
    assert re.search(r"^#SBATCH --requeue\b", text, flags=re.M)
    lead = re.search(r"^#SBATCH --signal=B:TERM@(\d+)\b", text, flags=re.M)
    assert lead, "the batch shell (B:) must get SIGTERM some time before the time limit"
    stop_timeout = re.search(r'^STOP_TIMEOUT="\$\{STOP_TIMEOUT:-(\d+)\}"', text, flags=re.M)
    assert stop_timeout and 60 < int(stop_timeout.group(1)) < int(lead.group(1))  # laray's 60 s fit; then requeue
    assert re.search(r"^#SBATCH --open-mode=append\b", text, flags=re.M)  # a requeued job's log goes on
    assert "RESUME=1" not in text


def test_slurm_job_requeues_itself_on_its_warning_signal_and_resumes_the_sweep(tmp_path):
    job = FakeJob(tmp_path)
    # (a) a new sweep: no --resume; (b) SIGTERM to the batch shell: laray stops, then the job is requeued.
    first = job.start()
    assert job.stop(first) == 143, job.text()
    calls = job.new_calls()
    laray = [c for c in calls if c.startswith("laray sweep")]
    assert len(laray) == 1 and "--resume" not in laray[0] and "--address 127.0.0.1:6379" in laray[0]
    assert calls.count("laray got TERM") == 1  # forwarded once
    requeues = [c for c in calls if c.startswith("scontrol requeue")]
    assert requeues == [f"scontrol requeue {JOB_ID}"], calls
    assert calls.index("laray exit 143") < calls.index(requeues[0])  # waited for laray to save its state
    assert (job.experiment / "experiment_state-x.json").exists()
    assert f"job {JOB_ID} requeued (restart 1 of at most 20)" in job.text()
    # (c) the requeued job: the unfinished sweep is resumed, and here it finishes.
    assert job.run(SLURM_RESTART_COUNT="1", FAKE_LARAY="finish") == 0, job.text()
    calls = job.new_calls()
    assert [c for c in calls if c.startswith("laray sweep")][0].count("--resume") == 1
    assert not any(c.startswith("scontrol requeue") for c in calls)
    assert (job.experiment / "best.json").exists()
    # (d) requeued once more after the end (a node failure, say): nothing is run again.
    assert job.run(SLURM_RESTART_COUNT="2") == 0, job.text()
    calls = job.new_calls()
    assert not any(c.startswith(("laray", "ray ", "srun", "scontrol requeue")) for c in calls), calls
    assert f"{job.experiment} is finished (best.json): nothing to do" in job.text()


def test_slurm_job_that_fails_ends_with_the_failure_and_is_not_requeued(tmp_path):
    job = FakeJob(tmp_path)
    assert job.run(FAKE_LARAY="fail") == 1
    calls = job.new_calls()
    assert "laray exit 1" in calls and not any(c.startswith("scontrol requeue") for c in calls)
    assert "laray sweep exited with status 1: not requeued" in job.text()


@pytest.mark.parametrize("restarts, requeued", [("2", True), ("3", False)])
def test_slurm_job_is_requeued_at_most_max_requeues_times(tmp_path, restarts, requeued):
    job = FakeJob(tmp_path)
    job.experiment.mkdir(parents=True)
    (job.experiment / "experiment_state-x.json").write_text("{}")  # an unfinished sweep
    assert job.stop(job.start(SLURM_RESTART_COUNT=restarts, MAX_REQUEUES="3")) == 143, job.text()
    calls = job.new_calls()
    assert "--resume" in next(c for c in calls if c.startswith("laray sweep"))
    assert "laray exit 143" in calls  # a clean stop either way
    assert any(c.startswith("scontrol requeue") for c in calls) == requeued
    assert ("MAX_REQUEUES=3): not requeued" in job.text()) != requeued


@pytest.mark.parametrize("state, requeued", [("RUNNING", True), ("CANCELLED", False)])
def test_slurm_job_sigterm_to_every_process_preemption_or_scancel(tmp_path, state, requeued):
    """SIGTERM to every process of the job: a preemption in its grace time (RUNNING), or scancel (CANCELLED)."""
    job = FakeJob(tmp_path)
    assert job.stop(job.start(FAKE_JOB_STATE=state), everyone=True) == 143, job.text()
    calls = job.new_calls()
    assert "laray exit 143" in calls and (job.experiment / "experiment_state-x.json").exists()  # a clean stop
    assert any(c.startswith("scontrol requeue") for c in calls) == requeued
    if not requeued:
        assert f"job {JOB_ID} is CANCELLED: not requeued" in job.text()


def test_slurm_job_kills_a_sweep_that_does_not_stop_in_time_and_still_requeues(tmp_path):
    job = FakeJob(tmp_path)
    assert job.stop(job.start(FAKE_LARAY="hang", STOP_TIMEOUT="100")) == 143, job.text()  # 100 s: 1 s here
    calls = job.new_calls()
    assert "laray got TERM" in calls and not any(c.startswith("laray exit") for c in calls)
    assert [c for c in calls if c.startswith("scontrol requeue")] == [f"scontrol requeue {JOB_ID}"]


def test_slurm_job_stopped_before_the_sweep_starts_is_requeued(tmp_path):
    job = FakeJob(tmp_path)
    # no GPU joins: the script waits for the Ray workers, and is stopped meanwhile
    assert job.stop(job.start(FAKE_GPUS="0"), when="gpu.poll") == 143, job.text()
    calls = job.new_calls()
    assert not any(c.startswith("laray") for c in calls)
    assert [c for c in calls if c.startswith("scontrol requeue")] == [f"scontrol requeue {JOB_ID}"]
    assert "SIGTERM before the sweep started" in job.text()


def test_slurm_job_says_how_to_continue_when_it_cannot_requeue(tmp_path):
    job = FakeJob(tmp_path)
    assert job.stop(job.start(FAKE_REQUEUE_STATUS="1")) == 143, job.text()
    assert "could not be requeued" in job.text() and "continues the sweep" in job.text()
