"""Where a dynamic capture pass spends its time, on a device: a plain transformers forward, moe-ray's
own layer loop without the capture, and with it, at the given widths; then torch's profiler on the
capture pass (its top operators by device time).

    python -m benchmarks.profile_dynamic [--device cuda] [--widths 1024x3584x4,4096x14336x1] [--tokens 1100]

A width is hidden x d_mid x layers of a Mixtral-style checkpoint with random weights (8 experts, top-2).
Prints one JSON line per figure.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def _best(fn, device: torch.device, repeat: int = 3) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return min(times)


def profile_width(work: Path, device: torch.device, hidden: int, d_mid: int, layers: int, tokens: int,
                  top: int) -> None:
    from transformers import AutoModelForCausalLM

    from moe_ray.checkpoint import open_checkpoint
    from moe_ray.checkpoint.tiny import make_tiny
    from moe_ray.runtime import LayerRange

    overrides = {"hidden_size": hidden, "intermediate_size": d_mid, "num_hidden_layers": layers,
                 "head_dim": 128 if hidden >= 1024 else 16, "num_attention_heads": max(4, hidden // 128),
                 "num_key_value_heads": max(2, hidden // 512)}
    ck = make_tiny("mixtral", "scratch", work / f"w{hidden}", config_overrides=overrides, overwrite=True,
                   shard_bytes=1 << 30)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    ids = (torch.arange(tokens) * 37 + 5) % 500 + 3
    model = AutoModelForCausalLM.from_pretrained(str(ck.path), dtype=dtype).to(device).eval()
    runner = LayerRange(open_checkpoint(ck.path), 0, layers, device=device, dtype=dtype)
    with torch.no_grad():
        plain = _best(lambda: model.model(input_ids=ids.unsqueeze(0).to(device)), device)
    del model
    own = _best(lambda: runner.forward(runner.embed(ids), capture=False), device)
    capture = _best(lambda: runner.forward(runner.embed(ids), probe_tokens=4), device)
    print(json.dumps({"width": f"{hidden}x{d_mid}x{layers}", "device": device.type, "tokens": tokens,
                      "plain_s": round(plain, 4), "own_loop_no_capture_s": round(own, 4),
                      "capture_s": round(capture, 4), "capture_over_plain": round(capture / plain, 2)}), flush=True)
    activities = [torch.profiler.ProfilerActivity.CPU]
    sort = "cpu_time_total"
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        sort = "cuda_time_total"
    with torch.profiler.profile(activities=activities) as prof:
        runner.forward(runner.embed(ids), probe_tokens=4)
        if device.type == "cuda":
            torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by=sort, row_limit=top, max_name_column_width=60)
    print(table, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--widths", default="1024x3584x4,4096x14336x1")
    parser.add_argument("--tokens", type=int, default=1100)
    parser.add_argument("--top", type=int, default=18)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    work = Path(tempfile.mkdtemp(prefix="moe-ray-profile-"))
    for width in args.widths.split(","):
        hidden, d_mid, layers = (int(x) for x in width.split("x"))
        profile_width(work, device, hidden, d_mid, layers, args.tokens, args.top)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
