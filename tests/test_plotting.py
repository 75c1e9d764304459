"""The plotting job and report (issue 5): real-pipeline stores (mixtral upcycled with its reference,
deepseek_moe scratch with SE and 64 experts), synthetic reorder/dynamic groups, partial and empty stores.
Figures are checked through the data each figure function returns, tables against the store."""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

import moe_ray
from moe_ray.checkpoint.tiny import make_tiny
from moe_ray.cli import PLOT_PARALLEL
from moe_ray.cli import main as cli_main
from moe_ray.errors import MoeRayError
from moe_ray.plotting import render
from moe_ray.plotting.common import (MAX_TICKS, StoreView, fitting_ticks, grid_labels, tick_positions,
                                     token_label)
from moe_ray.plotting.report import PARALLEL, SECTIONS, section_tasks, start_drawing
from moe_ray.plotting.static import fig1_matrix_similarity

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def stores(ray_session, tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("plot-stores")
    mix = tiny("mixtral", "upcycled")
    ds = tiny("deepseek_moe", "scratch")
    a = moe_ray.run({"model": str(mix.path), "reference": str(mix.reference), "store": str(root / "mix.zarr"),
                     "static": {"dbscan_eps": 50.0, "dbscan_min_samples": 2}, "progress": False})
    b = moe_ray.run({"model": str(ds.path), "store": str(root / "ds.zarr"), "progress": False})
    return a, b


def _png_ok(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert 300 <= width <= 6000 and 200 <= height <= 6000, (path.name, width, height)


def _links_resolve(index: Path) -> list[str]:
    text = index.read_text()
    links = re.findall(r'(?:href|src)="([^"#][^"]*)"', text) + re.findall(r"href='([^']*)'", text)
    for link in links:
        assert (index.parent / link).is_file(), link
    return links


def test_report_two_real_stores(stores, tmp_path):
    mix, ds = stores
    report = render([mix, ds], tmp_path / "rep")
    keys = {f.key for f in report.figures}
    assert {"fig1_matrix_similarity", "fig6_matrix_pca", "fig7_neuron_pca_2d", "fig7_neuron_pca_3d",
            "fig8_gate_neuron_avg"} <= keys
    for f in report.figures:
        _png_ok(f.path)
    links = _links_resolve(report.index)
    assert len([l for l in links if l.endswith(".png")]) >= len(report.figures)
    text = report.index.read_text()
    assert "0.1.0" in text and "mixtral" in text and "deepseek_moe" in text and "dense-parent" in text
    assert "no reorder analyses" in text and "no dynamic analyses" in text

    # Fig 1 draws exactly the store's matrices, F included for mixtral, SE dropped for deepseek.
    fig1 = next(f for f in report.figures if f.key == "fig1_matrix_similarity")
    sm = xr.open_zarr(mix, group="static")["matrix_similarity"]
    mix_label = next(k[0] for k in fig1.data if k[0] not in ("labels", "range") and k[0].startswith("mixtral"))
    np.testing.assert_allclose(fig1.data[(mix_label, 2, "W_gate")], sm.sel(layer=2, matrix="gate").values)
    assert fig1.data[("labels", mix_label, 2, "W_gate")][0][-1] == "F"
    ds_label = next(k[0] for k in fig1.data if k[0] not in ("labels", "range") and k[0].startswith("deepseek"))
    rows, _ = fig1.data[("labels", ds_label, 1, "W_up")]
    assert len(rows) == 64 and "SE" not in rows
    lo, hi = fig1.data[("range", "sim")]
    assert lo < 0.2 < 0.5 < hi  # shared scale spans scratch (near 0) and upcycled (high) similarity

    # Fig 8 keeps SE in the neuron-average maps of deepseek, and the gate map has routed experts only.
    fig8 = next(f for f in report.figures if f.key == "fig8_gate_neuron_avg")
    assert fig8.data[("labels", ds_label, 1, "avg W_up (Y_up)")][0][-1] == "SE"
    assert len(fig8.data[("labels", ds_label, 1, "gate embedding X")][0]) == 64

    # Fig 6 lists DBSCAN-removed experts exactly as the store marks them.
    fig6 = next(f for f in report.figures if f.key == "fig6_matrix_pca")
    out = xr.open_zarr(mix, group="static")["matrix_pca_outlier"].sel(layer=0, matrix="up").values
    labels = [str(x) for x in xr.open_zarr(mix, group="static")["expert"].values]
    assert fig6.data[(mix_label, 0, "up")]["removed"] == [labels[i] for i in np.flatnonzero(out)]

    # Tables equal the store's values.
    tab3 = next(t for t in report.tables if t.key == "tab3_r2_mean")
    r2 = xr.open_zarr(ds, group="static")["gate_weight_r2_mean"].values
    row = next(r for r in tab3.rows if r[0] == ds_label)
    np.testing.assert_allclose(row[1:], r2)
    with tab3.csv.open() as f:
        csv_rows = list(csv.reader(f))
    np.testing.assert_allclose([float(x) for x in csv_rows[2][1:]], r2)
    tab4 = next(t for t in report.tables if t.key == "tab4_r_per_layer")
    r = xr.open_zarr(mix, group="static")["gate_weight_correlation"]
    layer3 = next(r_ for r_ in tab4.rows if r_[0] == 3)
    np.testing.assert_allclose(layer3[1:4], r.sel(layer=3).values)
    assert next(r_ for r_ in tab4.rows if r_[0] == 0)[4:] == [None, None, None]  # deepseek layer 0 is dense


def _copy(src: str, dst: Path) -> str:
    import shutil

    shutil.copytree(src, dst)
    return str(dst)


def test_partial_and_empty_store_api_and_cli(stores, tmp_path, capsys):
    mix, _ = stores
    partial = _copy(mix, tmp_path / "partial.zarr")
    zarr.open_group(partial, mode="r+")["static/unit_done"][1] = 0
    index = moe_ray.plot(partial, tmp_path / "p")
    assert index == tmp_path / "p" / "index.html"
    _links_resolve(index)
    assert "static layers [1] not finished" in index.read_text()
    fig1 = fig1_matrix_similarity([StoreView(partial)], tmp_path)[0]
    assert {k[1] for k in fig1.data if k[0] not in ("labels", "range")} == {0, 2, 3}

    empty = _copy(mix, tmp_path / "empty.zarr")
    del zarr.open_group(empty, mode="r+")["static"]
    capsys.readouterr()
    assert cli_main(["plot", empty, "--out", str(tmp_path / "e")]) == 0
    assert f"wrote {tmp_path / 'e' / 'index.html'}: 0 figures, 0 tables in " in capsys.readouterr().out
    text = (tmp_path / "e" / "index.html").read_text()
    assert "no static analyses" in text and "Not in any store" in text
    assert not list((tmp_path / "e" / "figures").iterdir())

    with pytest.raises(MoeRayError, match="not a moe-ray store"):
        render([str(tmp_path / "p")], tmp_path / "x")
    assert PLOT_PARALLEL == PARALLEL  # the CLI spells the modes out so its parser needs no matplotlib
    assert cli_main(["plot", str(tmp_path / "missing.zarr"), "--out", str(tmp_path / "y")]) == 2
    assert "store not found" in capsys.readouterr().err


def _write(store: str, path: str, data: xr.Dataset) -> None:
    data.to_zarr(store, group=path, mode="w", zarr_format=3, consolidated=False)


@pytest.fixture(scope="module")
def synthetic(stores, tmp_path_factory):
    """The mixtral store plus reorder and dynamic groups with the schema's names and dims, written here:
    (store, the values written). Dynamic labels are the routed experts and F (no router score)."""
    mix, _ = stores
    store = _copy(mix, tmp_path_factory.mktemp("synthetic") / "full.zarr")
    meta = Path(store) / "zarr.json"
    root_meta = json.loads(meta.read_text())
    root_meta.pop("consolidated_metadata", None)  # writers add groups, then consolidate (as the pipeline does)
    meta.write_text(json.dumps(root_meta))
    rng = np.random.default_rng(0)
    layers, E, T, N, k = [0, 1], 4, 5, 6, 2
    ex = [str(e) for e in range(E)]
    labels = ex + ["F"]
    L = len(labels)
    mats = ["up", "gate", "down"]
    before = rng.uniform(0, 0.1, (2, 3, E, E))
    after = before * 2
    for mode, tau_dims in (("joint", ("layer", "expert_i", "expert_j")),
                           ("separate", ("layer", "matrix", "expert_i", "expert_j"))):
        tau = rng.uniform(-1, 1, (2, E, E) if mode == "joint" else (2, 3, E, E))
        _write(store, f"reorder/{mode}", xr.Dataset(
            {"similarity_before": (("layer", "matrix", "expert_i", "expert_j"), before),
             "similarity_after": (("layer", "matrix", "expert_i", "expert_j"), after),
             "growth": (("layer", "matrix", "expert_i", "expert_j"), after / before),
             "kendall_tau": (tau_dims, tau)},
            coords={"layer": layers, "matrix": mats, "expert_i": ex, "expert_j": ex}))
    scores = rng.dirichlet(np.ones(E), (2, T))
    topk = np.argsort(-scores, axis=-1)[..., :k]
    weights = np.take_along_axis(scores, topk, axis=-1)
    weights /= weights.sum(axis=-1, keepdims=True)  # renormalised over the top k, as Mixtral does
    scores_all = np.concatenate([scores, np.full((2, T, 1), np.nan)], axis=-1)  # F has no router score
    counts = rng.integers(0, 5, (2, E, E))
    coords = {"layer": layers, "token": np.arange(T), "probe_token": np.arange(2), "expert": labels,
              "expert_i": labels, "expert_j": labels, "k": np.arange(k), "norm_rank": np.arange(E),
              "score_rank": np.arange(E), "neuron": np.arange(N)}
    tokens = (("token",), np.array(["<s>", "As", "Ġan", "Ġopen", "Ġsource"], dtype=object))
    _write(store, "dynamic/short", xr.Dataset(
        {"tokens": tokens,
         "router_logits": (("layer", "token", "expert"), np.log(scores_all)),
         "gate_scores": (("layer", "token", "expert"), scores_all),
         "topk_experts": (("layer", "token", "k"), topk),
         "topk_weights": (("layer", "token", "k"), weights),
         "expert_output_norms": (("layer", "token", "expert"), rng.uniform(0, 3, (2, T, L))),
         "expert_output_similarity": (("layer", "token", "expert_i", "expert_j"), rng.uniform(-1, 1, (2, T, L, L))),
         "expert_output_angular_mean": (("layer", "expert_i", "expert_j"), rng.uniform(0, 1, (2, L, L))),
         "norm_score_rank_counts": (("layer", "norm_rank", "score_rank"), counts),
         "activation_ratio": (("layer", "token", "expert"), rng.uniform(0.9, 1, (2, T, L))),
         "intermediate_states": (("layer", "probe_token", "expert", "neuron"), rng.normal(size=(2, 2, L, N)))},
        coords=coords))
    # an input whose store has no top-k weights: Fig 10 falls back to the softmax scores of the top k
    _write(store, "dynamic/text", xr.Dataset(
        {"tokens": tokens, "gate_scores": (("layer", "token", "expert"), scores_all),
         "topk_experts": (("layer", "token", "k"), topk)},
        coords={n: coords[n] for n in ("layer", "token", "expert", "k")}))
    zarr.consolidate_metadata(store)
    return store, {"E": E, "T": T, "k": k, "labels": labels, "before": before, "scores": scores, "topk": topk,
                   "weights": weights, "counts": counts}


def test_synthetic_reorder_and_dynamic(synthetic, tmp_path):
    store, w = synthetic
    E, T, k, topk, scores, weights = w["E"], w["T"], w["k"], w["topk"], w["scores"], w["weights"]
    report = render([store], tmp_path / "rep")
    keys = {f.key for f in report.figures}
    assert {"fig2_output_similarity", "fig3_angular_short", "fig4_norms_scores", "fig9_rank_counts_short",
            "fig5_intermediate", "activation_ratio", "fig10_routing"} <= keys
    for f in report.figures:
        _png_ok(f.path)
    _links_resolve(report.index)
    label = next(iter(report.figures[0].data))[0]

    tab2 = next(t for t in report.tables if t.key == "tab2_reorder")
    off = ~np.eye(E, dtype=bool)
    row = next(r for r in tab2.rows if r[1] == "separate" and r[2] == "gate")
    assert row[3] == pytest.approx(w["before"][:, 1][:, off].mean())
    assert row[5] == pytest.approx(2.0)
    assert row[6] == pytest.approx(xr.open_zarr(store, group="reorder/separate")["kendall_tau"]
                                   .sel(matrix="gate").values[:, off].mean())
    joint = [r for r in tab2.rows if r[1] == "joint"]
    assert len({r[6] for r in joint}) == 1

    fig2 = next(f for f in report.figures if f.key == "fig2_output_similarity")
    assert fig2.data[("topk", label, 1, 3)] == list(topk[1, 3])

    # Fig 10: the routed experts only (no F row), each token's top-k routing weights, others blank,
    # coloured from 0 to the largest weight of the page.
    fig10 = [f for f in report.figures if f.key == "fig10_routing"]
    short = next(f for f in fig10 if "short input" in f.title)
    shown = short.data[(label, 0)]
    assert short.data[("labels", label, 0)][0] == w["labels"][:E]
    assert shown.shape == (T, E) and np.isfinite(shown).sum() == T * k
    np.testing.assert_allclose(shown[2, topk[0, 2]], weights[0, 2])
    assert short.data[("quantity", label)] == "top-k routing weight"
    assert short.data[("range",)] == pytest.approx((0.0, weights.max()))
    assert short.data[("labels", label, 0)][1][2] == "␣an"  # byte-level BPE's space marker, readable
    text = next(f for f in fig10 if "text input" in f.title)
    assert text.data[("quantity", label)] == "gate score of a top-k expert"
    np.testing.assert_allclose(text.data[(label, 1)][4, topk[1, 4]], scores[1, 4, topk[1, 4]])

    # Fig 4: norms of every label (F too), gate scores of the routed experts, colour from 0 to their max.
    fig4 = next(f for f in report.figures if f.key == "fig4_norms_scores")
    norm_labels, score_labels, _ = fig4.data[("labels", label, 1)]
    assert norm_labels == w["labels"] and score_labels == w["labels"][:E]
    np.testing.assert_allclose(fig4.data[(label, 1, "score")], scores[1])
    assert fig4.data[("range", "score")] == pytest.approx((0.0, scores.max()))

    fig9 = next(f for f in report.figures if f.key == "fig9_rank_counts_short")
    np.testing.assert_array_equal(fig9.data[(label, 1, "rank counts (short)")], w["counts"][1])
    act = next(f for f in report.figures if f.key == "activation_ratio")
    assert act.data[label].shape == (2, len(w["labels"]))
    fig3 = next(f for f in report.figures if f.key == "fig3_angular_short")
    assert (label, 3, "matrix sim W_up") in fig3.data  # static layers beside the dynamic ones


def test_parallel_modes_draw_the_same(synthetic, ray_session):
    """Ray tasks, the forked process pool and drawing in this process give the same images and data."""
    store, _ = synthetic
    views = [StoreView(store)]
    tasks = [t for s in SECTIONS if s.key in ("fig9", "fig10", "fig1") for t in section_tasks(s, views)]
    assert [(key, refs[0][2], refs[0][3]) for key, refs in tasks] == [
        ("fig1", None, [0, 1, 2, 3]), ("fig9", ("short",), [0, 1]),
        ("fig10", ("short",), [0, 1]), ("fig10", ("text",), [0, 1])]
    drawn = {mode: start_drawing(tasks, mode)() for mode in ("none", "processes", "ray")}
    for mode in ("processes", "ray"):
        for here, there in zip(drawn["none"], drawn[mode]):
            assert [f.path.name for f, _ in here] == [f.path.name for f, _ in there]
            assert [png for _, png in here] == [png for _, png in there]
            for (a, _), (b, _) in zip(here, there):
                assert a.data.keys() == b.data.keys()
                for key in a.data:
                    if isinstance(a.data[key], np.ndarray):
                        np.testing.assert_array_equal(a.data[key], b.data[key])
                    else:
                        assert a.data[key] == b.data[key]


def test_busy_cpus_counts_our_cpus_ticks_not_idle(monkeypatch):
    """Busy CPUs from two /proc/stat samples, over the CPUs this process may use only: CPU 0 spent 150
    of 200 ticks neither idle nor iowait, CPU 1 none of 100, CPU 7 (not ours) all of them."""
    import moe_ray.plotting.report as R

    before = {0: [1000, 10, 200, 5000, 40], 1: [0, 0, 0, 900, 0], 7: [0, 0, 0, 0, 0]}
    after = {0: [1120, 10, 230, 5045, 45], 1: [0, 0, 0, 990, 10], 7: [300, 0, 0, 0, 0]}
    samples = iter([before, after])
    monkeypatch.setattr(R, "_cpu_ticks", lambda: next(samples))
    monkeypatch.setattr(R, "usable_cpu_ids", lambda: {0, 1})
    assert R.busy_cpus(0.0) == pytest.approx(0.75)
    samples = iter([before, after])
    assert R.idle_cpus(0.0) == 1  # 2 usable less 0.75 busy, rounded
    samples = iter([{0: [0] * 5, 1: [0] * 5}, {0: [0, 0, 0, 150, 50], 1: [0, 0, 0, 200, 0]}])
    assert R.idle_cpus(0.0) == 2  # all idle (iowait counts as idle)
    samples = iter([{0: [0] * 5, 1: [0] * 5}, {0: [200, 0, 0, 0, 0], 1: [0, 0, 200, 0, 0]}])
    assert R.idle_cpus(0.0) == 1  # every CPU busy: still one process
    monkeypatch.undo()
    if Path("/proc/stat").exists():  # the real file: a line of 5 counters for each CPU we may use
        ticks = R._cpu_ticks()
        assert R.usable_cpu_ids() <= ticks.keys() and {len(t) for t in ticks.values()} == {5}
        assert 0.0 <= R.busy_cpus(0.05) <= R.usable_cpus()


def test_auto_uses_ray_only_for_a_cluster_larger_than_this_machine(ray_session, monkeypatch):
    """The test session's local Ray has 2 CPUs: on a machine of 2 usable CPUs auto forks (or draws here
    when they are busy); were this machine a 1-CPU driver of that cluster, auto would send Ray tasks."""
    import moe_ray.plotting.report as R

    monkeypatch.setattr(R, "usable_cpus", lambda: 2)
    monkeypatch.setattr(R, "busy_cpus", lambda window=0.1: 0.0)
    assert R.resolve_parallel("auto", 5) == ("processes", 2)
    assert R.resolve_parallel("auto", 1) == ("none", 1)
    assert R.resolve_parallel("processes", 1) == ("processes", 1)
    monkeypatch.setattr(R, "busy_cpus", lambda window=0.1: 2.0)
    assert R.resolve_parallel("auto", 5) == ("none", 1)
    monkeypatch.setattr(R, "usable_cpus", lambda: 1)
    assert R.resolve_parallel("auto", 5)[0] == "ray"
    with pytest.raises(MoeRayError, match="unknown parallel mode 'threads'"):
        R.resolve_parallel("threads", 5)


@pytest.fixture(scope="module")
def deep_store(ray_session, tmp_path_factory):
    """A real 6-layer model (static analyses and the short dynamic input): more layers than one image holds."""
    root = tmp_path_factory.mktemp("deep")
    ckpt = make_tiny("mixtral", "upcycled", root / "ckpt", config_overrides={"num_hidden_layers": 6})
    return moe_ray.run({"model": str(ckpt.path), "reference": str(ckpt.reference), "store": str(root / "deep.zarr"),
                        "analyses": ["static", "dynamic"], "dynamic": {"inputs": ["short"]}, "progress": False})


PAGED = ("fig1_matrix_similarity", "fig6_matrix_pca", "fig7_neuron_pca_2d", "fig7_neuron_pca_3d",
         "fig8_gate_neuron_avg", "fig2_output_similarity", "fig3_angular_short", "fig4_norms_scores",
         "fig9_rank_counts_short", "fig5_intermediate", "fig10_routing")


def test_deep_model_pages(deep_store, tmp_path):
    """Six layers: every per-layer figure is two labelled images, layers 0-3 and 4-5, each drawing
    exactly its layers; the activation-ratio summary keeps all layers in one image."""
    report = render([deep_store], tmp_path / "rep")
    label = StoreView(deep_store).label
    for key in PAGED:
        figures = [f for f in report.figures if f.key == key]
        assert [f.path.name.rsplit("_", 1)[1] for f in figures] == ["L0-3.png", "L4-5.png"], key
        assert "layers 0–3" in figures[0].title and "layers 4–5" in figures[1].title, key
        assert [sorted({k[1] for k in f.data if k[0] == label}) for f in figures] == [[0, 1, 2, 3], [4, 5]], key
        for f in figures:
            _png_ok(f.path)
    act = next(f for f in report.figures if f.key == "activation_ratio")
    assert act.data[label].shape == (6, 9)  # 6 layers x (8 experts + F)

    fig1 = [f for f in report.figures if f.key == "fig1_matrix_similarity"]
    sim = xr.open_zarr(deep_store, group="static")["matrix_similarity"]
    np.testing.assert_allclose(fig1[1].data[(label, 5, "W_down")], sim.sel(layer=5, matrix="down").values)
    fig10 = [f for f in report.figures if f.key == "fig10_routing"]
    dyn = xr.open_zarr(deep_store, group="dynamic/short")
    shown, topk = fig10[1].data[(label, 4)], dyn["topk_experts"].sel(layer=4).values
    np.testing.assert_allclose(np.take_along_axis(shown, topk, axis=-1), dyn["topk_weights"].sel(layer=4).values,
                               rtol=1e-6)
    assert fig10[1].data[("labels", label, 4)][0] == [str(e) for e in range(8)]  # no F row


def test_tick_labels_fit_and_grids_label_outer_panels():
    tokens = [f"t{i}" for i in range(64)]
    assert tick_positions(tokens, 22) == list(range(0, 64, 3))  # every 3rd of 64 tokens: 22 labels
    experts = [str(e) for e in range(64)] + ["SE"]
    ticks = tick_positions(experts)
    assert len(ticks) <= MAX_TICKS and experts[ticks[-1]] == "SE" and ticks[:3] == [0, 4, 8]
    assert fitting_ticks(3.0) == 22  # 7 pt labels along 3 inches
    assert token_label("Ġopen") == "␣open" and token_label("▁source") == "␣source"
    assert token_label("Ċ") == "⏎" and token_label("abcdefghijklmnop", 8) == "abcdefg…"
    same = (["0", "1"], ["0", "1"])
    shown = grid_labels({(0, 0): same, (0, 1): same, (1, 0): same, (1, 1): same, (0, 2): (["0"], ["0"])})
    assert shown == {(0, 0): (False, True), (0, 1): (False, False), (1, 0): (True, True), (1, 1): (True, False),
                     (0, 2): (True, True)}
