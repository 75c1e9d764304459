"""The reorder work units (S4, paper §4.1.2, Tab 2): one Ray task per (layer, expert pair) in joint
mode and per (layer, expert pair, matrix) in separate mode.

A unit reads only its two experts' matrices, builds the n×n neuron similarity with torch in chunks
(on a GPU when the task has one), solves the assignment exactly with lapjv, writes its chunks of
`reorder/<mode>/*` and marks itself done. Each task declares `memory=` from n (the n×n float32
cost dominates: 4.3 GB at Grok-1's n = 32,768), so Ray never packs more pairs on a node than fit.
Everything (layers, pairs, memory budget, tensors and shapes) is validated in `plan_job`, before
the store is touched.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from ..analysis import reorder as R
from ..analysis.summary import GROWTH_DEFINITION, format_order, tab2_summary
from ..checkpoint import MATRICES, Checkpoint, ModelFacts, get_family, open_checkpoint
from ..distributed.fanout import Unit
from ..errors import CheckpointError, SpecError
from ..spec import Spec, parse_pair
from ..store import ResultStore, reorder_quantity, REORDER_SCHEMA, unit_done
from .job import TaskJob

GROUP = "reorder"
UNIT_DIMS = {"joint": ("layer", "expert_i", "expert_j"),
             "separate": ("layer", "matrix", "expert_i", "expert_j")}


@dataclass(frozen=True)
class ReorderPlan:
    """Everything a reorder unit needs, small and picklable (it travels to Ray workers)."""

    model: str
    store: str
    family: str
    facts: ModelFacts
    layers: tuple[int, ...]
    pairs: tuple[tuple[int, int], ...]
    modes: tuple[str, ...]

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(str(e) for e in range(self.facts.num_experts))


def select_pairs(texts: list[str] | None, num_experts: int) -> tuple[tuple[int, int], ...]:
    """The spec's pairs ("i-j"), checked against the expert count, or every pair i < j."""
    if not texts:
        return tuple((i, j) for i in range(num_experts) for j in range(i + 1, num_experts))
    pairs = sorted({parse_pair(t) for t in texts})
    for i, j in pairs:
        if j >= num_experts:
            raise SpecError(f"pair {i}-{j} is out of range: the model has {num_experts} experts "
                            f"(0..{num_experts - 1})")
    return tuple(pairs)


def unit_memory_bytes(plan: ReorderPlan, mode: str) -> int:
    """Memory one unit of `mode` declares to Ray (analysis.reorder.memory_bytes at this n)."""
    return R.memory_bytes(plan.facts.d_mid, plan.facts.d_hid, len(MATRICES) if mode == "joint" else 1)


def plan_reorder(ckpt: Checkpoint, spec: Spec, layers: tuple[int, ...]) -> ReorderPlan:
    """Validate a reorder run (pairs, tensors, shapes, memory budget) before any work starts."""
    facts, family = ckpt.facts, ckpt.family
    if facts.num_experts < 2:
        raise SpecError(f"{ckpt.location} has {facts.num_experts} expert per layer; reordering needs two")
    pairs = select_pairs(spec.reorder.pairs, facts.num_experts)
    modes = ("joint", "separate") if spec.reorder.reorder_mode == "both" else (spec.reorder.reorder_mode,)
    expert_shape = {"up": (facts.d_mid, facts.d_hid), "gate": (facts.d_mid, facts.d_hid),
                    "down": (facts.d_hid, facts.d_mid)}
    experts = sorted({e for pair in pairs for e in pair})
    for layer in layers:
        for e in experts:
            keys = family.expert_keys(layer, e)
            ckpt.require(list(keys.values()), f"layer {layer} expert {e}")
            for m, key in keys.items():
                if ckpt.info(key).shape != expert_shape[m]:
                    raise CheckpointError(f"{key} has shape {ckpt.info(key).shape}, config.json implies "
                                          f"{expert_shape[m]}")
    plan = ReorderPlan(ckpt.location, spec.store, family.name, facts, tuple(layers), pairs, modes)
    budget = spec.resources.memory_per_task_gb
    if budget is not None:
        need = max(unit_memory_bytes(plan, mode) for mode in modes)
        if budget * 2**30 < need:
            raise SpecError(f"memory_per_task_gb={budget:g} is too small for reordering n={facts.d_mid} "
                            f"neurons: one pair needs {need / 2**30:.2f} GiB (the n×n float32 cost "
                            f"alone is {4 * facts.d_mid**2 / 2**30:.2f} GiB)")
    return plan


def prepare(store: ResultStore, plan: ReorderPlan, mode: str, overwrite: bool = False) -> set[tuple]:
    """Create `reorder/<mode>` with its coordinates and arrays; return the unit keys not yet done."""
    group = store.group(f"{GROUP}/{mode}", {"mode": mode, "solver": "lapjv"}, overwrite=overwrite)
    store.coord(group, "layer", np.array(plan.layers, dtype=np.int64))
    store.coord(group, "matrix", np.array(MATRICES))
    for dim in ("expert_i", "expert_j"):
        store.coord(group, dim, np.array(plan.labels))
    store.coord(group, "neuron", np.arange(plan.facts.d_mid, dtype=np.int64))
    for name in REORDER_SCHEMA:
        store.array(group, name, reorder_quantity(name, mode), UNIT_DIMS[mode])
    planned = np.zeros(tuple(group[d].shape[0] for d in UNIT_DIMS[mode]), dtype=bool)
    for li in range(len(plan.layers)):
        for i, j in plan.pairs:
            planned[(li, slice(None), i, j) if mode == "separate" else (li, i, j)] = True
    store.done_array(group, UNIT_DIMS[mode], planned)  # progress counts these cells, not all E x E
    done = unit_done(group)
    pending = set()
    for li, layer in enumerate(plan.layers):
        for i, j in plan.pairs:
            if mode == "joint":
                if not done[li, i, j]:
                    pending.add((mode, layer, i, j, None))
            else:
                pending.update((mode, layer, i, j, m) for mi, m in enumerate(MATRICES) if not done[li, mi, i, j])
    return pending


