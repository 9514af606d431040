"""The precision setting: bf16 (autocast and channels_last) on the CPU against fp32, in both stages, through
`laray train` and a one-trial sweep; bf16 checkpoints resume exactly; the memory bank, the LA loss and k-means
stay float32.

CPU only, tiny models (vgg11_bn at width 0.125, 32 px) on a few dozen digits, one torch thread. bf16 on a CPU
without bf16 instructions is emulated (about 3x slower than fp32 here), which is what CI needs: the
mixed-precision code path runs without a GPU.

Tolerances, measured on this machine (bf16 keeps 8 significant bits, a relative rounding of 2^-9 = 0.2 %):
- stage 1's epoch loss (MSE, smooth in the weights): relative 1e-2; measured at most 1.8e-3 over 4 seeds.
- LA, the first step (same weights, bank and clusters, so only the forward's rounding differs): relative
  2e-2; measured at most 4.5e-3 over 8 seeds. The epoch's mean loss: relative 0.25; measured at most 0.15
  over 8 seeds (0.025 at the seed used): after the first update the runs part, and the LA loss magnifies
  code differences by 1/temperature (14x) and through its discrete top-k neighbours.
- purity after both stages: absolute 0.15; measured at most 0.117 over 8 seeds at 60 images and 0.13 over
  4 seeds at 120, about fp32's own spread from seed to seed (0.63 to 0.73 at 60 images). A broken bf16
  path (codes that mean nothing) scores near chance, about 0.3, far outside it.
"""

import contextlib
import dataclasses
import hashlib
import json
import re
import time

import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_train_argv, write_digit_folder

import laray.training.stages as train_mod
from laray.checkpoint import load_checkpoint, save_atomic
from laray.cli.main import build_parser, main
from laray.data.dataset import ImageDataset, describe, load_dataset, open_dataset
from laray.errors import CheckpointError, ConfigError
from laray.method.la import LocalAggregationLoss, MemoryBank
from laray.settings.config import PRECISIONS, AutoEncoderConfig, LAConfig, from_dict, load_config, replace
from laray.settings.space import parse_space
from laray.training.epoch_progress import INTERVAL_ENV
from laray.training.run import train_run
from laray.training.stages import RunOptions, finetune_la, pretrain_autoencoder, uses_bf16
from laray.training.store import store_key

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N = 48  # 3 batches of 16
AE = AutoEncoderConfig(arch="vgg11_bn", width=0.125, image_size=32, epochs=1, batch_size=16, lr=0.05)
# bank_init random: both runs start LA from the same bank and so the same first clusters (from bf16 codes
# k-means would part them at once); recluster once per epoch keeps them the same for the whole first epoch.
LA = LAConfig(
    epochs=1,
    batch_size=16,
    lr=0.01,
    k_neighbours=10,
    n_centroids=5,
    clustering_repeats=2,
    augment=True,
    bank_init="random",
)
AE_LOSS_RTOL, LA_FIRST_STEP_RTOL, LA_EPOCH_RTOL, PURITY_ATOL = 1e-2, 2e-2, 0.25, 0.15
CPU = dict(device="cpu", progress=False)


@pytest.fixture(scope="module")
def tiny():
    d = load_dataset("digits", 32)
    return ImageDataset(
        np.ascontiguousarray(d.images[:N]), d.labels[:N], d.class_names, d.paths[:N], "digits-48", "digits-48"
    )


@pytest.fixture(scope="module")
def encoder_state(tiny):
    """An fp32 auto-encoder's encoder: both LA runs start from the same weights."""
    model, _ = pretrain_autoencoder(tiny, AE, RunOptions(seed=0, **CPU))
    return {k[len("encoder.") :]: v.clone() for k, v in model.state_dict().items() if k.startswith("encoder.")}


@contextlib.contextmanager
def conv_outputs():
    """(training?, output dtype, input channels_last?) of every Conv2d call while open."""
    seen = []

    def hook(module, inputs, output):
        if isinstance(module, torch.nn.Conv2d):
            seen.append((module.training, output.dtype, inputs[0].is_contiguous(memory_format=torch.channels_last)))

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def without_timing(history):
    return [{k: v for k, v in r.items() if k not in ("images_per_s", "epoch_s", "eval_s")} for r in history]


def relative(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


# ---------------------------------------------------------------------------------------------- the setting


def test_precision_is_validated_by_name_in_both_configs(tmp_path):
    assert PRECISIONS == ("auto", "bf16", "fp32")
    assert AutoEncoderConfig().precision == LAConfig().precision == "auto"
    for cls in (AutoEncoderConfig, LAConfig):
        with pytest.raises(ConfigError, match=r"^precision must be one of \('auto', 'bf16', 'fp32'\), got 'fp16'$"):
            from_dict(cls, {"precision": "fp16"})
        with pytest.raises(ConfigError, match=r"^precision must be a string, got 16$"):
            from_dict(cls, {"precision": 16})
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"autoencoder": {"precision": "bf16"}, "la": {"precision": "half"}}))
    with pytest.raises(ConfigError, match=r"^precision must be one of .*got 'half'$"):
        load_config(config)


