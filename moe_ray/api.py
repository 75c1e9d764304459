"""The programmatic API: `run(spec)` analyses a checkpoint into a store and returns its path;
`open_results(store)` reads it back as xarray. The CLI is a thin layer over these."""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .checkpoint import Checkpoint, open_checkpoint
from .distributed.cluster import alive_nodes, connect
from .distributed.placement import check_placement
from .errors import CheckpointError, SpecError
from .spec import Spec
from .store import ResultStore, open_results
from .units import reorder as reorder_unit
from .units import static as static_unit
from .units import dynamic as dynamic_unit
from .units.job import AnalysisJob

Planner = Callable[[Spec, Checkpoint, "Checkpoint | None", tuple[int, ...]], AnalysisJob]
PLANNERS: dict[str, Planner] = {
    "static": static_unit.plan_job,
    "reorder": reorder_unit.plan_job,
}
PLANNERS["dynamic"] = dynamic_unit.plan_job
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
    return spec


def select_layers(ckpt: Checkpoint, spec: Spec) -> tuple[int, ...]:
    """The MoE layers a run covers: the spec's `layers`, checked, or every MoE layer."""
    facts = ckpt.facts
    if not facts.moe_layers:
        raise CheckpointError(f"{ckpt.location} is a dense {facts.family} model with no MoE layers; "
                              "give an MoE checkpoint as --model (a dense model can be --reference)")
    if spec.layers is None:
        return facts.moe_layers
    bad = [l for l in spec.layers if l not in facts.moe_layers]
    if bad:
        raise SpecError(f"layer {bad[0]} is not an MoE layer of {ckpt.location}; MoE layers are "
                        f"{facts.moe_layers[0]}..{facts.moe_layers[-1]} ({len(facts.moe_layers)} layers)")
    return tuple(sorted(set(spec.layers)))


def plan(spec: Spec) -> tuple[Checkpoint, Checkpoint | None, list[AnalysisJob]]:
    """Validate a spec against its checkpoints and split every analysis into units (no Ray, no store)."""
    spec.validate()
    ckpt = open_checkpoint(spec.model, spec.allow_pickle)
    ref = open_checkpoint(spec.reference, spec.allow_pickle) if spec.reference else None
    layers = select_layers(ckpt, spec)
    jobs = [PLANNERS[name](spec, ckpt, ref, layers) for name in spec.analyses]
    return ckpt, ref, jobs


def run(spec: Spec | dict | str | Path | None = None, **overrides: Any) -> str:
    """Run the spec's analyses and return the store's path.

    Everything is validated (spec, checkpoints, tensors, shapes, cluster resources) before the store
    is touched. A rerun into a complete store does nothing; into a partial one it runs what is left.
    """
    spec = as_spec(spec, **overrides)
    ckpt, ref, jobs = plan(spec)
    where = connect(spec.address, spec.resources.num_cpus, spec.resources.object_store_memory_gb)
    if spec.resources.check_fit:
        check_placement([job.demand(spec) for job in jobs], alive_nodes(), where)

    identity = {"model": ckpt.fingerprint, "reference": ref.fingerprint if ref else None}
    store = ResultStore.create_or_reuse(spec.store, identity, spec.to_dict(), overwrite=spec.overwrite)
    store.root.attrs.update({"model": ckpt.facts.to_dict(), "reference": ref.facts.to_dict() if ref else None})
    pending = {job.name: job.prepare(store, spec.overwrite) for job in jobs}
    store.consolidate()

    started = time.monotonic()
    say = print if spec.progress else (lambda *a, **k: None)
    total = sum(u.cells for job in jobs for u in job.units())  # done flags: a batch of pairs counts each pair
    todo = sum(u.cells for p in pending.values() for u in p)
    say(f"moe-ray: {ckpt.facts.family} {Path(ckpt.location).name}: {todo} of {total} units to run "
        f"({', '.join(spec.analyses)}) on {where}")
    summaries = []
    for job in jobs:
        job.execute(pending[job.name], spec)
        summaries.append(job.finish(store))
    store.consolidate()
    say(f"moe-ray: done in {time.monotonic() - started:.1f}s: {todo} units computed, {total - todo} "
        f"already done; {'; '.join(summaries)}; store {spec.store}")
    return spec.store


__all__ = ["PLANNERS", "as_spec", "open_results", "plan", "run", "select_layers"]
