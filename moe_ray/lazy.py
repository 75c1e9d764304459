"""torch, imported on first use: modules that a torch-free command also needs (the family adapters'
config arithmetic for `moe-ray plan`, the sizing formulas) say `from ..lazy import torch` instead of
`import torch`, so importing them costs nothing until a tensor is touched (torch takes seconds to import).

Annotations are strings in these modules (`from __future__ import annotations`); module-level code
must not touch `torch.<name>` (defaults included), or the import happens there after all.
"""
from __future__ import annotations

import importlib
import types
from typing import Any


class LazyModule(types.ModuleType):
    """A stand-in for a module that imports it on the first attribute asked of it."""

    def __getattr__(self, name: str) -> Any:
        module = importlib.import_module(self.__name__)
        return getattr(module, name)


torch = LazyModule("torch")

__all__ = ["LazyModule", "torch"]
