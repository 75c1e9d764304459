"""Sizing a run before any weights exist: `moe-ray plan --model DIR_OR_CONFIG_OR_FLAVOR`.

Reads only a config.json (or a published flavor such as `mixtral:8x7B`) and the family adapter's
tensor layout (`Family.tensor_shapes`, `Family.stored_layout`), and reports what design §6 needs to
place the work: bytes on disk (as stored: FP8 with block scales, MXFP4, bf16) and dequantised to bf16,
bytes per decoder layer, the contiguous layer ranges ("shards") that fit one GPU each for the dynamic
pass (which holds bf16), GPUs and nodes, the store each analysis writes, the reorder analysis's
linear assignment problems (§4.1.2: one n x n float32 cost matrix per expert pair and matrix, n = d_mid),
and what every static and reorder task declares on a CPU and on a GPU (`units.sizing`: the same
formulas the jobs declare to Ray), with the reorder's pairs per task. Layers outside the main stack
(DeepSeek-V3's multi-token-prediction layer) are on disk but analysed only on request; they are
counted on disk and listed apart.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from . import estimate
from .analysis import reorder as R
from .checkpoint.config import model_facts, parse_config
from .checkpoint.families import FAMILIES, Family, ModelFacts, detect_family
from .checkpoint.quant import DTYPE_BYTES
from .distributed.placement import gpus_for
from .errors import SpecError
from .units.sizing import overlaps, reorder_unit_memory, static_read_ahead, static_unit_memory

BF16 = 2
FLOAT32 = 4
GIB = 2**30
GPU_HEADROOM = 0.85
"""Fraction of a GPU's memory a shard's weights may take (the rest: activations, captures, CUDA)."""


def load_config(model: str) -> tuple[type[Family], dict, str]:
    """(family, config, name) from a checkpoint directory, a config.json, or `family:flavor`."""
    path = Path(model).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        try:
            raw = json.loads(path.read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise SpecError(f"{path} is not valid JSON: {exc}") from None
        where = str(path.parent if path.name == "config.json" else path)
        config = parse_config(raw, where)
        return detect_family(config), config, where
    family, _, flavor = model.partition(":")
    if family in FAMILIES and flavor:
        flavors = FAMILIES[family].flavors
        if flavor not in flavors:
            raise SpecError(f"unknown {family} flavor {flavor!r}; known: {', '.join(flavors) or 'none'}")
        return FAMILIES[family], dict(flavors[flavor]), model
    known = ", ".join(f"{f}:{v}" for f, fam in FAMILIES.items() for v in fam.flavors)
    raise SpecError(f"{model} is neither a checkpoint directory, a config.json, nor a flavor ({known})")


@dataclass(frozen=True)
class Shard:
    """A contiguous range of decoder layers held by one GPU in the dynamic pass."""

    first: int
    last: int
    nbytes: int


@dataclass(frozen=True)
class TaskSizing:
    """What the tasks of one analysis take on one device (design §6: every unit declares it)."""

    analysis: str
    device: str
    tasks: int
    per_task: int
    """MoE layers (static) or expert pairs (reorder) per task."""
    memory: int
    gpus: float = 0
    gpu_memory: int = 0

    def line(self, gpu_mem_gib: float) -> str:
        what = "layer" if self.analysis == "static" else "pair"
        head = (f"    {self.analysis} on {self.device}: {self.tasks:,} tasks of {self.per_task:,} "
                f"{what}{'s' if self.per_task != 1 else ''}, each 1 CPU, {_size(self.memory)}")
        if self.device != "cuda":
            return head
        return head + (f" + {_size(self.gpu_memory)} of GPU memory ({self.gpus:g} of one {gpu_mem_gib:g} GiB GPU)")


@dataclass(frozen=True)
class ModelPlan:
    name: str
    facts: ModelFacts
    params: int
    layer_bytes: tuple[int, ...]
    other_bytes: int
    shards: tuple[Shard, ...]
    gpus_per_node: int
    gpu_mem_gib: float
    nodes: int
    store_bytes: dict[str, int]
    lap_bytes: int
    n_laps: int
    disk_bytes: int = 0
    mtp_params: int = 0
    other_model_params: int = 0
    """Parameters beside the language model (Llama 4's vision tower): on disk, never analysed."""
    layer_disk_bytes: int = 0
    """The largest decoder layer's bytes as stored (what a static unit reads)."""
    tasks: tuple[TaskSizing, ...] = ()
    cores_per_node: int = 64
    nodes_given: int | None = None
    """The nodes the user has (`plan --nodes`), checked per analysis in `fits`."""

    @property
    def nbytes(self) -> int:
        """The language model's weights dequantised to bf16 (what the dynamic pass's GPUs hold)."""
        return self.params * BF16

    @property
    def pairs(self) -> int:
        e = self.facts.num_experts
        return e * (e - 1) // 2

    @property
    def gpus(self) -> int:
        return len(self.shards)

    def report(self) -> str:
        """The plan as text: its sections one after another (`sections`)."""
        return "\n".join(line for section in self.sections() for line in section)

    def sections(self) -> list[list[str]]:
        """The report's sections, each a list of lines: the model, its shards and GPUs, the store, the
        reorder's LAPs, the tasks, and what fits where. Other estimates (time) add sections of their own."""
        return [self._model_lines(), self._shard_lines(), self._work_lines(), self.fit_lines(),
                estimate.report_lines(self)]

    def _model_lines(self) -> list[str]:
        f = self.facts
        layer = max(self.layer_bytes)
        mtp = (f" + {len(f.mtp_layers)} multi-token-prediction layer(s) {list(f.mtp_layers)} "
               f"({self.mtp_params / 1e9:.1f}B parameters, analysed only on request: --mtp)") if f.mtp_layers else ""
        beside = (f"; beside it {self.other_model_params / 1e9:.2f}B parameters not analysed (vision tower, "
                  "projector)") if self.other_model_params else ""
        return [
            f"{self.name}: {f.family}, {self.params / 1e9:.1f}B parameters, {_size(self.nbytes)} in bf16{beside}",
            f"  on disk: {_size(self.disk_bytes)} ({f.stored_format}); dequantised to bf16: "
            f"{_size(self.nbytes + (self.mtp_params + self.other_model_params) * BF16)}",
            f"  layers: {f.num_layers} ({len(f.moe_layers)} MoE){mtp}, {f.num_experts} experts of d_mid "
            f"{f.d_mid}, d_hid {f.d_hid}, top-{f.top_k}",
            f"  bytes per layer: {_size(layer)} (largest); embeddings, norm and head {_size(self.other_bytes)}",
        ]

    def _shard_lines(self) -> list[str]:
        lines = [f"  shards: {self.gpus} on {self.gpu_mem_gib:g} GiB GPUs (weights up to {GPU_HEADROOM:.0%} of "
                 f"each), {_size(max(s.nbytes for s in self.shards))} per shard at most:"]
        lines += [f"    shard {i}: layers {s.first}-{s.last}, {_size(s.nbytes)}" for i, s in enumerate(self.shards)]
        lines.append(f"  GPUs: {self.gpus}; nodes: {self.nodes} with {self.gpus_per_node} GPUs each")
        return lines

    def _work_lines(self) -> list[str]:
        f = self.facts
        layer = max(self.layer_bytes)
        lines = ["  store: " + ", ".join(f"{k} {_size(v)}" for k, v in self.store_bytes.items())]
        lines.append(f"  reorder: {len(f.moe_layers)} MoE layers x {self.pairs:,} expert pairs = {self.n_laps:,} "
                     f"LAPs per matrix (joint mode: one per pair; separate: three), n = {f.d_mid}, "
                     f"{_size(self.lap_bytes)} cost matrix each (d_mid² x 4 bytes)")
        stored = f" ({_size(self.layer_disk_bytes)} as stored)" if self.layer_disk_bytes != layer else ""
        lines.append(f"  static: one task per MoE layer, {_size(layer)} of weights read each{stored}")
        if self.tasks:
            lines.append("  tasks (what each asks of Ray; a GPU task's share of a GPU from its GPU memory):")
            lines += [t.line(self.gpu_mem_gib) for t in self.tasks]
        return lines

    def fits(self) -> dict[str, tuple[bool, str]]:
        """Per analysis, whether it fits the nodes given (`nodes_given`; else one node of
        `gpus_per_node` GPUs for static and reorder, the nodes it needs for dynamic and causal) and why:
        static and reorder run task by task, so one node with one GPU (or none: on its CPUs) runs them
        all; dynamic and causal hold every layer at once, on `gpus` GPUs."""
        have = self.nodes_given
        out: dict[str, tuple[bool, str]] = {}
        for analysis in ("static", "reorder"):
            gpu = [t for t in self.tasks if t.analysis.startswith(analysis) and t.device == "cuda"]
            cpu = [t for t in self.tasks if t.analysis.startswith(analysis) and t.device == "cpu"]
            if not gpu:
                out[analysis] = (True, "fits one node (nothing to compare)")
                continue
            on_gpu = max(t.gpu_memory for t in gpu) <= self.gpu_mem_gib * GIB
            where = (f"on one {self.gpu_mem_gib:g} GiB GPU ({max(t.gpus for t in gpu):g} GPU per task)" if on_gpu
                     else f"on CPUs only (a task's {_size(max(t.gpu_memory for t in gpu))} exceed one GPU)")
            host = _size(max(t.memory for t in cpu + gpu))
            out[analysis] = (True, f"fits one node: task by task {where}, up to {host} of host memory per task")
        need = self.nodes
        gpus = f"{self.gpus} GPU(s) of {self.gpu_mem_gib:g} GiB at once: {need} node(s) of {self.gpus_per_node}"
        for analysis in ("dynamic", "causal"):
            if have is None:
                out[analysis] = (True, f"needs {gpus}")
            elif have >= need:
                out[analysis] = (True, f"fits {have} node(s): needs {gpus}")
            else:
                out[analysis] = (False, f"does not fit {have} node(s): needs {gpus}")
        return out

    def fit_lines(self) -> list[str]:
        given = (f"{self.nodes_given} node(s) with {self.gpus_per_node} GPUs of {self.gpu_mem_gib:g} GiB"
                 if self.nodes_given is not None else "per analysis")
        return [f"  what fits where ({given}):"] + [f"    {a}: {why}" for a, (_, why) in self.fits().items()]


def _size(n: float) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def plan_model(model: str, gpus_per_node: int = 8, gpu_mem_gib: float = 80.0,
               nodes: int | None = None, cores_per_node: int = 64) -> ModelPlan:
    """Size a model from its config alone (no weights read); with `nodes`, say per analysis whether
    it fits them (`ModelPlan.fits`: static and reorder fit one node even where dynamic needs several)."""
    if gpus_per_node < 1 or not 0 < gpu_mem_gib < float("inf"):
        raise SpecError("--gpus-per-node must be at least 1 and --gpu-mem positive")
    if nodes is not None and nodes < 1:
        raise SpecError(f"--nodes must be at least 1, not {nodes}")
    family, config, name = load_config(model)
    facts = model_facts(family, config, name)
    try:
        shapes = family.tensor_shapes(config)
    except KeyError as exc:
        raise SpecError(f"config.json in {name} lacks {exc.args[0]!r}, which sizing a {family.name} model "
                        "needs") from None
    layer_params = [0] * facts.num_layers
    other = mtp = beside = 0
    layer_key = re.compile(re.escape(family.key_prefix) + r"layers\.(\d+)\.")
    for key, shape in shapes.items():
        n = math.prod(shape)
        m = layer_key.match(key)
        if not family.is_language_model_key(key):
            beside += n
        elif m and int(m.group(1)) >= facts.num_layers:
            mtp += n
        elif m:
            layer_params[int(m.group(1))] += n
        else:
            other += n
    disk = layer_disk = 0
    largest = max(range(facts.num_layers), key=lambda l: layer_params[l])
    for key, (shape, dtype) in family.stored_layout(config).items():
        nbytes = math.prod(shape) * DTYPE_BYTES[dtype]
        disk += nbytes
        m = layer_key.match(key)
        layer_disk += nbytes if m and int(m.group(1)) == largest else 0
    layer_bytes = tuple(p * BF16 for p in layer_params)
    shards = _shards(layer_bytes, other * BF16, gpu_mem_gib * GIB * GPU_HEADROOM, model)
    need_nodes = math.ceil(len(shards) / gpus_per_node)
    n_moe = len(facts.moe_layers)
    pairs = facts.num_experts * (facts.num_experts - 1) // 2
    return ModelPlan(name, facts, sum(layer_params) + other, layer_bytes, other * BF16, tuple(shards),
                     gpus_per_node, gpu_mem_gib, need_nodes, _store_bytes(facts, pairs),
                     facts.d_mid ** 2 * FLOAT32, n_moe * pairs, disk, mtp, beside, layer_disk,
                     task_sizing(facts, gpu_mem_gib, stored_bytes=layer_disk / max(1, layer_params[largest])),
                     max(1, cores_per_node), nodes)


def task_sizing(facts: ModelFacts, gpu_mem_gib: float = 80.0, cpus: int = 1,
                stored_bytes: float = BF16) -> tuple[TaskSizing, ...]:
    """Static and joint-reorder tasks of a whole run on a CPU and on a GPU of `gpu_mem_gib`, with no
    dense reference: counts, layers or pairs per task, host and GPU memory. `stored_bytes` is what an
    expert weight takes on disk (2 for bf16; about 1 for FP8 with its block scales, 0.53 for MXFP4):
    quantised weights are held dequantised in float32 (`units.job.held_dtype`)."""
    n_moe = len(facts.moe_layers)
    if not n_moe or facts.num_experts < 2:
        return ()
    per_gpu = gpu_mem_gib * GIB
    rows = [facts.d_mid] * facts.num_experts + ([facts.shared_d_mid] if facts.shared_d_mid else [])
    pairs = [(i, j) for i in range(facts.num_experts) for j in range(i + 1, facts.num_experts)]
    out = []
    for device in ("cpu", "cuda"):
        held = BF16 if stored_bytes >= BF16 else FLOAT32
        ahead = device == "cuda" and static_read_ahead(rows, facts.d_hid, stored_bytes, held, False, per_gpu)
        host, gpu = static_unit_memory(rows, facts.d_hid, stored_bytes, held, False, device, ahead)
        gpus = gpus_for(gpu, None, per_gpu) if device == "cuda" else 0
        out.append(TaskSizing("static", device, n_moe, 1, host, gpus, gpu))
        per_task = R.pairs_per_task(facts.d_mid, facts.d_hid, "joint", device, cpus)
        batches = R.tile_batches(pairs, R.tile_side(per_task))
        experts = max(len({e for pair in batch for e in pair}) for batch in batches)
        host, gpu = reorder_unit_memory(facts.d_mid, facts.d_hid, BF16, experts, device, overlaps(device, cpus),
                                        max(map(len, batches)), cpus)
        gpus = gpus_for(gpu, None, per_gpu) if device == "cuda" else 0
        out.append(TaskSizing("reorder joint", device, n_moe * len(batches), max(map(len, batches)), host, gpus, gpu))
    return tuple(out)


def _greedy(layer_bytes: tuple[int, ...], other: int, capacity: float) -> list[Shard]:
    """Contiguous packing of layers onto GPUs (embeddings with the first, head with the last)."""
    shards: list[Shard] = []
    first, held = 0, other / 2
    for i, b in enumerate(layer_bytes):
        extra = other / 2 if i == len(layer_bytes) - 1 else 0
        if held + b + extra > capacity and i > first:
            shards.append(Shard(first, i - 1, int(held)))
            first, held = i, 0
        held += b + extra
    shards.append(Shard(first, len(layer_bytes) - 1, int(held)))
    return shards


def _shards(layer_bytes: tuple[int, ...], other: int, capacity: float, model: str) -> list[Shard]:
    """The fewest GPUs that hold the layers, balanced by bytes (design §6: contiguous ranges)."""
    biggest = max(b + other / 2 for b in layer_bytes)
    if biggest > capacity:
        raise SpecError(f"a layer of {model} ({_size(biggest)}) does not fit one GPU; give a larger --gpu-mem")
    k = len(_greedy(layer_bytes, other, capacity))
    lo, hi = biggest, capacity
    for _ in range(40):  # the smallest per-GPU budget that still needs only k GPUs
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if len(_greedy(layer_bytes, other, mid)) <= k else (mid, hi)
    return _greedy(layer_bytes, other, hi)


def _store_bytes(facts: ModelFacts, pairs: int) -> dict[str, int]:
    """float32 bytes each analysis writes (labels: E experts, F and SE where present)."""
    n_moe, e = len(facts.moe_layers), facts.num_experts
    labels = e + 1 + (1 if facts.shared_d_mid else 0)
    d_mid = max(facts.d_mid, facts.shared_d_mid or 0)
    static = n_moe * 3 * (2 * labels**2 + labels * 3 + labels * d_mid * 3) * FLOAT32
    reorder = n_moe * pairs * 3 * (facts.d_mid + 4) * FLOAT32
    per_token = n_moe * (labels**2 + 3 * e + 2 * facts.top_k) * FLOAT32
    return {"static": static, "reorder (per mode)": reorder, "dynamic (per 1,000 tokens)": 1000 * per_token}


__all__ = ["ModelPlan", "Shard", "TaskSizing", "load_config", "plan_model", "task_sizing"]
