"""gpt-oss (MXFP4 fused experts with interleaved gate/up, biases, clamped SwiGLU, attention sinks,
sliding layers): the tiny checkpoint in the hub's on-disk layout, exact reads against transformers'
own dequantisation, static and reorder analyses against float64 references and planted permutations,
the dynamic capture against transformers' own model, and the plan of the real configs."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import xarray as xr

import moe_ray
from moe_ray.checkpoint import get_family, open_checkpoint
from moe_ray.checkpoint.quant import DTYPE_BYTES
from moe_ray.planning import plan_model
from moe_ray.runtime import LayerRange

from family_refs import check_planted_permutations, check_static_against_float64, raw_tensors, read_config

GPT_OSS = get_family("gpt_oss")


@pytest.fixture(scope="module")
def hf_model(tiny):
    """transformers' own GptOssForCausalLM from the tiny checkpoint, its MXFP4 experts dequantised by
    transformers itself (on CPU it dequantises on load)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    ck = tiny("gpt_oss", "scratch")
    return ck, AutoModelForCausalLM.from_pretrained(str(ck.path), dtype=torch.float32).eval()


def test_tiny_is_stored_like_the_hub_checkpoint(tiny):
    ck = tiny("gpt_oss", "scratch")
    raw = raw_tensors(ck.path)
    names = {torch.uint8: "U8", torch.bfloat16: "BF16"}
    assert {k: (tuple(t.shape), names[t.dtype]) for k, t in raw.items()} == GPT_OSS.stored_layout(read_config(ck.path))
    p = "model.layers.2.mlp.experts"
    assert raw[f"{p}.gate_up_proj_blocks"].shape == (8, 192, 2, 16) and raw[f"{p}.gate_up_proj_scales"].shape == (8, 192, 2)
    assert raw[f"{p}.down_proj_blocks"].shape == (8, 64, 3, 16) and raw[f"{p}.down_proj_bias"].dtype == torch.bfloat16
    assert "model.layers.2.self_attn.sinks" in raw and "model.layers.2.mlp.router.bias" in raw
    ckpt = open_checkpoint(ck.path)
    assert ckpt.facts.moe_layers == (0, 1, 2, 3) and ckpt.facts.d_mid == 96 and ckpt.facts.top_k == 4
    assert "MXFP4" in ckpt.facts.stored_format and "biases" in ckpt.facts.expert_biases
    assert plan_model(str(ck.path)).disk_bytes == sum(t.numel() * DTYPE_BYTES[names[t.dtype]] for t in raw.values())


def test_expert_reads_equal_transformers_dequantisation(hf_model):
    ck, model = hf_model
    ckpt = open_checkpoint(ck.path)
    for layer in (0, 3):
        experts = model.model.layers[layer].mlp.experts
        for e in range(8):
            keys = GPT_OSS.expert_keys(layer, e)
            assert torch.equal(ckpt.read(keys["gate"]), experts.gate_up_proj[e][:, 0::2].T)
            assert torch.equal(ckpt.read(keys["up"]), experts.gate_up_proj[e][:, 1::2].T)
            assert torch.equal(ckpt.read(keys["down"]), experts.down_proj[e].T)
            assert ckpt.info(keys["up"]).shape == (96, 64) and ckpt.info(keys["down"]).shape == (64, 96)
        assert torch.equal(ckpt.read(f"model.layers.{layer}.mlp.experts.down_proj_bias"), experts.down_proj_bias)


def test_capture_equals_transformers_model(hf_model):
    ck, model = hf_model
    ckpt = open_checkpoint(ck.path)
    ids = (torch.arange(29) * 37 + 5) % 500 + 3  # longer than the sliding window (6)
    runner = LayerRange(ckpt, 0, ckpt.facts.num_layers)
    assert runner.hf_config._attn_implementation == "eager"  # the sinks
    hidden, captures = runner.forward(runner.embed(ids), probe_tokens=3)
    seen = {}
    hooks = [layer.mlp.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, a[0].reshape(-1, a[0].shape[-1])))
             for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        ref = model.model(input_ids=ids.unsqueeze(0)).last_hidden_state
    for h in hooks:
        h.remove()
    torch.testing.assert_close(model.model.norm(hidden), ref, rtol=1e-5, atol=1e-5)
    limit = read_config(ck.path)["swiglu_limit"]
    clamped = 0
    for layer, cap in captures.items():
        block, x = model.model.layers[layer].mlp, seen[layer]
        with torch.no_grad():
            logits, scores, indices = block.router(x)  # logits include the router bias
            torch.testing.assert_close(cap.router_logits, logits, rtol=1e-5, atol=1e-6)
            assert torch.equal(cap.topk_experts, indices)
            torch.testing.assert_close(cap.topk_weights, scores, rtol=1e-5, atol=1e-6)
            ex = block.experts
            for e in range(8):  # transformers' own expert computation, biases and clamps included
                gate_up = x @ ex.gate_up_proj[e] + ex.gate_up_proj_bias[e]
                y = ex._apply_gate(gate_up) @ ex.down_proj[e] + ex.down_proj_bias[e]
                torch.testing.assert_close(cap.outputs[:, e], y, rtol=1e-4, atol=1e-6)
                clamped += int((gate_up.abs() > limit).sum())
                g = gate_up[:3, 0::2].clamp(max=limit)
                torch.testing.assert_close(cap.intermediate[e], g * torch.sigmoid(1.702 * g), rtol=1e-5, atol=1e-7)
    assert clamped > 0  # the tiny's limit is reached, so a wrong clamp would show


