"""Causal checks (issue 16): the pure math against hand-computed numbers, every family's routing rules and
MoE block under intervention, float64 references of the loss, planted truths through the whole job, shards
and resume, the command line, bad input and the report."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from moe_ray.analysis import causal as C
from moe_ray.checkpoint import open_checkpoint
from moe_ray.runtime import LayerRange
from moe_ray.runtime.causal import LayerActions, OutputHead, Variant, expert_outputs, routing_hooks, run_rows
from moe_ray.plotting.common import expert_labels
from test_compact_models import _attention, _mlp, _rms, _silu, _weights, grok_reference


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


def test_paired_t_pvalues_by_hand():
    """Closed forms of Student's t: df 1, p = 1 - (2/π) atan|t|; df 2, p = 1 - |t| / sqrt(2 + t²)."""
    normal = np.array([10.0, 20.0, 30.0])
    # d = (1, 3): mean 2, sd √2, t = 2 / (√2 / √2) = 2, df 1
    p = C.paired_t_pvalues(np.array([11.0, 23.0]), normal[:2])
    assert p == pytest.approx(1 - 2 / math.pi * math.atan(2.0), rel=1e-10)
    # d = (1, 2, 6) and its negative: mean ±3, sd √7, t = 3√3/√7, df 2 (two-sided: the sign does not matter)
    t = 3 * math.sqrt(3) / math.sqrt(7)
    rows = C.paired_t_pvalues(np.stack([normal + [1, 2, 6], normal - [1, 2, 6], normal + 0.5 * np.array([2, 2, 2]),
                                        normal, np.array([11.0, np.nan, 30.0])]), normal)
    assert rows.shape == (5,)
    np.testing.assert_allclose(rows[:2], 1 - t / math.sqrt(2 + t * t), rtol=1e-10)
    # no spread: the sign test's 2^(1 - 3); unchanged; not computed
    assert rows[2] == 0.25 and rows[3] == 1.0 and np.isnan(rows[4])
    assert np.isnan(C.paired_t_pvalues(np.array([[3.0]]), np.array([2.0]))).all()  # one sequence: no test
    # a DeepSeekMoE-shaped run's ablation of an expert no token chose: each of two sequences' losses one float32
    # step higher (the renormalised softmax moved), "no spread" but no resolved change either
    normal, ablated = np.array([526.73291016, 351.23934937]), np.array([526.73297119, 351.2394104])
    assert C.paired_t_pvalues(ablated, normal) == 0.5  # blind to the losses' precision: two equal changes, a sign test
    assert C.paired_t_pvalues(ablated, normal, C.loss_resolution(normal)) == 1.0
    np.testing.assert_allclose(C.loss_resolution(normal), 4 * np.array([2.0**-14, 2.0**-15]))  # float32 steps
    # a resolved change keeps its test: d = (1, 3) as above, far above the steps of losses of 10 and 20
    assert C.paired_t_pvalues(np.array([11.0, 23.0]), np.array([10.0, 20.0]),
                              C.loss_resolution(np.array([10.0, 20.0]))) == pytest.approx(p)


def test_holm_adjusted_p_values_by_hand():
    """p = (0.01, 0.04, 0.03, 0.005), M = 4, sorted 0.005 < 0.01 < 0.03 < 0.04: scaled 4·0.005 = 0.02,
    3·0.01 = 0.03, 2·0.03 = 0.06, 1·0.04 = 0.04, then the running maximum: 0.02, 0.03, 0.06, 0.06. At α 0.05
    the step-down rejects 0.005 (<= 0.05/4) and 0.01 (<= 0.05/3), stops at 0.03 (> 0.05/2): two tests."""
    adjusted = C.holm_adjusted(np.array([0.01, 0.04, 0.03, 0.005]))
    np.testing.assert_allclose(adjusted, [0.03, 0.06, 0.06, 0.02], rtol=1e-12)
    assert (adjusted <= 0.05).sum() == 2
    # NaN is no test (M = 2 here), shape is kept, adjusted values are capped at 1
    grid = C.holm_adjusted(np.array([[0.02, np.nan], [0.6, np.nan]]))
    np.testing.assert_allclose(grid, [[0.04, np.nan], [0.6, np.nan]])
    assert C.holm_adjusted(np.array([0.7, 0.9])).tolist() == [1.0, 1.0]
    assert np.isnan(C.holm_adjusted(np.full(3, np.nan))).all()


