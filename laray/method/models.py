"""VGG encoder, SegNet-style mirrored decoder, and the merged encoder of stage 2.

The encoder is torchvision's VGG feature stack (with batch norm) whose max-pools
return their indices; the decoder walks it in reverse, turning every convolution
into a transposed convolution with swapped channels and every pool into an
unpool fed with the matching indices (Badrinarayanan et al. 2015, SegNet,
arXiv:1511.00561).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from laray.errors import ConfigError  # a ValueError too: bad settings reached past the config's checks
from laray.settings.config import ARCHS as ARCH_NAMES

# The VGG configurations of Simonyan & Zisserman (2015), table 1, columns A, B, D and E: each convolution's
# output channels, "M" a 2x2 max-pool. Written here rather than taken from torchvision, whose import (1.2 s:
# every model it has, its ops, torch's compiler) every command that builds a model paid; torchvision is
# imported only for ImageNet weights (laray.method.weights). tests/method/test_models.py checks that the
# layers are torchvision's, index for index, with the same initial weights.
VGG_CONFIGS = {
    "A": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "B": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "E": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}
ARCHS = dict(zip(ARCH_NAMES, "ABDE"))  # the configuration letter of each architecture we support
MERGERS = ("mean", "flatten", None)
MIN_CHANNELS = 8


def _check_choice(name: str, value, valid) -> None:
    if value not in valid:
        raise ConfigError(f"unknown {name} {value!r}; valid: {', '.join(map(repr, valid))}")


def _scaled_cfg(arch: str, width: float) -> list:
    if not width > 0:
        raise ConfigError(f"width must be > 0, got {width!r}")
    return [c if c == "M" else max(MIN_CHANNELS, round(c * width)) for c in VGG_CONFIGS[ARCHS[arch]]]


def vgg_features(cfg: list) -> nn.Sequential:
    """A VGG feature stack with batch norm: per convolution (3x3, padding 1) a BatchNorm2d and a ReLU, a max-pool
    per "M"; the layer indices of torchvision's `features`, so that its state_dicts load strictly."""
    layers, channels = [], 3
    for c in cfg:
        if c == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(channels, c, kernel_size=3, padding=1), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
            channels = c
    return nn.Sequential(*layers)


def _load_pretrained_features(arch: str, pretrained: str) -> dict:
    """The `features.*` part of a torchvision VGG state_dict, keys without the prefix."""
    if pretrained == "imagenet":
        from laray.method.weights import imagenet_state  # torch's cache, else a download, else advice

        state = imagenet_state(arch)
    elif os.path.isfile(pretrained):
        state = torch.load(pretrained, map_location="cpu", weights_only=True)
    else:
        raise ConfigError(f"pretrained must be None, 'imagenet' or an existing state_dict file, got {pretrained!r}")
    prefix = "features."
    features = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not features:
        raise ConfigError(f"pretrained state_dict {pretrained!r} has no 'features.*' keys: not a torchvision VGG")
    return features


class EncoderVGG(nn.Module):
    """VGG-bn feature stack whose pools return indices.

    forward(x) -> (code, pool_indices, pool_sizes): the code map (b, c, h, w), and per
    pool, in order, its indices and the spatial size of its input (for odd sizes).
    """

    def __init__(self, arch: str = "vgg16_bn", pretrained: str | None = None, width: float = 1.0):
        super().__init__()
        _check_choice("arch", arch, tuple(ARCHS))
        if pretrained is not None and width != 1.0:
            raise ConfigError(f"pretrained weights need width 1.0, got width={width!r}")
        self.arch, self.width = arch, width
        self.cfg = _scaled_cfg(arch, width)
        # Same layer indices as torchvision's `features`, so its state_dict loads strictly.
        self.features = vgg_features(self.cfg)
        for i, layer in enumerate(self.features):
            if isinstance(layer, nn.MaxPool2d):
                self.features[i] = nn.MaxPool2d(layer.kernel_size, layer.stride, return_indices=True)
        if pretrained is not None:
            self.features.load_state_dict(_load_pretrained_features(arch, pretrained), strict=True)

    @property
    def out_channels(self) -> int:
        return [c for c in self.cfg if c != "M"][-1]

    def code_shape(self, image_size: int) -> tuple[int, int, int]:
        """(channels, h, w) of the code map for a square input of `image_size` pixels."""
        side = image_size
        for _ in range(self.cfg.count("M")):
            side //= 2
        if side < 1:
            raise ConfigError(f"image_size {image_size} is too small for {self.arch}: the code map would be empty")
        return self.out_channels, side, side

    def forward(self, x: torch.Tensor):
        pool_indices, pool_sizes = [], []
        for layer in self.features:
            if isinstance(layer, nn.MaxPool2d):
                pool_sizes.append(x.shape[-2:])
                x, idx = layer(x)
                pool_indices.append(idx)
            else:
                x = layer(x)
        return x, pool_indices, pool_sizes


