"""Stored formats (`moe_ray.checkpoint.quant`): FP8 E4M3 with block scales and MXFP4 dequantised
exactly (hand-made blocks against a float64 reference written from the formats' definitions, and
against transformers' own CPU dequantisation), the one table of readable formats, slices of fused
tensors, and refusals that name the tensor and its dtype."""
from __future__ import annotations

import json
import math
import shutil

import fsspec
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from moe_ray.checkpoint import open_checkpoint
from moe_ray.checkpoint import quant as Q
from moe_ray.checkpoint.families.base import TensorRef
from moe_ray.errors import CheckpointError


# ---- the formats' value tables, from their bit definitions ------------------------------------

def test_e4m3_reference_decodes_every_byte_like_torch():
    ours = torch.tensor([Q.e4m3_value(c) for c in range(256)], dtype=torch.float64)
    torch_values = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).double()
    assert torch.equal(ours.isnan(), torch_values.isnan()) and int(ours.isnan().sum()) == 2  # S.1111.111
    finite = ~ours.isnan()
    assert torch.equal(ours[finite], torch_values[finite])
    assert Q.e4m3_value(0x7E) == 448.0 and Q.e4m3_value(0x01) == 2.0 ** -9  # max normal, min subnormal


def test_e2m1_reference_matches_the_lookup_table():
    assert [Q.e2m1_value(c) for c in range(16)] == list(Q.E2M1_VALUES)
    assert Q.e2m1_value(0b0011) == 1.5 and Q.e2m1_value(0b1111) == -6.0 and Q.e2m1_value(0b0001) == 0.5


def test_e8m0_factors_are_exact_powers_of_two():
    scales = torch.arange(255, dtype=torch.uint8)
    factors = Q.e8m0_factors(scales).double()
    assert torch.equal(factors, torch.tensor([2.0 ** (s - 127) for s in range(255)], dtype=torch.float64))
    assert Q.e8m0_factors(torch.tensor([255], dtype=torch.uint8)).isnan().all()


# ---- FP8 with 128x128 block scales: hand-made blocks ------------------------------------------

