"""The exact assignment solvers of S4 (analysis/assignment.py): optimal against scipy on the cost
structures S4 meets, the certificate's bound on a hand-computed case, the repair rounds, the lapjv
fallback, and the torch path (the one a GPU runs) against the host kernels."""
from __future__ import annotations

import lapjv
import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from moe_ray.analysis import assignment as A


def _costs(kind: str, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "scratch":  # independent experts: random-like costs
        cost = rng.standard_normal((n, n))
    elif kind == "upcycled":  # a permuted noisy copy: one cheap entry per row and column
        cost = 0.3 * rng.standard_normal((n, n)) - np.eye(n)[rng.permutation(n)]
    elif kind == "ties":  # whole blocks of equal entries: many optima
        cost = np.repeat(np.repeat(rng.integers(0, 3, (n // 4, n // 4)), 4, axis=0), 4, axis=1).astype(float)
    else:
        raise ValueError(kind)
    return (cost - cost.min()).astype(np.float32)


def _optimum(cost: np.ndarray) -> float:
    rows, cols = linear_sum_assignment(cost.astype(np.float64))
    return float(cost.astype(np.float64)[rows, cols].sum())


@pytest.mark.parametrize("backend", A.BACKENDS)
@pytest.mark.parametrize("kind, n", [("scratch", 1), ("scratch", 2), ("scratch", 37), ("scratch", 300),
                                     ("upcycled", 300), ("ties", 64)])
def test_sparse_is_optimal_and_certified(kind, n, backend):
    cost = _costs(kind, n, seed=n)
    solution = A.solve_sparse(cost, backend=backend)
    assert sorted(solution.perm.tolist()) == list(range(n))
    assert solution.solver == "sparse"
    exact = float(cost.astype(np.float64)[np.arange(n), solution.perm].sum())
    assert solution.cost == pytest.approx(exact, abs=1e-9)
    assert solution.cost == pytest.approx(_optimum(cost), abs=1e-9 * max(1.0, exact))
    assert 0.0 <= solution.gap_bound <= 1e-9 * max(1.0, exact)


@pytest.mark.parametrize("backend", A.BACKENDS)
def test_few_candidates_are_repaired_to_the_optimum(backend):
    """One block minimum per row (k = q = 1: the row's least entry and the diagonal) misses much of
    the optimum on random costs; the certificate finds the negative reduced costs, the warm-started
    augmentations take them in, and the result is the optimum, proved."""
    cost = _costs("scratch", 200, seed=3)
    solution = A.solve_sparse(cost, k=1, q=1, backend=backend)
    assert solution.solver == "sparse" and solution.rounds > 1
    assert solution.candidates < 200 * 200 // 2  # it grew from 2 a row, well short of the dense matrix
    assert solution.cost == pytest.approx(_optimum(cost), abs=1e-9)
    assert solution.gap_bound <= 1e-9


def test_lapjv_fallback_when_repairs_run_out():
    cost = _costs("scratch", 120, seed=4)
    solution = A.solve_sparse(cost, k=1, q=1, max_rounds=0)
    assert solution.solver == "lapjv"
    assert solution.cost == pytest.approx(_optimum(cost), abs=1e-9)
    reference = A.solve_lapjv(cost)
    np.testing.assert_array_equal(solution.perm, reference.perm)


@pytest.mark.parametrize("backend", A.BACKENDS)
def test_certificate_bounds_a_wrong_assignment_by_its_distance(backend):
    """costs [[0, 1], [1, 0]] with the swap (cost 2, optimum 0) and duals tight on it (v = 0,
    u = 1): every diagonal entry has reduced cost -1, so the bound is 2, the true distance, and both
    diagonal entries are reported as violations."""
    cost = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    perm = np.array([1, 0])
    certificate = A.certify(cost, perm, np.ones(2), np.zeros(2), backend=backend)
    assert certificate.gap_bound == 2.0
    assert sorted(zip(*(x.tolist() for x in certificate.violations))) == [(0, 0), (1, 1)]
    tight = A.certify(cost, np.array([0, 1]), np.zeros(2), np.zeros(2), backend=backend)
    assert tight.gap_bound == 0.0 and tight.violations[0].size == 0


def test_host_kernels_and_torch_pick_the_same_candidates():
    cost = torch.from_numpy(_costs("scratch", 150, seed=5))
    host = A.segment_candidates(cost, k=8, q=3)
    device = A.segment_candidates(cost, k=8, q=3, backend="torch")
    as_set = lambda pair: set(zip(*(x.tolist() for x in pair)))  # noqa: E731
    assert as_set(host) == as_set(device)
    assert len(as_set(host)) == host[0].size  # no duplicates
    # every row: its 3 cheapest entries and the diagonal
    cheapest = np.argsort(cost.numpy(), axis=1)[:, :3]
    assert all((i, int(j)) in as_set(host) for i in range(150) for j in cheapest[i])
    assert all((i, i) in as_set(host) for i in range(150))


def test_solve_min_rejects_bad_input():
    with pytest.raises(ValueError, match="square"):
        A.solve_min(np.zeros((3, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="solver must be one of"):
        A.solve_min(np.zeros((3, 3), dtype=np.float32), solver="hungarian")


# ---- many pairs at once -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def batch_costs() -> np.ndarray:
    """Six pairs' costs at n = 300: from-scratch and upcycled (permuted noisy copies), alternating."""
    return np.stack([_costs("scratch" if b % 2 else "upcycled", 300, seed=10 + b) for b in range(6)])


@pytest.mark.parametrize("backend, workers", [("auto", 1), ("auto", 3), ("torch", 1), ("torch", 3)])
def test_batch_equals_one_at_a_time(batch_costs, backend, workers):
    """Each pair of a batch gets what `solve_sparse` gives it alone (perm and cost), is the optimum
    (scipy), and carries its own certificate; several workers take the GIL-free first solve."""
    alone = [A.solve_sparse(c) for c in batch_costs]
    batched = A.solve_sparse_batch(batch_costs, workers=workers, backend=backend)
    assert len(batched) == len(alone)
    for cost, one, solution in zip(batch_costs, alone, batched):
        np.testing.assert_array_equal(solution.perm, one.perm)
        assert solution.cost == pytest.approx(one.cost, abs=1e-9)
        assert solution.cost == pytest.approx(_optimum(cost), abs=1e-9 * solution.cost)
        assert solution.solver == "sparse" and 0.0 <= solution.gap_bound <= 1e-9 * solution.cost


@pytest.mark.parametrize("backend", A.BACKENDS)
def test_batch_pairs_needing_repairs_end_certified(batch_costs, backend):
    """k = q = 1 (the row's least entry and the diagonal): from-scratch pairs of the batch need repair
    rounds; each pair ends at its optimum with its own certificate, and with no rounds left each falls
    back to lapjv on its own."""
    solutions = A.solve_sparse_batch(batch_costs, workers=2, k=1, q=1, max_rounds=50, backend=backend)
    assert all(s.rounds > 1 for s in solutions[1::2])
    for cost, solution in zip(batch_costs, solutions):
        assert solution.solver == "sparse"
        assert solution.cost == pytest.approx(_optimum(cost), abs=1e-9 * solution.cost)
        assert solution.gap_bound <= 1e-9 * solution.cost
    fallen = A.solve_sparse_batch(batch_costs[1::2], workers=2, k=1, q=1, max_rounds=0, backend=backend)
    assert [s.solver for s in fallen] == ["lapjv"] * 3
    for cost, solution in zip(batch_costs[1::2], fallen):
        np.testing.assert_array_equal(solution.perm, A.solve_lapjv(cost).perm)


def test_batch_candidates_and_screen_match_the_single_pair_steps(batch_costs):
    """The batched torch steps pick each pair's candidates as `segment_candidates` does, and the screen
    leaves for float64 exactly the rows whose float32 margin `certify` could not clear (planted: a dual
    raised on one row makes that row's reduced costs negative)."""
    tensor = torch.from_numpy(batch_costs)
    graphs = A.batch_candidates(tensor, k=8, q=3)
    as_set = lambda rows, cols: set(zip(rows.tolist(), cols.tolist()))  # noqa: E731
    for b, (rows, cols, values) in enumerate(graphs):
        assert as_set(rows, cols) == as_set(*A.segment_candidates(tensor[b], k=8, q=3))
        np.testing.assert_array_equal(values, batch_costs[b][rows, cols].astype(np.float64))
    np.testing.assert_allclose(A.batch_scales(tensor), [A.cost_scale(t) for t in tensor])
    lap = [A.solve_lapjv(c) for c in batch_costs[:2]]
    duals = []
    for cost in batch_costs[:2]:
        _, _, (_, _, v) = lapjv.lapjv(cost.copy())
        duals.append(np.asarray(v, dtype=np.float64))
    duals[1] = duals[1].copy()
    duals[1][lap[1].perm[7]] -= 1.0  # row 7's u rises by 1: its other entries go negative
    near = A.batch_screen(tensor[:2], [s.perm for s in lap], duals, A.batch_scales(tensor[:2]))
    assert 7 in near[1].tolist() and near[0].size < 300 and near[1].size < 300
    worst = A.certify(tensor[1], lap[1].perm, batch_costs[1][np.arange(300), lap[1].perm] - duals[1][lap[1].perm],
                      duals[1])
    assert set(np.flatnonzero(worst.worst_per_row < 0).tolist()) <= set(near[1].tolist())


def test_sparse_jv_is_optimal_with_duals_that_prove_it():
    """The GIL-free sparse solve (the threads' first solve): on a sparse graph (each row's 5 cheapest
    entries and the diagonal, one row with its diagonal alone) the optimum scipy finds on the same
    graph, and column duals with c - u - v >= 0 on every edge and 0 on the matching."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import min_weight_full_bipartite_matching

    from moe_ray.analysis import assignment_cpu

    n = 120
    cost = _costs("scratch", n, seed=9).astype(np.float64)
    keep = np.zeros((n, n), dtype=bool)
    keep[np.arange(n)[:, None], np.argsort(cost, axis=1)[:, :5]] = True
    keep[np.arange(n), np.arange(n)] = True
    keep[17] = False
    keep[17, 17] = True
    rows, cols = np.nonzero(keep)
    values = cost[rows, cols]
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=n), out=indptr[1:])
    perm, col_duals, settled = assignment_cpu.sparse_jv(indptr, cols, values)
    assert settled and sorted(perm.tolist()) == list(range(n)) and perm[17] == 17
    graph = csr_matrix((values + 1.0, (rows, cols)), shape=(n, n))
    reference = min_weight_full_bipartite_matching(graph)[1]
    assert cost[np.arange(n), perm].sum() == pytest.approx(cost[np.arange(n), reference].sum(), abs=1e-9)
    row_duals = cost[np.arange(n), perm] - col_duals[perm]
    reduced = values - row_duals[rows] - col_duals[cols]
    assert reduced.min() >= -1e-12


def test_batch_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\[B, n, n\]"):
        A.solve_sparse_batch(np.zeros((3, 3), dtype=np.float32))
    assert A.solve_sparse_batch(np.zeros((0, 4, 4), dtype=np.float32)) == []
