"""Shared fixtures: one local Ray per test session (2 CPUs, no dashboard) and cached tiny checkpoints."""
from __future__ import annotations

import os

import pytest

from moe_ray.checkpoint.tiny import make_tiny


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory):
    """A local Ray for the whole session, started the way moe-ray starts one (token auth on)."""
    import ray

    from moe_ray.distributed.cluster import connect

    os.environ.setdefault("RAY_AUTH_TOKEN_PATH", str(tmp_path_factory.mktemp("ray-auth") / "auth_token"))
    connect(num_cpus=2, object_store_memory_gb=0.5)
    yield ray
    ray.shutdown()


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
