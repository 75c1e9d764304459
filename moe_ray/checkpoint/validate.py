"""Every tensor a job will read, checked from the headers alone before anything is created.

`job_tensors` lists what the analyses read (the experts, routers, shared experts and reference FFNs
of the selected layers; for dynamic passes every tensor of every decoder layer and the embeddings),
each with the shape config.json implies; `validate_job_tensors` checks them all against the
checkpoints (present, a dtype moe-ray can analyse, that shape) and the reference against the model,
and refuses with one line naming the first problem. Whether weights hold NaN/Inf needs their data,
so it is checked when a unit reads them (`Checkpoint.read`).
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from ..errors import CheckpointError
from .families.base import EXPERT_COUNT_KEYS, Key, ref_name
from .reader import Checkpoint

_LAYER = re.compile(r"\blayers\.(\d+)\.")


@dataclass(frozen=True)
class Needed:
    """One tensor a job reads: from which checkpoint, its key, the shape config.json implies, and
    what it is (for messages)."""

    source: Checkpoint
    key: Key
    shape: tuple[int, ...]
    what: str


def _mlp(source: Checkpoint, keys: dict[str, Key], d_mid: int, d_hid: int, what: str) -> list[Needed]:
    shapes = {"up": (d_mid, d_hid), "gate": (d_mid, d_hid), "down": (d_hid, d_mid)}
    return [Needed(source, keys[m], shapes[m], f"{what} {m}") for m in ("up", "gate", "down")]


def check_reference(ckpt: Checkpoint, ref: Checkpoint, layers: Iterable[int]) -> None:
    """The reference must be a dense model with the model's hidden size and the selected layers."""
    rf, facts = ref.facts, ckpt.facts
    if rf.moe_layers or ref.family.dense_key is None:
        raise CheckpointError(f"reference {ref.location} is a {rf.family} MoE model; --reference takes "
                              "a dense model (mistral/llama)")
    if rf.d_hid != facts.d_hid:
        raise CheckpointError(f"reference {ref.location} has hidden size {rf.d_hid}, the model has "
                              f"{facts.d_hid}: shapes don't match")
    beyond = [layer for layer in layers if layer >= rf.num_layers]
    if beyond:
        raise CheckpointError(f"reference {ref.location} has {rf.num_layers} layers, the model's layer "
                              f"{beyond[0]} has no counterpart: shapes don't match")


def job_tensors(ckpt: Checkpoint, ref: Checkpoint | None, layers: tuple[int, ...], analyses: Iterable[str],
                pairs: Iterable[tuple[int, int]] = ()) -> list[Needed]:
    """Every tensor the `analyses` read, with the shape config.json implies. `pairs` are the expert
    pairs a reorder reads (only those experts, when no other analysis reads them all)."""
    analyses = set(analyses)
    facts, family = ckpt.facts, ckpt.family
    h = facts.d_hid
    reads_layers = bool(analyses & {"static", "dynamic", "causal"})
    if reads_layers:
        experts = list(range(facts.num_experts))
    else:
        experts = sorted({e for pair in pairs for e in pair if e < facts.num_experts})
    needed: list[Needed] = []
    for layer in layers:
        if reads_layers:
            needed.append(Needed(ckpt, family.router_weight_key(layer), (facts.num_experts, h),
                                 f"layer {layer} router"))
        for e in experts:
            needed += _mlp(ckpt, family.expert_keys(layer, e), facts.d_mid, h, f"layer {layer} expert {e}")
        if not reads_layers:
            continue
        shared = family.shared_expert_keys(layer) if facts.shared_d_mid else None
        if shared:
            needed += _mlp(ckpt, shared, facts.shared_d_mid, h, f"layer {layer} shared expert")
        if ref is not None:
            needed += _mlp(ref, ref.family.dense_ffn_keys(layer), ref.facts.dense_d_mid or ref.facts.d_mid, h,
                           f"reference layer {layer} FFN")
    if analyses & {"dynamic", "causal"}:
        seen = {n.key for n in needed if n.source is ckpt}
        try:
            layout = family.tensor_shapes(ckpt.config)
        except KeyError as exc:
            raise CheckpointError(f"config.json in {ckpt.location} lacks {exc.args[0]!r}, which dynamic "
                                  f"passes of {family.name} models need") from None
        layer_key = re.compile(re.escape(family.key_prefix) + r"layers\.(\d+)\.")
        for key, shape in layout.items():
            m = layer_key.match(key)
            if m and int(m.group(1)) >= facts.num_layers:
                continue  # outside the main stack (an MTP layer): a forward pass does not run it
            if key not in seen and (m or key == family.embed_key()):
                what = f"layer {m.group(1)} of the decoder" if m else "the embeddings"
                needed.append(Needed(ckpt, key, tuple(shape), what))
        if "causal" in analyses:  # the next-token loss: the final norm and the output head
            head = {family.final_norm_key(): "the final norm", family.output_head_key(ckpt.config): "the output head"}
            needed += [Needed(ckpt, key, tuple(layout[key]), what) for key, what in head.items()
                       if key in layout and key not in seen]
    return needed