# ---- the unit ----------------------------------------------------------------------------------

def run_pair(plan: ReorderPlan, mode: str, layer: int, i: int, j: int, matrix: str | None) -> dict:
    """Reorder expert j's neurons against expert i's at one layer and store the result (a Ray task)."""
    started = time.monotonic()
    matrices = MATRICES if matrix is None else (matrix,)
    family = get_family(plan.family)
    ckpt = open_checkpoint(plan.model)
    keys_i, keys_j = family.expert_keys(layer, i), family.expert_keys(layer, j)
    a = {m: ckpt.read(keys_i[m]) for m in matrices}
    b = {m: ckpt.read(keys_j[m]) for m in matrices}
    ckpt.close()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result = R.reorder_pair(a, b, matrices, device=device)
    del a, b

    store = ResultStore(plan.store)
    group = store.root[f"{GROUP}/{mode}"]
    li = plan.layers.index(layer)
    growth = result.growth
    for m in matrices:
        mi = MATRICES.index(m)
        group["similarity_before"][li, mi, i, j] = result.similarity_before[m]
        group["similarity_after"][li, mi, i, j] = result.similarity_after[m]
        group["growth"][li, mi, i, j] = growth[m]
        group["optimality_gap"][li, mi, i, j] = result.gap_bound
    where = (li, i, j) if mode == "joint" else (li, MATRICES.index(matrix), i, j)
    group["kendall_tau"][where] = result.kendall_tau
    group["permutation"][where] = result.perm.astype(np.int32)
    group["unit_done"][where] = 1
    seconds = time.monotonic() - started
    summary = ", ".join(f"{m} {result.similarity_before[m]:+.3f}->{result.similarity_after[m]:+.3f}"
                        for m in matrices)
    return {"layer": layer, "pair": (i, j), "matrix": matrix, "seconds": seconds,
            "log": f"{summary}, tau {result.kendall_tau:+.3f}, {device}, {seconds:.1f}s"}


def finish(store: ResultStore, plan: ReorderPlan, mode: str) -> dict:
    """Tab 2 for this store's model and mode, in the group's `tab2` attribute: medians over every computed
    layer and pair of the similarity before/after, the relative growth (per matrix and over all three)
    with its order of magnitude, and Kendall's tau (see `analysis.summary`)."""
    group = store.root[f"{GROUP}/{mode}"]
    before, after, growth, tau = (np.asarray(group[name][...], dtype=np.float64)
                                  for name in ("similarity_before", "similarity_after", "growth", "kendall_tau"))
    overall = tab2_summary(before, after, growth, tau)
    tau_of = (lambda mi: tau) if mode == "joint" else (lambda mi: tau[:, mi])
    per_matrix = {m: tab2_summary(before[:, mi], after[:, mi], growth[:, mi], tau_of(mi))
                  for mi, m in enumerate(MATRICES)}
    summary = {"model": plan.family, "location": plan.model, "mode": mode, **overall,
               "growth_median_per_matrix": {m: s["growth_median"] for m, s in per_matrix.items()},
               "tau_median_per_matrix": {m: s["tau_median"] for m, s in per_matrix.items()},
               "definition": GROWTH_DEFINITION}
    group.attrs["tab2"] = summary
    return summary


class ReorderJob(TaskJob):
    """S4 of a run: one unit per (layer, pair) in joint mode, per (layer, pair, matrix) in separate."""

    name = "reorder"

    def __init__(self, plan: ReorderPlan, memory_override: int | None = None):
        self.plan = plan
        self._units: list[Unit] = []
        for mode in plan.modes:
            memory = memory_override or unit_memory_bytes(plan, mode)
            for layer in plan.layers:
                for i, j in plan.pairs:
                    for matrix in (None,) if mode == "joint" else MATRICES:
                        what = f"reorder {mode} layer {layer} pair {i}-{j}" + (f" {matrix}" if matrix else "")
                        self._units.append(Unit(what, (plan, mode, layer, i, j, matrix), memory))

    def units(self) -> list[Unit]:
        return self._units

    def prepare(self, store: ResultStore, overwrite: bool) -> list[Unit]:
        pending = set()
        for mode in self.plan.modes:
            pending |= prepare(store, self.plan, mode, overwrite)
        return [u for u in self._units if u.args[1:] in pending]

    def unit_function(self):
        return run_pair

    def finish(self, store: ResultStore) -> str:
        parts = []
        for mode in self.plan.modes:
            tab = finish(store, self.plan, mode)
            parts.append(f"{mode}: relative growth {tab['growth_median']:.3g} (order "
                         f"{format_order(tab['order_of_growth'])}), tau {tab['tau_median']:+.3f}")
        return "reorder Tab 2 medians: " + "; ".join(parts)


def plan_job(spec: Spec, ckpt: Checkpoint, ref: Checkpoint | None, layers: tuple[int, ...]) -> ReorderJob:
    """The reorder job of a run, validated (the dense reference plays no part in S4)."""
    memory = int(spec.resources.memory_per_task_gb * 2**30) if spec.resources.memory_per_task_gb else None
    return ReorderJob(plan_reorder(ckpt, spec, layers), memory)
