"""Model family adapters and the detector that picks one from a checkpoint's config.json.

Adding a family: one new module defining a `Family` subclass, plus one line in `FAMILIES`.
"""
from __future__ import annotations

from collections.abc import Iterable

from ...errors import CheckpointError
from .base import MATRICES, Family, ModelFacts, TensorRef
from .deepseek_moe import DeepseekMoe
from .deepseek_v3 import DeepseekV2, DeepseekV3
from .dense import Dense
from .gpt_oss import GptOss
from .grok1 import Grok1
from .llama4 import Llama4, Llama4Text
from .mixtral import Mixtral
from .olmoe import Olmoe
from .qwen_moe import Qwen2Moe, Qwen3Moe

# Order matters only for key-based detection: MoE layouts before the dense one, DeepSeek-V3 (which
# has V2's MLA keys and v1's shared experts) before V2 before v1.
FAMILIES: dict[str, type[Family]] = {
    f.name: f for f in (Mixtral, Grok1, DeepseekV3, DeepseekV2, DeepseekMoe, GptOss, Llama4, Qwen2Moe,
                         Qwen3Moe, Olmoe, Llama4Text, Dense)
}


def get_family(name: str) -> type[Family]:
    try:
        return FAMILIES[name]
    except KeyError:
        raise CheckpointError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}") from None


def detect_family(config: dict, keys: Iterable[str] = ()) -> type[Family]:
    """The adapter for a checkpoint: by `architectures`, then `model_type`, then the keys present."""
    architectures = config.get("architectures") or []
    for arch in architectures:
        for family in FAMILIES.values():
            if arch in family.architectures:
                return family
    model_type = config.get("model_type")
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    keys = list(keys)
    for family in FAMILIES.values():
        if any(family.key_marker in k for k in keys):
            return family
    raise CheckpointError(
        f"unknown model layout: architectures={architectures or None}, model_type={model_type!r}; "
        f"moe-ray knows {', '.join(FAMILIES)}"
    )


__all__ = ["FAMILIES", "MATRICES", "Family", "ModelFacts", "TensorRef", "detect_family", "get_family"]
