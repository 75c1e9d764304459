"""Figures of the dynamic (text in) analyses, from `dynamic/<input>/*` (paper §5, App D, App E):
Fig 2 per-token expert-output similarity with each token's top-k above the map, Fig 3 averaged
angular similarity beside the matrix-level map, Fig 4 expert output norms and gate scores per token,
Fig 9 (norm rank, score rank) counts, Fig 5 intermediate-state magnitudes for the stored tokens,
the activation-ratio summary, and Fig 10 routing pattern (top-k scores per token across layers).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .common import CMAPS, HEADER_ROOM, Figure, StoreView, fitting_ticks, page_name, pages, shared_range, token_label
from .grid import PanelGrid
from .static import Column, layers_of, square_pages, static_square

MAX_TOKENS = 8
"""Tokens drawn per image in the per-token figures (Fig 2, Fig 5); longer inputs show the first ones."""
TOKEN_GRID_GAP = (0.35, 0.6)
"""Gaps (inches) of the per-token grids (Fig 2, Fig 5): tick labels only on the outer panels, so inner
gaps hold just the two-line panel titles."""
MAX_ROUTING_TOKENS = 64
"""Tokens drawn in Fig 4 and Fig 10 (the short input has fewer; a long one shows its first ones)."""


def group(inp: str) -> str:
    return f"dynamic/{inp}"


def token_texts(view: StoreView, inp: str, n: int | None = None) -> list[str]:
    """The input's token strings (`tokens`), or their indices when the store has none."""
    ds = view.dataset(group(inp))
    sl = slice(0, n)
    if "tokens" in ds:
        return [str(t) for t in ds["tokens"].isel(token=sl).values]
    return [str(t) for t in ds["token"].isel(token=sl).values]


def _layers(view: StoreView, inp: str) -> list[int]:
    return layers_of(view, group(inp))


def _topk(view: StoreView, inp: str, layers: list[int], n_tokens: int) -> np.ndarray | None:
    ds = view.dataset(group(inp))
    if "topk_experts" not in ds:
        return None
    return np.asarray(ds["topk_experts"].sel(layer=layers).isel(token=slice(0, n_tokens)).values)


def _inputs_with(views: list[StoreView], name: str) -> list[str]:
    return sorted({inp for v in views for inp in v.groups("dynamic") if name in v.dataset(group(inp))})


def fig2_output_similarity(views: list[StoreView], out: Path) -> list[Figure]:
    """Fig 2 (§5.1): cosine similarity of all experts' outputs, one map per token, top-k above it.

    One image per store, input and page of layers; rows are layers, columns the first tokens.
    """
    figures = []
    for inp in _inputs_with(views, "expert_output_similarity"):
        for v in views:
            ds = v.dataset(group(inp))
            if "expert_output_similarity" not in ds:
                continue
            n_tok = min(ds.sizes["token"], MAX_TOKENS)
            texts = token_texts(v, inp, n_tok)
            for page in pages(_layers(v, inp)):
                da = ds["expert_output_similarity"].sel(layer=page).isel(token=slice(0, n_tok))
                values = np.asarray(da.values, dtype=np.float64)
                labels = [str(x) for x in da["expert_i"].values]
                topk = _topk(v, inp, page, n_tok)
                lo, hi = shared_range([values[r, t] for r in range(len(page)) for t in range(n_tok)])
                grid = PanelGrid(len(page), n_tok, panel=(2.0, 2.1), gap=TOKEN_GRID_GAP)
                data = {("range",): (lo, hi)}
                for r, layer in enumerate(page):
                    for t in range(n_tok):
                        im = grid.heatmap(r, t, values[r, t], labels, labels, CMAPS["similarity"], lo, hi,
                                          show_x=r == len(page) - 1, show_y=t == 0)
                        chosen = "" if topk is None else "top-k: " + ",".join(str(int(e)) for e in topk[r, t])
                        grid.title(r, t, f"L{layer} · '{token_label(texts[t])}'\n{chosen}", 7)
                        data[(v.label, layer, t)] = values[r, t]
                        if topk is not None:
                            data[("topk", v.label, layer, t)] = [int(e) for e in topk[r, t]]
                grid.colorbar(im, "cosine similarity of outputs")
                path = out / f"fig2_output_similarity_{inp}_{_slug(v.label)}_{page_name(page)}.png"
                title = (f"Fig 2: expert-output similarity per token ({inp} input) — {v.label}, "
                         f"layers {page[0]}–{page[-1]}")
                grid.save(path, title)
                figures.append(Figure("fig2_output_similarity", path, title, data))
    return figures


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in label).strip("-")