def test_auto_is_bf16_on_cuda_only():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert [uses_bf16(p, cpu) for p in PRECISIONS] == [False, True, False]
    assert [uses_bf16(p, cuda) for p in PRECISIONS] == [True, True, False]


def test_store_key_keeps_auto_keys_and_tells_precisions_apart():
    """Auto-encoders stored before the setting existed keep their key; bf16 and fp32 ones are kept apart."""
    before = dataclasses.asdict(AE)
    del before["precision"]
    payload = json.dumps({"data": "fp", "config": before, "seed": 0}, sort_keys=True)
    assert store_key("fp", AE, 0) == hashlib.sha256(payload.encode()).hexdigest()[:24]
    keys = {store_key("fp", replace(AE, precision=p), 0) for p in PRECISIONS}
    assert len(keys) == 3


def test_cli_flag_sets_both_stages_and_refuses_other_values(capsys):
    parser = build_parser()
    args = parser.parse_args(["train", "--out", "x", "--precision", "bf16"])
    assert args.precision == "bf16"
    assert parser.parse_args(["sweep"]).precision is None  # the space's, else auto
    with pytest.raises(SystemExit) as info:
        parser.parse_args(["sweep", "--precision", "fp16"])
    assert info.value.code == 2
    assert "argument --precision: invalid choice: 'fp16'" in capsys.readouterr().err
    for command in ("train", "sweep"):
        with pytest.raises(SystemExit):
            parser.parse_args([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "--precision {auto,bf16,fp32}" in text and "else auto: bf16 on CUDA, fp32 on the CPU)" in text
    space = parse_space({"search": {"temperature": {"uniform": [0.05, 0.1]}}}).overridden(precision="bf16")
    assert space.ae.precision == space.la.precision == "bf16"


# ---------------------------------------------------------------------------------------------- 1. stage 1


def test_stage1_bf16_runs_in_bf16_and_its_loss_is_within_1e_2_of_fp32(tiny):
    with conv_outputs() as seen_fp32:
        _, fp32 = pretrain_autoencoder(tiny, replace(AE, precision="fp32"), RunOptions(seed=0, **CPU))
    with conv_outputs() as seen_bf16:
        model, bf16 = pretrain_autoencoder(tiny, replace(AE, precision="bf16"), RunOptions(seed=0, **CPU))
    _, auto = pretrain_autoencoder(tiny, AE, RunOptions(seed=0, **CPU))

    training, evaluating = [s for s in seen_bf16 if s[0]], [s for s in seen_bf16 if not s[0]]
    assert training and evaluating  # the steps, and the evaluation's encode
    assert all(dtype == torch.bfloat16 and channels_last for _, dtype, channels_last in seen_bf16)
    assert {dtype for _, dtype, _ in seen_fp32} == {torch.float32}
    # autocast computes in bf16; the weights the optimizer steps stay float32 (in channels_last)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(
        m.weight.is_contiguous(memory_format=torch.channels_last)
        for m in model.modules()
        if isinstance(m, torch.nn.Conv2d)
    )
    loss_bf16, loss_fp32 = bf16[0]["loss"], fp32[0]["loss"]
    assert loss_bf16 != loss_fp32  # another computation...
    assert relative(loss_bf16, loss_fp32) < AE_LOSS_RTOL  # ...of the same loss (measured 6e-4 here)
    assert without_timing(auto) == without_timing(fp32)  # auto on the CPU is fp32, bit for bit


# ---------------------------------------------------------------------------------------------- 2. LA


def test_la_bf16_keeps_bank_loss_and_codes_float32_and_its_loss_is_close_to_fp32(tiny, encoder_state, monkeypatch):
    seen = {"loss": [], "into_loss": [], "into_bank": []}
    check, forward, update = train_mod._check_finite, LocalAggregationLoss.forward, MemoryBank.update

    def spy_check(loss, *args):
        seen["loss"].append(loss)
        return check(loss, *args)

    def spy_forward(self, codes, indices):
        seen["into_loss"].append(codes.dtype)
        return forward(self, codes, indices)

    def spy_update(self, indices, codes):
        seen["into_bank"].append(codes.dtype)
        return update(self, indices, codes)

    monkeypatch.setattr(train_mod, "_check_finite", spy_check)
    monkeypatch.setattr(LocalAggregationLoss, "forward", spy_forward)
    monkeypatch.setattr(MemoryBank, "update", spy_update)
    runs = {}
    for precision in ("fp32", "bf16"):
        for values in seen.values():
            values.clear()
        with conv_outputs() as convs:
            result = finetune_la(tiny, encoder_state, AE, replace(LA, precision=precision), RunOptions(seed=0, **CPU))
        runs[precision] = result, [loss.item() for loss in seen["loss"]], list(convs)
        assert {loss.dtype for loss in seen["loss"]} == {torch.float32}
        assert set(seen["into_loss"]) == set(seen["into_bank"]) == {torch.float32}  # cast before both
        assert len(seen["into_bank"]) == 3
        assert result.loss_fn.bank.vectors.dtype == torch.float32 and result.codes.dtype == torch.float32
        np.testing.assert_allclose(result.codes.norm(dim=1).numpy(), 1.0, rtol=1e-5)

    (fp32, steps_fp32, convs_fp32), (bf16, steps_bf16, convs_bf16) = runs["fp32"], runs["bf16"]
    assert {dtype for _, dtype, _ in convs_bf16} == {torch.bfloat16}  # steps and evaluation
    assert {dtype for _, dtype, _ in convs_fp32} == {torch.float32}
    assert steps_bf16[0] != steps_fp32[0]
    assert relative(steps_bf16[0], steps_fp32[0]) < LA_FIRST_STEP_RTOL  # measured 3.4e-3
    assert relative(bf16.history[0]["loss"], fp32.history[0]["loss"]) < LA_EPOCH_RTOL  # measured 0.025
    assert torch.equal(bf16.loss_fn.cluster_labels, fp32.loss_fn.cluster_labels)  # clustered the same bank


# ---------------------------------------------------------------------------------------------- 3. laray train


def test_laray_train_bf16_end_to_end_scores_close_to_fp32(tmp_path, capsys):
    data = write_digit_folder(tmp_path / "data", 60)
    results = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        argv = tiny_train_argv(data, out, tmp_path / "store", tmp_path / "cache") + ["--precision", precision]
        assert main(argv) == 0
        assert re.search(r"local_aggregation epoch   1  loss \d", capsys.readouterr().out)
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["config"]["autoencoder"]["precision"] == metrics["config"]["la"]["precision"] == precision
        assert metrics["autoencoder"]["trained_in_this_run"]  # one store, a key per precision
        codes = np.load(out / "codes.npy")
        assert codes.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(codes, axis=1), 1.0, rtol=1e-5)
        results[precision] = metrics, codes
    (fp32, codes_fp32), (bf16, codes_bf16) = results["fp32"], results["bf16"]
    assert fp32["autoencoder"]["key"] != bf16["autoencoder"]["key"]
    assert not np.array_equal(codes_fp32, codes_bf16)
    assert abs(bf16["purity"] - fp32["purity"]) <= PURITY_ATOL  # measured 0.017 (0.7 and 0.683)
    assert bf16["purity"] > 0.5  # chance is about 0.3


