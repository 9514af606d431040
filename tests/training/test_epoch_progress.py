"""Progress inside a long epoch (laray.training.epoch_progress): the reporter's throttling and text with a fake
clock, the lines a real stage-1 and LA run hands its sink, and what `laray train` prints.

The sweep's forwarding of these lines to the driver's console is checked with the bf16 sweep in
tests/training/test_precision.py (one sweep for both).
"""

import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import tiny_train_argv, write_digit_folder

from laray.cli.main import main
from laray.data.dataset import ImageDataset, load_dataset
from laray.errors import ConfigError
from laray.settings.config import AutoEncoderConfig, LAConfig, replace
from laray.training.epoch_progress import (
    DEFAULT_INTERVAL_S,
    INTERVAL_ENV,
    EpochProgress,
    EpochReporter,
    progress_interval_s,
)
from laray.training.stages import RunOptions, finetune_la, pretrain_autoencoder

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N = 40  # batches of 16, 16 and 8
AE = AutoEncoderConfig(arch="vgg11_bn", width=0.125, image_size=32, epochs=2, batch_size=16)
LA = LAConfig(epochs=1, batch_size=16, k_neighbours=10, n_centroids=5, clustering_repeats=2)
EVERY_BATCH = 1e-9  # an interval every batch outlasts: one line per batch, the first after the first batch


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_no_line_before_the_interval_then_one_per_interval_with_the_numbers():
    clock, lines = FakeClock(), []
    report = EpochReporter("autoencoder", 3, 48_000, lines.append, interval_s=30, clock=clock)
    for _ in range(9):  # 120 images every 3 s: 40 img/s, 27 s in, nothing yet
        clock.now += 3
        report(120)
    assert lines == []
    clock.now += 3  # 30 s: the first line
    report(120)
    assert lines == [EpochProgress("autoencoder", 3, 1_200, 48_000, 40.0, 1_170.0)]
    assert str(lines[0]) == "autoencoder epoch 3: 1,200/48,000 images, 40 img/s, 19 min 30 s left in the epoch"
    for _ in range(20):  # to 90 s: one more line at 60 s and one at 90 s, none between
        clock.now += 3
        report(120)
    assert [(p.done, p.images_per_s, p.left_s) for p in lines] == [
        (1_200, 40.0, 1_170.0),
        (2_400, 40.0, 1_140.0),
        (3_600, 40.0, 1_110.0),
    ]
    assert str(lines[-1]).endswith("3,600/48,000 images, 40 img/s, 18 min 30 s left in the epoch")


def test_a_batch_longer_than_the_interval_gives_one_line_and_the_next_interval_starts_from_it():
    clock, lines = FakeClock(), []
    report = EpochReporter("local aggregation", 1, 1_000, lines.append, interval_s=30, clock=clock)
    clock.now = 100  # one slow batch (the first reclustering, say): one line, not three
    report(100)
    clock.now = 129
    report(100)
    assert [p.done for p in lines] == [100]
    clock.now = 130
    report(100)
    assert [p.done for p in lines] == [100, 300]
    assert str(lines[-1]) == "local aggregation epoch 1: 300/1,000 images, 2 img/s, 5 min 03 s left in the epoch"


def test_a_short_epoch_says_nothing_and_without_a_sink_the_reporter_reads_no_clock():
    clock, lines = FakeClock(), []
    report = EpochReporter("autoencoder", 1, 64, lines.append, interval_s=30, clock=clock)
    for _ in range(4):
        clock.now += 1
        report(16)
    assert lines == [] and report.done == 64

    reads = []
    silent = EpochReporter("autoencoder", 1, 64, None, clock=lambda: reads.append(1) or 0.0)
    for _ in range(4):
        silent(16)
    assert silent.done == 64 and len(reads) == 1  # the epoch's start only: nothing per batch


def test_interval_from_the_argument_then_the_environment_then_30_s(monkeypatch):
    monkeypatch.delenv(INTERVAL_ENV, raising=False)
    assert progress_interval_s() == DEFAULT_INTERVAL_S == 30
    monkeypatch.setenv(INTERVAL_ENV, "0.05")
    assert progress_interval_s() == 0.05
    assert progress_interval_s(2.5) == 2.5
    for bad in ("soon", "0", "-1", "nan"):
        monkeypatch.setenv(INTERVAL_ENV, bad)
        with pytest.raises(ConfigError, match=rf"^{INTERVAL_ENV} must be a number of seconds > 0, got '{bad}'$"):
            progress_interval_s()
    with pytest.raises(ConfigError, match=r"^progress interval must be a number of seconds > 0, got 0$"):
        progress_interval_s(0)


