"""Stage 1 models: VGG encoder, SegNet-style mirrored decoder, merged encoder."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from laray.method.la import MemoryBank
from laray.method.models import AutoEncoderVGG, DecoderVGG, EncoderVGG, EncoderVGGMerged

SMALL = 0.125  # width multiplier that keeps CPU tests fast
ALL_ARCHS = ("vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn")
# Channel counts of torchvision's VGG configurations (conv layers only, in order).
FULL_CHANNELS = {
    "vgg11_bn": [64, 128, 256, 256, 512, 512, 512, 512],
    "vgg16_bn": [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512],
}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _convs(module: nn.Module, kind) -> list:
    return [m for m in module.modules() if type(m) is kind]


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("arch", ["vgg11_bn", "vgg16_bn"])
@pytest.mark.parametrize("size,batch", [(32, 2), (64, 2), (224, 1)])
def test_autoencoder_output_shape_equals_input(arch, size, batch):
    model = AutoEncoderVGG(arch, width=SMALL)
    x = torch.randn(batch, 3, size, size)
    with torch.no_grad():
        y = model(x)
    assert y.shape == x.shape
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("arch", ["vgg11_bn", "vgg16_bn"])
def test_autoencoder_odd_size(arch):
    # 100 -> 50 -> 25 -> 12 -> 6 -> 3: the 25 -> 12 pool drops a row/column, which
    # the unpool must restore from the recorded pool input size.
    model = AutoEncoderVGG(arch, width=SMALL)
    x = torch.randn(1, 3, 100, 100)
    with torch.no_grad():
        code, indices, sizes = model.encoder(x)
        y = model.decoder(code, indices, sizes)
    assert [tuple(s) for s in sizes] == [(100, 100), (50, 50), (25, 25), (12, 12), (6, 6)]
    assert code.shape[-2:] == (3, 3)
    assert y.shape == x.shape


def test_autoencoder_non_square_input():
    model = AutoEncoderVGG("vgg11_bn", width=SMALL)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        assert model(x).shape == x.shape


def test_encoder_returns_code_indices_and_sizes():
    enc = EncoderVGG("vgg16_bn", width=SMALL)
    x = torch.randn(2, 3, 64, 64)
    code, indices, sizes = enc(x)
    assert code.shape == (2, *enc.code_shape(64)) == (2, 64, 2, 2)
    assert len(indices) == len(sizes) == 5
    assert [tuple(s) for s in sizes] == [(64, 64), (32, 32), (16, 16), (8, 8), (4, 4)]
    for idx, (h, w) in zip(indices, sizes):
        assert idx.dtype == torch.int64
        # flat indices into the (h, w) plane of the pool's input
        assert idx.min() >= 0 and idx.max() < h * w
        assert idx.shape[-2:] == (h // 2, w // 2)


# --------------------------------------------------------------------------- mirror structure


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_decoder_mirrors_encoder(arch):
    model = AutoEncoderVGG(arch, width=SMALL)
    enc_layers = list(model.encoder.features)
    dec_layers = list(model.decoder.layers)

    enc_pools = [m for m in enc_layers if isinstance(m, nn.MaxPool2d)]
    dec_unpools = [m for m in dec_layers if isinstance(m, nn.MaxUnpool2d)]
    assert len(enc_pools) == 5
    assert len(dec_unpools) == len(enc_pools)
    assert all(p.return_indices for p in enc_pools)
    for pool, unpool in zip(reversed(enc_pools), dec_unpools):
        assert unpool.kernel_size == pool.kernel_size or unpool.kernel_size == (pool.kernel_size,) * 2
        assert unpool.stride == pool.stride or unpool.stride == (pool.stride,) * 2

    enc_convs = [m for m in enc_layers if isinstance(m, nn.Conv2d)]
    dec_convs = [m for m in dec_layers if isinstance(m, nn.ConvTranspose2d)]
    assert not any(isinstance(m, nn.Conv2d) for m in dec_layers)  # only transposed convs
    assert len(dec_convs) == len(enc_convs)
    for conv, tconv in zip(reversed(enc_convs), dec_convs):
        assert (tconv.in_channels, tconv.out_channels) == (conv.out_channels, conv.in_channels)
        assert tconv.kernel_size == conv.kernel_size
        assert tconv.stride == conv.stride
        assert tconv.padding == conv.padding

    # The kinds of layers mirror too: the encoder's pool/conv sequence reversed.
    enc_kinds = [
        "P" if isinstance(m, nn.MaxPool2d) else "C" for m in enc_layers if isinstance(m, (nn.MaxPool2d, nn.Conv2d))
    ]
    dec_kinds = [
        "P" if isinstance(m, nn.MaxUnpool2d) else "C"
        for m in dec_layers
        if isinstance(m, (nn.MaxUnpool2d, nn.ConvTranspose2d))
    ]
    assert dec_kinds == enc_kinds[::-1]

    # Every transposed conv but the last is followed by BN(out_channels) + ReLU.
    for i, layer in enumerate(dec_layers[:-1]):
        if isinstance(layer, nn.ConvTranspose2d):
            assert isinstance(dec_layers[i + 1], nn.BatchNorm2d)
            assert dec_layers[i + 1].num_features == layer.out_channels
            assert isinstance(dec_layers[i + 2], nn.ReLU)

    # Plain output convolution back to 3 channels: no trailing BN/ReLU.
    last = dec_layers[-1]
    assert isinstance(last, nn.ConvTranspose2d)
    assert last.out_channels == 3
    assert last is dec_convs[-1]


def test_decoder_can_be_built_standalone():
    enc = EncoderVGG("vgg11_bn", width=SMALL)
    dec = DecoderVGG(enc)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert dec(*enc(x)).shape == x.shape


# --------------------------------------------------------------------------- pooling indices


def _top_left_indices(idx: torch.Tensor, in_w: int) -> torch.Tensor:
    """Valid alternative indices: the top-left corner of each 2x2 pooling window."""
    h_out, w_out = idx.shape[-2:]
    rows = torch.arange(h_out)[:, None] * 2
    cols = torch.arange(w_out)[None, :] * 2
    return (rows * in_w + cols).expand_as(idx).clone()


def test_decoder_uses_pooling_indices():
    model = AutoEncoderVGG("vgg11_bn", width=SMALL).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        code, indices, sizes = model.encoder(x)
        base = model.decoder(code, indices, sizes)
        # deterministic given the same indices
        assert torch.equal(base, model.decoder(code, indices, sizes))

        for k in range(len(indices)):
            altered = list(indices)
            alt = _top_left_indices(indices[k], sizes[k][1])
            assert alt.min() >= 0 and alt.max() < sizes[k][0] * sizes[k][1]
            assert not torch.equal(alt, indices[k])
            altered[k] = alt
            out = model.decoder(code, altered, sizes)
            assert out.shape == base.shape
            assert not torch.allclose(out, base), f"decoder ignored the indices of pool {k}"


def test_decoder_uses_indices_of_another_image():
    model = AutoEncoderVGG("vgg16_bn", width=SMALL).eval()
    x1, x2 = torch.randn(1, 3, 64, 64), torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        code1, idx1, sizes = model.encoder(x1)
        _, idx2, _ = model.encoder(x2)
        base = model.decoder(code1, idx1, sizes)
        # swap in only the first pool's indices (the last unpool in the decoder)
        mixed = [idx2[0]] + list(idx1[1:])
        assert not torch.equal(idx1[0], idx2[0])
        out = model.decoder(code1, mixed, sizes)
    assert not torch.allclose(out, base)


def test_decoder_does_not_mutate_index_lists():
    model = AutoEncoderVGG("vgg11_bn", width=SMALL).eval()
    with torch.no_grad():
        code, indices, sizes = model.encoder(torch.randn(1, 3, 32, 32))
        n_idx, n_sizes = len(indices), len(sizes)
        model.decoder(code, indices, sizes)
    assert len(indices) == n_idx and len(sizes) == n_sizes


# --------------------------------------------------------------------------- merged encoder


def test_merged_code_dim_mean():
    model = EncoderVGGMerged("vgg16_bn", width=SMALL, merger="mean")
    assert model.encoder.out_channels == 64  # 512 * 0.125
    assert model.code_dim(64) == 64
    assert model.code_dim(224) == 64  # independent of the image size
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
        code = model.encoder(x)[0]
    assert out.shape == (2, model.code_dim(64))
    assert torch.allclose(out, code.mean(dim=(2, 3)))


def test_merged_code_dim_flatten():
    model = EncoderVGGMerged("vgg16_bn", width=SMALL, merger="flatten")
    # 64 px through 5 pools: 64 / 2**5 = 2 -> 64 channels * 2 * 2
    assert model.encoder.code_shape(64) == (64, 2, 2)
    assert model.code_dim(64) == 64 * 2 * 2
    # 100 px: 100 -> 50 -> 25 -> 12 -> 6 -> 3
    assert model.code_dim(100) == 64 * 3 * 3
    for size in (64, 100):
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            out = model(x)
        assert out.shape == (2, model.code_dim(size))


def test_merged_full_width_code_dims():
    model = EncoderVGGMerged("vgg16_bn", merger="flatten")
    assert model.code_dim(64) == 512 * 2 * 2
    assert model.code_dim(224) == 512 * 7 * 7
    model.merger = "mean"
    assert model.code_dim(224) == 512


def test_merged_none_returns_code_map():
    model = EncoderVGGMerged("vgg11_bn", width=SMALL, merger=None)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
    assert out.ndim == 4
    assert out.shape == (2, *model.encoder.code_shape(64))
    with pytest.raises(ValueError):
        model.code_dim(64)


def test_merged_unknown_merger():
    with pytest.raises(ValueError, match="merger") as info:
        EncoderVGGMerged("vgg11_bn", width=SMALL, merger="max")
    msg = str(info.value)
    assert "'max'" in msg
    for valid in ("mean", "flatten", "None"):
        assert valid in msg


def test_memory_bank_sized_from_flatten_code_dim():
    n, size = 5, 64
    model = EncoderVGGMerged("vgg11_bn", width=SMALL, merger="flatten").eval()
    dim = model.code_dim(size)
    assert dim == 64 * 2 * 2
    images = torch.randn(n, 3, size, size)
    with torch.no_grad():
        codes = model(images)
    assert codes.shape == (n, dim)

    bank = MemoryBank(n, dim, 0.5)
    assert bank.vectors.shape == (n, dim)
    bank.fill(codes)
    assert bank.vectors.shape == (n, dim)
    assert torch.allclose(bank.vectors.norm(dim=1), torch.ones(n), atol=1e-5)
    assert torch.allclose(bank.vectors, F.normalize(codes, dim=1))

    indices = torch.tensor([1, 3])
    with torch.no_grad():
        batch_codes = model(torch.randn(2, 3, size, size))
    before = bank.vectors.clone()
    bank.update(indices, batch_codes)
    after = bank.vectors
    assert after.shape == (n, dim)
    assert torch.allclose(after.norm(dim=1), torch.ones(n), atol=1e-5)
    expected = F.normalize(0.5 * F.normalize(batch_codes, dim=1) + 0.5 * before[indices], dim=1)
    assert torch.allclose(after[indices], expected, atol=1e-6)
    untouched = torch.tensor([0, 2, 4])
    assert torch.equal(after[untouched], before[untouched])
    assert not torch.allclose(after[indices], before[indices])


# --------------------------------------------------------------------------- pretrained weights


@pytest.fixture(scope="module")
def vgg16_state_file(tmp_path_factory):
    torch.manual_seed(1)
    tv = torchvision.models.vgg16_bn(weights=None)
    # Non-trivial BN running stats, so that the check covers them.
    for m in tv.features:
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.num_batches_tracked.fill_(7)
    path = tmp_path_factory.mktemp("weights") / "vgg16_bn.pth"
    torch.save(tv.state_dict(), path)
    return path, tv


def _assert_features_equal(features: nn.Module, tv_model: nn.Module):
    ours = features.state_dict()
    theirs = {k[len("features.") :]: v for k, v in tv_model.state_dict().items() if k.startswith("features.")}
    assert set(ours) == set(theirs)
    assert any(k.endswith("running_mean") for k in ours)
    assert any(k.endswith("num_batches_tracked") for k in ours)
    for k, v in theirs.items():
        assert torch.equal(ours[k], v), k


def test_pretrained_from_local_file(vgg16_state_file):
    path, tv = vgg16_state_file
    enc = EncoderVGG("vgg16_bn", pretrained=str(path))
    _assert_features_equal(enc.features, tv)
    # pools still return indices after loading
    assert all(m.return_indices for m in enc.features if isinstance(m, nn.MaxPool2d))


def test_pretrained_path_accepted_by_autoencoder_and_merged(vgg16_state_file):
    path, tv = vgg16_state_file
    ae = AutoEncoderVGG("vgg16_bn", pretrained=str(path))
    _assert_features_equal(ae.encoder.features, tv)
    merged = EncoderVGGMerged("vgg16_bn", pretrained=str(path), merger="mean")
    _assert_features_equal(merged.encoder.features, tv)


def test_pretrained_encoder_matches_torchvision_features(vgg16_state_file):
    path, tv = vgg16_state_file
    enc = EncoderVGG("vgg16_bn", pretrained=str(path)).eval()
    tv.eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(enc(x)[0], tv.features(x), atol=1e-5)


def test_pretrained_with_width_raises(vgg16_state_file):
    path, _ = vgg16_state_file
    with pytest.raises(ValueError, match="width"):
        EncoderVGG("vgg16_bn", pretrained=str(path), width=0.5)
    with pytest.raises(ValueError, match="width"):
        AutoEncoderVGG("vgg16_bn", pretrained=str(path), width=0.5)
    with pytest.raises(ValueError, match="width"):
        EncoderVGGMerged("vgg16_bn", pretrained="imagenet", width=0.125)  # checked before any download


def test_pretrained_missing_file_raises(tmp_path):
    with pytest.raises(ValueError, match="pretrained"):
        EncoderVGG("vgg11_bn", pretrained=str(tmp_path / "nope.pth"))
    with pytest.raises(ValueError):
        EncoderVGG("vgg11_bn", pretrained=str(tmp_path))  # a directory is not a file


def test_pretrained_without_features_keys_raises(tmp_path):
    path = tmp_path / "classifier_only.pth"
    torch.save({"classifier.0.weight": torch.zeros(2, 2), "classifier.0.bias": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="features"):
        EncoderVGG("vgg11_bn", pretrained=str(path))


# --------------------------------------------------------------------------- arch and width


def test_unknown_arch_lists_valid_names():
    with pytest.raises(ValueError) as info:
        EncoderVGG("vgg16")
    msg = str(info.value)
    assert "'vgg16'" in msg
    for name in ALL_ARCHS:
        assert name in msg
    with pytest.raises(ValueError):
        AutoEncoderVGG("resnet18", width=SMALL)
    with pytest.raises(ValueError):
        EncoderVGGMerged("vgg16_BN", width=SMALL)


@pytest.mark.parametrize("arch", ["vgg11_bn", "vgg16_bn"])
def test_full_width_channels_match_torchvision(arch):
    enc = EncoderVGG(arch)
    assert [c.out_channels for c in _convs(enc.features, nn.Conv2d)] == FULL_CHANNELS[arch]
    assert enc.out_channels == 512


@pytest.mark.parametrize("arch", ["vgg11_bn", "vgg16_bn"])
def test_width_half_halves_channels(arch):
    enc = EncoderVGG(arch, width=0.5)
    convs = _convs(enc.features, nn.Conv2d)
    assert [c.out_channels for c in convs] == [c // 2 for c in FULL_CHANNELS[arch]]
    assert [c.in_channels for c in convs] == [3] + [c // 2 for c in FULL_CHANNELS[arch]][:-1]
    bns = _convs(enc.features, nn.BatchNorm2d)
    assert [b.num_features for b in bns] == [c // 2 for c in FULL_CHANNELS[arch]]
    assert enc.out_channels == 256


def test_width_never_below_eight_channels():
    enc = EncoderVGG("vgg16_bn", width=0.01)
    convs = _convs(enc.features, nn.Conv2d)
    # 64 * 0.01 and 512 * 0.01 both round below 8
    assert [c.out_channels for c in convs] == [8] * len(FULL_CHANNELS["vgg16_bn"])
    assert convs[0].in_channels == 3
    assert enc.out_channels == 8
    # 0.125: 64 -> 8 exactly, 512 -> 64
    small = [c.out_channels for c in _convs(EncoderVGG("vgg16_bn", width=SMALL).features, nn.Conv2d)]
    assert min(small) == 8 and max(small) == 64
    # the tiny model still round-trips
    ae = AutoEncoderVGG("vgg16_bn", width=0.01)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert ae(x).shape == x.shape


@pytest.mark.parametrize("width", [0, -0.5])
def test_non_positive_width_raises(width):
    with pytest.raises(ValueError, match="width"):
        EncoderVGG("vgg11_bn", width=width)


# --------------------------------------------------------------------------- code_shape


def test_code_shape():
    enc = EncoderVGG("vgg16_bn", width=SMALL)
    assert enc.code_shape(32) == (64, 1, 1)
    assert enc.code_shape(64) == (64, 2, 2)
    assert enc.code_shape(224) == (64, 7, 7)
    assert enc.code_shape(100) == (64, 3, 3)


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_code_shape_too_small_raises(arch):
    enc = EncoderVGG(arch, width=SMALL)
    # every VGG has 5 pools: 16 -> 8 -> 4 -> 2 -> 1 -> 0
    with pytest.raises(ValueError, match="too small"):
        enc.code_shape(16)
    with pytest.raises(ValueError, match="too small"):
        enc.code_shape(31)
    assert enc.code_shape(32)[1:] == (1, 1)


def test_merged_code_dim_too_small_raises():
    with pytest.raises(ValueError, match="too small"):
        EncoderVGGMerged("vgg16_bn", width=SMALL, merger="flatten").code_dim(16)


@pytest.mark.parametrize("arch", ["vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn"])
def test_the_feature_stack_is_torchvisions_index_for_index_with_the_same_initial_weights(arch):
    """laray writes the VGG configurations itself (no torchvision import): the same layers, and made in the same
    order, the same weights from the same seed, so torchvision state_dicts load and old seeds train alike."""
    from torchvision.models import vgg as tv_vgg

    from laray.method.models import ARCHS, VGG_CONFIGS, vgg_features

    assert VGG_CONFIGS[ARCHS[arch]] == tv_vgg.cfgs[ARCHS[arch]]
    torch.manual_seed(3)
    ours = vgg_features(VGG_CONFIGS[ARCHS[arch]])
    torch.manual_seed(3)
    theirs = tv_vgg.make_layers(tv_vgg.cfgs[ARCHS[arch]], batch_norm=True)
    assert [repr(a) for a in ours] == [repr(b) for b in theirs]
    mine, reference = ours.state_dict(), theirs.state_dict()
    assert mine.keys() == reference.keys() and all(torch.equal(mine[k], reference[k]) for k in mine)


def test_building_a_model_imports_no_torchvision():
    code = "import sys; from laray.method.models import AutoEncoderVGG; AutoEncoderVGG('vgg11_bn', None, 0.125); " \
        "print('torchvision' in sys.modules)"  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False", done.stderr
