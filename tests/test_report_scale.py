"""The report at real widths and depths (issue 22) and for stores that are not complete (issue 23): Fig 5's
vertical lines at Mixtral's 14,336 neurons read back from the PNG's pixels, one colour range per model over
all its pages, token choice, a failed store's `plot`. Stores are written here with the schema's names and
dims (no pipeline run), so the module stays fast."""
from __future__ import annotations

import re

import numpy as np
import pytest
import xarray as xr
import zarr
from PIL import Image

from moe_ray.cli import main as cli_main
from moe_ray.errors import MoeRayError
from moe_ray.plotting import render
from moe_ray.plotting.common import StoreView, expert_labels
from moe_ray.plotting.dynamic import bin_max, fig2_output_similarity, fig4_norms_scores, fig5_intermediate
from moe_ray.plotting.report import parse_tokens

MIXTRAL_D_MID = 14_336


def make_store(path, model: dict, groups: dict[str, xr.Dataset], state: str = "complete",
               error: str | None = None) -> str:
    """A moe-ray store holding `groups` (xarray Datasets written as zarr v3 groups) under root attributes
    like the pipeline's."""
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    root.attrs.update({"moe_ray": {"version": "test", "schema_version": 1}, "model": model, "state": state,
                       "error": error, "spec": {}})
    for name, ds in groups.items():
        ds.to_zarr(str(path), group=name, mode="w", zarr_format=3, consolidated=False)
    return str(path)


def dynamic_group(n_layers: int, n_tokens: int, labels: list[str], n_neurons: int, states: np.ndarray,
                  rng: np.random.Generator) -> xr.Dataset:
    experts = [lab for lab in labels if lab.isdigit()]
    E, L = len(experts), len(labels)
    scores = rng.dirichlet(np.ones(E), (n_layers, n_tokens))
    scores = np.concatenate([scores, np.full((n_layers, n_tokens, L - E), np.nan)], axis=-1)
    topk = np.argsort(-np.nan_to_num(scores, nan=-1), axis=-1)[..., :2]
    similarity = rng.uniform(-0.2, 0.6, (n_layers, n_tokens, L, L))
    similarity[..., np.arange(L), np.arange(L)] = 1.0  # an output's cosine with itself
    return xr.Dataset(
        {"tokens": (("token",), np.array([f"t{i}" for i in range(n_tokens)], dtype=object)),
         "gate_scores": (("layer", "token", "expert"), scores),
         "topk_experts": (("layer", "token", "k"), topk),
         "expert_output_norms": (("layer", "token", "expert"), rng.uniform(0.5, 2.0, (n_layers, n_tokens, L))
                                 * (1 + np.arange(n_layers))[:, None, None]),
         "expert_output_similarity": (("layer", "token", "expert_i", "expert_j"), similarity),
         "intermediate_states": (("layer", "probe_token", "expert", "neuron"), states)},
        coords={"layer": np.arange(n_layers), "token": np.arange(n_tokens), "probe_token": np.arange(states.shape[1]),
                "expert": labels, "expert_i": labels, "expert_j": labels, "k": np.arange(2),
                "neuron": np.arange(n_neurons)})


@pytest.fixture(scope="module")
def wide_store(tmp_path_factory):
    """One layer of a Mixtral-width model (8 experts + F, 14,336 neurons), one stored token: |values| about
    0.05, neuron 9,001 planted at 0.6 in every expert and F, as §5.3's vertical lines."""
    rng = np.random.default_rng(0)
    labels = [str(e) for e in range(8)] + ["F"]
    states = rng.normal(0, 0.05, (1, 1, len(labels), MIXTRAL_D_MID))
    states[..., 9001] = 0.6
    model = {"family": "mixtral", "num_layers": 1, "moe_layers": [0], "num_experts": 8, "top_k": 2}
    path = tmp_path_factory.mktemp("wide") / "wide.zarr"
    return make_store(path, model, {"dynamic/short": dynamic_group(1, 3, labels, MIXTRAL_D_MID, states, rng)})


