"""Benchmark the reorder store's layout: a chunk per expert pair (the baseline: what every task wrote
before tiles) against a chunk per t x t tile of pairs written once per task, in the same run.

    PYTHONPATH=. python benchmarks/bench_reorder_store.py [--experts 64] [--n 1408] [--layers 1] [--side 9]

Both stores are made by the reorder units' own `prepare` and filled through their own `write_cells`
with the same synthetic results (random permutations and similarities of every pair i < j): the
baseline writes each pair's seven arrays as its task solved it, the tiled store writes each tile's
arrays once. Prints one JSON line per store (seconds to write, seconds to read every array back with
xarray, files, bytes) and one with the ratios. Defaults: DeepSeekMoE 16B's 64 experts and n = 1,408.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import xarray as xr

from moe_ray.analysis import reorder as R
from moe_ray.checkpoint import MATRICES, ModelFacts
from moe_ray.store import ResultStore
from moe_ray.units import reorder as U


def fill(path: Path, facts: ModelFacts, side: int, per_pair: bool, seed: int = 0) -> float:
    """Create `reorder/joint` chunked in tiles of `side` and write every pair's results; seconds."""
    layers = tuple(facts.moe_layers)
    pairs = tuple((i, j) for i in range(facts.num_experts) for j in range(i + 1, facts.num_experts))
    plan = U.ReorderPlan("synthetic", str(path), facts.family, facts, layers, pairs, ("joint",))
    store = ResultStore.create_or_reuse(str(path), {"model": None, "reference": None}, {})
    U.prepare(store, plan, "joint", side)
    group = store.root["reorder/joint"]
    rng = np.random.default_rng(seed)
    started = time.perf_counter()
    for li in range(len(layers)):
        for tile in R.tile_batches(pairs, side):
            writes: dict[str, list] = {name: [] for name in (*U.REORDER_SCHEMA, "unit_done")}
            for i, j in tile:
                for mi, _ in enumerate(MATRICES):
                    for name in ("similarity_before", "similarity_after", "growth", "optimality_gap"):
                        writes[name].append(((li, mi, i, j), float(rng.random())))
                writes["kendall_tau"].append(((li, i, j), float(rng.random())))
                writes["permutation"].append(((li, i, j), rng.permutation(facts.d_mid).astype(np.int32)))
                writes["unit_done"].append(((li, i, j), 1))
            for name, values in writes.items():
                if per_pair:  # as each pair was solved: one write per pair and array
                    for cell in values:
                        U.write_cells(group[name], [cell])
                else:
                    U.write_cells(group[name], values)
    return time.perf_counter() - started


def read_all(path: Path) -> float:
    started = time.perf_counter()
    ds = xr.open_zarr(str(path), group="reorder/joint", consolidated=False)
    for name in ds.data_vars:
        ds[name].values
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--n", type=int, default=1408, help="neurons per expert (d_mid)")
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--side", type=int, default=9, help="tile side (DeepSeekMoE 16B on a CPU: 9)")
    args = parser.parse_args()
    facts = ModelFacts("deepseek_moe", args.layers, tuple(range(args.layers)), args.experts, 6, 2048, args.n,
                       None, None, "silu", "softmax", 1000)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, side, per_pair in (("chunk per pair", 1, True), (f"{args.side}x{args.side} tiles", args.side, False)):
            path = Path(tmp) / f"{side}.zarr"
            write = fill(path, facts, side, per_pair)
            files = [f for f in path.rglob("*") if f.is_file()]
            row = {"store": label, "pairs": args.layers * args.experts * (args.experts - 1) // 2,
                   "write_s": round(write, 2), "read_s": round(read_all(path), 2), "files": len(files),
                   "bytes": sum(f.stat().st_size for f in files)}
            results[label] = row
            print(json.dumps(row), flush=True)
    base, tiled = results["chunk per pair"], results[f"{args.side}x{args.side} tiles"]
    print(json.dumps({"write_speedup": round(base["write_s"] / tiled["write_s"], 1),
                      "read_speedup": round(base["read_s"] / tiled["read_s"], 1),
                      "files_ratio": round(base["files"] / tiled["files"], 1),
                      "bytes_ratio": round(base["bytes"] / tiled["bytes"], 1)}))


if __name__ == "__main__":
    main()