# ---------------------------------------------------------------------------------------------- 4. resumption


class Stop(Exception):
    pass


def stop_after_first_epoch(record):
    if record["epoch"] == 1:
        raise Stop


def test_bf16_resume_equals_straight_run_in_both_stages(tiny, encoder_state, tmp_path):
    ae = replace(AE, epochs=2, precision="bf16")
    model_a, history_a = pretrain_autoencoder(tiny, ae, RunOptions(seed=3, **CPU), tmp_path / "ae_a.ckpt")
    with pytest.raises(Stop):
        pretrain_autoencoder(
            tiny, ae, RunOptions(seed=3, callback=stop_after_first_epoch, **CPU), tmp_path / "ae_b.ckpt"
        )
    model_b, history_b = pretrain_autoencoder(tiny, ae, RunOptions(seed=3, resume=True, **CPU), tmp_path / "ae_b.ckpt")
    assert load_checkpoint(tmp_path / "ae_b.ckpt")["config"]["precision"] == "bf16"
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    assert state_a.keys() == state_b.keys() and all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert without_timing(history_a) == without_timing(history_b)
    with pytest.raises(CheckpointError, match="another config"):  # bf16 weights are not resumed as fp32
        pretrain_autoencoder(
            tiny, replace(ae, precision="fp32"), RunOptions(seed=3, resume=True, **CPU), tmp_path / "ae_b.ckpt"
        )

    la = replace(LA, epochs=2, precision="bf16", bank_init="codes")  # the bank from bf16 codes, too
    a = finetune_la(tiny, encoder_state, AE, la, RunOptions(seed=5, **CPU), tmp_path / "la_a.ckpt")
    with pytest.raises(Stop):
        finetune_la(
            tiny,
            encoder_state,
            AE,
            la,
            RunOptions(seed=5, callback=stop_after_first_epoch, **CPU),
            tmp_path / "la_b.ckpt",
        )
    b = finetune_la(tiny, encoder_state, AE, la, RunOptions(seed=5, resume=True, **CPU), tmp_path / "la_b.ckpt")
    for x, y in ((a.encoder.state_dict(), b.encoder.state_dict()), (a.loss_fn.state_dict(), b.loss_fn.state_dict())):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    assert without_timing(a.history) == without_timing(b.history)
    assert torch.equal(a.codes, b.codes) and a.scores == b.scores


