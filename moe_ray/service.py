"""Submitting moe-ray runs as Ray jobs (design §1, §7): `submit(spec, address) -> JobHandle`.

A thin layer over Ray's own job SDK (`ray.job_submission.JobSubmissionClient`). The spec is fully
validated here, on the submitting machine, before anything is sent (`moe_ray.api.plan`). The job
runs `python jobs/analyze.py --spec '<spec as JSON>'` on the head with a runtime_env that ships the
`moe_ray` package (py_modules) and the entrypoint (working_dir), so the cluster needs only moe-ray's
dependencies installed. Paths in the spec are as the cluster sees them: a checkpoint and a store on a
shared filesystem or an object store (relative local paths are made absolute here).

Progress while a job runs comes from the store itself: per analysis, the units done among those
the job planned (`moe_ray.store.progress`: `unit_done`, and `unit_planned` where a job runs only some
of a group's cells), counted over the analyses the job was submitted with.

Security: the job server is remote code execution for whoever can reach it (CVE-2023-48022), so
moe-ray's heads run with token authentication; requests carry the token the standard way
(`RAY_AUTH_MODE=token` with `RAY_AUTH_TOKEN` or `RAY_AUTH_TOKEN_PATH`), and a refusal becomes one
clear `JobError` line.
"""
from __future__ import annotations

import asyncio
import json
import os
import shlex
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .api import already_complete, as_spec, check_worker_locations, plan, weights_identity
from .distributed.cluster import probe_gcs
from .distributed.fanout import first_line
from .distributed.placement import Demand, check_placement
from .errors import JobError
from .spec import Spec
from .store import open_results, progress_text, store_progress
from .units.job import AnalysisJob

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
ENTRYPOINT = Path(__file__).resolve().parent.parent / "jobs" / "analyze.py"
METADATA_KEY = "moe_ray"


def job_server_address(address: str | None = None) -> str:
    """The job server to talk to: the argument, `RAY_API_SERVER_ADDRESS`, an http `RAY_ADDRESS`, or
    the local head's default (127.0.0.1:8265)."""
    if address:
        return address
    env = os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS", "")
    return env if env.startswith(("http://", "https://")) else DEFAULT_ADDRESS


@contextmanager
def _job_server(address: str, what: str) -> Iterator[None]:
    """Turn the job SDK's errors into one-line `JobError`s."""
    from ray.exceptions import AuthenticationError, RpcError

    try:
        yield
    except RpcError as exc:
        raise JobError(f"cannot reach the Ray cluster at {address} to {what}: {first_line(exc)}") from None
    except AuthenticationError:
        raise JobError(
            f"the Ray job server at {address} refused to {what}: token authentication failed. Set "
            "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH to the cluster's token") from None
    except ConnectionError as exc:
        raise JobError(f"cannot reach the Ray job server at {address} to {what}: {exc}") from None
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise JobError(f"the Ray job server at {address} could not {what}: {first}") from None


def _client(address: str | None, headers: dict[str, str] | None = None):
    from ray.job_submission import JobSubmissionClient

    address = job_server_address(address)
    if "://" not in address and address != "auto":  # a GCS address: Ray would retry it for 40 s
        why = probe_gcs(address)
        if why:
            raise JobError(f"cannot reach a Ray cluster at {address}: {why}. Give the job server's address, "
                           f"http://HEAD:8265 (or a running head's GCS address, HOST:6379)")
    with _job_server(address, "connect"):
        try:
            return JobSubmissionClient(address, headers=headers)
        except ValueError as exc:
            raise JobError(f"{address} is not a Ray job server address: {exc}") from None


def _absolute(location: str | None) -> str | None:
    """A local path made absolute (the job runs in another directory); URLs unchanged."""
    if location is None or "://" in location:
        return location
    return str(Path(location).expanduser().resolve())


def job_spec(spec: Spec) -> Spec:
    """The spec as the job runs it: local paths absolute, and the job's own cluster as the address."""
    inputs = replace(spec.dynamic, text_file=_absolute(spec.dynamic.text_file),
                     corpus_file=_absolute(spec.dynamic.corpus_file))  # read by the job (dynamic, causal)
    return spec.replace(model=_absolute(spec.model), reference=_absolute(spec.reference),
                        store=_absolute(spec.store), address=None, dynamic=inputs)


