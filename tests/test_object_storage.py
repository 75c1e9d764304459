"""Checkpoints and stores in object storage, against a real S3 API server on 127.0.0.1 (moto's, a process
of its own: tests/s3_server.py): the model in one bucket, the store in another, every analysis, the
store equal value for value to a local run's, the report drawn from it; a unit fetches only the byte
ranges it reads; storage that cannot be read or written is one line before any unit runs.

One upload and one pair of runs (S3 and local) serve the whole module.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import zarr

from moe_ray import api
from moe_ray.cli import main
from moe_ray.fs import use_storage_options
from moe_ray.store import _zarr_store

MODEL_BUCKET, STORE_BUCKET = "moe-models", "moe-stores"
RUN = {"analyses": ["static", "reorder", "dynamic", "causal"], "progress": False, "layers": [1, 2],
       "reorder": {"pairs": ["0-1", "2-5"]},
       "dynamic": {"inputs": ["short", "long"], "max_sequences": 2, "max_tokens": 24},
       "causal": {"checks": ["norm_routing"], "bootstrap_resamples": 20}}
NO_AWS = {"AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent",
          "AWS_EC2_METADATA_DISABLED": "true"}
"""No credentials from files or an instance's metadata service: only what a test gives."""


@pytest.fixture(scope="module")
def aws_env():
    """The module runs with no AWS_* variables of the machine's and no credential files."""
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("AWS_")}
    os.environ.update(NO_AWS)
    yield
    for k in NO_AWS:
        os.environ.pop(k, None)
    os.environ.update(saved)


@pytest.fixture(scope="module")
def uploaded(s3_server, tiny, aws_env):
    """A tiny upcycled mixtral and its dense parent, uploaded to s3://moe-models/; (local checkpoint,
    model URL, reference URL)."""
    t = tiny("mixtral", "upcycled")
    fs = s3_server.filesystem()
    s3_server.make_bucket(MODEL_BUCKET)
    s3_server.make_bucket(STORE_BUCKET)
    fs.put(str(t.path) + "/", f"{MODEL_BUCKET}/mixtral/", recursive=True)
    return t, f"s3://{MODEL_BUCKET}/mixtral", f"s3://{MODEL_BUCKET}/mixtral/{t.reference.name}"


@pytest.fixture(scope="module")
def runs(ray_session, s3_server, uploaded, tmp_path_factory):
    """Every analysis from S3 into S3 (options in the spec: the session's workers never saw the
    server's environment), and the same job from the local copy into a local store."""
    import time
    t, model, reference = uploaded
    t0 = time.time()
    remote = api.run(model=model, reference=reference, store=f"s3://{STORE_BUCKET}/mixtral.zarr",
                     storage_options=s3_server.storage_options, **RUN)
    t1 = time.time()
    local = api.run(model=str(t.path), reference=str(t.reference),
                    store=str(tmp_path_factory.mktemp("local") / "mixtral.zarr"), **RUN)
    print("TIMING s3", t1 - t0, "local", time.time() - t1)
    return remote, local


def _arrays(url: str, storage_options: dict | None = None) -> dict[str, np.ndarray]:
    with use_storage_options(storage_options):
        root = zarr.open_group(_zarr_store(url, "r"), mode="r", use_consolidated=False)
        return {path: member[...] for path, member in root.members(max_depth=None) if isinstance(member, zarr.Array)}


def test_every_analysis_from_s3_into_s3_equals_a_local_run(runs, s3_server):
    remote, local = runs
    got, want = _arrays(remote, s3_server.storage_options), _arrays(local)
    assert set(got) == set(want)
    assert {p.split("/")[0] for p in got} >= {"static", "reorder", "dynamic", "causal"}
    for path, values in want.items():
        if values.dtype.kind in "fc":
            np.testing.assert_array_equal(got[path], values, err_msg=path)
        else:
            assert got[path].tolist() == values.tolist(), path
    with use_storage_options(s3_server.storage_options):
        attrs = dict(zarr.open_group(_zarr_store(remote, "r"), mode="r").attrs)
    assert attrs["state"] == "complete"
    recorded = attrs["spec"]["storage_options"]
    assert recorded["key"] == recorded["secret"] == "<redacted>"  # never a secret in the store
    assert recorded["endpoint_url"] == s3_server.endpoint_url
    assert s3_server.secret not in json.dumps(attrs)


def test_plot_of_the_s3_store_with_credentials_from_the_environment(runs, s3_server, tmp_path, monkeypatch, capsys):
    remote, _ = runs
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    out = tmp_path / "report"
    assert main(["plot", remote, "--out", str(out), "--parallel", "none"]) == 0, capsys.readouterr().err
    html = (out / "index.html").read_text()
    assert "mixtral" in html and len(list((out / "figures").iterdir())) > 5