def fig3_angular(views: list[StoreView], out: Path) -> list[Figure]:
    """Fig 3 (§5.1): angular similarity of outputs averaged over tokens, beside the matrix-level map."""
    figures = []
    for inp in _inputs_with(views, "expert_output_angular_mean"):
        def read(view: StoreView, layers: list[int], inp=inp):
            da = view.dataset(group(inp))["expert_output_angular_mean"].sel(layer=layers)
            labels = [str(x) for x in da["expert_i"].values]
            return np.asarray(da.values, dtype=np.float64), labels, labels

        def static_layers(view: StoreView) -> list[int]:
            return layers_of(view, "static") if view.has("static") else []

        cols = [Column(f"output angular sim ({inp})", read, "ang", CMAPS["angular"],
                       layers=lambda v, inp=inp: _layers(v, inp))]
        cols += [Column(f"matrix sim W_{m}", static_square("matrix_similarity", m), "sim", CMAPS["similarity"],
                        layers=static_layers) for m in ("up", "gate", "down")]
        have = [v for v in views if "expert_output_angular_mean" in v.dataset(group(inp))]
        figures += square_pages(
            have, out, f"fig3_angular_{inp}", f"Fig 3: averaged angular similarity of expert outputs ({inp} input) "
            "beside matrix-level similarity", cols,
            lambda v, inp=inp: sorted(set(_layers(v, inp)) | set(static_layers(v))),
            {"ang": "angular similarity (mean over tokens)", "sim": "cosine similarity of weights"})
    return figures


def routed_labels(scores: np.ndarray, labels: list[str]) -> list[int]:
    """Indices of the labels the router scores (any finite score): routed experts, never F or SE."""
    return [i for i in range(len(labels)) if np.isfinite(scores[..., i]).any()]


def chosen_cmap():
    """The score colour map without its near-white start, so a chosen expert's weakest cell still shows
    against the blank (NaN, not chosen) cells."""
    import matplotlib
    from matplotlib.colors import ListedColormap

    base = matplotlib.colormaps[CMAPS["score"]]
    return ListedColormap(base(np.linspace(0.25, 1.0, 256)), name="score_chosen").with_extremes(bad="white")


def topk_cells(topk: np.ndarray, labels: list[str]) -> list[tuple[int, int]]:
    """(token, column) of each token's top-k experts in a map whose columns are `labels`."""
    col = {lab: i for i, lab in enumerate(labels)}
    return [(t, col[str(int(e))]) for t, row in enumerate(topk) for e in row if str(int(e)) in col]