class DecoderVGG(nn.Module):
    """The encoder mirrored: Conv2d(in, out) -> ConvTranspose2d(out, in) + BN + ReLU, MaxPool -> MaxUnpool.

    The last BN and ReLU are dropped so that the output is a plain convolution with
    as many channels as the encoder's input.
    """

    def __init__(self, encoder: EncoderVGG):
        super().__init__()
        layers = []
        for layer in reversed(encoder.features):
            if isinstance(layer, nn.Conv2d):
                layers += [
                    nn.ConvTranspose2d(
                        layer.out_channels, layer.in_channels, layer.kernel_size, layer.stride, layer.padding
                    ),
                    nn.BatchNorm2d(layer.in_channels),
                    nn.ReLU(inplace=True),
                ]
            elif isinstance(layer, nn.MaxPool2d):
                layers.append(nn.MaxUnpool2d(layer.kernel_size, layer.stride))
        self.layers = nn.Sequential(*layers[:-2])

    def forward(self, code: torch.Tensor, pool_indices: list, pool_sizes: list) -> torch.Tensor:
        indices, sizes = list(pool_indices), list(pool_sizes)
        x = code
        for layer in self.layers:
            if isinstance(layer, nn.MaxUnpool2d):  # last pool first
                x = layer(x, indices.pop(), output_size=sizes.pop())
            else:
                x = layer(x)
        return x


class AutoEncoderVGG(nn.Module):
    """Stage 1: encoder + mirrored decoder, trained with per-pixel MSE."""

    def __init__(self, arch: str = "vgg16_bn", pretrained: str | None = None, width: float = 1.0):
        super().__init__()
        self.encoder = EncoderVGG(arch, pretrained, width)
        self.decoder = DecoderVGG(self.encoder)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(*self.encoder(x))


class EncoderVGGMerged(nn.Module):
    """Stage 2: the encoder with its code map merged to one vector per image.

    merger: "mean" over height and width (d = channels), "flatten" (d = channels*h*w),
    or None (the code map itself).
    """

    def __init__(
        self, arch: str = "vgg16_bn", pretrained: str | None = None, width: float = 1.0, merger: str | None = "mean"
    ):
        super().__init__()
        _check_choice("merger", merger, MERGERS)
        self.merger = merger
        self.encoder = EncoderVGG(arch, pretrained, width)

    @classmethod
    def from_encoder(cls, encoder: EncoderVGG, merger: str | None = "mean") -> "EncoderVGGMerged":
        """Wrap an existing encoder (shared, not copied), e.g. the auto-encoder's for evaluation."""
        _check_choice("merger", merger, MERGERS)
        merged = cls.__new__(cls)
        nn.Module.__init__(merged)
        merged.merger, merged.encoder = merger, encoder
        return merged

    def code_dim(self, image_size: int) -> int:
        """Length of the merged code for a square input of `image_size` pixels (sizes the memory bank)."""
        c, h, w = self.encoder.code_shape(image_size)
        if self.merger is None:
            raise ConfigError("merger=None gives a code map, not a vector: it has no code_dim")
        return c if self.merger == "mean" else c * h * w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        code = self.encoder(x)[0]  # (b, c, h, w)
        if self.merger == "mean":
            return code.mean(dim=(2, 3))  # (b, c)
        if self.merger == "flatten":
            return code.flatten(1)  # (b, c*h*w)
        return code
