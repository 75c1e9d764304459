"""The static work unit: one MoE layer. Reads only that layer's tensors, computes S1, S2, S3, S5
and S6 with `analysis.static`, writes the layer's chunks of `static/*`, then marks itself done.

Where: on the device its job planned (`units.job`): on cuda the tensors go from the checkpoint
straight to the GPU as stored and every analysis runs there; the same code runs on the CPU.

Memory: the layer is processed one matrix kind (up, gate, down) at a time, and the matrices are held
as stored when that is bfloat16, float16 or float32 (each streamed block is converted to float32 as it
is used): on the CPU they are then the checkpoint's own memory-mapped bytes, so a unit holds about a
third of its layer's bytes, plus blocks (see `units.sizing`).
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from ..analysis import static as S
from ..checkpoint import MATRICES, Checkpoint, ModelFacts, get_family, open_checkpoint
from ..checkpoint.validate import check_reference
from ..errors import CheckpointError
from ..spec import Spec, StaticOptions
from ..distributed.fanout import Unit
from ..store import DONE, STATIC_SCHEMA, STATIC_SUMMARY, WEIGHTS, ResultStore, unit_done
from .job import DeviceRequest, TaskJob, WeightsRecord, held_dtype, release, where
from .sizing import DEFAULT_GPU_MEMORY_GB, static_read_ahead, static_unit_memory

GROUP = "static"
UNIT_DIMS = ("layer",)
N_COMPONENTS = 3
COVARIANCE_MAX_D_HID = 128  # above this, randomised neuron PCA is far cheaper (see README)


@dataclass(frozen=True)
class StaticPlan:
    """Everything a static unit needs, small and picklable (it travels to Ray workers)."""

    model: str
    reference: str | None
    store: str
    family: str
    facts: ModelFacts
    layers: tuple[int, ...]
    labels: tuple[str, ...]
    neuron_dim: int
    neuron_pca_method: str
    options: StaticOptions
    absent: dict = field(default_factory=dict)
    allow_pickle: bool = False
    stored_bytes: int = 2
    """Bytes per element of the experts as stored (bf16: 2)."""
    held_bytes: int = 2
    """Bytes per element as a unit holds them (`units.job.held_dtype`)."""
    label_rows: tuple[int, ...] = ()
    """Neurons (d_mid) of each label's matrices, in label order."""
    read_ahead: bool = False
    """On a GPU, read the next matrix kind while one is analysed (where two kinds fit the GPU:
    `units.sizing.static_read_ahead`); the declared GPU memory holds two kinds then."""

    def label_keys(self, ckpt: Checkpoint, ref: Checkpoint | None, layer: int, matrix: str):
        """(label, checkpoint, key) for every label of this layer and matrix kind."""
        family = get_family(self.family)
        out = [(str(e), ckpt, family.expert_keys(layer, e)[matrix]) for e in range(self.facts.num_experts)]
        if "F" in self.labels:
            out.append(("F", ref, ref.family.dense_ffn_keys(layer)[matrix]))
        if "SE" in self.labels:
            out.append(("SE", ckpt, family.shared_expert_keys(layer)[matrix]))
        return out


