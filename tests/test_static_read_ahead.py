"""Static's read-ahead (units/static.py `_ReadAhead`): the next matrix kind read on a thread while
one is analysed gives the same results as reading each kind when needed. On a GPU the thread copies
on a stream of its own; the same code runs here on the CPU (no stream)."""
from __future__ import annotations

import numpy as np
import torch

from moe_ray.checkpoint import open_checkpoint
from moe_ray.spec import Spec
from moe_ray.units import static as SU


def test_read_ahead_gives_the_same_layer(tiny, tmp_path):
    ckpt = tiny("mixtral", "upcycled", sigma=0.05, dtype="bfloat16")
    spec = Spec.from_dict({"model": str(ckpt.path), "store": str(tmp_path / "s.zarr"), "analyses": ["static"],
                           "progress": False})
    spec.validate()
    opened = open_checkpoint(ckpt.path)
    plan = SU.plan_job(spec, opened, None, opened.facts.moe_layers).plan
    layer = opened.facts.moe_layers[0]
    sequential, outliers, record = SU._analyse_layer(plan, layer, torch.device("cpu"), read_ahead=False)
    ahead, outliers_ahead, record_ahead = SU._analyse_layer(plan, layer, torch.device("cpu"), read_ahead=True)
    assert record.json() == record_ahead.json() and "model" in record.digests  # the same tensors read
    assert sequential.keys() == ahead.keys()
    for name in sequential:
        np.testing.assert_array_equal(sequential[name], ahead[name], err_msg=name)
    np.testing.assert_array_equal(outliers, outliers_ahead)
    assert np.isfinite(sequential["matrix_similarity"]).any()
