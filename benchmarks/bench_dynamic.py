"""Dynamic capture speed (paper §5), as ratios against baselines measured in the same run:
- capture pass (forced all-expert, batched over experts) vs the plain transformers forward;
- vs naive capture: per-expert Python loop over the fused weights, called from a forward hook;
- `api.run` with 1 vs 2 layer-shard actors (end to end, includes actor start-up);
- peak memory of one shard (what a shard actor does: build its layers, push the long input through)
  vs its layers' float32 bytes and the memory the plan declares for it, in a fresh process each.

    PYTHONPATH=. python benchmarks/bench_dynamic.py [--tokens 1100] [--repeat 3]
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import torch

from moe_ray.checkpoint import open_checkpoint
from moe_ray.checkpoint.tiny import make_tiny
from moe_ray.runtime import LayerRange


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def _vm_hwm() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _shard_peak(path: str, start: int, end: int, tokens: int, queue) -> None:
    """In a fresh process: peak RSS growth while a shard builds its layers and runs one input."""
    import psutil

    from moe_ray.runtime.layers import LayerRange as Range

    torch.set_num_threads(1)
    ids = (torch.arange(tokens) * 37 + 5) % 500 + 3
    ckpt = open_checkpoint(path)
    ckpt.family.decoder_classes()  # imports (transformers' modeling code) are a fixed cost, not the shard's
    import transformers.masking_utils  # noqa: F401
    base = psutil.Process().memory_info().rss
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM): imports may have peaked higher
        f.write("5")
    runner = Range(ckpt, start, end)
    hidden = runner.embed(ids) if start == 0 else torch.randn(1, tokens, ckpt.facts.d_hid)
    runner.forward(hidden, probe_tokens=4)
    queue.put(_vm_hwm() - base)


def shard_memory(path: str, shards: int, tokens: int) -> list[tuple[tuple[int, int], int, int, int]]:
    """Per shard: (layer range, measured peak growth, layers' fp32 bytes, plan's declared bytes)."""
    import multiprocessing as mp

    from moe_ray.spec import Spec
    from moe_ray.units.dynamic import plan_dynamic

    ckpt = open_checkpoint(path)
    spec = Spec.from_dict({"model": path, "store": "unused.zarr", "analyses": ["dynamic"],
                           "dynamic": {"inputs": ["long"], "shards": shards, "max_tokens": tokens}})
    plan = plan_dynamic(ckpt, None, spec, ckpt.facts.moe_layers)
    from moe_ray.runtime.layers import layer_keys
    from moe_ray.units.dynamic import _fp32_bytes

    out = []
    ctx = mp.get_context("spawn")
    declared_bytes = [b["memory"] for b in plan.bundles(1, None)]
    for (a, b), declared in zip(plan.shards, declared_bytes):
        layer_bytes = sum(_fp32_bytes(ckpt, layer_keys(ckpt, l)) for l in range(a, b))
        if a == 0:
            layer_bytes += _fp32_bytes(ckpt, ["model.embed_tokens.weight"])
        queue = ctx.Queue()
        proc = ctx.Process(target=_shard_peak, args=(path, a, b, tokens, queue))
        proc.start()
        peak = queue.get(timeout=600)
        proc.join()
        out.append(((a, b), peak, layer_bytes, declared))
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=1100)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--hidden", type=int, default=256)
    args = p.parse_args()
    torch.set_num_threads(1)
    work = tempfile.mkdtemp(prefix="bench-dynamic-")
    over = {"hidden_size": args.hidden, "intermediate_size": 2 * args.hidden, "head_dim": args.hidden // 4}
    tiny = make_tiny("mixtral", "scratch", f"{work}/mix", config_overrides=over, shard_bytes=8 << 20)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny.path), dtype=torch.float32).eval()
    ckpt = open_checkpoint(tiny.path)
    runner = LayerRange(ckpt, 0, ckpt.facts.num_layers)
    ids = (torch.arange(args.tokens) * 37 + 5) % 500 + 3
    T = args.tokens

    with torch.no_grad():
        plain = best(lambda: model.model(input_ids=ids.unsqueeze(0)), args.repeat)
    capture = best(lambda: runner.forward(runner.embed(ids), probe_tokens=4), args.repeat)

    def naive_pass():
        outs = {}

        def hook(mod, a, i):
            x = a[0].reshape(-1, a[0].shape[-1])
            ex = mod.experts
            outs[i] = [torch.nn.functional.linear(
                ex.act_fn(torch.nn.functional.linear(x, ex.gate_up_proj[e]).chunk(2, -1)[0])
                * torch.nn.functional.linear(x, ex.gate_up_proj[e]).chunk(2, -1)[1], ex.down_proj[e])
                for e in range(ex.gate_up_proj.shape[0])]
        hs = [l.mlp.register_forward_pre_hook(lambda m, a, i=i: hook(m, a, i)) for i, l in enumerate(model.model.layers)]
        with torch.no_grad():
            model.model(input_ids=ids.unsqueeze(0))
        for h in hs:
            h.remove()
    naive = best(naive_pass, args.repeat)
    print(f"d_hid {args.hidden}, {T} tokens, 4 layers x 8 experts, 1 thread")
    print(f"plain transformers forward: {T / plain:9.0f} tokens/s")
    print(f"capture pass (moe-ray):     {T / capture:9.0f} tokens/s  ({plain / capture:.2f}x the plain forward's speed)")
    print(f"naive per-expert hook loop: {T / naive:9.0f} tokens/s  (capture is {naive / capture:.2f}x faster, "
          "while also computing D4 activation ratios)")

    from moe_ray import api
    from moe_ray.distributed.cluster import connect

    os.environ.setdefault("RAY_AUTH_TOKEN_PATH", f"{work}/auth_token")
    connect(num_cpus=2, object_store_memory_gb=0.5)
    for shards in (1, 2):
        store = f"{work}/s{shards}.zarr"
        t = time.perf_counter()
        api.run(model=str(tiny.path), analyses=["dynamic"], store=store, progress=False,
                dynamic={"inputs": ["short", "long"], "shards": shards})
        print(f"api.run, {shards} shard actor(s), short+long: {time.perf_counter() - t:.1f}s end to end")
    import ray
    ray.shutdown()
    for shards in (1, 2):
        for (a, b), peak, layer_bytes, declared in shard_memory(str(tiny.path), shards, T):
            print(f"{shards} shard(s), layers [{a}, {b}): peak RSS growth {peak / 2**20:6.1f} MiB = "
                  f"{peak / layer_bytes:.2f}x its layers' fp32 bytes ({layer_bytes / 2**20:.1f} MiB); "
                  f"plan declares {declared / 2**20:.1f} MiB")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
