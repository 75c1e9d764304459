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
import s3fs
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


@pytest.fixture(autouse=True)
def fresh_filesystems():
    """fsspec reuses a filesystem made with the same arguments, credentials and all: each test (and each
    change of AWS_* variables within one) starts from none."""
    s3fs.S3FileSystem.clear_instance_cache()
    yield
    s3fs.S3FileSystem.clear_instance_cache()


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
    t, model, reference = uploaded
    remote = api.run(model=model, reference=reference, store=f"s3://{STORE_BUCKET}/mixtral.zarr",
                     storage_options=s3_server.storage_options, **RUN)
    local = api.run(model=str(t.path), reference=str(t.reference),
                    store=str(tmp_path_factory.mktemp("local") / "mixtral.zarr"), **RUN)
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


class _GetCounter:
    """Bytes the S3 server sent for GET requests of this process, counted at s3fs's one call into
    botocore (`S3FileSystem._call_s3`): every read path (cat_file, ranges, files) goes through it."""

    def __init__(self, monkeypatch):
        import s3fs

        self.bytes = self.requests = 0
        original = s3fs.S3FileSystem._call_s3

        async def counting(fs, method, *args, **kwargs):
            out = await original(fs, method, *args, **kwargs)
            if method == "get_object":
                self.bytes += int(out.get("ContentLength", 0))
                self.requests += 1
            return out

        monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", counting)


def test_a_unit_fetches_only_the_byte_ranges_it_reads(uploaded, s3_server, tmp_path, monkeypatch):
    """A static unit (one layer: 8 experts x 3 matrices, the router, the reference's FFN) run here as a
    Ray task runs it, from S3 into a local store: the bytes the server sends are at most 1.1 x the bytes
    of the tensors the unit reads (the header pass, config.json and the index included)."""
    from moe_ray.checkpoint import open_checkpoint
    from moe_ray.spec import Spec
    from moe_ray.store import ResultStore
    from moe_ray.units.static import StaticJob

    _, model, reference = uploaded
    spec = Spec.from_dict({"model": model, "reference": reference, "store": str(tmp_path / "s.zarr"),
                           "layers": [2], "storage_options": s3_server.storage_options})
    with use_storage_options(spec.storage_options):
        _, _, (job,) = api.plan(spec)
        assert isinstance(job, StaticJob)
        store = ResultStore.create_or_reuse(spec.store, {"model": "test"}, spec.to_dict())
        (unit,) = job.prepare(store, overwrite=False)
        ckpt, ref = open_checkpoint(model), open_checkpoint(reference)
        keys = [ckpt.family.router_weight_key(2)] + [
            k for e in range(8) for k in ckpt.family.expert_keys(2, e).values()]
        needed = sum(ckpt.info(k).nbytes for k in keys) + sum(
            ref.info(k).nbytes for k in ref.family.dense_ffn_keys(2).values())
        counter = _GetCounter(monkeypatch)
        job.unit_function()(*unit.args)
    assert unit.label and ResultStore(spec.store).root["static/unit_done"][0] == 1
    assert needed > 300_000 and counter.bytes <= 1.1 * needed, (counter.bytes, needed, counter.requests)


def _cli_error(args: list[str], capsys) -> str:
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("moe-ray: error: ") and "\n" not in err, err
    return err


