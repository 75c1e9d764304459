"""Ray job service: a real local head (cluster/local/start-head.sh, token auth on, job server on
127.0.0.1, private temp dir and ports, 2 CPUs and one declared GPU so that GPU placement is checked
on any machine), moe-ray specs submitted through `moe_ray.submit`."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
import zarr

import moe_ray
from moe_ray.checkpoint import open_checkpoint
from moe_ray.checkpoint.tiny import make_tiny
from moe_ray.service import store_progress
from moe_ray.errors import CheckpointError, JobError, SpecError

from ports import free_port, head_ports

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "cluster" / "local"


@pytest.fixture(scope="module")
def head():
    """A token-authenticated local head for this module; stopped (by process id) at the end."""
    from moe_ray.distributed.cluster import ensure_token_auth, token_path

    temp = Path(tempfile.mkdtemp(prefix="mrs-", dir="/tmp"))
    os.environ.setdefault("RAY_AUTH_TOKEN_PATH", str(temp / "auth_token"))
    ensure_token_auth()
    env = dict(os.environ, PYTHON=sys.executable, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_path()))
    env.pop("RAY_ADDRESS", None)
    dashboard = free_port()
    ports = head_ports()
    cmd = [str(SCRIPTS / "start-head.sh"), "--dashboard-port", str(dashboard), "--temp-dir", str(temp / "ray"),
           "--num-cpus", "2", "--num-gpus", "1", "--object-store-memory", str(200 * 2**20), *map(str, ports)]
    try:
        subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, timeout=120)
        assert not Path("/tmp/ray/ray_current_cluster").exists() or \
            Path("/tmp/ray/ray_current_cluster").read_text() != (temp / "ray" / "ray_current_cluster").read_text()
        yield f"http://127.0.0.1:{dashboard}"
    finally:
        subprocess.run([str(SCRIPTS / "stop-head.sh"), "--temp-dir", str(temp / "ray")], env=env,
                       capture_output=True, timeout=60)
        shutil.rmtree(temp, ignore_errors=True)


def test_submit_follow_wait_result(head, tiny, tmp_path):
    ckpt = tiny("mixtral", "upcycled")
    store = tmp_path / "job.zarr"
    handle = moe_ray.submit({"model": str(ckpt.path), "store": str(store)}, head)
    assert handle.id.startswith("raysubmit_")
    lines: list[str] = []
    handle.follow(lines.append)
    status = handle.wait(timeout=120)
    assert status.state == "SUCCEEDED", handle.logs()
    assert status.progress == {"static": (4, 4)}
    log = "".join(lines)
    assert "moe-ray: static units: 4/4 unit (100%" in log and "moe-ray: results in" in log

    tree = handle.result()
    sim = tree["static"].to_dataset()["matrix_similarity"]
    c = open_checkpoint(ckpt.path)
    a = c.read(c.family.expert_keys(2, 0)["up"], dtype=torch.float64).numpy().ravel()
    b = c.read(c.family.expert_keys(2, 5)["up"], dtype=torch.float64).numpy().ravel()
    want = a @ b / np.linalg.norm(a) / np.linalg.norm(b)
    got = float(sim.sel(layer=2, matrix="up", expert_i=0, expert_j=5))
    assert got == pytest.approx(want, abs=1e-5)
    assert np.asarray(zarr.open_group(str(store), mode="r")["static/unit_done"][...]).all()

    listed = {s.id: s for s in moe_ray.jobs(head)}
    assert listed[handle.id].state == "SUCCEEDED" and listed[handle.id].store == str(store)
    assert listed[handle.id].progress == {"static": (4, 4)}  # `moe-ray list` shows progress too


@pytest.fixture(scope="module")
def demo_job(head, tiny, tmp_path_factory):
    """A submitted job of the demo's analyses (static, reorder, dynamic on a tiny mixtral with its
    dense parent as F): (handle, final status, log, store)."""
    ckpt = tiny("mixtral", "upcycled")
    store = str(tmp_path_factory.mktemp("demo-job") / "demo.zarr")
    handle = moe_ray.submit({"model": str(ckpt.path), "reference": str(ckpt.reference), "store": store,
                             "analyses": ["static", "reorder", "dynamic"]}, head)
    status = handle.wait(timeout=240, progress=False)
    return handle, status, handle.logs(), store


def test_demo_analyses_job_log_is_short_and_plain(demo_job):
    """The job's log is one a user reads: at most 100 lines, none blank, no progress-bar redraws, every
    one moe-ray's own (Ray's per-task output stays in Ray's logs); its status names its own run's units."""
    handle, status, log, _ = demo_job
    assert status.state == "SUCCEEDED", log
    lines = log.splitlines()
    assert 5 <= len(lines) <= 100, log
    assert "\r" not in log and all(line.strip() for line in lines), log
    ray_preamble = ("Runtime env is setting up.", "Running entrypoint for job ")  # Ray's job manager, first
    assert all(line.startswith("moe-ray: ") or any(p in line for p in ray_preamble) for line in lines), log
    for what in ("planning: ", "connecting to ", "static units: 4/4", "reorder units: 112/112 pair",
                 "dynamic shard 0 of 1 (layers 0-3): 1114/1114 token", "done in ", "results in "):
        assert sum(what in line for line in lines) == 1, (what, log)
    assert status.line() == f"{handle.id}: SUCCEEDED (static 4/4, reorder 112/112, dynamic 8/8 units)"


def test_demo_store_as_xarray_expects(demo_job, tmp_path):
    """open_results: expert dimensions select by integer code and by label (F = -1), bookkeeping
    arrays are coordinates, and every group goes through a real to_netcdf round trip."""
    from moe_ray.store import SCHEMA_VERSION

    store = demo_job[3]
    tree = moe_ray.open_results(store)
    assert json.loads(tree.attrs["moe_ray"])["schema_version"] == SCHEMA_VERSION == 2
    static = tree["static"].to_dataset()
    by_code = static.matrix_similarity.sel(layer=1, matrix="gate", expert_i=-1, expert_j=3)
    by_label = static.matrix_similarity.sel(layer=1, matrix="gate", expert_i_label="F", expert_j_label="3")
    assert float(by_code) == float(by_label) and np.isfinite(float(by_code))
    assert list(static.expert_i.values) == list(range(8)) + [-1]
    assert "F = -1" in static.expert_i_label.attrs["description"] or "code -1" in static.expert_i_label.attrs["description"]
    dyn = tree["dynamic/long"].to_dataset()
    assert float(dyn.expert_output_norms.sel(layer=0, token=5, expert_label="7")) == float(
        dyn.expert_output_norms.sel(layer=0, token=5, expert=7))
    checked = 0
    for node in tree.subtree:
        ds = node.to_dataset()
        assert "unit_done" not in ds.data_vars and "unit_planned" not in ds.data_vars
        if "unit_done" in ds.coords:
            planned = ds.unit_planned.values if "unit_planned" in ds.coords else np.ones_like(ds.unit_done.values)
            assert ds.unit_done.attrs["role"] == "bookkeeping" and (ds.unit_done.values[planned == 1] == 1).all()
        path = tmp_path / f"{node.path.strip('/').replace('/', '_') or 'root'}.nc"
        ds.to_netcdf(path)
        back = xr.open_dataset(path).load()
        for name in ds.data_vars:
            np.testing.assert_array_equal(back[name].values, ds[name].values, err_msg=f"{node.path}/{name}")
        assert set(back.attrs) == set(ds.attrs)
        checked += 1
    assert checked >= 6  # root, static, reorder, reorder/joint, dynamic, dynamic/short, dynamic/long
    assert json.loads(tree["static"].attrs["params"])["labels"][-1] == "F"


def test_stop_then_list(head, tiny, tmp_path):
    ckpt = tiny("mixtral", "upcycled")
    handle = moe_ray.submit({"model": str(ckpt.path), "store": str(tmp_path / "stopped.zarr")}, head)
    handle.stop()
    assert handle.wait(timeout=60).state == "STOPPED"
    assert {s.id: s.state for s in moe_ray.jobs(head)}[handle.id] == "STOPPED"
    with pytest.raises(JobError, match="stopped"):
        handle.result()


# Layers big enough (~1 s of static work each) that a job is caught half-way.
BIG = {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 4, "num_attention_heads": 4,
       "num_key_value_heads": 4, "head_dim": 128}


def test_stopped_job_resubmitted_runs_only_the_unfinished_units(head, tmp_path, settled_done):
    """Stop a running job through the job server once some of its units are done, resubmit the same
    spec: the new job runs exactly the units not yet done, and the store equals an uninterrupted
    job's (submitted alongside the resumed one)."""
    model = str(make_tiny("mixtral", "scratch", tmp_path / "big", seed=11, config_overrides=BIG).path)
    spec = {"model": model, "store": str(tmp_path / "stopped.zarr")}
    first = moe_ray.submit(spec, head)
    while (done := store_progress(spec["store"]).get("static", (0, 4))[0]) < 1:
        assert not first.status().terminal, first.logs()
        time.sleep(0.1)
    first.stop()
    assert first.wait(timeout=60, poll=0.2).state == "STOPPED"
    flags = settled_done(spec["store"], "static")  # one per layer 0..3
    ending = [line for line in first.logs().splitlines() if line.strip()][-1]  # SIGTERM: one line, then gone
    assert ending.startswith("moe-ray: interrupted by SIGTERM. Finished: nothing. Not finished: static ("), ending
    assert ending.endswith("resume with: `moe-ray submit` of the same spec (only unfinished units run)"), ending
    unfinished = [str(layer) for layer, flag in enumerate(flags) if not flag]
    assert 1 <= len(unfinished) < 4, "the job was not stopped half-way"

    def chunk_times() -> dict[str, list[int]]:  # per layer, when its chunks of one array were written
        arrays = Path(spec["store"]) / "static" / "matrix_similarity" / "c"
        return {str(layer): [p.stat().st_mtime_ns for p in sorted((arrays / str(layer)).rglob("*")) if p.is_file()]
                for layer in range(4)}

    before = chunk_times()
    resumed = moe_ray.submit(spec, head)
    clean = moe_ray.submit({"model": model, "store": str(tmp_path / "clean.zarr")}, head)
    assert resumed.wait(timeout=120).state == "SUCCEEDED", resumed.logs()
    assert clean.wait(timeout=120).state == "SUCCEEDED", clean.logs()
    log = resumed.logs()
    todo = int(re.search(r"(\d+) of 4 units to run", log).group(1))
    after = chunk_times()
    ran = [layer for layer in after if after[layer] != before[layer]]  # a done layer's chunks are not rewritten
    assert todo == len(unfinished) and ran == unfinished, log
    assert f"{todo} units computed, {4 - todo} already done" in log
    a, b = xr.open_zarr(clean.status().store, group="static"), xr.open_zarr(spec["store"], group="static")
    assert set(a.data_vars) == set(b.data_vars) and b.unit_done.values.all()
    for name in a.data_vars:
        np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)