def plan_static(ckpt: Checkpoint, ref: Checkpoint | None, spec: Spec, layers: tuple[int, ...]) -> StaticPlan:
    """Validate everything a static run needs (tensors present, shapes) before any work starts."""
    facts, family = ckpt.facts, ckpt.family
    labels = [str(e) for e in range(facts.num_experts)]
    absent: dict[str, dict[str, str]] = {"all": {}}
    expert_shape = {"up": (facts.d_mid, facts.d_hid), "gate": (facts.d_mid, facts.d_hid),
                    "down": (facts.d_hid, facts.d_mid)}
    neuron_dim = facts.d_mid
    for layer in layers:
        keys = [family.router_weight_key(layer)]
        for e in range(facts.num_experts):
            keys += list(family.expert_keys(layer, e).values())
        ckpt.require(keys, f"layer {layer}")
        for m, key in family.expert_keys(layer, 0).items():
            if ckpt.info(key).shape != expert_shape[m]:
                raise CheckpointError(f"{key} has shape {ckpt.info(key).shape}, config.json implies "
                                      f"{expert_shape[m]}")

    def note_shape_mismatch(label: str, d_mid: int, what: str) -> None:
        if d_mid != facts.d_mid:
            reason = (f"{what} has d_mid {d_mid}, routed experts {facts.d_mid}: flattened matrices "
                      "differ in length")
            absent.setdefault("matrix_similarity", {})[label] = reason
            absent.setdefault("matrix_pca", {})[label] = reason

    if ref is not None:
        check_reference(ckpt, ref, layers)
        ref_d_mid = None
        for layer in layers:
            ref_keys = ref.family.dense_ffn_keys(layer)
            ref.require(list(ref_keys.values()), f"reference layer {layer}")
            up = ref.info(ref_keys["up"]).shape
            if up[1] != facts.d_hid:
                raise CheckpointError(f"reference {ref_keys['up']} has shape {up}: shapes don't match")
            ref_d_mid = up[0]
        labels.append("F")
        note_shape_mismatch("F", ref_d_mid, "the dense reference F")
        neuron_dim = max(neuron_dim, ref_d_mid)
    else:
        absent["all"]["F"] = "no dense reference given (--reference)"
    if family.shared_key and facts.shared_d_mid:
        for layer in layers:
            ckpt.require(list(family.shared_expert_keys(layer).values()), f"layer {layer} shared expert")
        labels.append("SE")
        note_shape_mismatch("SE", facts.shared_d_mid, "the shared expert SE")
        neuron_dim = max(neuron_dim, facts.shared_d_mid)
    else:
        absent["all"]["SE"] = f"{facts.family} has no shared expert"
    absent["gate_embedding_similarity"] = {
        lab: "no router row: F is a dense FFN, SE is always active" for lab in ("F", "SE") if lab in labels}
    method = spec.static.neuron_pca_method
    if method == "auto":
        method = "covariance" if facts.d_hid <= COVARIANCE_MAX_D_HID else "randomized"
    first = ckpt.info(family.expert_keys(layers[0], 0)["up"])
    rows = [facts.d_mid] * facts.num_experts + ([ref_d_mid] if ref is not None else [])
    rows += [facts.shared_d_mid] if "SE" in labels else []
    stored_bytes = max(1, first.nbytes // (facts.d_mid * facts.d_hid))
    held_bytes = held_dtype(first.dtype).itemsize
    gpu_bytes = (spec.resources.gpu_memory_gb or DEFAULT_GPU_MEMORY_GB) * 2**30
    read_ahead = static_read_ahead(rows, facts.d_hid, stored_bytes, held_bytes, method == "covariance", gpu_bytes)
    return StaticPlan(ckpt.location, ref.location if ref else None, spec.store, family.name, facts,
                      tuple(layers), tuple(labels), neuron_dim, method, spec.static,
                      {k: v for k, v in absent.items() if v}, spec.allow_pickle,
                      stored_bytes=stored_bytes, held_bytes=held_bytes, label_rows=tuple(rows),
                      read_ahead=read_ahead)


def group_params(plan: StaticPlan) -> dict:
    """What the static group's results depend on (a rerun with other values is refused)."""
    return {"labels": list(plan.labels), "neuron_pca_method": plan.neuron_pca_method,
            "dbscan_eps": plan.options.dbscan_eps, "dbscan_min_samples": plan.options.dbscan_min_samples,
            "seed": plan.options.seed}


def prepare(store: ResultStore, plan: StaticPlan, overwrite: bool = False) -> list[int]:
    """Create the static group's coordinates and arrays; return the layers still to do."""
    group = store.group(GROUP, group_params(plan), overwrite=overwrite)
    store.set_attrs(group, absent_labels=plan.absent, neuron_pca_method=plan.neuron_pca_method)
    store.coord(group, "layer", np.array(plan.layers, dtype=np.int64))
    store.coord(group, "matrix", np.array(MATRICES))
    for dim in ("expert", "expert_i", "expert_j"):
        store.coord(group, dim, np.array(plan.labels))
    store.coord(group, "component", np.arange(N_COMPONENTS, dtype=np.int64))
    store.coord(group, "neuron", np.arange(plan.neuron_dim, dtype=np.int64))
    for name, quantity in STATIC_SCHEMA.items():
        if name == "matrix_pca_outlier" and plan.options.dbscan_eps is None:
            continue
        store.array(group, name, quantity, UNIT_DIMS)
    store.done_array(group, UNIT_DIMS)
    done = unit_done(group)
    return [layer for i, layer in enumerate(plan.layers) if not done[i]]


def plan_memory(plan: StaticPlan, device: str) -> tuple[int, int]:
    """(host, GPU) bytes of a unit of this plan on `device` (`units.sizing.static_unit_memory`)."""
    return static_unit_memory(plan.label_rows, plan.facts.d_hid, plan.stored_bytes, plan.held_bytes,
                              plan.neuron_pca_method == "covariance", device, plan.read_ahead)


# ---- the unit ----------------------------------------------------------------------------------

def _embed(values: torch.Tensor, positions: list[int], size: int) -> np.ndarray:
    """Place an [n, n] result for a subset of labels into an [L, L] NaN matrix."""
    out = np.full((size, size), np.nan, dtype=np.float32)
    idx = np.array(positions)
    out[np.ix_(idx, idx)] = values.cpu().numpy()
    return out


def run_layer(plan: StaticPlan, layer: int, request: DeviceRequest = DeviceRequest()) -> dict:
    """Compute and store every static analysis for one layer (runs inside a Ray task)."""
    started = time.monotonic()
    device, note = request.resolve()
    try:
        results, outliers, record = _analyse_layer(plan, layer, device)
    finally:
        release(device)
    store = ResultStore(plan.store)
    group = store.root[GROUP]
    li = plan.layers.index(layer)
    for name, values in results.items():
        group[name][li] = values
    if plan.options.dbscan_eps is not None:
        group["matrix_pca_outlier"][li] = outliers
    group[WEIGHTS][li] = record.json()
    group[DONE][li] = 1
    routed = list(range(plan.facts.num_experts))
    offdiag = results["matrix_similarity"][:, routed][:, :, routed]
    mean_sim = float(np.nanmean(offdiag[:, ~np.eye(len(routed), dtype=bool)])) if len(routed) > 1 else float("nan")
    r_gate = results["gate_weight_correlation"][MATRICES.index("gate")]
    seconds = time.monotonic() - started
    return {"layer": layer, "seconds": seconds, "device": device.type, "note": note,
            "log": f"mean expert similarity {mean_sim:+.3f}, R(X, Y_gate) {r_gate:+.3f}, {where(device)}, "
                   f"{seconds:.1f}s"}


def _read_kind(plan: StaticPlan, ckpt: Checkpoint, ref: Checkpoint | None, layer: int, matrix: str,
               device: torch.device) -> dict[str, torch.Tensor]:
    """One matrix kind of every label of a layer, on `device`, held as `held_dtype` says."""
    return {label: source.read(key, held_dtype(source.info(key).dtype), device=device)
            for label, source, key in plan.label_keys(ckpt, ref, layer, matrix)}


class _ReadAhead:
    """The layer's matrix kinds, read one kind ahead of the analysis when `enabled`: a thread reads
    kind k + 1 (on a GPU on a stream of its own, so the host-to-device copies run beside the analysis's
    kernels) while kind k is analysed, so the unit takes about max(read, compute), not their sum.
    It holds two kinds at once where it is enabled (a GPU's memory: `units.sizing`); without it,
    kinds are read when needed and the kernel's read-ahead (`Checkpoint.prefetch`) is the overlap."""

    def __init__(self, plan: StaticPlan, ckpt: Checkpoint, ref: Checkpoint | None, layer: int,
                 device: torch.device, enabled: bool):
        self.enabled = enabled
        self._read = lambda matrix: _read_kind(plan, ckpt, ref, layer, matrix, device)
        self._sources = [c for c in (ckpt, ref) if c is not None]
        self._device = device
        self._stream = torch.cuda.Stream(device) if enabled and device.type == "cuda" else None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="read-ahead") if enabled else None
        self._pending = self._pool.submit(self._fetch, 0) if enabled else None

    def _fetch(self, index: int) -> tuple[dict[str, torch.Tensor], object]:
        if self._stream is None:
            return self._read(MATRICES[index]), None
        if index:  # the kind being analysed is on the device: its memory maps can go
            for source in self._sources:
                source.close()
        with torch.cuda.device(self._device), torch.cuda.stream(self._stream):  # this thread's own device
            mats = self._read(MATRICES[index])
            return mats, self._stream.record_event()

    def take(self, index: int) -> dict[str, torch.Tensor]:
        """Kind `index`'s matrices, ready for the analysis's stream; starts reading the next."""
        if not self.enabled:
            return self._read(MATRICES[index])
        mats, ready = self._pending.result()
        if ready is not None:
            current = torch.cuda.current_stream(self._device)
            current.wait_event(ready)
            for tensor in mats.values():
                tensor.record_stream(current)  # freed only once the analysis's kernels are done
        self._pending = self._pool.submit(self._fetch, index + 1) if index + 1 < len(MATRICES) else None
        return mats

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            for source in self._sources:
                source.close()


