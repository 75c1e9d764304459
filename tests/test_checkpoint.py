"""Checkpoint reading and family adapters: the right tensors, layers and experts for every family,
detection from real-style configs, and a clear error for every kind of bad checkpoint."""
from __future__ import annotations

import json
import os
import shutil

import fsspec
import pytest
import torch
from safetensors.torch import load_file

from moe_ray.checkpoint import detect_family, get_family, open_checkpoint
from moe_ray.checkpoint.tiny import make_tiny
from moe_ray.errors import CheckpointError

# family -> (MoE layers, E, key of layer 1 / expert 2 / matrix "up", router key of layer 1,
#            shared-expert "down" key of layer 1 or None)
EXPECTED = {
    "mixtral": ((0, 1, 2, 3), 8, "model.layers.1.block_sparse_moe.experts.2.w3.weight",
                "model.layers.1.block_sparse_moe.gate.weight", None),
    "deepseek_moe": ((1, 2, 3), 64, "model.layers.1.mlp.experts.2.up_proj.weight",
                     "model.layers.1.mlp.gate.weight", "model.layers.1.mlp.shared_experts.down_proj.weight"),
    "grok1": ((0, 1, 2, 3), 8, "model.layers.1.moe_block.experts.2.linear_v.weight",
              "model.layers.1.moe_block.gate.weight", None),
    "qwen2_moe": ((0, 1, 2, 3), 16, "model.layers.1.mlp.experts.2.up_proj.weight",
                  "model.layers.1.mlp.gate.weight", "model.layers.1.mlp.shared_expert.down_proj.weight"),
    "olmoe": ((0, 1, 2, 3), 64, "model.layers.1.mlp.experts.2.up_proj.weight",
              "model.layers.1.mlp.gate.weight", None),
}


def _all_tensors(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_family_reads_the_right_tensors(tiny, family):
    layers, n_experts, up_key, router_key, shared_down = EXPECTED[family]
    ck = tiny(family, "scratch")
    assert (ck.path / "model.safetensors.index.json").exists()
    assert len(list(ck.path.glob("model-*.safetensors"))) > 1  # the index path, several shards
    ckpt = open_checkpoint(ck.path)
    assert ckpt.family.name == family
    assert ckpt.facts.moe_layers == layers and ckpt.facts.num_experts == n_experts
    adapter = ckpt.family
    assert adapter.expert_keys(1, 2)["up"] == up_key
    assert adapter.router_weight_key(1) == router_key
    shared = adapter.shared_expert_keys(1)
    assert (shared["down"] if shared else None) == shared_down
    raw = _all_tensors(ck.path)
    got = ckpt.read(up_key)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, raw[up_key].float(), rtol=0, atol=0)
    d_mid, d_hid = ckpt.facts.d_mid, ckpt.facts.d_hid
    assert got.shape == (d_mid, d_hid)
    assert ckpt.read(adapter.expert_keys(1, 2)["down"]).shape == (d_hid, d_mid)


def test_deepseek_dense_first_layer_is_not_moe(tiny):
    ckpt = open_checkpoint(tiny("deepseek_moe", "scratch").path)
    assert 0 not in ckpt.facts.moe_layers
    assert "model.layers.0.mlp.gate_proj.weight" in ckpt and "model.layers.0.mlp.experts.0.up_proj.weight" not in ckpt
    assert ckpt.facts.shared_d_mid == 2 * 32 and ckpt.facts.dense_d_mid == 256


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_every_stored_dtype_is_read_as_float32(tmp_path, dtype):
    ck = make_tiny("mixtral", "scratch", tmp_path / dtype, dtype=dtype)
    ckpt = open_checkpoint(ck.path)
    key = ckpt.family.expert_keys(0, 0)["gate"]
    assert ckpt.info(key).dtype == {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}[dtype]
    assert ckpt.read(key).dtype == torch.float32
    assert ckpt.read(key, dtype=torch.float64).dtype == torch.float64