def test_null_ablations_are_rarely_significant_after_holm_and_a_planted_one_still_is():
    """Planted truths, seeded: M = 400 interventions that change nothing in expectation (per-sequence noise
    of ±1 nat around the unmodified loss) and one that adds 0.01 nats per token (about 1.2 nats a sequence).
    Uncorrected, about αM = 20 nulls fall below α (bootstrap intervals and t-test alike); after Holm at most
    a handful, and the planted one is still significant, its adjusted p far below α."""
    rng = np.random.default_rng(7)
    S, M, alpha = 60, 400, 0.05
    tokens = rng.integers(50, 200, S)
    normal = rng.uniform(2.0, 4.0, S) * tokens
    intervened = normal + rng.normal(0.0, 1.0, (M + 1, S))
    intervened[M] = normal + 0.01 * tokens + rng.normal(0.0, 1.0, S)
    p = C.paired_t_pvalues(intervened, normal)
    adjusted = C.holm_adjusted(p)
    boot = C.bootstrap_delta(intervened, normal, tokens, resamples=1000, seed=1)
    nulls_t = int((p[:M] <= alpha).sum())
    nulls_boot = int(((boot[:M, 1] > 0) | (boot[:M, 2] < 0)).sum())
    assert 10 <= nulls_t <= 32 and 10 <= nulls_boot <= 36, (nulls_t, nulls_boot)  # αM = 20, binomial sd 4.4
    assert (adjusted[:M] <= alpha).sum() <= 2
    assert adjusted[M] < 1e-6 and p[M] < alpha / (M + 1)
    assert boot[M, 1] > 0


def test_corpus_loss_is_token_weighted():
    assert C.corpus_loss(np.array([10.0, 30.0]), np.array([5, 5])) == pytest.approx(4.0)
    assert C.corpus_loss(np.array([10.0, 30.0]), np.array([1, 9])) == pytest.approx(4.0)


# ---- the family adapters' routing rules --------------------------------------------------------

def test_every_familys_weights_of_its_own_choice_are_its_route():
    """`weigh` (the weights a family gives any choice, used by norm routing) reproduces `route` on the
    gate's own choice, and removing nothing changes nothing, for every family with a router; removing
    each token's favourite never picks it again (and, without expert groups, moves the runner-up up)."""
    from moe_ray.checkpoint.families import FAMILIES

    gen = torch.Generator().manual_seed(3)
    for family in FAMILIES.values():
        base = family.tiny_config()
        facts = family.facts(base)
        if not facts.moe_layers:
            continue
        E = facts.num_experts
        logits = torch.randn(11, E, generator=gen) * 2
        for renorm in (False, True):
            config = dict(base, norm_topk_prob=renorm)
            weights, experts = family.route(logits, 3, config)
            torch.testing.assert_close(family.weigh(logits, experts, config), weights, msg=family.name)
            same_w, same_e = family.route_without(logits, torch.zeros(11, E, dtype=torch.bool), 3, config)
            assert torch.equal(same_e, experts) and torch.equal(same_w, weights), family.name
        removed = torch.zeros(11, E, dtype=torch.bool)
        removed[torch.arange(11), experts[:, 0]] = True  # each token loses its favourite
        w, e = family.route_without(logits, removed, 3, config)
        assert not (e == experts[:, :1]).any(), family.name
        if int(family.text_config(config).get("n_group") or 1) == 1:
            assert (e[:, 0] == experts[:, 1]).all(), family.name
        assert set(family.intervention_semantics(config)) == {"norm_routing", "ablation", "shared_expert_ablation"}


# ---- the runtime: rows that route differently, the output head --------------------------------


IDS = (torch.arange(19) * 29 + 11) % 500 + 3


def _edit_checkpoint(path, edit) -> None:
    """Apply `edit(tensors)` to a checkpoint's tensors (all shards at once), writing each shard back."""
    files = sorted(path.glob("*.safetensors"))
    shards = [load_file(f) for f in files]
    tensors = {k: v for shard in shards for k, v in shard.items()}
    edit(tensors)
    for f, shard in zip(files, shards):
        save_file({k: tensors[k].contiguous() for k in shard}, f, metadata={"format": "pt"})


