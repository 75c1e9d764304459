"""Checkpoints: lazy per-tensor safetensors reads (local or fsspec) and weight fingerprints
(`reader`), the stored formats moe-ray reads and their exact dequantisation (`quant`), config.json's
typed schema (`config`), the check of every tensor a job reads from the headers alone (`validate`),
model family adapters, and `make-tiny` test checkpoints in the real hub layout."""
from .families import FAMILIES, MATRICES, Family, ModelFacts, TensorRef, detect_family, get_family


def __getattr__(name: str):
    """`Checkpoint` and `open_checkpoint` from `reader`, imported on first use: the families and
    config parsing (what `moe-ray plan` needs) import neither torch nor safetensors."""
    if name in ("Checkpoint", "open_checkpoint"):
        from . import reader

        return getattr(reader, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["FAMILIES", "MATRICES", "Checkpoint", "Family", "ModelFacts", "TensorRef", "detect_family", "get_family",
           "open_checkpoint"]
