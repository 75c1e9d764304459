"""config.json through one typed schema: every field moe-ray reads, its type and its range.

Real configs spell facts several ways and carry many fields moe-ray never reads; those pass
untouched. A field moe-ray reads that has the wrong type (`"num_hidden_layers": "four"`), a value
out of range, or a config that is not a JSON object is refused with one line naming the field, before
any family code sees the config. What each family needs beyond the common fields (an expert count,
`moe_intermediate_size`, ...) is checked when its facts are read (`model_facts`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..errors import CheckpointError
from .families import Family, ModelFacts
from .families.base import EXPERT_COUNT_KEYS


@dataclass(frozen=True)
class ConfigField:
    """One config.json field: its type (int, float, bool, str or list) and, for numbers, its minimum;
    for lists, the type of the items."""

    kind: type
    minimum: float | None = None
    item: type | None = None


CONFIG_SCHEMA: dict[str, ConfigField] = {
    "architectures": ConfigField(list, item=str),
    "model_type": ConfigField(str),
    "num_hidden_layers": ConfigField(int, 1),
    "hidden_size": ConfigField(int, 1),
    "intermediate_size": ConfigField(int, 1),
    "moe_intermediate_size": ConfigField(int, 1),
    "shared_expert_intermediate_size": ConfigField(int, 0),
    "num_attention_heads": ConfigField(int, 1),
    "num_key_value_heads": ConfigField(int, 1),
    "head_dim": ConfigField(int, 1),
    "vocab_size": ConfigField(int, 1),
    "max_position_embeddings": ConfigField(int, 1),
    **{key: ConfigField(int, 0) for key in EXPERT_COUNT_KEYS},
    "num_experts_per_tok": ConfigField(int, 1),
    "moe_topk": ConfigField(int, 1),
    "n_shared_experts": ConfigField(int, 0),
    "first_k_dense_replace": ConfigField(int, 0),
    "moe_layer_freq": ConfigField(int, 1),
    "decoder_sparse_step": ConfigField(int, 1),
    "mlp_only_layers": ConfigField(list, item=int),
    "norm_topk_prob": ConfigField(bool),
    "tie_word_embeddings": ConfigField(bool),
    "rms_norm_eps": ConfigField(float, 0),
    "rope_theta": ConfigField(float, 0),
    # DeepSeek-V2/V3, gpt-oss, Llama 4
    "num_nextn_predict_layers": ConfigField(int, 0),
    "n_group": ConfigField(int, 1),
    "topk_group": ConfigField(int, 1),
    "routed_scaling_factor": ConfigField(float, 0),
    "kv_lora_rank": ConfigField(int, 1),
    "q_lora_rank": ConfigField(int, 1),
    "qk_nope_head_dim": ConfigField(int, 0),
    "qk_rope_head_dim": ConfigField(int, 0),
    "v_head_dim": ConfigField(int, 1),
    "swiglu_limit": ConfigField(float, 0),
    "swiglu_alpha": ConfigField(float, 0),
    "intermediate_size_mlp": ConfigField(int, 1),
    "interleave_moe_layer_step": ConfigField(int, 0),
    "moe_layers": ConfigField(list, item=int),
}
"""Every config.json field moe-ray reads (null counts as absent, as in transformers)."""

REQUIRED = ("num_hidden_layers", "hidden_size")
"""Fields every family needs; the rest are family-specific (see `model_facts`)."""

_KIND_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list"}
_PLURAL = {int: "integers", str: "strings"}


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _check_value(value: Any, kind: type, minimum: float | None) -> Any:
    """`value` as `kind`, or ValueError (integral floats count as integers: 32.0 is 32)."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ValueError
    if kind is str:
        if isinstance(value, str):
            return value
        raise ValueError
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError
    if kind is int:
        if isinstance(value, float):
            if not value.is_integer():
                raise ValueError
            value = int(value)
    else:
        value = float(value)
        if not math.isfinite(value):
            raise ValueError
    if minimum is not None and value < minimum:
        raise ValueError
    return value


def parse_config(raw: Any, where: str) -> dict:
    """config.json's content checked against `CONFIG_SCHEMA`: a copy with integral numbers as ints,
    or a one-line `CheckpointError` naming the first field that is wrong."""
    if not isinstance(raw, dict):
        raise CheckpointError(f"config.json in {where} is {_json_type(raw)}, not a JSON object of model fields")
    config = dict(raw)
    if isinstance(config.get("text_config"), dict):  # a multimodal model's language model (Llama 4)
        config["text_config"] = parse_config(config["text_config"], f"{where} (text_config)")
    for name, rule in CONFIG_SCHEMA.items():
        value = config.get(name)
        if value is None:
            continue
        at_least = "" if rule.minimum is None else f" of at least {rule.minimum:g}"
        try:
            if rule.kind is list:
                if not isinstance(value, list):
                    raise ValueError
                config[name] = [_check_value(v, rule.item, None) for v in value]
            else:
                config[name] = _check_value(value, rule.kind, rule.minimum)
        except ValueError:
            what = f"a list of {_PLURAL[rule.item]}" if rule.kind is list else _KIND_NAMES[rule.kind] + at_least
            raise CheckpointError(f"config.json in {where}: {name} must be {what}, not {value!r}") from None
    return config


def model_facts(family: type[Family], config: dict, where: str) -> ModelFacts:
    """`family.facts(config)` with what the family needs checked: a field it lacks, an MoE family
    without an expert count or top-k, a top-k larger than the experts, all as one line."""
    for name in REQUIRED:
        if family.text_config(config).get(name) is None:
            raise CheckpointError(f"config.json in {where} lacks {name!r}, which every model has")
    try:
        facts = family.facts(config)
    except KeyError as exc:
        raise CheckpointError(f"config.json in {where} lacks {exc.args[0]!r}, which {family.name} models "
                              "need") from None
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"config.json in {where} lacks a field {family.name} models need "
                              f"({type(exc).__name__}: {exc})") from None
    if family.router_key is not None:  # an MoE family
        if facts.num_experts < 1:
            raise CheckpointError(
                f"config.json in {where} gives no expert count ({', '.join(EXPERT_COUNT_KEYS)}), which "
                f"{family.name} models need")
        if facts.top_k < 1:
            raise CheckpointError(f"config.json in {where} lacks 'num_experts_per_tok' (experts per token), "
                                  f"which {family.name} models need")
        if facts.top_k > facts.num_experts:
            raise CheckpointError(f"config.json in {where} routes each token to {facts.top_k} experts "
                                  f"(num_experts_per_tok) but has only {facts.num_experts}")
    return facts


__all__ = ["CONFIG_SCHEMA", "ConfigField", "model_facts", "parse_config"]
