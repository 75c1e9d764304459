"""S4 neuron reordering (paper §4.1.2, Tab 2): planted permutations, optimality against scipy,
joint vs separate, bad inputs, store round-trip and resume."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from scipy.optimize import linear_sum_assignment
from scipy.stats import kendalltau

from moe_ray import api
from moe_ray.analysis import reorder as R
from moe_ray.checkpoint import MATRICES, get_family, open_checkpoint
from moe_ray.errors import SpecError


def _run(ckpt, store: Path, **reorder):
    kwargs = {k: v for k, v in reorder.items() if k in ("layers", "resources")}
    options = {k: v for k, v in reorder.items() if k not in kwargs}
    return api.run(model=str(ckpt.path), analyses=["reorder"], store=str(store), reorder=options,
                   progress=False, **kwargs)


def _expert(path: Path, layer: int, e: int) -> dict[str, torch.Tensor]:
    ckpt = open_checkpoint(path)
    keys = get_family(ckpt.facts.family).expert_keys(layer, e)
    return {m: ckpt.read(keys[m]) for m in MATRICES}


# ---- pure math -------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [2, 3, 10, 257, 4096])
def test_kendall_tau_matches_scipy(n):
    perm = np.random.default_rng(n).permutation(n)
    assert R.kendall_tau(perm) == pytest.approx(kendalltau(np.arange(n), perm).statistic, abs=1e-12)
    assert R.kendall_tau(np.arange(n)) == 1.0
    assert R.kendall_tau(np.arange(n)[::-1]) == pytest.approx(-1.0)


@pytest.mark.parametrize("n", [1, 5, 64, 300])
@pytest.mark.parametrize("kind", ["random", "near_identity"])
def test_solve_max_is_optimal(n, kind):
    rng = np.random.default_rng(n)
    sim = rng.standard_normal((n, n))
    if kind == "near_identity":
        sim = 0.05 * sim + np.eye(n)
    rows, cols = linear_sum_assignment(sim, maximize=True)
    best = sim[rows, cols].sum()
    result = R.solve_max(sim.astype(np.float32))
    assert sorted(result.perm.tolist()) == list(range(n))
    assert sim[np.arange(n), result.perm].sum() == pytest.approx(best, abs=1e-4 * max(1, n) ** 0.5)
    assert result.total == pytest.approx(best, abs=1e-3)
    assert 0.0 <= result.gap_bound < 1e-3


def test_similarity_matrix_matches_float64_reference():
    gen = torch.Generator().manual_seed(0)
    a = {m: torch.randn((40, 24) if m != "down" else (24, 40), generator=gen) for m in MATRICES}
    b = {m: torch.randn((40, 24) if m != "down" else (24, 40), generator=gen) for m in MATRICES}
    expected = np.zeros((40, 40))
    for m in MATRICES:
        ra, rb = R.neuron_rows(a[m], m).double().numpy(), R.neuron_rows(b[m], m).double().numpy()
        expected += ra @ rb.T / (np.linalg.norm(ra) * np.linalg.norm(rb))
    got = R.similarity_matrix(a, b, MATRICES, chunk_elements=7 * 40)  # several chunks
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_separate_and_joint_differ_when_matrices_disagree():
    n, d = 24, 16
    gen = torch.Generator().manual_seed(1)
    a = {"up": torch.randn(n, d, generator=gen), "gate": torch.randn(n, d, generator=gen),
         "down": torch.randn(d, n, generator=gen)}
    planted = {m: torch.randperm(n, generator=gen) for m in MATRICES}
    b = {"up": a["up"][planted["up"]], "gate": a["gate"][planted["gate"]], "down": a["down"][:, planted["down"]]}
    joint = R.reorder_pair(a, b, MATRICES)
    distinct = set()
    for m in MATRICES:
        sep = R.reorder_pair(a, b, (m,))
        np.testing.assert_array_equal(sep.perm, np.argsort(planted[m].numpy()))
        assert sep.similarity_after[m] == pytest.approx(1.0, abs=1e-6)
        distinct.add(tuple(sep.perm))
    assert len(distinct) == 3
    assert tuple(joint.perm) not in distinct
    assert min(joint.similarity_after.values()) < 0.9


def test_a_batch_of_planted_pairs_recovers_each_permutation():
    """Six children of one parent, each a permuted noisy copy (upcycled-like), solved as batches of four
    on two threads: every pair (parent, child) gives back its child's planted permutation exactly, with
    each pair's own certificate, as one pair at a time does."""
    n, d = 256, 64
    gen = torch.Generator().manual_seed(7)
    parent = {"up": torch.randn(n, d, generator=gen), "gate": torch.randn(n, d, generator=gen),
              "down": torch.randn(d, n, generator=gen)}
    planted = [torch.randperm(n, generator=gen) for _ in range(6)]
    experts = {0: parent}
    for e, pi in enumerate(planted, start=1):
        experts[e] = {m: (w[:, pi] if m == "down" else w[pi]) + 0.3 * torch.randn(w.shape, generator=gen)
                      for m, w in parent.items()}
    problems = [(0, e, MATRICES) for e in range(1, 7)]
    batched = list(R.reorder_pairs(experts.__getitem__, problems, batch=4, workers=2, overlap=True))
    alone = list(R.reorder_pairs(experts.__getitem__, problems))
    for ((_, e, _), got), (_, one), pi in zip(batched, alone, planted):
        np.testing.assert_array_equal(got.perm, np.argsort(pi.numpy()), err_msg=f"child {e}")
        np.testing.assert_array_equal(got.perm, one.perm)
        assert got.similarity_after == one.similarity_after and 0.0 <= got.gap_bound <= 1e-9 * n


