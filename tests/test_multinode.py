"""Real multi-node (issue 12): Ray nodes in their own Linux network namespaces, each with its own IP
on a private link (`netns_cluster`), token auth on, the job server on the head's loopback: clients
that submit run in the head's namespace (as on the head itself, or through an SSH tunnel).

One cluster for the module: a head at 10.213.0.1 (2 CPUs, a memory resource sized below) and a
worker at 10.213.0.2 (2 CPUs), plus a third namespace at 10.213.0.3 with no token. Ray's health
checks are tuned so a lost node is declared dead in about 2 s (`FAST_NODE_DEATH`). A test that loses
the worker (every process in its namespace SIGKILLed, as when a machine dies) starts a new one after.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import signal
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

from netns_cluster import DASHBOARD_PORT, FAST_NODE_DEATH, Lab, RayNode, unavailable_reason

REASON = unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"no network namespaces here: {REASON}")

ROOT = Path(__file__).resolve().parent.parent
MOE_RAY = [sys.executable, "-m", "moe_ray.cli"]
HEAD_ADDRESS = "10.213.0.1:6379"
WORKER_IP = "10.213.0.2"


@dataclass
class Running:
    """A command running in a namespace, its output lines kept with the time each arrived."""

    proc: subprocess.Popen
    lines: list[tuple[float, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def wait(self, timeout: float) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"still running after {timeout} s:\n{self.text[-4000:]}") from None
        self.reader.join(10)
        return rc

    @property
    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def when(self, pattern: str) -> float | None:
        """When the first line matching `pattern` arrived."""
        return next((t for t, line in self.lines if re.search(pattern, line)), None)


@dataclass
class Cluster:
    lab: Lab
    head: RayNode
    env: dict[str, str]
    root: Path
    head_memory: int
    generation: int = 0

    def add_worker(self) -> None:
        self.generation += 1
        self.lab.start_worker("w", self.head, num_cpus=2, env=self.env, generation=self.generation)

    def ensure_worker(self) -> None:
        """A worker node again, if the last test lost it."""
        if not [n for n in self.lab.nodes if not n.head]:
            self.add_worker()

    def moe_ray(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return self.lab.run("h", [*MOE_RAY, *args], env=self.env, timeout=timeout)

    def start(self, *args: str) -> Running:
        return Running(self.lab.popen("h", [*MOE_RAY, *args], env=self.env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT))

    def lose_worker_when(self, job: Running, marker: str, timeout: float = 180) -> tuple[float, str]:
        """SIGKILL every process of the worker's namespace as soon as one of them runs `marker` (Ray
        titles a busy worker process `ray::<task or actor method>`); returns when, and what ran."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and job.proc.poll() is None:
            busy = [cmd for cmd in self.lab.processes("w").values() if cmd.startswith(marker)]
            if busy:
                self.lab.lose("w")
                return time.monotonic(), busy[0]
            time.sleep(0.05)
        raise AssertionError(f"no `{marker}` ran on the worker node:\n{job.text[-4000:]}")


def _plan_bundles(model: str, shards: int, inputs: list[str]) -> tuple[list[int], int]:
    """The memory of each shard of a dynamic plan, and of the whole model as one shard."""
    from moe_ray.api import plan
    from moe_ray.spec import Spec

    spec = Spec.from_dict({"model": model, "store": "unused.zarr", "analyses": ["dynamic"],
                           "dynamic": {"inputs": inputs, "shards": shards, "max_tokens": 64}})
    _, _, (job,) = plan(spec)
    halves = [int(b["memory"]) for b in job.plan.bundles(1, 0)]
    whole = int(job.plan.resharded(1, "PACK").bundles(1, 0)[0]["memory"])
    return halves, whole


