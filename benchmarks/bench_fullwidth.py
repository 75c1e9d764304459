"""Full-width layers, measured (issue 13): per static unit, reorder pair and dynamic shard, wall time
and peak RSS against the memory the plan declares, at the published widths.

    python -m benchmarks.bench_fullwidth --models mixtral,deepseek,olmoe,grok [--work DIR] [--skip dynamic]

For each model a checkpoint of its first layers (1, or 2 where layer 0 is dense) is written at the
published config, in the real hub key layout, with random bf16 weights (`Family.tensor_shapes`,
written tensor by tensor into 1 GiB shards, so building needs ~2 GiB whatever the model). Then each
unit runs the way a Ray task runs it, one thread, in a fresh process (`python -c`, the unit's own
function on its own arguments), so its peak RSS (VmHWM: resident pages, the checkpoint's memory
mapped pages included) is the unit's own:
- static: `units.static.run_layer` on the MoE layer (device cpu), vs `plan_memory(..., "cpu")`;
- reorder: `units.reorder.run_batch` on pair 0-1 in joint mode, and where a task takes several pairs
  (small n) on a whole first batch, vs the unit's declared memory, with build and solve seconds;
- dynamic: one shard actor's work (`ShardWorker` built, the `short` input pushed through), vs the
  shard's placement-group bundle.
Also: the seconds to read the layer's expert bytes once (the floor of the static suite), and
projections of CPU hours for the whole model. Prints one JSON line per measurement, then a table.
Run the models one at a time on a shared machine (Grok-1's pair holds ~10 GiB).
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

MODELS = {
    "mixtral": ("mixtral", "8x7B", 1),
    "deepseek": ("deepseek_moe", "16B", 2),
    "olmoe": ("olmoe", "1B-7B", 1),
    "grok": ("grok1", "314B", 1),
}
"""name: (family, flavor, decoder layers written)."""
SHARD_BYTES = 1 << 30
GIB = 2**30

_UNIT = """
import json, pickle, sys, time
import torch
try:
    import ray  # loaded in every Ray worker, so in its RSS too
except ImportError:
    pass
torch.set_num_threads(1)
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
module, name, args, warm_cuda = pickle.loads(open(sys.argv[1], "rb").read())
import importlib
fn = getattr(importlib.import_module(module), name)
if warm_cuda:  # the CUDA context first, so the unit's seconds are its own work
    torch.zeros(1, device="cuda")
before = hwm()
started = time.perf_counter()
summary = fn(*args)
seconds = time.perf_counter() - started
gpu = {}
if torch.cuda.is_initialized():
    free, total = torch.cuda.mem_get_info()
    gpu = {"gpu_peak_allocated": torch.cuda.max_memory_allocated(), "gpu_peak_reserved": torch.cuda.max_memory_reserved(),
           "gpu_used_after": total - free}
