"""S4 neuron reordering (paper §4.1.2, Tab 2): align expert b's neurons with expert a's.

A neuron k of an expert is (W_up[k, :], W_gate[k, :], W_down[:, k]). Reordering b's neurons by a
permutation P changes the flattened cosine between the experts' matrices:

    cos(W_a^m, W_b^m P) = sum_k <a^m_k, b^m_{P[k]}> / (||W_a^m||_F ||W_b^m||_F)

so maximising it is a linear assignment on the neuron similarity matrix
S^m = W_a^m (W_b^m)ᵀ / (||W_a^m||_F ||W_b^m||_F)  (rows of up/gate, columns of down).

- mode `separate` (the paper): one assignment per matrix m, on S^m;
- mode `joint`: one permutation for the whole neuron, on S = sum_m S^m, which maximises the sum of
  the three flattened cosines and keeps the expert's function (the same P for up, gate and down).

The assignment is solved exactly on the cost max(S) - S (non-negative, so minimising it maximises
S) by `assignment.solve_min`: a sparse solve on each row's best candidates, proved optimal on the
whole matrix by dual variables (u, v) whose reduced costs c - u - v are checked on every entry
(lapjv, the reference, where that does not settle). The returned assignment is within `gap_bound`
of the optimum total similarity, which the results record.

Conventions: `perm[k]` is the neuron of b matched to neuron k of a, so `W_b[perm]` (rows of
up/gate, columns of down) lines up with `W_a`. Kendall's tau is between the identity order and
`perm` (1 = order unchanged).

Where it runs: S is built with torch where the experts are (a GPU when the caller has one, where it
stays; on a CPU in row chunks into a host buffer). `reorder_pairs` takes several pairs of one layer,
prepares each expert once (float32 neuron rows divided by the matrix norm), builds and solves them a
batch at a time (`batch_size`; `assignment.solve_sparse_batch`) and, with `overlap`, builds the next
batch while the current one is solved on a second thread.

Pure torch/numpy: no Ray, no Zarr.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from ..lazy import torch  # imported on first use (moe-ray plan needs none)

from .. import estimate
from . import assignment
from .summary import relative_growth

MATRICES = ("up", "gate", "down")
MODES = ("joint", "separate")
CHUNK_ELEMENTS = 2**24
"""Elements of one chunk of the cost matrix computed at a time (64 MiB in float32)."""

Neurons = dict[str, "torch.Tensor"]
"""One expert prepared for S4: per matrix, its neuron rows [n, d_hid] in float32 divided by the
matrix's Frobenius norm, contiguous, on the device that builds the costs (see `prepare_expert`)."""


def neuron_rows(matrix: torch.Tensor, name: str) -> torch.Tensor:
    """The neurons of one expert matrix as rows [d_mid, d_hid]: rows of up/gate, columns of down."""
    return matrix.T if name == "down" else matrix


