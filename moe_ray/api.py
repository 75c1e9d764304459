"""The programmatic API: `run(spec)` analyses a checkpoint into a store and returns its path;
`open_results(store)` reads it back as xarray. The CLI is a thin layer over these."""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .checkpoint import Checkpoint, open_checkpoint
from .checkpoint.validate import validate_job_tensors
from .distributed.cluster import alive_nodes, connect, started_local_ray
from .distributed.fanout import first_line
from .distributed.placement import check_placement, reported_nodes
from .distributed.ray_messages import shorten_ray_events
from .errors import CheckpointError, MoeRayError, SpecError, StoreError
from .interrupt import on_forced_exit
from .interrupt import received as received_signal
from .fs import check_location, probe_write, use_storage_options
from .interrupt import reassert as reassert_signal_handlers
from .progress import step
from .spec import Spec, parse_pair
from .lease import Lease, LeaseHeld
from .store import ResultStore, open_results, progress, progress_text
from .units import reorder as reorder_unit
from .units import static as static_unit
from .units import causal as causal_unit
from .units import dynamic as dynamic_unit
from .units.job import AnalysisJob

Planner = Callable[[Spec, Checkpoint, "Checkpoint | None", tuple[int, ...]], AnalysisJob]
PLANNERS: dict[str, Planner] = {
    "static": static_unit.plan_job,
    "reorder": reorder_unit.plan_job,
}
PLANNERS["dynamic"] = dynamic_unit.plan_job
PLANNERS["causal"] = causal_unit.plan_job
"""How each analysis named in a spec is planned (validated and split into units)."""


def as_spec(spec: Spec | dict | str | Path | None = None, **overrides: Any) -> Spec:
    """A Spec from a Spec, a dict, or a TOML path; keyword arguments override fields."""
    if spec is None:
        spec = Spec()
    elif isinstance(spec, (str, Path)):
        spec = Spec.from_toml(spec)
    elif isinstance(spec, dict):
        spec = Spec.from_dict(spec)
    elif not isinstance(spec, Spec):
        raise SpecError(f"a spec must be a Spec, dict or TOML path, not {type(spec).__name__}")
    if overrides:
        data = spec.to_dict()
        data.update(overrides)
        spec = Spec.from_dict(data)
    return spec.with_absolute_paths()


def select_layers(ckpt: Checkpoint, spec: Spec) -> tuple[int, ...]:
    """The MoE layers a run covers: the spec's `layers`, checked, or every MoE layer."""
    facts = ckpt.facts
    if not facts.moe_layers:
        raise CheckpointError(f"{ckpt.location} is a dense {facts.family} model with no MoE layers; "
                              "give an MoE checkpoint as --model (a dense model can be --reference)")
    if spec.mtp and not facts.mtp_layers:
        raise SpecError(f"--mtp is given but {ckpt.location} has no multi-token-prediction layers; drop --mtp")
    available = facts.moe_layers + (facts.mtp_layers if spec.mtp else ())
    if spec.layers is None:
        return available
    bad = [l for l in spec.layers if l not in available]
    if bad and bad[0] in facts.mtp_layers:
        raise SpecError(f"layer {bad[0]} is {ckpt.location}'s multi-token-prediction layer, outside the main "
                        "stack; pass --mtp (spec field mtp = true) to analyse it")
    if bad:
        raise SpecError(f"layer {bad[0]} is not an MoE layer of {ckpt.location}; MoE layers are "
                        f"{facts.moe_layers[0]}..{facts.moe_layers[-1]} ({len(facts.moe_layers)} layers)")
    return tuple(sorted(set(spec.layers)))


def plan(spec: Spec) -> tuple[Checkpoint, Checkpoint | None, list[AnalysisJob]]:
    """Validate a spec against its checkpoints and split every analysis into units (no Ray, no store).

    Everything that can be known before reading weights is checked here: the spec's fields, both
    checkpoints' config.json and headers, and every tensor the analyses will read (present, an
    analysable dtype, the shape config.json implies)."""
    spec.validate()
    with use_storage_options(spec.storage_options):
        return _plan(spec)


