"""One writer at a time (issue 23, item 3 and its concurrency group): the store lease of `run` (and of
a submitted job's driver, which is `run`), `--overwrite` and `plot --out`; stale leases taken over;
on a local disk and on S3 (conditional writes against a real S3 API server)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import zarr

import moe_ray
import moe_ray.fs
from moe_ray.errors import StoreError
from moe_ray.lease import Lease, LeaseHeld, holder
from moe_ray.outdir import PLOT_OUTPUT, claim_output_dir

HERE = os.path.dirname(os.path.abspath(__file__))


def _spec(model, store, **kw) -> dict:
    return {"model": str(model), "store": str(store), "progress": False, "analyses": ["static"], **kw}


def _dead_lease(path: str, **fields) -> None:
    doc = {"owner": "someone@" + socket.gethostname(), "host": socket.gethostname(), "pid": 2**22 + 7,
           "pid_started": 1.0, "command": "moe-ray run", "token": "t", "heartbeat": time.time(), **fields}
    with open(path + ".lease", "w") as f:
        json.dump(doc, f)


@pytest.mark.parametrize("where", ["local", "s3", "gcs"])
def test_one_holder_a_second_is_refused_naming_it_and_a_dead_one_is_taken_over(where, tmp_path, request,
                                                                             monkeypatch):
    if where in ("s3", "gcs"):
        server = request.getfixturevalue(f"{where}_server")
        for key, value in server.env.items():
            monkeypatch.setenv(key, value)
        url = server.make_bucket("leases") + "/runs/a.zarr"
        fs = server.filesystem()
        if where == "gcs":
            monkeypatch.setattr(moe_ray.fs, "_options", dict(server.storage_options))  # anonymous
    else:
        url = str(tmp_path / "a.zarr")
        fs = None
    first = Lease(url, "moe-ray run").acquire()
    with pytest.raises(LeaseHeld, match=rf"{url} is being written by moe-ray run by .*@{socket.gethostname()} "
                                        rf"\(pid {os.getpid()}\), heartbeat \d+s ago; wait for it"):
        Lease(url, "moe-ray run").acquire()
    assert holder(url)["token"] == first.token
    first.release()
    assert holder(url) is None
    again = Lease(url, "moe-ray run").acquire()  # free again once released
    again.release()
    # a holder on another host whose heartbeat stopped long ago (watched for 3 beats), one whose heartbeat
    # looks fresh but that nobody renews (watched for its stated expiry), then a dead process on this host
    stale = {"owner": "bob@elsewhere", "host": "elsewhere", "pid": 1, "pid_started": 1.0, "command": "moe-ray run",
             "token": "x", "heartbeat": time.time() - 60, "heartbeat_s": 0.2, "stale_after_s": 1.0}
    unrenewed = dict(stale, heartbeat=time.time())
    for doc, watched in ((stale, (0.6, "no heartbeat for 1s")), (unrenewed, (1.0, "no heartbeat for 1s")),
                         (dict(stale, host=socket.gethostname(), heartbeat=time.time(), pid=2**22 + 7), None)):
        data = json.dumps(dict(doc, heartbeat=time.time()) if doc is unrenewed else doc).encode()
        if fs is not None:
            fs.pipe_file(url.split("://", 1)[1] + ".lease", data)
        else:
            with open(url + ".lease", "wb") as f:
                f.write(data)
        started = time.monotonic()
        lease = Lease(url, "moe-ray run").acquire()
        took = time.monotonic() - started
        assert lease.took_over.startswith(f"took over the lease of moe-ray run by {doc['owner']}")
        if watched is not None:
            assert watched[0] <= took < watched[0] + 2 and watched[1] in lease.took_over, (took, lease.took_over)
        assert holder(url)["token"] == lease.token
        lease.release()


def test_a_second_run_is_refused_while_the_first_writes_and_the_first_finishes_unharmed(
        ray_session, big_mixtral, tmp_path):
    """Two runs into one store (the second with --overwrite, and plain): refused at once with one
    line naming the first, which finishes complete with one entry in its runs log (none lost)."""
    store = tmp_path / "s.zarr"
    script = textwrap.dedent(f"""
        import os, sys, time
        sys.path.insert(0, {HERE!r})
        import moe_ray
        from moe_ray.errors import MoeRayError
        print("ready", flush=True)
        while not os.path.exists({str(store) + '.lease'!r}):
            time.sleep(0.02)
        for overwrite in (True, False):
            try:
                moe_ray.run(model={str(big_mixtral.path)!r}, store={str(store)!r}, progress=False,
                            analyses=["static"], overwrite=overwrite)
                print("ran")
            except MoeRayError as exc:
                print("refused:", exc, flush=True)
    """)
    second = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    assert second.stdout.readline().strip() == "ready"
    moe_ray.run(_spec(big_mixtral.path, store))
    out, _ = second.communicate(timeout=120)
    lines = out.strip().splitlines()
    assert len(lines) == 2, out
    for line in lines:
        assert line.startswith(f"refused: {store} is being written by moe-ray run by ") and \
            f"(pid {os.getpid()})" in line, out
    root = zarr.open_group(str(store), mode="r")
    assert root.attrs["state"] == "complete" and len(root.attrs["runs"]) == 1
    assert root["static/unit_done"][...].all()
    assert not os.path.exists(str(store) + ".lease")


def test_a_dead_writers_lease_is_taken_over_and_said(ray_session, tiny, tmp_path, capsys):
    ck = tiny("mixtral", "scratch", seed=4)
    store = str(tmp_path / "s.zarr")
    _dead_lease(store)
    moe_ray.run(_spec(ck.path, store, progress=True))
    assert f"moe-ray: {store}: took over the lease of moe-ray run by someone@" in capsys.readouterr().out
    assert zarr.open_group(store, mode="r").attrs["state"] == "complete"
    with pytest.raises(StoreError, match=rf"{store}/static/inner.zarr lies inside the moe-ray store {store}"):
        moe_ray.run(_spec(ck.path, store + "/static/inner.zarr"))
    assert not os.path.exists(store + "/static/inner.zarr")
    # two plots into one --out: the second is refused while the first holds the directory
    out = tmp_path / "report"
    with Lease(str(out), "moe-ray plot"):
        with pytest.raises(LeaseHeld, match=rf"{out} is being written by moe-ray plot"):
            moe_ray.plot(store, out=str(out))
    assert not out.exists() or not any(out.iterdir())  # refused before its first file
    output = claim_output_dir(out, PLOT_OUTPUT)  # what plot does first, and finish() last
    assert holder(str(out))["command"] == "moe-ray plot"
    output.finish()
    assert holder(str(out)) is None and not os.path.exists(str(out) + ".lease")


def _holder_elsewhere(url: str) -> tuple[subprocess.Popen, str]:
    """A process holding the lease on `url` as if on another host (its recorded hostname faked), with a
    short heartbeat and expiry stated in its lease; returns it and its token once it holds the lease."""
    script = textwrap.dedent(f"""
        import socket, time
        import moe_ray.lease as lease
        socket.gethostname = lambda: "elsewhere-host"
        lease.HEARTBEAT_S, lease.STALE_S = 0.4, 2.0
        held = lease.Lease({url!r}, "moe-ray run").acquire()
        print("held", held.token, flush=True)
        try:
            time.sleep(600)
        except KeyboardInterrupt:  # a Python caller (no moe-ray command's handlers) is stopped as by Ctrl-C
            print("KeyboardInterrupt", flush=True)
            raise SystemExit(130)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    word, token = proc.stdout.readline().split()
    assert word == "held"
    return proc, token


