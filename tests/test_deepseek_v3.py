"""DeepSeek-V3 / R1 (FP8 E4M3 with block scales, MLA, group-limited sigmoid routing, MTP layer) and
DeepSeek-V2: the tiny checkpoint in the real on-disk layout, exact reads against transformers' own
dequantisation, the routing rule with a planted router, static and reorder analyses against float64
references and planted permutations, the dynamic capture against transformers' own model, and the
plan of the real 671B config."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

import moe_ray
from moe_ray import api
from moe_ray.checkpoint import get_family, open_checkpoint
from moe_ray.checkpoint.quant import DTYPE_BYTES
from moe_ray.errors import SpecError
from moe_ray.planning import plan_model
from moe_ray.runtime import LayerRange
from moe_ray.plotting.common import expert_labels

from family_refs import (check_planted_permutations, check_static_against_float64, hf_model_from_state, raw_tensors,
                         read_config)

CONFIGS = Path(__file__).parent / "data" / "configs"
V3 = get_family("deepseek_v3")


def _dequantized(raw: dict[str, torch.Tensor], block) -> dict[str, torch.Tensor]:
    """Every logical tensor dequantised by transformers' own FP8 code (partial edge blocks included)."""
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    out = {}
    for key, t in raw.items():
        if key.endswith("_scale_inv"):
            continue
        scale = raw.get(key + "_scale_inv")
        out[key] = _dequantize_fp8_weight(t, scale, list(block), torch.float32) if scale is not None else t.float()
    return out


# ---- the checkpoint --------------------------------------------------------------------------------

def test_tiny_v3_is_stored_like_the_hub_checkpoint(tiny):
    ck = tiny("deepseek_v3", "scratch")
    ckpt = open_checkpoint(ck.path)
    raw = raw_tensors(ck.path)
    config = read_config(ck.path)
    layout = V3.stored_layout(config)
    assert {k: (tuple(t.shape), str(t.dtype)) for k, t in raw.items()} == {
        k: (shape, {"F8_E4M3": "torch.float8_e4m3fn", "F32": "torch.float32", "BF16": "torch.bfloat16"}[dtype])
        for k, (shape, dtype) in layout.items()}
    expert = "model.layers.2.mlp.experts.5.down_proj.weight"
    assert raw[expert].dtype == torch.float8_e4m3fn and raw[expert + "_scale_inv"].shape == (4, 3)  # 64x40, 16x16
    assert raw["model.layers.2.mlp.gate.weight"].dtype == torch.bfloat16  # router, norms: bf16
    assert "model.layers.4.eh_proj.weight" in raw and "model.layers.4.mlp.experts.0.up_proj.weight" in raw  # MTP
    assert ckpt.facts.moe_layers == (1, 2, 3) and ckpt.facts.mtp_layers == (4,)
    assert ckpt.facts.shared_d_mid == ckpt.facts.d_mid == 40 and ckpt.facts.top_k == 4
    assert "FP8 E4M3" in ckpt.facts.stored_format
    plan = plan_model(str(ck.path))
    on_disk = sum(t.numel() * DTYPE_BYTES[{torch.float8_e4m3fn: "F8_E4M3", torch.float32: "F32",
                                           torch.bfloat16: "BF16"}[t.dtype]] for t in raw.values())
    assert plan.disk_bytes == on_disk


def test_fp8_reads_equal_transformers_dequantisation(tiny):
    ck = tiny("deepseek_v3", "scratch")
    ckpt = open_checkpoint(ck.path)
    reference = _dequantized(raw_tensors(ck.path), (16, 16))
    for key in ("model.layers.1.mlp.experts.3.up_proj.weight",  # 40 rows: a partial row block
                "model.layers.3.mlp.shared_experts.down_proj.weight",
                "model.layers.2.self_attn.kv_a_proj_with_mqa.weight",  # 24 rows, like V3's 576 = 4.5 x 128
                "model.layers.0.mlp.down_proj.weight"):
        assert ckpt.storage(key).format == "fp8_block"
        assert torch.equal(ckpt.read(key), reference[key]), key


# ---- routing ---------------------------------------------------------------------------------------

