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
from moe_ray.plotting.common import expert_labels

FAMILIES = ["mixtral", "olmoe", "qwen2_moe", "qwen3_moe"]


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
            if hasattr(block, "shared_expert"):  # qwen2_moe: SE is the last label, before its sigmoid gate
                assert cap.outputs.shape[1] == ckpt.facts.num_experts + 1
                torch.testing.assert_close(cap.outputs[:, -1], block.shared_expert(x), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family, overrides", [
    ("mixtral", {"sliding_window": 6}),  # every layer windowed
    ("qwen2_moe", {"use_sliding_window": True, "sliding_window": 6, "max_window_layers": 3}),  # per-layer types
])
def test_sliding_window_layers_equal_transformers(family, overrides, tmp_path):
    from moe_ray.checkpoint.tiny import make_tiny

    t = make_tiny(family, "scratch", tmp_path / "ckpt", config_overrides=overrides)
    ckpt, model = open_checkpoint(t.path), _hf_model(t.path)
    ids = _ids(23)
    runner = LayerRange(ckpt, 0, ckpt.facts.num_layers)
    hidden, _ = runner.forward(runner.embed(ids))
    with torch.no_grad():
        ref = model.model(input_ids=ids.unsqueeze(0)).last_hidden_state
        full = LayerRange(ckpt, 0, ckpt.facts.num_layers)
        full.hf_config.sliding_window, full.hf_config.layer_types = None, None
        unwindowed, _ = full.forward(full.embed(ids))
    torch.testing.assert_close(model.model.norm(hidden), ref, rtol=1e-5, atol=1e-5)
    assert (model.model.norm(unwindowed) - ref).abs().max() > 1e-3  # the window really changes the result


# ---- planted truths, shards, bad inputs through api.run -------------------------------------------

def _run(tmp_path, ckpt_path, name="st.zarr", **dynamic):
    from moe_ray import api

    store = tmp_path / name
    dyn = {"inputs": ["short"], **dynamic}
    api.run(model=str(ckpt_path), analyses=["dynamic"], store=str(store), dynamic=dyn, progress=False,
            **({"reference": dynamic.pop("reference")} if "reference" in dynamic else {}))
    return store


def test_upcycled_experts_match_the_dense_parent(ray_session, tiny, tmp_path):
    import xarray as xr

    t = tiny("mixtral", "upcycled", sigma=0.02)
    from moe_ray import api

    store = tmp_path / "up.zarr"
    api.run(model=str(t.path), reference=str(t.reference), analyses=["dynamic"], store=str(store),
            dynamic={"inputs": ["short"]}, progress=False)
    ds = xr.open_zarr(store, group="dynamic/short")
    assert expert_labels(ds, "expert") == [str(e) for e in range(8)] + ["F"]
    sim = ds.expert_output_similarity.sel(expert_j=-1).values[..., :8]
    assert np.nanmin(sim) > 0.99  # every expert ≈ F for small sigma
    assert np.isnan(ds.router_logits.sel(expert=-1).values).all()
    np.testing.assert_allclose(ds.gate_scores.values[..., :8].sum(-1), 1.0, rtol=1e-5)
    assert ds.tokens.values[0] == "<s>" and ds.token_ids.values[0] == 1  # BOS
    counts = ds.norm_score_rank_counts.values
    assert (counts.sum(axis=(1, 2)) == 8 * ds.sizes["token"]).all()


def test_two_shards_equal_one(ray_session, tiny, tmp_path):
    import xarray as xr

    t = tiny("mixtral", "scratch")
    one = _run(tmp_path, t.path, "one.zarr", inputs=["short", "long"], shards=1, max_tokens=300)
    two = _run(tmp_path, t.path, "two.zarr", inputs=["short", "long"], shards=2, max_tokens=300)
    for inp in ("short", "long"):
        a, b = xr.open_zarr(one, group=f"dynamic/{inp}"), xr.open_zarr(two, group=f"dynamic/{inp}")
        assert (a.unit_done.values == 1).all()
        assert list(a.tokens.values) == list(b.tokens.values)
        for name in a.data_vars:
            if name == "tokens":
                continue
            if a[name].dtype.kind not in "fciu":  # unit_weights: the digests, equal as text
                np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)
                continue
            np.testing.assert_allclose(a[name].values, b[name].values, rtol=1e-6, atol=1e-6, err_msg=name)
    assert xr.open_zarr(one, group="dynamic/long").sizes["token"] == 300