@pytest.fixture(scope="module")
def cluster(big_mixtral):
    # The head's memory resource: one shard of the big model's two fits, the whole model does not
    # (so losing the worker mid-way through it leaves nothing to re-plan on), while a tiny model
    # fits whole (re-planned onto the head as one shard).
    halves, whole = _plan_bundles(str(big_mixtral.path), 2, ["short", "long"])
    head_memory = (max(halves) + whole) // 2
    root = Path(tempfile.mkdtemp(prefix="mrn-", dir="/tmp"))  # short: Ray's socket paths live here
    token = root / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    lab = Lab(root, ["h", "w", "x"])
    try:
        lab.create()
        env = lab.env(RAY_AUTH_TOKEN_PATH=str(token), **FAST_NODE_DEATH)
        head = lab.start_head("h", num_cpus=2, memory=head_memory, env=env)
        cluster = Cluster(lab, head, env, root, head_memory)
        cluster.add_worker()
        yield cluster
    finally:
        lab.destroy()
        shutil.rmtree(root, ignore_errors=True)


def _assert_same(a_path: str, b_path: str, group: str) -> None:
    a, b = xr.open_zarr(a_path, group=group), xr.open_zarr(b_path, group=group)
    assert set(a.data_vars) == set(b.data_vars), group
    assert int(a.unit_done.sum()) > 0, f"{group}: nothing done"  # flags compared below with the rest
    for name in a.data_vars:
        np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=f"{group}/{name}")


