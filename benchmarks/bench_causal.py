"""The expert-ablation sweep of the causal checks (issue 16) against a naive rerun of the whole model
per (layer, expert), measured in the same run, in tokens per second of interventions (every (layer,
expert) ablation of every sequence counts its sequence's tokens once):

- naive: for each (layer, expert), the whole model from the embeddings with that expert removed, then
  the output head (what a hook-based tool does, one intervention at a time);
- prefix cached: the unmodified pass once, the input of every layer kept, then each intervention alone
  from its layer on (only the layers after it are recomputed);
- moe-ray's sweep (`runtime.causal.run_rows`, what a causal shard runs): the prefix once, every
  intervention a row of one batch created at its layer (`causal.batch_tokens` rows x tokens at most).

All three give the same losses (checked). The issue's goal: the sweep at least L/2 times the naive
speed. Prefix caching alone cannot reach it: the layers after l still run for every intervention, so
it saves sum_l l of the naive L per intervention, at most 2L/(L+1) (the "layer-row passes" ratio
printed); the rest must come from running the interventions of a sequence as one batch.

    PYTHONPATH=. python benchmarks/bench_causal.py [--layers 8] [--hidden 256] [--tokens 128] [--sequences 4]
        [--device cuda]
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time

import numpy as np
import torch

from moe_ray.checkpoint import open_checkpoint
from moe_ray.checkpoint.tiny import make_tiny
from moe_ray.runtime import LayerRange
from moe_ray.runtime.causal import OutputHead, Variant, run_rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--sequences", type=int, default=4)
    p.add_argument("--batch-tokens", type=int, default=16384)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu or cuda (the layers, head and batches live there)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    work = tempfile.mkdtemp(prefix="bench-causal-")
    over = {"hidden_size": args.hidden, "intermediate_size": 2 * args.hidden, "head_dim": args.hidden // 4,
            "num_hidden_layers": args.layers, "vocab_size": 2048}
    tiny = make_tiny("mixtral", "scratch", f"{work}/mix", config_overrides=over, dtype="float32", shard_bytes=8 << 20)
    ckpt = open_checkpoint(tiny.path)
    runner = LayerRange(ckpt, 0, ckpt.facts.num_layers, device=args.device)
    head = OutputHead(ckpt, device=args.device)
    layers, E, L = ckpt.facts.moe_layers, ckpt.facts.num_experts, ckpt.facts.num_layers
    gen = torch.Generator().manual_seed(0)
    sequences = [torch.randint(3, 2048, (args.tokens,), generator=gen) for _ in range(args.sequences)]
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    variants = [Variant("ablate", l, str(e)) for l in layers for e in range(E)]

    def naive(ids):
        return [head.nll(run_rows(runner, runner.embed(ids), [v], {}, layers)[0], ids).item() for v in variants]

    def cached(ids):
        inputs = {}
        hidden = runner.embed(ids)
        positions = runner.positions(hidden)
        with torch.no_grad():
            for layer in runner.layers:
                inputs[layer] = hidden
                hidden = runner.run_layer(layer, hidden, positions)
        return [head.nll(run_rows(runner, inputs[v.layer], [v], {}, layers, start=v.layer)[0], ids).item()
                for v in variants]

    def sweep(ids):
        size = max(1, args.batch_tokens // len(ids) - 2)
        out = []
        for a in range(0, len(variants), size):
            chunk = variants[a:a + size]
            by_layer: dict[int, list[Variant]] = {}
            for v in chunk:
                by_layer.setdefault(v.layer, []).append(v)
            hidden, _, _ = run_rows(runner, runner.embed(ids), [None], by_layer, layers)
            out += head.nll(hidden, ids)[1:].tolist()
        return out

    results, seconds = {}, {}
    for name, fn in (("naive", naive), ("prefix cached", cached), ("moe-ray sweep", sweep)):
        fn(sequences[0][:16])  # warm up
        sync()
        started = time.perf_counter()
        results[name] = np.array([fn(ids) for ids in sequences])
        sync()
        seconds[name] = time.perf_counter() - started
    for name in results:  # float32 everywhere (no TF32): the batches change kernels, not results
        np.testing.assert_allclose(results[name], results["naive"], rtol=1e-5 if args.device == "cpu" else 1e-4,
                                   err_msg=name)
    interventions = len(variants) * args.sequences
    tokens = interventions * args.tokens
    row_passes = {"naive": len(variants) * L, "prefix cached": L + sum(L - v.layer for v in variants)}
    print(f"mixtral-style model: {L} layers, {E} experts (top-{ckpt.facts.top_k}), d_hid {args.hidden}, "
          f"{args.sequences} sequences x {args.tokens} tokens, {len(variants)} ablations each, "
          f"{args.device}{f', {args.threads} thread(s)' if args.device == 'cpu' else ''}; same losses from all "
          "three (checked)")
    for name in results:
        speed = tokens / seconds[name]
        ratio = seconds["naive"] / seconds[name]
        print(f"{name:14s} {speed:9.0f} tokens/s  {seconds[name]:7.2f} s  {ratio:5.2f}x naive")
    print(f"layer-row passes per sequence: naive {row_passes['naive']}, prefix cached / sweep "
          f"{row_passes['prefix cached']} ({row_passes['naive'] / row_passes['prefix cached']:.2f}x fewer; "
          f"at most 2L/(L+1) = {2 * L / (L + 1):.2f}x)")
    goal = L / 2
    got = seconds["naive"] / seconds["moe-ray sweep"]
    print(f"goal: sweep >= L/2 = {goal:g}x naive: {'met' if got >= goal else 'NOT met'} ({got:.2f}x)")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