# ---- through the Ray job ---------------------------------------------------------------------------

def test_permuted_planted_permutation_recovered(ray_session, tiny, tmp_path):
    ckpt = tiny("mixtral", "permuted", dtype="float32")
    layer = int(next(iter(ckpt.planted["permuted"])))
    store = _run(ckpt, tmp_path / "s.zarr", layers=[layer], reorder_mode="both", pairs="0-1,2-3,1-2")
    planted = ckpt.planted["permuted"][str(layer)]
    for mode in ("joint", "separate"):
        ds = xr.open_zarr(store, group=f"reorder/{mode}")
        for e in ("1", "3"):
            src, pi = str(planted[e]["source"]), np.array(planted[e]["perm"])
            # W_e[r] = W_src[pi[r]]: neuron k of src is neuron argsort(pi)[k] of e.
            pair = ds.sel(layer=layer, expert_i=int(src), expert_j=int(e))
            perms = pair.permutation.values.reshape(-1, pi.size)
            for p in perms:
                np.testing.assert_array_equal(p, np.argsort(pi))
            np.testing.assert_allclose(pair.similarity_after.values, 1.0, atol=1e-5)
            np.testing.assert_allclose(pair.kendall_tau.values, kendalltau(np.arange(pi.size), pi).statistic,
                                       atol=1e-6)
        # pairs not asked for, and i >= j, stay empty
        assert np.isnan(ds.growth.sel(layer=layer, expert_i=0, expert_j=2).values).all()
        assert (ds.permutation.sel(layer=layer, expert_i=1, expert_j=0).values == -1).all()
        assert "tab2" in ds.attrs and set(ds.attrs["tab2"]["growth_median_per_matrix"]) == set(MATRICES)


def test_upcycled_small_noise_keeps_identity(ray_session, tiny, tmp_path):
    ckpt = tiny("mixtral", "upcycled", sigma=0.05, dtype="float32")
    store = _run(ckpt, tmp_path / "s.zarr", layers=[1], pairs="0-1,2-5")
    ds = xr.open_zarr(store, group="reorder/joint")
    for i, j in ((0, 1), (2, 5)):
        pair = ds.sel(layer=1, expert_i=i, expert_j=j)
        np.testing.assert_array_equal(pair.permutation.values, np.arange(ds.sizes["neuron"]))
        assert float(pair.kendall_tau) == 1.0
        np.testing.assert_allclose(pair.growth.values, 0.0, atol=1e-6)  # relative growth: unchanged


def test_store_round_trip_and_resume(ray_session, tiny, tmp_path):
    ckpt = tiny("mixtral", "scratch", dtype="float32")
    path = tmp_path / "s.zarr"
    _run(ckpt, path, layers=[2], pairs="0-1", reorder_mode="separate")
    a, b = _expert(ckpt.path, 2, 0), _expert(ckpt.path, 2, 1)
    ds = xr.open_zarr(str(path), group="reorder/separate")
    for m in MATRICES:
        expected = R.reorder_pair(a, b, (m,))
        got = ds.sel(layer=2, matrix=m, expert_i=0, expert_j=1)
        np.testing.assert_array_equal(got.permutation.values, expected.perm)
        assert float(got.similarity_before) == pytest.approx(expected.similarity_before[m], rel=1e-6)
        assert float(got.similarity_after) == pytest.approx(expected.similarity_after[m], rel=1e-6)
        assert float(got.growth) == pytest.approx(expected.growth[m], rel=1e-6)
        assert float(got.growth) == pytest.approx(  # relative growth (design §4)
            (float(got.similarity_after) - float(got.similarity_before)) / abs(float(got.similarity_before)), rel=1e-5)
        assert float(got.kendall_tau) == pytest.approx(expected.kendall_tau, abs=1e-6)
        assert float(got.similarity_after) > float(got.similarity_before)

    # resume: a done unit is skipped (a sentinel written into its chunk survives), a new pair runs
    import zarr
    group = zarr.open_group(str(path), mode="r+", path="reorder/separate")
    group["similarity_after"][0, 0, 0, 1] = 42.0
    _run(ckpt, path, layers=[2], pairs="0-1,0-2", reorder_mode="separate")
    ds = xr.open_zarr(str(path), group="reorder/separate", consolidated=False)
    assert float(ds.similarity_after.sel(layer=2, matrix="up", expert_i=0, expert_j=1)) == 42.0
    assert np.isfinite(ds.similarity_after.sel(layer=2, expert_i=0, expert_j=2).values).all()
    assert ds.unit_done.sel(layer=2, expert_i=0, expert_j=2).values.all()


