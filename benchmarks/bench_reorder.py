"""Benchmark S4 reordering (paper §4.1.2): the sparse certified solver vs lapjv (and scipy), cost
build, many small pairs, Ray scaling, memory, overlap of the solve with the next build, projection.

    PYTHONPATH=. python benchmarks/bench_reorder.py --quick          # < 5 minutes: solvers at 1,024 and 4,096
    PYTHONPATH=. python benchmarks/bench_reorder.py --sizes 1408,4096 --d-hid 1024
    PYTHONPATH=. python benchmarks/bench_reorder.py --only-solve --sizes 14336 --d-hid 256 --repeats 1
    PYTHONPATH=. python benchmarks/bench_reorder.py --only-batch [--device cuda]   # 32 pairs at 2,048 as one batch

Prints one JSON line per measurement and a projection table. All timings are single-threaded
(torch.set_num_threads(1)), like a Ray task with num_cpus=1. Ratios (lapjv / scipy, 2 / 1 workers,
overlap on / off) are measured in the same run, so they hold on a shared machine even when absolute
times wobble. `gil` checks that lapjv releases the GIL (a Python thread keeps counting while it
solves), which is what lets a batch build the next pair while the current one is solved.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from moe_ray.analysis import assignment as A
from moe_ray.analysis import reorder as R
from moe_ray.units.sizing import reorder_unit_memory

MODELS = {"Mixtral 8x7B": (14336, 4096, 32, "upcycled"), "Grok-1": (32768, 6144, 64, "scratch")}
"""n, d_hid, layers, and the cost kind closest to the paper's Tab 2 (Mixtral: tau 0.75; Grok: ~0)."""


def experts(n: int, d_hid: int, kind: str, seed: int = 0) -> tuple[dict, dict]:
    """Two experts: `upcycled` = one parent + 50% noise (near-identity costs), `scratch` = independent."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {"up": (n, d_hid), "gate": (n, d_hid), "down": (d_hid, n)}
    a = {m: torch.randn(s, generator=gen) for m, s in shapes.items()}
    if kind == "upcycled":
        b = {m: a[m] + 0.5 * torch.randn(s, generator=gen) for m, s in shapes.items()}
    else:
        b = {m: torch.randn(s, generator=gen) for m, s in shapes.items()}
    return a, b


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def bench_solve(n: int, d_hid: int, kind: str, scipy_too: bool, repeats: int = 1) -> dict:
    """One pair's costs, solved by lapjv and by each of the project's solvers side by side (best of
    `repeats`, alternating, so load hits both alike), the optimum checked against lapjv's."""
    a, b = experts(n, d_hid, kind)
    sim, t_build = timed(lambda: R.similarity_matrix(a, b, R.MATRICES))
    flops = 2 * len(R.MATRICES) * n * n * d_hid
    cost = sim.max() - sim
    times: dict[str, list[float]] = {"lapjv": [], "sparse": [], "sparse_torch": []}
    for _ in range(repeats):
        lap, seconds = timed(lambda: A.solve_lapjv(cost.copy()))
        times["lapjv"].append(seconds)
        sparse, seconds = timed(lambda: A.solve_sparse(cost))
        times["sparse"].append(seconds)
        on_torch, seconds = timed(lambda: A.solve_sparse(cost, backend="torch"))
        times["sparse_torch"].append(seconds)
    best = {k: min(v) for k, v in times.items()}
    row = {"what": "solve", "n": n, "kind": kind, "build_s": float(f"{t_build:.4g}"),
           "build_gflops": round(flops / t_build / 1e9, 2), "lapjv_s": float(f"{best['lapjv']:.4g}"),
           "sparse_s": float(f"{best['sparse']:.4g}"), "sparse_torch_s": float(f"{best['sparse_torch']:.4g}"),
           "speedup_sparse_vs_lapjv": round(best["lapjv"] / best["sparse"], 2),
           "speedup_sparse_torch_vs_lapjv": round(best["lapjv"] / best["sparse_torch"], 2),
           "sparse_rounds": sparse.rounds, "sparse_solver": sparse.solver,
           "sparse_minus_lapjv_cost": sparse.cost - lap.cost, "torch_minus_lapjv_cost": on_torch.cost - lap.cost,
           "gap_bound_lapjv": lap.gap_bound, "gap_bound_sparse": sparse.gap_bound,
           "gap_bound_sparse_rel": sparse.gap_bound / max(1e-300, n * float(sim.max()) - sparse.cost),
           "tau": round(R.kendall_tau(sparse.perm), 4)}
    if scipy_too:
        ref = sim.astype(np.float64)
        (rows, cols), t_scipy = timed(lambda: linear_sum_assignment(ref, maximize=True))
        row.update(scipy_s=float(f"{t_scipy:.4g}"), speedup_lapjv_vs_scipy=round(t_scipy / best["lapjv"], 2),
                   total_diff=float(ref[np.arange(n), sparse.perm].sum() - ref[rows, cols].sum()))
    return row


