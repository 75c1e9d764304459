"""Bytes an S3 checkpoint sends for one static unit vs the bytes of the tensors the unit reads (issue 21).

    PYTHONPATH=. python benchmarks/bench_object_storage.py [--hidden 512] [--mid 2048]

Starts a real S3 API server on 127.0.0.1 (moto's, tests/s3_server.py), uploads a tiny mixtral (widths
as given), and runs one static unit (one layer: 8 experts x 3 matrices, the router, the dense
parent's FFN) in this process as a Ray task runs it, counting the bytes of every GET the server answers
(s3fs's one call into botocore). In the same run, the baseline: the same tensors read through s3fs's
default `open()` (its read-ahead block cache). Prints one JSON line: bytes fetched / bytes read for
both (the issue's target: <= 1.1 for moe-ray's reads), GET requests, and the unit's seconds.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--mid", type=int, default=2048)
    args = parser.parse_args()

    import s3fs
    from s3_server import start_s3_server

    from moe_ray import api
    from moe_ray.checkpoint import open_checkpoint
    from moe_ray.checkpoint.tiny import make_tiny
    from moe_ray.fs import use_storage_options
    from moe_ray.spec import Spec
    from moe_ray.store import ResultStore

    work = Path(tempfile.mkdtemp(prefix="bench-s3-"))
    server = start_s3_server(work)
    counted = {"bytes": 0, "requests": 0}
    original = s3fs.S3FileSystem._call_s3

    async def counting(fs, method, *a, **k):
        out = await original(fs, method, *a, **k)
        if method == "get_object":
            counted["bytes"] += int(out.get("ContentLength", 0))
            counted["requests"] += 1
        return out

    try:
        tiny = make_tiny("mixtral", "upcycled", work / "ckpt", config_overrides={
            "hidden_size": args.hidden, "intermediate_size": args.mid, "head_dim": args.hidden // 4},
            shard_bytes=64 * 2**20)
        server.make_bucket("models")
        server.filesystem().put(str(tiny.path) + "/", "models/mixtral/", recursive=True)
        model, reference = "s3://models/mixtral", f"s3://models/mixtral/{tiny.reference.name}"
        spec = Spec.from_dict({"model": model, "reference": reference, "store": str(work / "s.zarr"),
                               "layers": [1], "storage_options": server.storage_options})
        with use_storage_options(spec.storage_options):
            _, _, (job,) = api.plan(spec)
            (unit,) = job.prepare(ResultStore.create_or_reuse(spec.store, {"model": "bench"}, spec.to_dict()), False)
            ckpt, ref = open_checkpoint(model), open_checkpoint(reference)
            keys = [ckpt.family.router_weight_key(1)] + [k for e in range(ckpt.facts.num_experts)
                                                         for k in ckpt.family.expert_keys(1, e).values()]
            model_bytes = sum(ckpt.info(k).nbytes for k in keys)
            needed = model_bytes + sum(ref.info(k).nbytes for k in ref.family.dense_ffn_keys(1).values())
            s3fs.S3FileSystem._call_s3 = counting
            started = time.monotonic()
            job.unit_function()(*unit.args)
            seconds = time.monotonic() - started
            unit_fetched, unit_requests = counted["bytes"], counted["requests"]
            counted.update(bytes=0, requests=0)
            plain = s3fs.S3FileSystem(skip_instance_cache=True, **server.storage_options)
            for key in keys:
                info = ckpt.info(key)
                with plain.open(info.file, "rb") as f:
                    f.seek(info.start)
                    f.read(info.nbytes)
    finally:
        s3fs.S3FileSystem._call_s3 = original
        server.stop()
    print(json.dumps({
        "unit_tensor_bytes": needed, "unit_fetched_bytes": unit_fetched, "unit_ratio": round(unit_fetched / needed, 4),
        "unit_get_requests": unit_requests, "unit_seconds": round(seconds, 2),
        "default_open_tensor_bytes": model_bytes, "default_open_fetched_bytes": counted["bytes"],
        "default_open_ratio": round(counted["bytes"] / model_bytes, 3),
        "default_open_get_requests": counted["requests"]}))


if __name__ == "__main__":
    main()
