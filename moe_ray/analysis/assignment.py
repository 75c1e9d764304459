"""Exact minimum-cost assignment with a dual certificate, fast on the costs S4 meets.

S4 (`reorder.py`) solves one n×n assignment per expert pair. The costs are dense, but the optimum
lives among a few cheap entries of each row: a neuron's match is one of its best candidates (the
optimum's rank in its row, from scratch at n = 2,048: median 0, 99 % <= 11). So the
default solver ("sparse") works on a sparse candidate graph and proves the result on the dense matrix:

1. candidates (where the costs are): per row, every entry at most the q-th smallest of the minima of
   k blocks of columns, so its q or more cheapest entries, found without a sort (`torch.topk` costs
   3-4x more on a CPU), plus the diagonal, which guarantees the graph has a perfect matching;
2. solve the sparse problem exactly (scipy's `min_weight_full_bipartite_matching`, LAPJVsp);
3. duals: with the matching x (row i -> column x[i]) optimal on the graph, column duals v are
   shortest-path distances in the graph of rows where i -> y[j] costs c[i, j] - c[i, x[i]]
   (Bellman-Ford with a queue from a virtual source; no negative cycle exists when x is optimal), and
   u[i] = c[i, x[i]] - v[x[i]]: then c - u - v >= 0 on every candidate and 0 on the matching;
4. certificate on the dense matrix (where the costs are): every entry's reduced cost
   c[i, j] - u[i] - v[j] is checked (in float64 on the host; on a device in float32, the entries it
   cannot tell from <= 0 recomputed in float64). Any assignment costs at least
   sum(u) + sum(v) + sum_i min(0, min_j reduced[i, j]), so the gap bound is
   -sum_i min(0, min_j reduced[i, j]); where entries are negative they join the candidates, their
   rows are unassigned and assigned again by shortest augmenting paths from the current duals (a warm
   start: the other rows keep their matches), and only the rows whose duals moved are checked again,
   until the duals are feasible everywhere (gap bound 0 up to float64 rounding): the same certificate
   as lapjv's duals, so exactness is never traded for speed.

Many pairs at once (`solve_sparse_batch`, DeepSeek-V3's 32,640 pairs a layer at n = 2,048): the steps
that read all n² entries (1, the scales and the float32 pass of 4) run on a [B, n, n] batch as batched
torch ops where the costs are, so a GPU pays a few launches and copies for B pairs; the host's work
(2-3, the float64 checks, the repairs) runs on a thread pool, the first solves there by
`assignment_cpu.sparse_jv` (scipy's LAPJVsp holds the GIL). Each pair keeps its own certificate and
its own fallback.

"lapjv" solves the dense matrix with the Jonker-Volgenant algorithm (the `lapjv` package) and checks
its own duals the same way; it is the reference and the fallback when the repair rounds do not settle.
`SOLVER` says which one S4 uses, chosen from `benchmarks/bench_reorder.py`'s measurements.

Pure torch/numpy/scipy: no Ray, no Zarr.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import lapjv
import numpy as np
from ..lazy import torch  # torch-free importers (`moe-ray plan`) pay nothing
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import min_weight_full_bipartite_matching


SOLVERS = ("sparse", "lapjv")
SOLVER = "sparse"
"""The solver S4 uses: "sparse" measured 4-16x faster than lapjv at n = 4,096 and 14,336 on both cost
structures (from-scratch and upcycled experts), 1.4-6x at n = 1,024, same optimum, on this project's
2-core CPU (benchmarks/bench_reorder.py; benchmarks/README.md, 2026-12-06)."""
CANDIDATES = 32
"""Blocks of columns per row whose minimum is a candidate (see `segment_candidates`)."""
NEAREST = 16
"""Each row's q cheapest entries (at least) are candidates: enough that the first sparse optimum is
the dense one on upcycled costs and misses a few dozen rows from scratch, which the repairs take in."""
BACKENDS = ("auto", "torch")
"""auto: `assignment_cpu`'s kernels for costs on the host, torch ops where the costs are otherwise."""
MAX_REPAIR_ROUNDS = 8
"""Repair rounds before falling back to lapjv (measured: 1 on upcycled costs, 2-3 from scratch)."""
CHUNK_ELEMENTS = 2**24
"""Entries of the cost matrix checked at a time (64 MiB in float32)."""
CACHE_ELEMENTS = 2**18
"""Entries of one chunk of the certificate's float32 pass on a CPU: 1 MiB, which stays in L2."""