def runtime_env(staging: Path) -> dict[str, Any]:
    """What the job carries to the cluster: the entrypoint (working_dir) and this moe_ray (py_modules)."""
    return {
        "working_dir": str(staging),
        "py_modules": [str(Path(__file__).resolve().parent)],
        "env_vars": {"PYTHONUNBUFFERED": "1"},
    }


@dataclass(frozen=True)
class JobStatus:
    """A job's state (Ray's JobStatus name), Ray's message, and units done/total per analysis."""

    id: str
    state: str
    message: str
    store: str | None
    progress: dict[str, tuple[int, int]]

    @property
    def terminal(self) -> bool:
        return self.state in ("SUCCEEDED", "FAILED", "STOPPED")

    def line(self) -> str:
        """One line: id, state, units done / units the job runs per analysis, and the first line of
        Ray's message."""
        message = self.message.strip().splitlines()[0] if self.message.strip() else ""
        done = progress_text(self.progress)
        return f"{self.id}: {self.state}" + (f" ({done})" if done else "") + (
            f" - {message}" if message and self.state != "RUNNING" else "")


class JobHandle:
    """One submitted moe-ray job: `.status() .logs() .follow() .wait() .stop() .result()`."""

    def __init__(self, job_id: str, address: str | None = None, headers: dict[str, str] | None = None):
        self.id = job_id
        self.address = job_server_address(address)
        self._client = _client(self.address, headers)

    def __repr__(self) -> str:
        return f"JobHandle({self.id!r}, address={self.address!r})"

    def _info(self):
        with _job_server(self.address, f"report on job {self.id}"):
            return self._client.get_job_info(self.id)

    def status(self) -> JobStatus:
        return _job_status(self._info(), self.id)

    def logs(self) -> str:
        with _job_server(self.address, f"send the logs of job {self.id}"):
            return self._client.get_job_logs(self.id)

    def follow(self, write: Callable[[str], Any] = lambda s: print(s, end="", flush=True)) -> None:
        """Stream the job's log to `write` until the job ends."""
        async def tail() -> None:
            async for chunk in self._client.tail_job_logs(self.id):
                write(chunk)

        with _job_server(self.address, f"stream the logs of job {self.id}"):
            asyncio.run(tail())

    def wait(self, timeout: float | None = None, poll: float = 1.0) -> JobStatus:
        """Block until the job ends (or `timeout` seconds pass: `JobError`); returns its final status."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            status = self.status()
            if status.terminal:
                return status
            if deadline is not None and time.monotonic() > deadline:
                raise JobError(f"job {self.id} still {status.state} after {timeout:g}s")
            time.sleep(poll)

    def stop(self) -> bool:
        """Ask Ray to stop the job; finished units stay in the store, so resubmitting resumes."""
        with _job_server(self.address, f"stop job {self.id}"):
            return bool(self._client.stop_job(self.id))

    def result(self, timeout: float | None = None):
        """The job's results (`moe_ray.open_results` of its store) once it has succeeded."""
        status = self.wait(timeout)
        if status.state != "SUCCEEDED":
            tail = [l for l in self.logs().splitlines() if l.startswith("moe-ray: error:")]
            reason = tail[-1].removeprefix("moe-ray: error: ") if tail else status.message
            raise JobError(f"job {self.id} {status.state.lower()}: {reason}")
        return open_results(status.store)


def cluster_nodes(address: str | None = None, headers: dict[str, str] | None = None) -> list[dict[str, float]]:
    """The total resources (CPU, GPU, memory in bytes, ...) of every alive node of the cluster behind
    the job server at `address`, from Ray's state API."""
    from ray.util.state import StateApiClient
    from ray.util.state.common import ListApiOptions, StateResource
    from ray.util.state.exception import RayStateApiException

    address = job_server_address(address)
    options = ListApiOptions(detail=True, filters=[("state", "=", "ALIVE")])
    with _job_server(address, "list its nodes"):
        try:
            nodes = StateApiClient(address, headers=headers).list(StateResource.NODES, options=options,
                                                                  raise_on_missing_output=False)
        except RayStateApiException as exc:
            raise JobError(f"the Ray job server at {address} could not list its nodes: {first_line(exc)}") from None
    return [dict(node.resources_total or {}) for node in nodes]


def driver_resources(spec: Spec) -> dict[str, float]:
    """What a submitted job's driver (the entrypoint) holds for as long as the job runs."""
    return {"CPU": spec.resources.entrypoint_num_cpus, "memory": spec.resources.entrypoint_memory_gb * 2**30}


