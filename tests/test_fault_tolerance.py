"""Fault tolerance for real on a local Ray (issue 6): a worker killed in the middle of a static or a
reorder unit is retried, a dynamic shard actor killed mid-run is restarted, and each store equals an
uninterrupted run's; a unit that keeps dying fails the run with one clear line; an interrupted run
resumed with the same spec runs only the unfinished units."""
from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import xarray as xr



KILL_SCRIPT = textwrap.dedent("""
    # Run a spec in a thread while polling Ray's state API; SIGKILL the first process that is running
    # a matching unit: a task named PREFIX... (KIND task) or an actor whose repr starts with PREFIX
    # and which is executing a method (KIND actor). Prints one RESULT line of JSON.
    import json, os, signal, sys, threading, time
    import ray
    from ray.util.state import list_actors, list_tasks
    import moe_ray

    model, store, run_kwargs, kind, prefix = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4], sys.argv[5]
    ctx = ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1")
    state_api = "http://" + ctx.dashboard_url
    errors = []

    def job():
        try:
            moe_ray.run(model=model, store=store, progress=False, **run_kwargs)
        except BaseException as exc:
            errors.append(repr(exc))

    def running_target():
        running = list_tasks(address=state_api, filters=[("state", "=", "RUNNING")], detail=True, timeout=5)
        if kind == "task":
            return next(((t.name, t.worker_pid) for t in running
                         if (t.name or "").startswith(prefix) and t.worker_pid), None)
        busy = {t.actor_id for t in running if t.actor_id}
        actors = list_actors(address=state_api, filters=[("state", "=", "ALIVE")], detail=True, timeout=5)
        return next(((a.repr_name, a.pid) for a in actors if a.actor_id in busy
                     and (a.repr_name or "").startswith(prefix) and a.pid), None)

    runner = threading.Thread(target=job)
    runner.start()
    killed = None
    deadline = time.monotonic() + 120
    while killed is None and runner.is_alive() and time.monotonic() < deadline:
        try:
            target = running_target()
        except Exception:
            target = None
        if target:
            os.kill(target[1], signal.SIGKILL)
            killed = target[0]
        time.sleep(0.05)
    runner.join(timeout=300)
    restarts = {a.repr_name: a.num_restarts for a in list_actors(address=state_api, detail=True, timeout=10)}
    print("RESULT", json.dumps({"killed": killed, "errors": errors, "restarts": restarts}))
""")


@pytest.fixture(scope="module")
def big_model(big_mixtral):
    return big_mixtral


def _assert_same_store(a_path, b_path, group="static", units=4):
    """Every variable of `group` equal, and all `units` work units of the run marked done in both."""
    a, b = xr.open_zarr(a_path, group=group), xr.open_zarr(b_path, group=group)
    assert set(a.data_vars) == set(b.data_vars)
    assert int(a.unit_done.sum()) == int(b.unit_done.sum()) == units, group
    for name in a.data_vars:
        np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=f"{group}/{name}")