@dataclass(frozen=True)
class Solution:
    """A minimum-cost assignment and its certificate."""

    perm: np.ndarray
    """perm[i] = the column assigned to row i, int64."""
    cost: float
    """sum_i c[i, perm[i]], float64."""
    gap_bound: float
    """Upper bound on cost - optimum from dual variables checked on every entry; 0 up to rounding."""
    solver: str
    rounds: int = 0
    """Sparse solves made (the first, plus one per repair); 0 for lapjv."""
    candidates: int = 0
    """Edges of the last sparse graph."""


def _row_chunks(n_rows: int, width: int, chunk_elements: int) -> Iterator[tuple[int, int]]:
    step = max(1, chunk_elements // max(1, width))
    for start in range(0, n_rows, step):
        yield start, min(n_rows, start + step)


def _as_tensor(cost: np.ndarray | torch.Tensor, batch: bool = False) -> torch.Tensor:
    """`cost` as a tensor, checked: one square float matrix [n, n], or with `batch` several [B, n, n]."""
    tensor = torch.from_numpy(cost) if isinstance(cost, np.ndarray) else cost
    if tensor.ndim != 2 + batch or tensor.shape[-2] != tensor.shape[-1]:
        raise ValueError(f"a batch of cost matrices must be [B, n, n], not {tuple(tensor.shape)}" if batch else
                         f"the cost matrix must be square, not {tuple(tensor.shape)}")
    if not tensor.is_floating_point():
        raise ValueError(f"the cost matri{'ces' if batch else 'x'} must hold floats, not {tensor.dtype}")
    return tensor


def _host_float64(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to(device="cpu", dtype=torch.float64).numpy()


def segment_candidates(cost: torch.Tensor, k: int = CANDIDATES, q: int = NEAREST,
                       chunk_elements: int = CHUNK_ELEMENTS, backend: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) of the candidate graph, chosen where `cost` is: per row, every entry at most the
    q-th smallest of the minima of k blocks of columns (so the row's q or more cheapest entries: the
    exact top of the row, found without a sort), and the diagonal (which guarantees the graph a perfect
    matching); no duplicates. The certificate repairs what the candidates miss."""
    n = cost.shape[0]
    if _kernels(cost, backend):
        return _cpu().candidates(cost.numpy(), k, q)
    device = cost.device
    width = -(-n // min(k, n))
    full = n // width
    q = min(q, -(-n // width))
    step = max(1, min(n, chunk_elements // n))
    picked_rows, picked_cols = [], []
    for start in range(0, n, step):
        stop = min(n, start + step)
        block = cost[start:stop]
        minima = block[:, :full * width].unflatten(1, (full, width)).amin(dim=2)
        if full * width < n:  # the last, narrower block
            minima = torch.cat([minima, block[:, full * width:].amin(dim=1, keepdim=True)], dim=1)
        bar = minima.kthvalue(q, dim=1).values
        near = (block <= bar[:, None]).nonzero()
        local = torch.arange(stop - start, device=device)
        missing = local[~(block[local, local + start] <= bar)]
        picked_rows.append(torch.cat([near[:, 0], missing]).cpu() + start)
        picked_cols.append(torch.cat([near[:, 1], missing + start]).cpu())
    return torch.cat(picked_rows).numpy().astype(np.int64), torch.cat(picked_cols).numpy().astype(np.int64)


def _cpu():
    """The host kernels, imported on first use: numba's import is not free, and `moe-ray plan` (which
    imports this module through `reorder`) never solves."""
    from . import assignment_cpu

    return assignment_cpu


def _kernels(cost: torch.Tensor, backend: str) -> bool:
    """Whether the host kernels (`assignment_cpu`) run this step: on a CPU tensor that numpy can view
    without a copy, unless `backend` says "torch" (the GPU path, which tests run on the CPU too)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, not {backend!r}")
    return (backend == "auto" and cost.device.type == "cpu" and cost.is_contiguous()
            and cost.dtype in (torch.float32, torch.float64))


def _gather(cost: torch.Tensor, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """cost[rows, cols] in float64 on the host (exact: float32 widens without loss)."""
    if cost.device.type == "cpu" and cost.dtype in (torch.float32, torch.float64):
        # numpy's fancy indexing: several times faster than torch's here
        return cost.numpy()[rows, cols].astype(np.float64)
    index = (torch.from_numpy(rows).to(cost.device), torch.from_numpy(cols).to(cost.device))
    return _host_float64(cost[index])


def _sparse_optimum(n: int, rows: np.ndarray, cols: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The minimum-cost perfect matching of the candidate graph, as perm[row] = col."""
    # scipy drops explicit zeros: shift every edge by the same amount (every matching has n edges).
    shifted = values - values.min() + 1.0
    graph = csr_matrix((shifted, (rows, cols)), shape=(n, n))
    matched_rows, matched_cols = min_weight_full_bipartite_matching(graph)
    perm = np.empty(n, dtype=np.int64)
    perm[matched_rows] = matched_cols
    return perm


def _column_duals(perm: np.ndarray, rows: np.ndarray, cols: np.ndarray, values: np.ndarray) -> np.ndarray | None:
    """Column duals v that make c - u - v >= 0 on every candidate and 0 on the matching `perm`
    (u[i] = c[i, perm[i]] - v[perm[i]]), as shortest-path distances over rows: moving row i to the
    column of row y[j] costs c[i, j] - c[i, perm[i]]. Bellman-Ford with a queue from a virtual source
    at distance 0 to every row (`assignment_cpu.shortest_distances`). None if a negative cycle shows
    the matching is not optimal."""
    n = perm.size
    owner = np.empty(n, dtype=np.int64)
    owner[perm] = np.arange(n)
    matched_cost = np.empty(n)
    on_matching = cols == perm[rows]
    matched_cost[rows[on_matching]] = values[on_matching]
    src, dst = rows[~on_matching], owner[cols[~on_matching]]
    weight = values[~on_matching] - matched_cost[src]
    if np.any(src[1:] < src[:-1]):
        order = np.argsort(src, kind="stable")
        src, dst, weight = src[order], dst[order], weight[order]
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(src, minlength=n), out=indptr[1:])
    distance, settled = _cpu().shortest_distances(n, indptr, dst, weight)
    if not settled:
        return None
    duals = np.empty(n)
    duals[perm] = distance
    return duals


@dataclass(frozen=True)
class Certificate:
    rows: np.ndarray
    """The rows checked."""
    worst_per_row: np.ndarray
    """For each of `rows`, min(0, min_j c[i, j] - u[i] - v[j]), float64."""
    violations: tuple[np.ndarray, np.ndarray]
    """(rows, cols) of entries whose reduced cost is below -tolerance, most negative first."""

    @property
    def gap_bound(self) -> float:
        """Any assignment costs at least sum(u) + sum(v) + sum(worst_per_row): so much at most above
        the optimum is one that is tight on its matching (all rows checked)."""
        return max(0.0, float(-self.worst_per_row.sum()))


def cost_scale(cost: torch.Tensor) -> float:
    """max |c|: what float32 rounding in `certify` is relative to."""
    low, high = torch.aminmax(cost)
    return max(abs(float(low)), abs(float(high)))


def certify(cost: torch.Tensor, perm: np.ndarray, row_duals: np.ndarray, col_duals: np.ndarray,
            chunk_elements: int = CHUNK_ELEMENTS, max_violations: int | None = None,
            scale: float | None = None, backend: str = "auto", rows: np.ndarray | None = None,
            screened: bool = False) -> Certificate:
    """Check reduced costs c - u - v on every entry of `cost` (of `rows` only, if given), where the
    costs are: the host kernel in float64, or torch in row chunks.

    torch compares, in float32, each row's least c[i, j] - v[j] off the matching with u[i]: a row
    whose least is above u[i] by more than a few float32 ulps of the entries' scale has no negative
    reduced cost; the others (near-ties, violations: with optimal duals about half the rows have a
    tight entry beside their match) are recomputed in float64 where the costs are (the same IEEE
    operations as on the host), so the bound is exact up to float64 rounding either way. Gap bound:
    -sum_i min(0, min_j reduced[i, j]) over the rows checked (`Certificate.worst_per_row`).
    `screened`: `rows` are what a float32 pass already left (`batch_screen`), checked in float64 at once."""
    n = perm.size
    device = cost.device
    checked = np.arange(n, dtype=np.int64) if rows is None else rows.astype(np.int64)
    u64, v64 = row_duals, col_duals
    scale = (cost_scale(cost) if scale is None else scale) + float(np.abs(u64).max(initial=0)) \
        + float(np.abs(v64).max(initial=0))
    margin = scale * 2.0**-18
    tolerance = scale * 2.0**-42
    if _kernels(cost, backend):
        worst, bad_rows, bad_cols, values = _cpu().reduced_costs(cost.numpy(), checked, u64, v64, tolerance)
        return _certificate(checked, worst, bad_rows, bad_cols, values, max_violations)
    v32 = torch.from_numpy(v64).to(device=device, dtype=torch.float32)
    threshold = torch.from_numpy(u64 + margin).to(device=device, dtype=torch.float32)
    perm_device = torch.from_numpy(perm).to(device)
    checked_device = torch.from_numpy(checked).to(device)
    # on a CPU, chunks that stay in cache; on a GPU, big ones (each is a few kernel launches)
    in_cache = chunk_elements if device.type == "cuda" else min(chunk_elements, CACHE_ELEMENTS)
    step = max(1, min(n, checked.size, in_cache // max(1, n)))  # a few rows (a batch's rechecks): a small buffer
    buffer = torch.empty((step, n), dtype=torch.float32, device=device)
    near_rows = [checked] if screened else []
    for start in range(0, 0 if screened else checked.size, step):
        stop = min(checked.size, start + step)
        chosen = checked_device[start:stop]
        block = cost[chosen] if rows is not None else cost[start:stop]
        block = torch.sub(block, v32, out=buffer[:stop - start])
        block[torch.arange(stop - start, device=device), perm_device[chosen]] = torch.inf
        near = block.amin(dim=1) < threshold[chosen]
        near_rows.append(checked[near.nonzero()[:, 0].cpu().numpy() + start])
    near = np.concatenate(near_rows) if near_rows else np.zeros(0, dtype=np.int64)
    worst_per_row = np.zeros(n)
    found_rows, found_cols, found_values = [], [], []
    if near.size:  # float64 where the costs are: only the worst per row and the violations cross to the host
        u_device = torch.from_numpy(u64).to(device)
        v_device = torch.from_numpy(v64).to(device)
    for start, stop in _row_chunks(near.size, n, chunk_elements):
        chosen = torch.from_numpy(near[start:stop]).to(device)
        exact = cost[chosen].to(torch.float64)
        exact -= u_device[chosen, None]
        exact -= v_device[None, :]
        exact[torch.arange(chosen.shape[0], device=device), perm_device[chosen]] = 0.0  # 0 by construction of u
        worst_per_row[near[start:stop]] = _host_float64(exact.amin(dim=1).clamp(max=0.0))
        bad = (exact < -tolerance).nonzero()
        found_rows.append(near[start:stop][bad[:, 0].cpu().numpy()])
        found_cols.append(bad[:, 1].cpu().numpy().astype(np.int64))
        found_values.append(_host_float64(exact[bad[:, 0], bad[:, 1]]))
    bad_rows, bad_cols, values = (np.concatenate(x) if x else np.zeros(0, dtype=dtype)
                                  for x, dtype in ((found_rows, np.int64), (found_cols, np.int64),
                                                   (found_values, float)))
    return _certificate(checked, worst_per_row[checked], bad_rows, bad_cols, values, max_violations)


def _certificate(checked: np.ndarray, worst: np.ndarray, rows: np.ndarray, cols: np.ndarray, values: np.ndarray,
                 max_violations: int | None) -> Certificate:
    if max_violations is not None and values.size > max_violations:
        keep = np.argpartition(values, max_violations)[:max_violations]
        rows, cols, values = rows[keep], cols[keep], values[keep]
    order = np.argsort(values, kind="stable")
    return Certificate(checked, worst, (rows[order], cols[order]))


def solve_lapjv(cost: np.ndarray | torch.Tensor, chunk_elements: int = CHUNK_ELEMENTS) -> Solution:
    """Jonker-Volgenant on the dense matrix (host), certified with its own duals."""
    tensor = _as_tensor(cost)
    host = tensor.detach().cpu().numpy()
    if host.dtype not in (np.float32, np.float64):
        host = host.astype(np.float32)
    n = host.shape[0]
    if n == 0:
        return Solution(np.zeros(0, dtype=np.int64), 0.0, 0.0, "lapjv")
    row_to_col, _, (_, _, v) = lapjv.lapjv(host)
    perm = np.asarray(row_to_col, dtype=np.int64)
    matched = host[np.arange(n), perm].astype(np.float64)
    col_duals = np.asarray(v, dtype=np.float64)
    row_duals = matched - col_duals[perm]  # lapjv's u made tight on the matching: fewer rounding steps
    certificate = certify(torch.from_numpy(host), perm, row_duals, col_duals, chunk_elements, max_violations=0)
    return Solution(perm, float(matched.sum()), certificate.gap_bound, "lapjv")


def solve_sparse(cost: np.ndarray | torch.Tensor, k: int = CANDIDATES, q: int = NEAREST,
                 chunk_elements: int = CHUNK_ELEMENTS, max_rounds: int = MAX_REPAIR_ROUNDS,
                 backend: str = "auto", threaded: bool = False) -> Solution:
    """Candidates, sparse optimum, duals, dense certificate, repairs (see the module doc);
    falls back to `solve_lapjv` if `max_rounds` sparse solves leave a violated entry. `threaded`: the
    first sparse solve by `assignment_cpu.sparse_jv`, which runs without the GIL (for solves on
    several threads at once, `solve_sparse_batch`), instead of scipy's, which holds it."""
    tensor = _as_tensor(cost)
    n = tensor.shape[0]
    if n == 0:
        return Solution(np.zeros(0, dtype=np.int64), 0.0, 0.0, "sparse")
    rows, cols = segment_candidates(tensor, k, q, chunk_elements, backend)
    values = _gather(tensor, rows, cols)
    first = _first_solve(n, rows, cols, values, threaded)
    return _certified(tensor, rows, cols, values, cost_scale(tensor), first, None, chunk_elements, max_rounds,
                      backend)


def _first_solve(n: int, rows: np.ndarray, cols: np.ndarray, values: np.ndarray,
                 threaded: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """The sparse optimum and its column duals (None where they show it is not optimal, or the graph
    has no perfect matching): scipy's LAPJVsp and Bellman-Ford, or with `threaded` the GIL-free
    `assignment_cpu.sparse_jv` (same optimum, measured as fast at n = 2,048)."""
    if not threaded:
        perm = _sparse_optimum(n, rows, cols, values)
        return perm, _column_duals(perm, rows, cols, values)
    order = np.argsort(rows, kind="stable")
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=n), out=indptr[1:])
    perm, col_duals, settled = _cpu().sparse_jv(indptr, cols[order], values[order])
    return perm, col_duals if settled else None


def _certified(tensor: torch.Tensor, rows: np.ndarray, cols: np.ndarray, values: np.ndarray, scale: float,
               first: tuple[np.ndarray, np.ndarray | None], screened: np.ndarray | None, chunk_elements: int,
               max_rounds: int, backend: str) -> Solution:
    """From the first sparse optimum and its duals: the dense certificate and the repair rounds, or
    lapjv. `screened`: the rows the first certificate checks, where a batched check (`solve_sparse_batch`)
    has already proved every other row's reduced costs >= 0 (None: all rows)."""
    n = tensor.shape[0]
    perm, col_duals = first
    rounds = 1
    worst_per_row = np.zeros(n)
    recheck = screened  # None: all rows
    while col_duals is not None and rounds <= max_rounds:
        matched = _gather(tensor, np.arange(n), perm)
        row_duals = matched - col_duals[perm]
        certificate = certify(tensor, perm, row_duals, col_duals, chunk_elements, max(n, rows.size), scale,
                              backend, recheck, screened=screened is not None and rounds == 1)
        worst_per_row[certificate.rows] = certificate.worst_per_row
        new_rows, new_cols = certificate.violations
        if new_rows.size == 0:
            gap = max(0.0, float(-worst_per_row.sum()))
            return Solution(perm, float(matched.sum()), gap, "sparse", rounds, rows.size)
        rows, cols = np.concatenate([rows, new_rows]), np.concatenate([cols, new_cols])
        values = np.concatenate([values, _gather(tensor, new_rows, new_cols)])
        # Warm start: the rows that gained a cheaper edge are unassigned and re-augmented with the
        # current duals; every other row keeps its match, which stays tight. Duals only fall, so a
        # row's reduced costs can only fall where its own u rose: its matched column's dual moved.
        free_rows = np.unique(new_rows)
        moved = np.zeros(n, dtype=bool)
        if not _reaugment(n, rows, cols, values, perm, matched, col_duals, free_rows, moved):
            break
        recheck = np.union1d(free_rows, np.flatnonzero(moved[perm]))
        rounds += 1
    fallback = solve_lapjv(tensor, chunk_elements)
    return Solution(fallback.perm, fallback.cost, fallback.gap_bound, "lapjv", rounds, rows.size)


def _reaugment(n: int, rows: np.ndarray, cols: np.ndarray, values: np.ndarray, perm: np.ndarray,
               matched: np.ndarray, col_duals: np.ndarray, free_rows: np.ndarray, moved: np.ndarray) -> bool:
    """Unassign `free_rows` and assign them again by shortest augmenting paths on the candidate graph
    (`assignment_cpu.augment`), updating perm, matched and col_duals in place."""
    order = np.argsort(rows, kind="stable")
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=n), out=indptr[1:])
    perm[free_rows] = -1
    owner = np.full(n, -1, dtype=np.int64)
    assigned = np.flatnonzero(perm >= 0)
    owner[perm[assigned]] = assigned
    return _cpu().augment(indptr, cols[order], values[order], perm, owner, matched, col_duals,
                                  free_rows.astype(np.int64), moved)