def _row_steps(n: int, width: int, chunk_elements: int) -> Iterator[tuple[int, int]]:
    step = max(1, chunk_elements // max(1, width))
    for start in range(0, n, step):
        yield start, min(n, start + step)


def prepare_expert(expert: Mapping[str, torch.Tensor], matrices: Sequence[str],
                   device: str | torch.device = "cpu", chunk_elements: int = CHUNK_ELEMENTS) -> Neurons:
    """An expert's matrices (any float dtype, any device) as `Neurons` on `device`: one float32 copy
    per matrix, its norm accumulated in float64 block by block (no float64 copy)."""
    out: Neurons = {}
    for m in matrices:
        rows = neuron_rows(expert[m].to(device=device), m)
        prepared = torch.empty(rows.shape, dtype=torch.float32, device=device)
        prepared.copy_(rows)
        square = torch.zeros((), dtype=torch.float64, device=device)
        for start, stop in _row_steps(prepared.shape[0], prepared.shape[1], chunk_elements):
            block = prepared[start:stop]
            square += (block * block).sum(dtype=torch.float64)
        norm = float(square.sqrt())
        if norm > 0:
            prepared.mul_(1.0 / norm)
        out[m] = prepared
    return out


def build_similarity(out: torch.Tensor, a: Neurons, b: Neurons, matrices: Sequence[str],
                     chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """Fill `out` (float32 [n, n], on the host or the device) with S = sum over `matrices` of
    A^m (B^m)ᵀ, computed in row chunks where `a` and `b` are (a GPU where the caller has one) and
    copied chunk by chunk. float32 is exact enough here: entries are
    cosines' summands in [-3, 3] and the solver's dual certificate reports any loss of optimality."""
    first, rest = matrices[0], matrices[1:]
    n = a[first].shape[0]
    for start, stop in _row_steps(n, n, chunk_elements):
        block = a[first][start:stop] @ b[first].T
        for m in rest:
            block.addmm_(a[m][start:stop], b[m].T)
        out[start:stop].copy_(block)
    return out


def similarity_matrix(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor],
                      matrices: tuple[str, ...], device: str | torch.device = "cpu",
                      chunk_elements: int = CHUNK_ELEMENTS) -> np.ndarray:
    """S = sum over `matrices` of W_a^m (W_b^m)ᵀ / (||W_a^m||_F ||W_b^m||_F), as float32 [n, n] on
    the host, built on `device`."""
    pa, pb = (prepare_expert(x, matrices, device, chunk_elements) for x in (a, b))
    n = pa[matrices[0]].shape[0]
    return build_similarity(torch.empty((n, n), dtype=torch.float32), pa, pb, matrices, chunk_elements).numpy()


def paired_cosine(a: torch.Tensor, b: torch.Tensor, perm: torch.Tensor,
                  chunk_elements: int = CHUNK_ELEMENTS) -> float:
    """sum_k <a[k], b[perm[k]]> over prepared (norm-divided) neuron rows: the flattened cosine between
    two expert matrices with b's neurons reordered by `perm`, accumulated in float64 block by block."""
    total = torch.zeros((), dtype=torch.float64, device=a.device)
    for start, stop in _row_steps(a.shape[0], a.shape[1], chunk_elements):
        total += (a[start:stop] * b[perm[start:stop]]).sum(dtype=torch.float64)
    return float(total)


@dataclass(frozen=True)
class Assignment:
    """An exact maximum-similarity assignment and its certificate."""

    perm: np.ndarray
    """perm[k] = column (neuron of b) assigned to row k (neuron of a), int64."""
    total: float
    """sum_k S[k, perm[k]] (float64)."""
    gap_bound: float
    """Upper bound on (optimal total - total) from the solver's dual variables; 0 up to rounding."""


def solve_max(similarity: np.ndarray | torch.Tensor, chunk_elements: int = CHUNK_ELEMENTS,
              solver: str = assignment.SOLVER) -> Assignment:
    """Maximise sum_k S[k, perm[k]] over permutations exactly (`assignment.solve_min`, by default
    its measured choice of solver), with a certificate from dual variables checked on every entry.

    `similarity` (float32 or float64, square; numpy, or a torch tensor on any device) is overwritten
    with the cost max(S) - S to avoid a second n×n buffer.
    """
    cost = torch.from_numpy(similarity) if isinstance(similarity, np.ndarray) else similarity
    if cost.ndim != 2 or cost.shape[0] != cost.shape[1]:
        raise ValueError(f"the similarity matrix must be square, not {tuple(cost.shape)}")
    n = cost.shape[0]
    peak = float(cost.max()) if n else 0.0
    cost.neg_().add_(peak)  # max(S) - S in place (negation is exact: the same rounding)
    solution = assignment.solve_min(cost, solver, chunk_elements)
    return Assignment(solution.perm, n * peak - solution.cost, solution.gap_bound)


def solve_max_batch(similarities: torch.Tensor, workers: int = 1,
                    chunk_elements: int = CHUNK_ELEMENTS) -> list[Assignment]:
    """`solve_max` of every matrix of a batch [B, n, n] at once (`assignment.solve_sparse_batch`: the
    n² steps batched where the costs are, the host's work on `workers` threads); overwritten likewise
    with the costs max(S) - S, each with its own max."""
    count, n = similarities.shape[0], similarities.shape[-1]
    if count == 0:
        return []
    peaks = similarities.reshape(count, -1).amax(dim=1) if n else torch.zeros(count)
    similarities.neg_().add_(peaks[:, None, None])
    peaks = peaks.to(device="cpu", dtype=torch.float64).numpy()
    solutions = assignment.solve_sparse_batch(similarities, workers, chunk_elements=chunk_elements)
    return [Assignment(s.perm, n * float(p) - s.cost, s.gap_bound) for s, p in zip(solutions, peaks)]


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
    build_seconds: float = 0.0
    """Wall time building S (on the device, copied to the host)."""
    solve_seconds: float = 0.0
    """Wall time of the solve and the certificate on the host."""

    @property
    def growth(self) -> dict[str, float]:
        """The relative growth (after - before) / |before| per matrix, whose median over layers and pairs
        is the paper's Tab 2 "order of growth" (see `analysis.summary`)."""
        return {m: relative_growth(self.similarity_before[m], self.similarity_after[m]) for m in self.similarity_after}


def _check_matrices(matrices: Sequence[str]) -> None:
    unknown = [m for m in matrices if m not in MATRICES]
    if unknown or not matrices:
        raise ValueError(f"matrices must be among {MATRICES}, not {tuple(matrices)}")


def _timed_solve(similarities: torch.Tensor, workers: int, chunk_elements: int) -> tuple[list[Assignment], float]:
    started = time.perf_counter()
    return solve_max_batch(similarities, workers, chunk_elements), time.perf_counter() - started


def _pair_result(a: Neurons, b: Neurons, matrices: tuple[str, ...], solved: tuple[Assignment, float],
                 build_seconds: float, chunk_elements: int) -> PairResult:
    """Similarity before and after reordering b, per matrix, computed where the neurons are."""
    assignment, solve_seconds = solved
    device = a[matrices[0]].device
    n = a[matrices[0]].shape[0]
    identity = torch.arange(n, device=device)
    perm = torch.as_tensor(assignment.perm, device=device)
    before = {m: paired_cosine(a[m], b[m], identity, chunk_elements) for m in matrices}
    after = {m: paired_cosine(a[m], b[m], perm, chunk_elements) for m in matrices}
    return PairResult(tuple(matrices), assignment.perm, before, after, kendall_tau(assignment.perm),
                      assignment.gap_bound, build_seconds, solve_seconds)


Problem = tuple[int, int, tuple[str, ...]]
"""One assignment of a batch: experts (i, j) of a layer and the matrices it is solved on (joint: all
three; separate: one)."""


def reorder_pairs(load: Callable[[int], Mapping[str, torch.Tensor]], problems: Sequence[Problem],
                  device: str | torch.device = "cpu", overlap: bool = False,
                  chunk_elements: int = CHUNK_ELEMENTS, batch: int = 1,
                  workers: int = 1) -> Iterator[tuple[Problem, PairResult]]:
    """S4 for several assignments among one layer's experts, yielding (problem, result) in order.

    `load(e)` returns expert e's matrices (any float dtype, at least those the problems name); each
    expert is loaded and prepared on `device` once, and dropped after the last problem that uses it.
    The problems are built and solved `batch` at a time (`solve_max_batch`: the n² steps of the solver
    batched on the device, the host's work on `workers` threads; `batch_size` says how many).
    With `overlap`, a batch is solved on a host thread (lapjv, scipy and numba's kernels release the
    GIL) while `device` builds the next batch's similarities into a second buffer: on a GPU the build
    then hides behind the solve; on the CPU both compete for the task's cores, so overlap pays only with
    more than one.
    """
    problems = list(problems)
    if not problems:
        return
    needed = {m for *_, ms in problems for m in ms}
    _check_matrices(tuple(needed))
    matrices = tuple(m for m in MATRICES if m in needed)
    last_use = {e: k for k, (i, j, _) in enumerate(problems) for e in (i, j)}
    experts: dict[int, Neurons] = {}
    buffers: list[torch.Tensor] = []
    batch = max(1, min(batch, len(problems)))
    groups = [range(start, min(len(problems), start + batch)) for start in range(0, len(problems), batch)]
    # On a GPU the costs stay there: the solver picks candidates and checks its certificate on the
    # device, and only O(n) vectors cross to the host.
    on_device = torch.device(device).type == "cuda"

    def neurons(e: int) -> Neurons:
        if e not in experts:
            experts[e] = prepare_expert(load(e), matrices, device, chunk_elements)
        return experts[e]

    def buffer(g: int, n: int) -> torch.Tensor:
        while len(buffers) < (2 if overlap and len(groups) > 1 else 1):
            buffers.append(torch.empty((batch, n, n), dtype=torch.float32, device=device if on_device else "cpu"))
        return buffers[g % len(buffers)]

    def build(g: int) -> tuple[torch.Tensor, list[tuple[Neurons, Neurons]], float]:
        started = time.perf_counter()
        pairs = []
        for slot, k in enumerate(groups[g]):
            i, j, ms = problems[k]
            a, b = neurons(i), neurons(j)
            costs = buffer(g, a[ms[0]].shape[0])
            build_similarity(costs[slot], a, b, ms, chunk_elements)
            pairs.append((a, b))
        return costs[:len(groups[g])], pairs, time.perf_counter() - started

    def finish(g: int, job: Future | tuple, pairs: list[tuple[Neurons, Neurons]],
               built: float) -> list[tuple[Problem, PairResult]]:
        solved, seconds = job.result() if isinstance(job, Future) else job
        count = len(groups[g])
        out = []
        for k, (a, b), one in zip(groups[g], pairs, solved):
            out.append((problems[k], _pair_result(a, b, problems[k][2], (one, seconds / count), built / count,
                                                  chunk_elements)))
            for e in problems[k][:2]:
                if last_use[e] == k:
                    experts.pop(e, None)
        return out

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="assignment") as solver:
        pending = None
        for g in range(len(groups)):
            costs, pairs, built = build(g)
            if not overlap:
                yield from finish(g, _timed_solve(costs, workers, chunk_elements), pairs, built)
                continue
            done = finish(*pending) if pending is not None else []  # solved while this batch was built
            pending = (g, solver.submit(_timed_solve, costs, workers, chunk_elements), pairs, built)
            yield from done
        if pending is not None:
            yield from finish(*pending)


