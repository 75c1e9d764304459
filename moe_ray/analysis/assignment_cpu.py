"""The host kernels of `assignment.py`, compiled with numba: each touches the n×n costs once or twice
in cache-sized pieces (a row at a time), which torch and numpy on a CPU cannot (their broadcast
compares, `topk` and `nonzero` are several passes, 3-20x slower here). On a GPU `assignment.py`
runs the same steps as torch ops where the costs are; the two are tested against each other.

Compiled on first use and cached beside this file (`cache=True`): the first call in a fresh
environment takes a few seconds. `nogil`: a solve on one thread lets another build the next costs.
"""
from __future__ import annotations

import heapq

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def _qth_smallest(values: np.ndarray, q: int, smallest: np.ndarray) -> float:
    """The q-th smallest of a few values by insertion into a sorted buffer of q (np.partition would
    do, but takes numba 15 s to compile)."""
    count = 0
    for value in values:
        if count == q and value >= smallest[q - 1]:
            continue
        k = min(count, q - 1)
        while k > 0 and smallest[k - 1] > value:
            smallest[k] = smallest[k - 1]
            k -= 1
        smallest[k] = value
        count = min(count + 1, q)
    return smallest[q - 1]


@numba.njit(cache=True, nogil=True)
def candidates(cost: np.ndarray, k: int, q: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) of the candidate graph: per row, every entry at most the q-th smallest of the
    minima of k blocks of columns (so its q or more cheapest entries), and the diagonal."""
    n = cost.shape[0]
    width = (n + k - 1) // k
    blocks = (n + width - 1) // width
    q = min(q, blocks)
    minima = np.empty(blocks, dtype=cost.dtype)
    smallest = np.empty(q, dtype=cost.dtype)
    capacity = max(16, n * (q + 4))
    rows = np.empty(capacity, dtype=np.int64)
    cols = np.empty(capacity, dtype=np.int64)
    count = 0
    for i in range(n):
        row = cost[i]
        for b in range(blocks):
            low = b * width
            high = min(n, low + width)
            least = row[low]
            for j in range(low + 1, high):
                least = min(least, row[j])
            minima[b] = least
        bar = _qth_smallest(minima, q, smallest)
        if count + n + 1 > capacity:
            capacity = max(2 * capacity, count + n + 1)
            grown_rows = np.empty(capacity, dtype=np.int64)
            grown_cols = np.empty(capacity, dtype=np.int64)
            grown_rows[:count] = rows[:count]
            grown_cols[:count] = cols[:count]
            rows, cols = grown_rows, grown_cols
        for j in range(n):
            if row[j] <= bar:
                rows[count] = i
                cols[count] = j
                count += 1
        if not row[i] <= bar:
            rows[count] = i
            cols[count] = i
            count += 1
    return rows[:count], cols[:count]


@numba.njit(cache=True, nogil=True)
def shortest_distances(n: int, indptr: np.ndarray, dst: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, bool]:
    """Shortest distances from a virtual source at distance 0 to every node, over edges in CSR form
    by source (negative weights allowed): Bellman-Ford with a queue of the nodes whose distance fell
    (SPFA), which relaxes only their edges; False if a node falls n times (a negative cycle)."""
    distance = np.zeros(n)
    queued = np.ones(n, dtype=np.bool_)
    falls = np.zeros(n, dtype=np.int64)
    queue = np.arange(n)
    head, size = 0, n
    while size:
        node = queue[head]
        head = (head + 1) % n
        size -= 1
        queued[node] = False
        for e in range(indptr[node], indptr[node + 1]):
            other = dst[e]
            through = distance[node] + weight[e]
            if through < distance[other]:
                distance[other] = through
                if not queued[other]:
                    falls[other] += 1
                    if falls[other] > n:
                        return distance, False
                    queue[(head + size) % n] = other
                    size += 1
                    queued[other] = True
    return distance, True


@numba.njit(cache=True, nogil=True, fastmath=True)
def _row_least(row: np.ndarray, col_duals: np.ndarray) -> float:
    least = np.float64(row[0]) - col_duals[0]  # not inf: fastmath assumes no infinities
    for j in range(1, row.size):
        least = min(least, np.float64(row[j]) - col_duals[j])
    return least


@numba.njit(cache=True, nogil=True)
def reduced_costs(cost: np.ndarray, rows: np.ndarray, row_duals: np.ndarray, col_duals: np.ndarray,
                  tolerance: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For each of `rows`, min(0, min_j c[i, j] - u[i] - v[j]) in float64, and (rows, cols, values)
    of the entries below -tolerance."""
    n = cost.shape[1]
    worst = np.zeros(rows.size)
    found_rows, found_cols, found_values = [], [], []
    for k in range(rows.size):
        i = rows[k]
        row = cost[i]
        least = _row_least(row, col_duals) - row_duals[i]
        worst[k] = min(0.0, least)
        if least < -tolerance:
            for j in range(n):
                reduced = (np.float64(row[j]) - col_duals[j]) - row_duals[i]
                if reduced < -tolerance:
                    found_rows.append(i)
                    found_cols.append(j)
                    found_values.append(reduced)
    return (worst, np.array(found_rows, dtype=np.int64), np.array(found_cols, dtype=np.int64),
            np.array(found_values, dtype=np.float64))