@pytest.mark.parametrize("family", ["grok1", "deepseek_moe"])
def test_own_decoders_run_end_to_end_on_two_shards(ray_session, tiny, tmp_path, family):
    """Grok-1 and DeepSeekMoE v1 through the whole job: 2 shard actors, store with their labels."""
    import xarray as xr

    t = tiny(family, "scratch")
    ckpt = open_checkpoint(t.path)
    store = _run(tmp_path, t.path, shards=2)
    ds = xr.open_zarr(store, group="dynamic/short")
    assert (ds.unit_done.values == 1).all()
    assert list(ds.layer.values) == list(ckpt.facts.moe_layers)
    labels = [str(e) for e in range(ckpt.facts.num_experts)] + (["SE"] if ckpt.facts.shared_d_mid else [])
    assert expert_labels(ds, "expert") == labels
    runner = LayerRange(ckpt, 0, ckpt.facts.num_layers)
    ids = torch.tensor(ds.token_ids.values)
    _, captures = runner.forward(runner.embed(ids))
    for i, layer in enumerate(ds.layer.values):
        np.testing.assert_allclose(ds.expert_output_norms.values[i], captures[int(layer)].norms.numpy(), rtol=1e-5)
        np.testing.assert_allclose(ds.topk_weights.values[i], captures[int(layer)].topk_weights.numpy(), rtol=1e-5)