def reorder_pair(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], matrices: tuple[str, ...],
                 device: str | torch.device = "cpu", chunk_elements: int = CHUNK_ELEMENTS) -> PairResult:
    """S4 for experts a, b: the permutation of b's neurons that maximises the summed flattened
    cosine over `matrices` with a's (all three: joint mode; one: separate mode), and the flattened
    similarity of each of those matrices before and after reordering b."""
    experts = {0: a, 1: b}
    ((_, result),) = reorder_pairs(experts.__getitem__, [(0, 1, tuple(matrices))], device,
                                   chunk_elements=chunk_elements)
    return result


def expert_bytes(n: int, d_hid: int, n_matrices: int = len(MATRICES)) -> int:
    """One prepared expert (`Neurons`): its matrices in float32."""
    return n_matrices * n * d_hid * 4


def _chunk_rows(n: int, width: int, chunk_elements: int) -> int:
    """Rows of one chunk of a [n, width] computation (`_row_steps`)."""
    return min(n, max(1, chunk_elements // max(1, width)))


def memory_bytes(n: int, d_hid: int, n_matrices: int = len(MATRICES), experts_held: int = 2,
                 overlap: bool = False, on_host: bool = True, stored_bytes: int = 2,
                 chunk_elements: int = CHUNK_ELEMENTS, batch: int = 1, workers: int = 1) -> int:
    """Peak host memory of one `reorder_pairs` task at n neurons and hidden size d_hid, beside the
    worker process itself, solving `batch` assignments at once on `workers` threads.

    The batch's n×n float32 cost buffers (two batches with `overlap`; on a GPU they stay there, and a
    copy per thread is kept should the solver fall back to lapjv, which solves float32 on the host),
    one expert's matrices as read (memory-mapped, `stored_bytes` per element), a float64 chunk of the
    certificate per thread and the solver's O(n·candidates) workspace per pair of the batch; when
    the experts are prepared on the host (`on_host`) also the prepared experts (at most `experts_held`
    at once), the chunk being built and the two temporaries of the before/after cosines.
    """
    matrices = (2 if overlap else 1) * batch if on_host else min(batch, workers)  # a GPU's: lapjv's copies
    cost = matrices * 4 * n * n
    reading = n_matrices * n * d_hid * stored_bytes
    certificate = min(batch, workers) * _chunk_rows(n, n, chunk_elements) * n * 8
    host = cost + reading + certificate + batch * assignment.workspace_bytes(n)
    if on_host:
        host += experts_held * expert_bytes(n, d_hid, n_matrices) + _working_chunks(n, d_hid, chunk_elements)
    return host


def _working_chunks(n: int, d_hid: int, chunk_elements: int) -> int:
    """The chunk of S being built and the before/after cosines' two temporaries, float32."""
    return _chunk_rows(n, n, chunk_elements) * n * 4 + 2 * _chunk_rows(n, d_hid, chunk_elements) * d_hid * 4


def device_memory_bytes(n: int, d_hid: int, n_matrices: int = len(MATRICES), experts_held: int = 2,
                        stored_bytes: int = 2, chunk_elements: int = CHUNK_ELEMENTS, batch: int = 1,
                        workers: int = 1) -> int:
    """Peak memory on a GPU of one `reorder_pairs` task solving `batch` assignments at once on `workers`
    threads: the prepared experts, one expert arriving in its stored dtype, two batches of n×n float32
    costs (the one solved and, with overlap, the one being built), the solver's batched chunks (its
    float32 screen, the candidates' comparison and their indices), a float64 chunk of the certificate
    per thread, the chunk being built and the before/after cosines' temporaries (torch's allocator;
    the CUDA context comes on top, see `units.sizing`)."""
    weights = experts_held * expert_bytes(n, d_hid, n_matrices)
    reading = n_matrices * n * d_hid * stored_bytes
    costs = 2 * batch * 4 * n * n
    solver = chunk_elements * (4 + 1) + batch * n * (assignment.NEAREST + 8) * 8 * 4 \
        + min(batch, workers) * _chunk_rows(n, n, chunk_elements) * n * 8
    return weights + reading + costs + solver + _working_chunks(n, d_hid, chunk_elements)


# ---- batching: several pairs of a layer per task ---------------------------------------------------

TARGET_TASK_SECONDS = 60.0
"""What a batch of pairs aims at: long enough that a task's start (worker, imports, reading its
experts) is small beside it, short enough that retries and the last tasks stay cheap."""
EXPERTS_BUDGET_BYTES = 8 * 2**30
"""Prepared experts one task may hold at once (host on CPU, GPU memory on cuda)."""


def pair_seconds(n: int, d_hid: int, n_matrices: int, device: str, cpus: float = 1) -> float:
    """Estimated seconds of one assignment: the build on `device` (cuda, or cpu on `cpus` cores) plus the
    certified solve on a host core, from the measured rates `moe-ray plan` quotes (`estimate.RATES`,
    each with its source: one place for them)."""
    build, solve = estimate.assignment_seconds(n, d_hid, n_matrices, device == "cuda")
    return (build if device == "cuda" else build / max(1.0, cpus)) + solve


def pairs_per_task(n: int, d_hid: int, mode: str, device: str, cpus: float = 1,
                   requested: int | None = None) -> int:
    """How many expert pairs of one layer a task takes: `requested`, else as many as fill
    TARGET_TASK_SECONDS by `pair_seconds` (separate mode solves three assignments per pair), capped
    so that the experts a batch reads fit EXPERTS_BUDGET_BYTES."""
    if requested is not None:
        return max(1, requested)
    per_pair = pair_seconds(n, d_hid, len(MATRICES), device, cpus)
    if mode == "separate":
        per_pair = 3 * pair_seconds(n, d_hid, 1, device, cpus)
    k = max(1, int(TARGET_TASK_SECONDS // per_pair))
    side = max(1, EXPERTS_BUDGET_BYTES // (2 * expert_bytes(n, d_hid)))  # a tile's batch reads 2 sides
    return min(k, side * side)


def tile_side(per_task: int) -> int:
    """The side t of the square tiles of the pair triangle that batches take: t * t <= per_task pairs."""
    return max(1, math.isqrt(per_task))


def tile_batches(pairs: Sequence[tuple[int, int]], side: int) -> list[list[tuple[int, int]]]:
    """The pairs (i, j) grouped by their tile (i // side, j // side) of the pair triangle, tile by
    tile: a batch holds at most side * side pairs and reads at most 2 * side experts (side on the
    diagonal), not 2 per pair, and no pair of one tile lands in another's batch."""
    tiles: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for i, j in sorted(pairs):
        tiles.setdefault((i // side, j // side), []).append((i, j))
    return [tiles[tile] for tile in sorted(tiles)]


BATCH_BYTES = 512 * 2**20
"""The n×n float32 costs of one batch (`batch_size`) on a GPU at most: 32 pairs at DeepSeek-V3's
n = 2,048; one pair from n = 11,586 up."""
BATCH_MAX = 32
"""Assignments of one batch at most on a GPU: enough that launches and copies are a small part of a
pair's time at n = 2,048 (benchmarks/gpu_check.sh measures)."""


def batch_size(n: int, problems: int, device: str, cpus: float = 1) -> int:
    """How many of a task's `problems` assignments `reorder_pairs` builds and solves at once: on a GPU as
    many as BATCH_MAX and BATCH_BYTES allow (the batched steps then cost a few launches for all); on a
    CPU one per core the task declared (the host kernels solve pair by pair, a batch only feeds the
    threads). At least one. The task's declared memory (`memory_bytes`, `device_memory_bytes`) counts
    these buffers, and the task runs with the same number."""
    if device == "cuda":
        most = min(BATCH_MAX, BATCH_BYTES // max(1, 4 * n * n))
    else:
        most = int(cpus)
    return max(1, min(problems, most))
