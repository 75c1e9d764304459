"""Edits of a tiny checkpoint's tensors in place, as a broken download or a user's edit would leave them."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from moe_ray.checkpoint import open_checkpoint


def set_tensor_value(model: Path, key: str, index: tuple[int, ...], value: float) -> tuple[str, dict]:
    """Set one value of tensor `key` of the checkpoint at `model` (rewriting its shard); returns the shard's
    path and its original tensors, so that a test can write them back (`save_file(original, shard, ...)`)."""
    shard = open_checkpoint(model).info(key).file
    original = load_file(shard)
    edited = dict(original)
    edited[key] = original[key].clone()
    edited[key][index] = torch.tensor(value, dtype=edited[key].dtype)
    save_file(edited, shard, metadata={"format": "pt"})
    return shard, original
