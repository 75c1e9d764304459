"""Free ports for the heads the tests start beside the session's Ray: all distinct, and outside the
kernel's ephemeral range (32768-60999 here), which the OS hands to outgoing connections and Ray to
its own listeners, so a port found free cannot be taken between the pick and the head's start."""
from __future__ import annotations

import random
import socket

_LOW, _HIGH = 20000, 32000  # above Ray's default worker ports (10002-19999), below the ephemeral range
_taken: set[int] = set()  # ports already handed out in this process


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def free_range(n: int) -> int:
    """The first of `n` consecutive ports, all free now and none handed out before by this module."""
    for _ in range(1000):
        base = random.randrange(_LOW, _HIGH - n)
        block = range(base, base + n)
        if not _taken.intersection(block) and all(_bindable(p) for p in block):
            _taken.update(block)
            return base
    raise RuntimeError(f"no {n} consecutive free ports in {_LOW}-{_HIGH}")


def free_port() -> int:
    """One free port, never one handed out before by this module (so a head's ports are all distinct)."""
    return free_range(1)


def head_ports() -> list:
    """`start-head.sh` flags giving every port of a head a distinct free one."""
    workers = free_range(16)
    flags = ["--port", "--ray-client-server-port", "--node-manager-port", "--object-manager-port",
             "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--metrics-export-port",
             "--runtime-env-agent-port"]
    return [x for flag in flags for x in (flag, free_port())] + \
        ["--min-worker-port", workers, "--max-worker-port", workers + 15]
