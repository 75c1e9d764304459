"""Getting a Ray to run on: join the given cluster, join a local one, or start one (token auth on).

Ray opens its GCS, raylet and worker ports on every interface whatever it is told (design §7), so
every Ray that moe-ray starts runs with token authentication: `RAY_AUTH_MODE=token` and a token
file only the user can read (Ray's default `~/.ray/auth_token`, generated on first use).
"""
from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

import ray

from ..errors import MoeRayError

log = logging.getLogger("moe_ray")


def _local_cluster_address() -> str | None:
    """The address of a Ray already running on this machine (RAY_ADDRESS or `ray start`), if any."""
    try:
        from ray._private.services import canonicalize_bootstrap_address

        return canonicalize_bootstrap_address(None)
    except Exception:
        return None


def token_path() -> Path:
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")


def ensure_token_auth() -> None:
    """Turn token auth on for the Rays this process starts, with a user-only token file.

    An explicit `RAY_AUTH_MODE` (e.g. `disabled`) is respected. The token is generated once, as Ray's
    own `ray get-auth-token --generate` would, into `RAY_AUTH_TOKEN_PATH` or `~/.ray/auth_token`.
    """
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    if os.environ["RAY_AUTH_MODE"].lower() != "token":
        return
    if not os.environ.get("RAY_AUTH_TOKEN"):
        path = token_path()
        if not path.exists():
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
        path.chmod(0o600)
    try:  # Ray caches its config at import; refresh it so this process sees token mode too
        from ray._raylet import AuthenticationTokenLoader, Config

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()
    except Exception:
        log.debug("could not refresh Ray's cached auth config", exc_info=True)


PROBE_TIMEOUT_S = 5.0
_started_here = False


def started_local_ray() -> bool:
    """Whether the Ray this process uses is one `connect` started (it has this machine's CPUs and
    can never grow, so work it cannot hold is refused even with check_fit off)."""
    return _started_here and ray.is_initialized()