summary = {k: v for k, v in (summary or {}).items() if isinstance(v, (int, float, str, type(None)))}
print("RESULT " + json.dumps({"seconds": seconds, "peak_rss": hwm(), "before_rss": before, "summary": summary, **gpu}))
"""


def build_checkpoint(family_name: str, flavor: str, layers: int, out: Path, seed: int = 0,
                     overrides: dict | None = None) -> Path:
    """The flavor's first `layers` decoder layers (plus embeddings, norm, head) in the hub layout,
    random bf16, written one tensor at a time into shards of SHARD_BYTES; and a tokenizer.
    `overrides` change the config (smaller widths for a quick run)."""
    from safetensors.torch import save_file

    from moe_ray.checkpoint import get_family
    from moe_ray.checkpoint.tiny import write_tokenizer

    if (out / "config.json").exists():
        return out
    family = get_family(family_name)
    config = dict(family.flavors[flavor], num_hidden_layers=layers, torch_dtype="bfloat16", **(overrides or {}))
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    files: list[tuple[str, dict[str, torch.Tensor]]] = []
    shard: dict[str, torch.Tensor] = {}
    held = 0

    def flush() -> None:
        nonlocal shard, held
        name = f"part-{len(files):05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        files.append((name, {k: None for k in shard}))
        shard, held = {}, 0

    for key, shape in family.tensor_shapes(config).items():
        if len(shape) == 1:
            tensor = torch.ones(shape) if ("norm" in key or key.endswith(".scale")) else torch.zeros(shape)
        else:
            tensor = torch.randn(shape, generator=gen).mul_(0.02)
        tensor = tensor.to(torch.bfloat16)
        if shard and held + tensor.numel() * 2 > SHARD_BYTES:
            flush()
        shard[key] = tensor
        held += tensor.numel() * 2
    flush()
    weight_map = {}
    for i, (tmp, keys) in enumerate(files):
        final = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        (out / tmp).rename(out / final)
        weight_map.update({k: final for k in keys})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    write_tokenizer(out, int(config["vocab_size"]))
    return out


def run_unit(fn, args: tuple, work: Path, warm_cuda: bool = False) -> dict:
    """`fn(*args)` in a fresh single-threaded process; its wall seconds, peak RSS (and, where it used
    a GPU, the allocator's peaks and the GPU memory in use after it, the CUDA context) and summary."""
    payload = work / f"{fn.__name__}.pkl"
    module = fn.__module__
    if module == "__main__":
        module = f"benchmarks.{Path(sys.modules['__main__'].__file__).stem}"
    payload.write_bytes(pickle.dumps((module, fn.__name__, args, warm_cuda)))
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    done = subprocess.run([sys.executable, "-c", _UNIT, str(payload)], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{fn.__name__} failed:\n{done.stderr[-3000:]}")
    line = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def dynamic_shard(plan, shard: int, name: str) -> dict:
    """What one dynamic shard actor does: load its layers, push one input through them, store it."""
    from moe_ray.units.dynamic import ShardWorker

    worker = ShardWorker(plan, shard, "cpu")
    item = next(i for i in plan.inputs if i.name == name)
    worker.run(name, list(item.ids))
    return {"tokens": len(item.ids)}


def _read_seconds(ckpt, keys: list[str]) -> float:
    """Seconds to read these tensors' bytes once (from the page cache if they are there)."""
    buffer = memoryview(bytearray(64 << 20))
    started = time.perf_counter()
    for key in keys:
        info = ckpt.info(key)
        with open(info.file, "rb", buffering=0) as f:
            f.seek(info.start)
            left = info.nbytes
            while left > 0:
                got = f.readinto(buffer[: min(left, len(buffer))])
                left -= got
    return time.perf_counter() - started


def measure(name: str, work: Path, skip: set[str]):
    """Yield one row per measured unit of model `name`."""
    import moe_ray.units.reorder as RU
    import moe_ray.units.static as SU
    from moe_ray import api
    from moe_ray.planning import plan_model
    from moe_ray.store import ResultStore

    family, flavor, layers = MODELS[name]
    ckpt_dir = build_checkpoint(family, flavor, layers, work / f"{name}-ckpt")
    analyses = [a for a in ("static", "reorder", "dynamic") if a not in skip]
    spec = api.as_spec(model=str(ckpt_dir), store=str(work / f"{name}.zarr"), analyses=analyses, device="cpu",
                       overwrite=True, progress=False, reorder={"pairs": ["0-1"]},
                       dynamic={"inputs": ["short"], "shards": 1})
    ckpt, ref, jobs = api.plan(spec)
    store = ResultStore.create_or_reuse(spec.store, {"model": ckpt.fingerprint, "reference": None}, spec.to_dict(),
                                        overwrite=True)
    full = plan_model(f"{family}:{flavor}")
    n_moe_full = len(full.facts.moe_layers)
    pairs_full = full.facts.num_experts * (full.facts.num_experts - 1) // 2
    for job in jobs:
        units = job.prepare(store, True)
        if job.name == "static":
            unit = units[0]
            layer = unit.args[1]
            expert_keys = [k for e in range(ckpt.facts.num_experts) for k in ckpt.family.expert_keys(layer, e).values()]
            read_s = min(_read_seconds(ckpt, expert_keys) for _ in range(2))
            got = run_unit(SU.run_layer, unit.args, work)
            yield _row(name, f"static layer {layer}", got, unit.memory_bytes,
                       read_s=round(read_s, 2), layer_bytes=ckpt.nbytes(expert_keys),
                       cpu_hours_16_cores=round(got["seconds"] * n_moe_full / 16 / 3600, 2))
        elif job.name == "reorder":
            unit = units[0]
            got = run_unit(RU.run_batch, unit.args, work)
            s = got["summary"]
            yield _row(name, f"reorder joint pair 0-1 (n={ckpt.facts.d_mid})", got, unit.memory_bytes,
                       build_s=round(s["build_seconds"], 1), solve_s=round(s["solve_seconds"], 1),
                       cpu_hours_16_cores=round(got["seconds"] * n_moe_full * pairs_full / 16 / 3600, 1))
            if job.per_task("joint", "cpu") > 1:  # a whole batch too: its experts are held together
                _, _, (batched,) = api.plan(spec.replace(analyses=["reorder"], reorder=type(spec.reorder)()))
                unit = batched.prepare(store, True)[0]
                got = run_unit(RU.run_batch, unit.args, work)
                s = got["summary"]
                yield _row(name, f"reorder joint batch of {unit.cells} pairs (n={ckpt.facts.d_mid})", got,
                           unit.memory_bytes, build_s=round(s["build_seconds"], 1), solve_s=round(s["solve_seconds"], 1),
                           cpu_hours_16_cores=round(got["seconds"] / unit.cells * n_moe_full * pairs_full / 16 / 3600, 1))
        else:
            declared = job.plan.bundles(1, None)[0]["memory"]
            got = run_unit(dynamic_shard, (job.plan, 0, "short"), work)
            yield _row(name, f"dynamic shard 0 (layers 0-{layers - 1}, short input)", got, declared)


def _row(model: str, unit: str, got: dict, declared: int, **extra) -> dict:
    peak = got["peak_rss"]
    return {"model": model, "unit": unit, "seconds": round(got["seconds"], 2),
            "peak_rss_gib": round(peak / GIB, 2), "declared_gib": round(declared / GIB, 2),
            "declared_over_peak": round(declared / peak, 2), "rss_before_gib": round(got["before_rss"] / GIB, 2), **extra}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="mixtral,deepseek,olmoe")
    parser.add_argument("--work", default=None, help="where checkpoints and stores go (kept between runs)")
    parser.add_argument("--skip", default="", help="analyses to leave out: static,reorder,dynamic")
    args = parser.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="moe-ray-fullwidth-"))
    work.mkdir(parents=True, exist_ok=True)
    skip = {s for s in args.skip.split(",") if s}
    rows = []
    for name in args.models.split(","):
        for row in measure(name, work, skip):
            print(json.dumps(row), flush=True)
            rows.append(row)
    print("| model | unit | wall s | peak RSS GiB | declared GiB | declared / peak |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['model']} | {r['unit']} | {r['seconds']} | {r['peak_rss_gib']} | {r['declared_gib']} | "
              f"{r['declared_over_peak']} |")
    return rows


if __name__ == "__main__":
    main()
