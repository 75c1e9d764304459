"""SIGINT and SIGTERM to `moe-ray run` (issue 12): the run ends with one line saying what finished,
what did not and the command that resumes it; exit status 130 / 143; no native stack dump from Ray's
core worker; the printed command resumes the run."""
from __future__ import annotations

import contextlib
import io
import os
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
import xarray as xr

CLI = [sys.executable, "-m", "moe_ray.cli"]


def _interrupt(args: list[str], after: str, signum: int, delay: float = 0.0) -> tuple[int, list[str], float]:
    """Run `moe-ray ARGS` on a local Ray of its own, send `signum` once a line containing `after`
    appears (plus `delay` seconds); returns the exit status, the output lines and the seconds from the
    signal to the exit."""
    env = dict(os.environ, RAY_ADDRESS="", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    lines: list[str] = []
    try:
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if after in line:
                time.sleep(delay)
                proc.send_signal(signum)
                break
        sent = time.monotonic()
        lines += proc.stdout.read().splitlines()
        status = proc.wait(timeout=120)
        return status, lines, time.monotonic() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)


def _last_line(lines: list[str]) -> str:
    # tqdm redraws its bar with carriage returns: what a terminal shows of a line is after the last one
    shown = [line.rsplit("\r", 1)[-1] for line in lines]
    return [line for line in shown if line.strip()][-1]


def _assert_clean(lines: list[str]) -> None:
    text = "\n".join(lines)
    assert "SIGTERM received" not in text and "*** " not in text, text[-3000:]  # Ray's native dump
    assert "Traceback" not in text, text[-3000:]


def test_sigterm_mid_static_run_ends_with_one_line_143_and_its_command_resumes(ray_session, big_mixtral, big_clean,
                                                                             tmp_path, settled_done):
    from moe_ray.cli import main

    store = str(tmp_path / "run.zarr")
    args = ["run", "--model", str(big_mixtral.path), "--store", store, "--num-cpus", "2"]
    status, lines, exit_s = _interrupt(args, "moe-ray: static units: ", signal.SIGTERM)  # the first progress line
    assert status == 143, "\n".join(lines)[-3000:]
    _assert_clean(lines)
    last = _last_line(lines)
    assert [line for line in lines if line.startswith("moe-ray: interrupted")] == [last], "\n".join(lines)[-3000:]
    done = int(settled_done(store, "static").sum())
    assert 1 <= done < 4
    assert last.startswith("moe-ray: interrupted by SIGTERM. Finished: nothing. Not finished: static ("), last
    assert f"Finished units stay in {store}; resume with: moe-ray run " in last, last
    assert exit_s < 30

    resume = shlex.split(last.split("resume with: ", 1)[1])
    assert resume[:2] == ["moe-ray", "run"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):  # in this process: its Ray is already up
        assert main(resume[1:]) == 0
    assert f"{4 - done} of 4 units to run" in out.getvalue(), out.getvalue()
    a, b = xr.open_zarr(big_clean("static"), group="static"), xr.open_zarr(store, group="static")
    for name in a.data_vars:
        np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)


def test_sigint_while_shards_run_ends_with_one_line_130(big_mixtral, tmp_path):
    """Ctrl-C while the dynamic shard actors load and run: one line, exit 130, nothing else after it."""
    store = str(tmp_path / "dyn.zarr")
    args = ["run", "--model", str(big_mixtral.path), "--store", store, "--analyses", "dynamic", "--inputs",
            "short", "--shards", "2", "--num-cpus", "2"]
    status, lines, exit_s = _interrupt(args, "units to run", signal.SIGINT, delay=2.0)
    assert status == 130, "\n".join(lines)[-3000:]
    _assert_clean(lines)
    last = _last_line(lines)
    assert last.startswith("moe-ray: interrupted by SIGINT. Finished: nothing. Not finished: dynamic (0/4 "
                           "units)."), "\n".join(lines)[-3000:]
    assert "resume with: moe-ray run --model" in last
    assert exit_s < 30