def test_a_checkpoint_from_before_the_setting_resumes_as_auto(tiny, tmp_path):
    ckpt = tmp_path / "old.ckpt"
    cfg = replace(AE, epochs=2)
    with pytest.raises(Stop):
        pretrain_autoencoder(tiny, cfg, RunOptions(seed=1, callback=stop_after_first_epoch, **CPU), ckpt)
    state = load_checkpoint(ckpt)
    del state["config"]["precision"]  # as an earlier laray wrote it
    save_atomic(state, ckpt)
    resumed = []
    pretrain_autoencoder(tiny, cfg, RunOptions(seed=1, resume=True, callback=resumed.append, **CPU), ckpt)
    assert [r["epoch"] for r in resumed] == [2]
    with pytest.raises(CheckpointError, match="another config"):
        pretrain_autoencoder(tiny, replace(cfg, precision="bf16"), RunOptions(seed=1, resume=True, **CPU), ckpt)


# ---------------------------------------------------------------------------------------------- 5. a sweep


def test_one_trial_sweep_in_bf16_scores_close_to_fp32_and_its_progress_reaches_the_console(
    ray_session, tmp_path, monkeypatch, capfd
):
    """Also the sweep's in-epoch lines (laray.training.epoch_progress): the stage-1 task's and the trial's,
    printed on their workers, forwarded by Ray to this driver's console."""
    from laray.sweep.driver import SweepRun, TrialResources, run_sweep

    ref = describe(str(write_digit_folder(tmp_path / "digits", 120)), 32)
    raw = {
        "num_samples": 1,
        "max_concurrent": 1,
        "holdout": 0,
        "confirm_top": 0,
        "fixed": {
            "autoencoder": {"arch": "vgg11_bn", "width": 0.125, "image_size": 32, "epochs": 1, "batch_size": 32},
            "la": {"epochs": 1, "batch_size": 32, "k_neighbours": 10, "n_centroids": 6, "clustering_repeats": 2},
        },
        "search": {"temperature": {"categorical": [0.07]}},  # one value: the trial's settings are known
    }
    space = parse_space(raw).overridden(precision="bf16")  # as `laray sweep --precision bf16` does
    monkeypatch.setenv(INTERVAL_ENV, "1e-9")  # read by the driver, handed to the task and the trial
    result = run_sweep(ref, space, SweepRun(str(tmp_path / "sweeps"), "bf16", seed=0, verbose=0), TrialResources())
    assert result.n_trials == 1 and result.n_errored == 0
    (folder,) = [p for p in (tmp_path / "sweeps" / "bf16").glob("train_trial_*") if p.is_dir()]
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["config"]["autoencoder"]["precision"] == metrics["config"]["la"]["precision"] == "bf16"

    # The same run in fp32, without Ray: the trial's settings, stage 1 trained here.
    la = replace(LAConfig(**metrics["config"]["la"]), precision="fp32")
    ae = replace(AutoEncoderConfig(**metrics["config"]["autoencoder"]), precision="fp32")
    fp32 = train_run(open_dataset(ref), tmp_path / "fp32", ae, la, RunOptions(seed=0, **CPU), tmp_path / "store")
    assert abs(result.best_metrics["purity"] - fp32["purity"]) <= PURITY_ATOL  # measured 0.0 (0.767 both)

    # Ray forwards workers' lines a moment later: wait for them, a few seconds at most.
    console, deadline = "", time.monotonic() + 20
    wanted = (
        r"stage 1 \(seed 0\): autoencoder epoch 1: 120/120 images",
        r"trial \w+: local aggregation epoch 1: 120/120 images",
    )
    while not all(re.search(w, console) for w in wanted) and time.monotonic() < deadline:
        time.sleep(0.5)
        console += "".join(capfd.readouterr())
    for w in wanted:
        assert re.search(w, console), (w, console[-3000:])
    assert len(re.findall(r"trial \w+: local aggregation epoch 1: \d+/120 images", console)) == 4  # 32, 64, 96, 120