def _run_and_kill(model, store, run_kwargs: dict, kind: str, prefix: str) -> dict:
    """Run the spec in a fresh local Ray (with the state API; token auth as set up by `ray_session`)
    and SIGKILL the first matching unit."""
    # report task state every 100 ms (default 1 s) so a running unit is seen while it runs
    env = dict(os.environ, RAY_ADDRESS="", RAY_task_events_report_interval_ms="100")
    done = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(model), store, json.dumps(run_kwargs), kind, prefix],
                          capture_output=True, text=True, timeout=400, env=env)
    lines = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
    assert done.returncode == 0 and lines, (done.stdout + done.stderr)[-3000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    assert result["errors"] == [], result
    assert result["killed"] and result["killed"].startswith(prefix), (result, done.stderr[-3000:])
    return result


def test_worker_killed_mid_unit_is_retried_and_store_is_identical(ray_session, big_model, big_clean, tmp_path):
    reference = big_clean("static")
    store = str(tmp_path / "killed.zarr")
    _run_and_kill(big_model.path, store, {}, "task", "moe-ray static layer")
    _assert_same_store(reference, store)


def test_worker_killed_mid_reorder_unit_is_retried_and_store_is_identical(ray_session, big_model, big_clean, tmp_path):
    reference = big_clean("reorder")
    store = str(tmp_path / "killed.zarr")
    _run_and_kill(big_model.path, store, big_clean.runs["reorder"], "task", "moe-ray reorder joint layer")
    _assert_same_store(reference, store, "reorder/joint")


DYNAMIC = {"analyses": ["dynamic"], "dynamic": {"inputs": ["long"], "shards": 2, "max_tokens": 256}}


def test_shard_actor_killed_mid_run_is_restarted_and_store_is_identical(ray_session, big_model, tmp_path,
                                                                       dynamic_store_in_process):
    """SIGKILL the downstream shard actor while it runs an input: Ray restarts it (its constructor
    reloads layers 2-3), retries its unfinished call with shard 0's output, and the store equals an
    uninterrupted run's bit for bit."""
    reference = dynamic_store_in_process(big_model.path, str(tmp_path / "clean.zarr"), DYNAMIC)
    store = str(tmp_path / "killed.zarr")
    result = _run_and_kill(big_model.path, store, DYNAMIC, "actor", "dynamic shard 1 of 2")
    assert result["restarts"] == {"dynamic shard 0 of 2 (layers 0-1)": 0, "dynamic shard 1 of 2 (layers 2-3)": 1}
    _assert_same_store(reference, store, "dynamic/long")


def test_interrupted_run_resumes_only_unfinished_units(ray_session, big_model, big_clean, tmp_path, settled_done):
    """Kill a running job's driver (and with it its local Ray) after its first finished unit, then
    rerun the same spec: only the units not marked done run, and the store equals a clean run's."""
    import moe_ray

    reference = big_clean("static")
    store = str(tmp_path / "resumed.zarr")
    cmd = [sys.executable, "-m", "moe_ray.cli", "run", "--model", str(big_model.path), "--store", store,
           "--num-cpus", "2"]
    env = dict(os.environ, RAY_ADDRESS="", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        for line in proc.stdout:
            if line.startswith("moe-ray: static units: "):  # the first progress line: a layer is done
                break
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    done = settled_done(store, "static")
    assert 1 <= done.sum() <= 4
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        moe_ray.run(model=str(big_model.path), store=store, progress=True)
    assert f"{4 - done.sum()} of 4 units to run" in out.getvalue()
    _assert_same_store(reference, store)


# ---- units that keep failing fail the run with one clear line, without hanging ---------------------

def test_task_whose_worker_keeps_dying_fails_after_its_retries(ray_session):
    from moe_ray.distributed.fanout import Unit, run_units
    from moe_ray.errors import MoeRayError

    def die(_):
        os.kill(os.getpid(), signal.SIGKILL)

    with pytest.raises(MoeRayError, match=r"^always dies failed after 1 retries: .*worker died") as err:
        run_units(die, [Unit("always dies", (0,), 2**20)], what="dying", max_retries=1, progress=False)
    assert "\n" not in str(err.value)


def test_shard_actor_that_keeps_dying_fails_after_its_restart(ray_session):
    from moe_ray.distributed.pipeline import MAX_RESTARTS, run_pipeline
    from moe_ray.errors import MoeRayError

    class Dies:
        def __init__(self, shard):
            self.shard = shard

        def run(self, name, value):
            if self.shard == 1:
                os.kill(os.getpid(), signal.SIGKILL)
            return value

    with pytest.raises(MoeRayError, match=rf"^second half died and was restarted {MAX_RESTARTS} time\(s\)") as err:
        run_pipeline(Dies, [(0,), (1,)], [{"CPU": 1}, {"CPU": 1}], [("a", 1), ("b", 2)],
                     labels=["first half", "second half"])
    assert "\n" not in str(err.value)


def test_shard_that_cannot_load_its_layers_fails_the_run_with_that_error(ray_session, tiny, tmp_path):
    """A checkpoint file that disappears after planning: the shard's load error (a CheckpointError)
    is the run's error, at once, not a restart loop nor Ray's actor-death report."""
    import shutil

    from moe_ray.api import plan
    from moe_ray.errors import CheckpointError
    from moe_ray.spec import Spec
    from moe_ray.store import ResultStore

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny("mixtral", "scratch").path, ckpt)
    spec = Spec(model=str(ckpt), store=str(tmp_path / "s.zarr"), analyses=["dynamic"], progress=False)
    spec.dynamic.inputs, spec.dynamic.shards = ["short"], 1
    _, _, (job,) = plan(spec)
    store = ResultStore.create_or_reuse(spec.store, {"model": "test"}, spec.to_dict())
    pending = job.prepare(store, overwrite=False)
    for weights in ckpt.glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(CheckpointError) as err:
        job.execute(pending, spec)
    assert "\n" not in str(err.value) and "safetensors" in str(err.value), err.value
