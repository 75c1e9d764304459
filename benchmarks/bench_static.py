"""Static suite vs reading the checkpoint once, and peak memory per layer task (issue 2).

    python -m benchmarks.bench_static [--layers 6] [--d-hid 1024] [--d-mid 3584]
    python -m benchmarks.bench_static --quick      # reads and the read-ahead comparison only, < 5 min

Builds a synthetic Mixtral-shaped checkpoint (default 1.06 GB of bf16 experts), then measures, in
the same run:
- read_bytes: reading every safetensors byte once, from the page cache (warm) and from disk (cold:
  the files' cached pages dropped first with posix_fadvise(DONTNEED), as for a checkpoint read for
  the first time; median of 3) — the floor of any analysis of these weights;
- read_fp32: reading every expert tensor through moe-ray's reader, converted to float32 (warm);
- static: the whole static suite through `moe_ray.run` on the local Ray (Ray start excluded): the
  first run after Ray starts (fresh workers import torch), then with warm workers (a running
  service) on a warm and on a cold page cache;
- peak RSS of one layer's task (a fresh process running the unit) vs that layer's tensor bytes;
- read_ahead: one layer's unit in this process with the next matrix kind read on a thread while one
  is analysed, vs each kind read when needed, warm and cold, against the layer's share of the read.
Prints one JSON line of results; the issue's target is static / read_bytes <= 1.5 on a 2-core machine.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import moe_ray
from moe_ray.checkpoint import open_checkpoint
from moe_ray.checkpoint.tiny import make_tiny


def _drop_page_cache(path: Path) -> None:
    """Drop the checkpoint's pages from the page cache (clean pages of our own files: no root needed)."""
    for f in path.glob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _read_bytes(path: Path) -> float:
    """Seconds to read every safetensors byte once into one reused 64 MiB buffer."""
    buffer = memoryview(bytearray(64 << 20))
    started = time.perf_counter()
    for f in sorted(path.glob("*.safetensors")):
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buffer):
                pass
    return time.perf_counter() - started


def _read_fp32(path: Path) -> float:
    ckpt = open_checkpoint(path)
    started = time.perf_counter()
    for layer in ckpt.facts.moe_layers:
        for e in range(ckpt.facts.num_experts):
            for key in ckpt.family.expert_keys(layer, e).values():
                ckpt.read(key, check_finite=False)
    return time.perf_counter() - started


# VmHWM (peak RSS) of a fresh process: ru_maxrss would inherit the parent's peak across fork.
_UNIT_RSS = """
import sys, pickle
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
from moe_ray.units import static as S
plan, layer = pickle.loads(bytes.fromhex(sys.argv[1]))
before = hwm()
S.run_layer(plan, layer)
print(before, hwm())
"""


def _breakdown(path: Path) -> dict:
    """Seconds per analysis for layer 0, in this process (one thread per Ray task is what runs)."""
    import torch

    from moe_ray.analysis import static as S
    ckpt = open_checkpoint(path)
    times = {"read": 0.0, "s1_s2": 0.0, "s3": 0.0, "s5": 0.0}
    from moe_ray.units.job import held_dtype

    for matrix in ("up", "gate", "down"):
        t = time.perf_counter()
        keys = [ckpt.family.expert_keys(0, e)[matrix] for e in range(ckpt.facts.num_experts)]
        mats = [ckpt.read(k, held_dtype(ckpt.info(k).dtype)) for k in keys]  # as a unit holds them
        times["read"] += time.perf_counter() - t
        t = time.perf_counter()
        S.flattened_grams(mats)
        times["s1_s2"] += time.perf_counter() - t
        t = time.perf_counter()
        torch.stack([S.neuron_average(m, matrix) for m in mats])
        times["s3"] += time.perf_counter() - t
        t = time.perf_counter()
        S.neuron_pca([S.neuron_vectors(m, matrix) for m in mats], 3, "randomized")
        times["s5"] += time.perf_counter() - t
    return {k: round(v, 3) for k, v in times.items()}


