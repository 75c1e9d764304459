"""How fast a lost node is noticed and recovered from, on real Ray nodes (network namespaces with their
own IPs on one machine, `tests/netns_cluster.py`; needs root and iproute2), each scenario on a fresh
two-node cluster, with the head's health checks as `--health` says: `ray` (Ray's defaults),
`moe-ray` (what cluster/local/start-head.sh and the cluster configs set) or `tests` (the tests' ~2 s):

- kill:      the worker's processes SIGKILLed while its dynamic shard runs; node_wait_s 10, then the
             job re-plans onto the head;
- partition: the worker's link goes down instead (the machine is unreachable, not dead);
- back:      killed, and a new worker joins at the same address at once; node_wait_s 120;
- head:      the head's processes SIGKILLed during a static job whose driver runs on the worker
             (`moe-ray run --address HEAD`): what the driver does, what the store keeps, and what a
             rerun on a new cluster computes;
- head-ft:   the same with GCS fault tolerance: the GCS keeps its state in a Redis on a third node
             (needs `redis-server`), the head is started again 5 s after it died, and workers and
             the driver get KubeRay's 600 s to reconnect.

    python benchmarks/bench_node_loss.py [--scenario kill,partition,back,head] [--health ray|moe-ray|tests]

Times are seconds from the fault to the job's own lines (`lost its node` / `stopped answering`,
`runs again`, `re-planned`, the end).
"""
from __future__ import annotations

import argparse
import json
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import zarr

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from netns_cluster import FAST_NODE_DEATH, Lab  # noqa: E402

from moe_ray.checkpoint.tiny import make_tiny  # noqa: E402

BIG = {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 4, "num_attention_heads": 4,
       "num_key_value_heads": 4, "head_dim": 128}
CLI = [sys.executable, "-m", "moe_ray.cli"]
HEAD = "10.213.0.1:6379"
HEALTH = {
    "ray": {},
    "moe-ray": {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "3000",
                "RAY_health_check_failure_threshold": "5"},  # as cluster/local/start-head.sh
    "tests": FAST_NODE_DEATH,
}


