"""What the weights identity costs: content digests (xxh3_128) of tensor bytes vs reading them.

A resume recomputes the digest of every tensor a done unit read (`ResultStore.check_weights` via
`Checkpoint.piece_digests`), and every unit digests the tensors it just read. This measures, in one
run on this machine, over a synthetic safetensors checkpoint (bf16 experts, `--gib` of them):

- `read`: every tensor's bytes read as the check reads them (8 threads, `os.pread` of 64 MiB
  blocks), unhashed: the baseline (`read_one_thread`: the file in one thread);
- `digest`: `Checkpoint.piece_digests` of every tensor (read + xxh3_128, 8 threads), the resume check;
- `hash_only`: xxh3_128 of bytes already in memory (one core);
- `blake2b` and `sha256` of the same bytes, the cryptographic alternatives, for comparison;

each with a warm page cache (read once before), plus `read_cold`/`digest_cold` after dropping the
file's pages (POSIX_FADV_DONTNEED), and projects the resume check to Mixtral 8x7B and Grok-1.

    PYTHONPATH=. python benchmarks/bench_identity.py [--gib 1.0] [--repeat 3]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
import time

import torch
import xxhash
from safetensors.torch import save_file

BLOCK = 64 << 20
MODELS = {  # bytes every static/reorder unit reads (the experts) and the whole checkpoint, bf16
    "Mixtral 8x7B": {"experts": 32 * 8 * 3 * 14336 * 4096 * 2, "checkpoint": 93.4e9},
    "Grok-1 (HF bf16)": {"experts": 64 * 8 * 3 * 32768 * 6144 * 2, "checkpoint": 632e9},
}


def make_checkpoint(directory: str, gib: float) -> tuple[str, int]:
    """A mixtral-like single-file checkpoint of about `gib` GiB of bf16 expert matrices."""
    d_mid, d_hid = 2048, 1024
    per = d_mid * d_hid * 2
    n = max(3, int(gib * 2**30 // per))
    tensors = {f"model.layers.{i // 24}.block_sparse_moe.experts.{(i // 3) % 8}.w{i % 3 + 1}.weight":
               torch.randn(d_mid, d_hid).to(torch.bfloat16) for i in range(n)}
    path = os.path.join(directory, "model.safetensors")
    save_file(tensors, path, metadata={"format": "pt"})
    return path, n * per


def drop_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_all(path: str) -> int:
    fd = os.open(path, os.O_RDONLY)
    total, at = 0, 0
    try:
        while True:
            block = os.pread(fd, BLOCK, at)
            if not block:
                return total
            total += len(block)
            at += len(block)
    finally:
        os.close(fd)


def read_pieces(ckpt, pieces: list[str], threads: int = 8) -> int:
    """The same tensors' bytes read as `piece_digests` reads them (8 threads, 64 MiB blocks), unhashed."""
    from concurrent.futures import ThreadPoolExecutor

    def one(name: str) -> int:
        info = ckpt.tensors[name]
        fd = os.open(info.file, os.O_RDONLY)
        try:
            return sum(len(os.pread(fd, min(BLOCK, info.end - at), at)) for at in range(info.start, info.end, BLOCK))
        finally:
            os.close(fd)

    with ThreadPoolExecutor(threads) as pool:
        return sum(pool.map(one, pieces))


def timed(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    from moe_ray.checkpoint.reader import Checkpoint

    with tempfile.TemporaryDirectory(prefix="bench-identity-") as tmp:
        path, nbytes = make_checkpoint(tmp, args.gib)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump({"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 1024,
                       "intermediate_size": 2048, "num_hidden_layers": 64, "num_local_experts": 8,
                       "num_experts_per_tok": 2, "num_attention_heads": 8, "num_key_value_heads": 8,
                       "vocab_size": 32000}, f)
        ckpt = Checkpoint(tmp)
        pieces = sorted(ckpt.tensors)
        read_all(path)  # warm
        gb = nbytes / 1e9
        data = open(path, "rb").read()
        out = {"bytes": nbytes, "tensors": len(pieces), "cpus": os.cpu_count(),
               "load_avg": round(os.getloadavg()[0], 2)}
        seconds = {
            "read": timed(lambda: read_pieces(ckpt, pieces), args.repeat),
            "read_one_thread": timed(lambda: read_all(path), args.repeat),
            "digest": timed(lambda: ckpt.piece_digests(pieces), args.repeat),
            "hash_only": timed(lambda: xxhash.xxh3_128(data).hexdigest(), args.repeat),
            "blake2b": timed(lambda: hashlib.blake2b(data).hexdigest(), 1),
            "sha256": timed(lambda: hashlib.sha256(data).hexdigest(), 1),
        }
        cold = {}
        for name, fn in (("read_cold", lambda: read_pieces(ckpt, pieces)),
                         ("digest_cold", lambda: ckpt.piece_digests(pieces))):
            drop_cache(path)
            t = time.perf_counter()
            fn()
            cold[name] = time.perf_counter() - t
        seconds.update(cold)
        out["seconds"] = {k: round(v, 4) for k, v in seconds.items()}
        out["GB_per_s"] = {k: round(gb / v, 2) for k, v in seconds.items()}
        out["digest_over_read"] = round(seconds["digest"] / seconds["read"], 2)
        out["digest_cold_over_read_cold"] = round(seconds["digest_cold"] / seconds["read_cold"], 2)
        hash_rate = gb / seconds["hash_only"]
        out["projection"] = {
            name: {"expert_GB": round(m["experts"] / 1e9, 1),
                   "hash_s_one_core": round(m["experts"] / 1e9 / hash_rate, 1),
                   "check_s_at_2GBps_disk": round(m["experts"] / 2e9, 1),
                   "check_s_at_this_warm_digest_rate": round(m["experts"] / 1e9 / (gb / seconds["digest"]), 1)}
            for name, m in MODELS.items()}
        print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