def _analyse_layer(plan: StaticPlan, layer: int, device: torch.device, read_ahead: bool | None = None
                   ) -> tuple[dict[str, np.ndarray], np.ndarray, WeightsRecord]:
    """Every static quantity of one layer, computed on `device`, as host arrays, and the digests of
    the tensors it read. `read_ahead` (default: on a GPU) reads the next matrix kind while one is
    analysed (`_ReadAhead`)."""
    ckpt = open_checkpoint(plan.model, plan.allow_pickle)
    ref = open_checkpoint(plan.reference, plan.allow_pickle) if plan.reference else None
    n_labels = len(plan.labels)
    routed = list(range(plan.facts.num_experts))
    results = {name: np.full(_shape(plan, q.dims), np.nan, dtype=np.float32)
               for name, q in STATIC_SCHEMA.items() if q.dtype.startswith("float")}
    outliers = np.zeros((len(MATRICES), n_labels), dtype=np.uint8)
    averages: dict[str, torch.Tensor] = {}
    record = WeightsRecord()
    for matrix in MATRICES:  # the later kinds arrive from disk while the first is computed on
        for _, source, key in plan.label_keys(ckpt, ref, layer, matrix):
            source.prefetch([key])
    if read_ahead is None:
        read_ahead = device.type == "cuda" and plan.read_ahead
    ahead = _ReadAhead(plan, ckpt, ref, layer, device, read_ahead)
    for mi, matrix in enumerate(MATRICES):
        mats = ahead.take(mi)
        for label, source, key in plan.label_keys(ckpt, ref, layer, matrix):
            record.add("reference" if source is ref and label == "F" else "model", source, [key])
        comparable = [i for i, lab in enumerate(plan.labels)
                      if lab not in plan.absent.get("matrix_similarity", {})]
        comp_mats = [mats[plan.labels[i]] for i in comparable]
        gram, std_gram = S.flattened_grams(comp_mats)
        results["matrix_similarity"][mi] = _embed(S.cosine_from_gram(gram), comparable, n_labels)
        scores, ratio = (t.cpu() for t in S.pca_from_gram(std_gram, N_COMPONENTS))
        results["matrix_pca"][mi, comparable] = scores.numpy()
        results["matrix_pca_explained"][mi] = ratio.numpy()
        if plan.options.dbscan_eps is not None:
            mask = S.dbscan_outliers(scores[:, :2].numpy(), plan.options.dbscan_eps, plan.options.dbscan_min_samples)
            outliers[mi, comparable] = mask
        avg = torch.stack([S.neuron_average(mats[lab], matrix) for lab in plan.labels])
        averages[matrix] = avg
        results["neuron_avg_similarity"][mi] = S.cosine_matrix(avg).cpu().numpy()
        points = [S.neuron_vectors(mats[lab], matrix) for lab in plan.labels]
        neuron_scores, neuron_ratio = S.neuron_pca(points, N_COMPONENTS, plan.neuron_pca_method, plan.options.seed)
        for li, sc in enumerate(neuron_scores):
            results["neuron_pca"][mi, li, : sc.shape[0]] = sc.cpu().numpy()
        results["neuron_pca_explained"][mi] = neuron_ratio.cpu().numpy()
        del mats, comp_mats, points
        if not ahead.enabled:
            ckpt.close()
            if ref is not None:
                ref.close()
    ahead.shutdown()
    router_key = get_family(plan.family).router_weight_key(layer)
    router = ckpt.read(router_key, device=device)
    record.add("model", ckpt, [router_key])
    gate_sim = S.gate_embedding_similarity(router)
    results["gate_embedding_similarity"] = _embed(gate_sim, routed, n_labels)
    for mi, matrix in enumerate(MATRICES):
        y = S.cosine_matrix(averages[matrix][routed])
        results["gate_weight_correlation"][mi] = S.upper_triangle_pearson(gate_sim, y)
    return results, outliers, record