def test_balance_layers_is_contiguous_and_balanced():
    from moe_ray.distributed.pipeline import balance_layers

    assert balance_layers([10, 1, 1, 1, 1, 10], 2) == [(0, 3), (3, 6)]
    assert balance_layers([5, 5, 5, 5], 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert balance_layers([1, 1, 1, 9], 2) == [(0, 3), (3, 4)]


@pytest.mark.parametrize("case", ["empty", "not_utf8", "too_long", "no_tokenizer"])
def test_bad_inputs_fail_cleanly_and_leave_no_store(ray_session, tiny, tmp_path, case):
    import shutil

    from moe_ray import api
    from moe_ray.errors import MoeRayError

    src = tiny("mixtral", "scratch").path
    model, dyn = src, {"inputs": ["text"]}
    text = tmp_path / "in.txt"
    if case == "empty":
        text.write_text("  \n")
        message = "empty"
    elif case == "not_utf8":
        text.write_bytes(b"caf\xe9 \xff\xfe")
        message = "not UTF-8"
    elif case == "too_long":
        text.write_text("As an open source alternative to " * 200)
        dyn["max_tokens"] = None
        model = tmp_path / "short-model"
        shutil.copytree(src, model)
        import json
        cfg = json.loads((model / "config.json").read_text())
        cfg["max_position_embeddings"] = 64
        (model / "config.json").write_text(json.dumps(cfg))
        message = "max_position_embeddings"
    else:
        text.write_text("hello")
        model = tmp_path / "no-tok"
        shutil.copytree(src, model)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            (model / f).unlink()
        message = "no tokenizer"
    store = tmp_path / "bad.zarr"
    with pytest.raises(MoeRayError, match=message):
        api.run(model=str(model), analyses=["dynamic"], store=str(store),
                dynamic={**dyn, "text_file": str(text)}, progress=False)
    assert not store.exists()


def test_bfloat16_shards_store_float32_captures_close_to_float32(ray_session, tiny, tmp_path):
    """dtype = bfloat16 (what GPUs run by default) on CPU: the same path, captures stored in float32."""
    import xarray as xr

    t = tiny("deepseek_moe", "scratch")
    full = xr.open_zarr(_run(tmp_path, t.path, "f32.zarr", dtype="float32"), group="dynamic/short")
    half = xr.open_zarr(_run(tmp_path, t.path, "bf16.zarr", dtype="bfloat16", shards=2), group="dynamic/short")
    assert half.expert_output_norms.dtype == np.float32
    rel = np.abs(half.expert_output_norms.values - full.expert_output_norms.values) / full.expert_output_norms.values
    assert 0 < rel.max() < 0.05  # bf16 rounding: different, but close
    assert (half.topk_experts.values == full.topk_experts.values).mean() > 0.9


def test_cuda_requested_without_gpus_is_refused_before_the_store(ray_session, tiny, tmp_path):
    from moe_ray import api
    from moe_ray.errors import SpecError

    store = tmp_path / "gpu.zarr"
    with pytest.raises(SpecError, match="no node of the cluster has 1 GPU"):
        api.run(model=str(tiny("mixtral", "scratch").path), analyses=["dynamic"], store=str(store),
                dynamic={"inputs": ["short"], "device": "cuda", "shards": 2}, progress=False)
    assert not store.exists()
    with pytest.raises(SpecError, match="dynamic.dtype must be"):
        api.run(model=str(tiny("mixtral", "scratch").path), analyses=["dynamic"], store=str(store),
                dynamic={"inputs": ["short"], "dtype": "fp8"}, progress=False)


def test_corpus_sequences_each_stored_and_aggregated_by_tokens(ray_session, tiny, tmp_path):
    """A .jsonl corpus: every sequence equals the same text run alone, and the corpus group's D2/D3
    aggregates equal the token-weighted mean / sum over the sequences."""
    import json

    import xarray as xr

    t = tiny("mixtral", "scratch")
    texts = ["As an open source alternative to", "We hold these truths to be self-evident, that all men",
             "When in the Course of human events"]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": x}) for x in texts) + "\n\n")
    store = _run(tmp_path, t.path, "corpus.zarr", inputs=["corpus", "short"], corpus_file=str(corpus), shards=2)
    seqs = [xr.open_zarr(store, group=f"dynamic/corpus/{k}") for k in range(3)]
    alone = xr.open_zarr(store, group="dynamic/short")
    np.testing.assert_array_equal(seqs[0].expert_output_norms.values, alone.expert_output_norms.values)
    agg = xr.open_zarr(store, group="dynamic/corpus")
    n = np.array([s.sizes["token"] for s in seqs], dtype=np.float64)
    expected = sum(w * s.expert_output_angular_mean.values.astype(np.float64) for w, s in zip(n, seqs)) / n.sum()
    np.testing.assert_allclose(agg.expert_output_angular_mean.values, expected, rtol=1e-6)
    np.testing.assert_array_equal(agg.norm_score_rank_counts.values, sum(s.norm_score_rank_counts.values for s in seqs))
    assert agg.attrs["tokens"] == n.sum() and agg.attrs["sequences"] == 3
    assert (agg.norm_score_rank_counts.values.sum(axis=(1, 2)) == 8 * n.sum()).all()


@pytest.mark.parametrize("content, message", [
    ("{\"text\": \"ok\"}\nnot json\n", "line 2 is not JSON"),
    ("{\"txt\": \"ok\"}\n", 'no string "text" field'),
    ("\n\n", "is empty"),
])
def test_bad_corpus_is_refused_before_the_store(ray_session, tiny, tmp_path, content, message):
    from moe_ray.errors import MoeRayError

    corpus = tmp_path / "bad.jsonl"
    corpus.write_text(content)
    with pytest.raises(MoeRayError, match=message):
        _run(tmp_path, tiny("mixtral", "scratch").path, "bad.zarr", inputs=["corpus"], corpus_file=str(corpus))
    assert not (tmp_path / "bad.zarr").exists()
