"""Submitting moe-ray runs as Ray jobs (design §1, §7): `submit(spec, address) -> JobHandle`.

A thin layer over Ray's own job SDK (`ray.job_submission.JobSubmissionClient`). The spec is fully
validated here, on the submitting machine, before anything is sent (`moe_ray.api.plan`). The job
runs `python -m moe_ray.entrypoints.analyze --submitter-version V --spec '<spec as JSON>'` on the head with
the cluster's own installed moe-ray: the one path a package reaches a cluster is the wheel (`make
wheel`) installed on every node, or the image built from it (cluster/image); the job checks first that
it is this submitter's version and fails in one line if not. `ship_package` (`--ship-package`) is the
development path instead: this moe_ray travels with the job (runtime_env py_modules) and wins over the
cluster's. A user's runtime_env (`--runtime-env FILE`) is merged with moe-ray's own. Paths in the spec
are as the cluster sees them: a checkpoint and a store on a shared filesystem or an object store
(relative local paths are made absolute here).

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
import secrets
import shlex
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .api import already_complete, as_spec, check_worker_locations, plan, weights_identity
from .lease import refuse_if_held
from .distributed.cluster import probe_gcs
from .distributed.fanout import first_line
from .distributed.placement import Demand, check_placement, reported_nodes
from .errors import JobError, SpecError
from .progress import counter
from .spec import Spec
from .store import JOB_ENV, open_results, progress_text, store_progress, store_runs, store_status
from .units.job import AnalysisJob

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
ENTRYPOINT_MODULE = "moe_ray.entrypoints.analyze"
METADATA_KEY = "moe_ray"


def job_server_address(address: str | None = None) -> str:
    """The job server to talk to: the argument, `RAY_API_SERVER_ADDRESS`, an http `RAY_ADDRESS`, or
    the local head's default (127.0.0.1:8265)."""
    if address:
        return address
    env = os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS", "")
    return env if env.startswith(("http://", "https://")) else DEFAULT_ADDRESS


JOB_SERVER_TIMEOUT_S = 15.0
"""The deadline of every request to a job server (connecting, and each wait for the next bytes of an
answer): a server that accepts connections and never answers (a tunnel whose far end is down) fails
in seconds instead of hanging until killed."""

ADDRESS_VARIABLES = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
"""What Ray's job and state clients read in preference to the address they are given."""


