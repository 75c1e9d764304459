"""Fault tolerance for real on a local Ray (issue 6): a worker killed in the middle of a static unit
is retried and the store equals an uninterrupted run's; an interrupted run resumed with the same
spec runs only the unfinished units."""
from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import xarray as xr

from moe_ray.checkpoint.tiny import make_tiny

# Layers big enough (~1 s of work each) that a unit is caught while it runs.
BIG = {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 4, "num_attention_heads": 4,
       "num_key_value_heads": 4, "head_dim": 128}

KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys, threading, time
    import ray
    from ray.util.state import list_tasks
    import moe_ray

    model, store = sys.argv[1], sys.argv[2]
    ctx = ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1")
    state_api = "http://" + ctx.dashboard_url
    errors = []
    def job():
        try:
            moe_ray.run(model=model, store=store, progress=False)
        except BaseException as exc:
            errors.append(exc)
    runner = threading.Thread(target=job)
    runner.start()
    killed = None
    deadline = time.monotonic() + 120
    while killed is None and runner.is_alive() and time.monotonic() < deadline:
        try:
            running = list_tasks(address=state_api, filters=[("state", "=", "RUNNING")], detail=True, timeout=5)
        except Exception:
            running = []
        for task in running:
            if task.name and task.name.startswith("moe-ray static layer") and task.worker_pid:
                os.kill(task.worker_pid, signal.SIGKILL)
                killed = task.name
                break
        time.sleep(0.05)
    runner.join(timeout=300)
    print("KILLED", killed)
    print("SEEN", sorted({t.name for t in list_tasks(address=state_api, limit=1000, timeout=10)}))
    print("ERRORS", errors)
    sys.exit(0 if killed and not errors else 1)
""")


@pytest.fixture(scope="module")
def big_model(tmp_path_factory):
    return make_tiny("mixtral", "scratch", tmp_path_factory.mktemp("big") / "ckpt", seed=11, config_overrides=BIG)


def _assert_same_store(a_path, b_path):
    a, b = xr.open_zarr(a_path, group="static"), xr.open_zarr(b_path, group="static")
    assert set(a.data_vars) == set(b.data_vars)
    assert b.unit_done.values.all()
    for name in a.data_vars:
        np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)


def test_worker_killed_mid_unit_is_retried_and_store_is_identical(ray_session, big_model, tmp_path):
    import moe_ray

    reference = moe_ray.run(model=str(big_model.path), store=str(tmp_path / "clean.zarr"), progress=False)
    store = str(tmp_path / "killed.zarr")
    # report task state every 100 ms (default 1 s) so a running unit is seen while it runs
    env = dict(os.environ, RAY_ADDRESS="", RAY_task_events_report_interval_ms="100")
    done = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(big_model.path), store],
                          capture_output=True, text=True, timeout=400, env=env)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert "KILLED moe-ray static layer" in done.stdout
    _assert_same_store(reference, store)


def test_interrupted_run_resumes_only_unfinished_units(ray_session, big_model, tmp_path):
    """Kill a running job's driver (and with it its local Ray) after its first finished unit, then
    rerun the same spec: only the units not marked done run, and the store equals a clean run's."""
    import moe_ray
    import zarr

    reference = moe_ray.run(model=str(big_model.path), store=str(tmp_path / "clean.zarr"), progress=False)
    store = str(tmp_path / "resumed.zarr")
    cmd = [sys.executable, "-m", "moe_ray.cli", "run", "--model", str(big_model.path), "--store", store,
           "--num-cpus", "2"]
    env = dict(os.environ, RAY_ADDRESS="", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        for line in proc.stdout:
            if line.strip().startswith("static layer"):  # the first unit's log line: one layer is done
                break
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    done = np.asarray(zarr.open_group(store, mode="r")["static/unit_done"][...]).astype(bool)
    assert 1 <= done.sum() <= 4
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        moe_ray.run(model=str(big_model.path), store=store, progress=True)
    assert f"{4 - done.sum()} of 4 units to run" in out.getvalue()
    _assert_same_store(reference, store)
