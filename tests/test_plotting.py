"""The plotting job and report (issue 5): real-pipeline stores (mixtral upcycled with its reference,
deepseek_moe scratch with SE and 64 experts), synthetic reorder/dynamic groups, partial and empty stores.
Figures are checked through the data each figure function returns, tables against the store."""
from __future__ import annotations

import csv
import json
import os
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
from moe_ray.plotting.tables import fmt
from moe_ray.plotting.common import expert_labels

from headless_browser import Browser, require_chromium

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
    """Every link of every page of the report resolves (anchors to an id of the page linked)."""
    links = []
    for page in index.parent.glob("*.html"):
        text = page.read_text()
        found = re.findall(r'(?:href|src)="([^"#][^"]*)"', text) + re.findall(r"href='([^'#][^']*)'", text)
        for link in found:
            target, _, anchor = link.partition("#")
            assert (index.parent / target).is_file(), (page.name, link)
            if anchor and target.endswith(".html"):
                assert f"id=\"{anchor}\"" in (index.parent / target).read_text() or \
                    f"id='{anchor}'" in (index.parent / target).read_text(), (page.name, link)
        links += found
    return links


def _text(index: Path) -> str:
    """The text of every page of the report: index.html, then the models' pages."""
    return "".join(p.read_text() for p in [index] + sorted(index.parent.glob("model-*.html")))


