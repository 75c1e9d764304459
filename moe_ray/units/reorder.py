"""The reorder work units (S4, paper §4.1.2, Tab 2): one Ray task per tile of expert pairs of one
layer; done flags stay per (layer, pair) in joint mode and per (layer, matrix, pair) in separate mode,
so progress and resume count pairs, not tasks.

A tile is a t x t square of the layer's pair triangle (`analysis.reorder.tile_batches`), t sized so
that a task runs about a minute on its device (`pairs_per_task`: one pair at Mixtral's or Grok-1's n
on a CPU, tens to hundreds where pairs are small or a GPU builds the costs), which keeps Ray's task
count small for models with thousands of pairs per layer (DeepSeek-V3: 32,640). The store's chunks
are the same tiles (t along expert_i and expert_j), fixed when the group is created and read back from
it on a resume, so one task writes each chunk and a store holds a few files per tile, not per pair
(DeepSeek-V3: 13 M files per mode with a chunk per pair).
A unit reads each of its experts once (straight to its GPU when it has one), builds each pair's n×n
neuron similarity there in chunks, solves it exactly (`analysis.assignment`; while the GPU builds the
next pair's), then writes its tile of `reorder/<mode>/*` at once and marks its pairs done. Each task
declares its host memory (the n×n float32 cost dominates: 4.3 GB at Grok-1's n = 32,768) and, on a
GPU, its GPU memory. Everything (layers, pairs, memory budget, tensors and shapes) is validated in
`plan_job`, before the store is touched.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..analysis import assignment as A
from ..analysis import reorder as R
from ..analysis.summary import GROWTH_DEFINITION, order_reading, tab2_summary
from ..checkpoint import MATRICES, Checkpoint, ModelFacts, get_family, open_checkpoint
from ..distributed.fanout import Unit
from ..errors import CheckpointError, SpecError
from ..spec import Spec, parse_pair
from ..store import DONE, WEIGHTS, ResultStore, reorder_quantity, REORDER_SCHEMA, unit_done
from .job import DeviceRequest, TaskJob, cluster_gpus, held_dtype, release, where
from .sizing import overlaps, reorder_unit_memory

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
    stored_bytes: int = 2
    """Bytes per element of the experts as stored (bf16: 2)."""

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


Cell = tuple[int, int, "str | None"]
"""One done flag: experts (i, j) and, in separate mode, the matrix (None in joint mode)."""


def unit_memory(plan: ReorderPlan, experts_held: int, device: str, overlap: bool, problems: int = 1,
                cpus: float = 1) -> tuple[int, int]:
    """(host, GPU) bytes of a batch of this plan holding `experts_held` experts on `device` and solving
    `problems` assignments (`R.batch_size` of them at once) on `cpus` threads."""
    return reorder_unit_memory(plan.facts.d_mid, plan.facts.d_hid, plan.stored_bytes, experts_held, device, overlap,
                               problems, cpus)


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
    first = ckpt.info(family.expert_keys(layers[0], 0)["up"])
    plan = ReorderPlan(ckpt.location, spec.store, family.name, facts, tuple(layers), pairs, modes,
                       max(1, first.nbytes // (facts.d_mid * facts.d_hid)))
    budget = spec.resources.memory_per_task_gb
    if budget is not None:
        need, _ = unit_memory(plan, 2, "cpu", False)
        if budget * 2**30 < need:
            raise SpecError(f"memory_per_task_gb={budget:g} is too small for reordering n={facts.d_mid} "
                            f"neurons: one pair needs {need / 2**30:.2f} GiB (the n×n float32 cost "
                            f"alone is {4 * facts.d_mid**2 / 2**30:.2f} GiB)")
    return plan


def prepare(store: ResultStore, plan: ReorderPlan, mode: str, side: int = 1, overwrite: bool = False) -> set[tuple]:
    """Create `reorder/<mode>` with its coordinates and arrays, chunked in tiles of `side` x `side`
    pairs (an existing group keeps its own: `stored_tile_side`); return the unit keys not yet done."""
    group = store.group(f"{GROUP}/{mode}", {"mode": mode, "solver": f"{A.SOLVER} (certified on the dense matrix; lapjv fallback)"}, overwrite=overwrite)
    chunks = {"expert_i": side, "expert_j": side}
    store.coord(group, "layer", np.array(plan.layers, dtype=np.int64))
    store.coord(group, "matrix", np.array(MATRICES))
    for dim in ("expert_i", "expert_j"):
        store.coord(group, dim, np.array(plan.labels))
    store.coord(group, "neuron", np.arange(plan.facts.d_mid, dtype=np.int64))
    for name in REORDER_SCHEMA:
        store.array(group, name, reorder_quantity(name, mode), UNIT_DIMS[mode], chunks=chunks)
    planned = np.zeros(tuple(group[d].shape[0] for d in UNIT_DIMS[mode]), dtype=bool)
    for li in range(len(plan.layers)):
        for i, j in plan.pairs:
            planned[(li, slice(None), i, j) if mode == "separate" else (li, i, j)] = True
    store.done_array(group, UNIT_DIMS[mode], planned, chunks=chunks)  # progress counts these cells, not all E x E
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


def stored_tile_side(store_url: str, mode: str) -> int | None:
    """The tile side of an existing `reorder/<mode>` group (its chunks along expert_i), or None."""
    existing = ResultStore.existing(store_url)
    path = f"{GROUP}/{mode}/unit_done"
    if existing is None or path not in existing.root:
        return None
    return int(existing.root[path].chunks[UNIT_DIMS[mode].index("expert_i")])


# ---- the unit ----------------------------------------------------------------------------------

def _cell_index(li: int, cell: Cell) -> tuple[int, ...]:
    i, j, matrix = cell
    return (li, i, j) if matrix is None else (li, MATRICES.index(matrix), i, j)


def write_cells(array, cells: list[tuple[tuple[int, ...], object]]) -> None:
    """array[index] = value for every (index, value), in one read and one write of the region the
    indices span (within one tile, so within one chunk: a task's whole tile is written at once, and two
    tasks writing one tile, a task Ray gave up for lost and its retry, write the same values)."""
    indices = np.array([index for index, _ in cells])
    low, high = indices.min(axis=0), indices.max(axis=0) + 1
    region_at = tuple(slice(int(a), int(b)) for a, b in zip(low, high))
    region = np.asarray(array[region_at])
    for index, value in cells:
        region[tuple(np.subtract(index, low))] = value
    array[region_at] = region


def run_batch(plan: ReorderPlan, mode: str, layer: int, cells: tuple[Cell, ...],
              request: DeviceRequest = DeviceRequest(), overlap: bool = False, cpus: int = 1) -> dict:
    """Reorder every cell (pair, and matrix in separate mode) of one tile of one layer in `cells` and
    store them together once all are solved (a Ray task of about a minute), `R.batch_size` cells at a
    time on the `cpus` the task declared. Cells already done are skipped; a task retried after its
    worker died redoes its tile."""
    started = time.monotonic()
    device, note = request.resolve()
    group = ResultStore(plan.store).root[f"{GROUP}/{mode}"]
    li = plan.layers.index(layer)
    cells = tuple(c for c in cells if not group["unit_done"][_cell_index(li, c)])
    family = get_family(plan.family)
    ckpt = open_checkpoint(plan.model)

    digests: dict[int, dict[str, str]] = {}

    def load(e: int) -> dict[str, torch.Tensor]:
        keys = family.expert_keys(layer, e)
        expert = {m: ckpt.read(keys[m], held_dtype(ckpt.info(keys[m]).dtype), device=device) for m in MATRICES}
        digests[e] = ckpt.digests([keys[m] for m in MATRICES])  # the bytes just read, from the page cache
        ckpt.close()  # the memory maps go with the tensors once they are prepared
        return expert

    problems = [(i, j, MATRICES if m is None else (m,)) for i, j, m in cells]
    writes: dict[str, list[tuple[tuple[int, ...], object]]] = {
        name: [] for name in (*REORDER_SCHEMA, WEIGHTS, DONE)}
    before, after, taus = [], [], []
    build = solve = 0.0
    try:
        batch = R.batch_size(plan.facts.d_mid, len(problems), device.type, cpus)  # as `unit_memory` declared
        for (i, j, matrices), result in R.reorder_pairs(load, problems, device, overlap, batch=batch, workers=cpus):
            for m in matrices:
                mi = MATRICES.index(m)
                writes["similarity_before"].append(((li, mi, i, j), result.similarity_before[m]))
                writes["similarity_after"].append(((li, mi, i, j), result.similarity_after[m]))
                writes["growth"].append(((li, mi, i, j), result.growth[m]))
                writes["optimality_gap"].append(((li, mi, i, j), result.gap_bound))
                before.append(result.similarity_before[m])
                after.append(result.similarity_after[m])
            cell = _cell_index(li, (i, j, None if mode == "joint" else matrices[0]))
            writes["kendall_tau"].append((cell, result.kendall_tau))
            writes["permutation"].append((cell, result.perm.astype(np.int32)))
            writes[WEIGHTS].append((cell, json.dumps({"model": {**digests[i], **digests[j]}}, sort_keys=True)))
            writes[DONE].append((cell, 1))
            taus.append(result.kendall_tau)
            build, solve = build + result.build_seconds, solve + result.solve_seconds
    finally:
        release(device)
    for name, values in writes.items():  # unit_done last: a tile is done only once all of it is written
        if values:
            write_cells(group[name], values)
    seconds = time.monotonic() - started
    one, many = ("pair", "pairs") if mode == "joint" else ("pair-matrix", "pair-matrices")
    what = f"{len(cells)} {one if len(cells) == 1 else many}"
    summary = (f"similarity {np.mean(before):+.3f}->{np.mean(after):+.3f}, tau {np.median(taus):+.3f}"
               if cells else "already done")
    return {"layer": layer, "cells": len(cells), "seconds": seconds, "build_seconds": build,
            "solve_seconds": solve, "device": device.type, "note": note,
            "log": f"{what}: {summary}, {where(device)}, {seconds:.1f}s (build {build:.1f}s, solve {solve:.1f}s)"}


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
    """S4 of a run: one unit per batch of pairs of a layer (and mode); a done flag per pair (joint) or
    per pair and matrix (separate)."""

    name = "reorder"
    cell_name = "pair"

    def __init__(self, plan: ReorderPlan, spec: Spec):
        super().__init__(spec)
        self.plan = plan

    def per_task(self, mode: str, device: str) -> int:
        """Pairs per task of `mode` on `device` (the spec's pairs_per_task, else sized from the plan)."""
        return R.pairs_per_task(self.plan.facts.d_mid, self.plan.facts.d_hid, mode, device,
                                self.spec.resources.cpus_per_task, self.spec.reorder.pairs_per_task)

    def tile_side(self, mode: str, device: str, overlap: bool) -> int:
        """The side of the pair tiles a task of `mode` takes: the store's own when it has the group
        (its chunks are those tiles), else from `per_task`, halved while a tile's memory exceeds the
        spec's memory_per_task_gb (which every task then declares)."""
        budget = self.spec.resources.memory_per_task_gb
        cpus = self.spec.resources.cpus_per_task
        cells = 1 if mode == "joint" else len(MATRICES)
        fits = lambda t: budget is None or unit_memory(self.plan, min(2 * t, self.plan.facts.num_experts),
                                                       device, overlap, t * t * cells, cpus)[0] <= budget * 2**30
        stored = None if self.spec.overwrite else stored_tile_side(self.spec.store, mode)
        if stored is not None:
            if stored > 1 and not fits(stored):
                raise SpecError(f"{self.spec.store} holds reorder/{mode} in tiles of {stored}x{stored} pairs, "
                                f"whose task needs more than memory_per_task_gb={budget:g}; give more memory "
                                "or --overwrite")
            return stored
        side = R.tile_side(self.per_task(mode, device))
        while side > 1 and not fits(side):
            side //= 2
        return side

    def batches(self, mode: str, device: str, overlap: bool) -> list[list[tuple[int, int]]]:
        """The plan's pairs in tiles (see `tile_side`), one batch per tile."""
        return R.tile_batches(self.plan.pairs, self.tile_side(mode, device, overlap))

    def build_units(self, device: str) -> list[Unit]:
        units = []
        overlap = overlaps(device, self.spec.resources.cpus_per_task)
        for mode in self.plan.modes:
            batches = self.batches(mode, device, overlap)
            for layer in self.plan.layers:
                for batch in batches:
                    cells = tuple((i, j, m) for i, j in batch for m in ((None,) if mode == "joint" else MATRICES))
                    held = len({e for pair in batch for e in pair})
                    cpus = self.spec.resources.cpus_per_task
                    request, resources = self.request(device, *unit_memory(self.plan, held, device, overlap,
                                                                           len(cells), cpus))
                    pairs = (f"pair {batch[0][0]}-{batch[0][1]}" if len(batch) == 1 else
                             f"pairs {batch[0][0]}-{batch[0][1]}..{batch[-1][0]}-{batch[-1][1]} ({len(batch)})")
                    units.append(Unit(f"reorder {mode} layer {layer} {pairs}",
                                      (self.plan, mode, layer, cells, request, overlap, cpus), cells=len(cells),
                                      **resources))
        return units

    def prepare(self, store: ResultStore, overwrite: bool) -> list[Unit]:
        """The units with cells not yet done, each cut down to those cells."""
        pending = set()
        device = self.device_for(cluster_gpus())
        overlap = overlaps(device, self.spec.resources.cpus_per_task)
        for mode in self.plan.modes:
            pending |= prepare(store, self.plan, mode, self.tile_side(mode, device, overlap), overwrite)
        out = []
        for unit in self.units():
            plan, mode, layer, cells, request, overlap, cpus = unit.args
            todo = tuple(c for c in cells if (mode, layer, *c) in pending)
            if todo:
                out.append(dataclasses.replace(unit, args=(plan, mode, layer, todo, request, overlap, cpus),
                                               cells=len(todo)))
        return out

    def unit_function(self):
        return run_batch

    def finish(self, store: ResultStore) -> str:
        parts = []
        for mode in self.plan.modes:
            tab = finish(store, self.plan, mode)
            parts.append(f"{mode}: relative growth {tab['growth_median']:.3g} "
                         f"({order_reading(tab['growth_median'], tab['growth_q25'], tab['growth_q75'])}), "
                         f"tau {tab['tau_median']:+.3f}")
        return "reorder Tab 2 medians: " + "; ".join(parts)


def plan_job(spec: Spec, ckpt: Checkpoint, ref: Checkpoint | None, layers: tuple[int, ...]) -> ReorderJob:
    """The reorder job of a run, validated (the dense reference plays no part in S4)."""
    return ReorderJob(plan_reorder(ckpt, spec, layers), spec)