def bench_many(n: int, d_hid: int, pairs: int) -> dict:
    """DeepSeek-V3-like: many small pairs of one layer (n = 2,048) from scratch, one after another,
    lapjv and sparse side by side on the same costs (the CPU's batch is this loop; gpu_check measures
    a GPU's)."""
    layer = [experts(n, d_hid, "scratch", seed=e)[0] for e in range(pairs + 1)]
    costs = []
    for e in range(pairs):
        sim = R.similarity_matrix(layer[e], layer[e + 1], R.MATRICES)
        costs.append(sim.max() - sim)
    lap, t_lapjv = timed(lambda: [A.solve_lapjv(c.copy()) for c in costs])
    sparse, t_sparse = timed(lambda: [A.solve_sparse(c) for c in costs])
    worst = max(abs(s.cost - l.cost) for s, l in zip(sparse, lap))
    return {"what": "many", "n": n, "pairs": pairs, "lapjv_s_per_pair": round(t_lapjv / pairs, 4),
            "sparse_s_per_pair": round(t_sparse / pairs, 4), "speedup": round(t_lapjv / t_sparse, 2),
            "max_cost_diff": worst, "max_gap_bound": max(s.gap_bound for s in sparse)}


def bench_batch(n: int, d_hid: int, pairs: int, kind: str, device: str, workers: int, repeats: int = 1) -> dict:
    """DeepSeek-V3-like: `pairs` pairs of one layer at n = 2,048 (`kind`: from scratch, or children of one
    parent as permuted noisy copies), their costs built as one batch on `device`, then solved as one
    batch (`assignment.solve_sparse_batch` on `workers` threads) against lapjv one pair at a time on a
    host core on the same costs, and the sparse solver one pair at a time (best of `repeats`,
    alternating); same optima checked."""
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(1)
    shapes = {"up": (n, d_hid), "gate": (n, d_hid), "down": (d_hid, n)}
    parent = {m: torch.randn(s, generator=gen) for m, s in shapes.items()}

    def child() -> dict:
        if kind == "scratch":
            return {m: torch.randn(s, generator=gen) for m, s in shapes.items()}
        perm = torch.randperm(n, generator=gen)
        return {m: (w[:, perm] if m == "down" else w[perm]) + 0.5 * torch.randn(w.shape, generator=gen)
                for m, w in parent.items()}

    first = R.prepare_expert(parent if kind == "upcycled" else child(), R.MATRICES, dev)
    others = [R.prepare_expert(child(), R.MATRICES, dev) for _ in range(pairs)]
    costs = torch.empty((pairs, n, n), dtype=torch.float32, device=dev)
    A.solve_sparse_batch(torch.rand((2, 64, 64), device=dev), workers=workers)  # warm: kernels, threads
    _sync(dev)
    started = time.perf_counter()
    for b in range(pairs):
        R.build_similarity(costs[b], first, others[b], R.MATRICES)
    peaks = costs.reshape(pairs, -1).amax(dim=1)
    costs.neg_().add_(peaks[:, None, None])
    _sync(dev)
    t_build = time.perf_counter() - started
    host = costs.cpu().numpy().copy()
    t_lapjv = t_one = t_batch = t_torch_batch = t_torch_one = float("inf")
    worst_torch = None
    for _ in range(repeats):  # alternating, best of: load hits all three alike
        lap, seconds = timed(lambda: [A.solve_lapjv(c.copy()) for c in host])
        t_lapjv = min(t_lapjv, seconds)
        one, seconds = timed(lambda: [A.solve_sparse(c) for c in host])
        t_one = min(t_one, seconds)
        batched, seconds = timed(lambda: (A.solve_sparse_batch(costs, workers=workers), _sync(dev))[0])
        t_batch = min(t_batch, seconds)
        if dev.type == "cpu":  # the GPU's code path (batched torch ops) on the CPU, against it pair by pair
            on_torch, seconds = timed(lambda: A.solve_sparse_batch(costs, workers=workers, backend="torch"))
            t_torch_batch = min(t_torch_batch, seconds)
            torch_one, seconds = timed(lambda: [A.solve_sparse(c, backend="torch") for c in costs])
            t_torch_one = min(t_torch_one, seconds)
            worst_torch = max(abs(s.cost - l.cost) for s, l in zip(on_torch + torch_one, lap + lap))
    worst = max(abs(s.cost - l.cost) for s, l in zip(batched, lap))
    return {"what": "batch", "n": n, "d_hid": d_hid, "kind": kind, "pairs": pairs, "device": device,
            "workers": workers, "repeats": repeats, "build_s_per_pair": round(t_build / pairs, 4),
            "lapjv_s_per_pair": round(t_lapjv / pairs, 4), "sparse_one_at_a_time_s_per_pair": round(t_one / pairs, 4),
            "batch_s_per_pair": round(t_batch / pairs, 4), "speedup_batch_vs_lapjv": round(t_lapjv / t_batch, 2),
            "speedup_batch_vs_sparse_one_at_a_time": round(t_one / t_batch, 2),
            "rounds_max": max(s.rounds for s in batched), "fallbacks": sum(s.solver == "lapjv" for s in batched),
            "max_cost_diff": worst, "max_gap_bound": max(s.gap_bound for s in batched),
            **({} if worst_torch is None else {
                "torch_path_batch_s_per_pair": round(t_torch_batch / pairs, 4),
                "torch_path_one_at_a_time_s_per_pair": round(t_torch_one / pairs, 4),
                "torch_path_speedup_batch_vs_one_at_a_time": round(t_torch_one / t_torch_batch, 2),
                "torch_path_max_cost_diff": worst_torch})}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_memory(n: int, d_hid: int) -> dict:
    """Peak RSS of one reorder_pair in a fresh process, against n²·4 bytes and the declared memory."""
    code = ("import threading,time,psutil,torch;torch.set_num_threads(1);"
            "from benchmarks.bench_reorder import experts;from moe_ray.analysis import reorder as R;"
            f"a,b=experts({n},{d_hid},'scratch');p=psutil.Process();base=p.memory_info().rss;peak=[base];"
            "stop=threading.Event();"
            "t=threading.Thread(target=lambda:[(peak.append(p.memory_info().rss),time.sleep(0.002)) "
            "for _ in iter(stop.is_set,True)]);t.start();"
            "R.reorder_pair(a,b,R.MATRICES);stop.set();t.join();"
            "print(base//1024, max(peak)//1024)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.getcwd()})
    base_kb, peak_kb = map(int, out.stdout.split()[-2:])
    return {"what": "memory", "n": n, "d_hid": d_hid, "peak_rss_gib": round(peak_kb / 2**20, 3),
            "pair_extra_gib": round((peak_kb - base_kb) / 2**20, 3), "n2x4_gib": round(4 * n * n / 2**30, 3),
            "weights_gib": round(2 * 3 * n * d_hid * 4 / 2**30, 3),
            "formula_gib": round(R.memory_bytes(n, d_hid, stored_bytes=0) / 2**30, 3)}


def bench_gil(n: int = 3000) -> dict:
    """Counts of a Python loop on a second thread while lapjv solves, vs the same time alone: a solver
    that held the GIL would stop the loop."""
    import threading

    cost = np.random.default_rng(0).random((n, n), dtype=np.float32)

    def spin(seconds: float | None, out: list, stop: threading.Event) -> None:
        end = time.perf_counter() + seconds if seconds else None
        while not stop.is_set() and (end is None or time.perf_counter() < end):
            out[0] += 1

    during, stop = [0], threading.Event()
    thread = threading.Thread(target=spin, args=(None, during, stop))
    thread.start()
    started = time.perf_counter()
    R.solve_max(cost.copy())
    solve = time.perf_counter() - started
    stop.set()
    thread.join()
    alone = [0]
    spin(solve, alone, threading.Event())
    return {"what": "gil", "n": n, "solve_s": round(solve, 3), "loop_counts_during_lapjv": during[0],
            "loop_counts_alone": alone[0], "released": during[0] > alone[0] // 10}


def bench_overlap(n: int, d_hid: int, pairs: int) -> dict:
    """`pairs` pairs of one batch with the solve on a host thread while the next builds, vs one after
    the other; torch on one thread, so overlap uses a second core for lapjv."""
    chosen = {e: experts(n, d_hid, "scratch", seed=e)[0] for e in range(pairs + 1)}
    problems = [(e, e + 1, R.MATRICES) for e in range(pairs)]
    row = {"what": "overlap", "n": n, "d_hid": d_hid, "pairs": pairs}
    for overlap in (False, True):
        started = time.perf_counter()
        results = list(R.reorder_pairs(chosen.__getitem__, problems, overlap=overlap))
        row[f"{'on' if overlap else 'off'}_s"] = round(time.perf_counter() - started, 2)
        row[f"{'on' if overlap else 'off'}_build_s"] = round(sum(r.build_seconds for _, r in results), 2)
        row[f"{'on' if overlap else 'off'}_solve_s"] = round(sum(r.solve_seconds for _, r in results), 2)
    row["speedup"] = round(row["off_s"] / row["on_s"], 2)
    return row


def _ray_pair(n: int, d_hid: int, seed: int) -> float:
    torch.set_num_threads(1)
    a, b = experts(n, d_hid, "scratch", seed)
    start = time.perf_counter()
    R.reorder_pair(a, b, R.MATRICES)
    return time.perf_counter() - start


def bench_ray(n: int, d_hid: int, pairs: int) -> dict:
    import ray

    from moe_ray.distributed.cluster import connect

    connect(num_cpus=2, object_store_memory_gb=0.5)
    remote = ray.remote(_ray_pair)
    row = {"what": "ray", "n": n, "pairs": pairs}
    ray.get([remote.options(num_cpus=1).remote(64, 16, s) for s in range(2)])  # warm two workers
    for workers in (1, 2):
        start = time.perf_counter()
        refs = [remote.options(num_cpus=2 // workers).remote(n, d_hid, s) for s in range(pairs)]
        ray.get(refs)
        row[f"workers_{workers}_s"] = round(time.perf_counter() - start, 2)
    row["speedup_2_vs_1"] = round(row["workers_1_s"] / row["workers_2_s"], 2)
    ray.shutdown()
    return row


def project(rows: list[dict]) -> list[dict]:
    """Fit t = c·n^k per cost kind from the solve rows and project whole-model wall times."""
    out = []
    for (model, (n, d_hid, layers, _)), kind in ((m, k) for m in MODELS.items() for k in ("upcycled", "scratch")):
        pts = [(r["n"], r["sparse_s"] + r["build_s"] * (d_hid / r.get("d_hid", d_hid))) for r in rows
               if r["what"] == "solve" and r["kind"] == kind]
        if len(pts) < 2:
            continue
        ns, ts = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
        k, logc = np.polyfit(ns, ts, 1)
        per_pair = float(np.exp(logc) * n ** k)
        units = layers * 28
        out.append({"what": "projection", "model": model, "n": n, "kind": kind, "exponent": round(float(k), 2),
                    "per_pair_h": round(per_pair / 3600, 2), "units": units,
                    **{f"wall_h_{c}_cores": round(units * per_pair / c / 3600, 1) for c in (16, 64, 256, 1024)},
                    "mem_per_task_gib": round(reorder_unit_memory(n, d_hid, 2, 2, "cpu", False)[0] / 2**30, 1)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1408,4096")
    parser.add_argument("--scipy-max-n", type=int, default=4096)
    parser.add_argument("--d-hid", type=int, default=1024, help="hidden size of the synthetic experts")
    parser.add_argument("--ray-n", type=int, default=1408)
    parser.add_argument("--ray-pairs", type=int, default=4)
    parser.add_argument("--memory-n", default="4096,8192")
    parser.add_argument("--memory-d-hid", type=int, default=128, help="small, so the n×n cost dominates")
    parser.add_argument("--overlap-n", type=int, default=2048)
    parser.add_argument("--overlap-pairs", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="solves per solver and pair (best of)")
    parser.add_argument("--many-pairs", type=int, default=8, help="DeepSeek-V3-like pairs at n = 2,048")
    parser.add_argument("--batch-pairs", type=int, default=32,
                        help="DeepSeek-V3-like pairs at n = 2,048 solved as one batch (0: none)")
    parser.add_argument("--batch-workers", type=int, default=os.cpu_count() or 1,
                        help="threads of the batched solve (a task's declared CPUs)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the batch's costs are")
    parser.add_argument("--only-batch", action="store_true", help="only the batched rows")
    parser.add_argument("--only-solve", action="store_true", help="only the solver rows")
    parser.add_argument("--quick", action="store_true",
                        help="the solver rows at n = 1,024 and 4,096 (d_hid 256) and 8 pairs at 2,048: < 5 min")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.d_hid, args.only_solve, args.scipy_max_n = "1024,4096", 256, True, 1024
    torch.set_num_threads(1)
    A.solve_sparse(np.random.default_rng(0).random((64, 64), dtype=np.float32))  # compile the kernels
    rows = []
    for kind in ("scratch", "upcycled") if args.batch_pairs else ():
        rows.append(bench_batch(2048, min(args.d_hid, 256), args.batch_pairs, kind, args.device, args.batch_workers,
                                min(args.repeats, 2)))
        print(json.dumps(rows[-1]), flush=True)
    if args.only_batch:
        return
    for n in map(int, args.sizes.split(",")):
        for kind in ("upcycled", "scratch"):
            row = bench_solve(n, args.d_hid, kind, n <= args.scipy_max_n, args.repeats)
            row["d_hid"] = args.d_hid
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.many_pairs:
        rows.append(bench_many(2048, min(args.d_hid, 256), args.many_pairs))
        print(json.dumps(rows[-1]), flush=True)
    if args.only_solve:
        return
    for n in map(int, args.memory_n.split(",")):
        rows.append(bench_memory(n, args.memory_d_hid))
        print(json.dumps(rows[-1]), flush=True)
    rows.append(bench_gil())
    print(json.dumps(rows[-1]), flush=True)
    if args.overlap_pairs:
        rows.append(bench_overlap(args.overlap_n, args.d_hid, args.overlap_pairs))
        print(json.dumps(rows[-1]), flush=True)
    if args.ray_pairs:
        rows.append(bench_ray(args.ray_n, args.d_hid, args.ray_pairs))
        print(json.dumps(rows[-1]), flush=True)
    for row in project(rows):
        print(json.dumps(row), flush=True)
    print(f"max RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