def fig4_norms_scores(views: list[StoreView], out: Path) -> list[Figure]:
    """Fig 4 (§5.2): per token (rows) and expert (columns) the output L2 norm beside the gate score;
    dots mark each token's top-k experts. Gate scores only for routed experts (F and SE have none),
    coloured from 0 to the page's largest score."""
    figures = []
    panel = (3.2, 3.0)
    for inp in _inputs_with(views, "expert_output_norms"):
        have = [v for v in views if {"expert_output_norms", "gate_scores"} <= set(v.dataset(group(inp)))]
        all_layers = sorted({l for v in have for l in _layers(v, inp)})
        for page in pages(all_layers):
            data: dict = {}
            for v in have:
                ds = v.dataset(group(inp))
                sel = [l for l in page if l in _layers(v, inp)]
                n_tok = min(ds.sizes["token"], MAX_ROUTING_TOKENS)
                norms = ds["expert_output_norms"].sel(layer=sel).isel(token=slice(0, n_tok))
                scores = ds["gate_scores"].sel(layer=sel).isel(token=slice(0, n_tok))
                norm_values = np.asarray(norms.values, dtype=np.float64)
                score_values = np.asarray(scores.values, dtype=np.float64)
                score_labels = [str(x) for x in scores["expert"].values]
                routed = routed_labels(score_values, score_labels)
                topk = _topk(v, inp, sel, n_tok)
                toks = token_texts(v, inp, n_tok)
                for i, l in enumerate(sel):
                    data[(v.label, l, "norm")] = norm_values[i]
                    data[(v.label, l, "score")] = score_values[i][:, routed]
                    data[("labels", v.label, l)] = ([str(x) for x in norms["expert"].values],
                                                    [score_labels[j] for j in routed], toks)
                    if topk is not None:
                        data[("topk", v.label, l)] = topk[i]
            n_range = shared_range([m for k, m in data.items() if k[-1] == "norm"], exclude_diagonal=False)
            s_range = (0.0, shared_range([m for k, m in data.items() if k[-1] == "score"], exclude_diagonal=False)[1])
            grid = PanelGrid(len(page), 2 * len(have), panel=panel, top=HEADER_ROOM)
            for s, v in enumerate(have):
                grid.header(v.label, 2 * s, 2 * s + 1)
            im_n = im_s = None
            max_tok_ticks = fitting_ticks(grid.panel_h)
            for r, layer in enumerate(page):
                for s, v in enumerate(have):
                    if (v.label, layer, "norm") not in data:
                        continue
                    nl, sl, toks = data[("labels", v.label, layer)]
                    ylab = [token_label(t, 10) for t in toks]
                    bottom = r == len(page) - 1 or (v.label, page[r + 1], "norm") not in data
                    norm, score = data[(v.label, layer, "norm")], data[(v.label, layer, "score")]
                    im_n = grid.heatmap(r, 2 * s, norm, nl, ylab, CMAPS["norm"], *n_range, ylabel="token",
                                        show_x=bottom, max_yticks=max_tok_ticks)
                    im_s = grid.heatmap(r, 2 * s + 1, score, sl, ylab, CMAPS["score"], *s_range, show_x=bottom,
                                        show_y=False)
                    grid.title(r, 2 * s, f"layer {layer} · output L2 norm")
                    grid.title(r, 2 * s + 1, f"layer {layer} · gate score")
                    topk = data.get(("topk", v.label, layer))
                    if topk is not None:
                        grid.mark(r, 2 * s, norm.shape, topk_cells(topk, nl))
                        grid.mark(r, 2 * s + 1, score.shape, topk_cells(topk, sl))
            if im_n is not None:
                grid.colorbar(im_n, "L2 norm of expert output", 0, 2)
                grid.colorbar(im_s, "gate score (softmax over all experts)", 1, 2)
            data[("range", "norm")] = n_range
            data[("range", "score")] = s_range
            path = out / f"fig4_norms_scores_{inp}_{page_name(page)}.png"
            title = (f"Fig 4: expert output norms and gate scores ({inp} input; dots: top-k) — "
                     f"layers {page[0]}–{page[-1]}")
            grid.save(path, title)
            figures.append(Figure("fig4_norms_scores", path, title, data))
    return figures


def fig9_rank_counts(views: list[StoreView], out: Path) -> list[Figure]:
    """Fig 9 (App D): how often the expert with norm rank r has score rank s, per layer (rank 0 = largest)."""
    figures = []
    for inp in _inputs_with(views, "norm_score_rank_counts"):
        def read(view: StoreView, layers: list[int], inp=inp):
            da = view.dataset(group(inp))["norm_score_rank_counts"].sel(layer=layers)
            return (np.asarray(da.values, dtype=np.float64), [str(x) for x in da["norm_rank"].values],
                    [str(x) for x in da["score_rank"].values])

        have = [v for v in views if "norm_score_rank_counts" in v.dataset(group(inp))]
        cols = [Column(f"rank counts ({inp})", read, "count", CMAPS["count"], "gate-score rank (0 = highest)",
                       "output-norm rank (0 = largest)")]
        figures += square_pages(have, out, f"fig9_rank_counts_{inp}",
                                f"Fig 9: gate-score rank per output-norm rank ({inp} input; rank 0 = largest)",
                                cols, lambda v, inp=inp: _layers(v, inp), {"count": "(token, expert) pairs"},
                                exclude_diagonal=False)
    return figures


