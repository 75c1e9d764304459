"""S4 neuron reordering (paper §4.1.2, Tab 2): align expert b's neurons with expert a's.

A neuron k of an expert is (W_up[k, :], W_gate[k, :], W_down[:, k]). Reordering b's neurons by a
permutation P changes the flattened cosine between the experts' matrices:

    cos(W_a^m, W_b^m P) = sum_k <a^m_k, b^m_{P[k]}> / (||W_a^m||_F ||W_b^m||_F)

so maximising it is a linear assignment on the neuron similarity matrix
S^m = W_a^m (W_b^m)ᵀ / (||W_a^m||_F ||W_b^m||_F)  (rows of up/gate, columns of down).

- mode `separate` (the paper): one assignment per matrix m, on S^m;
- mode `joint`: one permutation for the whole neuron, on S = sum_m S^m, which maximises the sum of
  the three flattened cosines and keeps the expert's function (the same P for up, gate and down).

The assignment is solved exactly with the Jonker-Volgenant algorithm (`lapjv`) on the cost
max(S) - S (non-negative, so minimising it maximises S). lapjv also returns dual variables
(u, v); the reduced costs c - u - v certify optimality: the returned assignment is within
`gap_bound` of the optimum total similarity, which the results record.

Conventions: `perm[k]` is the neuron of b matched to neuron k of a, so `W_b[perm]` (rows of
up/gate, columns of down) lines up with `W_a`. Kendall's tau is between the identity order and
`perm` (1 = order unchanged).

Pure torch/numpy: no Ray, no Zarr.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import lapjv
import numpy as np
import torch

from .summary import relative_growth

MATRICES = ("up", "gate", "down")
MODES = ("joint", "separate")
CHUNK_ELEMENTS = 2**24
"""Elements of one chunk of the cost matrix computed at a time (64 MiB in float32)."""


def neuron_rows(matrix: torch.Tensor, name: str) -> torch.Tensor:
    """The neurons of one expert matrix as rows [d_mid, d_hid]: rows of up/gate, columns of down."""
    return matrix.T if name == "down" else matrix


def permute_neurons(matrix: torch.Tensor, name: str, perm: np.ndarray) -> torch.Tensor:
    """`matrix` with its neurons reordered: neuron k of the result is neuron perm[k] of the input."""
    index = torch.as_tensor(np.asarray(perm, dtype=np.int64))
    return matrix[:, index] if name == "down" else matrix[index]


def flat_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity between two matrices flattened to vectors (float64)."""
    a64, b64 = a.double().reshape(-1), b.double().reshape(-1)
    denom = float(a64.norm() * b64.norm())
    return float(a64 @ b64) / denom if denom > 0 else float("nan")