def probe_gcs(address: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why Ray's GCS at HOST:PORT cannot be reached (one line), or None if a GCS answered.

    One gRPC call with a deadline, so an address where nothing listens, or something that is not
    Ray, fails in seconds instead of `ray.init`'s endless retries. Any answer from Ray's GCS counts,
    a refusal for a missing token included (ray.init then reports that itself)."""
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    try:
        with grpc.insecure_channel(address) as channel:
            gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).GetClusterId(
                gcs_service_pb2.GetClusterIdRequest(), timeout=timeout)
    except grpc.RpcError as exc:
        code = exc.code()
        if code == grpc.StatusCode.UNAVAILABLE:
            details = exc.details() or ""
            if "resolv" in details or "lookup" in details:
                return "the host name does not resolve"
            if "HTTP" in details or "http" in details:
                return "something answers there, but it is not Ray's GCS (an HTTP server?)"
            return "nothing answers there (connection refused or unreachable)"
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return f"no answer within {timeout:g} s"
        if code in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.INTERNAL):
            return "something answers there, but it is not Ray's GCS"
    except ValueError as exc:  # grpc's own refusal of a malformed target
        return f"not a HOST:PORT address ({exc})"
    return None


def check_num_cpus(num_cpus: int | None, joining: str | None) -> None:
    """Refuse a `num_cpus` that would be ignored (joining the Ray at `joining`, which has the CPUs its
    nodes have) or that oversubscribes this machine (a local Ray with more CPUs than the machine runs
    that many tasks at once, each holding its memory)."""
    if num_cpus is None:
        return
    if joining and joining != "local":
        raise MoeRayError(f"num_cpus ({num_cpus}) sets the CPUs of a local Ray that moe-ray starts; joining the "
                          f"Ray at {joining} it would be ignored: drop --num-cpus (the cluster's nodes say what "
                          "they have)")
    machine = os.cpu_count() or 1
    if not joining and num_cpus > machine:
        raise MoeRayError(f"num_cpus {num_cpus} is more than this machine's {machine} CPUs: a local Ray with "
                          f"more would run {num_cpus} tasks at once on {machine} cores (and hold their memory); "
                          f"give at most {machine}, or leave it out for all")


def _unreachable(address: str, why: str, found: bool) -> MoeRayError:
    if found:
        return MoeRayError(
            f"the Ray recorded on this machine (RAY_ADDRESS or `ray start`) at {address} cannot be "
            f"reached: {why}; start it again, unset RAY_ADDRESS, or stop it with `ray stop` so that "
            "moe-ray starts its own")
    return MoeRayError(
        f"cannot reach Ray at {address}: {why}. Give the address of a running head's GCS (`ray start "
        "--head` prints it, HOST:6379), or leave --address out to run on a local Ray")


def connect(address: str | None = None, num_cpus: int | None = None,
            object_store_memory_gb: float = 1.0) -> str:
    """Connect this process to Ray; returns a short description of what it connected to.

    An address (given, or a Ray recorded on this machine) is probed first (`probe_gcs`), so a Ray
    that is not there fails in seconds with one line. A local Ray is started only with at least
    one CPU."""
    global _started_here
    if ray.is_initialized():
        return "the Ray this process already uses"
    if address and address.startswith(("http://", "https://")):
        raise MoeRayError(f"{address} is a job server address; `moe-ray run --address` takes a Ray "
                          "cluster's GCS address (HOST:6379, or ray://HOST:10001), and `moe-ray submit "
                          "--address` takes the job server's")
    if num_cpus is not None and num_cpus < 1:
        raise MoeRayError(f"num_cpus must be at least 1, not {num_cpus}: a local Ray with no CPUs can never "
                          "run a task")
    found = None if address else _local_cluster_address()
    target = address or found
    check_num_cpus(num_cpus, target)
    if target and target not in ("auto", "local"):
        host_port = target.removeprefix("ray://")
        why = probe_gcs(host_port) if not target.startswith("ray://") else _probe_tcp(host_port)
        if why:
            raise _unreachable(target, why, found is not None)
    ensure_token_auth()
    # log_to_driver off: what tasks and actors print stays in the Ray session's worker log files
    # (`ray logs`), so the terminal and a submitted job's log hold moe-ray's own lines (moe_ray.progress);
    # Ray's error events still reach the driver, one line each (distributed.ray_messages)
    kwargs = dict(logging_level=logging.WARNING, log_to_driver=False,
                  runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    try:
        if target:
            ray.init(address=address, **kwargs)
            where = f"Ray cluster at {target}"
        else:
            # Ray >= 2.5x gives every worker a process group of its own, so `kill -TERM -PGID` of a
            # run (a process manager, a batch scheduler) would end the driver, GCS and raylet and
            # leave the workers computing for a minute more; in the run's group they end with it.
            os.environ.setdefault("RAY_process_group_cleanup_enabled", "false")
            ray.init(num_cpus=num_cpus, include_dashboard=False,
                     object_store_memory=int(object_store_memory_gb * 2**30), **kwargs)
            _started_here = True
            where = f"a local Ray with {int(ray.cluster_resources().get('CPU', 0))} CPUs"
            prestart_workers(int(ray.cluster_resources().get("CPU", 0)))
    except Exception as exc:
        name = type(exc).__name__
        # a driver refused by the GCS gets ConnectionError, the AuthenticationError in its cause's text
        chained = f"{exc} {exc.__cause__ or exc.__context__ or ''}"
        if "Authentication" in name or "AuthenticationError" in chained or \
                "auth" in str(exc).lower() and "token" in str(exc).lower():
            raise MoeRayError(
                f"Ray at {target} refused the connection: token authentication failed. Set "
                "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH to the cluster's token") from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else name
        raise MoeRayError(f"cannot connect to Ray{' at ' + target if target else ''}: {first}") from None
    return where


def _probe_tcp(host_port: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why nothing accepts a TCP connection at HOST:PORT (a Ray client server), or None."""
    import socket

    host, _, port = host_port.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return None
    except ValueError:
        return "not a HOST:PORT address"
    except socket.gaierror:
        return "the host name does not resolve"
    except OSError as exc:
        return f"nothing answers there ({exc.strerror or exc})"


@ray.remote(num_cpus=1, max_retries=0)
def _import_compute_modules() -> None:
    import moe_ray.units  # noqa: F401  (torch, transformers, the analyses)


def prestart_workers(count: int) -> None:
    """Start `count` workers importing torch and the analyses now, without waiting for them.

    A fresh worker spends seconds on imports before its first unit; on a Ray this process has just
    started, that happens while the driver plans the run instead (Ray reuses the warm workers).
    """
    for _ in range(count):
        _import_compute_modules.remote()


def alive_nodes(leaving_out: str | None = None) -> list[dict[str, float]]:
    """The total resources of every alive node of the cluster this process is connected to (but the
    node whose id is `leaving_out`)."""
    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive") and n["NodeID"] != leaving_out]