class Job:
    """A command in a namespace; each output line kept with the time it arrived."""

    def __init__(self, lab: Lab, role: str, args: list[str], env: dict):
        self.proc = lab.popen(role, args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.lines: list[tuple[float, str]] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def when(self, pattern: str, since: float) -> float | None:
        t = next((t for t, line in self.lines if re.search(pattern, line)), None)
        return None if t is None else round(t - since, 1)

    def wait(self, timeout: float) -> int:
        rc = self.proc.wait(timeout)
        self.reader.join(10)
        return rc


REDIS_PASSWORD = secrets.token_hex(16)


def cluster(root: Path, health: str, redis: bool = False) -> tuple[Lab, dict]:
    """A head and a worker (and, with `redis`, a Redis on a third node backing the GCS)."""
    token = root / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    lab = Lab(root, ["h", "w", "r"] if redis else ["h", "w"]).create()
    env = lab.env(RAY_AUTH_TOKEN_PATH=str(token), **HEALTH[health])
    extra = []
    if redis:
        lab.popen("r", ["redis-server", "--bind", lab["r"].ip, "--port", "6379", "--requirepass", REDIS_PASSWORD,
                        "--dir", str(root), "--appendonly", "yes", "--save", ""], stdout=subprocess.DEVNULL)
        time.sleep(1)
        env.update(RAY_REDIS_ADDRESS=f"{lab['r'].ip}:6379", RAY_gcs_rpc_server_reconnect_timeout_s="600")
        extra = ["--redis-password", REDIS_PASSWORD]
    head = lab.start_head("h", num_cpus=2, env=env, extra=extra)
    lab.start_worker("w", head, num_cpus=2, env=env)
    return lab, env


def wait_for(lab: Lab, role: str, marker: str, job: Job, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and job.proc.poll() is None:
        if any(cmd.startswith(marker) for cmd in lab.processes(role).values()):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{marker} never ran in {role}:\n" + "\n".join(l for _, l in job.lines)[-3000:])


def dynamic(lab: Lab, env: dict, model: str, store: str, node_wait_s: float, fault: str) -> dict:
    job = Job(lab, "h", [*CLI, "run", "--model", model, "--store", store, "--analyses", "dynamic", "--inputs",
                         "short,long", "--max-tokens", "256", "--shards", "2", "--placement", "STRICT_SPREAD",
                         "--node-wait-s", str(node_wait_s), "--address", HEAD], env)
    wait_for(lab, "w", "ray::ShardWorker.run", job)
    at = time.monotonic()
    if fault == "partition":
        subprocess.run(["ip", "-n", lab["w"].name, "link", "set", "eth0", "down"], check=True)
    else:
        lab.lose("w")
    if fault == "back":
        lab.start_worker("w", lab.nodes[0], num_cpus=2, env=env, generation=1)
        joined = round(time.monotonic() - at, 1)
    rc = job.wait(600)
    out = {"exit": rc, "noticed_s": job.when(r"lost its node|stopped answering", at),
           "ray_marked_dead_s": job.when(r"has been marked dead", at),
           "runs_again_s": job.when(r"runs again", at), "replanned_s": job.when(r"re-planned", at),
           "end_s": round(job.lines[-1][0] - at, 1) if job.lines else None}
    if fault == "back":
        out["new_worker_joined_s"] = joined
    out["lines"] = [line for _, line in job.lines if line.startswith(("moe-ray", "(raylet)", "\x1b"))][-8:]
    return out


def head_loss(lab: Lab, env: dict, model: str, store: str, root: Path, health: str, ft: bool = False) -> dict:
    args = [*CLI, "run", "--model", model, "--store", store, "--analyses", "static", "--address", HEAD]
    job = Job(lab, "w", args, env)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and job.proc.poll() is None:  # once a unit is done
        try:
            if np.asarray(zarr.open_group(store, mode="r")["static/unit_done"][...]).any():
                break
        except (KeyError, FileNotFoundError, ValueError):
            pass
        time.sleep(0.1)
    at = time.monotonic()
    lab.lose("h")
    if ft:  # the head comes back (a restarted pod): same address, the GCS's state from Redis
        time.sleep(5)
        lab.start_head("h", num_cpus=2, env=env, extra=["--redis-password", REDIS_PASSWORD], generation=1)
        back = round(time.monotonic() - at, 1)
    try:
        rc = job.wait(400)
    except subprocess.TimeoutExpired:
        job.proc.kill()
        rc = "still running after 400 s"
    done = np.asarray(zarr.open_group(store, mode="r")["static/unit_done"][...]).astype(bool)
    out = {"driver_exit": rc, "driver_exit_s": round(job.lines[-1][0] - at, 1) if job.lines else None,
           "units_done_at_loss": int(done.sum()), "units": int(done.size),
           "driver_last_lines": [line[:200] for _, line in job.lines[-4:]]}
    if ft:
        out["head_back_s"] = back
        out["driver_finished"] = any("done in" in line for _, line in job.lines)
        return out
    lab.destroy()
    (root / "again").mkdir()
    lab2, env2 = cluster(root / "again", health)
    try:
        rerun = subprocess.run(lab2["h"].argv([*args]), env=env2, capture_output=True, text=True, timeout=600)
        todo = re.search(r"(\d+) of (\d+) units to run", rerun.stdout)
        out["rerun_exit"] = rerun.returncode
        out["rerun_units_to_run"] = todo.group(0) if todo else rerun.stdout[-500:] + rerun.stderr[-500:]
    finally:
        lab2.destroy()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="kill,partition,back,head")
    parser.add_argument("--health", choices=list(HEALTH), default="ray", help="the head's health-check settings")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mrb-", dir="/tmp"))
    results = {"health_checks": args.health}
    try:
        model = str(make_tiny("mixtral", "scratch", work / "big", seed=11, config_overrides=BIG).path)
        for k, scenario in enumerate(args.scenario.split(",")):
            root = work / f"c{k}"
            root.mkdir()
            lab, env = cluster(root, args.health, redis=scenario == "head-ft")
            try:
                store = str(root / "store.zarr")
                if scenario.startswith("head"):
                    results[scenario] = head_loss(lab, env, model, store, root, args.health, scenario == "head-ft")
                else:
                    wait = 120 if scenario == "back" else 10
                    results[scenario] = dynamic(lab, env, model, store, wait, scenario)
            finally:
                lab.destroy()
            print(json.dumps({scenario: results[scenario]}, indent=1), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
