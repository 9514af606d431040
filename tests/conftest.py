"""Shared fixtures. Ray starts only for the tests that ask for `ray_session`, once per test session."""

import importlib.util
import os
import sys
from pathlib import Path

import pytest


def write_digit_folder(root: Path, n: int, size: int = 32) -> Path:
    """The first n embedded digits as PNG files (size px), one folder per digit: a species-folder data set."""
    from PIL import Image

    from laray.data.dataset import load_dataset

    d = load_dataset("digits", size)
    for i in range(n):
        path = root / f"digit{d.labels[i]}" / f"{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(d.images[i]).save(path)
    return root


def tiny_train_argv(data, out, store, cache, ae_epochs: int = 1, la_epochs: int = 1) -> list[str]:
    """`laray train` with the smallest settings that still train both stages: seconds on one CPU core."""
    tiny = {"--arch": "vgg11_bn", "--width": "0.125", "--image-size": "32", "--batch-size": "16"}
    tiny |= {"--k-neighbours": "10", "--n-centroids": "5", "--clustering-repeats": "2", "--device": "cpu"}
    tiny |= {"--ae-epochs": str(ae_epochs), "--la-epochs": str(la_epochs)}
    folders = ["--data", str(data), "--out", str(out), "--store", str(store), "--cache-dir", str(cache)]
    return ["train", *folders, *(word for option in tiny.items() for word in option)]


def write_vgg_weights(path: Path, arch: str = "vgg11_bn", seed: int = 0) -> Path:
    """A torchvision-format state_dict of `arch`'s feature stack, seeded random weights: `pretrained: PATH` without
    a download. Only the `features.*` keys, all that laray loads: the classifier would add 470 MB to every file
    (and seconds to make). Convolutions drawn as torchvision's VGG draws them; BN running statistics drawn
    too, so that a test can tell the weights as loaded from a fresh encoder's."""
    import torch
    from torchvision.models import vgg

    torch.manual_seed(seed)
    features = vgg.make_layers(vgg.cfgs[{"vgg11_bn": "A", "vgg13_bn": "B", "vgg16_bn": "D"}[arch]], batch_norm=True)
    with torch.no_grad():
        for layer in features:
            if isinstance(layer, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
                torch.nn.init.zeros_(layer.bias)
            elif isinstance(layer, torch.nn.BatchNorm2d):
                layer.running_mean.uniform_(-0.2, 0.2)
                layer.running_var.uniform_(0.5, 2.0)
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)
    return path


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory):
    """A local Ray instance with 2 CPUs and no dashboard, shared by every test that requests it.

    Its workers inherit LARAY_CACHE_DIR: trials decode into a temporary folder, never the user's cache.
    """
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    os.environ["RAY_DISABLE_FAILURE_SIGNAL_HANDLER"] = "1"  # as ray_setup.ray_init: no stack dumps on SIGTERM
    os.environ["LARAY_CACHE_DIR"] = str(tmp_path_factory.mktemp("node_cache"))
    import ray

    started = not ray.is_initialized()
    if started:
        # address="local": always a fresh instance of our own, never a cluster that RAY_ADDRESS points at
        ray.init(address="local", num_cpus=2, include_dashboard=False)
        _forward_rays_lines_to_the_file_descriptors()
    yield ray
    if started:
        ray.shutdown()


def _forward_rays_lines_to_the_file_descriptors() -> None:
    """Ray prints what its workers and actors write into this process's sys.stdout/sys.stderr when the lines
    arrive, up to seconds later: into whichever test's `capsys` is active then. A warning from Ray Train's
    PlacementGroupCleaner, started by one test, broke another's "stderr starts with laray's line" in CI. Written
    to file descriptors 1 and 2 instead, the lines still reach `capfd` and pytest's report of a failure, never
    the `sys` streams a test reads its own command's output from. Ray's own handler and format, other sink."""
    from ray._private import worker as ray_worker

    def to_descriptors(batch: dict) -> None:
        ray_worker.print_worker_logs(batch, sys.__stderr__ if batch["is_err"] else sys.__stdout__)

    dispatcher = ray_worker.global_worker_stdstream_dispatcher
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", to_descriptors)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models on a busy 2-core machine: OpenMP barriers make two threads far slower than one."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def quick_plan(monkeypatch):
    """`laray train` and `laray sweep` run in a test's own process print their plan from fixed step costs.

    Timing this machine takes seconds (with big settings, tens of them), which every in-process CLI test would
    pay; tests/training/test_plan.py times it for real, and commands run as subprocesses do too.
    """
    from laray.training import plan

    fixed = plan.StepCosts(*[1e-3] * len(plan.StepCosts.__dataclass_fields__))
    monkeypatch.setattr(plan, "measure", lambda *args, **kwargs: fixed)


def tensorboard_hparams(logdir: Path) -> dict:
    """What TensorBoard's HPARAMS tab reads under logdir: {run: {"experiment": [hparam names], "differs": [those
    marked as differing], "session_start_info": {name: value}, "session_end_info": status}}, a run being an
    event file's folder relative to logdir. Read with tensorboardX's protobufs (Ray Tune's dependency), no
    TensorBoard needed."""
    import struct

    from tensorboardX.proto.event_pb2 import Event
    from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData

    found: dict = {}
    for path in sorted(Path(logdir).rglob("events.out.tfevents.*")):
        data, at = path.read_bytes(), 0
        while at < len(data):  # TFRecords: length (8 bytes), its CRC (4), the event, its CRC (4)
            (length,) = struct.unpack("<Q", data[at : at + 8])
            event = Event.FromString(data[at + 12 : at + 12 + length])
            at += 12 + length + 4
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name != "hparams":
                    continue
                plugin = HParamsPluginData.FromString(value.metadata.plugin_data.content)
                kind = plugin.WhichOneof("data")
                content = getattr(plugin, kind)
                run = found.setdefault(str(path.parent.relative_to(logdir)), {})
                if kind == "experiment":
                    run[kind] = [h.name for h in content.hparam_infos]
                    # HParamInfo.differs (field 7 in TensorBoard's api.proto), unknown to tensorboardX's older copy
                    run["differs"] = [h.name for h in content.hparam_infos if (7, 1) in _unknown_fields(h)]
                elif kind == "session_start_info":
                    run[kind] = {
                        k: v.number_value if v.WhichOneof("kind") == "number_value" else v.string_value
                        for k, v in content.hparams.items()
                    }
                else:
                    run[kind] = content.status
    return found


def _unknown_fields(message) -> list[tuple[int, object]]:
    from google.protobuf.unknown_fields import UnknownFieldSet

    return [(field.field_number, field.data) for field in UnknownFieldSet(message)]


def load_benchmark(name: str):
    """benchmarks/NAME.py as a module (the folder is no package; a script may import another beside it)."""
    folder = Path(__file__).resolve().parents[1] / "benchmarks"
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