def test_make_tiny_is_deterministic_by_seed(tmp_path):
    a = make_tiny("mixtral", "permuted", tmp_path / "a", seed=7)
    b = make_tiny("mixtral", "permuted", tmp_path / "b", seed=7)
    c = make_tiny("mixtral", "permuted", tmp_path / "c", seed=8)
    key = "model.layers.2.block_sparse_moe.experts.3.w1.weight"
    ra, rb, rc = (open_checkpoint(x.path).read(key) for x in (a, b, c))
    assert torch.equal(ra, rb) and not torch.equal(ra, rc)
    assert a.planted == b.planted


def test_permuted_variant_plants_exact_neuron_permutations(tiny):
    ck = tiny("mixtral", "permuted")
    ckpt = open_checkpoint(ck.path)
    planted = json.loads((ck.path / "moe_ray_tiny.json").read_text())["permuted"]
    entry = planted["1"]["3"]
    perm = torch.tensor(entry["perm"])
    src, dst = ckpt.family.expert_keys(1, entry["source"]), ckpt.family.expert_keys(1, 3)
    assert torch.equal(ckpt.read(dst["up"]), ckpt.read(src["up"])[perm])
    assert torch.equal(ckpt.read(dst["down"]), ckpt.read(src["down"])[:, perm])


def test_fsspec_url_reads_the_same_tensors(tiny):
    ck = tiny("mixtral", "scratch")
    fs = fsspec.filesystem("memory")
    for f in ck.path.iterdir():
        if f.is_file():
            fs.pipe(f"/tinyckpt/{f.name}", f.read_bytes())
    remote = open_checkpoint("memory://tinyckpt")
    local = open_checkpoint(ck.path)
    key = local.family.expert_keys(3, 5)["down"]
    torch.testing.assert_close(remote.read(key), local.read(key), rtol=0, atol=0)
    assert remote.facts == local.facts


def test_prefetch_asks_for_exactly_each_tensors_bytes(tiny, monkeypatch):
    ck = open_checkpoint(tiny("mixtral", "scratch", dtype="bfloat16").path)
    keys = [*ck.family.expert_keys(2, 1).values(), ck.family.router_weight_key(2)]
    calls = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, offset, length, advice: calls.append(
        (os.readlink(f"/proc/self/fd/{fd}"), offset, length, advice)))
    ck.prefetch(keys)
    assert len(calls) == len(keys) and {c[3] for c in calls} == {os.POSIX_FADV_WILLNEED}
    for key, (file, offset, length, _) in zip(keys, calls):
        raw = open(file, "rb").read()[offset:offset + length]  # the range holds exactly this tensor
        stored = torch.frombuffer(bytearray(raw), dtype=torch.bfloat16).reshape(ck.info(key).shape)
        assert torch.equal(stored.float(), ck.read(key))


# ---- detection from real-style configs ------------------------------------------------------

def test_detects_real_grok_config_without_model_type():
    cfg = dict(get_family("grok1").flavors["314B"])
    assert "model_type" not in cfg
    assert detect_family(cfg).name == "grok1"
    facts = detect_family(cfg).facts(cfg)
    assert (facts.num_layers, facts.num_experts, facts.d_mid, facts.d_hid, facts.activation) == (64, 8, 32768, 6144, "gelu")


def test_detects_deepseek_by_model_type_and_reads_its_quirks():
    cfg = dict(get_family("deepseek_moe").flavors["16B"])
    cfg.pop("architectures")
    family = detect_family(cfg)
    facts = family.facts(cfg)
    assert family.name == "deepseek_moe"
    assert facts.moe_layers == tuple(range(1, 28)) and facts.num_experts == 64 and facts.top_k == 6
    assert facts.shared_d_mid == 2816


