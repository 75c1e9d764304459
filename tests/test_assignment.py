"""The exact assignment solvers of S4 (analysis/assignment.py): optimal against scipy on the cost
structures S4 meets, the certificate's bound on a hand-computed case, the repair rounds, the lapjv
fallback, and the torch path (the one a GPU runs) against the host kernels."""
from __future__ import annotations

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
