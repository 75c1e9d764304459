"""Dynamic analyses (paper §5, App D, App E): capture math, the layer runtime against transformers'
own model, planted truths on tiny checkpoints, sharded actors, and bad inputs."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from moe_ray.analysis import dynamic as D
from moe_ray.checkpoint import open_checkpoint
from moe_ray.runtime import LayerRange

FAMILIES = ["mixtral"]


def _silu64(a: np.ndarray) -> np.ndarray:
    return a / (1.0 + np.exp(-a))


# ---- pure math -----------------------------------------------------------------------------------

def test_all_expert_forward_matches_float64_loop():
    gen = torch.Generator().manual_seed(0)
    T, E, H, M = 7, 3, 5, 4
    x = torch.randn(T, H, generator=gen)
    gate, up = torch.randn(E, M, H, generator=gen), torch.randn(E, M, H, generator=gen)
    down = torch.randn(E, H, M, generator=gen)
    res = D.all_expert_forward(x, gate, up, down, D.activation_fn("silu"), probe_tokens=2, chunk=3)
    xn, gn, un, dn = (t.double().numpy() for t in (x, gate, up, down))
    for t in range(T):
        for e in range(E):
            g = _silu64(gn[e] @ xn[t])
            np.testing.assert_allclose(res.outputs[t, e].numpy(), dn[e] @ (g * (un[e] @ xn[t])), rtol=1e-5, atol=1e-5)
            assert res.activation_ratio[t, e].item() == pytest.approx(np.mean(np.abs(g) > 1e-3))
            if t < 2:
                np.testing.assert_allclose(res.intermediate[t, e].numpy(), g, rtol=1e-5, atol=1e-6)
    assert res.intermediate.shape == (2, E, M)


def test_cosine_and_angular_mean_match_float64():
    gen = torch.Generator().manual_seed(1)
    out = torch.randn(6, 4, 9, generator=gen)
    out[:, 1] = 2.5 * out[:, 0]  # parallel outputs: cos 1, angular 1
    cos = D.cosine_per_token(out)
    o = out.double().numpy()
    u = o / np.linalg.norm(o, axis=-1, keepdims=True)
    ref = np.einsum("tih,tjh->tij", u, u)
    np.testing.assert_allclose(cos.numpy(), ref, atol=1e-6)
    ang = D.angular_mean(cos).numpy()
    np.testing.assert_allclose(ang, np.mean(1 - np.arccos(np.clip(ref, -1, 1)) / math.pi, axis=0), atol=1e-5)
    assert ang[0, 1] == pytest.approx(1.0, abs=1e-3)
    assert D.angular_similarity(torch.tensor(0.0)).item() == pytest.approx(0.5)


def test_router_preferring_largest_norm_gives_diagonal_rank_counts():
    gen = torch.Generator().manual_seed(2)
    T, E = 50, 8
    norms = torch.rand(T, E, generator=gen) + 0.1
    scores = torch.softmax(3.0 * norms.log(), dim=-1)  # monotone in the norm: the planted router
    counts = D.norm_score_rank_counts(norms, scores).numpy()
    np.testing.assert_array_equal(counts, np.eye(E, dtype=np.int64) * T)
    reversed_counts = D.norm_score_rank_counts(norms, -scores).numpy()
    np.testing.assert_array_equal(reversed_counts, np.fliplr(np.eye(E, dtype=np.int64)) * T)


# ---- the runtime against transformers' own model -------------------------------------------------

def _hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tiny):
    ckpt = tiny(request.param, "scratch")
    return open_checkpoint(ckpt.path), _hf_model(ckpt.path)


def _ids(n: int = 23) -> torch.Tensor:
    return (torch.arange(n) * 37 + 5) % 500 + 3


def test_capture_changes_nothing(pair):
    ckpt, model = pair
    ids = _ids()
    runner = LayerRange(ckpt, 0, ckpt.facts.num_layers)
    hidden, captures = runner.forward(runner.embed(ids), probe_tokens=2)
    assert set(captures) == set(ckpt.facts.moe_layers)
    with torch.no_grad():
        ref = model.model(input_ids=ids.unsqueeze(0)).last_hidden_state
        ours = model.model.norm(hidden)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def _block_inputs(model, ids: torch.Tensor) -> dict[int, torch.Tensor]:
    seen: dict[int, torch.Tensor] = {}
    hooks = [layer.mlp.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, a[0].reshape(-1, a[0].shape[-1])))
             for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        model.model(input_ids=ids.unsqueeze(0))
    for h in hooks:
        h.remove()
    return seen


def test_all_experts_and_router_equal_the_models_own(pair):
    ckpt, model = pair
    ids = _ids()
    runner = LayerRange(ckpt, 0, ckpt.facts.num_layers)
    _, captures = runner.forward(runner.embed(ids))
    inputs = _block_inputs(model, ids)
    for layer, cap in captures.items():
        x = inputs[layer]
        block = model.model.layers[layer].mlp
        with torch.no_grad():
            logits, top_w, top_i = block.gate(x)
            torch.testing.assert_close(cap.router_logits, logits, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(cap.topk_weights, top_w, rtol=1e-5, atol=1e-6)
            assert torch.equal(cap.topk_experts, top_i)
            torch.testing.assert_close(cap.gate_scores, torch.softmax(logits, -1), rtol=1e-5, atol=1e-6)
            experts = block.experts
            for e in range(ckpt.facts.num_experts):
                g, u = torch.nn.functional.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
                y = torch.nn.functional.linear(experts.act_fn(g) * u, experts.down_proj[e])
                torch.testing.assert_close(cap.outputs[:, e], y, rtol=1e-4, atol=1e-6)