def test_group_limited_routing_with_a_planted_router():
    """16 experts in 4 groups, top-4 from the best 2 groups. Expert 0 has the highest affinity but its
    group's two best sum low; plain top-4 would take it, group-limited top-k must not."""
    config = {"n_group": 4, "topk_group": 2, "norm_topk_prob": True, "routed_scaling_factor": 2.5}
    s = torch.full((1, 16), 0.1)
    s[0, 0] = 0.95                      # group 0: 0.95 + 0.1 = 1.05
    s[0, [4, 5]] = torch.tensor([0.7, 0.6])   # group 1: 1.3
    s[0, [8, 9]] = torch.tensor([0.65, 0.62])  # group 2: 1.27
    s[0, [12, 13]] = torch.tensor([0.5, 0.45])  # group 3: 0.95
    logits = torch.log(s / (1 - s))  # sigmoid(logits) == s
    weights, experts = V3.select(logits, 4, config)
    assert sorted(experts[0].tolist()) == [4, 5, 8, 9]
    assert set(torch.topk(s, 4).indices[0].tolist()) == {0, 4, 8, 9}  # what plain top-k would pick
    chosen = s[0, [4, 5, 8, 9]].double()
    np.testing.assert_allclose(sorted(weights[0].tolist()), sorted((2.5 * chosen / chosen.sum()).tolist()), rtol=1e-6)
    bias = torch.zeros(16)
    bias[12:14] = 0.5  # the correction bias lifts group 3 into the top groups and its experts into the top-k
    _, experts = V3.select(logits, 4, config, bias)
    assert sorted(experts[0].tolist()) == [4, 5, 12, 13]

    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    hf = DeepseekV3TopkRouter(DeepseekV3Config(hidden_size=16, n_routed_experts=16, num_experts_per_tok=4,
                                               n_group=4, topk_group=2, routed_scaling_factor=2.5))
    with torch.no_grad():
        hf.weight.copy_(torch.eye(16))
        hf.e_score_correction_bias.copy_(bias)
        _, hf_w, hf_i = hf(logits)
    order = hf_i[0].argsort()
    assert hf_i[0][order].tolist() == [4, 5, 12, 13]
    ours_w, ours_i = V3.select(logits, 4, config, bias)
    ours = ours_i[0].argsort()
    torch.testing.assert_close(ours_w[0][ours], hf_w[0][order], rtol=1e-6, atol=1e-7)


def test_v2_group_limited_greedy_matches_transformers():
    from transformers import DeepseekV2Config
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter

    config = get_family("deepseek_v2").tiny_config()
    hf = DeepseekV2TopkRouter(DeepseekV2Config(**{k: v for k, v in config.items() if k != "torch_dtype"}))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        hf.weight.copy_(torch.randn(16, 64, generator=gen))
    x = torch.randn(50, 64, generator=gen)
    logits, hf_w, hf_i = hf(x)
    w, i = get_family("deepseek_v2").route(logits, 4, config)
    plain = torch.softmax(logits, -1).topk(4).indices
    assert any(set(a.tolist()) != set(b.tolist()) for a, b in zip(i, plain))  # the groups matter here
    for t in range(50):
        o, h = i[t].argsort(), hf_i[t].argsort()
        assert i[t][o].tolist() == hf_i[t][h].tolist()
        torch.testing.assert_close(w[t][o], hf_w[t][h])


# ---- static and reorder through Ray ------------------------------------------------------------------

@pytest.fixture(scope="module")
def permuted_run(ray_session, tiny, tmp_path_factory):
    ck = tiny("deepseek_v3", "permuted", seed=1)
    store = tmp_path_factory.mktemp("dsv3") / "r.zarr"
    moe_ray.run({"model": str(ck.path), "store": str(store), "progress": False, "analyses": ["static", "reorder"],
                 "layers": [2, 4], "mtp": True, "reorder": {"pairs": ["0-1", "2-3"]}})
    return ck, store