def test_store_chunks_are_the_tasks_tiles_and_a_resume_keeps_them(ray_session, tiny, tmp_path):
    """pairs_per_task 4: tasks take 2x2 tiles of the pair triangle and the store's chunks are those
    tiles (10 chunk files per array for 8 experts, not 28), with the same values as a chunk per pair,
    also where a task of 2 CPUs solves its pairs two at a time.
    A resume with another pairs_per_task keeps the store's tiles and writes a tile's pairs together:
    a pair not done is computed, a done pair of the same chunk keeps what the store holds."""
    import zarr

    ckpt = tiny("mixtral", "scratch", dtype="float32")
    tiled, single = tmp_path / "tiled.zarr", tmp_path / "single.zarr"
    _run(ckpt, tiled, layers=[1], pairs_per_task=4)
    _run(ckpt, single, layers=[1], pairs_per_task=1)
    group = zarr.open_group(str(tiled), mode="r+", path="reorder/joint")
    assert group["unit_done"].chunks == (1, 2, 2) and group["permutation"].chunks == (1, 2, 2, 128)
    assert group["similarity_after"].chunks == (1, 3, 2, 2)
    chunk_files = [f for f in (tiled / "reorder/joint/unit_done").rglob("*") if f.is_file() and f.name != "zarr.json"]
    assert len(chunk_files) == 10
    a, b = xr.open_zarr(str(single), group="reorder/joint"), xr.open_zarr(str(tiled), group="reorder/joint")
    for name in a.data_vars:
        np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)
    # two CPUs a task: its pairs solved two at a time on two threads (R.batch_size), the same store
    batched = tmp_path / "batched.zarr"
    _run(ckpt, batched, layers=[1], pairs_per_task=4, resources={"cpus_per_task": 2})
    two = xr.open_zarr(str(batched), group="reorder/joint")
    for name in a.data_vars:
        np.testing.assert_array_equal(a[name].values, two[name].values, err_msg=f"{name}, 2 CPUs a task")

    # tile (0, 1) holds pairs 0-2, 0-3, 1-2, 1-3: 0-2 not done (its results gone), 1-3 done with a sentinel
    group["unit_done"][0, 0, 2] = 0
    for name in ("similarity_before", "similarity_after", "growth", "optimality_gap"):
        group[name][0, :, 0, 2] = np.nan
    group["kendall_tau"][0, 0, 2] = np.nan
    group["permutation"][0, 0, 2] = -1
    group["similarity_after"][0, 0, 1, 3] = 42.0
    _run(ckpt, tiled, layers=[1], pairs_per_task=9)
    c = xr.open_zarr(str(tiled), group="reorder/joint", consolidated=False)
    assert zarr.open_group(str(tiled), mode="r", path="reorder/joint")["unit_done"].chunks == (1, 2, 2)
    assert c.unit_done.values.sum() == 28
    for name in a.data_vars:
        expected = a[name].values.copy()
        if name == "similarity_after":
            expected[0, 0, 1, 3] = 42.0
        np.testing.assert_array_equal(c[name].values, expected, err_msg=name)


# ---- bad inputs: one-line errors before the store exists --------------------------------------------

@pytest.mark.parametrize("options, message", [
    ({"pairs": "0-8"}, "out of range"),
    ({"pairs": "3-3"}, "one expert twice"),
    ({"pairs": "a-b"}, "written like 0-1"),
    ({"reorder_mode": "both-ways"}, "reorder_mode"),
    ({"layers": [99]}, "not an MoE layer"),
    ({"resources": {"memory_per_task_gb": 0.01}}, "too small for reordering n="),
])
def test_bad_inputs(tiny, tmp_path, options, message):
    ckpt = tiny("mixtral", "scratch", dtype="float32")
    store = tmp_path / "s.zarr"
    with pytest.raises(SpecError, match=message) as info:
        _run(ckpt, store, **options)
    assert "\n" not in str(info.value)
    assert not store.exists()


