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


def connect(address: str | None = None, num_cpus: int | None = None,
            object_store_memory_gb: float = 1.0) -> str:
    """Connect this process to Ray; returns a short description of what it connected to."""
    if ray.is_initialized():
        return "the Ray this process already uses"
    ensure_token_auth()
    kwargs = dict(logging_level=logging.WARNING, log_to_driver=True,
                  runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    try:
        if address or _local_cluster_address():
            ray.init(address=address, **kwargs)
            where = f"Ray cluster at {address or _local_cluster_address()}"
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False,
                     object_store_memory=int(object_store_memory_gb * 2**30), **kwargs)
            where = f"a local Ray with {int(ray.cluster_resources().get('CPU', 0))} CPUs"
            prestart_workers(int(ray.cluster_resources().get("CPU", 0)))
    except Exception as exc:
        name = type(exc).__name__
        # a driver refused by the GCS gets ConnectionError, the AuthenticationError in its cause's text
        chained = f"{exc} {exc.__cause__ or exc.__context__ or ''}"
        if "Authentication" in name or "AuthenticationError" in chained or \
                "auth" in str(exc).lower() and "token" in str(exc).lower():
            raise MoeRayError(
                f"Ray at {address} refused the connection: token authentication failed. Set "
                "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH to the cluster's token") from None
        raise MoeRayError(f"cannot connect to Ray{' at ' + address if address else ''}: {exc}") from None
    return where


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
