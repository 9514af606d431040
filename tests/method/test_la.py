"""Local Aggregation loss and memory bank against a slow float64 reference written from the definition."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import laray.method.la
from laray.method.la import LocalAggregationLoss, MemoryBank


def reference_loss(codes, indices, bank_vectors, cluster_labels, k, tau):
    """l_i = log sum_{B_i} exp(v.M_j/tau) - log sum_{B_i & C_i} exp(v.M_j/tau), looped, in float64."""
    M = bank_vectors.double()
    L = cluster_labels.tolist()
    n = len(M)
    total = 0.0
    for code, i in zip(codes.double(), indices.tolist()):
        v = code / code.norm()
        dots = [float(v @ M[j]) for j in range(n)]
        others = sorted((j for j in range(n) if j != i), key=lambda j: -dots[j])
        background = [i] + others[:k]
        close = {j for j in range(n) if any(run[j] == run[i] for run in L)}
        log_b = math.log(sum(math.exp(dots[j] / tau) for j in background))
        log_bc = math.log(sum(math.exp(dots[j] / tau) for j in background if j in close))
        total += log_b - log_bc
    return total / len(codes)


def make_loss(n=60, d=8, m=0.5, tau=0.1, k=10, R=3, C=6, seed=0, dtype=torch.float32):
    bank = MemoryBank(n, d, m, seed=seed)
    bank.vectors = bank.vectors.to(dtype)
    return LocalAggregationLoss(bank, tau, k, R, C, seed=seed)


@pytest.mark.parametrize(
    "k,R,C,tau", [(1, 1, 2, 0.07), (5, 2, 4, 0.5), (12, 3, 6, 0.1), (59, 4, 20, 1.0), (30, 6, 60, 0.05)]
)
def test_loss_matches_reference(k, R, C, tau):
    torch.manual_seed(k + R)
    loss = make_loss(k=k, R=R, C=C, tau=tau, seed=R)
    loss.recluster()
    codes = torch.randn(16, 8)
    indices = torch.randperm(60)[:16]
    expected = reference_loss(codes, indices, loss.bank.vectors, loss.cluster_labels, k, tau)
    got = loss(codes, indices).item()
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_loss_matches_reference_before_first_recluster():
    # Until recluster() runs, C_i = {i}, so the loss is the full background log-sum-exp minus the self term.
    loss = make_loss()
    codes, indices = torch.randn(4, 8), torch.tensor([3, 7, 0, 59])
    expected = reference_loss(codes, indices, loss.bank.vectors, loss.cluster_labels, 10, 0.1)
    assert loss(codes, indices).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("dense_ratio", [0, 10**6])
def test_gradcheck_double(monkeypatch, dense_ratio):
    monkeypatch.setattr(laray.method.la, "DENSE_BACKWARD_RATIO", dense_ratio)
    torch.manual_seed(0)
    loss = make_loss(n=20, d=5, k=6, R=2, C=4, tau=0.3, dtype=torch.float64)
    loss.recluster()
    codes = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    indices = torch.tensor([0, 5, 11, 19])
    assert torch.autograd.gradcheck(lambda c: loss(c, indices), (codes,))


@pytest.mark.parametrize("dense_ratio", [0, 10**6])  # the backward from gathered rows of M; from dense scores
def test_chunked_step_equals_one_chunk_in_loss_and_gradient(monkeypatch, dense_ratio):
    """At large N the step runs in blocks of bank columns (forward) and of rows (backward); no result may
    depend on the blocking, nor on which backward runs."""
    torch.manual_seed(1)
    loss = make_loss(n=60, k=12, R=2, C=6)
    loss.recluster()
    indices = torch.randperm(60)[:16]
    monkeypatch.setattr(laray.method.la, "DENSE_BACKWARD_RATIO", dense_ratio)
    results = []
    for chunk in (1 << 24, 60 * 3):  # everything at once; blocks of 13 columns and of 1 to 3 rows
        monkeypatch.setattr(laray.method.la, "STEP_CHUNK_ELEMENTS", chunk)
        codes = torch.randn(16, 8, generator=torch.Generator().manual_seed(0), requires_grad=True)
        value = loss(codes, indices)
        value.backward()
        results.append((value.item(), codes.grad))
    (whole, grad_whole), (chunked, grad_chunked) = results
    assert chunked == pytest.approx(whole, rel=1e-6)
    assert torch.allclose(grad_chunked, grad_whole, atol=1e-7)
    expected = reference_loss(codes.detach(), indices, loss.bank.vectors, loss.cluster_labels, 12, 0.1)
    assert chunked == pytest.approx(expected, rel=1e-5)


class LargestTensor(TorchDispatchMode):
    """Records the most elements of any tensor an operation makes, backward included."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


@pytest.mark.parametrize("dense_ratio", [0, 10**6])
def test_a_step_makes_nothing_the_size_of_batch_times_bank(monkeypatch, dense_ratio):
    """A step's memory must not grow with N beyond the bank: (b, N) scores exist a block at a time."""
    monkeypatch.setattr(laray.method.la, "STEP_CHUNK_ELEMENTS", 4 * 500)  # 62 columns, or 4 rows, at a time
    monkeypatch.setattr(laray.method.la, "DENSE_BACKWARD_RATIO", dense_ratio)
    loss = make_loss(n=500, d=8, k=20)
    loss.recluster()
    codes = torch.randn(32, 8, requires_grad=True)
    with LargestTensor() as probe:
        loss(codes, torch.arange(32)).backward()
    assert probe.largest <= 500 * 8  # the bank's size; a (32, 500) product would be 16,000
    assert probe.largest > 0 and codes.grad is not None and torch.isfinite(codes.grad).all()