def _plan(spec: Spec) -> tuple[Checkpoint, Checkpoint | None, list[AnalysisJob]]:
    ckpt = open_checkpoint(spec.model, spec.allow_pickle)
    ref = open_checkpoint(spec.reference, spec.allow_pickle) if spec.reference else None
    layers = select_layers(ckpt, spec)
    main_stack = tuple(l for l in layers if l not in ckpt.facts.mtp_layers)  # what a forward pass runs
    if "dynamic" in spec.analyses and not main_stack:
        raise SpecError("dynamic passes run the main stack; the multi-token-prediction layers take other "
                        "inputs: choose main-stack layers for dynamic analyses")
    pairs = [parse_pair(p) for p in spec.reorder.pairs or []] or [
        (i, j) for i in range(ckpt.facts.num_experts) for j in range(i + 1, ckpt.facts.num_experts)]
    validate_job_tensors(ckpt, ref, layers, [a for a in spec.analyses if a != "dynamic"],
                         pairs if "reorder" in spec.analyses else ())
    if "dynamic" in spec.analyses:
        validate_job_tensors(ckpt, ref, main_stack, ["dynamic"])
    jobs = [PLANNERS[name](spec, ckpt, ref, main_stack if name == "dynamic" else layers) for name in spec.analyses]
    return ckpt, ref, jobs


def run(spec: Spec | dict | str | Path | None = None, **overrides: Any) -> str:
    """Run the spec's analyses and return the store's path.

    Everything is validated (spec, checkpoints, tensors, shapes, the store's weights and parameters,
    cluster resources) before the store is touched. A rerun into a complete store writes nothing
    (it need not even be writable) and starts no Ray; into a partial one it runs what is left. A run
    that fails marks the store `failed` with its one-line error (`state`, `error` at the root).
    """
    spec = as_spec(spec, **overrides)
    check_worker_locations(spec)
    with use_storage_options(spec.storage_options):
        return _run(spec)


def check_worker_locations(spec: Spec) -> None:
    """Validate the spec and refuse locations that Ray workers, other processes, could not open:
    unknown protocols, and in-process ones such as memory:// (`plan` alone accepts those)."""
    spec.validate()
    for what, location in (("model", spec.model), ("reference", spec.reference), ("store", spec.store)):
        if location is not None:
            check_location(location, what)


def _run(spec: Spec) -> str:
    say = (lambda line: step(line, spec.progress))
    say(f"planning: reading {spec.model}'s config and tensor headers, checking the spec "
        f"({', '.join(spec.analyses)})")
    ckpt, ref, jobs = plan(spec)
    identity, unit_keys = weights_identity(ckpt, ref)
    complete = already_complete(spec, jobs, identity, unit_keys, checkpoints={"model": ckpt, "reference": ref})
    if complete is not None:
        print(f"moe-ray: {spec.store} already holds every unit of this job ({progress_text(complete)}); "
              "nothing to do")
        return spec.store
    probe_write(spec.store)  # a missing bucket, a refused write, a read-only disk: one line, before any unit

    with Lease(spec.store, "moe-ray run") as lease:  # one writer at a time, from before the first write
        if lease.took_over:
            say(f"{spec.store}: {lease.took_over}")
        started, todo, total, summaries = _write(spec, jobs, ckpt, ref, identity, unit_keys, say, lease)
    print(f"moe-ray: done in {time.monotonic() - started:.1f}s: {todo} units computed, {total - todo} "
          f"already done; {'; '.join(summaries)}; store {spec.store}")  # the result: shown even without progress
    return spec.store


def _write(spec: Spec, jobs: list[AnalysisJob], ckpt: Checkpoint, ref: Checkpoint | None, identity: dict,
           unit_keys: dict, say: Callable[..., None], lease: Lease | None = None) -> tuple[float, int, int, list[str]]:
    """The writing part of `run`, under the store's lease: connect to Ray, create or reuse the store,
    prepare every job's group (repairing what a done unit lacks), run the pending units, finish."""
    target = f"the Ray cluster at {spec.address}" if spec.address else "Ray (a running local one, else a new one)"
    say(f"connecting to {target}")
    where = connect(spec.address, spec.resources.num_cpus, spec.resources.object_store_memory_gb)
    shorten_ray_events()  # Ray's event messages: one line each on the terminal, whole in a log file
    reassert_signal_handlers()  # ray.init replaced SIGTERM's (moe-ray's commands: one line, exit 143)
    if spec.resources.check_fit or started_local_ray():  # a Ray moe-ray started can never grow
        check_placement([job.demand(spec) for job in jobs], reported_nodes(alive_nodes, where), where)
    store = ResultStore.create_or_reuse(
        spec.store, identity, spec.recorded(), overwrite=spec.overwrite, unit_keys=unit_keys,
        attrs={"model": ckpt.facts.to_dict(), "reference": ref.facts.to_dict() if ref else None})
    lost = lambda: lease is not None and lease.lost is not None  # taken over: the store is another run's now
    forget_store = on_forced_exit(lambda signame: None if lost() else store.end_run(_interrupted_by(signame)))
    try:
        pending = {job.name: job.prepare(store, spec.overwrite) for job in jobs}
        for repair in store.repairs:
            say(f"{spec.store} is damaged: {repair}")
        store.consolidate()
        counts = progress(store.root, spec.analyses)
        total = sum(t for _, t in counts.values())
        todo = total - sum(d for d, _ in counts.values())
        started = time.monotonic()
        say(f"{ckpt.facts.family} {Path(ckpt.location).name}: {todo} of {total} units to run "
            f"(done so far: {progress_text(counts).removesuffix(' units')}) on {where}")
        summaries = []
        for job in jobs:
            job.execute(pending[job.name], spec)
            summaries.append(job.finish(store))
    except BaseException as exc:
        if store.deleted():
            forget_store()
            if isinstance(exc, Exception):
                raise _deleted_mid_run(store) from None
            raise
        if lost():
            raise  # its lease was taken over: nothing more is written (`Lease.on_lost` said why)
        store.end_run(_run_error(exc), _counts_or_none(store, spec))
        store.consolidate()
        raise
    finally:
        forget_store()
    if store.deleted():
        raise _deleted_mid_run(store)
    if lost():
        raise LeaseHeld(lease.lost)  # taken over while its last units ran: the store is the other run's
    store.end_run(counts=_counts_or_none(store, spec))
    store.consolidate()
    return started, todo, total, summaries