def test_mixtral_repack_spelling_num_experts_and_key_only_detection():
    cfg = dict(get_family("mixtral").flavors["8x7B"])
    cfg["num_experts"] = cfg.pop("num_local_experts")
    assert detect_family(cfg).facts(cfg).num_experts == 8
    bare = {k: v for k, v in cfg.items() if k not in ("architectures", "model_type")}
    assert detect_family(bare, ["model.layers.0.block_sparse_moe.experts.0.w1.weight"]).name == "mixtral"


def test_unknown_layout_names_what_it_saw():
    with pytest.raises(CheckpointError, match=r"architectures=\['FooForCausalLM'\], model_type='foo'"):
        detect_family({"architectures": ["FooForCausalLM"], "model_type": "foo"}, ["x.weight"])


# ---- bad checkpoints ----------------------------------------------------------------------------

@pytest.fixture
def copy_of(tiny, tmp_path):
    def make(family="mixtral", variant="scratch"):
        dst = tmp_path / "broken"
        shutil.copytree(tiny(family, variant).path, dst)
        return dst
    return make


def test_missing_directory():
    with pytest.raises(CheckpointError, match="checkpoint directory not found"):
        open_checkpoint("/nonexistent/moe")


def test_missing_shard(copy_of):
    path = copy_of()
    victim = sorted(path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"missing shard {victim.name}"):
        open_checkpoint(path)


def test_truncated_shard(copy_of):
    path = copy_of()
    victim = sorted(path.glob("model-*.safetensors"))[0]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=f"truncated or corrupted safetensors file {victim.name}"):
        open_checkpoint(path)


def test_corrupted_header(copy_of):
    path = copy_of()
    victim = sorted(path.glob("model-*.safetensors"))[0]
    data = bytearray(victim.read_bytes())
    data[8:20] = b"\xff" * 12
    victim.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"corrupted safetensors file {victim.name}"):
        open_checkpoint(path)


def test_tensor_missing_from_its_shard(copy_of):
    path = copy_of()
    index = json.loads((path / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.block_sparse_moe.experts.9.w1.weight"] = "model-00001-of-%05d.safetensors" % len(
        list(path.glob("model-*.safetensors")))
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="experts.9.w1.weight is listed in model.safetensors.index.json"):
        open_checkpoint(path)


def test_tensor_missing_from_the_index(copy_of):
    path = copy_of()
    ckpt = open_checkpoint(path)
    with pytest.raises(CheckpointError, match="tensor model.layers.9.mlp.up_proj.weight is missing"):
        ckpt.read("model.layers.9.mlp.up_proj.weight")


def test_pickle_only_checkpoint_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    torch.save({"w": torch.zeros(2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="only pickle weights"):
        open_checkpoint(tmp_path)


@pytest.mark.parametrize("values, bad", [
    ((float("nan"),), 1),
    ((float("inf"), float("-inf")), 2),  # opposite infinities: the sum is NaN, still caught
    ((3e38, 3e38), 0),  # huge but finite: the similarities would be NaN (issue 23): refused as too large
    ((1e15, 1e15), None),  # large, yet its squared norm fits float32: fine
])
def test_nan_and_inf_weights_are_reported(copy_of, values, bad):
    path = copy_of()
    ckpt = open_checkpoint(path)
    key = ckpt.family.expert_keys(0, 1)["up"]
    shard = ckpt.info(key).file
    tensors = load_file(shard)
    for i, v in enumerate(values):
        tensors[key][0, i] = v
    from safetensors.torch import save_file
    save_file(tensors, shard, metadata={"format": "pt"})
    if bad:
        with pytest.raises(CheckpointError, match=f"tensor {key} .* has {bad} NaN/Inf values"):
            open_checkpoint(path).read(key)
    elif bad == 0:
        with pytest.raises(CheckpointError, match=f"tensor {key} .* holds values too large to analyse"):
            open_checkpoint(path).read(key)
    else:
        assert open_checkpoint(path).read(key)[0, 0].item() == pytest.approx(1e15, rel=1e-2)  # stored as bf16