def mixtral_reference_nll(ckpt, ids, layer=None, removed=None, by_norm=False) -> float:
    """The next-token loss of one sequence through a Mixtral-style model, float64, token by token from
    the equations: RMSNorm, attention with RoPE, top-k of the router logits with a softmax over the k
    (or, at `layer`, without expert `removed` / by output norm), the final norm and lm_head."""
    W, cfg = _weights(ckpt), ckpt.config
    eps, k, E = cfg["rms_norm_eps"], cfg["num_experts_per_tok"], cfg["num_local_experts"]
    h = W["model.embed_tokens.weight"][ids]
    for l in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{l}"
        h = h + _attention(_rms(h, W[f"{p}.input_layernorm.weight"], eps), W, f"{p}.self_attn", cfg,
                           cfg["head_dim"] ** -0.5)
        x = _rms(h, W[f"{p}.post_attention_layernorm.weight"], eps)
        logits = x @ W[f"{p}.block_sparse_moe.gate.weight"].T
        outs = torch.stack([_mlp(x, *(W[f"{p}.block_sparse_moe.experts.{e}.{n}.weight"] for n in ("w1", "w3", "w2")),
                                 _silu) for e in range(E)], dim=1)  # [T, E, H]
        m = torch.zeros_like(x)
        for t in range(x.shape[0]):
            allowed = [e for e in range(E) if not (l == layer and e == removed)]
            key = outs[t].norm(dim=-1) if (l == layer and by_norm) else logits[t]
            chosen = sorted(allowed, key=lambda e: -float(key[e]))[:k]
            w = torch.softmax(logits[t, chosen], dim=0)
            m[t] = sum(w[j] * outs[t, e] for j, e in enumerate(chosen))
        h = h + m
    out = _rms(h, W["model.norm.weight"], eps) @ W["lm_head.weight"].T
    return float(sum(torch.logsumexp(out[t], 0) - out[t, ids[t + 1]] for t in range(len(ids) - 1)))


@pytest.fixture(scope="module")
def mixtral32(tmp_path_factory):
    from moe_ray.checkpoint.tiny import make_tiny

    return make_tiny("mixtral", "scratch", tmp_path_factory.mktemp("mix32") / "ckpt", seed=5, dtype="float32")


def _nll(runner, head, rows_at=None, ids=IDS):
    """Row losses of one pass: row 0 normal, then the variants `rows_at` {layer: [Variant]}."""
    hidden, rows, _ = run_rows(runner, runner.embed(ids), [None], rows_at or {}, runner.facts.moe_layers)
    return head.nll(hidden, ids).numpy(), rows


def test_loss_of_one_sequence_equals_the_float64_reference(mixtral32):
    """Planted truth: the next-token loss of one sequence, hand-computed from the equations in float64."""
    ckpt = open_checkpoint(mixtral32.path)
    runner, head = LayerRange(ckpt, 0, ckpt.facts.num_layers), OutputHead(ckpt)
    nll, _ = _nll(runner, head)
    expected = mixtral_reference_nll(ckpt, IDS)
    assert nll[0] == pytest.approx(expected, rel=1e-5)
    assert expected > 0.5 * (len(IDS) - 1) * math.log(ckpt.config["vocab_size"])  # a random model: near log V


def test_grok_head_is_tied_scaled_and_normed_by_its_scale(tiny):
    """Grok: the final norm's weight is `model.norm.scale`, the head the embeddings, logits x
    output_multiplier_scale (the float64 reference of test_compact_models, then its head by hand)."""
    t = tiny("grok1", "scratch")
    ckpt = open_checkpoint(t.path)
    runner, head = LayerRange(ckpt, 0, ckpt.facts.num_layers), OutputHead(ckpt)
    nll, _ = _nll(runner, head)
    h, _ = grok_reference(ckpt, IDS)
    W, cfg = _weights(ckpt), ckpt.config
    out = _rms(h, W["model.norm.scale"], cfg["rms_norm_eps"]) @ W["model.embed_tokens.weight"].T
    out = out * cfg["output_multiplier_scale"]
    expected = float(sum(torch.logsumexp(out[t], 0) - out[t, IDS[t + 1]] for t in range(len(IDS) - 1)))
    assert nll[0] == pytest.approx(expected, rel=1e-4)


BLOCK_FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_moe", "grok1", "deepseek_v3", "deepseek_v2",
                  "gpt_oss", "llama4"]


def _block_output(block, x: torch.Tensor) -> torch.Tensor:
    """A MoE block's output as [B, T, H] (gpt-oss and Llama 4 return a tuple; Llama 4 flattens tokens)."""
    out = block(x)
    out = out[0] if isinstance(out, tuple) else out
    return out.reshape(x.shape)