def _explain_missing(ckpt: Checkpoint, key: Key) -> str | None:
    """A clearer reason when a missing tensor means config.json promises more than the checkpoint
    holds: more layers than it has, or more experts."""
    m = _LAYER.search(ref_name(key))
    if m is None:
        return None
    layer, facts, family = int(m.group(1)), ckpt.facts, ckpt.family
    if not any(k.startswith(family.layer_prefix(layer)) for k in ckpt.tensors):
        held = sorted({int(x.group(1)) for k in ckpt.tensors if (x := _LAYER.search(k))})
        span = f"layers {held[0]}-{held[-1]}" if held else "no decoder layers"
        return (f"config.json in {ckpt.location} says {facts.num_layers} layers (num_hidden_layers), "
                f"but the checkpoint holds {span}: layer {layer} has no tensors")
    if family.expert_key is None or facts.num_experts < 2:
        return None
    present = [e for e in range(facts.num_experts)
               if all(k in ckpt.tensors for k in family.expert_keys(layer, e).values())]
    if present and len(present) < facts.num_experts and key in family.expert_keys(layer, present[-1] + 1).values():
        counted = next((k for k in EXPERT_COUNT_KEYS if ckpt.config.get(k) is not None), "expert count")
        return (f"config.json in {ckpt.location} says {facts.num_experts} experts ({counted}), but layer "
                f"{layer} of the checkpoint holds {len(present)}: tensor {key} is missing")
    return None


def validate_job_tensors(ckpt: Checkpoint, ref: Checkpoint | None, layers: tuple[int, ...],
                         analyses: Iterable[str], pairs: Iterable[tuple[int, int]] = ()) -> int:
    """Check every tensor the job reads (present, analysable dtype, shape); refuse with the first
    problem in one line (and how many more there are). Returns how many tensors were checked."""
    analyses = list(analyses)
    if ref is not None and {"static", "dynamic"} & set(analyses):
        check_reference(ckpt, ref, layers)
    needed = job_tensors(ckpt, ref, layers, analyses, pairs)
    problems = []  # (missing first: a count config.json gets wrong explains the shapes that follow)
    for item in needed:
        why = item.source.check_tensor(item.key, item.shape, item.what)
        if why:
            missing = item.key not in item.source
            if missing:
                why = _explain_missing(item.source, item.key) or why
            problems.append((not missing, why))
    problems = [why for _, why in sorted(problems, key=lambda p: p[0])]
    if problems:
        more = f" (and {len(problems) - 1} more problem{'s' if len(problems) > 2 else ''})" if len(problems) > 1 else ""
        raise CheckpointError(problems[0] + more)
    return len(needed)


__all__ = ["Needed", "check_reference", "job_tensors", "validate_job_tensors"]