def _shape(plan: StaticPlan, dims: tuple[str, ...]) -> tuple[int, ...]:
    """Shape of one layer's slab of an array with `dims` (the leading `layer` dropped)."""
    sizes = {"matrix": len(MATRICES), "expert": len(plan.labels), "expert_i": len(plan.labels),
             "expert_j": len(plan.labels), "component": N_COMPONENTS, "neuron": plan.neuron_dim}
    return tuple(sizes[d] for d in dims if d != "layer")


def finish(store: ResultStore, plan: StaticPlan) -> dict:
    """Cross-layer summaries, once every layer is done: Tab 3's mean R² per matrix."""
    group = store.root[GROUP]
    r = np.asarray(group["gate_weight_correlation"][...], dtype=np.float64)
    with np.errstate(all="ignore"):
        r2_mean = np.nanmean(r ** 2, axis=0) if np.isfinite(r).any() else np.full(len(MATRICES), np.nan)
    arr = store.array(group, "gate_weight_r2_mean", STATIC_SUMMARY["gate_weight_r2_mean"], ())
    if not np.array_equal(arr[...], r2_mean.astype(np.float32), equal_nan=True):  # reruns write nothing
        arr[...] = r2_mean.astype(np.float32)
    summary = {m: float(v) for m, v in zip(MATRICES, r2_mean)}
    group.attrs["tab3_r2_mean"] = summary
    return summary


class StaticJob(TaskJob):
    """The static analyses of a run: one unit per selected MoE layer."""

    name = "static"

    def __init__(self, plan: StaticPlan, spec: Spec):
        super().__init__(spec)
        self.plan = plan

    def build_units(self, device: str) -> list[Unit]:
        request, resources = self.request(device, *plan_memory(self.plan, device))
        return [Unit(f"static layer {layer}", (self.plan, layer, request), **resources) for layer in self.plan.layers]

    def prepare(self, store: ResultStore, overwrite: bool) -> list[Unit]:
        pending = set(prepare(store, self.plan, overwrite))
        return [u for u in self.units() if u.args[1] in pending]

    def unit_function(self):
        return run_layer

    def finish(self, store: ResultStore) -> str:
        r2 = finish(store, self.plan)
        return "static: Tab 3 mean R² (X, Y_m): " + ", ".join(f"{m} {v:.3f}" for m, v in r2.items())


def plan_job(spec: Spec, ckpt: Checkpoint, ref: Checkpoint | None, layers: tuple[int, ...]) -> StaticJob:
    return StaticJob(plan_static(ckpt, ref, spec, layers), spec)
