"""Llama 4 (fused 3-D expert tensors, top-1 sigmoid routing, shared expert, MoE every
`interleave_moe_layer_step` layers, chunked/NoPE attention): the tiny checkpoint in the hub's layout
(vision tower included) loaded by transformers itself, reads by slice, static and reorder analyses
against float64 references and planted permutations, the dynamic capture against transformers' own
model, the text-only layout, and the plan of the real Scout and Maverick configs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

import moe_ray
from moe_ray.checkpoint import get_family, open_checkpoint
from moe_ray.planning import plan_model
from moe_ray.runtime import LayerRange
from moe_ray.plotting.common import expert_labels

from family_refs import check_planted_permutations, check_static_against_float64, raw_tensors, read_config

CONFIGS = Path(__file__).parent / "data" / "configs"
LLAMA4 = get_family("llama4")


def _hf_language_model(path: Path, family: str):
    """transformers' own model loaded from the tiny checkpoint by transformers itself."""
    from transformers import Llama4ForCausalLM, Llama4ForConditionalGeneration
    from transformers.utils import logging

    logging.set_verbosity_error()
    if family == "llama4":
        return Llama4ForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32).eval().language_model
    return Llama4ForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def test_tiny_is_stored_like_the_hub_checkpoint(tiny):
    ck = tiny("llama4", "scratch")
    raw = raw_tensors(ck.path)
    assert {k: tuple(t.shape) for k, t in raw.items()} == {k: s for k, (s, _) in LLAMA4.stored_layout(read_config(ck.path)).items()}
    p = "language_model.model.layers.1.feed_forward"
    assert raw[f"{p}.experts.gate_up_proj"].shape == (8, 64, 64) and raw[f"{p}.experts.down_proj"].shape == (8, 32, 64)
    assert "language_model.model.layers.0.feed_forward.gate_proj.weight" in raw  # dense layer (step 2)
    assert "vision_model.class_embedding" in raw and "language_model.lm_head.weight" in raw
    ckpt = open_checkpoint(ck.path)
    assert ckpt.family.name == "llama4" and ckpt.facts.moe_layers == (1, 3)
    assert ckpt.facts.top_k == 1 and ckpt.facts.shared_d_mid == ckpt.facts.d_mid == 32 and ckpt.facts.dense_d_mid == 128