def test_static_on_fp8_equals_float64_reference(permuted_run):
    ck, store = permuted_run
    ds = xr.open_zarr(store, group="static")
    assert list(ds.layer.values) == [2, 4] and expert_labels(ds, "expert")[-1] == "SE"  # MTP layer on request
    reference = _dequantized(raw_tensors(ck.path), (16, 16))
    for layer in (2, 4):
        experts = {str(e): {m: reference[V3.expert_keys(layer, e)[m]].numpy() for m in ("up", "gate", "down")}
                   for e in range(16)}
        shared = {m: reference[k].numpy() for m, k in V3.shared_expert_keys(layer).items()}
        check_static_against_float64(ds, layer, experts, reference[V3.router_weight_key(layer)].numpy(), shared)
    model = json.loads(moe_ray.open_results(store).attrs["model"])  # tables are JSON text in the xarray view
    assert model["mtp_layers"] == [4] and "FP8" in model["stored_format"]


def test_reorder_recovers_planted_permutations_through_fp8(permuted_run):
    ck, store = permuted_run
    ds = xr.open_zarr(store, group="reorder/joint")
    check_planted_permutations(ds, 2, ck.planted["permuted"]["2"], ("1", "3"))
    assert np.isfinite(ds.similarity_after.sel(layer=4, expert_i=0, expert_j=1).values).all()


def test_mtp_layer_needs_asking_for(tiny, tmp_path):
    ck = tiny("deepseek_v3", "scratch")
    base = {"model": str(ck.path), "store": str(tmp_path / "x.zarr"), "progress": False}
    ckpt = open_checkpoint(ck.path)
    assert api.select_layers(ckpt, api.as_spec(base)) == (1, 2, 3)
    assert api.select_layers(ckpt, api.as_spec(base, mtp=True)) == (1, 2, 3, 4)
    with pytest.raises(SpecError, match="layer 4 is .* multi-token-prediction layer.*--mtp"):
        api.plan(api.as_spec(base, layers=[4]))
    with pytest.raises(SpecError, match="dynamic passes run the main stack"):
        api.plan(api.as_spec(base, layers=[4], mtp=True, analyses=["dynamic"]))


# ---- dynamic capture against transformers' own model -------------------------------------------------

def _hf_model(path: Path, family: str):
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM

    config = read_config(path)
    block = tuple((config.get("quantization_config") or {}).get("weight_block_size") or (128, 128))
    tensors = _dequantized(raw_tensors(path), block)
    classes = {"deepseek_v3": (DeepseekV3Config, DeepseekV3ForCausalLM),
               "deepseek_v2": (DeepseekV2Config, DeepseekV2ForCausalLM)}[family]
    config = {k: v for k, v in config.items() if k not in ("quantization_config", "torch_dtype")}
    state = {}
    n_layers, n_exp = config["num_hidden_layers"], config["n_routed_experts"]
    for layer in range(n_layers):  # transformers fuses the hub's per-expert keys like this on load
        p = f"model.layers.{layer}.mlp.experts"
        if f"{p}.0.up_proj.weight" in tensors:
            state[f"{p}.gate_up_proj"] = torch.stack([torch.cat([tensors[f"{p}.{e}.gate_proj.weight"],
                                                                 tensors[f"{p}.{e}.up_proj.weight"]]) for e in range(n_exp)])
            state[f"{p}.down_proj"] = torch.stack([tensors[f"{p}.{e}.down_proj.weight"] for e in range(n_exp)])
    model = classes[1](classes[0](**config))
    for key in model.state_dict():
        if key not in state:
            state[key] = tensors[key]
    return hf_model_from_state(*classes, config, state)


def _ids(n: int = 29) -> torch.Tensor:
    return (torch.arange(n) * 37 + 5) % 500 + 3


