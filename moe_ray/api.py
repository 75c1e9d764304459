"""The programmatic API: `run(spec)` analyses a checkpoint into a store and returns its path;
`open_results(store)` reads it back as xarray. The CLI is a thin layer over these."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .checkpoint import Checkpoint, open_checkpoint
from .distributed.cluster import connect
from .distributed.fanout import Unit, check_fits, run_units
from .errors import CheckpointError, SpecError
from .spec import Spec
from .store import ResultStore, open_results
from .units import static as static_unit


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


def _select_layers(ckpt: Checkpoint, spec: Spec) -> tuple[int, ...]:
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


def run(spec: Spec | dict | str | Path | None = None, **overrides: Any) -> str:
    """Run the spec's analyses and return the store's path.

    Everything is validated (spec, checkpoints, tensors, shapes, cluster resources) before the store
    is touched. A rerun into a complete store does nothing; into a partial one it runs what is left.
    """
    spec = as_spec(spec, **overrides)
    spec.validate()
    ckpt = open_checkpoint(spec.model)
    ref = open_checkpoint(spec.reference) if spec.reference else None
    layers = _select_layers(ckpt, spec)
    plan = static_unit.plan_static(ckpt, ref, spec, layers)

    where = connect(spec.address, spec.resources.num_cpus, spec.resources.object_store_memory_gb)
    units = [Unit(f"layer {layer}", (plan, layer), _memory(spec, static_unit.layer_memory_bytes(plan, ckpt, layer)))
             for layer in layers]
    check_fits(units, spec.resources.cpus_per_task)

    identity = {"model": ckpt.fingerprint, "reference": ref.fingerprint if ref else None}
    store = ResultStore.create_or_reuse(spec.store, identity, spec.to_dict(), overwrite=spec.overwrite)
    store.root.attrs.update({"model": ckpt.facts.to_dict(),
                             "reference": ref.facts.to_dict() if ref else None})
    pending = set(static_unit.prepare(store, plan, overwrite=spec.overwrite))
    store.consolidate()

    todo = [u for u in units if u.args[1] in pending]
    started = time.monotonic()
    if spec.progress:
        print(f"moe-ray: {ckpt.facts.family} {Path(ckpt.location).name}, {len(todo)} of {len(units)} "
              f"static layer units to run on {where}")
    run_units(static_unit.run_layer, todo, what="static layers", cpus_per_task=spec.resources.cpus_per_task,
              progress=spec.progress)
    r2 = static_unit.finish(store, plan)
    store.consolidate()
    if spec.progress:
        tab3 = ", ".join(f"{m} {v:.3f}" for m, v in r2.items())
        print(f"moe-ray: done in {time.monotonic() - started:.1f}s: {len(todo)} layers computed, "
              f"{len(units) - len(todo)} already done; Tab 3 mean R² (X, Y_m): {tab3}; store {spec.store}")
    return spec.store


def _memory(spec: Spec, estimate: int) -> int:
    if spec.resources.memory_per_task_gb is not None:
        return int(spec.resources.memory_per_task_gb * 2**30)
    return estimate


__all__ = ["as_spec", "open_results", "run"]
