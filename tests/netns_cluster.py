"""Real Ray nodes on one machine (issue 12): each node in its own Linux network namespace with its own
IP, the namespaces joined through a bridge that lives in a namespace of its own, token auth on.

Nothing here touches the host's interfaces, routes or addresses: every link, bridge and address is
created inside namespaces named `mrn<pid><role>`, and `Lab.destroy` ends every process in them (by
the namespace's own pid list, `ip netns pids`) before deleting them. Namespaces left by a test run
that was killed are removed by the next run (`sweep_stale`), only when the run that made them (the
pid in their name) is gone.

The filesystem is shared, as on a cluster with a shared filesystem: checkpoints and stores are at
the same paths on every node. Ports are per namespace, so each node uses Ray's default ports without
colliding with any other Ray on the machine.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "mrn"
SUBNET = "10.213.0"
"""The private link's /24: node k gets SUBNET.(k+1). Only ever configured inside the lab's namespaces."""
GCS_PORT = 6379
DASHBOARD_PORT = 8265
VENV_BIN = Path(sys.executable).parent
RAY = str(VENV_BIN / "ray")

FAST_NODE_DEATH = {
    # Ray's GCS declares a node dead after `failure_threshold` failed health checks, `period_ms` apart
    # (defaults 5 x 3 s, each timing out after 10 s): tuned so a lost node is seen in ~2 s.
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
}


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def unavailable_reason() -> str | None:
    """Why network namespaces cannot be made here (None: they can)."""
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    probe = f"{PREFIX}{os.getpid()}probe"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip() or made.returncode}"
    veth = _ip("-n", probe, "link", "add", "p0", "type", "veth", "peer", "name", "p1", check=False)
    _ip("netns", "del", probe, check=False)
    if veth.returncode != 0:
        return f"cannot create a veth pair in a namespace: {veth.stderr.strip()}"
    return None


def netns_pids(name: str) -> list[int]:
    out = _ip("netns", "pids", name, check=False)
    return [int(p) for p in out.stdout.split()] if out.returncode == 0 else []


def kill_namespace_processes(name: str, sig: int = signal.SIGKILL, timeout: float = 20.0) -> int:
    """Send `sig` to every process in namespace `name` until none is left; returns how many there were."""
    seen: set[int] = set()
    deadline = time.monotonic() + timeout
    while (pids := netns_pids(name)) and time.monotonic() < deadline:
        for pid in pids:
            seen.add(pid)
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        if sig != signal.SIGKILL:
            return len(seen)
        time.sleep(0.05)
    return len(seen)


def sweep_stale() -> None:
    """Delete lab namespaces whose creating process is gone (a run that was killed before cleaning up)."""
    listed = _ip("netns", "list", check=False).stdout
    for name in re.findall(rf"^({PREFIX}(\d+)[a-z]\w*)", listed, flags=re.M):
        ns, pid = name[0], int(name[1])
        if pid == os.getpid() or os.path.exists(f"/proc/{pid}"):
            continue
        kill_namespace_processes(ns)
        _ip("netns", "del", ns, check=False)


@dataclass
class Namespace:
    name: str
    ip: str

    def argv(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]


@dataclass
class RayNode:
    """A Ray node started with `ray start` inside a namespace."""

    ns: Namespace
    temp_dir: Path
    head: bool

    @property
    def address(self) -> str:
        return f"{self.ns.ip}:{GCS_PORT}"


@dataclass
class Lab:
    """Namespaces on one private /24 behind a bridge; Ray nodes in them."""

    root: Path
    roles: Sequence[str]
    tag: str = field(default_factory=lambda: f"{PREFIX}{os.getpid()}")
    spaces: dict[str, Namespace] = field(default_factory=dict)
    nodes: list[RayNode] = field(default_factory=list)

    @property
    def bridge_ns(self) -> str:
        return f"{self.tag}br"

    def create(self) -> "Lab":
        sweep_stale()
        _ip("netns", "add", self.bridge_ns)
        b = ("-n", self.bridge_ns)
        _ip(*b, "link", "set", "lo", "up")
        _ip(*b, "link", "add", "br0", "type", "bridge")
        _ip(*b, "link", "set", "br0", "up")
        for k, role in enumerate(self.roles):
            name = f"{self.tag}{role}"
            _ip("netns", "add", name)
            self.spaces[role] = Namespace(name, f"{SUBNET}.{k + 1}")
            port = f"v{k}"
            _ip(*b, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", name)
            _ip(*b, "link", "set", port, "master", "br0")
            _ip(*b, "link", "set", port, "up")
            _ip("-n", name, "link", "set", "lo", "up")
            _ip("-n", name, "addr", "add", f"{SUBNET}.{k + 1}/24", "dev", "eth0")
            _ip("-n", name, "link", "set", "eth0", "up")
        return self

    def destroy(self) -> None:
        for ns in [*self.spaces.values()]:
            kill_namespace_processes(ns.name)
        for ns in [*self.spaces.values()]:
            _ip("netns", "del", ns.name, check=False)
        kill_namespace_processes(self.bridge_ns)
        _ip("netns", "del", self.bridge_ns, check=False)
        self.spaces.clear()
        self.nodes.clear()

    def __getitem__(self, role: str) -> Namespace:
        return self.spaces[role]

    # ---- processes in a namespace ------------------------------------------------------------
    def env(self, **extra: str) -> dict[str, str]:
        """The environment of every Ray process and client in the lab: token auth on, this venv first."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") or k.startswith("RAY_AUTH_")}
        env.update(PATH=f"{VENV_BIN}:{env.get('PATH', '/usr/bin:/bin')}", RAY_AUTH_MODE="token",
                   PYTHONUNBUFFERED="1", RAY_USAGE_STATS_ENABLED="0")
        env.update(extra)
        return env

    def run(self, role: str, argv: Sequence[str], env: dict[str, str] | None = None, timeout: float = 300,
            **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(self[role].argv(argv), env=env if env is not None else self.env(), text=True,
                              capture_output=True, timeout=timeout, **kwargs)

    def popen(self, role: str, argv: Sequence[str], env: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:
        return subprocess.Popen(self[role].argv(argv), env=env if env is not None else self.env(), text=True,
                                **kwargs)

    def python(self, role: str, code: str, *args: str, **kwargs) -> subprocess.CompletedProcess:
        return self.run(role, [sys.executable, "-c", code, *args], **kwargs)

    # ---- Ray nodes ---------------------------------------------------------------------------
    def start_head(self, role: str, *, num_cpus: int, memory: int | None = None, env: dict[str, str] | None = None,
                   extra: Sequence[str] = (), generation: int = 0) -> RayNode:
        ns = self[role]
        temp = self.root / f"ray-{role}{generation or ''}"
        args = [RAY, "start", "--head", "--node-ip-address", ns.ip, "--port", str(GCS_PORT),
                "--dashboard-host", "127.0.0.1", "--dashboard-port", str(DASHBOARD_PORT), "--include-dashboard", "true",
                "--temp-dir", str(temp), "--num-cpus", str(num_cpus), "--object-store-memory", str(150 * 2**20),
                "--disable-usage-stats", *extra]
        return self._start(role, args, memory, env, temp, head=True)

    def start_worker(self, role: str, head: RayNode, *, num_cpus: int, memory: int | None = None,
                     env: dict[str, str] | None = None, generation: int = 0) -> RayNode:
        ns = self[role]
        temp = self.root / f"ray-{role}{generation}"
        args = [RAY, "start", "--address", head.address, "--node-ip-address", ns.ip, "--temp-dir", str(temp),
                "--num-cpus", str(num_cpus), "--object-store-memory", str(150 * 2**20), "--disable-usage-stats"]
        return self._start(role, args, memory, env, temp, head=False)

    def _start(self, role: str, args: list[str], memory: int | None, env: dict[str, str] | None, temp: Path,
               head: bool) -> RayNode:
        """Run `ray start` in namespace `role` (with --memory where given) and record its node."""
        ns = self[role]
        if memory is not None:
            args = [*args, "--memory", str(memory)]
        out = self.run(role, args, env=env, timeout=180)
        if out.returncode != 0:
            what = "ray start --head" if head else "ray start"
            raise RuntimeError(f"{what} in {ns.name} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
        node = RayNode(ns, temp, head=head)
        self.nodes.append(node)
        return node

    def lose(self, role: str) -> int:
        """The node in namespace `role` dies: every process in it is SIGKILLed (as when a machine
        fails). Returns how many processes that was."""
        self.nodes = [n for n in self.nodes if n.ns.name != self[role].name]
        return kill_namespace_processes(self[role].name)

    def processes(self, role: str) -> dict[int, str]:
        """pid -> command line (Ray sets a busy worker's to `ray::<task or actor method>`) of every
        process in namespace `role`."""
        out = {}
        for pid in netns_pids(self[role].name):
            try:
                out[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:
                pass
        return out
