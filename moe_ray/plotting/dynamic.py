"""Figures of the dynamic (text in) analyses, from `dynamic/<input>/*` (paper §5, App D, App E):
Fig 2 per-token expert-output similarity with each token's top-k above the map, Fig 3 averaged
angular similarity beside the matrix-level map, Fig 4 expert output norms and gate scores per token,
Fig 9 (norm rank, score rank) counts, Fig 5 intermediate-state magnitudes for the stored tokens,
the activation-ratio map, and Fig 10 routing pattern (top-k scores per token across layers).

One image per store (and input, page of layers); every caption says which of the input's tokens it shows.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .common import (BLOCK_GAP, CMAPS, DPI, Figure, StoreView, expert_labels, fit_panel, fitting_columns, fitting_ticks,
                     page_name, pages, shared_range, token_label)
from .grid import PanelGrid
from .static import Column, dense_note, layers_of, scale_note, slug, square_pages, static_square

MAX_TOKENS = 8
"""Tokens drawn per image in the per-token figures (Fig 2, Fig 5), fewer where they would not fit the page
width; longer inputs show their first tokens and say so."""
MAX_ROUTING_TOKENS = 64
"""Tokens drawn in Fig 4 and Fig 10 (the short input has fewer; a long one shows its first ones, as the
paper's Fig 10 feeds "an input prompt with about 64 tokens")."""
INPUT_ORDER = ("short", "long", "text", "corpus")
"""Inputs in the paper's order (Fig 2 uses the short input before Fig 3 the long one), then the user's."""


def group(inp: str) -> str:
    return f"dynamic/{inp}"


def ordered_inputs(names) -> list[str]:
    """Input names in INPUT_ORDER, others after them alphabetically."""
    return sorted(set(names), key=lambda n: (INPUT_ORDER.index(n) if n in INPUT_ORDER else len(INPUT_ORDER), n))


def token_texts(view: StoreView, inp: str, n: int | None = None) -> list[str]:
    """The input's token strings (`tokens`), or their indices when the store has none."""
    ds = view.dataset(group(inp))
    sl = slice(0, n)
    if "tokens" in ds:
        return [str(t) for t in ds["tokens"].isel(token=sl).values]
    return [str(t) for t in ds["token"].isel(token=sl).values]


def tokens_shown(first: int, last: int, total: int) -> str:
    """Which of an input's tokens an image shows, in words."""
    if first == 0 and last == total - 1:
        return f"all {total:,} tokens"
    return f"tokens {first}–{last} of {total:,}"


def _layers(view: StoreView, inp: str) -> list[int]:
    return layers_of(view, group(inp))


def _topk(view: StoreView, inp: str, layers: list[int], n_tokens: int) -> np.ndarray | None:
    ds = view.dataset(group(inp))
    if "topk_experts" not in ds:
        return None
    return np.asarray(ds["topk_experts"].sel(layer=layers).isel(token=slice(0, n_tokens)).values)


def _inputs_with(views: list[StoreView], name: str) -> list[str]:
    return ordered_inputs(inp for v in views for inp in v.groups("dynamic") if name in v.dataset(group(inp)))


def fig2_output_similarity(views: list[StoreView], out: Path) -> list[Figure]:
    """Fig 2 (§5.1): cosine similarity of all experts' outputs, one map per token, top-k above it.

    One image per store, input and page of layers; rows are layers, columns the input's first tokens
    (as many as fit the page width, at most MAX_TOKENS)."""
    figures = []
    for inp in _inputs_with(views, "expert_output_similarity"):
        reads = []
        for v in views:
            ds = v.dataset(group(inp))
            if "expert_output_similarity" not in ds:
                continue
            n_labels = ds.sizes["expert_i"]
            side = 1.45 if n_labels <= 12 else 2.0
            total = ds.sizes["token"]
            n_tok = min(total, MAX_TOKENS, fitting_columns(side, 0.3))
            for page in pages(_layers(v, inp)):
                da = ds["expert_output_similarity"].sel(layer=page).isel(token=slice(0, n_tok))
                reads.append((v, page, side, total, n_tok, np.asarray(da.values, dtype=np.float64),
                              expert_labels(da, "expert_i")))
        lo, hi = shared_range([m for *_, values, _ in reads for m in values.reshape(-1, *values.shape[-2:])])
        for v, page, side, total, n_tok, values, labels in reads:
            texts = token_texts(v, inp, n_tok)
            topk = _topk(v, inp, page, n_tok)
            grid = PanelGrid(len(page), n_tok, panel=(side, side), gap=(0.3, 0.7), top=0.75, bottom=0.75)
            data = {("range",): (lo, hi), ("tokens",): list(range(n_tok))}
            for r, layer in enumerate(page):
                for t in range(n_tok):
                    im = grid.heatmap(r, t, values[r, t], labels, labels, CMAPS["output"], lo, hi,
                                      show_x=r == len(page) - 1, show_y=t == 0)
                    chosen = "" if topk is None else "top-k " + ",".join(str(int(e)) for e in topk[r, t])
                    grid.title(r, t, f"L{layer} '{token_label(texts[t], 8)}'\n{chosen}")
                    data[(v.label, layer, t)] = values[r, t]
                    if topk is not None:
                        data[("topk", v.label, layer, t)] = [int(e) for e in topk[r, t]]
            grid.colorbar(im, "cosine similarity of outputs")
            path = out / f"fig2_output_similarity_{inp}_{slug(v.label)}_{page_name(page)}.png"
            title = (f"Fig 2: expert-output similarity per token ({inp} input, {tokens_shown(0, n_tok - 1, total)}) — "
                     f"{v.label}, layers {page[0]}–{page[-1]}")
            figures.append(grid.save("fig2_output_similarity", path, title, data,
                                     f"{tokens_shown(0, n_tok - 1, total)} of the {inp} input; {scale_note(views)}."))
    return figures


def fig3_angular(views: list[StoreView], out: Path) -> list[Figure]:
    """Fig 3 (§5.1): angular similarity of outputs averaged over tokens, beside the matrix-level maps, each
    with its own colour map and colour bar."""
    figures = []
    for inp in _inputs_with(views, "expert_output_angular_mean"):
        def read(view: StoreView, layers: list[int], inp=inp):
            da = view.dataset(group(inp))["expert_output_angular_mean"].sel(layer=layers)
            labels = expert_labels(da, "expert_i")
            return np.asarray(da.values, dtype=np.float64), labels, labels

        def static_layers(view: StoreView) -> list[int]:
            return layers_of(view, "static") if view.has("static") else []

        cols = [Column(f"outputs ({inp})", read, "ang", "output", layers=lambda v, inp=inp: _layers(v, inp))]
        cols += [Column(f"W_{m}", static_square("matrix_similarity", m), "sim", "similarity", layers=static_layers)
                 for m in ("up", "gate", "down")]
        have = [v for v in views if "expert_output_angular_mean" in v.dataset(group(inp))]
        total = {v.label: v.dataset(group(inp)).sizes["token"] for v in have}
        figures += square_pages(
            have, out, f"fig3_angular_{inp}", f"Fig 3: mean angular similarity of expert outputs ({inp} input) "
            "beside matrix-level similarity", cols,
            lambda v, inp=inp: sorted(set(_layers(v, inp)) | set(static_layers(v))),
            {"ang": "angular similarity of outputs", "sim": "cosine similarity of weights"},
            what=f"outputs averaged over all {', '.join(f'{n:,}' for n in sorted(set(total.values())))} tokens of the "
                 f"{inp} input; diagonal excluded from the colour ranges")
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


def relative_to_row_max(values: np.ndarray) -> np.ndarray:
    """Each row (a token) divided by its largest finite value, so the per-token ranking reads as colour."""
    peak = np.nanmax(np.where(np.isfinite(values), values, np.nan), axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(peak > 0, values / peak, np.nan)


def fig4_norms_scores(views: list[StoreView], out: Path) -> list[Figure]:
    """Fig 4 (§5.2): per token (rows) and expert (columns) the output L2 norm, divided by the token's
    largest so that each token's ranking shows (the panel title gives the largest norms' range), beside the
    gate score (routed experts only, from 0 to the largest score); dots mark each token's top-k experts."""
    figures = []
    for inp in _inputs_with(views, "expert_output_norms"):
        have = [v for v in views if {"expert_output_norms", "gate_scores"} <= set(v.dataset(group(inp)))]
        reads = []
        for v in have:
            ds = v.dataset(group(inp))
            total = ds.sizes["token"]
            n_tok = min(total, MAX_ROUTING_TOKENS)
            toks = token_texts(v, inp, n_tok)
            for page in pages(_layers(v, inp)):
                norms = ds["expert_output_norms"].sel(layer=page).isel(token=slice(0, n_tok))
                scores = ds["gate_scores"].sel(layer=page).isel(token=slice(0, n_tok))
                score_values = np.asarray(scores.values, dtype=np.float64)
                score_labels = expert_labels(scores, "expert")
                routed = routed_labels(score_values, score_labels)
                reads.append((v, page, total, n_tok, toks, np.asarray(norms.values, dtype=np.float64),
                              expert_labels(norms, "expert"), score_values[..., routed],
                              [score_labels[j] for j in routed], _topk(v, inp, page, n_tok)))
        s_hi = shared_range([r[7] for r in reads], exclude_diagonal=False)[1]
        # relative norms run from the smallest drawn (in tenths) to 1, the token's largest
        n_lo = shared_range([relative_to_row_max(r[5]) for r in reads], exclude_diagonal=False)[0]
        n_lo = min(0.9, np.floor(n_lo * 10) / 10)
        for v, page, total, n_tok, toks, norm_values, norm_labels, score_values, score_labels, topk in reads:
            data: dict = {("range", "norm"): (n_lo, 1.0), ("range", "score"): (0.0, s_hi)}
            width = fit_panel(2, 0.3, 3.2, extra=BLOCK_GAP, margins=1.3 + 1.15)
            grid = PanelGrid(len(page), 2, panel=(width, 2.6), gap=(0.3, 1.15), top=0.75, bottom=0.75, left=1.3,
                             breaks=(0,))
            ylab = [token_label(t, 10) for t in toks]
            max_tok_ticks = fitting_ticks(grid.panel_h)
            for r, layer in enumerate(page):
                norm, score = norm_values[r], score_values[r]
                relative = relative_to_row_max(norm)
                data[(v.label, layer, "norm")] = norm
                data[(v.label, layer, "norm_relative")] = relative
                data[(v.label, layer, "score")] = score
                data[("labels", v.label, layer)] = (norm_labels, score_labels, toks)
                bottom = r == len(page) - 1
                im_n = grid.heatmap(r, 0, relative, norm_labels, ylab, CMAPS["norm"], n_lo, 1.0, ylabel="token",
                                    show_x=bottom, max_yticks=max_tok_ticks)
                im_s = grid.heatmap(r, 1, score, score_labels, ylab, CMAPS["score"], 0.0, s_hi, show_x=bottom,
                                    show_y=False)
                peaks = np.nanmax(norm, axis=-1)
                grid.title(r, 0, f"layer {layer} · output L2 norm\nlargest per token {np.nanmin(peaks):.3g}–"
                                 f"{np.nanmax(peaks):.3g}")
                grid.title(r, 1, f"layer {layer} · gate score")
                if topk is not None:
                    data[("topk", v.label, layer)] = topk[r]
                    grid.mark(r, 0, norm.shape, topk_cells(topk[r], norm_labels))
                    grid.mark(r, 1, score.shape, topk_cells(topk[r], score_labels))
            grid.block_colorbar(im_n, "norm ÷ the token's largest", 0)
            grid.block_colorbar(im_s, "gate score (softmax over all experts)", 1)
            path = out / f"fig4_norms_scores_{inp}_{slug(v.label)}_{page_name(page)}.png"
            title = (f"Fig 4: output norms and gate scores ({inp} input, {tokens_shown(0, n_tok - 1, total)}) — "
                     f"{v.label}, layers {page[0]}–{page[-1]}")
            figures.append(grid.save("fig4_norms_scores", path, title, data,
                                     f"{tokens_shown(0, n_tok - 1, total)} of the {inp} input; dots: each token's "
                                     f"top-k experts; gate scores for routed experts only (F and SE have no router); "
                                     f"{scale_note(views)}."))
    return figures


def fig9_rank_counts(views: list[StoreView], out: Path) -> list[Figure]:
    """Fig 9 (App D): how often the expert with norm rank r has score rank s, per layer (rank 0 = largest),
    on a diverging colour map centred on the count every cell would have if the ranks were unrelated."""
    figures = []
    for inp in _inputs_with(views, "norm_score_rank_counts"):
        def read(view: StoreView, layers: list[int], inp=inp):
            da = view.dataset(group(inp))["norm_score_rank_counts"].sel(layer=layers)
            return (np.asarray(da.values, dtype=np.float64), [str(x) for x in da["norm_rank"].values],
                    [str(x) for x in da["score_rank"].values])

        have = [v for v in views if "norm_score_rank_counts" in v.dataset(group(inp))]
        cols = [Column(f"rank counts ({inp})", read, "count", "count", "gate-score rank (0 = highest)",
                       "output-norm rank (0 = largest)", center=lambda m: float(np.nanmean(m)))]
        figures += square_pages(have, out, f"fig9_rank_counts_{inp}",
                                f"Fig 9: gate-score rank per output-norm rank ({inp} input)", cols,
                                lambda v, inp=inp: _layers(v, inp),
                                {"count": "count (white: uniform)"}, exclude_diagonal=False,
                                what=f"all tokens of the {inp} input; rank 0 = largest (the paper numbers the other "
                                     "way round); white = the count of a cell if ranks were unrelated (tokens ÷ "
                                     "experts)")
    return figures


def fig5_intermediate(views: list[StoreView], out: Path) -> list[Figure]:
    """Fig 5 (§5.3): |act(W_gate x)| per expert (rows) and neuron (columns) for the tokens the store keeps,
    in images of as many tokens as fit the page width."""
    figures = []
    for inp in _inputs_with(views, "intermediate_states"):
        for v in views:
            ds = v.dataset(group(inp))
            if "intermediate_states" not in ds:
                continue
            da_all = ds["intermediate_states"]
            # the store keeps the first few tokens on their own `probe_token` axis (positions 0..n-1)
            tdim = "probe_token" if "probe_token" in da_all.dims else "token"
            kept = [int(t) for t in da_all[tdim].values[:MAX_TOKENS]]
            total = ds.sizes["token"] if "token" in ds.sizes else len(kept)
            texts = token_texts(v, inp, max(kept) + 1)
            per_image = min(len(kept), fitting_columns(2.0, 0.3))
            for page in pages(_layers(v, inp)):
                values_all = np.abs(np.asarray(da_all.sel(layer=page).isel({tdim: slice(0, len(kept))}).values,
                                               dtype=np.float64))
                labels = expert_labels(da_all, "expert")
                hi = float(np.nanpercentile(values_all, 99)) if np.isfinite(values_all).any() else 1.0
                topk = _topk(v, inp, page, max(kept) + 1)
                for first in range(0, len(kept), per_image):
                    chunk = list(range(first, min(first + per_image, len(kept))))
                    grid = PanelGrid(len(page), len(chunk), panel=(2.0, 1.8), gap=(0.3, 0.75), top=0.75)
                    data: dict = {("range",): (0.0, hi), ("tokens",): [kept[t] for t in chunk]}
                    for r, layer in enumerate(page):
                        for c, t in enumerate(chunk):
                            pos = kept[t]
                            # more neurons than pixels: average them (antialiased) so no line is dropped
                            smooth = values_all.shape[-1] > grid.panel_w * DPI
                            im = grid.heatmap(r, c, values_all[r, t], [], labels, CMAPS["magnitude"], 0.0, hi,
                                              show_x=False, show_y=c == 0,
                                              interpolation="antialiased" if smooth else "nearest")
                            if r == len(page) - 1:
                                grid.numeric_xticks(r, c, values_all.shape[-1], "neuron")
                            text = texts[pos] if pos < len(texts) else str(pos)
                            chosen = "" if topk is None else "top-k " + ",".join(str(int(e)) for e in topk[r, pos])
                            grid.title(r, c, f"L{layer} token {pos} '{token_label(text, 8)}'\n{chosen}")
                            data[(v.label, layer, pos)] = values_all[r, t]
                    grid.colorbar(im, "|act(W_gate x)|", extend="max")
                    tokens = [kept[t] for t in chunk]
                    part = "" if len(chunk) == len(kept) else f"_T{tokens[0]}-{tokens[-1]}"
                    path = out / f"fig5_intermediate_{inp}_{slug(v.label)}_{page_name(page)}{part}.png"
                    title = (f"Fig 5: intermediate states ({inp} input) — {v.label}, layers {page[0]}–{page[-1]}")
                    figures.append(grid.save(
                        "fig5_intermediate", path, title, data,
                        f"{tokens_shown(tokens[0], tokens[-1], total)} of the {inp} input (the store keeps the "
                        f"first {len(kept)}: dynamic.intermediate_tokens); colour clipped at the 99th percentile "
                        f"({hi:.3g}) of this model's layers shown."))
    return figures


def activation_ratio_map(views: list[StoreView], out: Path) -> list[Figure]:
    """§5.3: fraction of intermediate elements with |value| > 1e-3, mean over tokens, layer x expert, on a
    fixed 0-1 scale (a SiLU model sits near 1, the paper's GELU Grok near 0.25); the mean per model is in
    the activation-ratio table."""
    figures = []
    for inp in _inputs_with(views, "activation_ratio"):
        for v in views:
            ds = v.dataset(group(inp))
            if "activation_ratio" not in ds:
                continue
            da = ds["activation_ratio"].sel(layer=_layers(v, inp))
            ratio = np.asarray(da.mean("token").values, dtype=np.float64)
            labels, layers = expert_labels(da, "expert"), [str(int(l)) for l in da["layer"].values]
            data = {v.label: ratio, ("labels", v.label): (labels, layers), ("range",): (0.0, 1.0)}
            grid = PanelGrid(1, 1, panel=(max(2.4, 0.3 * len(labels)) if len(labels) <= 24 else 6.0,
                                          min(6.0, max(1.6, 0.3 * len(layers)))), top=0.75)
            im = grid.heatmap(0, 0, ratio, labels, layers, CMAPS["ratio"], 0.0, 1.0, ylabel="layer")
            grid.title(0, 0, f"mean {100 * np.nanmean(ratio):.1f}%")
            grid.colorbar(im, "fraction |act| > 1e-3")
            path = out / f"activation_ratio_{inp}_{slug(v.label)}.png"
            title = f"Activation ratio ({inp} input) — {v.label}"
            figures.append(grid.save("activation_ratio", path, title, data,
                                     f"mean over all {ds.sizes['token']:,} tokens of the {inp} input; fixed scale "
                                     f"0–1 for every model" + dense_note(v, [0, len(layers)], True) + "."))
    return figures


def routing_weights(view: StoreView, inp: str, layers: list[int], n_tok: int) -> tuple[np.ndarray, list[str], str]:
    """([layer, token, routed expert] weights of each token's top-k experts, NaN elsewhere; routed labels;
    what the weights are): the family's own top-k weights when stored, else the softmax gate scores."""
    ds = view.dataset(group(inp))
    scores = np.asarray(ds["gate_scores"].sel(layer=layers).isel(token=slice(0, n_tok)).values, dtype=np.float64)
    labels = expert_labels(ds["gate_scores"], "expert")
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
    per layer; routed experts only, coloured from 0 to the largest weight drawn."""
    figures = []
    for inp in _inputs_with(views, "topk_experts"):
        have = [v for v in views if {"topk_experts", "gate_scores"} <= set(v.dataset(group(inp)))]
        reads = []
        for v in have:
            total = v.dataset(group(inp)).sizes["token"]
            n_tok = min(total, MAX_ROUTING_TOKENS)
            toks = [token_label(t, 8) for t in token_texts(v, inp, n_tok)]
            for page in pages(_layers(v, inp)):
                shown, labels, what = routing_weights(v, inp, page, n_tok)
                reads.append((v, page, total, n_tok, toks, shown, labels, what))
        hi = shared_range([r[5] for r in reads], exclude_diagonal=False)[1]
        for v, page, total, n_tok, toks, shown, labels, what in reads:
            width = min(8.5, max(3.5, 0.125 * n_tok))
            grid = PanelGrid(len(page), 1, panel=(width, 2.0 if len(labels) <= 16 else 2.8), gap=(0.3, 0.5), top=0.75,
                             bottom=1.1)
            data: dict = {("quantity", v.label): what, ("range",): (0.0, hi), ("tokens",): list(range(n_tok))}
            im = None
            for r, layer in enumerate(page):
                data[(v.label, layer)] = shown[r]
                data[("labels", v.label, layer)] = (labels, toks)
                im = grid.heatmap(r, 0, shown[r].T, toks, labels, chosen_cmap(), 0.0, hi, xlabel="token",
                                  show_x=r == len(page) - 1, max_xticks=fitting_ticks(grid.panel_w))
                grid.title(r, 0, f"layer {layer} · top-k experts")
            grid.colorbar(im, what + " (blank: not chosen)")
            path = out / f"fig10_routing_{inp}_{slug(v.label)}_{page_name(page)}.png"
            title = (f"Fig 10: routing pattern ({inp} input, {tokens_shown(0, n_tok - 1, total)}) — {v.label}, "
                     f"layers {page[0]}–{page[-1]}")
            figures.append(grid.save("fig10_routing", path, title, data,
                                     f"{tokens_shown(0, n_tok - 1, total)} of the {inp} input; routed experts only; "
                                     f"{scale_note(views)}."))
    return figures