def test_sliding_layers_matter(hf_model):
    ck, _ = hf_model
    ckpt = open_checkpoint(ck.path)
    ids = (torch.arange(29) * 37 + 5) % 500 + 3
    runner = LayerRange(ckpt, 0, ckpt.facts.num_layers)
    windowed, _ = runner.forward(runner.embed(ids), capture=False)
    runner.hf_config.sliding_window = None
    runner.hf_config.layer_types = ["full_attention"] * 4
    for module in runner.layers.values():
        module.self_attn.sliding_window = None
    full, _ = runner.forward(runner.embed(ids), capture=False)
    assert torch.allclose(windowed[:, :6], full[:, :6], atol=1e-6)  # inside the window: the same
    assert not torch.allclose(windowed[:, 6:], full[:, 6:], atol=1e-4)


@pytest.fixture(scope="module")
def permuted_run(ray_session, tiny, tmp_path_factory):
    ck = tiny("gpt_oss", "permuted", seed=1)
    store = tmp_path_factory.mktemp("gptoss") / "r.zarr"
    moe_ray.run({"model": str(ck.path), "store": str(store), "progress": False, "analyses": ["static", "reorder"],
                 "layers": [1], "reorder": {"pairs": ["0-1", "2-3", "4-5"]}})
    return ck, store


def test_static_on_mxfp4_equals_float64_reference(permuted_run):
    ck, store = permuted_run
    ds = xr.open_zarr(store, group="static")
    ckpt = open_checkpoint(ck.path)
    raw = raw_tensors(ck.path)
    from transformers.integrations.mxfp4 import _convert_moe_packed_tensors

    p = "model.layers.1.mlp.experts"
    gate_up = _convert_moe_packed_tensors(raw[f"{p}.gate_up_proj_blocks"], raw[f"{p}.gate_up_proj_scales"],
                                          dtype=torch.float32)  # transformers' [E, H, 2·d_mid]
    down = _convert_moe_packed_tensors(raw[f"{p}.down_proj_blocks"], raw[f"{p}.down_proj_scales"], dtype=torch.float32)
    experts = {str(e): {"gate": gate_up[e][:, 0::2].T.numpy(), "up": gate_up[e][:, 1::2].T.numpy(),
                        "down": down[e].T.numpy()} for e in range(8)}
    check_static_against_float64(ds, 1, experts, raw["model.layers.1.mlp.router.weight"].float().numpy())
    stored_note = json.loads(moe_ray.open_results(store).attrs["model"])["expert_biases"]  # the store says how biases are treated
    assert stored_note == ckpt.facts.expert_biases and "weight matrices only, biases left out" in stored_note


def test_reorder_recovers_planted_permutations_through_mxfp4(permuted_run):
    ck, store = permuted_run
    ds = xr.open_zarr(store, group="reorder/joint")
    check_planted_permutations(ds, 1, ck.planted["permuted"]["1"], ("1", "3", "5"))


def test_a_bf16_checkpoint_in_transformers_layout_reads_the_same_way(tmp_path):
    """gpt-oss saved unquantised (transformers' [E, H, 2·d_mid] layout, no blocks/scales) is read by
    the same TensorRefs and equals transformers' own load of it."""
    from transformers import AutoModelForCausalLM

    from moe_ray.checkpoint.tiny import make_tiny

    ck = make_tiny("gpt_oss", "scratch", tmp_path / "bf16", config_overrides={"quantization_config": None})
    raw = raw_tensors(ck.path)
    assert raw["model.layers.1.mlp.experts.gate_up_proj"].shape == (8, 64, 192) and not any("_blocks" in k for k in raw)
    ckpt = open_checkpoint(ck.path)
    model = AutoModelForCausalLM.from_pretrained(str(ck.path), dtype=torch.float32)
    experts = model.model.layers[1].mlp.experts
    keys = GPT_OSS.expert_keys(1, 5)
    assert torch.equal(ckpt.read(keys["gate"]), experts.gate_up_proj[5][:, 0::2].T)
    assert torch.equal(ckpt.read(keys["up"]), experts.gate_up_proj[5][:, 1::2].T)
    assert torch.equal(ckpt.read(keys["down"]), experts.down_proj[5].T)
    assert "MXFP4" not in ckpt.facts.stored_format