def test_report_two_real_stores(stores, tmp_path):
    mix, ds = stores
    report = render([mix, ds], tmp_path / "rep")
    keys = {f.key for f in report.figures}
    assert {"fig1_matrix_similarity", "fig6_matrix_pca", "fig7_neuron_pca_2d", "fig7_neuron_pca_3d",
            "fig8_gate_neuron_avg", "layer_trends"} <= keys
    for f in report.figures:
        _png_ok(f.path)
        assert f.min_font_pt >= 8 and f.size_px[0] <= 1300, (f.path.name, f.min_font_pt, f.size_px)
    links = _links_resolve(report.index)
    assert len([l for l in links if l.endswith(".png")]) >= len(report.figures)
    text = _text(report.index)
    assert "0.1.0" in text and "mixtral" in text and "deepseek_moe" in text and "dense-parent" in text
    assert "no reorder analyses" in text and "no dynamic analyses" in text
    # notes say what is missing where it matters, once: not "mixtral has no shared expert" in every section
    assert "has no shared expert" not in text and text.count("no dense reference") == 0
    assert text.count("SE is not in the maps: the shared expert SE has d_mid") == 1  # Fig 1, DeepSeek
    assert "F is not in the X maps" in text and "none: no F in the figures" in text

    mix_label, ds_label = StoreView(mix).label, StoreView(ds).label
    assert mix_label == "ckpt (mixtral) (synthetic)" and ds_label == "ckpt (deepseek_moe) (synthetic)"
    assert "random weights made by moe-ray make-tiny (variant upcycled" in text

    def figure(key: str, label: str):
        """The first image of `key` drawn for the store `label` (every image shows one store)."""
        return next(f for f in report.figures if f.key == key and any(k[0] == label for k in f.data))

    # Fig 1 draws exactly the store's matrices, F included for mixtral, SE dropped for deepseek.
    fig1 = figure("fig1_matrix_similarity", mix_label)
    sm = xr.open_zarr(mix, group="static")["matrix_similarity"]
    np.testing.assert_allclose(fig1.data[(mix_label, 2, "W_gate")], sm.sel(layer=2, matrix="gate").values)
    assert fig1.data[("labels", mix_label, 2, "W_gate")][0][-1] == "F"
    fig1_ds = figure("fig1_matrix_similarity", ds_label)
    assert not any(k[0] == mix_label for k in fig1_ds.data)
    rows, _ = fig1_ds.data[("labels", ds_label, 1, "W_up")]
    assert len(rows) == 64 and "SE" not in rows
    assert "layer 0: dense FFN, no experts" in fig1_ds.caption  # DeepSeekMoE's layer 0
    # each model its own colour range (the paper: no shared colour bar): the upcycled experts' ~0.8 and
    # the dense parent's ~0.9 fill the mixtral scale, the scratch experts' ~0 the deepseek one
    lo, hi = fig1.data[("range", "sim")]
    assert 0.6 < lo < 0.85 < hi < 1.0
    lo, hi = fig1_ds.data[("range", "sim")]
    assert -0.5 < lo < 0 < hi < 0.5
    shared = render([mix, ds], tmp_path / "shared", shared_scale=True)
    ranges = {f.data[("range", "sim")] for f in shared.figures if f.key == "fig1_matrix_similarity"}
    assert len(ranges) == 1 and next(iter(ranges))[0] < 0 < 0.85 < next(iter(ranges))[1]
    assert "share one colour range" in _text(shared.index)

    # Fig 8 keeps SE in the neuron-average maps of deepseek; the gate map has values for routed experts only,
    # on Y's labels (SE's row and column blank) so the panels line up column for column.
    fig8 = figure("fig8_gate_neuron_avg", ds_label)
    assert fig8.data[("labels", ds_label, 1, "Y_up")][0][-1] == "SE"
    assert fig8.data[("labels", ds_label, 1, "X")] == fig8.data[("labels", ds_label, 1, "Y_up")]
    x_map = fig8.data[(ds_label, 1, "X")]
    assert np.isnan(x_map[-1]).all() and np.isfinite(x_map[:64, :64]).all()
    assert set(k[1] for k in fig8.data if k[0] == "range") == {"x", "y"}  # a colour bar per quantity

    # Fig 6 lists DBSCAN-removed experts exactly as the store marks them, drawn inside the panel.
    fig6 = figure("fig6_matrix_pca", mix_label)
    assert fig6.data[("dbscan",)] == (50.0, 2)
    outliers = xr.open_zarr(mix, group="static")["matrix_pca_outlier"]
    labels = expert_labels(xr.open_zarr(mix, group="static"), "expert")
    assert outliers.values.any()
    for layer in range(4):
        for m in ("up", "gate", "down"):
            drawn = fig6.data[(mix_label, layer, m)]
            assert drawn["removed"] == [labels[i] for i in np.flatnonzero(outliers.sel(layer=layer, matrix=m).values)]
            (x0, x1), (y0, y1) = drawn["limits"]
            for x, y in drawn["removed_drawn_at"]:
                assert x0 < x < x1 and y0 < y < y1
    fig6_ds = figure("fig6_matrix_pca", ds_label)
    assert fig6_ds.data[("dbscan",)][0] is None and "DBSCAN not run" in fig6_ds.caption

    # Fig 7: the shared expert is named in the key beside the routed experts' colour bar; points are drawn
    # in a shuffled order, so the last ones drawn come from many experts, not the last expert.
    fig7 = figure("fig7_neuron_pca_2d", ds_label)
    assert fig7.data[("key",)] == {"legend": ["SE"], "colorbar": ["0", "63"]}
    order = fig7.data[("order", ds_label, 1, "up")]
    assert len(set(order[-200:])) > 40 and order != sorted(order, key=lambda lab: (not lab.isdigit(), lab))

    # Per-layer means: S_ee and S_ef of the weights, by hand from the store.
    trends = figure("layer_trends", mix_label)
    layers = list(range(4))
    off = ~np.eye(8, dtype=bool)
    routed = sm.sel(matrix="gate", expert_i=list(range(8)), expert_j=list(range(8))).values
    np.testing.assert_allclose(trends.data[(mix_label, "weights", "gate", "S_ee")],
                               [routed[l][off].mean() for l in layers], rtol=1e-6)
    np.testing.assert_allclose(trends.data[(mix_label, "weights", "gate", "S_ef")],
                               sm.sel(matrix="gate", expert_i=list(range(8)), expert_j=-1).values.mean(-1),
                               rtol=1e-6)
    assert (ds_label, "weights", "up", "S_ef") not in figure("layer_trends", ds_label).data  # no F there

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
    assert next(r_ for r_ in tab4.rows if r_[0] == 0)[4:] == ["dense FFN"] * 3  # deepseek layer 0 is dense
    assert tab4.header_groups == [("", 1), (mix_label, 3), (ds_label, 3)]  # model, then matrix
    assert f'<th colspan="3">{mix_label}</th>' in text and "<th>Y_gate</th>" in text
    # fixed decimals as in the paper (R to 2 places): 0.8 is not printed beside 0.7983
    assert f"<td>{layer3[2]:.2f}</td>" in text


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
    assert "static layers [1] not finished" in _text(index)
    fig1 = fig1_matrix_similarity([StoreView(partial)], tmp_path)[0]
    assert {k[1] for k in fig1.data if k[0] not in ("labels", "range", "extend")} == {0, 2, 3}

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
    from moe_ray.checkpoint.tiny import PLANTED_NAME
    from moe_ray.plotting.common import TINY_PLANTED_NAME

    assert TINY_PLANTED_NAME == PLANTED_NAME  # spelled out so the report needs no torch
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
    upper = np.triu(np.ones((E, E), dtype=bool), 1)  # the store fills pairs i < j only
    before = np.where(upper, rng.uniform(1e-4, 2e-4, (2, 3, E, E)), np.nan)
    # separate mode grows like the paper's DeepSeek/Grok (about 1e-4 -> 1e-2: x101, relative growth 100),
    # joint mode like its Mixtral (almost unchanged: relative growth 1e-3)
    afters = {"separate": before * 101, "joint": before * 1.001}
    taus = {}
    for mode, tau_dims in (("joint", ("layer", "expert_i", "expert_j")),
                           ("separate", ("layer", "matrix", "expert_i", "expert_j"))):
        tau = np.where(upper, rng.uniform(-1, 1, (2, E, E) if mode == "joint" else (2, 3, E, E)), np.nan)
        taus[mode] = tau
        after = afters[mode]
        _write(store, f"reorder/{mode}", xr.Dataset(
            {"similarity_before": (("layer", "matrix", "expert_i", "expert_j"), before),
             "similarity_after": (("layer", "matrix", "expert_i", "expert_j"), after),
             "growth": (("layer", "matrix", "expert_i", "expert_j"), (after - before) / np.abs(before)),
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
    return store, {"E": E, "T": T, "k": k, "labels": labels, "before": before, "afters": afters, "taus": taus,
                   "scores": scores, "topk": topk, "weights": weights, "counts": counts}


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
    label = StoreView(store).label

    # Tab 2: one row per model and mode, the paper's separate mode first, joint labelled as the extension;
    # medians over layers, pairs i<j and matrices; the order of growth as the paper prints it.
    tab2, tab2_joint = (next(t for t in report.tables if t.key == key) for key in ("tab2_reorder", "tab2_reorder_joint"))
    assert report.tables.index(tab2) < report.tables.index(tab2_joint) and "extension" in tab2_joint.title
    upper = np.isfinite(w["before"])
    for table, mode, order in ((tab2, "separate", "100"), (tab2_joint, "joint", "1e-3")):
        (row,) = table.rows
        assert row[:3] == [label, 2, 2 * E * (E - 1) // 2]  # layers x pairs, in all
        finite = ((w["afters"][mode] - w["before"]) / np.abs(w["before"]))[upper]
        assert row[8] == f"{fmt(np.quantile(finite, 0.25), 'sig3')} – {fmt(np.quantile(finite, 0.75), 'sig3')}"
        assert row[3] == pytest.approx(np.median(w["before"][upper]))
        assert row[4] == pytest.approx(np.median(w["afters"][mode][upper]))
        assert row[5] == pytest.approx(100.0 if mode == "separate" else 1e-3, rel=1e-4)
        assert row[7] == pytest.approx(np.nanmedian(w["taus"][mode]))
        assert f"<td>{order}</td>" in _text(report.index)
    assert "(after - before) / |before|" in tab2.note or "(similarity after - similarity before)" in tab2.note

    fig2 = next(f for f in report.figures if f.key == "fig2_output_similarity")
    assert fig2.data[("topk", label, 1, 3)] == list(topk[1, 3])
    assert "‡" in tab2.note and "31.6" in tab2.note and "‡" not in "".join(map(str, tab2.rows[0]))

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

    # Fig 4: norms of every label (F too) on one scale for the model's layers, gate scores in the same
    # columns (F's blank: no router), colour from 0 to their max over every layer.
    fig4 = next(f for f in report.figures if f.key == "fig4_norms_scores")
    norm_labels, score_labels, _ = fig4.data[("labels", label, 1)]
    assert norm_labels == score_labels == w["labels"]
    np.testing.assert_allclose(fig4.data[(label, 1, "score")][:, :E], scores[1])
    assert np.isnan(fig4.data[(label, 1, "score")][:, E]).all()
    assert fig4.data[("range", "score")] == pytest.approx((0.0, scores.max()))
    norms = xr.open_zarr(store, group="dynamic/short")["expert_output_norms"].values
    assert fig4.data[("range", "norm")] == pytest.approx((0.0, norms.max()))

    fig9 = next(f for f in report.figures if f.key == "fig9_rank_counts_short")
    np.testing.assert_array_equal(fig9.data[(label, 1, "rank counts (short)")], w["counts"][1])
    act = next(f for f in report.figures if f.key == "activation_ratio")
    assert act.data[label].shape == (2, len(w["labels"]))
    fig3 = next(f for f in report.figures if f.key == "fig3_angular_short")
    assert (label, 3, "W_up") in fig3.data  # static layers beside the dynamic ones
    assert set(k[1] for k in fig3.data if k[0] == "range") == {"ang", "sim"}  # outputs and weights: two scales
    # Fig 4's norms relative to each token's largest (its ranking in colour); Fig 9 centred on the uniform count
    np.testing.assert_allclose(np.nanmax(fig4.data[(label, 1, "norm_relative")], axis=-1), 1.0)
    assert fig9.data[("center", "count")] == pytest.approx(np.median(w["counts"].mean(axis=(1, 2))))
    assert act.data[("range",)] == (0.0, 1.0)  # a fixed scale; the numbers are in the table
    ratio_table = next(t for t in report.tables if t.key == "activation_ratio")
    assert ratio_table.rows[0][:3] == [label, "short", T]
    # the inputs, in full as tokenised, and the tokens each figure shows
    assert (tmp_path / "rep" / "inputs" / "short.txt").read_text() == "<s>As an open source"
    assert "all 5 tokens of the short input" in next(f for f in report.figures if f.key == "fig2_output_similarity").caption
    # Fig 2 shows the short input before the long one, as the paper does
    assert [f.title.split("(")[1].split()[0] for f in report.figures if f.key == "fig10_routing"] == ["short", "text"]

def test_tab2_marks_an_order_whose_iqr_straddles_a_rounding_boundary(synthetic, tmp_path):
    """Medians 31 (IQR 26 – 36, straddling 10^1.5 = 31.6) and 32 (IQR 31.9 – 32.1): the paper's orders 10 and
    100, the first marked ‡ with its boundary and its ends' orders, in Tab 2 and the comparison across models."""
    from moe_ray.plotting import tables as T
    from moe_ray.plotting.report import _table_html

    store = _copy(synthetic[0], tmp_path / "boundary.zarr")
    upper = np.triu(np.ones((4, 4), dtype=bool), 1)
    coords = {"layer": [0, 1], "matrix": ["up", "gate", "down"], "expert_i": list("0123"), "expert_j": list("0123")}
    for mode, (low, high) in (("separate", (21.0, 41.0)), ("joint", (31.8, 32.2))):
        growth = np.full((2, 3, 4, 4), np.nan)
        growth[:, :, upper] = np.linspace(low, high, 36).reshape(2, 3, 6)  # median (low + high) / 2
        _write(store, f"reorder/{mode}", xr.Dataset(
            {"growth": (("layer", "matrix", "expert_i", "expert_j"), growth)}, coords=coords))
    view = StoreView(store, label="m")
    (separate,), (joint,) = T.tab2_rows([view], "separate"), T.tab2_rows([view], "joint")
    assert separate[5] == pytest.approx(31.0) and separate[6] == "10 ‡"
    assert separate[8] == "26.0 – 36.0 ‡ straddles 31.6: orders 10 to 100"
    assert joint[5] == pytest.approx(32.0) and joint[6] == "100" and joint[8] == "31.9 – 32.1"
    tab2 = next(t for t in T.tab2_reorder([view]) if t.key == "tab2_reorder")
    T.write_csv(tab2, tmp_path)
    assert "<td>31.0</td><td>10 ‡</td>" in _table_html(tab2)
    comparison = T.comparison([view])[0]
    rows = {row[0]: row[1] for row in comparison.rows}
    assert rows["Tab 2: order of growth"] == "10 ‡"
    T.write_csv(comparison, tmp_path)
    assert "10 ‡</td>" in _table_html(comparison)  # text in a column of numbers, printed as it is


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
        if key == "fig5_intermediate":  # two tokens an image (every neuron beside the zoom), 4 tokens kept
            assert [f.path.name.split("_", 4)[4] for f in figures] == \
                ["L0-3_T0-1.png", "L0-3_T2-3.png", "L4-5_T0-1.png", "L4-5_T2-3.png"]
            figures = figures[::2]
        assert [f.path.name.split("_T")[0].rsplit("_", 1)[1].replace(".png", "") for f in figures] == \
            ["L0-3", "L4-5"], key
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
    assert fitting_ticks(3.0) == 20  # 8 pt labels along 3 inches
    assert token_label("Ġopen") == "␣open" and token_label("▁source") == "␣source"
    assert token_label("Ċ") == "⏎" and token_label("abcdefghijklmnop", 8) == "abcdefg…"
    same = (["0", "1"], ["0", "1"])
    shown = grid_labels({(0, 0): same, (0, 1): same, (1, 0): same, (1, 1): same, (0, 2): (["0"], ["0"])})
    assert shown == {(0, 0): (False, True), (0, 1): (False, False), (1, 0): (True, True), (1, 1): (True, False),
                     (0, 2): (True, True)}


def test_table_cells_fixed_decimals():
    """Fixed decimals per column as the paper prints them, orders of magnitude as it writes them."""
    assert [fmt(0.8, ".3f"), fmt(0.79834, ".3f"), fmt(1.0, ".4f"), fmt(-0.0002, ".4f"), fmt(-0.0001, ".2f")] == \
        ["0.800", "0.798", "1.0000", "-0.0002", "0.00"]
    assert [fmt(0.001, "order"), fmt(100.0, "order"), fmt(float("nan"), ".3f"), fmt(None), fmt("dense FFN", ".2f")] == \
        ["1e-3", "100", "—", "—", "dense FFN"]
    assert [fmt(x, "sig3") for x in (0.8, 0.000150, 12.34, 100.0, 0.0, 1.5e-5, -6.73e-5, 0.0009996, 2.5e-7)] == \
        ["0.800", "0.000150", "12.3", "100", "0.00", "0.0000150", "-0.0000673", "0.00100", "2.50e-07"]


@pytest.fixture(scope="module")
def chromium():
    """Debian's chromium; `make test` installs it, so there a missing browser fails the test."""
    return require_chromium()


PAGE_METRICS = """(async () => {
  const sleep = ms => new Promise(r => setTimeout(r, ms));
  const root = document.documentElement;
  for (let y = 0; y < root.scrollHeight; y += window.innerHeight / 2) { window.scrollTo(0, y); await sleep(20); }
  window.scrollTo(0, 0);
  const images = [...document.images];
  await Promise.all(images.map(img => img.complete ? img.decode().catch(() => null)
                                                  : new Promise(r => { img.onload = img.onerror = r; })));
  const texts = [...document.body.querySelectorAll('*')].filter(
      e => [...e.childNodes].some(n => n.nodeType === 3 && n.textContent.trim()) && e.getClientRects().length);
  return {
    clientWidth: root.clientWidth, scrollWidth: root.scrollWidth, innerWidth: window.innerWidth,
    smallestTextPx: Math.min(...texts.map(e => parseFloat(getComputedStyle(e).fontSize))),
    sections: [...document.querySelectorAll('section')].map(e => [e.id, e.getBoundingClientRect().top + scrollY]),
    tables: [...document.querySelectorAll('table')].map(t => [t.getBoundingClientRect().width,
                                                              t.parentElement.getBoundingClientRect().width]),
    images: images.map(img => {
      const box = img.getBoundingClientRect();
      return {src: img.getAttribute('src'), complete: img.complete, naturalWidth: img.naturalWidth,
              naturalHeight: img.naturalHeight, width: box.width, left: box.left, right: box.right,
              minFontPt: parseFloat(img.dataset.minFontPt), dpi: parseFloat(img.dataset.dpi)};
    }),
  };
})()"""


def test_report_in_a_real_browser(synthetic, stores, chromium, tmp_path):
    """Every page of the report (index.html and the models' pages) in headless chromium at a 1,400 px wide
    window, as a reader sees it: every image loads, nothing overflows sideways, each figure is shown at its
    own width (not shrunk) so its smallest text is at least 8 pt on the screen, and every table fits.
    Screenshots at that width go to tmp_path (and to $MOE_RAY_SCREENSHOTS when set, to look at)."""
    store, _ = synthetic
    _, ds = stores
    report = render([store, ds], tmp_path / "rep")
    shots = Path(os.environ.get("MOE_RAY_SCREENSHOTS") or tmp_path / "shots")
    shots.mkdir(parents=True, exist_ok=True)
    assert report.pages[0] == report.index and len(report.pages) == 3  # index + one page per model
    shown = []
    with Browser(chromium) as browser:
        for html_page in report.pages:
            browser.open(html_page.as_uri(), width=1400, height=1000)
            page = browser.evaluate(PAGE_METRICS)
            browser.screenshot(shots / f"{html_page.stem}-top.png")
            for key, top in page["sections"]:
                browser.screenshot(shots / f"{html_page.stem}-{key}.png", y=top, height=1400)
            assert page["innerWidth"] == 1400
            assert page["scrollWidth"] <= page["clientWidth"], (html_page.name, "scrolls sideways at 1,400 px")
            for width, room in page["tables"]:
                assert width <= room + 0.5, (width, room)
            assert page["smallestTextPx"] >= 12
            shown += [{**img, "client": page["clientWidth"]} for img in page["images"]]
    assert len(shown) == len(report.figures)
    sizes = {f.path.name: f.size_px for f in report.figures}
    for img in shown:
        name = img["src"].rsplit("/", 1)[1]
        assert img["complete"] and (img["naturalWidth"], img["naturalHeight"]) == sizes[name], img
        assert img["right"] <= img["client"] and img["left"] >= 0, img
        scale = img["width"] / img["naturalWidth"]
        smallest_pt = img["minFontPt"] * img["dpi"] / 72 * scale * 72 / 96  # image pt -> screen px -> CSS pt
        assert scale > 0.99 and smallest_pt >= 8, (name, scale, smallest_pt)