@pytest.mark.parametrize("family", BLOCK_FAMILIES)
def test_each_blocks_experts_follow_the_rerouted_choice(tiny, family):
    """The family's reroute hook reroutes exactly the rows asked, in every family's own block: removing
    an expert, routing by norm and leaving out the shared expert give the sums of expert outputs the
    family's rule implies (Llama 4: each expert on the token scaled by its weight), and the unmodified
    rows stay the same."""
    ckpt = open_checkpoint(tiny(family, "scratch").path)
    layer = ckpt.facts.moe_layers[0]
    runner = LayerRange(ckpt, layer, layer + 1)
    fam, cfg, k = ckpt.family, ckpt.config, ckpt.facts.top_k
    block = fam.moe_block(runner.layers[layer])
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 9, ckpt.facts.d_hid, generator=gen)
    batch = x.expand(4, -1, -1).contiguous()
    rows = [None, Variant("ablate", layer, "3"), Variant("norm", layer),
            Variant("ablate", layer, "SE") if ckpt.facts.shared_d_mid else None]
    scaled_before = fam.name.startswith("llama4")
    with torch.no_grad():
        plain = _block_output(block, x)[0]
        with routing_hooks(runner, layer, LayerActions.of(rows, layer, [layer]), 9):
            out = _block_output(block, batch)
        xs = x[0]
        logits = fam.router_logits(block, xs)
        outs = expert_outputs(runner, block, xs)

        def routed(weights, experts):
            if scaled_before:  # Llama 4: expert(weight * token)
                return sum(expert_outputs(runner, block, weights[:, j, None] * xs)[torch.arange(9), experts[:, j]]
                           for j in range(experts.shape[1]))
            return (weights[..., None] * outs.gather(1, experts[..., None].expand(-1, -1, outs.shape[-1]))).sum(1)
        w, e = fam.route(logits, k, cfg, block=block)
        shared = plain - routed(w, e)  # the shared expert's term (zero without one)
        removed = torch.zeros_like(logits, dtype=torch.bool)
        removed[:, 3] = True
        w3, e3 = fam.route_without(logits, removed, k, cfg, block=block)
        by_norm = C.topk_by_norm(outs.norm(dim=-1), k)
        w_norm = fam.weigh(logits, by_norm, cfg, block=block)
    torch.testing.assert_close(out[0], plain, rtol=1e-5, atol=1e-6)  # the batch changes the kernels, not the math
    assert not (e3 == 3).any()
    torch.testing.assert_close(out[1], routed(w3, e3) + shared, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[2], routed(w_norm, by_norm) + shared, rtol=1e-4, atol=1e-5)
    if ckpt.facts.shared_d_mid:
        assert shared.abs().max() > 1e-3
        torch.testing.assert_close(out[3], routed(w, e), rtol=1e-4, atol=1e-5)
    else:
        assert shared.abs().max() < 1e-5


def test_rows_of_one_batch_equal_each_variant_run_alone_and_from_the_first_layer(mixtral32):
    """Variants created at their layer inside one batch give the losses each gives alone, and the
    losses a naive rerun of the whole model with the intervention gives (rows from layer 0)."""
    ckpt = open_checkpoint(mixtral32.path)
    runner, head = LayerRange(ckpt, 0, ckpt.facts.num_layers), OutputHead(ckpt)
    variants = {0: [Variant("ablate", 0, "1"), Variant("norm_all", 0)], 2: [Variant("norm", 2), Variant("ablate", 2, "7")]}
    together, rows = _nll(runner, head, variants)
    assert rows == [None] + variants[0] + variants[2]
    for i, v in enumerate(rows[1:], start=1):
        alone, _ = _nll(runner, head, {v.layer: [v]})
        naive = head.nll(run_rows(runner, runner.embed(IDS), [v], {}, ckpt.facts.moe_layers)[0], IDS).item()
        assert together[i] == pytest.approx(alone[1], rel=1e-5)
        assert together[i] == pytest.approx(naive, rel=1e-5)
        assert abs(together[i] - together[0]) > 1e-4  # every intervention changes the loss here
    assert together[0] == pytest.approx(_nll(runner, head)[0][0], rel=1e-6)
    assert together[3] == pytest.approx(mixtral_reference_nll(ckpt, IDS, layer=2, by_norm=True), rel=1e-5)
    assert together[4] == pytest.approx(mixtral_reference_nll(ckpt, IDS, layer=2, removed=7), rel=1e-5)


# ---- planted truths through the whole job (api.run on a local Ray) --------------------------------