def test_storage_that_cannot_be_read_or_written_is_one_line_before_any_unit(uploaded, s3_server, tmp_path,
                                                                            monkeypatch, capsys):
    _, model, _ = uploaded
    endpoint = {"endpoint_url": s3_server.endpoint_url, "client_kwargs": {"region_name": s3_server.region}}
    base = ["run", "--analyses", "static", "--no-progress"]
    store = f"s3://{STORE_BUCKET}/refused.zarr"

    err = _cli_error(base + ["--model", model, "--store", store, "--storage-options", json.dumps(endpoint)], capsys)
    assert f"checkpoint {model}: no credentials" in err and "AWS_ACCESS_KEY_ID" in err

    options = json.dumps(s3_server.storage_options)
    missing_model = "s3://no-such-models/mixtral"
    err = _cli_error(base + ["--model", missing_model, "--store", store, "--storage-options", options], capsys)
    assert missing_model in err and ("no such bucket" in err or "not found" in err)

    missing_store = "s3://no-such-stores/out.zarr"
    err = _cli_error(base + ["--model", model, "--store", missing_store, "--storage-options", options], capsys)
    assert f"cannot write the store {missing_store}: no such bucket" in err

    never = f"s3://{STORE_BUCKET}/never-made.zarr"  # no credentials: not "damaged", not "not found"
    err = _cli_error(["plot", never, "--out", str(tmp_path / "report"), "--parallel", "none"], capsys)
    assert f"cannot look at the store {never}: no credentials" in err and "damaged" not in err
    for key, value in s3_server.env.items():  # with credentials: a store that was never made is not found
        monkeypatch.setenv(key, value)
    s3fs.S3FileSystem.clear_instance_cache()
    err = _cli_error(["plot", never, "--out", str(tmp_path / "report"), "--parallel", "none"], capsys)
    assert err == f"moe-ray: error: store not found: {never}"
    for key in s3_server.env:
        monkeypatch.delenv(key)

    err = _cli_error(base + ["--model", "s3x://b/m", "--store", store], capsys)
    assert "unknown protocol s3x://" in err and "s3://" in err and "gs://" in err

    err = _cli_error(base + ["--model", model, "--store", "memory://out.zarr", "--storage-options", options], capsys)
    assert "memory:// lives in one process's memory" in err
    assert not s3_server.filesystem().exists(f"{STORE_BUCKET}/refused.zarr")


def test_a_refused_write_is_one_line_naming_the_store_before_any_unit(uploaded, tmp_path, monkeypatch, capsys):
    """A second S3 server that checks IAM policies (moto's INITIAL_NO_AUTH_ACTION_COUNT: the first six
    calls, which make the users, are not checked): a writer uploads the model, a reader may read it
    but every PutObject is denied, so the store cannot be written."""
    import boto3
    from s3_server import start_s3_server

    t, _, _ = uploaded
    monkeypatch.setenv("INITIAL_NO_AUTH_ACTION_COUNT", "6")
    server = start_s3_server(tmp_path)
    monkeypatch.delenv("INITIAL_NO_AUTH_ACTION_COUNT")
    try:
        iam = boto3.client("iam", endpoint_url=server.endpoint_url, region_name="us-east-1",
                           aws_access_key_id="setup", aws_secret_access_key="setup")
        allow = {"Effect": "Allow", "Action": "s3:*", "Resource": "*"}
        deny_put = {"Effect": "Deny", "Action": "s3:PutObject", "Resource": "*"}
        keys = {}
        for user, statements in (("writer", [allow]), ("reader", [allow, deny_put])):
            iam.create_user(UserName=user)
            iam.put_user_policy(UserName=user, PolicyName="s3", PolicyDocument=json.dumps(
                {"Version": "2012-10-17", "Statement": statements}))
            key = iam.create_access_key(UserName=user)["AccessKey"]
            keys[user] = {"key": key["AccessKeyId"], "secret": key["SecretAccessKey"],
                          "endpoint_url": server.endpoint_url, "client_kwargs": {"region_name": server.region}}
        import s3fs

        writer = s3fs.S3FileSystem(skip_instance_cache=True, **keys["writer"])
        writer.mkdir("locked-bucket")
        writer.put(str(t.path) + "/", "locked-bucket/mixtral/", recursive=True)
        store = "s3://locked-bucket/out.zarr"
        err = _cli_error(["run", "--model", "s3://locked-bucket/mixtral", "--store", store, "--analyses", "static",
                          "--no-progress", "--storage-options", json.dumps(keys["reader"])], capsys)
        assert f"cannot write the store {store}: permission denied" in err
        assert not writer.exists("locked-bucket/out.zarr")
    finally:
        server.stop()


def test_a_file_url_checkpoint_tokenizes_as_its_directory(tiny, tmp_path):
    """The tokenizer is read through the checkpoint's filesystem (transformers would take a file:// URL
    for a hub repo id): the same token ids from `file://DIR` as from `DIR`, planned without Ray."""
    from moe_ray.spec import Spec

    t = tiny("mixtral", "upcycled")

    def inputs(model: str):
        spec = Spec.from_dict({"model": model, "store": str(tmp_path / "s.zarr"), "analyses": ["dynamic"],
                               "dynamic": {"inputs": ["short", "long"], "max_tokens": 64}})
        _, _, (job,) = api.plan(spec)
        return [(i.name, i.ids) for i in job.plan.inputs]

    local = inputs(str(t.path))
    assert inputs(f"file://{t.path}") == local and len(local[1][1]) == 64 and local[0][1][0] == 1  # BOS
