"""Sizing a run before any weights exist: `moe-ray plan --model DIR_OR_CONFIG_OR_FLAVOR`.

Reads only a config.json (or a published flavor such as `mixtral:8x7B`) and the family adapter's
tensor layout (`Family.tensor_shapes`), and reports what design §6 needs to place the work: bytes
per decoder layer in bf16, the contiguous layer ranges ("shards") that fit one GPU each for the
dynamic pass, GPUs and nodes, the store each analysis writes, and the reorder analysis's linear
assignment problems (§4.1.2: one n x n float32 cost matrix per expert pair and matrix, n = d_mid).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from .checkpoint.config import model_facts, parse_config
from .checkpoint.families import FAMILIES, Family, ModelFacts, detect_family
from .errors import SpecError

BF16 = 2
FLOAT32 = 4
GIB = 2**30
GPU_HEADROOM = 0.85
"""Fraction of a GPU's memory a shard's weights may take (the rest: activations, captures, CUDA)."""
_LAYER = re.compile(r"\blayers\.(\d+)\.")


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

    @property
    def nbytes(self) -> int:
        return self.params * BF16

    @property
    def gpus(self) -> int:
        return len(self.shards)

    def report(self) -> str:
        f = self.facts
        layer = max(self.layer_bytes)
        lines = [
            f"{self.name}: {f.family}, {self.params / 1e9:.1f}B parameters, {_size(self.nbytes)} in bf16",
            f"  layers: {f.num_layers} ({len(f.moe_layers)} MoE), {f.num_experts} experts of d_mid {f.d_mid}, "
            f"d_hid {f.d_hid}, top-{f.top_k}",
            f"  bytes per layer: {_size(layer)} (largest); embeddings, norm and head {_size(self.other_bytes)}",
            f"  shards: {self.gpus} on {self.gpu_mem_gib:g} GiB GPUs (weights up to {GPU_HEADROOM:.0%} of each), "
            f"{_size(max(s.nbytes for s in self.shards))} per shard at most:",
        ]
        lines += [f"    shard {i}: layers {s.first}-{s.last}, {_size(s.nbytes)}" for i, s in enumerate(self.shards)]
        lines.append(f"  GPUs: {self.gpus}; nodes: {self.nodes} with {self.gpus_per_node} GPUs each")
        lines.append("  store: " + ", ".join(f"{k} {_size(v)}" for k, v in self.store_bytes.items()))
        lines.append(f"  reorder: {self.n_laps:,} LAPs per matrix (MoE layers x E(E-1)/2), "
                     f"{_size(self.lap_bytes)} cost matrix each (d_mid² x 4 bytes)")
        lines.append(f"  static: one task per MoE layer, {_size(layer)} of weights read each")
        return "\n".join(lines)


def _size(n: float) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def plan_model(model: str, gpus_per_node: int = 8, gpu_mem_gib: float = 80.0,
               nodes: int | None = None) -> ModelPlan:
    """Size a model from its config alone (no weights read)."""
    if gpus_per_node < 1 or gpu_mem_gib <= 0:
        raise SpecError("--gpus-per-node must be at least 1 and --gpu-mem positive")
    family, config, name = load_config(model)
    facts = model_facts(family, config, name)
    try:
        shapes = family.tensor_shapes(config)
    except KeyError as exc:
        raise SpecError(f"config.json in {name} lacks {exc.args[0]!r}, which sizing a {family.name} model "
                        "needs") from None
    layer_params = [0] * facts.num_layers
    other = 0
    for key, shape in shapes.items():
        n = math.prod(shape)
        m = _LAYER.search(key)
        if m:
            layer_params[int(m.group(1))] += n
        else:
            other += n
    layer_bytes = tuple(p * BF16 for p in layer_params)
    shards = _shards(layer_bytes, other * BF16, gpu_mem_gib * GIB * GPU_HEADROOM, model)
    need_nodes = math.ceil(len(shards) / gpus_per_node)
    if nodes is not None and nodes < need_nodes:
        raise SpecError(f"{name} needs {len(shards)} GPUs of {gpu_mem_gib:g} GiB: {need_nodes} nodes of "
                        f"{gpus_per_node}, not {nodes}")
    n_moe = len(facts.moe_layers)
    pairs = facts.num_experts * (facts.num_experts - 1) // 2
    return ModelPlan(name, facts, sum(layer_params) + other, layer_bytes, other * BF16, tuple(shards),
                     gpus_per_node, gpu_mem_gib, nodes or need_nodes, _store_bytes(facts, pairs),
                     facts.d_mid ** 2 * FLOAT32, n_moe * pairs)


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


__all__ = ["ModelPlan", "Shard", "load_config", "plan_model"]