BETA = 100.0
"""Gate-row scale of the norm-aligned model's experts (see `_plant_norm_aligned`)."""


def _plant_norm_aligned(path, config) -> None:
    """A Mixtral whose gate ranks experts exactly as their output norms do, for every token.

    Router rows come in opposite pairs (r, -r), so at least half the logits z_e of any token are >= 0.
    Expert e is W_down_e (silu(W_gate_e x) * W_up x) with every row of W_gate_e = BETA r_e, one W_up
    shared by all experts and W_down_e = Q_e B (Q_e orthogonal): its output norm is
    |silu(BETA z_e)| ||B W_up x||, the same factor for every expert times |silu(BETA z_e)|, which
    increases with z_e wherever silu(BETA z) > 0.28 (the largest |silu| of a negative argument). So the
    gate's top-k (the k largest z_e) is the top-k by norm as long as each token's k-th largest logit
    exceeds 0.47 / BETA; the test checks that margin on the logits it sees."""
    H, E, M = config["hidden_size"], config["num_local_experts"], config["intermediate_size"]
    gen = torch.Generator().manual_seed(11)
    up = torch.randn(M, H, generator=gen) * 0.02
    base = torch.randn(H, M, generator=gen) * 0.002

    def edit(t):
        for layer in range(config["num_hidden_layers"]):
            p = f"model.layers.{layer}.block_sparse_moe"
            half = torch.randn(E // 2, H, generator=gen) / math.sqrt(H)
            rows = torch.stack([half, -half], dim=1).reshape(E, H)
            t[f"{p}.gate.weight"] = rows
            for e in range(E):
                q, _ = torch.linalg.qr(torch.randn(H, H, generator=gen))
                t[f"{p}.experts.{e}.w1.weight"] = (BETA * rows[e]).expand(M, H).clone()
                t[f"{p}.experts.{e}.w3.weight"] = up.clone()
                t[f"{p}.experts.{e}.w2.weight"] = q @ base
    _edit_checkpoint(path, edit)


def _run_causal(ckpt_path, store, **causal):
    from moe_ray import api

    dynamic = causal.pop("dynamic", {})
    top = {k: causal.pop(k) for k in ("layers", "overwrite") if k in causal}
    api.run(model=str(ckpt_path), analyses=["causal"], store=str(store), progress=False,
            dynamic={"max_sequences": 4, **dynamic}, causal={"bootstrap_resamples": 200, **causal}, **top)
    return api.open_results(store)


def test_gate_that_ranks_by_norm_agrees_and_norm_routing_changes_nothing(ray_session, tmp_path):
    """Planted truth: agreement 1 and a loss change of 0 (float error) from norm routing, one layer at
    a time and all layers at once."""
    from moe_ray.checkpoint.tiny import make_tiny

    t = make_tiny("mixtral", "scratch", tmp_path / "ckpt", seed=2, dtype="float32")
    _plant_norm_aligned(t.path, json.loads((t.path / "config.json").read_text()))
    ckpt = open_checkpoint(t.path)
    runner = LayerRange(ckpt, 0, ckpt.facts.num_layers)
    from moe_ray.data import corpus_sequences
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(t.path))
    for text in corpus_sequences(None, 4):  # the construction's margin holds on every token seen
        _, caps = runner.forward(runner.embed(torch.tensor(tok(text)["input_ids"])))
        for cap in caps.values():
            assert cap.router_logits.sort(dim=-1, descending=True).values[:, ckpt.facts.top_k - 1].min() > 0.47 / BETA
    tree = _run_causal(t.path, tmp_path / "aligned.zarr", checks=["norm_routing"])
    nr = tree["causal/norm_routing"].to_dataset()
    np.testing.assert_array_equal(nr.agreement.values, 1.0)
    np.testing.assert_array_equal(nr.match_rate.values, 1.0)
    assert (nr.topk_overlap.values == 2 * (tree["causal"].to_dataset().sequence_tokens.values + 1)).all()
    normal = tree["causal"].to_dataset().loss.values
    assert np.abs(nr.loss.values - normal).max() < 1e-5 * normal.max()
    assert np.abs(nr.delta_loss.values).max() < 1e-6
    assert np.abs(tree["causal/norm_routing_all"].to_dataset().delta_loss.values).max() < 1e-6
    assert set(tree["causal"].children) == {"norm_routing", "norm_routing_all"}


