"""`moe-ray plan` on real config.json files (tests/data/configs, sources in its README): each is
detected as its family and sized to the model's published numbers, and its named flavor is the same
model."""
from __future__ import annotations

from pathlib import Path

import pytest

from moe_ray.checkpoint import detect_family
from moe_ray.cli import main
from moe_ray.planning import load_config, plan_model

CONFIGS = Path(__file__).parent / "data" / "configs"

# file, family, flavor, published parameters (B; the model card's "total"), MoE layers, experts,
# top-k, on-disk GiB where the card gives one (else None)
PUBLISHED = [
    ("deepseek-ai--DeepSeek-V3", "deepseek_v3", "671B", 671, 58, 256, 8, None),
    ("deepseek-ai--DeepSeek-V2", "deepseek_v2", "236B", 236, 59, 160, 6, None),
    ("openai--gpt-oss-120b", "gpt_oss", "120b", 116.83, 36, 128, 4, 60.8),
    ("openai--gpt-oss-20b", "gpt_oss", "20b", 20.91, 24, 32, 4, 12.8),
    ("meta-llama--Llama-4-Scout-17B-16E", "llama4", "scout", 109, 48, 16, 1, None),
    ("meta-llama--Llama-4-Maverick-17B-128E", "llama4", "maverick", 400, 24, 128, 1, None),
    ("Qwen--Qwen3-235B-A22B", "qwen3_moe", "235B-A22B", 235, 94, 128, 8, None),
    ("Qwen--Qwen3-30B-A3B", "qwen3_moe", "30B-A3B", 30.5, 48, 128, 8, None),
    ("mistralai--Mixtral-8x22B-v0.1", "mixtral", "8x22B", 141, 56, 8, 2, None),
]


def test_every_config_file_is_covered():
    assert {p.stem for p in CONFIGS.glob("*.json")} == {row[0] for row in PUBLISHED}


@pytest.mark.parametrize("name, family, flavor, params_b, n_moe, experts, top_k, disk_gib", PUBLISHED)
def test_plan_matches_the_published_model(name, family, flavor, params_b, n_moe, experts, top_k, disk_gib):
    path = CONFIGS / f"{name}.json"
    _, config, _ = load_config(str(path))
    assert detect_family(config).name == family
    plan = plan_model(str(path))
    f = plan.facts
    assert (len(f.moe_layers), f.num_experts, f.top_k) == (n_moe, experts, top_k)
    total = plan.params + plan.other_model_params  # the cards count the main stack (not an MTP layer)
    assert total / 1e9 == pytest.approx(params_b, rel=0.006)
    if disk_gib is not None:
        assert plan.disk_bytes / 2**30 == pytest.approx(disk_gib, abs=0.05)
    assert plan.n_laps == n_moe * experts * (experts - 1) // 2
    named = plan_model(f"{family}:{flavor}")
    assert (named.params, named.disk_bytes, named.n_laps, named.facts) == (plan.params, plan.disk_bytes, plan.n_laps, f)


def test_plan_command_on_a_real_config(capsys):
    assert main(["plan", "--model", str(CONFIGS / "openai--gpt-oss-120b.json"), "--gpu-mem", "141"]) == 0
    out = capsys.readouterr().out
    assert "116.8B parameters" in out and "on disk: 60.8 GiB (MXFP4 experts" in out
    assert "36 MoE layers x 8,128 expert pairs = 292,608 LAPs per matrix" in out


@pytest.mark.parametrize("family, flavor, layer", [("gpt_oss", "120b", 1), ("llama4", "maverick", 1),
                                                   ("llama4", "maverick", 0), ("llama4", "scout", 3)])
def test_full_size_decoder_layer_on_meta_has_the_adapters_tensors(family, flavor, layer):
    """transformers' decoder layer built from the real config on the meta device holds exactly the
    tensors the adapter lists for that layer (fused experts included, in the same layout)."""
    import torch

    from moe_ray.checkpoint import get_family

    adapter = get_family(family)
    config = adapter.flavors[flavor]
    with torch.device("meta"):
        module = adapter.decoder_classes()["layer"](adapter.decoder_config(config), layer)
    prefix = adapter.layer_prefix(layer)
    ours = {k[len(prefix):]: s for k, s in adapter.tensor_shapes(config).items() if k.startswith(prefix)}
    assert {n: tuple(p.shape) for n, p in module.state_dict().items()} == ours
