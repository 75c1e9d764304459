"""Shared fixtures: one local Ray per test session (2 CPUs, no dashboard) and cached tiny checkpoints."""
from __future__ import annotations

import os

import pytest

# gcsfs reads this once, when it is first imported (by any test, through fsspec): on, its filesystems probe
# each bucket's type over gRPC, which the GCS test server does not speak, for 60 s per bucket and filesystem
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"

from moe_ray.checkpoint.tiny import make_tiny


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory):
    """A local Ray for the whole session, started the way moe-ray starts one (token auth on)."""
    import shutil
    import tempfile

    import ray

    from moe_ray.distributed.cluster import connect

    os.environ.setdefault("RAY_AUTH_TOKEN_PATH", str(tmp_path_factory.mktemp("ray-auth") / "auth_token"))
    # A Ray temp dir of our own (short: Ray's socket paths live in it), so that a head someone else
    # started with `ray start` on this machine (/tmp/ray/ray_current_cluster) is never joined.
    temp = tempfile.mkdtemp(prefix="mrt", dir="/tmp")
    os.environ.setdefault("RAY_TMPDIR", temp)
    connect(num_cpus=2, object_store_memory_gb=0.5)
    yield ray
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """tiny(family, variant, seed=0, **kw) -> TinyCheckpoint, built once per session per arguments."""
    cache = {}

    def build(family: str, variant: str, seed: int = 0, **kwargs):
        key = (family, variant, seed, tuple(sorted(kwargs.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"{family}-{variant}") / "ckpt"
            cache[key] = make_tiny(family, variant, out, seed=seed, **kwargs)
        return cache[key]

    return build


BIG = {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 4, "num_attention_heads": 4,
       "num_key_value_heads": 4, "head_dim": 128}
"""A mixtral whose layers are big enough (~1 s of static work each, 100 MB of float32 experts) that a
unit is caught while it runs."""


@pytest.fixture(scope="session")
def big_mixtral(tmp_path_factory):
    """The BIG mixtral (independent experts, seed 11), built once per session."""
    return make_tiny("mixtral", "scratch", tmp_path_factory.mktemp("big") / "ckpt", seed=11, config_overrides=BIG)


@pytest.fixture(scope="session")
def big_clean(ray_session, big_mixtral, tmp_path_factory):
    """big_clean(kind) -> the store of an uninterrupted run of `big_clean.runs[kind]` on the big mixtral
    (static: every layer; reorder: 2 layers x 2 pairs), made once per session on the local Ray: the
    reference of the tests that kill, stop or interrupt the same run."""
    import moe_ray

    stores: dict[str, str] = {}

    def clean(kind: str) -> str:
        if kind not in stores:
            out = tmp_path_factory.mktemp(f"clean-{kind}") / "clean.zarr"
            stores[kind] = moe_ray.run(model=str(big_mixtral.path), store=str(out), progress=False, **clean.runs[kind])
        return stores[kind]

    clean.runs = {"static": {"analyses": ["static"]},
                  "reorder": {"analyses": ["reorder"], "layers": [0, 1], "reorder": {"pairs": ["0-1", "2-3"]}}}
    return clean


@pytest.fixture
def settled_done():
    """settled_done(store, group) -> the group's unit_done (bool) once nothing has changed it for 3 s:
    a worker of a killed or stopped driver may still finish its unit in the moment before it notices."""
    import time

    import numpy as np
    import zarr

    def settle(store: str, group: str, quiet_s: float = 3.0, limit_s: float = 60.0) -> np.ndarray:
        def read() -> np.ndarray:
            return np.asarray(zarr.open_group(store, mode="r")[f"{group}/unit_done"][...]).astype(bool)

        done, since, deadline = read(), time.monotonic(), time.monotonic() + limit_s
        while time.monotonic() - since < quiet_s and time.monotonic() < deadline:
            time.sleep(0.2)
            now = read()
            if not np.array_equal(now, done):
                done, since = now, time.monotonic()
        return done

    return settle


def _dynamic_store_in_process(model, store: str, run_kwargs: dict) -> str:
    """The store an uninterrupted dynamic run writes, made by the very shard code the actors run, here
    in this process, shard after shard (no actor start-ups; the actors run with one thread: so does
    this)."""
    import torch

    from moe_ray.api import plan
    from moe_ray.spec import Spec
    from moe_ray.store import ResultStore
    from moe_ray.units.dynamic import ShardWorker

    spec = Spec.from_dict({"model": str(model), "store": store, **run_kwargs})
    _, _, (job,) = plan(spec)
    result = ResultStore.create_or_reuse(store, {"model": "in-process"}, spec.to_dict())
    job.prepare(result, overwrite=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        shards = [ShardWorker(job.plan, s, "cpu") for s in range(len(job.plan.shards))]
        for item in job.plan.inputs:
            value = list(item.ids)
            for shard in shards:
                value = shard.run(item.name, value)
    finally:
        torch.set_num_threads(threads)
    result.consolidate()
    return store


@pytest.fixture(scope="session")
def dynamic_store_in_process():
    """dynamic_store_in_process(model, store, run_kwargs) -> store: an uninterrupted dynamic run's
    store, computed in this process by the shard actors' own code."""
    return _dynamic_store_in_process


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory):
    """A GCS API server (fake-gcs-server, from its PyPI wheel) on 127.0.0.1 for the whole session
    (tests/gcs_server.py)."""
    from gcs_server import start_gcs_server

    server = start_gcs_server(tmp_path_factory.mktemp("gcs"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 API server (moto's) on 127.0.0.1 for the whole session (tests/s3_server.py)."""
    from s3_server import start_s3_server

    server = start_s3_server(tmp_path_factory.mktemp("s3"))
    yield server
    server.stop()