def test_ablating_either_copy_of_an_expert_changes_the_loss_alike(ray_session, tmp_path):
    """Planted truth: expert 5 of layer 1 is an exact copy of expert 2 with the same router row, so
    tokens route to both or neither (the router splits evenly between them) and removing either one
    changes the loss by the same amount: the amount the float64 reference computes by hand."""
    from moe_ray.checkpoint.tiny import make_tiny
    from moe_ray.data import corpus_sequences
    from transformers import AutoTokenizer

    t = make_tiny("mixtral", "scratch", tmp_path / "ckpt", seed=4, dtype="float32")

    def edit(w):
        p = "model.layers.1.block_sparse_moe"
        w[f"{p}.experts.2.w2.weight"] *= 8.0  # an expert that matters
        for n in ("w1", "w2", "w3"):
            w[f"{p}.experts.5.{n}.weight"] = w[f"{p}.experts.2.{n}.weight"].clone()
        w[f"{p}.gate.weight"][2] *= 3.0
        w[f"{p}.gate.weight"][5] = w[f"{p}.gate.weight"][2]
    _edit_checkpoint(t.path, edit)
    tree = _run_causal(t.path, tmp_path / "copies.zarr", checks=["ablation"], layers=[1],
                       dynamic={"max_sequences": 3})
    ab = tree["causal/ablation"].to_dataset()
    assert list(ab.layer.values) == [1] and expert_labels(ab, "expert") == [str(e) for e in range(8)]
    loss = ab.loss.sel(layer=1).values  # [expert, sequence]
    np.testing.assert_allclose(loss[2], loss[5], rtol=1e-6)
    d = ab.delta_loss.sel(layer=1).values
    np.testing.assert_allclose(d[2], d[5], rtol=0, atol=2e-6)  # float32 forwards: ~1e-7 of a ~200-nat loss
    assert abs(d[2, 0]) > 1e-3 and np.abs(np.delete(d[:, 0], [2, 5]) - d[2, 0]).min() > 1e-4
    ckpt = open_checkpoint(t.path)
    ids = torch.tensor(AutoTokenizer.from_pretrained(str(t.path))(corpus_sequences(None, 1)[0])["input_ids"])
    runner = LayerRange(ckpt, 0, 2)
    top = runner.forward(runner.embed(ids))[1][1].topk_experts
    split = (top == 2).any(-1) & (top == 5).any(-1)
    assert split.float().mean() > 0.3  # the router splits its weight evenly between the copies
    root = tree["causal"].to_dataset()
    assert root.loss.values[0] == pytest.approx(mixtral_reference_nll(ckpt, ids), rel=1e-5)
    assert loss[2, 0] == pytest.approx(mixtral_reference_nll(ckpt, ids, layer=1, removed=2), rel=1e-5)
    assert root.sequence_tokens.values[0] == len(ids) - 1
    assert (ab.unit_done.values == 1).all() and (root.unit_done.values == 1).all()
    # the multiple-comparison correction round-trips: named dims, the stored p-values are the t-test's of the
    # stored losses, Holm over the 8 ablations, the method, alpha and number of tests in the attributes
    assert ab.p_value.dims == ("layer", "expert") and ab.p_holm.dims == ("layer", "expert")
    p = C.paired_t_pvalues(ab.loss.values, root.loss.values)
    np.testing.assert_array_equal(ab.p_value.values, p)
    np.testing.assert_array_equal(ab.p_holm.values, C.holm_adjusted(p))
    assert {k: ab.p_holm.attrs[k] for k in ("method", "alpha", "tests")} == {"method": "Holm-Bonferroni",
                                                                             "alpha": pytest.approx(0.05), "tests": 8}
    mc = json.loads(ab.attrs["multiple_comparison"])  # open_results gives nested attributes as JSON text
    assert mc["tests"] == 8 and mc["significant"] == int((C.holm_adjusted(p) <= 0.05).sum())
    assert mc["interval_excludes_0"] == int(((d[..., 1] > 0) | (d[..., 2] < 0)).sum())