def test_loss_never_changes_bank_or_labels():
    loss = make_loss()
    loss.recluster()
    vectors, labels = loss.bank.vectors.clone(), loss.cluster_labels.clone()
    codes = torch.randn(8, 8, requires_grad=True)
    loss(codes, torch.arange(8)).backward()
    assert torch.equal(loss.bank.vectors, vectors)
    assert torch.equal(loss.cluster_labels, labels)
    assert codes.grad is not None and codes.grad.abs().sum() > 0


def test_loss_is_finite_and_nonnegative_at_low_temperature():
    loss = make_loss(tau=1e-3)
    loss.recluster()
    value = loss(torch.randn(8, 8) * 100, torch.arange(8))
    assert torch.isfinite(value) and value >= 0


def test_update_follows_formula():
    bank = MemoryBank(10, 4, mixing_rate=0.3, seed=1)
    before = bank.vectors.clone()
    codes = torch.randn(3, 4) * 5
    indices = torch.tensor([2, 7, 9])
    bank.update(indices, codes)
    v = F.normalize(codes, dim=1)
    expected = F.normalize(0.3 * v + 0.7 * before[indices], dim=1)
    assert torch.allclose(bank.vectors[indices], expected, atol=1e-6)
    untouched = torch.tensor([0, 1, 3, 4, 5, 6, 8])
    assert torch.equal(bank.vectors[untouched], before[untouched])


def test_mixing_rate_one_replaces_rows_and_update_detaches():
    bank = MemoryBank(5, 3, mixing_rate=1.0)
    codes = torch.randn(2, 3, requires_grad=True)
    bank.update(torch.tensor([0, 4]), codes)
    assert not bank.vectors.requires_grad
    assert torch.allclose(bank.vectors[[0, 4]], F.normalize(codes.detach(), dim=1), atol=1e-6)


def test_bank_init_is_unit_and_seeded_and_fill_normalises():
    a, b, c = MemoryBank(100, 16, 0.5, seed=3), MemoryBank(100, 16, 0.5, seed=3), MemoryBank(100, 16, 0.5, seed=4)
    assert torch.allclose(a.vectors.norm(dim=1), torch.ones(100), atol=1e-6)
    assert torch.equal(a.vectors, b.vectors) and not torch.equal(a.vectors, c.vectors)
    # Roughly isotropic: the mean of uniform unit vectors is near 0.
    assert MemoryBank(20000, 8, 0.5).vectors.mean(0).abs().max() < 0.03
    codes = torch.randn(100, 16) * 3
    a.fill(codes)
    assert torch.allclose(a.vectors, F.normalize(codes, dim=1), atol=1e-6)
    with pytest.raises(ValueError, match="shape"):
        a.fill(torch.randn(99, 16))


def test_recluster_labels_shape_range_and_determinism():
    x, y = make_loss(seed=5), make_loss(seed=5)
    x.recluster()
    y.recluster()
    assert x.cluster_labels.shape == (3, 60) and x.cluster_labels.dtype == torch.long
    assert x.cluster_labels.min() >= 0 and x.cluster_labels.max() < 6
    assert torch.equal(x.cluster_labels, y.cluster_labels)
    # Each run of a reclustering, and each later reclustering, has its own seed.
    first = x.cluster_labels.clone()
    x.recluster()
    assert int(x.n_reclusters) == 2
    assert not torch.equal(first, x.cluster_labels)


def test_state_dict_round_trip():
    loss = make_loss()
    loss.recluster()
    loss.bank.update(torch.arange(4), torch.randn(4, 8))
    fresh = make_loss(seed=9)
    fresh.load_state_dict(loss.state_dict())
    assert set(loss.state_dict()) == {"bank.vectors", "cluster_labels", "n_reclusters"}
    assert torch.equal(fresh.bank.vectors, loss.bank.vectors)
    assert torch.equal(fresh.cluster_labels, loss.cluster_labels)
    codes, indices = torch.randn(4, 8), torch.arange(4)
    assert fresh(codes, indices).item() == loss(codes, indices).item()


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"k": 60}, "k_neighbours"),
        ({"k": 0}, "k_neighbours"),
        ({"C": 61}, "n_centroids"),
        ({"tau": 0.0}, "temperature"),
        ({"tau": -1.0}, "temperature"),
        ({"R": 0}, "clustering_repeats"),
        ({"m": 0.0}, "mixing_rate"),
        ({"m": 1.5}, "mixing_rate"),
    ],
)
def test_invalid_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        make_loss(**kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    loss = make_loss()
    loss.recluster()
    codes, indices = torch.randn(8, 8), torch.arange(8)
    cpu = loss(codes, indices).item()
    loss.cuda()
    assert loss(codes.cuda(), indices.cuda()).item() == pytest.approx(cpu, rel=1e-4)
