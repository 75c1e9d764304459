"""Static analyses end to end through local Ray and the store: planted truths, families, round-trip,
resume, and refusal of bad runs before the store is touched."""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
import xarray as xr
from safetensors.torch import save_file

import moe_ray
from moe_ray.analysis import static as S
from moe_ray.checkpoint import open_checkpoint
from moe_ray.errors import CheckpointError, MoeRayError, SpecError, StoreError
from moe_ray.plotting.common import expert_labels

from checkpoint_edits import set_tensor_value

SIGMA = 0.5


def _run(tmp_path, ck, name="r.zarr", **kw):
    spec = {"model": str(ck.path), "store": str(tmp_path / name), "progress": False, **kw}
    return moe_ray.run(spec)


def _static(store):
    return xr.open_zarr(store, group="static")


def _offdiag(m: np.ndarray) -> np.ndarray:
    return m[~np.eye(m.shape[0], dtype=bool)]


@pytest.fixture(scope="module")
def upcycled_store(ray_session, tiny, tmp_path_factory):
    ck = tiny("mixtral", "upcycled", sigma=SIGMA)
    tmp = tmp_path_factory.mktemp("upcycled")
    return ck, _run(tmp, ck, reference=str(ck.reference), static={"dbscan_eps": 50.0})


def test_upcycled_similarity_matches_the_noise_level(upcycled_store):
    ck, store = upcycled_store
    ds = _static(store)
    d = ds.sizes["neuron"] * 64  # elements per matrix (d_mid x d_hid)
    tol = 6 / math.sqrt(d)
    sim = ds.matrix_similarity.values
    experts = list(range(8))
    ef = ds.matrix_similarity.sel(expert_i=experts, expert_j=-1).values
    ee = ds.matrix_similarity.sel(expert_i=experts, expert_j=experts).values
    np.testing.assert_allclose(ef, 1 / math.sqrt(1 + SIGMA ** 2), atol=tol)
    for layer in range(ee.shape[0]):
        for m in range(3):
            np.testing.assert_allclose(_offdiag(ee[layer, m]), 1 / (1 + SIGMA ** 2), atol=tol)
    assert np.allclose(np.diagonal(sim, axis1=2, axis2=3), 1, atol=1e-6)


def test_scratch_similarity_is_zero_within_standard_errors(ray_session, tiny, tmp_path):
    ck = tiny("mixtral", "scratch", seed=3)
    ds = _static(_run(tmp_path, ck))
    d = 128 * 64
    assert np.abs(_offdiag_all(ds.matrix_similarity.values)).max() < 5 / math.sqrt(d)
    assert expert_labels(ds, "expert_i") == [str(e) for e in range(8)]  # no F, no SE
    absent = ds.attrs["absent_labels"]["all"]
    assert "no dense reference" in absent["F"] and "no shared expert" in absent["SE"]


def _offdiag_all(sim: np.ndarray) -> np.ndarray:
    mask = ~np.eye(sim.shape[-1], dtype=bool)
    return sim[..., mask]


def test_permuted_experts_average_identically_but_do_not_match_as_matrices(ray_session, tiny, tmp_path):
    ck = tiny("mixtral", "permuted", seed=2)
    ds = _static(_run(tmp_path, ck))
    for a in range(0, 8, 2):
        avg = ds.neuron_avg_similarity.sel(expert_i=a, expert_j=a + 1).values
        flat = ds.matrix_similarity.sel(expert_i=a, expert_j=a + 1).values
        np.testing.assert_allclose(avg, 1.0, atol=1e-6)  # averaging is permutation-invariant
        assert np.abs(flat).max() < 5 / math.sqrt(128 * 64)
        # S5: a permuted copy has the very same set of neuron points
        pa = np.sort(ds.neuron_pca.sel(expert=a).values, axis=2)
        pb = np.sort(ds.neuron_pca.sel(expert=a + 1).values, axis=2)
        np.testing.assert_allclose(pa, pb, atol=1e-5)


def test_deepseek_skips_dense_layer_and_includes_shared_expert_where_shapes_allow(ray_session, tiny, tmp_path):
    ck = tiny("deepseek_moe", "scratch")
    ds = _static(_run(tmp_path, ck))
    assert list(ds.layer.values) == [1, 2, 3]
    assert expert_labels(ds, "expert")[-1] == "SE" and ds.sizes["expert"] == 65
    assert np.isfinite(ds.neuron_avg_similarity.sel(expert_i=-2).values).all()  # S3 has SE
    assert np.isnan(ds.matrix_similarity.sel(expert_i=-2).values).all()  # S1: lengths differ
    assert np.isnan(ds.gate_embedding_similarity.sel(expert_i=-2).values).all()  # no router row
    assert "d_mid 64" in ds.attrs["absent_labels"]["matrix_similarity"]["SE"]
    se_neurons = ds.neuron_pca.sel(expert=-2).values  # SE is 2x wider: 64 neurons, not 32
    assert np.isfinite(se_neurons[:, :, :64]).all() and ds.sizes["neuron"] == 64
    assert np.isnan(ds.neuron_pca.sel(expert=0).values[:, :, 32:]).all()