@pytest.mark.parametrize("family", ["llama4", "llama4_text"])
def test_capture_equals_transformers_model(tiny, family):
    ck = tiny(family, "scratch")
    ckpt, model = open_checkpoint(ck.path), _hf_language_model(ck.path, family)
    assert ckpt.family.name == family
    ids = (torch.arange(29) * 37 + 5) % 500 + 3  # longer than the attention chunk (8)
    runner = LayerRange(ckpt, 0, ckpt.facts.num_layers)
    hidden, captures = runner.forward(runner.embed(ids), probe_tokens=2)
    assert set(captures) == {1, 3}
    seen = {}
    hooks = [layer.feed_forward.register_forward_pre_hook(
        lambda m, a, i=i: seen.__setitem__(i, a[0].reshape(-1, a[0].shape[-1]))) for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        ref = model.model(input_ids=ids.unsqueeze(0)).last_hidden_state
    for h in hooks:
        h.remove()
    torch.testing.assert_close(model.model.norm(hidden), ref, rtol=1e-5, atol=1e-5)
    for layer, cap in captures.items():
        block, x = model.model.layers[layer].feed_forward, seen[layer]
        with torch.no_grad():
            scores, logits = block.router(x)  # [T, E]: sigmoid of the top-1 logit, 0 elsewhere
            torch.testing.assert_close(cap.router_logits, logits, rtol=1e-5, atol=1e-6)
            top = scores.max(dim=-1)
            assert torch.equal(cap.topk_experts[:, 0], top.indices)
            torch.testing.assert_close(cap.topk_weights[:, 0], top.values, rtol=1e-6, atol=1e-7)
            ex = block.experts
            for e in range(8):  # each expert on the unscaled input (Topk = ALL)
                gate, up = (x @ ex.gate_up_proj[e]).chunk(2, dim=-1)
                torch.testing.assert_close(cap.outputs[:, e], (up * ex.act_fn(gate)) @ ex.down_proj[e], rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(cap.outputs[:, -1], block.shared_expert(x), rtol=1e-4, atol=1e-6)  # SE
            # the routed contribution is expert(w·x), not w·expert(x): the block's own output says so
            w, i = cap.topk_weights[:, 0:1], cap.topk_experts[:, 0]
            gate, up = torch.einsum("th,thm->tm", w * x, ex.gate_up_proj[i]).chunk(2, dim=-1)
            routed = torch.einsum("tm,tmh->th", up * ex.act_fn(gate), ex.down_proj[i])
            torch.testing.assert_close(block(x)[0], block.shared_expert(x) + routed, rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def permuted_run(ray_session, tiny, tmp_path_factory):
    ck = tiny("llama4", "permuted", seed=1)
    store = tmp_path_factory.mktemp("llama4") / "r.zarr"
    moe_ray.run({"model": str(ck.path), "store": str(store), "progress": False, "analyses": ["static", "reorder"],
                 "layers": [3], "reorder": {"pairs": ["0-1", "2-3"]}})
    return ck, store


def test_static_on_fused_experts_equals_float64_reference(permuted_run):
    ck, store = permuted_run
    ds = xr.open_zarr(store, group="static")
    raw = {k: t.float() for k, t in raw_tensors(ck.path).items()}
    p = "language_model.model.layers.3.feed_forward"
    gate_up, down = raw[f"{p}.experts.gate_up_proj"], raw[f"{p}.experts.down_proj"]
    experts = {str(e): {"gate": gate_up[e][:, :32].T.numpy(), "up": gate_up[e][:, 32:].T.numpy(),
                        "down": down[e].T.numpy()} for e in range(8)}
    shared = {m: raw[f"{p}.shared_expert.{m}_proj.weight"].numpy() for m in ("up", "gate", "down")}
    check_static_against_float64(ds, 3, experts, raw[f"{p}.router.weight"].numpy(), shared)


def test_reorder_recovers_planted_permutations_in_fused_tensors(permuted_run):
    ck, store = permuted_run
    ds = xr.open_zarr(store, group="reorder/joint")
    check_planted_permutations(ds, 3, ck.planted["permuted"]["3"], ("1", "3"))


def test_plan_counts_the_vision_tower_on_disk_but_not_in_the_shards():
    plan = plan_model(str(CONFIGS / "meta-llama--Llama-4-Scout-17B-16E.json"))
    assert 0.8e9 < plan.other_model_params < 0.9e9  # vision tower and projector
    assert plan.disk_bytes == 2 * (plan.params + plan.other_model_params)  # bf16 on disk
    assert sum(s.nbytes for s in plan.shards) == pytest.approx(2 * plan.params, rel=1e-6)
    assert "0.87B parameters not analysed (vision tower, projector)" in plan.report()


def test_dynamic_run_through_ray_on_the_multimodal_layout(ray_session, tiny, tmp_path):
    ck = tiny("llama4", "upcycled")
    store = moe_ray.run({"model": str(ck.path), "reference": str(ck.reference), "store": str(tmp_path / "d.zarr"),
                         "progress": False, "analyses": ["dynamic"], "dynamic": {"inputs": ["short"]}})
    ds = xr.open_zarr(store, group="dynamic/short")
    assert list(ds.layer.values) == [1, 3] and expert_labels(ds, "expert") == [str(e) for e in range(8)] + ["F", "SE"]
    assert ds.sizes["k"] == 1 and ((ds.topk_weights > 0) & (ds.topk_weights < 1)).all()  # sigmoid weights
    assert np.isfinite(ds.expert_output_norms.values).all() and ds.unit_done.values.all()
    # upcycled: every expert is the dense parent plus noise, so F's outputs lie close to the experts'
    ang = ds.expert_output_angular_mean.sel(expert_i=list(range(8)), expert_j=-1).values
    assert (ang > 0.6).all()  # independent outputs would sit near 0.5 (orthogonal)