def test_a_holder_on_another_host_is_refused_while_alive_and_taken_over_once_killed_or_frozen(tmp_path):
    """Two processes, the holder's host faked by the hostname its lease records: while it renews, a
    second writer is refused within a heartbeat or two (never after its expiry, never taking it); frozen
    (SIGSTOP) past its stated expiry, its lease is taken over, and once it runs again it finds that and
    stops with one line (a KeyboardInterrupt in a Python caller), leaving the new holder's lease alone; killed (SIGKILL), its lease is taken over
    within its stated expiry (2 s here; 15 s by default, was 120 s)."""
    import signal

    from moe_ray.lease import HEARTBEAT_S, STALE_S

    assert (HEARTBEAT_S, STALE_S) == (2.0, 15.0)
    url = str(tmp_path / "a.zarr")
    proc, token = _holder_elsewhere(url)
    try:
        assert holder(url)["stale_after_s"] == 2.0 and holder(url)["host"] == "elsewhere-host"
        for _ in range(2):
            started = time.monotonic()
            with pytest.raises(LeaseHeld, match=r"being written by moe-ray run by \S+@elsewhere-host \(pid \d+\).*"
                                                r"\(a holder that dies loses the lease 2s after its last heartbeat\)"):
                Lease(url, "moe-ray run").acquire()
            assert time.monotonic() - started < 1.5
            assert holder(url)["token"] == token
        os.kill(proc.pid, signal.SIGSTOP)
        started = time.monotonic()
        taker = Lease(url, "moe-ray run").acquire()
        assert 2.0 <= time.monotonic() - started < 3.5 and "no heartbeat for 2s on host elsewhere-host" in taker.took_over
        os.kill(proc.pid, signal.SIGCONT)
        out, err = proc.communicate(timeout=10)
        assert f"moe-ray: error: lost the lease on {url}: moe-ray run by " in err and "took it over; stopping" in err
        # outside moe-ray's commands (which get SIGTERM: one line, exit 143) the caller's process is not ended
        # (Ray's SIGTERM handler would end a notebook's kernel): its main thread gets a KeyboardInterrupt
        assert out.strip() == "KeyboardInterrupt" and proc.returncode == 130
        assert holder(url)["token"] == taker.token
        taker.release()
    finally:
        proc.kill()
    proc, token = _holder_elsewhere(url)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    started = time.monotonic()
    taker = Lease(url, "moe-ray run").acquire()
    assert 2.0 <= time.monotonic() - started < 3.5, taker.took_over
    assert holder(url)["token"] == taker.token
    taker.release()