# ---- many pairs at once ------------------------------------------------------------------------------

def _split_by_pair(pair: np.ndarray, count: int, *columns: np.ndarray) -> list[tuple[np.ndarray, ...]]:
    """Rows of (pair, columns...) as one tuple of columns per pair 0..count-1."""
    order = np.argsort(pair, kind="stable")
    bounds = np.zeros(count + 1, dtype=np.int64)
    np.cumsum(np.bincount(pair, minlength=count), out=bounds[1:])
    ordered = [c[order] for c in columns]
    return [tuple(c[bounds[b]:bounds[b + 1]] for c in ordered) for b in range(count)]


def batch_candidates(costs: torch.Tensor, k: int = CANDIDATES, q: int = NEAREST,
                     chunk_elements: int = CHUNK_ELEMENTS) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """`segment_candidates` of every matrix of a batch [B, n, n] at once, as torch ops where the costs
    are (on a GPU: a few kernel launches and one copy to the host for the whole batch, not per pair),
    with their values: per pair (rows, cols, float64 values)."""
    count, n = costs.shape[0], costs.shape[1]
    width = -(-n // min(k, n))
    full = n // width
    q = min(q, -(-n // width))
    step = max(1, min(n, chunk_elements // max(1, count * n)))
    found: list[torch.Tensor] = []
    found_values: list[torch.Tensor] = []
    for start in range(0, n, step):
        stop = min(n, start + step)
        block = costs[:, start:stop]
        minima = block[:, :, :full * width].unflatten(2, (full, width)).amin(dim=3)
        if full * width < n:  # the last, narrower block
            minima = torch.cat([minima, block[:, :, full * width:].amin(dim=2, keepdim=True)], dim=2)
        bar = minima.kthvalue(q, dim=2).values
        near = (block <= bar[..., None]).nonzero()
        local = torch.arange(stop - start, device=costs.device)
        missing = (~(block[:, local, local + start] <= bar)).nonzero()  # diagonals above the bar
        pair = torch.cat([near[:, 0], missing[:, 0]])
        row = torch.cat([near[:, 1], missing[:, 1]])
        col = torch.cat([near[:, 2], missing[:, 1] + start])
        found_values.append(block[pair, row, col].to(torch.float64).cpu())
        found.append(torch.stack([pair, row + start, col]).cpu())
    index = torch.cat(found, dim=1).numpy().astype(np.int64)
    values = torch.cat(found_values).numpy()
    return _split_by_pair(index[0], count, index[1], index[2], values)


def batch_scales(costs: torch.Tensor) -> np.ndarray:
    """`cost_scale` of every matrix of a batch, in one reduction."""
    flat = costs.reshape(costs.shape[0], -1)
    low, high = flat.amin(dim=1), flat.amax(dim=1)  # torch.aminmax along a dim: 13x slower on a CPU
    return np.maximum(np.abs(_host_float64(low)), np.abs(_host_float64(high)))


def batch_screen(costs: torch.Tensor, perms: Sequence[np.ndarray], col_duals: Sequence[np.ndarray | None],
                 scales: np.ndarray, chunk_elements: int = CHUNK_ELEMENTS) -> list[np.ndarray | None]:
    """The float32 pass of `certify` for a whole batch at once, where the costs are: per pair, the rows
    whose least c[i, j] - v[j] off the matching is not clearly above u[i] (the same margin as `certify`),
    which `certify` then checks in float64; every other row's reduced costs are >= 0. None for a pair
    without duals."""
    count, n = costs.shape[0], costs.shape[1]
    device = costs.device
    matched = torch.gather(costs, 2, torch.from_numpy(np.stack(perms)).to(device)[:, :, None])[:, :, 0]
    matched = _host_float64(matched)
    v64 = np.zeros((count, n))
    threshold = np.full((count, n), -np.inf)  # a pair without duals: no row is near
    for b in range(count):
        if col_duals[b] is None:
            continue
        v64[b] = col_duals[b]
        u64 = matched[b] - v64[b][perms[b]]
        scale = scales[b] + float(np.abs(u64).max(initial=0)) + float(np.abs(v64[b]).max(initial=0))
        threshold[b] = u64 + scale * 2.0**-18
    v32 = torch.from_numpy(v64).to(device=device, dtype=torch.float32)
    threshold32 = torch.from_numpy(threshold).to(device=device, dtype=torch.float32)
    perm_device = torch.from_numpy(np.stack(perms)).to(device)
    in_cache = chunk_elements if device.type == "cuda" else min(chunk_elements, CACHE_ELEMENTS)
    step = max(1, min(n, in_cache // max(1, count * n)))
    buffer = torch.empty((count, step, n), dtype=torch.float32, device=device)
    near = []
    for start in range(0, n, step):
        stop = min(n, start + step)
        block = torch.sub(costs[:, start:stop], v32[:, None, :], out=buffer[:, :stop - start])
        block.scatter_(2, perm_device[:, start:stop, None], torch.inf)
        hit = (block.amin(dim=2) < threshold32[:, start:stop]).nonzero()
        near.append((hit + torch.tensor([0, start], device=device)).cpu())
    hits = torch.cat(near).numpy().astype(np.int64)
    rows = _split_by_pair(hits[:, 0], count, hits[:, 1])
    return [None if col_duals[b] is None else rows[b][0] for b in range(count)]


def solve_sparse_batch(costs: np.ndarray | torch.Tensor, workers: int = 1, k: int = CANDIDATES,
                       q: int = NEAREST, chunk_elements: int = CHUNK_ELEMENTS,
                       max_rounds: int = MAX_REPAIR_ROUNDS, backend: str = "auto") -> list[Solution]:
    """`solve_sparse` of every matrix of a batch [B, n, n] (numpy, or a torch tensor on any device),
    each exact with its own certificate and its own lapjv fallback.

    Where the costs are, the steps that touch all n² entries run for the whole batch at once as torch
    ops (candidates with their values, scales, the certificate's float32 pass: on a GPU a few kernel
    launches and copies for B pairs instead of per pair); the host's work (the sparse solves, the
    float64 checks of the rows the screen left, the repairs) runs on `workers` threads, the first solves
    by the GIL-free `assignment_cpu.sparse_jv` when there are several. Costs on the host (the numba
    kernels, `backend` "auto") are solved pair by pair on the threads, each pair's whole solve at once."""
    tensor = _as_tensor(costs, batch=True)
    count, n = tensor.shape[0], tensor.shape[1]
    if count == 0:
        return []
    threaded = workers > 1
    with ThreadPoolExecutor(max_workers=max(1, min(workers, count)), thread_name_prefix="solve") as pool:
        if n == 0 or _kernels(tensor[0], backend):
            return list(pool.map(lambda b: solve_sparse(tensor[b], k, q, chunk_elements, max_rounds, backend,
                                                        threaded), range(count)))
        graphs = batch_candidates(tensor, k, q, chunk_elements)
        scales = batch_scales(tensor)
        firsts = list(pool.map(lambda graph: _first_solve(n, *graph, threaded), graphs))
        perms = [perm if duals is not None else np.arange(n) for perm, duals in firsts]  # no duals: lapjv's
        screened = batch_screen(tensor, perms, [duals for _, duals in firsts], scales, chunk_elements)
        return list(pool.map(lambda b: _certified(tensor[b], *graphs[b], float(scales[b]), firsts[b], screened[b],
                                                  chunk_elements, max_rounds, backend), range(count)))


def workspace_bytes(n: int, q: int = NEAREST) -> int:
    """Host memory of one solve beside the costs: the candidate graph (about q + 8 edges a row, each
    held as row, column and value, in a few copies: CSR, scipy's, the repairs') and O(n) vectors."""
    return n * (q + 8) * 8 * 3 * 4 + 64 * n


def solve_min(cost: np.ndarray | torch.Tensor, solver: str = SOLVER, chunk_elements: int = CHUNK_ELEMENTS) -> Solution:
    """The minimum-cost assignment of a square cost matrix (numpy, or a torch tensor on any device),
    exact and certified, by `solver` (one of SOLVERS; the default is this module's choice)."""
    if solver == "sparse":
        return solve_sparse(cost, chunk_elements=chunk_elements)
    if solver == "lapjv":
        return solve_lapjv(cost, chunk_elements)
    raise ValueError(f"solver must be one of {SOLVERS}, not {solver!r}")