@contextmanager
def _address_as_given() -> Iterator[None]:
    """Hide RAY_API_SERVER_ADDRESS and RAY_ADDRESS while a Ray client is built: Ray's clients prefer
    them to the address they are handed, so `--address` would silently lose to the variable (and
    `RAY_ADDRESS=local`, meaningful to `ray.init`, would break every job command). moe-ray reads them
    itself, once, in `job_server_address`."""
    saved = {name: os.environ.pop(name) for name in ADDRESS_VARIABLES if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def _with_deadline(client_class: type) -> type:
    """`client_class` (a Ray SubmissionClient) whose every HTTP request has `JOB_SERVER_TIMEOUT_S` as
    its deadline, unless a call sets its own."""
    class WithDeadline(client_class):
        def _do_request(self, method, endpoint, **kwargs):
            kwargs.setdefault("timeout", JOB_SERVER_TIMEOUT_S)
            return super()._do_request(method, endpoint, **kwargs)

    WithDeadline.__name__ = WithDeadline.__qualname__ = client_class.__name__
    return WithDeadline


@contextmanager
def _job_server(address: str, what: str) -> Iterator[None]:
    """Turn the job SDK's errors into one-line `JobError`s."""
    import requests
    from ray.exceptions import AuthenticationError, RpcError

    try:
        yield
    except requests.exceptions.Timeout:
        raise JobError(f"the Ray job server at {address} did not answer within {JOB_SERVER_TIMEOUT_S:g} s "
                       f"when asked to {what} (something accepts connections there but does not answer: a "
                       "tunnel whose far end is down?)") from None
    except requests.exceptions.RequestException as exc:
        raise JobError(f"cannot reach the Ray job server at {address} to {what}: {first_line(exc)}") from None
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

    from .distributed.cluster import ensure_token_auth

    ensure_token_auth()  # RAY_AUTH_MODE=token and the token file, as `run` sets them (unless set otherwise)

    address = job_server_address(address)
    if "://" not in address and address != "auto":  # a GCS address: Ray would retry it for 40 s
        why = probe_gcs(address)
        if why:
            raise JobError(f"cannot reach a Ray cluster at {address}: {why}. Give the job server's address, "
                           f"http://HEAD:8265 (or a running head's GCS address, HOST:6379)")
    with _job_server(address, "connect"), _address_as_given():
        try:
            return _with_deadline(JobSubmissionClient)(address, headers=headers)
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


def job_runtime_env(user: dict[str, Any] | None = None, ship_package: bool = False) -> dict[str, Any]:
    """The job's Ray runtime_env: moe-ray's own (unbuffered output; with `ship_package`, this moe_ray as
    a py_module) merged with the user's: the user's env_vars win over moe-ray's, py_modules add up, any
    other field is the user's."""
    user = dict(user or {})
    env = {"env_vars": {"PYTHONUNBUFFERED": "1", **(user.pop("env_vars", None) or {})}}
    modules = [str(Path(__file__).resolve().parent)] if ship_package else []
    modules += list(user.pop("py_modules", None) or [])
    if modules:
        env["py_modules"] = modules
    return {**user, **env}


def load_runtime_env(path: str | Path) -> dict[str, Any]:
    """A Ray runtime_env from a YAML or JSON file (what `ray job submit --runtime-env` reads)."""
    import yaml

    try:
        loaded = yaml.safe_load(Path(path).expanduser().read_text())
    except OSError as exc:
        raise SpecError(f"cannot read the runtime env file {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise SpecError(f"the runtime env file {path} is not YAML or JSON: {first_line(exc)}") from None
    if not isinstance(loaded, dict) or not all(isinstance(key, str) for key in loaded):
        raise SpecError(f"the runtime env file {path} must hold a mapping of runtime_env fields "
                        f"(env_vars, pip, py_modules, ...), not {type(loaded).__name__}")
    if not isinstance(loaded.get("env_vars", {}), dict) or not isinstance(loaded.get("py_modules", []), list):
        raise SpecError(f"the runtime env file {path}: env_vars must be a mapping and py_modules a list")
    return loaded


def entrypoint(spec: Spec, check_version: bool = True) -> str:
    """The job's shell command: the installed package's entrypoint module, told the submitter's version
    to check (not when this moe_ray is shipped with the job)."""
    from . import __version__

    version = ["--submitter-version", __version__] if check_version else []
    return shlex.join(["python", "-m", ENTRYPOINT_MODULE, *version, "--spec", json.dumps(spec.to_dict())])


@dataclass(frozen=True)
class JobStatus:
    """A job's state (Ray's JobStatus name), Ray's message, and units done/total per analysis."""

    id: str
    state: str
    message: str
    store: str | None
    progress: dict[str, tuple[int, int]]
    note: str = ""
    """What the progress is not: e.g. `store complete (by another run)` when the store was finished or
    written by another run after (or instead of) this job's own."""

    @property
    def terminal(self) -> bool:
        return self.state in ("SUCCEEDED", "FAILED", "STOPPED")

    def reason(self) -> str:
        """Why the job ended as it did, as one line: moe-ray's own error or interruption line where
        Ray's message carries the job's last log lines, else Ray's first line."""
        return failure_line(self.message)

    def line(self) -> str:
        """One line: id, state, units done / units this job's own run planned per analysis (or what the
        store shows instead), and, once it has ended badly, why."""
        done = ", ".join(x for x in (progress_text(self.progress), self.note) if x)
        reason = self.reason() if self.state not in ("RUNNING", "PENDING", "SUCCEEDED") else ""
        return f"{self.id}: {self.state}" + (f" ({done})" if done else "") + (f" - {reason}" if reason else "")


def failure_line(message: str) -> str:
    """The line that says why a job ended: the last `moe-ray: error:` (or `moe-ray: interrupted`)
    line of the log tail Ray puts in a failed job's message, without its prefix; else Ray's first line
    that does not merely introduce what follows (Ray's wrapper ends in a colon)."""
    lines = [l.strip() for l in (message or "").splitlines() if l.strip()]
    ours = [l for l in lines if l.startswith(("moe-ray: error:", "moe-ray: interrupted"))]
    if ours:
        return ours[-1].removeprefix("moe-ray: error:").removeprefix("moe-ray: ").strip()
    plain = [l for l in lines if not l.endswith(":")]
    return (plain or lines or [""])[0]


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
        return with_damage(_job_status(self._info(), self.id))

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

    def wait(self, timeout: float | None = None, poll: float = 1.0, progress: bool = True) -> JobStatus:
        """Block until the job ends (or `timeout` seconds pass: `JobError`); returns its final status.
        With `progress`, the units its run has done are counted as they come (`moe_ray.progress`)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        bar = None
        try:
            while True:
                status = self.status()
                done, total = (sum(c[i] for c in status.progress.values()) for i in (0, 1))
                if progress and total and (bar is None or bar.total != total):
                    if bar is not None:
                        bar.close()
                    bar = counter(total, f"job {self.id}", "unit")
                if bar is not None and done > bar.done:
                    bar.update(done - bar.done)
                if status.terminal:
                    return status
                if deadline is not None and time.monotonic() > deadline:
                    raise JobError(f"job {self.id} still {status.state} after {timeout:g}s")
                time.sleep(poll)
        finally:
            if bar is not None:
                bar.close()

    def stop(self) -> bool:
        """Ask Ray to stop the job; finished units stay in the store, so resubmitting resumes."""
        with _job_server(self.address, f"stop job {self.id}"):
            return bool(self._client.stop_job(self.id))

    def result(self, timeout: float | None = None):
        """The job's results (`moe_ray.open_results` of its store) once it has succeeded."""
        status = self.wait(timeout)
        if status.state != "SUCCEEDED":
            logs = self.logs()
            tail = [l for l in logs.splitlines() if l.startswith("moe-ray: error:")]
            reason = tail[-1].removeprefix("moe-ray: error: ") if tail else status.reason()
            if not tail and "No module named 'moe_ray'" in logs:
                reason = ("the cluster's Python has no moe-ray: install the wheel on every node, or run the "
                          "image built from it (cluster/README.md), or submit with --ship-package")
            raise JobError(f"job {self.id} {status.state.lower()}: {reason}")
        return open_results(status.store)


def cluster_nodes(address: str | None = None, headers: dict[str, str] | None = None) -> list[dict[str, float]]:
    """The total resources (CPU, GPU, memory in bytes, ...) of every alive node of the cluster behind
    the job server at `address`, from Ray's state API."""
    from ray.util.state import StateApiClient
    from ray.util.state.common import ListApiOptions, StateResource
    from ray.util.state.exception import RayStateApiException

    address = job_server_address(address)
    options = ListApiOptions(detail=True, filters=[("state", "=", "ALIVE")], timeout=int(JOB_SERVER_TIMEOUT_S))
    with _job_server(address, "list its nodes"):
        try:
            with _address_as_given():
                state = _with_deadline(StateApiClient)(address, headers=headers)
            nodes = state.list(StateResource.NODES, options=options, raise_on_missing_output=False)
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
    nodes = reported_nodes(lambda: cluster_nodes(address, headers), f"the cluster at {address}")
    driver = driver_resources(spec)
    demands = [Demand("the job's driver", (("the job's driver (entrypoint_num_cpus, entrypoint_memory_gb)", driver),))]
    demands += [replace(job.demand(spec, nodes), alongside=driver) for job in jobs]
    check_placement(demands, nodes, f"the cluster at {address}")


def submit(spec: Spec | dict | str | Path | None = None, address: str | None = None, *,
           check_checkpoint: bool = True, headers: dict[str, str] | None = None,
           runtime_env: dict[str, Any] | None = None, ship_package: bool = False,
           **overrides: Any) -> JobHandle:
    """Validate `spec` and submit it as a Ray job to the job server at `address`; returns its handle.

    With `check_checkpoint` (default) the checkpoints are opened and every analysis planned here
    first (they must be readable from this machine too), and, unless the spec's `check_fit` is off,
    a job that the cluster's nodes could never hold is refused before it is sent; without it only
    the spec's own fields are checked, for checkpoints the cluster alone can see (the job then checks
    the fit itself when it starts). The job runs the cluster's installed moe-ray, which must be this
    version; with `ship_package` this moe_ray travels with the job instead. `runtime_env`: Ray
    runtime_env fields merged with moe-ray's own (`job_runtime_env`).
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
    submission_id = f"raysubmit_{secrets.token_hex(8)}"  # chosen here, so the job's run in the store names it
    with _job_server(address, "accept the job"):
        env = job_runtime_env(runtime_env, ship_package)
        env.setdefault("env_vars", {})[JOB_ENV] = submission_id
        job_id = client.submit_job(
            entrypoint=entrypoint(spec, check_version=not ship_package), runtime_env=env,
            submission_id=submission_id,
            entrypoint_num_cpus=spec.resources.entrypoint_num_cpus,
            entrypoint_memory=int(spec.resources.entrypoint_memory_gb * 2**30),
            metadata={METADATA_KEY + "_store": spec.store, METADATA_KEY + "_model": spec.model,
                      METADATA_KEY + "_analyses": ",".join(spec.analyses)})
    return JobHandle(job_id, address, headers)


def _check_existing_store(spec: Spec, ckpt, ref, jobs: list[AnalysisJob]) -> None:
    """Where the spec's store is readable here too, refuse now what the job would refuse when it
    starts: a store of other weights, other parameters or layers (nothing is written)."""
    from .errors import MoeRayError

    try:
        already_complete(spec, jobs, *weights_identity(ckpt, ref), checkpoints={"model": ckpt, "reference": ref})
        refuse_if_held(spec.store)  # a job into a store another writer holds would fail as it starts
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
    """A job's status from Ray's JobDetails, with the progress of its own run of its store (the
    analyses it was submitted with; `own_progress`)."""
    metadata = info.metadata or {}
    store = metadata.get(METADATA_KEY + "_store")
    analyses = [a for a in metadata.get(METADATA_KEY + "_analyses", "").split(",") if a] or None
    job_id = job_id or info.submission_id
    progress, note = own_progress(store, job_id, analyses) if store else ({}, "")
    return JobStatus(job_id, info.status.value, info.message or "", store, progress, note)


def with_damage(status: JobStatus) -> JobStatus:
    """`status`, once its job has ended, with the first damage its store shows in the job's analyses
    (a done unit lacking an array or chunk, or with one corrupt: `store_status`), which the counts do
    not show; read once, at the end, not while the job runs."""
    if not status.terminal or not status.store:
        return status
    try:
        found = [f"{name} {s['text']}" for name, s in store_status(status.store).items()
                 if s["state"] == "damaged" and (not status.progress or name in status.progress)]
    except Exception:  # a store that cannot be looked at: the counts said what they could
        return status
    if not found:
        return status
    note = "; ".join(x for x in (status.note, f"store {found[0]}") if x)
    return replace(status, note=note)


def own_progress(store: str, job_id: str, analyses: list[str] | None = None) -> tuple[dict[str, tuple[int, int]], str]:
    """Units done/planned of `job_id`'s own run of `store`, and a note where the store says something
    else: while its run is the store's latest, the store's live counts; once another run has written
    the store after it, the counts its run recorded when it ended (none if it was killed) and that
    the store was written since; with no run of its own (not started yet, or refused), nothing but
    `store complete (by another run)` where that is so."""
    runs, state = store_runs(store)
    own = [i for i, run in enumerate(runs) if run.get("job") == job_id]
    if not own:
        return {}, ("store complete (by another run)" if state == "complete" else "")
    if own[-1] == len(runs) - 1:
        return store_progress(store, analyses), ""
    recorded = runs[own[-1]].get("progress") or {}
    counts = {a: (int(d), int(t)) for a, (d, t) in recorded.items() if analyses is None or a in analyses}
    later = "store complete (by another run)" if state == "complete" else "store since written by another run"
    return counts, later


__all__ = ["JobHandle", "JobStatus", "cluster_nodes", "failure_line", "job_server_address", "jobs",
           "own_progress", "store_progress", "submit"]