def _read_ahead(ckpt_dir: Path, work: Path, read_cold: float, read_warm: float, repeats: int = 2) -> dict:
    """One layer's static unit (`units.static._analyse_layer`, in this process) with the next matrix
    kind read on a thread while one is analysed, against reading each kind when needed (the kernel's
    read-ahead alone), on a warm and on a cold page cache, alternating, best of `repeats`; against
    the layer's share of the checkpoint's read time. overlap_s: the time the read-ahead saved."""
    import torch

    from moe_ray.api import as_spec, plan as plan_run
    from moe_ray.units import static as SU

    _, _, jobs = plan_run(as_spec(model=str(ckpt_dir), store=str(work / "ahead.zarr"), overwrite=True,
                                  analyses=["static"]))
    plan = jobs[0].plan
    layer = plan.layers[0]
    share = 1 / len(plan.layers)
    best: dict[str, float] = {}
    for cache in ("warm", "cold"):
        for _ in range(repeats):
            for ahead in (False, True):
                if cache == "cold":
                    _drop_page_cache(ckpt_dir)
                started = time.perf_counter()
                SU._analyse_layer(plan, layer, torch.device("cpu"), read_ahead=ahead)
                key = f"{cache}_{'ahead' if ahead else 'sequential'}_s"
                best[key] = min(best.get(key, float("inf")), time.perf_counter() - started)
    out = {k: round(v, 3) for k, v in best.items()}
    for cache, read in (("warm", read_warm * share), ("cold", read_cold * share)):
        out[f"{cache}_layer_read_s"] = round(read, 3)
        out[f"{cache}_sequential_over_read"] = round(best[f"{cache}_sequential_s"] / read, 2)
        out[f"{cache}_ahead_over_read"] = round(best[f"{cache}_ahead_s"] / read, 2)
        out[f"{cache}_overlap_s"] = round(best[f"{cache}_sequential_s"] - best[f"{cache}_ahead_s"], 3)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--d-hid", type=int, default=1024)
    parser.add_argument("--d-mid", type=int, default=3584)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the in-process breakdown")
    parser.add_argument("--quick", action="store_true",
                        help="2 layers; only the reads and the read-ahead comparison (no Ray): < 5 minutes")
    args = parser.parse_args(argv)
    if args.quick:
        args.layers = 2
    import torch
    torch.set_num_threads(args.threads)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="moe-ray-bench-"))
    overrides = {"hidden_size": args.d_hid, "intermediate_size": args.d_mid, "num_hidden_layers": args.layers,
                 "num_attention_heads": 8, "num_key_value_heads": 8, "head_dim": args.d_hid // 8, "vocab_size": 512}
    ckpt_dir = work / "ckpt"
    if not (ckpt_dir / "config.json").exists():
        make_tiny("mixtral", "scratch", ckpt_dir, seed=0, shard_bytes=1 << 30, config_overrides=overrides, overwrite=True)
    ckpt = open_checkpoint(ckpt_dir)
    expert_bytes = sum(ckpt.nbytes(list(ckpt.family.expert_keys(l, e).values()))
                       for l in ckpt.facts.moe_layers for e in range(ckpt.facts.num_experts))
    cold_reads = []
    for _ in range(3):
        _drop_page_cache(ckpt_dir)
        cold_reads.append(_read_bytes(ckpt_dir))
    read_cold = statistics.median(cold_reads)
    read_bytes = min(_read_bytes(ckpt_dir) for _ in range(3))  # the page cache is warm now
    read_fp32 = _read_fp32(ckpt_dir)
    read_ahead = _read_ahead(ckpt_dir, work, read_cold, read_bytes)
    if args.quick:
        result = {"checkpoint_expert_bytes": expert_bytes, "read_bytes_s": round(read_bytes, 3),
                  "read_bytes_cold_s": round(read_cold, 3), "read_ahead": read_ahead}
        print(json.dumps(result))
        return result

    from moe_ray.distributed.cluster import connect
    connect(num_cpus=2)
    store = work / "static.zarr"

    def run_static() -> float:
        started = time.perf_counter()
        moe_ray.run(model=str(ckpt_dir), store=str(store), overwrite=True, progress=False)
        return time.perf_counter() - started

    static_first = run_static()
    static = min(run_static() for _ in range(2))
    static_cold = []
    for _ in range(2):
        _drop_page_cache(ckpt_dir)
        static_cold.append(run_static())

    import pickle
    from moe_ray.api import plan as plan_run, as_spec
    _, _, jobs = plan_run(as_spec(model=str(ckpt_dir), store=str(work / "rss.zarr"), overwrite=True))
    moe_ray.run(model=str(ckpt_dir), store=str(work / "rss.zarr"), overwrite=True, progress=False, layers=[0])
    job = jobs[0]
    payload = pickle.dumps((job.plan.__class__(**{**job.plan.__dict__, "store": str(work / "rss.zarr")}), 0)).hex()
    out = subprocess.run([sys.executable, "-c", _UNIT_RSS, payload], capture_output=True, text=True, check=True)
    rss_before, rss_peak = map(int, out.stdout.split()[-2:])
    layer_bytes = expert_bytes // len(ckpt.facts.moe_layers)
    result = {
        "checkpoint_expert_bytes": expert_bytes,
        "read_bytes_s": round(read_bytes, 3),
        "read_bytes_cold_s": round(read_cold, 3),
        "read_fp32_s": round(read_fp32, 3),
        "static_first_run_s": round(static_first, 3),
        "static_s": round(static, 3),
        "static_cold_cache_s": round(min(static_cold), 3),
        "static_over_read_bytes": round(static / read_bytes, 2),
        "static_cold_over_read_cold": round(min(static_cold) / read_cold, 2),
        "static_over_read_fp32": round(static / read_fp32, 2),
        "layer_bytes_bf16": layer_bytes,
        "task_peak_rss_bytes": rss_peak,
        "task_rss_growth_bytes": rss_peak - rss_before,
        "task_rss_growth_over_layer_fp32": round((rss_peak - rss_before) / (2 * layer_bytes), 2),
        "read_fp32_over_read_bytes": round(read_fp32 / read_bytes, 2),
        "neuron_pca_method": job.plan.neuron_pca_method,
        "layer0_seconds_1_thread": _breakdown(ckpt_dir),
        "read_ahead": read_ahead,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