def check_fits_cluster(jobs: list[AnalysisJob], spec: Spec, address: str,
                       headers: dict[str, str] | None = None) -> None:
    """Refuse, before submission, a job whose driver or analyses no placement on the cluster's nodes
    could ever hold (`distributed.placement`), with the plan's numbers and the cluster's."""
    nodes = cluster_nodes(address, headers)
    driver = driver_resources(spec)
    demands = [Demand("the job's driver", (("the job's driver (entrypoint_num_cpus, entrypoint_memory_gb)", driver),))]
    demands += [replace(job.demand(spec, nodes), alongside=driver) for job in jobs]
    check_placement(demands, nodes, f"the cluster at {address}")


def submit(spec: Spec | dict | str | Path | None = None, address: str | None = None, *,
           check_checkpoint: bool = True, headers: dict[str, str] | None = None,
           **overrides: Any) -> JobHandle:
    """Validate `spec` and submit it as a Ray job to the job server at `address`; returns its handle.

    With `check_checkpoint` (default) the checkpoints are opened and every analysis planned here
    first (they must be readable from this machine too), and, unless the spec's `check_fit` is off,
    a job that the cluster's nodes could never hold is refused before it is sent; without it only
    the spec's own fields are checked, for checkpoints the cluster alone can see (the job then checks
    the fit itself when it starts).
    """
    spec = as_spec(spec, **overrides)
    check_worker_locations(spec)  # memory:// would be refused by the job, after it started
    if check_checkpoint:
        ckpt, ref, jobs = plan(spec)
        _check_existing_store(spec, ckpt, ref, jobs)
    else:
        spec.validate()
        jobs = []
    spec = job_spec(spec)
    address = job_server_address(address)
    client = _client(address, headers)
    if check_checkpoint and spec.resources.check_fit:
        check_fits_cluster(jobs, spec, address, headers)
    entrypoint = "python jobs/analyze.py --spec " + shlex.quote(json.dumps(spec.to_dict()))
    staging = Path(tempfile.mkdtemp(prefix="moe-ray-job-"))
    try:
        (staging / "jobs").mkdir()
        shutil.copy(ENTRYPOINT, staging / "jobs" / "analyze.py")
        with _job_server(address, "accept the job"):
            job_id = client.submit_job(
                entrypoint=entrypoint, runtime_env=runtime_env(staging),
                entrypoint_num_cpus=spec.resources.entrypoint_num_cpus,
                entrypoint_memory=int(spec.resources.entrypoint_memory_gb * 2**30),
                metadata={METADATA_KEY + "_store": spec.store, METADATA_KEY + "_model": spec.model,
                          METADATA_KEY + "_analyses": ",".join(spec.analyses)})
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return JobHandle(job_id, address, headers)


def _check_existing_store(spec: Spec, ckpt, ref, jobs: list[AnalysisJob]) -> None:
    """Where the spec's store is readable here too, refuse now what the job would refuse when it
    starts: a store of other weights, other parameters or layers (nothing is written)."""
    from .errors import MoeRayError

    try:
        already_complete(spec, jobs, *weights_identity(ckpt, ref))
    except MoeRayError:
        raise
    except Exception:  # a store only the cluster can reach: the job checks it itself
        pass


def jobs(address: str | None = None, headers: dict[str, str] | None = None) -> list[JobStatus]:
    """Every moe-ray job the job server knows, oldest first (other Ray jobs are left out)."""
    address = job_server_address(address)
    client = _client(address, headers)
    with _job_server(address, "list jobs"):
        infos = client.list_jobs()
    return [_job_status(info) for info in sorted(infos, key=lambda i: i.start_time or 0)
            if (info.metadata or {}).get(METADATA_KEY + "_store") and info.submission_id]


def _job_status(info, job_id: str | None = None) -> JobStatus:
    """A job's status from Ray's JobDetails, with its progress read from its store (the analyses it
    was submitted with)."""
    metadata = info.metadata or {}
    store = metadata.get(METADATA_KEY + "_store")
    analyses = [a for a in metadata.get(METADATA_KEY + "_analyses", "").split(",") if a] or None
    return JobStatus(job_id or info.submission_id, info.status.value, info.message or "", store,
                     store_progress(store, analyses) if store else {})


__all__ = ["JobHandle", "JobStatus", "cluster_nodes", "job_server_address", "jobs", "store_progress", "submit"]
