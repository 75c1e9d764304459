"""Expert coordinates as xarray users expect them (schema 2): integer codes, F = -1, SE = -2, the labels
beside them; plotting reads labels through one function, for old stores too. (The whole view, with a
to_netcdf round trip of every group of a demo-like store: tests/test_service.py.)"""
from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
import zarr

from moe_ray.errors import StoreError
from moe_ray.plotting.common import expert_labels
from moe_ray.store import EXPERT_CODES, ResultStore, expert_codes


def test_expert_codes_and_the_label_coordinate(tmp_path):
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="w").require_group("static")
    labels = np.array(["0", "1", "2", "F", "SE"])
    ResultStore.coord(group, "expert_i", labels)
    ResultStore.coord(group, "expert_i", labels)  # a rerun with the same labels writes nothing new
    assert list(group["expert_i"][...]) == [0, 1, 2, -1, -2] and EXPERT_CODES == {"F": -1, "SE": -2}
    assert [str(v) for v in group["expert_i_label"][...]] == list(labels)
    with pytest.raises(StoreError, match=r"coordinate static/expert_i in the store is \[0, 1, 2, -1, -2\]"):
        ResultStore.coord(group, "expert_i", np.array(["0", "1", "2", "F", "3"]))
    assert list(expert_codes(["7", "F", "SE"])) == [7, -1, -2]


def test_expert_labels_reads_both_schemas():
    new = xr.Dataset(coords={"expert": [0, 1, -1], "expert_label": ("expert", ["0", "1", "F"])})
    old = xr.Dataset(coords={"expert": ["0", "1", "F"]})  # schema 1: the labels were the coordinate
    assert expert_labels(new, "expert") == expert_labels(old, "expert") == ["0", "1", "F"]
    assert expert_labels(new.assign(x=("expert", [1.0, 2.0, 3.0]))["x"], "expert") == ["0", "1", "F"]


def test_a_schema_1_store_is_resumed_by_its_labels(tmp_path):
    group = zarr.open_group(str(tmp_path / "old.zarr"), mode="w").require_group("static")
    arr = group.create_array("expert", shape=(3,), dtype=str, dimension_names=["expert"])
    arr[...] = np.array(["0", "1", "F"])
    ResultStore.coord(group, "expert", np.array(["0", "1", "F"]))  # accepted as it is, nothing added
    assert "expert_label" not in group
    with pytest.raises(StoreError, match="coordinate static/expert in the store"):
        ResultStore.coord(group, "expert", np.array(["0", "1", "SE"]))