def weights_identity(ckpt: Checkpoint, ref: Checkpoint | None) -> tuple[dict, dict[str, dict[str, list[str]]]]:
    """A store's identity (the model's and the reference's weight fingerprints) and the tensor names
    behind each fingerprint unit, which name the first tensor that differs in a refusal."""
    identity = {"model": ckpt.fingerprint, "reference": ref.fingerprint if ref else None}
    return identity, {"model": ckpt.unit_keys, **({"reference": ref.unit_keys} if ref else {})}


def _counts_or_none(store: ResultStore, spec: Spec) -> dict[str, tuple[int, int]] | None:
    """The run's units done/planned per analysis for its log entry (None if the store cannot say)."""
    try:
        return progress(store.root, spec.analyses)
    except Exception:
        return None


def _deleted_mid_run(store: ResultStore) -> StoreError:
    """The error of a run whose store was deleted under it: nothing is marked (that would re-create a
    root over loose chunks)."""
    return StoreError(f"store {store.url} was deleted while this run wrote into it; what is there now is "
                      "only pieces written since: remove it and run again")


def _interrupted_by(signame: str) -> str:
    return f"interrupted by {signame}; rerun the same spec to resume"


def _run_error(exc: BaseException) -> str:
    """How a run ended badly, as the store's one-line `error`."""
    if isinstance(exc, MoeRayError):
        return first_line(exc)
    if isinstance(exc, KeyboardInterrupt) and received_signal():
        return _interrupted_by(received_signal())
    if isinstance(exc, (KeyboardInterrupt, SystemExit)):
        return f"interrupted ({type(exc).__name__}); rerun the same spec to resume"
    return f"{type(exc).__name__}: {first_line(exc)}"


def already_complete(spec: Spec, jobs: list[AnalysisJob], identity: dict,
                     unit_keys: dict[str, dict[str, list[str]]],
                     checkpoints: "dict[str, Checkpoint | None] | None" = None) -> dict[str, tuple[int, int]] | None:
    """Without writing anything: refuse a store made from other weights (unless overwrite): another
    config.json or layout, or, given the `checkpoints`, any changed byte of a tensor a done unit read
    (`ResultStore.check_weights`); rehearse every job's `prepare` on the existing store (raising any
    refusal: other parameters, other layers) and return its progress if every unit of the job is done
    already and none lacks its results (a deleted array or chunk); None if there is work."""
    with use_storage_options(spec.storage_options):
        return _already_complete(spec, jobs, identity, unit_keys, checkpoints)


def _already_complete(spec: Spec, jobs: list[AnalysisJob], identity: dict,
                      unit_keys: dict[str, dict[str, list[str]]],
                      checkpoints: "dict[str, Checkpoint | None] | None") -> dict[str, tuple[int, int]] | None:
    existing = ResultStore.existing(spec.store, spec.overwrite)
    if existing is None or not existing.check_identity(identity, unit_keys, spec.overwrite) or spec.overwrite:
        return None
    if checkpoints is not None:
        existing.check_weights(checkpoints)
    rehearsal = ResultStore.dry_run(spec.store)
    for job in jobs:
        try:
            if job.prepare(rehearsal, False):
                rehearsal.needs_write = True
        except MoeRayError:
            raise
        except Exception:  # a write the read-only rehearsal could not make: the real run will
            rehearsal.needs_write = True
    return None if rehearsal.needs_write else progress(rehearsal.root, spec.analyses)


__all__ = ["PLANNERS", "already_complete", "as_spec", "check_worker_locations", "open_results", "plan", "run",
           "select_layers", "weights_identity"]