def fig5_intermediate(views: list[StoreView], out: Path) -> list[Figure]:
    """Fig 5 (§5.3): |act(W_gate x)| per expert (rows) and neuron (columns) for the stored tokens."""
    figures = []
    for inp in _inputs_with(views, "intermediate_states"):
        for v in views:
            ds = v.dataset(group(inp))
            if "intermediate_states" not in ds:
                continue
            da_all = ds["intermediate_states"]
            # the store keeps the first few tokens on their own `probe_token` axis (positions 0..n-1)
            tdim = "probe_token" if "probe_token" in da_all.dims else "token"
            n_tok = min(da_all.sizes[tdim], MAX_TOKENS)
            tok_idx = [int(t) for t in da_all[tdim].values[:n_tok]]
            texts = token_texts(v, inp, max(tok_idx) + 1)
            for page in pages(_layers(v, inp)):
                da = da_all.sel(layer=page).isel({tdim: slice(0, n_tok)})
                values = np.abs(np.asarray(da.values, dtype=np.float64))
                labels = [str(x) for x in da["expert"].values]
                hi = float(np.nanpercentile(values, 99)) if np.isfinite(values).any() else 1.0
                grid = PanelGrid(len(page), n_tok, panel=(3.0, 2.0), gap=TOKEN_GRID_GAP)
                data: dict = {("range",): (0.0, hi)}
                topk = _topk(v, inp, page, max(tok_idx) + 1)
                for r, layer in enumerate(page):
                    for t, pos in enumerate(tok_idx):
                        im = grid.heatmap(r, t, values[r, t], [], labels, CMAPS["magnitude"], 0.0, hi, show_x=False,
                                          show_y=t == 0)
                        if r == len(page) - 1:
                            grid.numeric_xticks(r, t, values.shape[-1], "neuron")
                        text = texts[pos] if pos < len(texts) else str(pos)
                        chosen = "" if topk is None else " top-k: " + ",".join(str(int(e)) for e in topk[r, pos])
                        grid.title(r, t, f"L{layer} · token {pos} '{token_label(text)}'\n{chosen}", 7)
                        data[(v.label, layer, pos)] = values[r, t]
                grid.colorbar(im, "|act(W_gate x)| (clipped at 99th pct)", extend="max")
                path = out / f"fig5_intermediate_{inp}_{_slug(v.label)}_{page_name(page)}.png"
                title = (f"Fig 5: intermediate-state magnitudes ({inp} input) — {v.label}, "
                         f"layers {page[0]}–{page[-1]}")
                grid.save(path, title)
                figures.append(Figure("fig5_intermediate", path, title, data))
    return figures


def activation_ratio_summary(views: list[StoreView], out: Path) -> list[Figure]:
    """§5.3: fraction of intermediate elements with |value| > 1e-3, mean over tokens, layer x expert;
    coloured over the stores' own range (ratios sit near 1 for SiLU, so a 0..1 scale shows nothing)."""
    figures = []
    for inp in _inputs_with(views, "activation_ratio"):
        have = [v for v in views if "activation_ratio" in v.dataset(group(inp))]
        data: dict = {}
        for v in have:
            da = v.dataset(group(inp))["activation_ratio"].sel(layer=_layers(v, inp))
            data[v.label] = np.asarray(da.mean("token").values, dtype=np.float64)
            data[("labels", v.label)] = ([str(x) for x in da["expert"].values],
                                         [str(int(l)) for l in da["layer"].values])
        lo, hi = shared_range([data[v.label] for v in have], exclude_diagonal=False)
        data[("range",)] = (lo, hi)
        grid = PanelGrid(1, len(have), panel=(4.2, 3.4))
        for s, v in enumerate(have):
            labels, layers = data[("labels", v.label)]
            same_rows = s > 0 and data[("labels", have[s - 1].label)][1] == layers
            im = grid.heatmap(0, s, data[v.label], labels, layers, CMAPS["ratio"], lo, hi, ylabel="layer",
                              show_y=not same_rows)
            grid.title(0, s, f"{v.label}\nmean activation ratio {np.nanmean(data[v.label]):.4f}")
        grid.colorbar(im, "fraction |act| > 1e-3")
        path = out / f"activation_ratio_{inp}.png"
        title = f"Activation ratio per layer and expert, mean over tokens ({inp} input)"
        grid.save(path, title)
        figures.append(Figure("activation_ratio", path, title, data))
    return figures


