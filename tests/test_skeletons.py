"""Full-size configs (published numbers) build their decoder layers on the meta device with the
right shapes and byte counts, without allocating memory (issue 4)."""
from __future__ import annotations

import psutil
import pytest
import torch

from moe_ray.checkpoint import get_family

# family, flavor, parameters of one MoE decoder layer (published architecture arithmetic)
CASES = [
    ("mixtral", "8x7B", 4096 * (4096 + 1024 + 1024 + 4096) + 2 * 4096 + 8 * 4096 + 8 * 3 * 14336 * 4096),
]


def _layer_params_from_adapter(family, config, layer: int) -> int:
    prefix = f"model.layers.{layer}."
    return sum(int(torch.Size(s).numel()) for k, s in family.tensor_shapes(config).items() if k.startswith(prefix))


@pytest.mark.parametrize("name, flavor, expected", CASES)
def test_full_size_layer_skeleton_on_meta(name, flavor, expected):
    family = get_family(name)
    config = family.flavors[flavor]
    rss_before = psutil.Process().memory_info().rss
    hf_config = family.hf_config(config)
    with torch.device("meta"):
        layer = family.hf_classes()["layer"](hf_config, 1)
    params = dict(layer.named_parameters())
    assert all(p.is_meta for p in params.values())
    n_params = sum(p.numel() for p in params.values())
    assert n_params == expected == _layer_params_from_adapter(family, config, 1)
    experts = [p for n, p in params.items() if "experts" in n]
    assert sum(p.numel() for p in experts) == 8 * 3 * 14336 * 4096  # 1.41e9 expert weights per layer
    assert n_params * 2 == pytest.approx(2.90e9, rel=0.01)  # 2.9 GB of bf16 per layer
    # nothing was allocated: the layer alone would be 5.6 GB in float32
    assert psutil.Process().memory_info().rss - rss_before < 200 * 2**20
