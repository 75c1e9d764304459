"""Which stored formats moe-ray can analyse, and their exact dequantisation (the one place for both).

A checkpoint's *logical* tensors are what the family adapters name; each is stored in one format:

- ``float``: BF16, F16, F32 or F64, read as stored and converted.
- ``fp8_block`` (DeepSeek-V3/R1, ``quantization_config.quant_method = "fp8"``): ``<name>`` in F8_E4M3
  beside ``<name>_scale_inv`` (F32, BF16 or F16) holding one factor per block of
  ``weight_block_size`` (128 x 128) rows x columns of the last two dims; edge blocks may be partial.
  value[i, j] = e4m3(w[i, j]) * scale_inv[i // block_rows, j // block_cols].
- ``mxfp4`` (gpt-oss, OCP Microscaling): ``<name>_blocks`` U8 [..., R, G, 16] holding 32 E2M1 values
  per block, two per byte, the low nibble first, beside ``<name>_scales`` U8 [..., R, G] (E8M0:
  2^(s - 127)); value = e2m1(nibble) * 2^(s - 127). The stored rows are output features ([..., R, C],
  C = G * 32); the logical tensor ``<name>`` is what transformers' gpt-oss model holds, its transpose
  [..., C, R] (the layout a BF16 gpt-oss checkpoint stores), so an adapter addresses both alike.

Anything else a run would read (I8/U8 weights, F8 without its scales, F8_E5M2, a blocks tensor without
its scales) is refused with the tensor and its dtype named: never read as if it were float.

Dequantisation is exact: in float64 every value is the format's value; in float32 every value is that
value correctly rounded (FP8: the one rounding of the product of two floats; MXFP4: exact, since
2^(s - 127) is built bit by bit and an E2M1 value has two significant bits). It runs on the device the
stored bytes were moved to, in place over whole blocks: its memory is the output plus, on the CPU, one
int32 code per stored byte for the table lookup (never a layer).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from ..lazy import torch  # imported on first use (moe-ray plan needs none)

class _TorchDtypes(Mapping):
    """safetensors float dtype name -> torch dtype, torch looked up only when a value is asked for."""

    _NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}

    def __getitem__(self, key: str) -> "torch.dtype":
        return getattr(torch, self._NAMES[key])

    def __iter__(self):
        return iter(self._NAMES)

    def __len__(self) -> int:
        return len(self._NAMES)


FLOAT_DTYPES: Mapping[str, "torch.dtype"] = _TorchDtypes()
FP8_DTYPE = "F8_E4M3"
FP8_SCALE_SUFFIX = "_scale_inv"
FP8_SCALE_DTYPES = ("F32", "BF16", "F16")
FP8_DEFAULT_BLOCK = (128, 128)
FP8_MAX = 448.0
MX_BLOCKS, MX_SCALES = "_blocks", "_scales"
MX_BLOCK = 32
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
"""E2M1 by its 4-bit code (sign bit 3, exponent bits 2-1 with bias 1, mantissa bit 0)."""

READABLE = ("BF16, F16, F32, F64; F8_E4M3 with its per-block weight_scale_inv (DeepSeek-V3 FP8); "
            "MXFP4 *_blocks + *_scales (gpt-oss)")


class HeaderEntry(Protocol):
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Stored:
    """How one logical tensor is stored: its format, logical (dequantised) shape and physical parts."""

    name: str
    format: str  # "float" | "fp8_block" | "mxfp4" | "refused"
    shape: tuple[int, ...]
    parts: tuple[str, ...]  # (key,) | (weight, weight_scale_inv) | (blocks, scales)
    dtype: str  # the header dtype of the first part
    block: tuple[int, ...] = ()  # fp8: (rows, cols); mxfp4: (32,)
    refusal: str | None = None

    @property
    def label(self) -> str:
        """The stored format as people name it (recorded in stores and plans)."""
        if self.format == "fp8_block":
            return f"FP8 E4M3, {self.block[0]}x{self.block[1]} blocks (weight_scale_inv)"
        if self.format == "mxfp4":
            return "MXFP4 (E2M1, 32-value blocks, E8M0 scales)"
        return self.dtype


def fp8_block_size(quantization_config: dict | None) -> tuple[int, int]:
    """weight_block_size of an fp8 quantization_config (DeepSeek-V3: [128, 128])."""
    size = (quantization_config or {}).get("weight_block_size") or FP8_DEFAULT_BLOCK
    return int(size[0]), int(size[1])


def is_fp8_config(config: dict) -> bool:
    q = config.get("quantization_config") or {}
    return q.get("quant_method") == "fp8"


def _refused(name: str, dtype: str, shape: tuple[int, ...], why: str) -> Stored:
    return Stored(name, "refused", shape, (name,), dtype,
                  refusal=f"is stored as {dtype}, which moe-ray cannot analyse: {why} (it reads {READABLE})")


def classify(key: str, tensors: Mapping[str, HeaderEntry], quantization_config: dict | None = None) -> Stored | None:
    """How logical tensor `key` is stored, from the headers of every tensor (`tensors`), so that a
    quantised tensor is judged together with its companions; None when `key` is itself a companion
    (a weight's scales, an MXFP4 tensor's blocks or scales), which is read as part of its owner.
    The one place that decides what moe-ray can analyse: everything else is `refused`."""
    info = tensors.get(key)
    if info is None:  # an MXFP4 tensor is named without its _blocks / _scales suffixes
        blocks, scales = tensors.get(key + MX_BLOCKS), tensors.get(key + MX_SCALES)
        return _mxfp4(key, key + MX_BLOCKS, blocks, scales) if blocks is not None and scales is not None else None
    dtype, shape = info.dtype, tuple(info.shape)
    if key.endswith(FP8_SCALE_SUFFIX):
        owner = tensors.get(key[: -len(FP8_SCALE_SUFFIX)])
        if owner is not None and owner.dtype == FP8_DTYPE:
            return None
    for suffix, other in ((MX_SCALES, MX_BLOCKS), (MX_BLOCKS, MX_SCALES)):
        if key.endswith(suffix) and key[: -len(suffix)] + other in tensors:
            return None
    if dtype in FLOAT_DTYPES:
        return Stored(key, "float", shape, (key,), dtype)
    if dtype == FP8_DTYPE:
        scale = tensors.get(key + FP8_SCALE_SUFFIX)
        if scale is None:
            return _refused(key, dtype, shape, f"FP8 without its {key + FP8_SCALE_SUFFIX} (the per-block "
                            "scales it needs to be read exactly)")
        return _fp8(key, info, key + FP8_SCALE_SUFFIX, scale, fp8_block_size(quantization_config))
    return _refused(key, dtype, shape, "a quantised or integer format it does not know how to dequantise, "
                    "and never reads as if it were float")


def logical_layout(tensors: Mapping[str, HeaderEntry], quantization_config: dict | None = None) -> dict[str, Stored]:
    """Every logical tensor of a checkpoint from its safetensors headers (`classify` each): scale and
    block companions are folded into the tensor they belong to; formats moe-ray cannot read are kept
    as `refused` (raised when a run needs them, so tensors a run never reads do not stop it)."""
    out: dict[str, Stored] = {}
    for key in tensors:
        if key.endswith(MX_BLOCKS) and key[: -len(MX_BLOCKS)] + MX_SCALES in tensors:
            key = key[: -len(MX_BLOCKS)]
        stored = classify(key, tensors, quantization_config)
        if stored is not None:
            out[key] = stored
    return out


def _fp8(name: str, info: HeaderEntry, scale_key: str, scale: HeaderEntry, block: tuple[int, int]) -> Stored:
    shape = tuple(info.shape)
    if len(shape) < 2:
        return _refused(name, info.dtype, shape, f"FP8 of shape {list(shape)} (block scales need a matrix)")
    rows, cols = shape[-2:]
    want = (*shape[:-2], math.ceil(rows / block[0]), math.ceil(cols / block[1]))
    if scale.dtype not in FP8_SCALE_DTYPES or tuple(scale.shape) != want:
        return _refused(name, info.dtype, shape,
                        f"FP8 whose {scale_key} {scale.dtype}{list(scale.shape)} does not match "
                        f"{block[0]}x{block[1]} blocks ({list(want)} float scales expected)")
    return Stored(name, "fp8_block", shape, (name, scale_key), info.dtype, block)


def _mxfp4(name: str, blocks_key: str, blocks: HeaderEntry, scales: HeaderEntry) -> Stored:
    bshape, sshape = tuple(blocks.shape), tuple(scales.shape)
    if (blocks.dtype != "U8" or scales.dtype != "U8" or len(bshape) < 3 or bshape[-1] != MX_BLOCK // 2
            or sshape != bshape[:-1]):
        return _refused(blocks_key, f"{blocks.dtype}{list(bshape)}", bshape,
                        f"beside {name + MX_SCALES} {scales.dtype}{list(sshape)} it is not MXFP4 "
                        f"(U8 blocks [..., R, G, 16] and U8 scales [..., R, G])")
    return Stored(name, "mxfp4", (*bshape[:-3], bshape[-2] * MX_BLOCK, bshape[-3]), (blocks_key, name + MX_SCALES),
                  "MXFP4", (MX_BLOCK,))


# ---- dequantisation ------------------------------------------------------------------------------

def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def e4m3_to(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """e4m3 -> float32/float64, exact either way. On the CPU through a 256-entry table of torch's own
    conversions (torch's elementwise CPU cast is ~3x slower); elsewhere torch's cast."""
    if weight.device.type != "cpu":
        return weight.to(dtype)
    table = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).to(dtype)
    codes = weight.contiguous().view(torch.uint8).reshape(-1).to(torch.int32)
    return torch.index_select(table, 0, codes).reshape(weight.shape)


def dequantize_fp8_blocks(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
                          dtype: torch.dtype | None = None) -> torch.Tensor:
    """[..., R, C] e4m3 weights times their [..., ceil(R/br), ceil(C/bc)] block scales, as `dtype`.

    Products are taken in float32 (float64 when asked), in place, one row block of scales at a time
    spread along the columns ([..., ceil(R/br), C]: a row's worth of scales, never the weight's size)."""
    dtype = torch.float32 if dtype is None else dtype
    compute = _compute_dtype(dtype)
    out = e4m3_to(weight, compute)
    rows, cols = out.shape[-2:]
    br, bc = block
    per_column = scale_inv.to(device=out.device, dtype=compute).repeat_interleave(bc, dim=-1)[..., :cols]
    full = rows // br
    if full:
        out[..., : full * br, :].unflatten(-2, (full, br)).mul_(per_column[..., :full, None, :])
    if full * br < rows:  # bottom edge: a partial row block
        out[..., full * br:, :].mul_(per_column[..., full:full + 1, :])
    return out if out.dtype == dtype else out.to(dtype)


def e8m0_factors(scales: torch.Tensor) -> torch.Tensor:
    """E8M0 bytes -> float32 2^(s - 127), built from the bits (s is exactly float32's exponent field):
    s = 0 gives the subnormal 2^-127, s = 255 NaN (the format's only special value)."""
    s = scales.to(torch.int32)
    bits = torch.where(s == 0, torch.full_like(s, 0x00400000), s << 23)
    bits = torch.where(s == 255, torch.full_like(s, 0x7FC00000), bits)
    return bits.view(torch.float32)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """MXFP4 U8 blocks [..., G, 16] and U8 E8M0 scales [..., G] -> [..., G * 32] as `dtype`: each byte
    looked up once in a 256 x 2 table of its (low nibble, high nibble) values, times its block's 2^(s - 127)."""
    dtype = torch.float32 if dtype is None else dtype
    compute = _compute_dtype(dtype)
    pairs = torch.tensor([[E2M1_VALUES[b & 0x0F], E2M1_VALUES[b >> 4]] for b in range(256)], dtype=compute,
                         device=blocks.device)
    codes = blocks.to(torch.uint8).contiguous()
    out = torch.index_select(pairs, 0, codes.reshape(-1).to(torch.int32)).reshape(*codes.shape[:-1], MX_BLOCK)
    out.mul_(e8m0_factors(scales.to(blocks.device)).to(compute)[..., None])
    out = out.flatten(-2)
    return out if out.dtype == dtype else out.to(dtype)


# ---- quantisation (make-tiny writes checkpoints in these formats) ---------------------------------

def quantize_fp8_blocks(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """A float matrix [..., R, C] as (e4m3 weights, float32 scale_inv per block): scale = amax / 448."""
    w = weight.float()
    rows, cols = w.shape[-2:]
    br, bc = block
    nr, nc = math.ceil(rows / br), math.ceil(cols / bc)
    padded = torch.zeros((*w.shape[:-2], nr * br, nc * bc))
    padded[..., :rows, :cols] = w
    tiles = padded.unflatten(-1, (nc, bc)).unflatten(-3, (nr, br))  # [..., nr, br, nc, bc]
    amax = tiles.abs().amax(dim=(-3, -1))
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (tiles / scale[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX)
    q = q.flatten(-2).flatten(-3, -2)[..., :rows, :cols]
    return q.to(torch.float8_e4m3fn).contiguous(), scale.float().contiguous()


def quantize_mxfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A float tensor [..., C] (C a multiple of 32) as MXFP4 (U8 blocks [..., C/32, 16], U8 scales
    [..., C/32]): the OCP shared exponent floor(log2(amax)) - 2, values rounded to the nearest E2M1."""
    w = weight.float().unflatten(-1, (-1, MX_BLOCK))
    amax = w.abs().amax(dim=-1)
    exponent = torch.where(amax > 0, torch.floor(torch.log2(amax.clamp_min(1e-38))) - 2, torch.full_like(amax, -127))
    exponent = exponent.clamp(-127, 127)
    scaled = w / torch.exp2(exponent)[..., None]
    magnitudes = torch.tensor(E2M1_VALUES[:8])
    code = (scaled.abs()[..., None] - magnitudes).abs().argmin(dim=-1)  # nearest magnitude (saturates at 6)
    code = code + 8 * (scaled < 0).long() * (code > 0).long()
    packed = (code[..., 0::2] | (code[..., 1::2] << 4)).to(torch.uint8)
    return packed.contiguous(), (exponent + 127).to(torch.uint8).contiguous()


# ---- references written from the formats' definitions (tests compare the fast paths to these) -----

def e4m3_value(code: int) -> float:
    """The float64 value of one FP8 E4M3 (fn) byte: sign bit 7, exponent bits 6-3 (bias 7), mantissa
    bits 2-0; exponent 0 is subnormal; S.1111.111 is NaN (the format has no infinities)."""
    sign = -1.0 if code & 0x80 else 1.0
    exponent, mantissa = (code >> 3) & 0x0F, code & 0x07
    if exponent == 0x0F and mantissa == 0x07:
        return math.nan
    if exponent == 0:
        return sign * (mantissa / 8) * 2.0 ** -6
    return sign * (1 + mantissa / 8) * 2.0 ** (exponent - 7)


def e2m1_value(code: int) -> float:
    """The float64 value of one E2M1 nibble: sign bit 3, exponent bits 2-1 (bias 1), mantissa bit 0."""
    sign = -1.0 if code & 0x8 else 1.0
    exponent, mantissa = (code >> 1) & 0x3, code & 0x1
    if exponent == 0:
        return sign * mantissa * 0.5
    return sign * (1 + mantissa / 2) * 2.0 ** (exponent - 1)



# ---- the on-disk layout of each format (make-tiny writes it, `moe-ray plan` sizes it) --------------

DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
               "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
"""Bytes per element of the safetensors dtypes (a header entry's byte range must match its shape)."""
TORCH_NAMES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32", "float64": "F64"}


def stored_parts(name: str, shape: tuple[int, ...], fmt: str, float_dtype: str = "BF16",
                 block: tuple[int, int] = FP8_DEFAULT_BLOCK) -> dict[str, tuple[tuple[int, ...], str]]:
    """The physical tensors (shape, dtype) that hold logical tensor `name` of `shape` in format `fmt`."""
    if fmt == "float":
        return {name: (tuple(shape), float_dtype)}
    if fmt == "fp8_block":
        rows, cols = shape[-2:]
        scale = (*shape[:-2], math.ceil(rows / block[0]), math.ceil(cols / block[1]))
        return {name: (tuple(shape), FP8_DTYPE), name + FP8_SCALE_SUFFIX: (scale, "F32")}
    if fmt == "mxfp4":  # logical [..., C, R] is stored as rows R of C / 32 blocks
        groups, rows = shape[-2] // MX_BLOCK, shape[-1]
        return {name + MX_BLOCKS: ((*shape[:-2], rows, groups, MX_BLOCK // 2), "U8"),
                name + MX_SCALES: ((*shape[:-2], rows, groups), "U8")}
    raise ValueError(f"unknown storage format {fmt!r}")


def encode(name: str, tensor: torch.Tensor, fmt: str, float_dtype: torch.dtype | None = None,
           block: tuple[int, int] = FP8_DEFAULT_BLOCK) -> dict[str, torch.Tensor]:
    """A float tensor as the physical tensors of format `fmt` (the inverse of reading it); floats as
    `float_dtype` (default bfloat16)."""
    float_dtype = torch.bfloat16 if float_dtype is None else float_dtype
    if fmt == "float":
        return {name: tensor.to(float_dtype)}
    if fmt == "fp8_block":
        q, scale = quantize_fp8_blocks(tensor, block)
        return {name: q, name + FP8_SCALE_SUFFIX: scale}
    if fmt == "mxfp4":
        blocks, scales = quantize_mxfp4(tensor.transpose(-1, -2))
        return {name + MX_BLOCKS: blocks, name + MX_SCALES: scales}
    raise ValueError(f"unknown storage format {fmt!r}")


__all__ = ["DTYPE_BYTES", "FLOAT_DTYPES", "READABLE", "Stored", "classify", "dequantize_fp8_blocks", "dequantize_mxfp4",
           "e2m1_value", "e4m3_value", "e8m0_factors", "encode", "fp8_block_size", "is_fp8_config",
           "logical_layout", "quantize_fp8_blocks", "quantize_mxfp4", "stored_parts"]