@numba.njit(cache=True, nogil=True)
def augment(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, row_to_col: np.ndarray,
            col_to_row: np.ndarray, matched_cost: np.ndarray, col_duals: np.ndarray,
            free_rows: np.ndarray, moved: np.ndarray) -> bool:
    """Assign each of `free_rows` by a shortest augmenting path (Dijkstra on reduced costs over the
    sparse graph in CSR form), updating the matching and the column duals in place: the successive
    shortest path method, warm-started from a matching and duals already optimal for the other rows
    (every edge of an assigned row i has c - u[i] - v >= 0 with u[i] = matched_cost[i] - v[row_to_col[i]]).
    `moved[col]` is set for each column scanned (whose dual, or owner, may have changed). False if a
    row has no augmenting path (no perfect matching)."""
    n = col_duals.size
    distance = np.full(n, np.inf)
    parent = np.full(n, -1, dtype=np.int64)
    parent_cost = np.zeros(n)
    done = np.zeros(n, dtype=np.bool_)
    for row in free_rows:
        least = np.inf
        for e in range(indptr[row], indptr[row + 1]):
            least = min(least, data[e] - col_duals[indices[e]])
        touched = []
        heap = [(0.0, np.int64(-1))]
        heap.pop()
        for e in range(indptr[row], indptr[row + 1]):
            col = indices[e]
            reduced = data[e] - col_duals[col] - least
            if reduced < distance[col]:
                if distance[col] == np.inf:
                    touched.append(col)
                distance[col] = reduced
                parent[col] = row
                parent_cost[col] = data[e]
                heapq.heappush(heap, (reduced, col))
        sink = -1
        scanned = []
        while heap:
            dist, col = heapq.heappop(heap)
            if done[col] or dist > distance[col]:
                continue
            done[col] = True
            scanned.append(col)
            owner = col_to_row[col]
            if owner < 0:
                sink = col
                break
            owner_dual = matched_cost[owner] - col_duals[row_to_col[owner]]
            for e in range(indptr[owner], indptr[owner + 1]):
                other = indices[e]
                if done[other]:
                    continue
                reduced = dist + data[e] - col_duals[other] - owner_dual
                if reduced < distance[other]:
                    if distance[other] == np.inf:
                        touched.append(other)
                    distance[other] = reduced
                    parent[other] = owner
                    parent_cost[other] = data[e]
                    heapq.heappush(heap, (reduced, other))
        if sink < 0:
            return False
        for col in scanned:  # the sink's dual stays, but its new owner's u changes: mark it too
            col_duals[col] -= distance[sink] - distance[col]
            moved[col] = True
        col = sink
        while True:
            owner = parent[col]
            previous = row_to_col[owner]
            col_to_row[col] = owner
            row_to_col[owner] = col
            matched_cost[owner] = parent_cost[col]
            if owner == row:
                break
            col = previous
        for col in touched:
            distance[col] = np.inf
            done[col] = False
            parent[col] = -1
    return True


ROW_REDUCTION_PASSES = 6
"""Passes of augmenting row reduction in `sparse_jv` (measured at n = 2,048: 2 passes leave ~48 free
rows, 4 ~22, 6 ~13, 8 ~10)."""


