"""`laray weights fetch` and `pretrained: imagenet` on a node without internet (both without the network)."""

import socket
import time

import pytest
import torch
from torchvision.models import vgg11_bn

import laray.method.weights
from laray.cli.main import main
from laray.errors import LarayError
from laray.method.models import EncoderVGG


class FakeWeights:
    """Stands in for torchvision's weights enum: the real one would download 500 MB."""

    url = "https://download.pytorch.org/models/vgg11_bn-6002323d.pth"

    def __init__(self, state):
        self.state = state

    def get_state_dict(self, progress=True):
        return self.state


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """An empty torch cache and no route to the download host."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def refused(*args, **kwargs):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", refused)


def test_imagenet_without_internet_fails_fast_with_the_advice(offline):
    began = time.perf_counter()
    with pytest.raises(LarayError) as failed:
        EncoderVGG("vgg11_bn", pretrained="imagenet")
    message = str(failed.value)
    assert "laray weights fetch vgg11_bn --out FILE" in message and "pretrained: FILE" in message
    assert "download.pytorch.org cannot be reached" in message and "\n" not in message
    assert time.perf_counter() - began < 10


def test_fetch_writes_a_file_that_pretrained_loads(monkeypatch, tmp_path, capsys):
    state = vgg11_bn().state_dict()  # random init: what matters is that the file round-trips
    monkeypatch.setattr(laray.method.weights, "_weights", lambda arch: FakeWeights(state))
    monkeypatch.setattr(laray.method.weights, "_reachable", lambda url: True)
    out = tmp_path / "weights" / "vgg11_bn.pt"
    assert main(["weights", "fetch", "vgg11_bn", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "sha256" in printed and f"pretrained: {out}" in printed
    encoder = EncoderVGG("vgg11_bn", pretrained=str(out))
    first = next(k for k in state if k.startswith("features.") and k.endswith("weight"))
    assert torch.equal(encoder.features.state_dict()[first[len("features.") :]], state[first])


def test_fetch_offline_is_one_line(offline, tmp_path, capsys):
    assert main(["weights", "fetch", "vgg11_bn", "--out", str(tmp_path / "w.pt")]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("laray: error: torchvision's ImageNet weights of vgg11_bn are not in torch's cache")
    assert not (tmp_path / "w.pt").exists()