def similarity_matrix(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor],
                      matrices: tuple[str, ...], device: str | torch.device = "cpu",
                      chunk_elements: int = CHUNK_ELEMENTS) -> np.ndarray:
    """S = sum over `matrices` of W_a^m (W_b^m)ᵀ / (||W_a^m||_F ||W_b^m||_F), as float32 [n, n].

    Built with torch in row chunks (on `device`, a GPU where the caller has one), accumulated in
    float32 on the device and copied chunk by chunk into one host array, so the only n×n buffer is
    the result itself. float32 is exact enough here: entries are cosines' summands in [-3, 3] and
    the solver's dual certificate reports any loss of optimality.
    """
    n = neuron_rows(a[matrices[0]], matrices[0]).shape[0]
    out = np.empty((n, n), dtype=np.float32)
    rows_a, rows_b = [], []
    for m in matrices:
        ra = neuron_rows(a[m], m).to(device=device, dtype=torch.float32)
        rb = neuron_rows(b[m], m).to(device=device, dtype=torch.float32)
        scale = 1.0 / float(ra.double().norm() * rb.double().norm())
        rows_a.append(ra * scale)
        rows_b.append(rb.contiguous())
    step = max(1, chunk_elements // n)
    for start in range(0, n, step):
        stop = min(n, start + step)
        block = rows_a[0][start:stop] @ rows_b[0].T
        for ra, rb in zip(rows_a[1:], rows_b[1:]):
            block.addmm_(ra[start:stop], rb.T)
        out[start:stop] = block.cpu().numpy()
    return out


@dataclass(frozen=True)
class Assignment:
    """An exact maximum-similarity assignment and its certificate."""

    perm: np.ndarray
    """perm[k] = column (neuron of b) assigned to row k (neuron of a), int64."""
    total: float
    """sum_k S[k, perm[k]] (float64)."""
    gap_bound: float
    """Upper bound on (optimal total - total) from lapjv's dual variables; 0 up to rounding."""


def solve_max(similarity: np.ndarray, chunk_elements: int = CHUNK_ELEMENTS) -> Assignment:
    """Maximise sum_k S[k, perm[k]] over permutations exactly (Jonker-Volgenant, `lapjv`).

    `similarity` (float32 or float64, square) is overwritten with the cost max(S) - S to avoid a
    second n×n buffer. The certificate: with row and column duals u, v from lapjv, every feasible
    assignment costs at least sum(u) + sum(v) + n·min(0, min(c - u - v)), so the returned
    assignment's cost minus that bound is an upper bound on its distance from the optimum.
    """
    n = similarity.shape[0]
    if similarity.ndim != 2 or similarity.shape[1] != n:
        raise ValueError(f"the similarity matrix must be square, not {similarity.shape}")
    cost = similarity
    peak = float(cost.max())
    np.subtract(peak, cost, out=cost)
    row_to_col, _, (_, u, v) = lapjv.lapjv(cost)
    perm = np.asarray(row_to_col, dtype=np.int64)
    u64, v64 = np.asarray(u, dtype=np.float64), np.asarray(v, dtype=np.float64)
    step = max(1, chunk_elements // n)
    min_reduced = 0.0
    for start in range(0, n, step):
        stop = min(n, start + step)
        reduced = cost[start:stop].astype(np.float64) - u64[start:stop, None] - v64[None, :]
        min_reduced = min(min_reduced, float(reduced.min()))
    chosen = cost[np.arange(n), perm].astype(np.float64)
    primal = float(chosen.sum())
    dual = float(u64.sum() + v64.sum()) + n * min_reduced
    total = n * peak - primal
    return Assignment(perm, total, max(0.0, primal - dual))


def kendall_tau(perm: np.ndarray) -> float:
    """Kendall's tau between the identity order and `perm` (no ties): 1 - 4·inversions / (n(n-1)).

    Inversions are counted by a bottom-up merge sort, vectorised per level with numpy
    (O(n log² n)), so n = 32,768 takes milliseconds.
    """
    values = np.asarray(perm, dtype=np.int64)
    n = values.size
    if n < 2:
        return float("nan")
    size = 1 << (n - 1).bit_length()
    # Padding with ever larger values at the end adds no inversion.
    blocks = np.concatenate([values, np.arange(n, n + size - n, dtype=np.int64) + values.max() + 1])
    inversions = 0
    width = 1
    while width < size:
        pairs = blocks.reshape(-1, 2, width)
        left, right = pairs[:, 0, :], pairs[:, 1, :]
        offset = (np.arange(pairs.shape[0], dtype=np.int64) * (2 * size + 2))[:, None]
        # For every right element r: the count of left elements of its own block greater than r.
        below = np.searchsorted((left + offset).ravel(), (right + offset).ravel(), side="right")
        block_start = (np.arange(pairs.shape[0]) * width)[:, None]
        inversions += int((width - (below.reshape(right.shape) - block_start)).sum())
        blocks = np.sort(pairs.reshape(-1, 2 * width), axis=1).ravel()
        width *= 2
    return 1.0 - 4.0 * inversions / (n * (n - 1))


@dataclass(frozen=True)
class PairResult:
    """S4 for one expert pair (a, b) and one assignment (all three matrices, or one)."""

    matrices: tuple[str, ...]
    """The matrices the assignment was solved on (joint: all three; separate: one)."""
    perm: np.ndarray
    similarity_before: dict[str, float]
    similarity_after: dict[str, float]
    kendall_tau: float
    gap_bound: float

    @property
    def growth(self) -> dict[str, float]:
        """The relative growth (after - before) / |before| per matrix, whose median over layers and pairs
        is the paper's Tab 2 "order of growth" (see `analysis.summary`)."""
        return {m: relative_growth(self.similarity_before[m], self.similarity_after[m]) for m in self.similarity_after}


def reorder_pair(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], matrices: tuple[str, ...],
                 device: str | torch.device = "cpu", chunk_elements: int = CHUNK_ELEMENTS) -> PairResult:
    """S4 for experts a, b: the permutation of b's neurons that maximises the summed flattened
    cosine over `matrices` with a's (all three: joint mode; one: separate mode), and the flattened
    similarity of each of those matrices before and after reordering b."""
    unknown = [m for m in matrices if m not in MATRICES]
    if unknown or not matrices:
        raise ValueError(f"matrices must be among {MATRICES}, not {matrices}")
    sim = similarity_matrix(a, b, matrices, device, chunk_elements)
    assignment = solve_max(sim, chunk_elements)
    del sim
    before = {m: flat_cosine(a[m], b[m]) for m in matrices}
    after = {m: flat_cosine(a[m], permute_neurons(b[m], m, assignment.perm)) for m in matrices}
    return PairResult(tuple(matrices), assignment.perm, before, after, kendall_tau(assignment.perm),
                      assignment.gap_bound)


def memory_bytes(n: int, d_hid: int, n_matrices: int = len(MATRICES),
                 chunk_elements: int = CHUNK_ELEMENTS) -> int:
    """Peak host memory of one `reorder_pair` at n neurons and hidden size d_hid.

    Twice the n×n float32 cost (benchmarks/bench_reorder.py measures the peak growing by about
    1.7 × n²·4 bytes per pair: lapjv holds a copy of the cost while it solves), lapjv's O(n) workspace, the two experts'
    `n_matrices` matrices in float32 plus their row copies, one float64 certificate chunk and one torch
    chunk, and 256 MiB for the interpreter and libraries.
    """
    cost = 2 * 4 * n * n
    weights = 2 * 2 * n_matrices * n * d_hid * 4
    chunks = 2 * chunk_elements * 8 + 4 * chunk_elements
    solver = 64 * n
    return cost + weights + chunks + solver + 256 * 2**20