@pytest.fixture(scope="module")
def digits40():
    d = load_dataset("digits", 32)
    return ImageDataset(
        np.ascontiguousarray(d.images[:N]), d.labels[:N], d.class_names, d.paths[:N], "digits-40", "digits-40"
    )


def test_both_stages_hand_the_sink_a_line_per_interval_and_the_callback_only_epochs(digits40):
    lines, records = [], []
    run = RunOptions(
        seed=0, device="cpu", progress=False, callback=records.append, on_progress=lines.append, progress_s=EVERY_BATCH
    )
    model, history = pretrain_autoencoder(digits40, AE, run)
    # epoch_batches cuts a shuffled order into batches of 16, 16 and 8 images
    assert [(p.stage, p.epoch, p.done, p.total) for p in lines] == [
        ("autoencoder", epoch, done, N) for epoch in (1, 2) for done in (16, 32, 40)
    ]
    assert all(p.images_per_s > 0 and p.left_s >= 0 for p in lines) and lines[2].left_s == 0
    assert records == history and [r["epoch"] for r in records] == [1, 2]  # the callback's records are unchanged

    lines.clear()
    encoder = {k[len("encoder.") :]: v for k, v in model.state_dict().items() if k.startswith("encoder.")}
    finetune_la(digits40, encoder, AE, LA, run)
    assert [(p.stage, p.epoch, p.done) for p in lines] == [("local aggregation", 1, d) for d in (16, 32, 40)]
    assert str(lines[0]).startswith("local aggregation epoch 1: 16/40 images, ")


def test_default_interval_gives_a_short_run_no_line(digits40, monkeypatch):
    monkeypatch.delenv(INTERVAL_ENV, raising=False)
    lines = []
    history = pretrain_autoencoder(
        digits40, replace(AE, epochs=1), RunOptions(seed=0, device="cpu", progress=False, on_progress=lines.append)
    )[1]
    assert history[0]["epoch_s"] < DEFAULT_INTERVAL_S and lines == []


def test_laray_train_prints_the_lines(tmp_path, capsys, monkeypatch):
    data = write_digit_folder(tmp_path / "data", N)
    monkeypatch.setenv(INTERVAL_ENV, str(EVERY_BATCH))
    assert main(tiny_train_argv(data, tmp_path / "out", tmp_path / "store", tmp_path / "cache")) == 0
    stdout = capsys.readouterr().out
    progress = re.findall(
        # the rate with its thousands separator: a fast machine's LA step passes 1,000 img/s (the test failed there)
        r"^(autoencoder|local aggregation) epoch 1: (\d+)/40 images, [\d,]+ img/s, .* left",
        stdout,
        re.M,
    )
    assert progress == [(stage, done) for stage in ("autoencoder", "local aggregation") for done in ("16", "32", "40")]
    # each stage's lines come before that stage's epoch line
    assert stdout.index("autoencoder epoch 1: 40/40") < stdout.index("autoencoder epoch   1  loss")
    assert stdout.index("local aggregation epoch 1: 40/40") < stdout.index("local_aggregation epoch   1  loss")


def test_the_module_imports_no_torch():
    """The CLI reads the interval before torch is imported (a bad one is a usage error that costs no torch)."""
    code = "import sys, laray.training.epoch_progress; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False", done.stderr


def test_laray_train_into_a_log_file_writes_plain_lines_and_no_bars(tmp_path):
    """stdout and stderr to a file, as `laray train ... > run.log 2>&1`: one line per event, no carriage returns."""
    data = write_digit_folder(tmp_path / "data", N)
    log = tmp_path / "run.log"
    with open(log, "w") as out:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "laray",
                *tiny_train_argv(data, tmp_path / "out", tmp_path / "store", tmp_path / "c"),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=600,
        )
    text = log.read_text()
    assert done.returncode == 0, text[-2000:]
    assert "\r" not in text and "it/s]" not in text  # no tqdm bar, neither decoding's nor the stages'
    assert re.search(r"^      autoencoder epoch   1  loss", text, re.M)
    assert re.search(r"^final: purity \d\.\d{3}", text, re.M)
    assert max(map(len, text.splitlines())) < 400