def test_two_shards_equal_one_and_a_resume_recomputes_only_what_is_missing(ray_session, tmp_path, mixtral32, capsys):
    """The same store from 1 and 2 shard actors; checks added later run only their units; units whose
    flags are cleared (a crash mid-unit) are recomputed to the same values; a complete store is left alone."""
    import zarr

    one = tmp_path / "one.zarr"
    _run_causal(mixtral32.path, one, checks=["ablation"], dynamic={"max_sequences": 3})
    ablation_first = _open(one, "causal/ablation").loss.values
    tree = _run_causal(mixtral32.path, one, dynamic={"max_sequences": 3})  # the other checks, resumed
    np.testing.assert_array_equal(tree["causal/ablation"].to_dataset().loss.values, ablation_first)
    # independent random experts (unlike the planted model above): agreement near chance, a loss change
    nr = tree["causal/norm_routing"].to_dataset()
    assert (nr.agreement.values < 0.6).all() and (nr.match_rate.values < 0.3).all()
    d = nr.delta_loss.values
    assert (np.abs(d[:, 0]) > 1e-6).all() and (d[:, 1] <= d[:, 0]).all() and (d[:, 0] <= d[:, 2]).all()
    two = tmp_path / "two.zarr"
    _run_causal(mixtral32.path, two, dynamic={"max_sequences": 3, "shards": 2})
    groups = ["causal", "causal/norm_routing", "causal/norm_routing_all", "causal/ablation", "causal/agreement"]
    for g in groups:
        a, b = _open(one, g), _open(two, g)
        assert set(a.data_vars) == set(b.data_vars)
        for name in a.data_vars:
            if name == "text":
                assert list(a[name].values) == list(b[name].values)
                continue
            np.testing.assert_allclose(a[name].values, b[name].values, rtol=1e-5, atol=1e-7, err_msg=f"{g}/{name}")
        assert (a.unit_done.values == 1).all()
    root = zarr.open_group(str(two), mode="r+")
    root["causal/ablation/unit_done"][1, 3] = 0
    root["causal/ablation/loss"][1, 3, 2] = np.nan
    root["causal/unit_done"][0] = 0
    capsys.readouterr()
    from moe_ray import api

    api.run(model=str(mixtral32.path), analyses=["causal"], store=str(two), dynamic={"max_sequences": 3, "shards": 2},
            causal={"bootstrap_resamples": 200})
    assert "2 of 46 units to run" in capsys.readouterr().out  # 3 sequences, 4 + 3 norm routing, 32 ablation, 4 agreement
    for g in groups:
        a, b = _open(one, g), _open(two, g)
        for name in ("loss", "delta_loss", "unit_done"):
            if name in a:
                np.testing.assert_allclose(a[name].values, b[name].values, rtol=1e-5, atol=1e-7, err_msg=f"{g}/{name}")
    api.run(model=str(mixtral32.path), analyses=["causal"], store=str(two), dynamic={"max_sequences": 3, "shards": 2},
            causal={"bootstrap_resamples": 200})
    assert "nothing to do" in capsys.readouterr().out


def _open(store, group):
    import xarray as xr

    return xr.open_zarr(store, group=group, consolidated=False)


# ---- the command line, bad input, the report -----------------------------------------------------

