"""Local Aggregation: memory bank and loss (Zhuang, Zhai, Yamins 2019, arXiv:1903.12355).

Notation as in the paper and docs/method.md: v_i the unit code of image i, M the
memory bank (N, d), B_i the background neighbours, C_i the close neighbours,
tau the temperature. Both classes are nn.Modules whose state (bank vectors,
cluster labels, reclustering count) are buffers, so a state_dict checkpoints them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from laray.method.clustering import kmeans

# Elements of the scores (or gathered bank rows) that one block of a step holds, forward or backward:
# 16 MiB in float32, so that a step's memory stays bounded whatever N (the bank itself grows with N).
STEP_CHUNK_ELEMENTS = 1 << 22
# The backward scatters into dense (rows, N) scores while N <= this many times 1 + k (see _BackgroundScores).
DENSE_BACKWARD_RATIO = 64


def _normalize_rows_(x: torch.Tensor) -> torch.Tensor:
    """F.normalize(x, dim=1) in place: at N = 276,000 a copy of the bank is another 141 MB."""
    return x.div_(x.norm(dim=1, keepdim=True).clamp_min_(1e-12))


class MemoryBank(nn.Module):
    """N unit vectors of dimension d, one per image, updated as a running mix.

    update: M[i] <- normalize(m * v_i + (1 - m) * M[i]) with v_i the detached unit code.
    """

    def __init__(self, n_vectors: int, dim: int, mixing_rate: float, seed: int = 0, device=None):
        super().__init__()
        if n_vectors < 1:
            raise ValueError(f"n_vectors must be >= 1, got {n_vectors}")
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if not 0 < mixing_rate <= 1:
            raise ValueError(f"mixing_rate must be in (0, 1], got {mixing_rate}")
        self.mixing_rate = mixing_rate
        # Uniform on the sphere: normalised Gaussian rows (Marsaglia 1972).
        gen = torch.Generator().manual_seed(seed)
        vectors = torch.randn(n_vectors, dim, generator=gen)
        self.register_buffer("vectors", _normalize_rows_(vectors).to(device))  # (N, d)

    @torch.no_grad()
    def fill(self, codes: torch.Tensor) -> None:
        """Set every row from the codes of the whole data set, in index order."""
        if codes.shape != self.vectors.shape:
            raise ValueError(f"codes must have shape {tuple(self.vectors.shape)}, got {tuple(codes.shape)}")
        _normalize_rows_(self.vectors.copy_(codes))

    @torch.no_grad()
    def update(self, indices: torch.Tensor, codes: torch.Tensor) -> None:
        m = self.mixing_rate
        v = F.normalize(codes.detach().to(self.vectors), dim=1)  # (b, d)
        indices = indices.to(self.vectors.device)
        mixed = m * v + (1 - m) * self.vectors[indices]  # (b, d)
        self.vectors[indices] = F.normalize(mixed, dim=1)


class LocalAggregationLoss(nn.Module):
    """Local Aggregation loss over a memory bank.

    l_i = log sum_{j in B_i} exp(v_i.M_j / tau) - log sum_{j in B_i & C_i} exp(v_i.M_j / tau)

    B_i = {i} + the k_neighbours entries j != i of M closest to v_i; C_i = the entries
    sharing a cluster with i in any of the R k-means runs of the last `recluster()`.
    Calling the loss never changes the bank; gradients flow only through the codes.
    """

    def __init__(
        self,
        bank: MemoryBank,
        temperature: float,
        k_neighbours: int,
        clustering_repeats: int,
        n_centroids: int,
        seed: int = 0,
        kmeans_max_iter: int = 20,
    ):
        super().__init__()
        n = len(bank.vectors)
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not 1 <= k_neighbours <= n - 1:
            raise ValueError(f"k_neighbours must be in [1, N-1 = {n - 1}], got {k_neighbours}")
        if clustering_repeats < 1:
            raise ValueError(f"clustering_repeats must be >= 1, got {clustering_repeats}")
        if not 1 <= n_centroids <= n:
            raise ValueError(f"n_centroids must be in [1, N = {n}], got {n_centroids}")
        self.bank = bank
        self.tau = temperature
        self.k = k_neighbours
        self.R = clustering_repeats
        self.C = n_centroids
        self.seed = seed
        # The bank moves every step and the R runs are merged anyway, so cheap runs are
        # enough: random init (k-means++ seeding costs more than 20 Lloyd iterations at
        # N = 5,400, C = 100) and 20 iterations or convergence, which on 50,000 random
        # unit vectors ends within 0.01% of the converged inertia.
        self.kmeans_max_iter = kmeans_max_iter
        # Until the first recluster(), every entry is its own cluster: C_i = {i}.
        labels = torch.arange(n, device=bank.vectors.device).expand(clustering_repeats, n).clone()
        self.register_buffer("cluster_labels", labels)  # (R, N)
        self.register_buffer("n_reclusters", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def recluster(self) -> None:
        """Run the R k-means repeats on the bank, each with its own seed, and keep the labels (R, N)."""
        t = int(self.n_reclusters)
        for r in range(self.R):
            seed = self.seed * 1_000_003 + t * self.R + r
            self.cluster_labels[r] = kmeans(
                self.bank.vectors, self.C, seed=seed, init="random", max_iter=self.kmeans_max_iter
            ).labels
        self.n_reclusters += 1

    def forward(self, codes: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        M = self.bank.vectors  # (N, d)
        indices = indices.to(M.device)
        v = F.normalize(codes.to(M.dtype), dim=1)  # (b, d)
        logits, B = _BackgroundScores.apply(v, M, indices, self.k)  # (b, 1+k) v_i.M_j for j in B_i, self first
        # Close-set membership of each background entry: same cluster in some run r.
        L = self.cluster_labels  # (R, N)
        close = (L[:, B] == L[:, indices][:, :, None]).any(0)  # (b, 1+k); column 0 always True
        logits = logits / self.tau
        log_B = torch.logsumexp(logits, dim=1)  # (b,)
        log_BC = torch.logsumexp(logits.masked_fill(~close, float("-inf")), dim=1)  # (b,)
        return (log_B - log_BC).mean()


class _BackgroundScores(torch.autograd.Function):
    """(v_i.M_j for j in B_i, B) with B_i = {i} + the k entries j != i of M closest to v_i.

    Forward: the (b, N) scores one block of bank columns at a time, each block's top k merged
    into a running top k, so that M is read once and a step's memory is bounded whatever N
    (autograd through a plain `v @ M.T` keeps a (b, N) product and makes a (b, N) gradient,
    twice the bank's size at b = 256, d = 128). Backward: d(v_i.M_j)/dv_i = M_j, from the
    (rows, 1+k, d) chosen rows of M; while N <= DENSE_BACKWARD_RATIO (1 + k), a dense (rows, N)
    scatter times M costs less on the CPU (gathering rows is slow there) and is used instead.
    Its time and memory against plain autograd: benchmarks/step_memory.py (docs/benchmarks.md).
    """

    @staticmethod
    def forward(ctx, v, M, indices, k):
        b, n = len(v), len(M)
        own = v.new_empty(b)
        top, top_j = v.new_empty(b, 0), indices.new_empty(b, 0)
        cols = min(n, max(k + 1, STEP_CHUNK_ELEMENTS // max(b, 1)))  # the first block holds k entries besides i
        buffer = v.new_empty(b * cols)  # one for every block: see laray.method.clustering._assign on glibc's heap
        for start in range(0, n, cols):
            width = min(cols, n - start)
            sims = torch.mm(v, M[start : start + width].T, out=buffer[: b * width].view(b, width))  # (b, width)
            here = ((indices >= start) & (indices < start + width)).nonzero().flatten()
            own[here] = sims[here, indices[here] - start]
            sims[here, indices[here] - start] = float("-inf")  # the neighbours are other entries
            scores, cols_j = sims.topk(min(k, width), dim=1, sorted=False)  # order is not needed
            top, top_j = torch.cat([top, scores], 1), torch.cat([top_j, cols_j + start], 1)
            if top.shape[1] > k:
                top, pick = top.topk(k, dim=1, sorted=False)
                top_j = top_j.gather(1, pick)
        scores = torch.cat([own[:, None], top], 1)
        B = torch.cat([indices[:, None], top_j], 1)
        ctx.save_for_backward(M, B)  # M is the bank itself, not a copy; it changes only after backward
        ctx.mark_non_differentiable(B)
        return scores, B

    @staticmethod
    def backward(ctx, grad_scores, _grad_B):
        M, B = ctx.saved_tensors
        (n, d), width = M.shape, B.shape[1]
        grad_v = torch.empty(len(B), d, dtype=grad_scores.dtype, device=grad_scores.device)
        dense = n <= DENSE_BACKWARD_RATIO * width
        per_row = n if dense else width * d
        rows = min(len(B), max(1, STEP_CHUNK_ELEMENTS // per_row))
        buffer = M.new_empty(rows * per_row)  # one for every chunk of rows, as in forward
        for start in range(0, len(B), rows):
            part = slice(start, min(start + rows, len(B)))
            size = part.stop - start
            if dense:  # the chosen gradients scattered into (rows, N) scores, times M
                grad = buffer[: size * n].view(size, n).zero_().scatter_(1, B[part], grad_scores[part])
                torch.mm(grad, M, out=grad_v[part])
            else:  # the chosen gradients times the chosen rows of M, (rows, 1+k, d)
                chosen = torch.index_select(M, 0, B[part].flatten(), out=buffer[: size * per_row].view(-1, d))
                torch.bmm(grad_scores[part, None, :], chosen.view(size, width, d), out=grad_v[part, None, :])
        return grad_v, None, None, None