def test_fig5_hot_neuron_visible_at_mixtral_width(wide_store, tmp_path):
    """A single neuron active in every expert is a vertical line in the PNG at its place (read back from the
    pixels), though the panel has ~65 neurons a pixel; the zoom panel is the window around it."""
    (figure,) = fig5_intermediate([StoreView(wide_store)], tmp_path)
    label = StoreView(wide_store).label
    binned = figure.data[("binned", label, 0, 0)]
    per = -(-MIXTRAL_D_MID // binned.shape[-1])
    assert per > 60 and binned.shape[-1] <= 220  # more neurons than pixels: binned
    np.testing.assert_allclose(binned[:, 9001 // per], 0.6)  # the largest of its bin, in every row
    start, window = figure.data[("zoom", label, 0, 0)]
    assert start <= 9001 < start + window.shape[-1]

    x0, y0, x1, y1 = figure.data[("panel_px", label, 0, 0)]
    pixels = np.asarray(Image.open(figure.path).convert("RGB"), dtype=np.float64)
    panel = pixels[y0 + 3:y1 - 3, x0 + 2:x1 - 2]
    brightness = panel.mean(axis=-1)  # inferno: bright = large
    column_mean = brightness.mean(axis=0)
    expected = int(round((9001 + 0.5) / MIXTRAL_D_MID * (x1 - x0))) - 2
    hot = np.flatnonzero(column_mean > column_mean.mean() + 4 * column_mean.std())
    assert hot.size and all(abs(h - expected) <= 2 for h in hot), (hot, expected)
    # bright in every expert's row, not only on average: the line crosses the whole panel
    assert (brightness[:, hot[0]] > np.median(brightness) + 80).mean() > 0.9


def test_bin_max_keeps_the_largest_and_pads_with_nan():
    values = np.array([[0.1, 0.9, 0.2, 0.3, np.nan], [np.nan] * 5])
    binned, per = bin_max(values, 2)
    assert per == 3
    np.testing.assert_array_equal(binned[0], [0.9, 0.3])
    assert np.isnan(binned[1]).all()


@pytest.fixture(scope="module")
def deep_dynamic(tmp_path_factory):
    """Ten layers whose norms grow with depth (layer l about l + 1 times layer 0's), 12 tokens, 8 experts
    and a shared expert (SE) of twice their width."""
    rng = np.random.default_rng(1)
    labels = [str(e) for e in range(8)] + ["SE"]
    states = np.abs(rng.normal(0, 0.05, (10, 2, 9, 64)))
    states[:, :, :8, 32:] = np.nan  # routed experts: 32 neurons; SE: 64
    model = {"family": "deepseek_moe", "num_layers": 10, "moe_layers": list(range(10)), "num_experts": 8,
             "top_k": 2}
    path = tmp_path_factory.mktemp("deep-dyn") / "deep.zarr"
    return make_store(path, model, {"dynamic/short": dynamic_group(10, 12, labels, 64, states, rng)})


def test_one_colour_range_per_model_over_all_pages(deep_dynamic, tmp_path):
    """Every image of a figure (three pages of layers) has the same range, spanning all layers: Fig 4's
    norms from 0 to the deepest layer's largest; Fig 2's diagonal (1) above the range, marked (extend)."""
    calls = []
    report = render([deep_dynamic], tmp_path / "rep", parallel="none", on_figure=lambda *c: calls.append(c))
    # on_figure: once per image as it is drawn, counting drawing tasks up to their total
    assert sorted(c[2] for c in calls) == sorted(f.path.name for f in report.figures)
    assert calls[-1][0] == calls[-1][1] and [c[0] for c in calls] == sorted(c[0] for c in calls)
    norms = xr.open_zarr(deep_dynamic, group="dynamic/short", consolidated=False)["expert_output_norms"].values
    fig4 = [f for f in report.figures if f.key == "fig4_norms_scores"]
    assert len(fig4) == 3
    assert len({f.data[("range", "norm")] for f in fig4}) == 1
    assert fig4[0].data[("range", "norm")] == pytest.approx((0.0, norms.max()))
    fig2 = [f for f in report.figures if f.key == "fig2_output_similarity"]
    assert len({f.data[("range",)] for f in fig2}) == 1 and {f.data[("extend",)] for f in fig2} == {"max"}
    fig5 = [f for f in report.figures if f.key == "fig5_intermediate"]
    assert len({f.data[("range",)] for f in fig5}) == 1
    assert "one colour range for all this model's layers" in fig4[0].caption
    # the per-layer means hold the norms: median and IQR over tokens x routed experts per layer, SE beside
    trends = next(f for f in report.figures if f.key == "layer_trends")
    label = StoreView(deep_dynamic).label
    routed = norms[:, :, :8].reshape(10, -1)
    np.testing.assert_allclose(trends.data[(label, "norms", "short", "experts")], np.median(routed, axis=1))
    np.testing.assert_allclose(trends.data[(label, "norms", "short", "experts", "iqr")],
                               np.quantile(routed, [0.25, 0.75], axis=1).T)
    np.testing.assert_allclose(trends.data[(label, "norms", "short", "SE")], np.median(norms[:, :, 8], axis=1))
    assert "SE is wider than the routed experts (32 neurons)" in fig5[0].caption


def test_token_choice(deep_dynamic, tmp_path):
    """`tokens`: chosen positions drawn (Fig 2, 4), "all" pages through every token."""
    assert parse_tokens("0,3,5-6") == [0, 3, 5, 6] and parse_tokens("all") == "all" and parse_tokens(None) is None
    with pytest.raises(MoeRayError, match="--tokens"):
        parse_tokens("first")
    view = StoreView(deep_dynamic, layers=[0])
    view.tokens = [2, 11]
    fig2 = fig2_output_similarity([view], tmp_path)
    assert [f.data[("tokens",)] for f in fig2] == [[2, 11]] and "tokens 2, 11 of 12" in fig2[0].title
    (fig4,) = fig4_norms_scores([view], tmp_path)
    assert fig4.data[("tokens",)] == [2, 11] and fig4.data[(view.label, 0, "norm")].shape[0] == 2
    view.tokens = "all"
    fig2 = fig2_output_similarity([view], tmp_path)
    assert [f.data[("tokens",)] for f in fig2] == [list(range(5)), list(range(5, 10)), [10, 11]]  # 5 fit a row


def test_failed_and_partial_stores_say_so(deep_dynamic, tmp_path, capsys):
    """A failed store with nothing to draw: one line, exit 2, no output directory; a failed or partial
    store that has something: the page and the summary line say so."""
    model = {"family": "mixtral", "num_layers": 2, "moe_layers": [0, 1], "num_experts": 8, "top_k": 2}
    failed = make_store(tmp_path / "failed.zarr", model, {}, state="failed", error="NaN in layer 0's weights")
    assert cli_main(["plot", failed, "--out", str(tmp_path / "f")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"moe-ray: error: nothing to draw: {StoreView(failed).label} failed: NaN in layer 0's weights"]
    assert not (tmp_path / "f").exists()

    root = zarr.open_group(deep_dynamic, mode="r+")
    done = root["dynamic/short"].create_array("unit_done", shape=(10,), dtype="int8", dimension_names=["layer"])
    done[:] = np.array([1] * 7 + [0] * 3, dtype="int8")
    root.attrs["state"] = "failed"
    root.attrs["error"] = "worker died"
    try:
        report = render([deep_dynamic], tmp_path / "partial", parallel="none")
        text = report.index.read_text()
        assert "failed: worker died (dynamic 7/10 units done)" in report.summary()
        assert "Not every store is complete" in text and "dynamic 7/10 units done" in text
    finally:
        del root["dynamic/short/unit_done"]
        root.attrs["state"] = "complete"


def test_expert_labels_prefer_the_label_coordinate():
    ds = xr.Dataset(coords={"expert": [0, 1, -1], "expert_label": ("expert", ["0", "1", "F"])})
    assert expert_labels(ds, "expert") == ["0", "1", "F"]
    assert expert_labels(xr.Dataset(coords={"expert": ["0", "SE"]}), "expert") == ["0", "SE"]


def test_findings_statistics_on_planted_truths():
    """Each finding's statistic on arrays whose answer is known."""
    from moe_ray.plotting.findings import (cross_stat, depth_trend, norm_score_stat, top_gap, trend_threshold,
                                           vertical_lines)

    rng = np.random.default_rng(0)
    maps = np.full((6, 8, 8), 0.3) + rng.normal(0, 0.005, (6, 8, 8))
    maps = (maps + maps.transpose(0, 2, 1)) / 2
    maps[:4, 3, :] = maps[:4, :, 3] = 0.1  # expert 3 distinct in 4 of 6 layers: a dark cross
    fraction, counts = cross_stat(maps)
    assert fraction == pytest.approx(4 / 6) and counts == {3: 4}
    assert cross_stat(np.full((3, 8, 8), 0.3) + rng.normal(0, 0.001, (3, 8, 8)))[0] == 0  # noise is no cross
    assert depth_trend(np.linspace(0.4, 0.2, 10), list(range(10))) == pytest.approx(-1.0)
    assert trend_threshold(32) == pytest.approx(2 / np.sqrt(31))
    norms = rng.uniform(1, 2, (2, 50, 8))
    scores = np.exp(4 * norms) / np.exp(4 * norms).sum(-1, keepdims=True)  # the larger the norm, the higher
    assert norm_score_stat(norms, scores) == pytest.approx((1.0, 1.0))
    assert norm_score_stat(norms, rng.permuted(scores, axis=-1))[0] < 0.4
    assert top_gap(np.array([[0.6, 0.2, 0.2], [0.5, 0.25, 0.25]])) == pytest.approx(2.5)
    shared = rng.uniform(0, 1, 256)
    lines = shared + rng.normal(0, 0.1, (1, 1, 8, 256))  # every expert active alike at each neuron index
    assert vertical_lines(lines) > 0.8 and abs(vertical_lines(rng.normal(0, 1, (1, 1, 8, 256)))) < 0.1


def test_findings_section(deep_dynamic, tmp_path):
    """The findings table of a store with dynamic analyses only: the static observations say what they need,
    the dynamic ones carry this model's numbers (norms grow with depth here: planted)."""
    from moe_ray.plotting.findings import findings_tables

    (table,) = findings_tables([StoreView(deep_dynamic)])
    rows = {(r[0], r[1][:20]): r for r in table.rows}
    assert rows[("§4.3 (1)", "Mixtral has experts ")][2] == "needs static analyses"
    grow = next(r for r in table.rows if r[1].startswith("the deeper the layer"))
    assert grow[3] > 0.9 and grow[4] == "yes" and grow[5] == "DeepSeek: grows, less than Mixtral"
    assert "paper's numbers are for DeepSeek" in table.note


def test_shape_gives_the_real_depth_and_expert_counts():
    """make-tiny --shape: the flavor's depth and expert counts at tiny width; a mismatched family refused."""
    from moe_ray.checkpoint.families import get_family
    from moe_ray.checkpoint.tiny import shape_overrides

    for family, shape, layers, moe, experts in (("mixtral", "mixtral:8x7B", 32, 32, 8),
                                                 ("deepseek_moe", "deepseek_moe:16B", 28, 27, 64),
                                                 ("grok1", "314B", 64, 64, 8)):
        adapter = get_family(family)
        config = {**adapter.tiny_config(), **shape_overrides(family, shape)}
        facts = adapter.facts(config)
        assert (int(config["num_hidden_layers"]), len(facts.moe_layers), facts.num_experts) == (layers, moe, experts)
        assert facts.d_hid == adapter.facts(adapter.tiny_config()).d_hid  # tiny width kept
    with pytest.raises(MoeRayError, match="a grok1 flavor for a mixtral checkpoint"):
        shape_overrides("mixtral", "grok1:314B")
    with pytest.raises(MoeRayError, match="unknown mixtral flavor '9x9B'"):
        shape_overrides("mixtral", "9x9B")


def static_group(n_layers: int, labels: list[str], rng: np.random.Generator) -> xr.Dataset:
    """`static` with Fig 1's matrix similarity, every layer done, similarity falling with depth."""
    L = len(labels)
    sim = rng.uniform(0.0, 0.2, (n_layers, 3, L, L)) + np.linspace(0.4, 0.1, n_layers)[:, None, None, None]
    sim = (sim + sim.transpose(0, 1, 3, 2)) / 2
    sim[..., np.arange(L), np.arange(L)] = 1.0
    return xr.Dataset({"matrix_similarity": (("layer", "matrix", "expert_i", "expert_j"), sim),
                       "unit_done": (("layer",), np.ones(n_layers, dtype="int8"))},
                      coords={"layer": np.arange(n_layers), "matrix": ["up", "gate", "down"], "expert_i": labels,
                              "expert_j": labels})


def test_real_depth_pages_in_a_browser(tmp_path, monkeypatch):
    """Grok-1's depth (64 layers x 8 experts) beside a second model: index.html and a page per model, split
    per section past the page budget (set small here); every page's links and layer anchors resolve, images
    load lazily and are shown unscaled at 1,400 px in headless chromium; one colour range over 16 images."""
    from headless_browser import Browser, require_chromium

    from moe_ray.plotting import report as R

    rng = np.random.default_rng(2)
    grok = make_store(tmp_path / "grok.zarr", {"family": "grok1", "num_layers": 64, "moe_layers": list(range(64)),
                                               "num_experts": 8, "top_k": 2},
                      {"static": static_group(64, [str(e) for e in range(8)], rng)})
    mix = make_store(tmp_path / "mix.zarr", {"family": "mixtral", "num_layers": 4, "moe_layers": list(range(4)),
                                             "num_experts": 8, "top_k": 2},
                     {"static": static_group(4, [str(e) for e in range(8)] + ["F"], rng)})
    monkeypatch.setattr(R, "PAGE_BUDGET", 150_000)
    report = render([grok, mix], tmp_path / "rep", parallel="none")
    fig1 = [f for f in report.figures if f.key == "fig1_matrix_similarity" and f.store == StoreView(grok).label]
    assert len(fig1) == 16 and len({f.data[("range", "sim")] for f in fig1}) == 1
    names = sorted(p.name for p in report.pages)
    grok_fig1 = R.model_page_name(StoreView(grok).label, "fig1-1")
    assert names[0] == "index.html" and grok_fig1 in names  # split by section (and by part past the budget)
    assert R.model_page_name(StoreView(mix).label) in names  # small enough for one page
    sizes = {p.name: p.stat().st_size + sum((p.parent / src).stat().st_size
                                           for src in re.findall(r'<img src="([^"]+)"', p.read_text()))
             for p in report.pages}
    assert max(sizes.values()) < 150_000 + 60_000, sizes  # the budget, give or take the last image
    trend = next(r for t in report.tables if t.key.startswith("findings_grok") for r in t.rows
                 if r[1].startswith("experts' weights are less similar"))
    assert trend[3] < -0.9 and trend[4] == "yes"  # planted: similarity falls with depth
    for page in report.pages:  # links to other pages land on an id there
        for target, anchor in re.findall(r"href='([^'#]+\.html)#([^']+)'", page.read_text()):
            text = (page.parent / target).read_text()
            assert f'id="{anchor}"' in text or f"id='{anchor}'" in text, (page.name, target, anchor)
    chromium = require_chromium()
    with Browser(chromium) as browser:
        for page in report.pages:
            browser.open(page.as_uri(), width=1400, height=1000)
            info = browser.evaluate("""(async () => {
              const ids = new Set([...document.querySelectorAll('[id]')].map(e => e.id));
              const imgs = [...document.images];
              for (let y = 0; y < document.documentElement.scrollHeight; y += 500) {
                window.scrollTo(0, y); await new Promise(r => setTimeout(r, 20)); }
              await Promise.all(imgs.map(i => i.decode().catch(() => null)));
              return {lazy: imgs.every(i => i.loading === 'lazy'), loaded: imgs.every(i => i.naturalWidth > 0),
                      unscaled: imgs.every(i => Math.abs(i.width - i.naturalWidth) < 1),
                      local: [...document.querySelectorAll('a[href^="#"]')].every(a => ids.has(a.hash.slice(1))),
                      scroll: document.documentElement.scrollWidth <= document.documentElement.clientWidth,
                      layers: [...document.querySelectorAll('.layers a')].length, images: imgs.length};
            })()""")
            assert info["lazy"] and info["loaded"] and info["unscaled"] and info["local"] and info["scroll"], \
                (page.name, info)
            if page.name == grok_fig1:
                assert info["layers"] == 16 and 2 <= info["images"] < 16  # every layer page, over the parts