@pytest.mark.parametrize("family", ["deepseek_v3", "deepseek_v2"])
def test_capture_equals_transformers_model_routing_included(tiny, family):
    ck = tiny(family, "scratch")
    ckpt, model = open_checkpoint(ck.path), _hf_model(ck.path, family)
    adapter = ckpt.family
    ids = _ids()
    runner = LayerRange(ckpt, 0, ckpt.facts.num_layers)
    hidden, captures = runner.forward(runner.embed(ids))
    assert set(captures) == set(ckpt.facts.moe_layers)
    seen = {}
    hooks = [layer.mlp.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, a[0].reshape(-1, a[0].shape[-1])))
             for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        ref = model.model(input_ids=ids.unsqueeze(0)).last_hidden_state
        torch.testing.assert_close(model.model.norm(hidden), ref, rtol=1e-5, atol=1e-5)
    for h in hooks:
        h.remove()
    differs = 0
    for layer, cap in captures.items():
        block, x = model.model.layers[layer].mlp, seen[layer]
        with torch.no_grad():
            logits, hf_w, hf_i = block.gate(x)
            torch.testing.assert_close(cap.router_logits, logits, rtol=1e-5, atol=1e-5)
            for t in range(len(ids)):
                o, h = cap.topk_experts[t].argsort(), hf_i[t].argsort()
                assert cap.topk_experts[t][o].tolist() == hf_i[t][h].tolist()
                torch.testing.assert_close(cap.topk_weights[t][o], hf_w[t][h], rtol=1e-5, atol=1e-6)
            scores = logits.sigmoid() if family == "deepseek_v3" else logits.softmax(-1)
            plain = scores.topk(ckpt.facts.top_k).indices
            differs += sum(set(a.tolist()) != set(b.tolist()) for a, b in zip(cap.topk_experts, plain))
            experts = block.experts
            for e in range(ckpt.facts.num_experts):
                g, u = torch.nn.functional.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
                y = torch.nn.functional.linear(experts.act_fn(g) * u, experts.down_proj[e])
                torch.testing.assert_close(cap.outputs[:, e], y, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(cap.outputs[:, -1], block.shared_experts(x), rtol=1e-4, atol=1e-6)  # SE
    assert differs > 0  # group-limited top-k (and V3's bias) changed the choice for some tokens


# ---- plan of the real configs --------------------------------------------------------------------------

def test_plan_of_the_real_v3_config():
    plan = plan_model(str(CONFIGS / "deepseek-ai--DeepSeek-V3.json"))
    assert plan.facts.family == "deepseek_v3" and len(plan.facts.moe_layers) == 58 and plan.facts.mtp_layers == (61,)
    assert plan.pairs == 32_640 and plan.n_laps == 58 * 32_640 == 1_893_120
    assert plan.params / 1e9 == pytest.approx(671, rel=0.01)  # the main stack: "671B total parameters"
    assert (plan.params + plan.mtp_params) / 1e9 == pytest.approx(685, rel=0.01)  # the hub's 685B with MTP
    # FP8 linear weights + a float32 scale per 128x128 block, bf16 elsewhere: about one byte a parameter
    assert plan.disk_bytes / (plan.params + plan.mtp_params) == pytest.approx(1.0, abs=0.03)
    assert plan.nbytes == 2 * plan.params
    same = plan_model("deepseek_v3:671B")  # the named flavor is the real config
    assert (same.params, same.disk_bytes, same.n_laps) == (plan.params, plan.disk_bytes, plan.n_laps)
    text = plan.report()
    assert "1,893,120 LAPs per matrix" in text and "58 MoE layers x 32,640 expert pairs" in text
    assert "multi-token-prediction layer(s) [61]" in text


@pytest.mark.parametrize("family, flavor, layer", [("deepseek_v3", "671B", 3), ("deepseek_v3", "671B", 0),
                                                   ("deepseek_v2", "236B", 1)])
def test_full_size_decoder_layer_on_meta_matches_the_adapters_layout(family, flavor, layer):
    adapter = get_family(family)
    config = adapter.flavors[flavor]
    with torch.device("meta"):
        module = adapter.decoder_classes()["layer"](adapter.decoder_config(config), layer)
    ours = {k[len(f"model.layers.{layer}."):]: s for k, s in adapter.tensor_shapes(config).items()
            if k.startswith(f"model.layers.{layer}.")}
    theirs = {n: tuple(p.shape) for n, p in module.state_dict().items()}
    fused = {n for n in theirs if n.startswith("mlp.experts.")}
    assert {n: s for n, s in theirs.items() if n not in fused} == {n: s for n, s in ours.items() if ".experts." not in n}
    if fused:  # 256 experts x (gate, up, down) per-expert hub keys fill transformers' two fused tensors
        n, d_mid, h = adapter.num_experts(config), adapter.expert_d_mid(config), config["hidden_size"]
        assert theirs["mlp.experts.gate_up_proj"] == (n, 2 * d_mid, h) and theirs["mlp.experts.down_proj"] == (n, h, d_mid)
        assert sum(1 for k in ours if ".experts." in k) == 3 * n