def test_store_round_trip_equals_direct_computation(upcycled_store):
    ck, store = upcycled_store
    ds = _static(store)
    ckpt, ref = open_checkpoint(ck.path), open_checkpoint(ck.reference)
    layer, labels = 2, list(range(8)) + [-1]  # expert codes: F is -1
    for matrix in ("up", "gate", "down"):
        mats = [ckpt.read(ckpt.family.expert_keys(layer, e)[matrix]) for e in range(8)]
        mats.append(ref.read(ref.family.dense_ffn_keys(layer)[matrix]))
        sel = dict(layer=layer, matrix=matrix)
        np.testing.assert_allclose(ds.matrix_similarity.sel(**sel).values, S.matrix_similarity(mats).numpy(), atol=1e-6)
        scores, _ = S.matrix_pca(mats, 3)
        np.testing.assert_allclose(ds.matrix_pca.sel(**sel).values, scores.numpy(), rtol=1e-5, atol=1e-4)
        avg = torch.stack([S.neuron_average(m, matrix) for m in mats])
        np.testing.assert_allclose(ds.neuron_avg_similarity.sel(**sel).values, S.cosine_matrix(avg).numpy(), atol=1e-6)
    router = ckpt.read(ckpt.family.router_weight_key(layer))
    x = S.gate_embedding_similarity(router)
    np.testing.assert_allclose(ds.gate_embedding_similarity.sel(layer=layer, expert_i=labels[:8], expert_j=labels[:8]).values,
                               x.numpy(), atol=1e-6)
    gate_avg = torch.stack([S.neuron_average(ckpt.read(ckpt.family.expert_keys(layer, e)["gate"]), "gate") for e in range(8)])
    r = S.upper_triangle_pearson(x, S.cosine_matrix(gate_avg))
    assert float(ds.gate_weight_correlation.sel(layer=layer, matrix="gate")) == pytest.approx(r, abs=1e-6)
    r_all = ds.gate_weight_correlation.values.astype(np.float64)
    np.testing.assert_allclose(ds.gate_weight_r2_mean.values, (r_all ** 2).mean(0), rtol=1e-6)
    assert ds.matrix_pca_outlier.dtype == np.uint8
    attrs = {k: json.loads(moe_ray.open_results(store).attrs[k]) for k in ("model", "reference", "moe_ray", "spec")}
    assert attrs["model"]["family"] == "mixtral" and attrs["reference"]["family"] == "dense"
    assert attrs["moe_ray"]["schema_version"] == 2 and attrs["spec"]["model"] == str(ck.path)


def test_rerun_into_complete_store_is_a_no_op(upcycled_store, tmp_path):
    ck, store = upcycled_store
    from pathlib import Path
    chunks = {p: p.stat().st_mtime_ns for p in Path(store).rglob("c/*") if p.is_file()}
    assert moe_ray.run(model=str(ck.path), reference=str(ck.reference), store=store, progress=False,
                       static={"dbscan_eps": 50.0}) == store
    assert {p: p.stat().st_mtime_ns for p in Path(store).rglob("c/*") if p.is_file()} == chunks


def test_nan_weights_fail_the_job_and_mark_the_store_failed(ray_session, tiny, tmp_path):
    """NaN/Inf is found when a unit reads the tensor: the job fails naming it and the store says
    `failed`; a rerun over the same weights runs only the unfinished units (and fails the same way);
    repairing a tensor no done unit read is no change to the store's weights: the rerun finishes it,
    equal to an uninterrupted run (an edit of a tensor a done unit read: tests/test_integrity.py)."""
    clean = tiny("mixtral", "scratch", seed=5)
    reference_store = _run(tmp_path, clean, name="clean.zarr")
    broken = tmp_path / "broken"
    shutil.copytree(clean.path, broken)
    key = open_checkpoint(broken).family.expert_keys(2, 4)["down"]
    shard, original = set_tensor_value(broken, key, (0, 0), float("inf"))
    store = str(tmp_path / "resumed.zarr")
    nan_error = r"static layer 2: tensor .*experts\.4\.w2\.weight .* NaN/Inf"
    with pytest.raises(CheckpointError, match=nan_error):
        moe_ray.run(model=str(broken), store=store, progress=False)
    done = _static(store).unit_done.values
    assert done[2] == 0  # the failed layer is not marked done; others may or may not have run
    attrs = moe_ray.open_results(store).attrs
    assert attrs["state"] == "failed" and key in attrs["error"] and json.loads(attrs["runs"])[-1]["state"] == "failed"
    with pytest.raises(CheckpointError, match=nan_error):
        moe_ray.run(model=str(broken), store=store, progress=False)
    save_file(original, shard, metadata={"format": "pt"})
    moe_ray.run(model=str(broken), store=store, progress=False)
    assert moe_ray.open_results(store).attrs["state"] == "complete"
    a, b = _static(reference_store), _static(store)
    for name in a.data_vars:
        np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)