def routing_weights(view: StoreView, inp: str, layers: list[int], n_tok: int) -> tuple[np.ndarray, list[str], str]:
    """([layer, token, routed expert] weights of each token's top-k experts, NaN elsewhere; routed labels;
    what the weights are): the family's own top-k weights when stored, else the softmax gate scores."""
    ds = view.dataset(group(inp))
    scores = np.asarray(ds["gate_scores"].sel(layer=layers).isel(token=slice(0, n_tok)).values, dtype=np.float64)
    labels = [str(x) for x in ds["gate_scores"]["expert"].values]
    routed = routed_labels(scores, labels)
    topk = _topk(view, inp, layers, n_tok)
    if "topk_weights" in ds:
        weights = np.asarray(ds["topk_weights"].sel(layer=layers).isel(token=slice(0, n_tok)).values,
                             dtype=np.float64)
        what = "top-k routing weight"
    else:
        weights = np.take_along_axis(scores, topk, axis=-1)
        what = "gate score of a top-k expert"
    shown = np.full(scores.shape, np.nan)
    np.put_along_axis(shown, topk, weights, axis=-1)
    return shown[..., routed], [labels[i] for i in routed], what


def fig10_routing(views: list[StoreView], out: Path) -> list[Figure]:
    """Fig 10 (App E): each token's top-k experts and their routing weights (others blank), expert x token
    per layer; routed experts only, coloured from 0 to the page's largest weight."""
    figures = []
    for inp in _inputs_with(views, "topk_experts"):
        have = [v for v in views if {"topk_experts", "gate_scores"} <= set(v.dataset(group(inp)))]
        all_layers = sorted({l for v in have for l in _layers(v, inp)})
        n_tok = max(min(v.dataset(group(inp)).sizes["token"], MAX_ROUTING_TOKENS) for v in have)
        panel = (max(4.0, 0.11 * n_tok), 2.8)
        for page in pages(all_layers):
            data: dict = {}
            whats = set()
            for v in have:
                sel = [l for l in page if l in _layers(v, inp)]
                if not sel:
                    continue
                v_tok = min(v.dataset(group(inp)).sizes["token"], MAX_ROUTING_TOKENS)
                shown, labels, what = routing_weights(v, inp, sel, v_tok)
                toks = [token_label(t, 8) for t in token_texts(v, inp, v_tok)]
                whats.add(what)
                data[("quantity", v.label)] = what
                for i, layer in enumerate(sel):
                    data[(v.label, layer)] = shown[i]
                    data[("labels", v.label, layer)] = (labels, toks)
            hi = shared_range([m for k, m in data.items() if k[0] not in ("labels", "quantity")],
                              exclude_diagonal=False)[1]
            grid = PanelGrid(len(page), len(have), panel=panel, top=HEADER_ROOM, bottom=1.0)
            im = None
            for s, v in enumerate(have):
                grid.header(v.label, s, s)
                for r, layer in enumerate(page):
                    if (v.label, layer) not in data:
                        continue
                    labels, toks = data[("labels", v.label, layer)]
                    bottom = r == len(page) - 1 or (v.label, page[r + 1]) not in data
                    im = grid.heatmap(r, s, data[(v.label, layer)].T, toks, labels, chosen_cmap(), 0.0, hi,
                                      xlabel="token", show_x=bottom, max_xticks=fitting_ticks(grid.panel_w))
                    grid.title(r, s, f"layer {layer} · top-k experts")
            if im is not None:
                grid.colorbar(im, " / ".join(sorted(whats)) + " (blank: not chosen)")
            data[("range",)] = (0.0, hi)
            path = out / f"fig10_routing_{inp}_{page_name(page)}.png"
            title = f"Fig 10: routing pattern ({inp} input) — layers {page[0]}–{page[-1]}"
            grid.save(path, title)
            figures.append(Figure("fig10_routing", path, title, data))
    return figures