def test_cli_runs_the_checks_and_the_report_shows_them(ray_session, tiny, tmp_path, capsys):
    """`moe-ray run --analyses causal` on an upcycled Mixtral; the report's causal figures hold the stored
    numbers, fit the page (no image wider than 1,298 px, text >= 8 pt) and, in headless Chromium at 1,400
    px, load at their own width with every table fitting."""
    from moe_ray.cli import main
    from moe_ray.plotting import render
    from moe_ray.plotting.common import MAX_WIDTH, DPI
    from headless_browser import Browser, require_chromium
    from test_plotting import PAGE_METRICS

    t = tiny("mixtral", "upcycled")
    store = tmp_path / "cli.zarr"
    assert main(["run", "--model", str(t.path), "--analyses", "causal", "--max-sequences", "2", "--shards", "2",
                 "--bootstrap-resamples", "100", "--store", str(store)]) == 0
    out = capsys.readouterr().out
    assert "causal: loss" in out and "norm routing Δloss all layers" in out and "largest ablation" in out
    report = render([str(store)], tmp_path / "report", parallel="none")
    keys = {f.key for f in report.figures}
    assert keys == {"causal_norm_routing", "causal_ablation", "causal_weight_output"}
    assert {tb.key for tb in report.tables} == {"causal_summary", "causal_norm_routing", "causal_ablation_top",
                                                  "causal_weight_output"}
    nr, ab = _open(store, "causal/norm_routing"), _open(store, "causal/ablation")
    fig = next(f for f in report.figures if f.key == "causal_norm_routing")
    label = next(iter(fig.data))[0]
    np.testing.assert_allclose(fig.data[(label, "agreement")], nr.agreement.values)
    np.testing.assert_allclose(fig.data[(label, "delta_loss")], nr.delta_loss.values)
    fig = next(f for f in report.figures if f.key == "causal_ablation")
    np.testing.assert_allclose(fig.data[(label, "delta_loss")], ab.delta_loss.values)
    for f in report.figures:
        assert f.size_px[0] <= round(MAX_WIDTH * DPI) and f.min_font_pt >= 8, (f.path.name, f.size_px, f.min_font_pt)
        assert "predicted tokens" in f.caption and "2 sequences" in f.caption
    top = next(tb for tb in report.tables if tb.key == "causal_ablation_top")
    assert top.rows[0][3] == pytest.approx(float(np.nanmax(ab.delta_loss.values[..., 0])))
    # the corrected count leads, the uncorrected one beside it: figure marks, caption, summary table
    corrected = ab.p_holm.values <= 0.05
    assert ab.p_holm.attrs["tests"] == corrected.size
    cells = {(int(r), int(c)) for r, c in zip(*np.nonzero(corrected))}
    assert set(fig.data[(label, "corrected")]) == cells
    boot = (ab.delta_loss.values[..., 1] > 0) | (ab.delta_loss.values[..., 2] < 0)
    assert set(fig.data[(label, "excludes_0_uncorrected_only")]) == {
        (int(r), int(c)) for r, c in zip(*np.nonzero(boot & ~corrected))}
    count = f"{int(corrected.sum())} of {corrected.size} experts change the loss (corrected: Holm-Bonferroni"
    assert count[0].upper() + count[1:] in fig.caption and f"uncorrected, {int(boot.sum())} bootstrap" in fig.caption
    summary = next(tb for tb in report.tables if tb.key == "causal_summary")
    row = dict(zip(summary.columns, summary.rows[0]))
    assert row["experts that change the loss (Holm-corrected)"] == f"{int(corrected.sum())} of {corrected.size}"
    assert row["ablations whose interval excludes 0 (uncorrected)"] == f"{int(boot.sum())} of {boot.size}"
    li, ei = (int(x) for x in np.unravel_index(np.nanargmax(ab.delta_loss.values[..., 0]), corrected.shape))
    assert top.rows[0][6:] == [pytest.approx(float(ab.p_value.values[li, ei])),
                               pytest.approx(float(ab.p_holm.values[li, ei]))]
    # a store written before the correction: the uncorrected dots as before, and the caption says what is missing
    import shutil
    import zarr
    from moe_ray.plotting import causal as PC
    from moe_ray.plotting.common import StoreView

    old = tmp_path / "old.zarr"
    shutil.copytree(store, old)
    for name in ("p_value", "p_holm"):
        del zarr.open_group(str(old / "causal" / "ablation"), mode="r+")[name]
    (fig_old,) = PC.ablation([StoreView(old)], tmp_path)
    assert "no multiple-comparison correction in this store" in fig_old.caption
    assert fig_old.data[(label, "corrected")] == []
    assert set(fig_old.data[(label, "excludes_0_uncorrected_only")]) == {
        (int(r), int(c)) for r, c in zip(*np.nonzero(boot))}
    chromium = require_chromium()
    with Browser(chromium) as browser:
        browser.open(report.index.as_uri(), width=1400, height=1000)
        page = browser.evaluate(PAGE_METRICS)
    assert page["scrollWidth"] <= page["clientWidth"]
    for img in page["images"]:
        assert img["complete"] and img["width"] / img["naturalWidth"] > 0.99, img
    for width, room in page["tables"]:
        assert width <= room + 0.5, (width, room)


@pytest.mark.parametrize("argv, message", [
    (["--checks", "ablation,routing"], "unknown causal check 'routing'"),
    (["--confidence", "95"], "confidence must be between 0 and 1"),
    (["--bootstrap-resamples", "0"], "bootstrap_resamples must be at least 1"),
    (["--max-sequences", "0"], "max_sequences must be at least 1"),
    (["--corpus-file", "{bad}"], "line 2 is not JSON"),
])
def test_bad_causal_input_is_one_line_exit_2_and_no_store(tiny, tmp_path, capsys, argv, message):
    from moe_ray.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\nnot json\n')
    store = tmp_path / "bad.zarr"
    argv = [a.replace("{bad}", str(bad)) for a in argv]
    assert main(["run", "--model", str(tiny("mixtral", "scratch").path), "--analyses", "causal", "--store", str(store),
                 *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("moe-ray: error:") and message in err[0], err
    assert not store.exists()