def _fp8_reference(codes: np.ndarray, scales: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    """float64 from the definition: value[i, j] = e4m3(code[i, j]) * scale[i // br, j // bc]."""
    table = np.array([Q.e4m3_value(c) for c in range(256)])
    rows, cols = codes.shape
    out = np.empty((rows, cols))
    for i in range(rows):
        for j in range(cols):
            out[i, j] = table[codes[i, j]] * scales[i // block[0], j // block[1]]
    return out


@pytest.mark.parametrize("shape", [(256, 384), (300, 200), (100, 129)])  # full, partial, smaller than a block
def test_fp8_block_dequantisation_is_exact(shape):
    gen = torch.Generator().manual_seed(sum(shape))
    codes = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0x3C  # no NaN codes
    block = (128, 128)
    nr, nc = math.ceil(shape[0] / 128), math.ceil(shape[1] / 128)
    scales = torch.rand(nr, nc, generator=gen) * 3 + 1e-3  # arbitrary float32 factors, one per block
    weight = codes.view(torch.float8_e4m3fn)
    ref = _fp8_reference(codes.numpy(), scales.double().numpy(), block)
    got64 = Q.dequantize_fp8_blocks(weight, scales, block, torch.float64)
    np.testing.assert_array_equal(got64.numpy(), ref)  # exact
    got32 = Q.dequantize_fp8_blocks(weight, scales, block)
    assert got32.dtype == torch.float32
    np.testing.assert_array_equal(got32.numpy(), ref.astype(np.float32))  # the correctly rounded product
    assert Q.dequantize_fp8_blocks(weight, scales, block, torch.bfloat16).dtype == torch.bfloat16


def test_fp8_block_dequantisation_matches_transformers():
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize, _dequantize_fp8_weight

    gen = torch.Generator().manual_seed(3)
    w = torch.randn(384, 256, generator=gen) * 0.05
    q, scale = Q.quantize_fp8_blocks(w, (128, 128))
    ours = Q.dequantize_fp8_blocks(q, scale, (128, 128))
    theirs = Fp8Dequantize(None)._dequantize_one(q, scale, output_dtype=torch.float32)
    assert torch.equal(ours, theirs)
    partial_q, partial_s = Q.quantize_fp8_blocks(w[:300, :200], (128, 128))  # edge blocks: the other helper
    theirs = _dequantize_fp8_weight(partial_q, partial_s, [128, 128], torch.float32)
    assert torch.equal(Q.dequantize_fp8_blocks(partial_q, partial_s, (128, 128)), theirs)
    assert torch.allclose(ours, w, rtol=0.07, atol=1e-4)  # e4m3 keeps 3 mantissa bits


# ---- MXFP4: hand-made blocks --------------------------------------------------------------------

def _mxfp4_reference(packed: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """float64 from the definition: byte b of block g holds elements 2b (low nibble) and 2b + 1."""
    *lead, groups, nbytes = packed.shape
    out = np.empty((*lead, groups, 2 * nbytes))
    for idx in np.ndindex(*lead, groups):
        factor = 2.0 ** (int(scales[idx]) - 127)
        for b in range(nbytes):
            byte = int(packed[idx + (b,)])
            out[idx + (2 * b,)] = Q.e2m1_value(byte & 0xF) * factor
            out[idx + (2 * b + 1,)] = Q.e2m1_value(byte >> 4) * factor
    return out.reshape(*lead, groups * 2 * nbytes)


def test_mxfp4_dequantisation_is_exact_on_hand_made_blocks():
    gen = torch.Generator().manual_seed(4)
    packed = torch.randint(0, 256, (3, 5, 4, 16), generator=gen, dtype=torch.uint8)
    scales = torch.randint(0, 255, (3, 5, 4), generator=gen, dtype=torch.uint8)
    scales[0, 0, :] = torch.tensor([0, 1, 127, 254], dtype=torch.uint8)  # extremes of the exponent
    ref = _mxfp4_reference(packed.numpy(), scales.numpy())
    np.testing.assert_array_equal(Q.dequantize_mxfp4(packed, scales, torch.float64).numpy(), ref)
    got32 = Q.dequantize_mxfp4(packed, scales)
    in_range = np.abs(ref) < np.finfo(np.float32).max
    np.testing.assert_array_equal(got32.numpy()[in_range], ref[in_range].astype(np.float32))
    assert got32.shape == (3, 5, 128)


def test_mxfp4_dequantisation_matches_transformers():
    from transformers.integrations.mxfp4 import _convert_moe_packed_tensors

    gen = torch.Generator().manual_seed(5)
    packed = torch.randint(0, 256, (2, 6, 3, 16), generator=gen, dtype=torch.uint8)  # [E, rows, G, 16]
    scales = torch.randint(100, 140, (2, 6, 3), generator=gen, dtype=torch.uint8)
    theirs = _convert_moe_packed_tensors(packed, scales, dtype=torch.float32)  # [E, cols, rows]
    assert torch.equal(Q.dequantize_mxfp4(packed, scales), theirs.transpose(1, 2))


def test_quantisers_round_trip_what_they_can_represent():
    gen = torch.Generator().manual_seed(6)
    codes = torch.randint(0, 16, (4, 64), generator=gen)
    x = torch.tensor(Q.E2M1_VALUES)[codes] * 2.0 ** -3  # exactly representable with one scale
    blocks, scales = Q.quantize_mxfp4(x)
    assert torch.equal(Q.dequantize_mxfp4(blocks, scales), x)


# ---- the one table of readable formats ----------------------------------------------------------

class _H:
    def __init__(self, dtype, shape):
        self.dtype, self.shape = dtype, tuple(shape)


def test_logical_layout_folds_companions_and_refuses_the_rest():
    layout = Q.logical_layout({
        "a.weight": _H("BF16", (4, 4)),
        "b.weight": _H("F8_E4M3", (300, 200)), "b.weight_scale_inv": _H("F32", (3, 2)),
        "c.gate_up_proj_blocks": _H("U8", (2, 8, 3, 16)), "c.gate_up_proj_scales": _H("U8", (2, 8, 3)),
        "d.weight": _H("I8", (4, 4)),
        "e.weight": _H("F8_E4M3", (4, 4)),  # no scales
        "f.weight": _H("F8_E4M3", (300, 200)), "f.weight_scale_inv": _H("F32", (2, 2)),  # wrong grid
    }, {"quant_method": "fp8", "weight_block_size": [128, 128]})
    assert set(layout) == {"a.weight", "b.weight", "c.gate_up_proj", "d.weight", "e.weight", "f.weight"}
    assert layout["b.weight"].format == "fp8_block" and layout["b.weight"].parts == ("b.weight", "b.weight_scale_inv")
    assert layout["c.gate_up_proj"].format == "mxfp4" and layout["c.gate_up_proj"].shape == (2, 96, 8)
    assert layout["d.weight"].format == "refused" and "stored as I8" in layout["d.weight"].refusal
    assert "without its e.weight_scale_inv" in layout["e.weight"].refusal
    assert "does not match 128x128 blocks" in layout["f.weight"].refusal


@pytest.fixture
def int8_expert(tiny, tmp_path):
    """A tiny Mixtral whose layer-1 expert-2 W_up is stored as int8 (a quantised format moe-ray does
    not know, without any scale): it used to be read as if it were float."""
    dst = tmp_path / "int8"
    shutil.copytree(tiny("mixtral", "scratch").path, dst)
    ckpt = open_checkpoint(dst)
    key = ckpt.family.expert_keys(1, 2)["up"]
    shard = ckpt.info(key).file
    tensors = load_file(shard)
    tensors[key] = (tensors[key].float() * 1000).round().clamp(-127, 127).to(torch.int8)
    save_file(tensors, shard, metadata={"format": "pt"})
    return dst, key


def test_an_int8_expert_is_refused_with_tensor_and_dtype(int8_expert):
    path, key = int8_expert
    ckpt = open_checkpoint(path)  # opening is fine: a run that never reads it is not stopped
    for attempt in (lambda: ckpt.read(key), lambda: ckpt.require([key], "layer 1")):
        with pytest.raises(CheckpointError, match=rf"tensor {key} is stored as I8, which moe-ray cannot analyse: a "
                           "quantised or integer format"):
            attempt()


def test_an_int8_expert_stops_the_run_before_the_store(int8_expert, tmp_path, capsys):
    from moe_ray.cli import main

    path, key = int8_expert
    store = tmp_path / "out.zarr"
    assert main(["run", "--model", str(path), "--analyses", "static", "--store", str(store)]) == 2
    err = capsys.readouterr().err
    assert f"moe-ray: error: tensor {key} (layer 1 expert 2 up) is stored as I8, which moe-ray cannot analyse" in err
    assert not store.exists()


# ---- slices of fused tensors --------------------------------------------------------------------

def _fused_checkpoint(path, fused: dict[str, torch.Tensor]):
    path.mkdir()
    save_file(fused, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"model_type": "mixtral", "num_hidden_layers": 1,
                                                  "hidden_size": 8, "intermediate_size": 4,
                                                  "num_local_experts": 3, "num_experts_per_tok": 1}))
    return path


def test_tensor_refs_read_one_expert_and_matrix_of_fused_tensors(tmp_path):
    gen = torch.Generator().manual_seed(7)
    gate_up = torch.randn(3, 8, 10, generator=gen)  # Llama 4's [E, H, 2·d_mid]
    mx = torch.tensor(Q.E2M1_VALUES)[torch.randint(0, 16, (3, 10, 64), generator=gen)] / 4  # stored [E, rows, H]
    blocks, scales = Q.quantize_mxfp4(mx)
    path = _fused_checkpoint(tmp_path / "fused", {
        "x.gate_up_proj": gate_up, "y.gate_up_proj_blocks": blocks, "y.gate_up_proj_scales": scales})
    ckpt = open_checkpoint(path)
    gate_ref = TensorRef("x.gate_up_proj", (1, (None, None, None), (0, 5, None)), transpose=True)
    assert str(gate_ref) == "x.gate_up_proj[1, :, 0:5].T" and ckpt.info(gate_ref).shape == (5, 8)
    assert torch.equal(ckpt.read(gate_ref), gate_up[1, :, :5].T)
    # logical: transformers' [E, H, rows]; gpt-oss's up rows are the odd columns there
    assert ckpt.info("y.gate_up_proj").shape == (3, 64, 10) and ckpt.info("y.gate_up_proj").dtype == "MXFP4"
    assert torch.equal(ckpt.read("y.gate_up_proj"), mx.transpose(1, 2))
    odd_rows = TensorRef("y.gate_up_proj", (2, (None, None, None), (1, None, 2)), transpose=True)
    assert ckpt.info(odd_rows).shape == (5, 64)
    assert torch.equal(ckpt.read(odd_rows), mx[2, 1::2])
    assert torch.equal(ckpt.read(odd_rows, dtype=torch.float64), mx[2, 1::2].double())
    fs = fsspec.filesystem("memory")  # the same pieces from a remote store: byte ranges of one expert
    for f in path.iterdir():
        fs.pipe(f"/fused/{f.name}", f.read_bytes())
    remote = open_checkpoint("memory://fused")
    assert torch.equal(remote.read(gate_ref), gate_up[1, :, :5].T)
    assert torch.equal(remote.read(odd_rows), mx[2, 1::2])