def test_bad_spec_rejected_before_submission(head, tiny, tmp_path):
    before = len(moe_ray.jobs(head))
    with pytest.raises(CheckpointError, match="checkpoint directory not found"):
        moe_ray.submit({"model": str(tmp_path / "nowhere"), "store": str(tmp_path / "x.zarr")}, head)
    with pytest.raises(SpecError, match="unknown analysis 'nope'"):
        moe_ray.submit({"model": str(tiny("mixtral", "upcycled").path), "analyses": ["nope"]}, head)
    with pytest.raises(SpecError, match="not an MoE layer"):
        moe_ray.submit({"model": str(tiny("mixtral", "upcycled").path), "layers": [7]}, head)
    assert len(moe_ray.jobs(head)) == before
    assert not (tmp_path / "x.zarr").exists()


def test_job_that_cannot_fit_the_cluster_is_refused_at_submission(head, tiny, tmp_path):
    """The plan's resources against the head's (2 CPUs, 1 GPU, its memory), before anything is sent:
    GPU shards (dynamic.device = cuda) needing more GPUs in all than the cluster, a task needing more
    memory than any node. Nothing is submitted and no store is created."""
    before = len(moe_ray.jobs(head))
    model = str(tiny("mixtral", "scratch").path)

    def dynamic(shards: int) -> dict:  # a driver without CPUs: only the GPUs fall short
        return {"model": model, "store": str(tmp_path / f"dyn{shards}.zarr"), "analyses": ["dynamic"],
                "dynamic": {"inputs": ["short"], "shards": shards, "device": "cuda"},
                "resources": {"entrypoint_num_cpus": 0}}

    with pytest.raises(SpecError, match=r"^dynamic \(2 shards on cuda, PACK\) needs 2 GPU at once \(2 bundles together "
                                        r"with the job's driver\), but the whole cluster has 1 GPU\."):
        moe_ray.submit(dynamic(2), head)
    # device auto on a head with a GPU: the static task asks for one too
    with pytest.raises(SpecError, match=r"^static layer 0 needs 1 CPU, 1 GPU, 100000.0 GiB of memory on one node, but no node "
                                        r"of the cluster has 100000.0 GiB of memory: the most one node offers is "):
        moe_ray.submit({"model": model, "store": str(tmp_path / "static.zarr"),
                        "resources": {"memory_per_task_gb": 100000}}, head)

    spec = tmp_path / "gpus.toml"
    spec.write_text(f'model = "{model}"\nstore = "{tmp_path / "cli.zarr"}"\nanalyses = ["dynamic"]\n'
                    '[dynamic]\ninputs = ["short"]\nshards = 3\ndevice = "cuda"\n')
    out = subprocess.run([sys.executable, "-m", "moe_ray.cli", "submit", str(spec), "--address", head],
                         env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    errors = [l for l in out.stderr.splitlines() if l.startswith("moe-ray: error:")]
    assert len(errors) == 1 and "3 GPU at once" in errors[0] and "whole cluster has 2 CPU, 1 GPU" in errors[0], out.stderr
    assert "submitted" not in out.stdout

    assert len(moe_ray.jobs(head)) == before
    assert not list(tmp_path.glob("*.zarr"))

    # --no-check-fit (a cluster that adds nodes on demand): submitted, then stopped here
    out = subprocess.run([sys.executable, "-m", "moe_ray.cli", "submit", str(spec), "--address", head, "--no-check-fit"],
                         env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    job_id = re.search(r"submitted job (\S+) ", out.stdout).group(1)
    handle = moe_ray.JobHandle(job_id, head)
    handle.stop()
    assert handle.wait(timeout=60, poll=0.2).state == "STOPPED"


def test_token_auth_refuses_without_the_token(head):
    with pytest.raises(JobError, match="token authentication failed"):
        moe_ray.jobs(head, headers={"Authorization": "Bearer not-the-token"})
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONPATH=str(ROOT))
    env.pop("RAY_AUTH_TOKEN_PATH")
    out = subprocess.run([sys.executable, "-m", "moe_ray.cli", "list", "--address", head], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    errors = [l for l in out.stderr.splitlines() if l.startswith("moe-ray: error:")]
    assert len(errors) == 1 and "token authentication failed" in errors[0], out.stderr


# ---- safe defaults: pickle checkpoints only when asked, and then only tensors -------------------

class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickle_checkpoints_refused_unless_allowed(tiny, tmp_path):
    from safetensors.torch import load_file

    from moe_ray.api import plan

    src = tiny("mixtral", "upcycled").path
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "config.json").write_text((src / "config.json").read_text())
    state = {}
    for f in sorted(src.glob("*.safetensors")):
        state.update(load_file(f))
    torch.save(state, bin_dir / "pytorch_model.bin")

    with pytest.raises(CheckpointError, match="only pickle weights.*--allow-pickle"):
        plan(moe_ray.Spec(model=str(bin_dir), store=str(tmp_path / "s.zarr")))
    _, _, (job,) = plan(moe_ray.Spec(model=str(bin_dir), store=str(tmp_path / "s.zarr"), allow_pickle=True))
    assert [u.args[1] for u in job.units()] == [0, 1, 2, 3]
    pickled, safe = open_checkpoint(bin_dir, allow_pickle=True), open_checkpoint(src)
    key = safe.family.expert_keys(1, 3)["down"]
    assert torch.equal(pickled.read(key), safe.read(key))
    assert pickled.nbytes() == safe.nbytes()

    torch.save({"x": _Payload()}, bin_dir / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="cannot load pickle weights pytorch_model.bin safely"):
        open_checkpoint(bin_dir, allow_pickle=True)
    assert not (tmp_path / "s.zarr").exists()