def test_cli_flags(tmp_path):
    from moe_ray.cli import build_parser, spec_from_args

    args = build_parser().parse_args(["run", "--model", "m", "--analyses", "reorder", "--reorder-mode",
                                      "separate", "--pairs", "0-1,2-3"])
    args.spec = None
    spec = spec_from_args(args)
    assert spec.analyses == ["reorder"]
    assert spec.reorder.reorder_mode == "separate" and spec.reorder.pairs == ["0-1", "2-3"]


def test_tab2_relative_growth_median_and_order():
    """Tab 2 (§4.1.2): the paper's rows come out of hand-made similarities. Mixtral-like pairs barely move
    (0.8 -> 0.8008: growth 1e-3), DeepSeek/Grok-like ones go from about 1e-4 to 1e-2 (growth ~100)."""
    from moe_ray.analysis.summary import format_order, order_of_growth, relative_growth, tab2_summary

    assert relative_growth(0.8, 0.8008) == pytest.approx(1e-3)
    assert relative_growth(-0.0001, 0.0099) == pytest.approx(100.0)  # |before|: a negative start still grows
    assert np.isnan(relative_growth(0.0, 0.5)) and np.isnan(relative_growth(float("nan"), 0.5))
    assert [order_of_growth(x) for x in (0.0012, 0.0004, 87.0, 140.0, -0.02, 0.0)] == [1e-3, 1e-3, 100.0, 100.0,
                                                                                     -0.01, 0.0]
    assert [format_order(x) for x in (1e-3, 0.1, 1.0, 100.0, 1e4, -0.01)] == ["1e-3", "0.1", "1", "100", "1e4",
                                                                              "-1e-2"]
    # [layer, matrix, i, j], i<j filled, the rest NaN (as in the store): the median ignores the blanks
    before = np.full((2, 3, 3, 3), np.nan)
    after = np.full_like(before, np.nan)
    iu = np.triu_indices(3, 1)
    before[:, :, iu[0], iu[1]] = 1e-4
    after[:, :, iu[0], iu[1]] = 1e-2
    after[0, 0, 0, 1] = 5e-4  # one pair grows only 4x: the median is not moved by it
    growth = (after - before) / np.abs(before)
    tau = np.full((2, 3, 3), np.nan)
    tau[:, iu[0], iu[1]] = [[-0.001, 0.0, 0.002], [0.0, 0.0, 0.001]]
    row = tab2_summary(before, after, growth, tau)
    assert row["growth_median"] == pytest.approx(99.0) and row["order_of_growth"] == 100.0
    assert row["tau_median"] == 0.0 and row["n_values"] == 18
    assert row["similarity_before"] == pytest.approx(1e-4) and row["similarity_after"] == pytest.approx(1e-2)


def test_order_of_growth_near_a_rounding_boundary():
    """The paper's order 10^round(log10|x|) flips at 10^1.5 = 31.6: medians of 31 and 32 read 10 and 100 (kept:
    the paper's numbers are compared with it); an IQR that straddles 31.6 (or 0) is found and marked, one on
    either side of it is not."""
    from moe_ray.analysis.summary import (format_order_marked, order_boundaries, order_of_growth, order_reading,
                                          tab2_summary)

    assert order_of_growth(31.0) == 10.0 and order_of_growth(32.0) == 100.0
    assert order_boundaries(25.0, 40.0) == [pytest.approx(10 ** 1.5)]
    assert order_boundaries(32.0, 40.0) == [] and order_boundaries(28.0, 31.0) == []  # either side of 31.6
    assert order_boundaries(5.0, 500.0) == [pytest.approx(10 ** 1.5), pytest.approx(10 ** 2.5)]
    assert order_boundaries(-40.0, -25.0) == [pytest.approx(-(10 ** 1.5))] and order_boundaries(-0.5, 2.0) == [0.0]
    assert order_boundaries(float("nan"), 40.0) == []
    assert format_order_marked(10.0, 25.0, 40.0) == "10 ‡" and format_order_marked(100.0, 32.0, 40.0) == "100"
    assert format_order_marked(10.0, 28.0, 31.0) == "10"
    assert order_reading(31.0, 25.0, 40.0) == "order 10; IQR 25 – 40 straddles 31.6: the order reads 10 to 100"
    assert order_reading(32.0, 31.8, 32.2) == "order 100"
    growth = np.array([21.0, 26.0, 31.0, 36.0, 41.0])  # median 31, IQR 26 – 36
    row = tab2_summary(growth, growth, growth, growth)
    assert (row["growth_median"], row["growth_q25"], row["growth_q75"], row["order_of_growth"]) == (31, 26, 36, 10)