def test_layer_selection_and_bad_layers(ray_session, tiny, tmp_path):
    ck = tiny("deepseek_moe", "scratch")
    ds = _static(_run(tmp_path, ck, layers=[3, 1]))
    assert list(ds.layer.values) == [1, 3]
    with pytest.raises(SpecError, match="layer 0 is not an MoE layer"):
        _run(tmp_path, ck, name="bad.zarr", layers=[0])
    assert not (tmp_path / "bad.zarr").exists()


def test_bad_runs_are_refused_before_the_store_is_touched(ray_session, tiny, tmp_path):
    moe = tiny("mixtral", "upcycled")
    dense = moe.reference
    with pytest.raises(CheckpointError, match="dense dense model with no MoE layers"):
        _run(tmp_path, type(moe)(dense, None), name="a.zarr")
    other = tiny("grok1", "upcycled")  # grok's dense parent: same d_hid (64) and layers, d_mid 128
    qwen = tiny("qwen2_moe", "scratch")
    with pytest.raises(CheckpointError, match="is a mixtral MoE model; --reference takes a dense model"):
        _run(tmp_path, qwen, name="b.zarr", reference=str(moe.path))
    from moe_ray.checkpoint.tiny import make_tiny
    wide = make_tiny("mixtral", "upcycled", tmp_path / "wide", config_overrides={"hidden_size": 32})
    with pytest.raises(CheckpointError, match="hidden size 32, the model has 64: shapes don't match"):
        _run(tmp_path, moe, name="c.zarr", reference=str(wide.reference))
    for name in ("a.zarr", "b.zarr", "c.zarr"):
        assert not (tmp_path / name).exists()
    # a reference of another width is fine: F joins S3/S5 but not the flattened S1/S2
    ds = _static(_run(tmp_path, qwen, name="d.zarr", reference=str(other.reference)))
    assert np.isfinite(ds.neuron_avg_similarity.sel(expert_i=-1).values).all()
    assert np.isnan(ds.matrix_similarity.sel(expert_i=-1).values).all()


def test_store_that_is_not_ours_or_from_another_model_is_refused(ray_session, tiny, tmp_path):
    ck = tiny("mixtral", "scratch")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("precious")
    with pytest.raises(StoreError, match="exists and is not a moe-ray store"):
        _run(tmp_path, ck, name="foreign", overwrite=True)
    assert (foreign / "notes.txt").read_text() == "precious"
    store = _run(tmp_path, ck, name="s.zarr")
    other = tiny("mixtral", "scratch", seed=9)
    with pytest.raises(StoreError, match=r"holds results for other weights: the model's tensor model\.layers\.0\..* differs"):
        _run(tmp_path, other, name="s.zarr")
    _run(tmp_path, other, name="s.zarr", overwrite=True)
    assert json.loads(moe_ray.open_results(store).attrs["spec"])["model"] == str(other.path)


def test_spec_errors_are_clear(tmp_path):
    with pytest.raises(SpecError, match="no model given"):
        moe_ray.run({"store": str(tmp_path / "x.zarr")})
    with pytest.raises(SpecError, match="unknown analysis 'statik'"):
        moe_ray.run(model="m", analyses=["statik"])
    with pytest.raises(SpecError, match="unknown spec field 'static.dbscan'"):
        moe_ray.run({"model": "m", "static": {"dbscan": 1}})
    with pytest.raises(SpecError, match="dbscan_eps must be positive"):
        moe_ray.run({"model": "m", "static": {"dbscan_eps": -1}})
    with pytest.raises(MoeRayError, match="checkpoint directory not found"):
        moe_ray.run(model=str(tmp_path / "missing"), store=str(tmp_path / "x.zarr"))
