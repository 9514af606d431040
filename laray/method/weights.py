"""torchvision's ImageNet weights for the VGG encoders, for clusters whose GPU nodes have no internet.

`laray weights fetch vgg16_bn --out FILE` downloads them once where there is internet; a space's
`pretrained: FILE` then loads that file on any node. `pretrained: imagenet` uses torch's cache
when the file is there, and otherwise fails within seconds on a node without internet, saying so.
"""

from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch
from torchvision.models import get_weight

from laray.checkpoint import save_atomic
from laray.errors import LarayError

PROBE_TIMEOUT_S = 5.0


def _weights(arch: str):
    return get_weight(f"{arch.upper()}_Weights.IMAGENET1K_V1")


def _cached(weights) -> Path:
    """Where torch keeps the file once downloaded (torch.hub's checkpoints folder, $TORCH_HOME)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)


def _reachable(url: str) -> bool:
    host = urlparse(url).hostname
    try:
        socket.create_connection((host, 443), timeout=PROBE_TIMEOUT_S).close()
        return True
    except OSError:
        return False


def imagenet_state(arch: str) -> dict:
    """torchvision's ImageNet state_dict of `arch`: from torch's cache, else downloaded, else a LarayError."""
    weights = _weights(arch)
    if not _cached(weights).exists() and not _reachable(weights.url):
        raise LarayError(
            f"torchvision's ImageNet weights of {arch} are not in torch's cache "
            f"({_cached(weights).parent}) and {urlparse(weights.url).hostname} cannot be reached from "
            f"this node: run `laray weights fetch {arch} --out FILE` where there is internet, then set "
            "`pretrained: FILE` (a path every node can read) instead of `pretrained: imagenet`"
        )
    return weights.get_state_dict(progress=True)


def fetch(arch: str, out: str | os.PathLike) -> tuple[Path, int, str]:
    """Download (or take from torch's cache) `arch`'s ImageNet weights into `out`: (path, bytes, sha256)."""
    out = Path(out).expanduser()
    save_atomic(imagenet_state(arch), out)
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    return out, out.stat().st_size, digest
