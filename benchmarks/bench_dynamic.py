"""Dynamic capture speed (paper §5), as ratios against baselines measured in the same run:
- capture pass (forced all-expert, batched over experts) vs the plain transformers forward;
- vs naive capture: per-expert Python loop over the fused weights, called from a forward hook;
- `api.run` with 1 vs 2 layer-shard actors (end to end, includes actor start-up).

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
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
