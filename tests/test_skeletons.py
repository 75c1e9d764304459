"""Full-size configs (published numbers) build their decoder layers on the meta device with the
right shapes and byte counts, without allocating memory (issue 4)."""
from __future__ import annotations

import psutil
import pytest
import torch

from moe_ray.checkpoint import get_family

# family, flavor, parameters of one MoE decoder layer (published architecture arithmetic: attention
# q/k/v/o, norms, router, experts, shared experts), expert parameters, whole-model parameters
CASES = [
    ("mixtral", "8x7B", 4096 * (4096 + 1024 + 1024 + 4096) + 2 * 4096 + 8 * 4096 + 8 * 3 * 14336 * 4096,
     8 * 3 * 14336 * 4096, 46.7e9),
    ("deepseek_moe", "16B", 4 * 2048 * 2048 + 2 * 2048 + 64 * 2048 + 64 * 3 * 1408 * 2048 + 3 * 2816 * 2048,
     64 * 3 * 1408 * 2048 + 3 * 2816 * 2048, 16.4e9),
    ("grok1", "314B", 6144 * (6144 + 1024 + 1024 + 6144) + 4 * 6144 + 8 * 6144 + 8 * 3 * 32768 * 6144,
     8 * 3 * 32768 * 6144, 314e9),
]


def _layer_params_from_adapter(family, config, layer: int) -> int:
    prefix = f"model.layers.{layer}."
    return sum(int(torch.Size(s).numel()) for k, s in family.tensor_shapes(config).items() if k.startswith(prefix))


@pytest.mark.parametrize("name, flavor, expected, expert_params, model_params", CASES)
def test_full_size_layer_skeleton_on_meta(name, flavor, expected, expert_params, model_params):
    family = get_family(name)
    config = family.flavors[flavor]
    rss_before = psutil.Process().memory_info().rss
    hf_config = family.decoder_config(config)
    with torch.device("meta"):
        layer = family.decoder_classes()["layer"](hf_config, 1)
    params = dict(layer.named_parameters())
    assert all(p.is_meta for p in params.values())
    n_params = sum(p.numel() for p in params.values())
    assert n_params == expected == _layer_params_from_adapter(family, config, 1)
    experts = [p for n, p in params.items() if "experts" in n]
    assert sum(p.numel() for p in experts) == expert_params
    whole = sum(int(torch.Size(s).numel()) for s in family.tensor_shapes(config).values())
    assert whole == pytest.approx(model_params, rel=0.01)  # the published model size
    # nothing was allocated: a layer is GBs in float32 (5.6 GB Mixtral, 19 GB Grok-1)
    assert psutil.Process().memory_info().rss - rss_before < 200 * 2**20