@numba.njit(cache=True, nogil=True)
def sparse_jv(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
    """The minimum-cost perfect matching of a sparse square graph in CSR form by rows, and column duals
    v that prove it on the graph (c - u - v >= 0 on every edge, 0 on the matching, with
    u[i] = c[i, perm[i]] - v[perm[i]]): Jonker-Volgenant's column reduction and two passes of
    augmenting row reduction, then shortest augmenting paths (`augment`) for the rows still free.
    What scipy's LAPJVsp computes (which makes two passes of row reduction, this ROW_REDUCTION_PASSES),
    but without the GIL, so a batch's solves run on several threads, and with the duals (no
    Bellman-Ford afterwards). False if the graph has no perfect matching."""
    n = indptr.size - 1
    col_duals = np.full(n, np.inf)
    col_owner = np.full(n, -1, dtype=np.int64)
    for i in range(n):  # column reduction: v[j] = the column's least cost, the column to its argmin row
        for e in range(indptr[i], indptr[i + 1]):
            j = indices[e]
            if data[e] < col_duals[j]:
                col_duals[j] = data[e]
                col_owner[j] = i
    row_to_col = np.full(n, -1, dtype=np.int64)
    col_to_row = np.full(n, -1, dtype=np.int64)
    matched_cost = np.zeros(n)
    for j in range(n - 1, -1, -1):
        i = col_owner[j]
        if i < 0:
            return row_to_col, col_duals, False  # an empty column
        if row_to_col[i] < 0:
            row_to_col[i] = j
            col_to_row[j] = i
    for j in range(n):
        if col_to_row[j] >= 0:
            i = col_to_row[j]
            for e in range(indptr[i], indptr[i + 1]):
                if indices[e] == j:
                    matched_cost[i] = data[e]
    # Augmenting row reduction: a free row takes its least reduced-cost column, lowering that column's
    # dual to the row's second least (so the row is tight and every other row's reduced costs only
    # grow); the column's owner, if any, becomes free. LAPJV makes two passes over the free rows; here
    # six: each further pass costs ~0.7 ms at n = 2,048 and halves the rows left for the shortest paths
    # (~250 us each): 48 rows after two, ~13 after six, 1.4x faster in all (bench: benchmarks/README).
    free = np.flatnonzero(row_to_col < 0)
    for _ in range(ROW_REDUCTION_PASSES):
        pending = free.size
        queue = free.copy()
        count = 0
        head = 0
        steps = 0
        next_free = np.empty(n, dtype=np.int64)
        while head < pending:
            i = queue[head]
            head += 1
            best, second = np.inf, np.inf
            best_col, second_col = -1, -1
            for e in range(indptr[i], indptr[i + 1]):
                reduced = data[e] - col_duals[indices[e]]
                if reduced < second:
                    if reduced >= best:
                        second, second_col = reduced, indices[e]
                    else:
                        second, second_col = best, best_col
                        best, best_col = reduced, indices[e]
            if best_col < 0:
                return row_to_col, col_duals, False  # an empty row
            if second_col < 0:
                second = best  # one edge: its dual stays (lowering it by an infinite amount proves nothing)
            j = best_col
            previous = col_to_row[j]
            if best < second:
                col_duals[j] -= second - best
            elif previous >= 0 and second_col >= 0:
                j = second_col  # a tie: take the other column, whose owner may be free-able
                previous = col_to_row[j]
            row_to_col[i] = j
            col_to_row[j] = i
            for e in range(indptr[i], indptr[i + 1]):
                if indices[e] == j:
                    matched_cost[i] = data[e]
            if previous >= 0:
                row_to_col[previous] = -1
                steps += 1
                if best < second and steps <= 4 * n:  # the freed row goes on at once (bounded: ties, rounding)
                    head -= 1
                    queue[head] = previous
                else:
                    next_free[count] = previous
                    count += 1
        free = next_free[:count].copy()
    moved = np.zeros(n, dtype=np.bool_)
    return row_to_col, col_duals, augment(indptr, indices, data, row_to_col, col_to_row, matched_cost,
                                          col_duals, free, moved)
