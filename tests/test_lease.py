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
from moe_ray.errors import StoreError
from moe_ray.lease import STALE_S, Lease, LeaseHeld, holder
from moe_ray.outdir import PLOT_OUTPUT, claim_output_dir

HERE = os.path.dirname(os.path.abspath(__file__))


def _spec(model, store, **kw) -> dict:
    return {"model": str(model), "store": str(store), "progress": False, "analyses": ["static"], **kw}


def _dead_lease(path: str, **fields) -> None:
    doc = {"owner": "someone@" + socket.gethostname(), "host": socket.gethostname(), "pid": 2**22 + 7,
           "pid_started": 1.0, "command": "moe-ray run", "token": "t", "heartbeat": time.time(), **fields}
    with open(path + ".lease", "w") as f:
        json.dump(doc, f)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_one_holder_a_second_is_refused_naming_it_and_a_dead_one_is_taken_over(where, tmp_path, request,
                                                                             monkeypatch):
    if where == "s3":
        server = request.getfixturevalue("s3_server")
        for key, value in server.env.items():
            monkeypatch.setenv(key, value)
        url = server.make_bucket("leases") + "/runs/a.zarr"
        fs = server.filesystem()
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
    # a holder on another host whose heartbeat stopped, then a dead process on this host
    stale = {"owner": "bob@elsewhere", "host": "elsewhere", "pid": 1, "pid_started": 1.0, "command": "moe-ray run",
             "token": "x", "heartbeat": time.time() - STALE_S - 5}
    alive = dict(stale, heartbeat=time.time())
    for doc, taken in ((alive, False), (stale, True),
                       (dict(stale, host=socket.gethostname(), heartbeat=time.time(), pid=2**22 + 7), True)):
        data = json.dumps(doc).encode()
        if fs is not None:
            fs.pipe_file(url.removeprefix("s3://") + ".lease", data)
        else:
            with open(url + ".lease", "wb") as f:
                f.write(data)
        if not taken:
            with pytest.raises(LeaseHeld, match=r"being written by moe-ray run by bob@elsewhere \(pid 1\)"):
                Lease(url, "moe-ray run").acquire()
            continue
        lease = Lease(url, "moe-ray run").acquire()
        assert lease.took_over.startswith(f"took over the lease of moe-ray run by {doc['owner']}")
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
