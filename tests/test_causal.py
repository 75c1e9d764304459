"""Causal checks (issue 16): the pure math against hand-computed numbers."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from moe_ray.analysis import causal as C


# ---- pure math -----------------------------------------------------------------------------------

def test_next_token_nll_by_hand():
    # position 0: uniform over 3 -> -log(1/3); position 1: logits (1, 0, 0), target 0 -> log(e + 2) - 1;
    # position 2 predicts nothing (no next token)
    logits = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [5.0, -3.0, 2.0]])
    ids = torch.tensor([2, 1, 0])
    expected = math.log(3) + math.log(math.e + 2) - 1
    assert C.next_token_nll(logits, ids).item() == pytest.approx(expected, rel=1e-6)
    # batched rows (interventions) are independent; the second row predicts both tokens with certainty
    sure = torch.tensor([[0.0, 50.0, 0.0], [50.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    both = C.next_token_nll(torch.stack([logits, sure]), ids)
    assert both.shape == (2,) and both.dtype == torch.float64
    assert both[0].item() == pytest.approx(expected, rel=1e-6)
    assert both[1].item() == pytest.approx(0.0, abs=1e-12 + 4 * math.exp(-50))


def test_topk_by_norm_breaks_ties_by_expert_index():
    norms = torch.tensor([[1.0, 3.0, 3.0, 2.0], [0.5, 0.1, 0.9, 0.9]])
    assert C.topk_by_norm(norms, 2).tolist() == [[1, 2], [2, 3]]
    assert C.topk_by_norm(norms, 3).tolist() == [[1, 2, 3], [2, 3, 0]]


def test_topk_overlap_counts_shared_experts_and_exact_sets():
    gate = torch.tensor([[0, 1], [2, 3], [1, 0], [4, 5]])
    norm = torch.tensor([[1, 0], [2, 0], [5, 6], [4, 5]])
    # token 0: {0,1} = {1,0} (2 shared, exact); 1: {2} shared; 2: none; 3: exact
    assert C.topk_overlap(gate, norm, num_experts=8) == (2 + 1 + 0 + 2, 2)


def test_output_similarity_sums_equal_a_loop_over_tokens():
    gen = torch.Generator().manual_seed(0)
    out = torch.randn(7, 3, 5, generator=gen)
    out[:, 2] = -4.0 * out[:, 0]  # antiparallel: cos -1, angular 0
    cos_sum, ang_sum = C.output_similarity_sums(out, chunk=3)
    o = out.double().numpy()
    cos = np.array([[[o[t, i] @ o[t, j] / np.linalg.norm(o[t, i]) / np.linalg.norm(o[t, j]) for j in range(3)]
                     for i in range(3)] for t in range(7)])
    np.testing.assert_allclose(cos_sum.numpy(), cos.sum(0), rtol=1e-10)
    np.testing.assert_allclose(ang_sum.numpy(), (1 - np.arccos(np.clip(cos, -1, 1)) / math.pi).sum(0), atol=1e-5)
    assert cos_sum[0, 2].item() == pytest.approx(-7.0) and ang_sum[0, 2].item() == pytest.approx(0.0, abs=1e-3)


def test_bootstrap_of_two_sequences_has_the_exact_resampling_distribution():
    """S = 2, one token each, Δ_0 = 1, Δ_1 = 0: a resample is (0,0) -> 1, (1,1) -> 0 or mixed -> 0.5, with
    probabilities 1/4, 1/4, 1/2, so the 95% interval is [0, 1] and the estimate 0.5."""
    out = C.bootstrap_delta(np.array([3.0, 2.0]), np.array([2.0, 2.0]), np.array([1, 1]), resamples=4000, seed=1)
    assert out.tolist() == [0.5, 0.0, 1.0]
    counts = C.resample_counts(2, 4000, seed=1)
    assert counts.sum(axis=1).tolist() == [2] * 4000
    assert abs((counts[:, 0] == 2).mean() - 0.25) < 0.03 and abs((counts[:, 0] == 1).mean() - 0.5) < 0.03


def test_bootstrap_is_token_weighted_seeded_and_vectorised():
    gen = np.random.default_rng(5)
    tokens = np.array([10, 30, 20, 40])
    normal = gen.uniform(20, 100, size=4)
    # every sequence's loss grows by 0.25 nats per token: Δ is 0.25 in every resample (zero-width interval)
    same = normal + 0.25 * tokens
    # a second intervention whose per-token change differs by sequence: Σ(Δ_s) / Σ(n_s) by hand
    spread = normal + np.array([1.0, 0.0, 2.0, 4.0])
    out = C.bootstrap_delta(np.stack([same, spread]), normal, tokens, resamples=500, seed=3)
    assert out.shape == (2, 3)
    np.testing.assert_allclose(out[0], [0.25, 0.25, 0.25], rtol=1e-12)
    assert out[1, 0] == pytest.approx(7.0 / 100)
    assert out[1, 1] < out[1, 0] < out[1, 2]
    again = C.bootstrap_delta(np.stack([same, spread]), normal, tokens, resamples=500, seed=3)
    np.testing.assert_array_equal(out, again)
    narrow = C.bootstrap_delta(spread, normal, tokens, resamples=500, seed=3, level=0.5)
    assert out[1, 1] <= narrow[1] <= narrow[2] <= out[1, 2]
    # a row not computed (NaN) stays NaN; the others are unaffected
    holes = C.bootstrap_delta(np.stack([spread, np.full(4, np.nan)]), normal, tokens, resamples=500, seed=3)
    np.testing.assert_array_equal(holes[0], out[1])
    assert np.isnan(holes[1]).all()


def test_corpus_loss_is_token_weighted():
    assert C.corpus_loss(np.array([10.0, 30.0]), np.array([5, 5])) == pytest.approx(4.0)
    assert C.corpus_loss(np.array([10.0, 30.0]), np.array([1, 9])) == pytest.approx(4.0)