def _spec_file(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


@pytest.fixture(scope="module")
def tiny_dynamic(tiny, dynamic_store_in_process, tmp_path_factory) -> tuple[str, str]:
    """The tiny mixtral and its uninterrupted dynamic store (inputs short and long, 64 tokens at most)."""
    model = str(tiny("mixtral", "scratch").path)
    store = dynamic_store_in_process(model, str(tmp_path_factory.mktemp("dyn") / "clean.zarr"),
                                     {"analyses": ["dynamic"], "dynamic": {"inputs": ["short", "long"], "max_tokens": 64}})
    return model, store


# ---- a job over both nodes equals a one-node run ----------------------------------------------------

def test_submitted_job_over_two_nodes_equals_one_node(cluster, ray_session, tiny_dynamic, tmp_path):
    """`moe-ray submit` (in the head's namespace, to the job server on its loopback) with static,
    reorder and dynamic on 2 shards, STRICT_SPREAD: one shard per node, each node at its own IP; the
    store equals, value for value, the same analyses run on one node (static and reorder on the local
    Ray, dynamic by the shards' own code in this process)."""
    import moe_ray

    model, one_dynamic = tiny_dynamic
    one = moe_ray.run(model=model, store=str(tmp_path / "one.zarr"), progress=False, layers=[0, 1, 2, 3],
                      analyses=["static", "reorder"], reorder={"pairs": ["0-1", "2-3"]})
    spec = _spec_file(tmp_path / "spec.toml", f'model = "{model}"\nstore = "{tmp_path / "two.zarr"}"\n'
                      'analyses = ["static", "reorder", "dynamic"]\nlayers = [0, 1, 2, 3]\n'
                      '[reorder]\npairs = ["0-1", "2-3"]\n'
                      '[dynamic]\ninputs = ["short"]\nshards = 2\nplacement = "STRICT_SPREAD"\n')
    out = cluster.moe_ray("submit", spec, "--address", f"http://127.0.0.1:{DASHBOARD_PORT}", "--wait")
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "SUCCEEDED" in out.stdout
    for group in ("static", "reorder/joint"):
        _assert_same(one, str(tmp_path / "two.zarr"), group)
    _assert_same(one_dynamic, str(tmp_path / "two.zarr"), "dynamic/short")

    # and the two shard actors ran on the two nodes, one each
    nodes = cluster.lab.python("h", "import ray, json; ray.init(address='%s', logging_level='ERROR'); "
                               "from ray.util.state import list_actors; "
                               "print(json.dumps(sorted(a.node_id for a in list_actors(address='http://127.0.0.1:%d', "
                               "filters=[('class_name', '=', 'ShardWorker')], limit=1000))))"
                               % (HEAD_ADDRESS, DASHBOARD_PORT), env=cluster.env)
    assert nodes.returncode == 0, nodes.stderr[-2000:]
    node_ids = json.loads(nodes.stdout.strip().splitlines()[-1])
    assert len(node_ids) == 2 and len(set(node_ids)) == 2, node_ids


# ---- nobody without the token gets in ---------------------------------------------------------------

FORWARD = """
import asyncio, sys
listen_host, listen_port, host, port = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])

async def pipe(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()

async def serve(reader, writer):
    upstream_reader, upstream_writer = await asyncio.open_connection(host, port)
    await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer), return_exceptions=True)

async def main():
    server = await asyncio.start_server(serve, listen_host, listen_port)
    print("forwarding", flush=True)
    async with server:
        await server.serve_forever()

asyncio.run(main())
"""


def test_third_namespace_without_the_token_can_neither_join_nor_submit(cluster, tiny, tmp_path):
    """From 10.213.0.3, which reaches the head's ports (the job server through a forwarded port, as
    an SSH tunnel or a dashboard bound to the private network would make it reachable): a node
    joining with `ray start`, a driver joining with `moe-ray run --address`, and `moe-ray submit` are
    all refused for want of the cluster's token, with one line from moe-ray."""
    home = tmp_path / "home"  # no ~/.ray/auth_token of anyone's: moe-ray makes this user a token of its own
    home.mkdir()
    env = {k: v for k, v in cluster.env.items() if not k.startswith("RAY_AUTH_TOKEN")}
    # Ray's drivers retry a refused GCS for 20 s before giving up; the refusal is the same after 2
    env.update(HOME=str(home), RAY_AUTH_MODE="token", RAY_gcs_server_port_wait_time_s="2")
    forward = cluster.lab.popen("h", [sys.executable, "-c", FORWARD, "10.213.0.1", "8266", "127.0.0.1",
                                      str(DASHBOARD_PORT)], env=cluster.env, stdout=subprocess.PIPE)
    try:
        assert forward.stdout.readline().strip() == "forwarding"
        model = str(tiny("mixtral", "scratch").path)
        spec = _spec_file(tmp_path / "spec.toml", f'model = "{model}"\nstore = "{tmp_path / "x.zarr"}"\n')

        submitted = cluster.lab.run("x", [*MOE_RAY, "submit", spec, "--no-check", "--address",
                                          "http://10.213.0.1:8266"], env=env)
        errors = [l for l in submitted.stderr.splitlines() if l.startswith("moe-ray: error:")]
        assert submitted.returncode == 2 and len(errors) == 1, submitted.stdout + submitted.stderr
        assert "http://10.213.0.1:8266 refused" in errors[0] and "token authentication failed" in errors[0], errors

        driver = cluster.lab.run("x", [*MOE_RAY, "run", "--model", model, "--store", str(tmp_path / "x.zarr"),
                                       "--address", HEAD_ADDRESS], env=env)
        errors = [l for l in driver.stderr.splitlines() if l.startswith("moe-ray: error:")]
        assert driver.returncode == 2 and len(errors) == 1, driver.stdout + driver.stderr
        assert f"Ray at {HEAD_ADDRESS} refused the connection: token authentication failed" in errors[0], errors

        node = cluster.lab.run("x", [str(Path(sys.executable).parent / "ray"), "start", "--address", HEAD_ADDRESS,
                                     "--node-ip-address", "10.213.0.3", "--temp-dir", str(cluster.root / "ray-x"),
                                     "--num-cpus", "1", "--disable-usage-stats"], env=env, timeout=120)
        assert node.returncode != 0 and "AuthenticationError" in node.stdout + node.stderr, node.stdout + node.stderr
        assert not (tmp_path / "x.zarr").exists()
    finally:
        forward.kill()
        forward.wait(10)
    alive = cluster.lab.python("h", "import ray; ray.init(address='%s', logging_level='ERROR'); "
                               "print(sorted(n['NodeManagerAddress'] for n in ray.nodes() if n['Alive']))"
                               % HEAD_ADDRESS, env=cluster.env)
    assert "10.213.0.3" not in alive.stdout and "10.213.0.1" in alive.stdout, alive.stdout + alive.stderr


# ---- a worker node lost in the middle of task units: retried elsewhere, same store -------------------

@pytest.mark.parametrize("analysis, marker", [("static", "ray::moe-ray static layer"),
                                              ("reorder", "ray::moe-ray reorder joint layer")],
                         ids=["static", "reorder"])
def test_worker_node_lost_mid_job_finishes_with_the_same_store(cluster, big_mixtral, big_clean, tmp_path,
                                                               analysis, marker):
    cluster.ensure_worker()
    model = str(big_mixtral.path)
    clean, run = big_clean(analysis), big_clean.runs[analysis]
    store = str(tmp_path / "lost.zarr")
    flags = []
    if "layers" in run:
        flags += ["--layers", ",".join(map(str, run["layers"])), "--pairs", ",".join(run["reorder"]["pairs"])]
    job = cluster.start("run", "--model", model, "--store", store, "--analyses", analysis, "--address", HEAD_ADDRESS,
                        *flags)
    lost_at, running = cluster.lose_worker_when(job, marker)
    assert job.wait(240) == 0, job.text[-4000:]
    assert "done in" in job.text
    group = "static" if analysis == "static" else "reorder/joint"
    _assert_same(clean, store, group)
    assert "[state-dump]" not in job.text, job.text[-4000:]  # Ray's raylet dumps stay in the log file


# ---- a dynamic job whose shard loses its node ----------------------------------------------------------

def _dynamic_args(model: str, store: str, node_wait_s: float, inputs: str = "short,long") -> list[str]:
    return ["run", "--model", model, "--store", store, "--analyses", "dynamic", "--inputs", inputs,
            "--max-tokens", "64", "--shards", "2", "--placement", "STRICT_SPREAD", "--node-wait-s",
            str(node_wait_s), "--address", HEAD_ADDRESS]


def _flags(store: str, name: str) -> np.ndarray:
    return np.asarray(zarr.open_group(store, mode="r")[f"dynamic/{name}/unit_done"][...]).astype(bool)


def _shard_pids(cluster: Cluster) -> dict[str, int]:
    """{shard label: pid} of the live shard actors on either node, from Ray's worker log files (a
    worker names the actor it hosts, by its repr, in `logs/worker-<id>-<job>-<pid>.out`)."""
    live = {**cluster.lab.processes("h"), **cluster.lab.processes("w")}
    out = {}
    for path in cluster.root.glob("ray-*/session_*/logs/worker-*.out"):
        pid = int(path.stem.rsplit("-", 1)[1])
        if not live.get(pid, "").startswith("ray::ShardWorker"):
            continue
        names = [l.split(":actor_name:", 1)[1] for l in path.read_text(errors="replace").splitlines()
                 if l.startswith(":actor_name:dynamic shard")]
        if names:
            out[names[-1]] = pid
    return out


def _hold_shard_one_until_shard_zero_is_done(cluster: Cluster, job: Running, store: str) -> None:
    """SIGSTOP shard 1's actor as soon as it is up (on whichever node STRICT_SPREAD put it), then wait
    until shard 0 has stored its layers 0-1 of every input. Held on the head, it stays held: the job
    must not count on it (its pipeline kills it, SIGKILL reaching a stopped process too)."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and job.proc.poll() is None:
        pid = _shard_pids(cluster).get("dynamic shard 1 of 2 (layers 2-3)")
        if pid:
            os.kill(pid, signal.SIGSTOP)  # its node stays healthy; the shard stops taking inputs
            break
        time.sleep(0.02)
    else:
        raise AssertionError(f"shard 1 never came up:\n{job.text[-4000:]}")
    while time.monotonic() < deadline:
        if all(_flags(store, name)[:2].all() for name in ("short", "long")):
            return
        time.sleep(0.1)
    raise AssertionError(f"shard 0 did not store its layers:\n{job.text[-4000:]}")


def _mtimes(store: str, name: str) -> dict[str, int]:
    return {str(f): f.stat().st_mtime_ns for f in (Path(store) / "dynamic" / name).rglob("*") if f.is_file()}


def test_dynamic_shard_node_lost_replans_on_the_nodes_left(cluster, tiny_dynamic, tmp_path):
    """The worker node dies once shard 0 has stored its half of both inputs (shard 1 held back till
    then), whichever shard the worker holds. The job says so in one line within seconds, waits
    node_wait_s, re-plans the unfinished inputs as one shard on the head (two would not fit its
    memory) with a warning, recomputes them whole (an input shard 1 had finished is left as it is),
    and the store equals an uninterrupted run's; Ray's raylet dumps do not reach the terminal."""
    cluster.ensure_worker()
    model, reference = tiny_dynamic
    store = str(tmp_path / "lost.zarr")
    job = cluster.start(*_dynamic_args(model, store, node_wait_s=3))
    _hold_shard_one_until_shard_zero_is_done(cluster, job, store)
    finished = [name for name in ("short", "long") if _flags(store, name).all()]  # before shard 1 was held
    half = [name for name in ("short", "long") if name not in finished]
    assert half, "shard 1 got through every input before it could be held"
    untouched = {name: _mtimes(store, name) for name in finished}
    lost_at = time.monotonic()
    cluster.lab.lose("w")  # shard 1, if on the head, stays held: the job must not count on it
    assert job.wait(180) == 0, job.text[-4000:]

    noticed = job.when(rf"dynamic shard [01] of 2 \(layers [0-3]-[0-3]\) lost its node {WORKER_IP} ")
    assert noticed is not None and noticed - lost_at < 15, job.text[-4000:]
    warning = [l for _, l in job.lines if l.startswith("moe-ray: warning:")]
    assert len(warning) == 1 and f"re-planned the {len(half)} unfinished input(s) ({', '.join(half)}) as 1 " \
        "shard(s) with PACK" in warning[0] and "(was 2, STRICT_SPREAD)" in warning[0], job.text[-4000:]
    assert all(_mtimes(store, name) == before for name, before in untouched.items())  # not recomputed
    assert job.when("re-planned") - noticed < 3 + 15
    for name in ("short", "long"):
        _assert_same(reference, store, f"dynamic/{name}")
    assert "[state-dump]" not in job.text and "Last 20 lines" not in job.text, job.text[-4000:]


def test_dynamic_shard_node_back_within_node_wait_s_resumes_in_place(cluster, tiny_dynamic, tmp_path):
    """The worker dies mid-pass and a new one joins at the same address within node_wait_s: the shard
    is placed on it again (still STRICT_SPREAD, no re-plan) and the store equals an uninterrupted run's."""
    cluster.ensure_worker()
    model, reference = tiny_dynamic
    store = str(tmp_path / "back.zarr")
    job = cluster.start(*_dynamic_args(model, store, node_wait_s=90))
    cluster.lose_worker_when(job, "ray::ShardWorker")
    cluster.add_worker()
    assert job.wait(240) == 0, job.text[-4000:]
    lost = re.search(rf"(dynamic shard [01] of 2 \(layers [0-3]-[0-3]\)) (lost its node|on node) {WORKER_IP}", job.text)
    assert lost, job.text
    assert re.search(rf"{re.escape(lost.group(1))} runs again, on node {WORKER_IP} ", job.text), job.text
    assert "warning" not in job.text, job.text
    for name in ("short", "long"):
        _assert_same(reference, store, f"dynamic/{name}")


def test_dynamic_shard_node_lost_with_no_room_left_fails_with_one_line(cluster, big_mixtral, tmp_path):
    """The big model's shards each fit one node, the whole model no single node: when the worker dies,
    after node_wait_s the job fails with one line naming the shard, its node and what the cluster lacks."""
    cluster.ensure_worker()
    store = str(tmp_path / "fails.zarr")
    job = cluster.start(*_dynamic_args(str(big_mixtral.path), store, node_wait_s=3, inputs="short"))
    lost_at, _ = cluster.lose_worker_when(job, "ray::ShardWorker")
    assert job.wait(120) == 2, job.text[-4000:]
    assert job.when("moe-ray: error:") - lost_at < 3 + 60
    errors = [l for _, l in job.lines if l.startswith("moe-ray: error:")]
    assert len(errors) == 1, job.text
    assert re.match(rf"moe-ray: error: dynamic shard [01] of 2 \(layers [0-3]-[0-3]\) lost its node {WORKER_IP} \(node \w+\) "
                    r"and the cluster did not hold it again within 3 s \(node_wait_s\), and the nodes left cannot "
                    r"hold the 1 unfinished input\(s\) \(short\): .*no node of the cluster has [\d.]+ GiB of memory",
                    errors[0]), errors[0]
    assert "rerun the same spec to resume" in errors[0]
    assert not _flags(store, "short").all()
