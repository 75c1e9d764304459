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

from .common import (BLOCK_GAP, CMAPS, DPI, Figure, StoreView, fit_panel, fitting_columns, fitting_ticks, page_name,
                     colormap, expert_labels, model_scale, pages, shared_range, value_span,
                     token_label)
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


def chosen_tokens(view: StoreView, inp: str, first: int, among: list[int] | None = None) -> list[int]:
    """The token positions a per-token figure draws: the view's choice (`render(tokens=...)`, `plot --tokens`:
    positions, or "all"), else the input's first `first`; only positions the input has (`among`: those
    the store kept, for Fig 5)."""
    total = view.dataset(group(inp)).sizes["token"]
    have = list(range(total)) if among is None else [t for t in among if t < total] or list(among)
    if view.tokens == "all":
        return have
    if view.tokens:
        wanted = set(int(t) for t in view.tokens)
        return [t for t in have if t in wanted]
    return have[:first]


def token_chunks(tokens: list[int], per_image: int) -> list[list[int]]:
    """Chosen tokens split into images of at most `per_image`."""
    return [tokens[i:i + per_image] for i in range(0, len(tokens), per_image)] or [[]]


def tokens_text(tokens: list[int], total: int) -> str:
    """Which of an input's tokens an image shows, in words (a run, or the positions)."""
    if not tokens:
        return "no tokens"
    if tokens == list(range(tokens[0], tokens[-1] + 1)):
        return tokens_shown(tokens[0], tokens[-1], total)
    return f"tokens {', '.join(map(str, tokens))} of {total:,}"


def token_part(tokens: list[int], default: list[int]) -> str:
    """A file-name part for an image of `tokens` ("" for the default choice of one image)."""
    return "" if tokens == default else f"_T{tokens[0]}-{tokens[-1]}"


def fig2_output_similarity(views: list[StoreView], out: Path) -> list[Figure]:
    """Fig 2 (§5.1): cosine similarity of all experts' outputs, one map per token, top-k above it.

    One image per store, input, page of layers and run of tokens; rows are layers, columns tokens (as many
    as fit the page width, at most MAX_TOKENS): the input's first ones unless tokens were chosen. One colour
    range per model over all its layers and the chosen tokens."""
    figures = []
    for inp in _inputs_with(views, "expert_output_similarity"):
        have = [v for v in views if "expert_output_similarity" in v.dataset(group(inp))]

        def side_of(v: StoreView) -> float:
            return 1.45 if v.dataset(group(inp)).sizes["expert_i"] <= 12 else 2.0

        def per_image(v: StoreView) -> int:
            return min(MAX_TOKENS, fitting_columns(side_of(v), 0.3))

        def read_all(full: StoreView) -> list[np.ndarray]:
            toks = chosen_tokens(full, inp, per_image(full))
            da = full.dataset(group(inp))["expert_output_similarity"].sel(layer=_layers(full, inp))
            values = np.asarray(da.isel(token=toks).values, dtype=np.float64)
            return list(values.reshape(-1, *values.shape[-2:]))

        scale = model_scale(have, f"fig2:{inp}", read_all)
        cmap = colormap(CMAPS["output"], scale.extend)
        for v in have:
            ds = v.dataset(group(inp))
            side, total = side_of(v), ds.sizes["token"]
            toks = chosen_tokens(v, inp, per_image(v))
            default = chosen_tokens(v.unrestricted_tokens(), inp, per_image(v))
            labels = expert_labels(ds, "expert_i")
            for page in pages(_layers(v, inp)):
                for chunk in token_chunks(toks, per_image(v)):
                    if not chunk:
                        continue
                    values = np.asarray(ds["expert_output_similarity"].sel(layer=page).isel(token=chunk).values,
                                        dtype=np.float64)
                    texts = token_texts(v, inp, max(chunk) + 1)
                    topk = _topk(v, inp, page, max(chunk) + 1)
                    grid = PanelGrid(len(page), len(chunk), panel=(side, side), gap=(0.3, 0.7), top=0.75, bottom=0.75)
                    data = {("range",): scale.limits, ("extend",): scale.extend, ("tokens",): chunk}
                    for r, layer in enumerate(page):
                        for c, t in enumerate(chunk):
                            im = grid.heatmap(r, c, values[r, c], labels, labels, cmap, scale.lo, scale.hi,
                                              show_x=r == len(page) - 1, show_y=c == 0)
                            chosen = "" if topk is None else "top-k " + ",".join(str(int(e)) for e in topk[r, t])
                            grid.title(r, c, f"L{layer} #{t} '{token_label(texts[t], 8)}'\n{chosen}")
                            data[(v.label, layer, t)] = values[r, c]
                            if topk is not None:
                                data[("topk", v.label, layer, t)] = [int(e) for e in topk[r, t]]
                    grid.colorbar(im, "cosine similarity of outputs", extend=scale.extend)
                    path = (out / f"fig2_output_similarity_{inp}_{slug(v.label)}_{page_name(page)}"
                            f"{token_part(chunk, default)}.png")
                    shown = tokens_text(chunk, total)
                    title = (f"Fig 2: expert-output similarity per token ({inp} input, {shown}) — "
                             f"{v.label}, layers {page[0]}–{page[-1]}")
                    figures.append(grid.save("fig2_output_similarity", path, title, data,
                                             f"{shown} of the {inp} input (moe-ray plot --tokens chooses, "
                                             f"--tokens all draws every one); diagonal (1) above the range, light "
                                             f"grey; {scale_note(views)}."))
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
        def output_labels(view: StoreView, layers: list[int], inp=inp):
            labels = expert_labels(view.dataset(group(inp)), "expert_i")
            return None, labels, labels

        cols += [Column(f"W_{m}", static_square("matrix_similarity", m, like=output_labels), "sim", "similarity",
                        layers=static_layers) for m in ("up", "gate", "down")]
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


def chosen_cmap(full: bool = False):
    """The score colour map without its near-white start, so a chosen expert's weakest cell still shows
    against the blank (NaN, not chosen) cells; `full`: the whole map, blank cells white too."""
    import matplotlib
    from matplotlib.colors import ListedColormap

    base = matplotlib.colormaps[CMAPS["score"]]
    if full:
        return base.with_extremes(bad="white")
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
    """Fig 4 (§5.2): per token (rows) and expert (columns) the output L2 norm on one scale per model (all its
    layers and tokens drawn: depth trends in norm size read as colour), the same norms divided by the token's
    largest (each token's ranking), and the gate score (softmax over all experts; F and SE columns blank, so
    the three panels line up column for column); dots mark each token's top-k experts."""
    figures = []
    for inp in _inputs_with(views, "expert_output_norms"):
        have = [v for v in views if {"expert_output_norms", "gate_scores"} <= set(v.dataset(group(inp)))]

        def read(full: StoreView, name: str) -> list[np.ndarray]:
            toks = chosen_tokens(full, inp, MAX_ROUTING_TOKENS)
            da = full.dataset(group(inp))[name].sel(layer=_layers(full, inp)).isel(token=toks)
            return list(np.asarray(da.values, dtype=np.float64))

        norm_scale = model_scale(have, f"fig4:{inp}:norm", lambda full: read(full, "expert_output_norms"),
                                 exclude_diagonal=False, limits=lambda a: (0.0, value_span(a)[1]))
        score_scale = model_scale(have, f"fig4:{inp}:score", lambda full: read(full, "gate_scores"),
                                  exclude_diagonal=False, limits=lambda a: (0.0, value_span(a)[1]))
        # relative norms run from the smallest drawn (in tenths) to 1, the token's largest
        rel_lo = model_scale(have, f"fig4:{inp}:relative",
                             lambda full: [relative_to_row_max(m) for m in read(full, "expert_output_norms")],
                             exclude_diagonal=False).lo
        rel_lo = min(0.9, np.floor(rel_lo * 10) / 10)
        for v in have:
            ds = v.dataset(group(inp))
            total = ds.sizes["token"]
            labels = expert_labels(ds, "expert")
            toks_all = chosen_tokens(v, inp, MAX_ROUTING_TOKENS)
            default = chosen_tokens(v.unrestricted_tokens(), inp, MAX_ROUTING_TOKENS)
            for page in pages(_layers(v, inp)):
                for toks in token_chunks(toks_all, MAX_ROUTING_TOKENS):
                    if not toks:
                        continue
                    figures.append(_fig4_image(v, inp, page, toks, default, total, labels, norm_scale, score_scale,
                                               rel_lo, out, views))
    return figures


def _fig4_image(v: StoreView, inp: str, page: list[int], toks: list[int], default: list[int], total: int,
                labels: list[str], norm_scale, score_scale, rel_lo: float, out: Path, views: list[StoreView]) -> Figure:
    ds = v.dataset(group(inp))
    norm_values = np.asarray(ds["expert_output_norms"].sel(layer=page).isel(token=toks).values, dtype=np.float64)
    score_values = np.asarray(ds["gate_scores"].sel(layer=page).isel(token=toks).values, dtype=np.float64)
    texts = token_texts(v, inp, max(toks) + 1)
    topk_all = _topk(v, inp, page, max(toks) + 1)
    topk = None if topk_all is None else topk_all[:, toks]
    data: dict = {("range", "norm"): norm_scale.limits, ("range", "norm_relative"): (rel_lo, 1.0),
                  ("range", "score"): score_scale.limits, ("tokens",): toks}
    width = fit_panel(3, 0.3, 3.2, extra=2 * BLOCK_GAP, margins=1.3 + 1.15)
    grid = PanelGrid(len(page), 3, panel=(width, 2.6), gap=(0.3, 1.15), top=0.75, bottom=0.75, left=1.3,
                     breaks=(0, 1))
    ylab = [token_label(texts[t], 10) for t in toks]
    max_tok_ticks = fitting_ticks(grid.panel_h)
    norm_cmap = colormap(CMAPS["norm"], norm_scale.extend)
    for r, layer in enumerate(page):
        norm, score = norm_values[r], score_values[r]
        relative = relative_to_row_max(norm)
        data[(v.label, layer, "norm")] = norm
        data[(v.label, layer, "norm_relative")] = relative
        data[(v.label, layer, "score")] = score
        data[("labels", v.label, layer)] = (labels, labels, [texts[t] for t in toks])
        bottom = r == len(page) - 1
        im_n = grid.heatmap(r, 0, norm, labels, ylab, norm_cmap, *norm_scale.limits, ylabel="token",
                            show_x=bottom, max_yticks=max_tok_ticks)
        im_r = grid.heatmap(r, 1, relative, labels, ylab, CMAPS["norm"], rel_lo, 1.0, show_x=bottom, show_y=False)
        im_s = grid.heatmap(r, 2, score, labels, ylab, chosen_cmap(full=True), *score_scale.limits, show_x=bottom,
                            show_y=False)
        grid.title(r, 0, f"layer {layer} · output L2 norm")
        grid.title(r, 1, f"layer {layer} · norm ÷ token's largest")
        grid.title(r, 2, f"layer {layer} · gate score")
        if topk is not None:
            data[("topk", v.label, layer)] = topk[r]
            for c in range(3):
                grid.mark(r, c, norm.shape, topk_cells(topk[r], labels))
    grid.block_colorbar(im_n, "output L2 norm", 0, extend=norm_scale.extend)
    grid.block_colorbar(im_r, "norm ÷ the token's largest", 1)
    grid.block_colorbar(im_s, "gate score (softmax, all experts)", 2)
    path = out / f"fig4_norms_scores_{inp}_{slug(v.label)}_{page_name(page)}{token_part(toks, default)}.png"
    shown = tokens_text(toks, total)
    title = f"Fig 4: output norms and gate scores ({inp} input, {shown}) — {v.label}, layers {page[0]}–{page[-1]}"
    return grid.save("fig4_norms_scores", path, title, data,
                     f"{shown} of the {inp} input; dots: each token's top-k experts; norms on one scale for all this "
                     f"model's layers (the middle panel divides each token's norms by its largest); gate scores for "
                     f"routed experts only (F and SE columns blank: they have no router); {scale_note(views)}.")


FIG9_MIN_TOKENS = 64
"""Fig 9 counts ranks over an input's tokens: the paper uses the long input (App D); an input shorter than this
is drawn only when the store has no longer one."""


def _longer_input(view: StoreView, inp: str) -> bool:
    """Whether Fig 9 should skip `inp` for this store: it is short and the store has a longer input with counts."""
    tokens = {i: view.dataset(group(i)).sizes.get("token", 0) for i in view.groups("dynamic")
              if "norm_score_rank_counts" in view.dataset(group(i))}
    return tokens.get(inp, 0) < FIG9_MIN_TOKENS and max(tokens.values(), default=0) >= FIG9_MIN_TOKENS


def fig9_rank_counts(views: list[StoreView], out: Path) -> list[Figure]:
    """Fig 9 (App D): how often the expert with norm rank r has score rank s, per layer (rank 0 = largest),
    on a diverging colour map centred on the count every cell would have if the ranks were unrelated."""
    figures = []
    for inp in _inputs_with(views, "norm_score_rank_counts"):
        have = [v for v in views if "norm_score_rank_counts" in v.dataset(group(inp)) and not _longer_input(v, inp)]
        if not have:
            continue

        def read(view: StoreView, layers: list[int], inp=inp):
            da = view.dataset(group(inp))["norm_score_rank_counts"].sel(layer=layers)
            return (np.asarray(da.values, dtype=np.float64), [str(x) for x in da["norm_rank"].values],
                    [str(x) for x in da["score_rank"].values])

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


ZOOM_NEURONS = 64
"""Neurons in Fig 5's zoom panel: the window of the routed experts' neurons with the largest summed
|act(W_gate x)|, drawn one neuron a column."""


def bin_max(values: np.ndarray, bins: int) -> tuple[np.ndarray, int]:
    """[..., n] -> [..., ceil(n / per)]: the largest value of each run of `per` = ceil(n / bins) neurons
    (NaN where a run has none), so a single hot neuron survives however narrow the panel (averaging, or
    an image resampled to fewer pixels, erases it). Returns (binned, per)."""
    n = values.shape[-1]
    per = max(1, -(-n // max(1, bins)))
    pad = (-n) % per
    padded = np.pad(values, [(0, 0)] * (values.ndim - 1) + [(0, pad)], constant_values=np.nan)
    runs = padded.reshape(*values.shape[:-1], -1, per)
    finite = np.isfinite(runs)
    binned = np.where(finite, runs, -np.inf).max(axis=-1)
    return np.where(finite.any(axis=-1), binned, np.nan), per


def row_widths(values: np.ndarray) -> np.ndarray:
    """Each row's own width (a label's d_mid: the store pads narrower rows with NaN)."""
    finite = np.isfinite(values)
    return np.where(finite.any(axis=-1), values.shape[-1] - np.argmax(finite[..., ::-1], axis=-1), 0)


def active_window(values: np.ndarray, width: int, size: int = ZOOM_NEURONS) -> int:
    """The first neuron of the `size`-neuron window (within the first `width` neurons) whose summed |value|
    over the rows is largest."""
    size = min(size, width)
    column = np.nansum(np.abs(values[..., :width]), axis=tuple(range(values.ndim - 1)))
    sums = np.convolve(column, np.ones(size), mode="valid")
    return int(np.argmax(sums))


def _thicken(values: np.ndarray, labels: list[str], wide: list[str]) -> tuple[np.ndarray, list[str], list[int]]:
    """Rows of `wide` labels (a shared expert twice the routed experts' width) repeated so each is an eighth of
    the panel's height, not a sliver under 64 routed experts. Returns (rows drawn, their labels, the positions
    to label: the routed experts' ticks and the middle of each thick row)."""
    from .common import tick_positions

    narrow = [i for i, lab in enumerate(labels) if lab not in wide]
    times = max(1, round(len(narrow) / 8)) if wide else 1
    order = narrow + [i for i, lab in enumerate(labels) if lab in wide for _ in range(times)]
    rows = [labels[i] for i in order]
    ticks = tick_positions([labels[i] for i in narrow]) if narrow else []
    ticks += [len(narrow) + k * times + times // 2 for k in range(len(order[len(narrow):]) // times)]
    return values[order], rows, ticks


def fig5_intermediate(views: list[StoreView], out: Path) -> list[Figure]:
    """Fig 5 (§5.3): |act(W_gate x)| per expert (rows) and neuron (columns) for the tokens the store keeps:
    per token, every neuron (binned by their largest value where there are more neurons than pixels, so a
    neuron active in every expert stays a vertical line at Mixtral's 14,336) beside a zoom on the most active
    window of ZOOM_NEURONS neurons. Rows narrower than the widest (routed experts beside a shared expert of
    twice their width) are drawn to scale: the neuron axis is shared, a row ends at its own width."""
    figures = []
    for inp in _inputs_with(views, "intermediate_states"):
        have = [v for v in views if "intermediate_states" in v.dataset(group(inp))]

        def kept_of(v: StoreView) -> tuple[str, list[int]]:
            da = v.dataset(group(inp))["intermediate_states"]
            tdim = "probe_token" if "probe_token" in da.dims else "token"
            return tdim, [int(t) for t in da[tdim].values]

        def sample(full: StoreView) -> list[np.ndarray]:
            tdim, kept = kept_of(full)
            toks = [kept.index(t) for t in chosen_tokens(full, inp, MAX_TOKENS, kept)]
            da = full.dataset(group(inp))["intermediate_states"]
            layers = _layers(full, inp)
            return [np.array([np.nanmax(np.abs(np.asarray(da.sel(layer=l).isel({tdim: toks}).values,
                                                          dtype=np.float32)), initial=0.0)]) for l in layers]

        def largest(arrays: list[np.ndarray]) -> tuple[float, float]:
            return 0.0, max(value_span(arrays)[1], 1e-12)

        # 0 to the model's largest |value|: the hot neurons the figure is about take the top colours (a
        # percentile clip turned them and the binned background into one colour)
        scale = model_scale(have, f"fig5:{inp}", sample, limits=largest)
        cmap = colormap(CMAPS["magnitude"], scale.extend)
        for v in have:
            ds = v.dataset(group(inp))
            da_all = ds["intermediate_states"]
            tdim, kept = kept_of(v)
            total = ds.sizes["token"] if "token" in ds.sizes else len(kept)
            toks = chosen_tokens(v, inp, MAX_TOKENS, kept)
            default = chosen_tokens(v.unrestricted_tokens(), inp, MAX_TOKENS, kept)
            labels = expert_labels(da_all, "expert")
            texts = token_texts(v, inp, max(kept) + 1)
            per_image = max(1, fitting_columns(2.0, 0.3) // 2)
            for page in pages(_layers(v, inp)):
                topk = _topk(v, inp, page, max(kept) + 1)
                for chunk in token_chunks(toks, per_image):
                    if not chunk:
                        continue
                    values = np.abs(np.asarray(da_all.sel(layer=page).isel({tdim: [kept.index(t) for t in chunk]})
                                               .values, dtype=np.float64))
                    figures.append(_fig5_image(v, inp, page, chunk, default, total, labels, texts, topk, values,
                                               scale, cmap, out, views))
    return figures


def _fig5_image(v: StoreView, inp: str, page: list[int], chunk: list[int], default: list[int], total: int,
                labels: list[str], texts: list[str], topk, values: np.ndarray, scale, cmap, out: Path,
                views: list[StoreView]) -> Figure:
    grid = PanelGrid(len(page), 2 * len(chunk), panel=(2.0, 1.8), gap=(0.3, 0.75), top=0.75)
    pixels = int(grid.panel_w * DPI)
    data: dict = {("range",): scale.limits, ("extend",): scale.extend, ("tokens",): chunk}
    n = values.shape[-1]
    widths = row_widths(values)  # [layer, token, expert]
    routed_width = int(max((w for w, lab in zip(widths.reshape(-1, len(labels)).max(axis=0), labels)
                            if lab != "SE"), default=n)) or n
    wide = [lab for lab, w in zip(labels, widths.reshape(-1, len(labels)).max(axis=0)) if w > routed_width]
    im = None
    for r, layer in enumerate(page):
        for c, pos in enumerate(chunk):
            cell = values[r, c]
            binned, per = bin_max(cell, pixels)
            x0, y0 = grid.corner(r, 2 * c)
            data[(v.label, layer, pos)] = cell
            data[("binned", v.label, layer, pos)] = binned
            data[("panel_px", v.label, layer, pos)] = tuple(round(q * DPI) for q in (x0, y0, x0 + grid.panel_w,
                                                                                     y0 + grid.panel_h))
            shown, rows, ticks = _thicken(binned, labels, wide)
            im = grid.heatmap(r, 2 * c, shown, [], rows, cmap, *scale.limits, show_x=False, show_y=False)
            if c == 0:
                grid.yticks(r, 0, len(rows), ticks, [rows[i] for i in ticks], "expert")
            if r == len(page) - 1:
                grid.numeric_xticks(r, 2 * c, binned.shape[-1] * per, "neuron")
            text = texts[pos] if pos < len(texts) else str(pos)
            chosen = "" if topk is None else " top-k " + ",".join(str(int(e)) for e in topk[r, pos])
            grid.title(r, 2 * c, f"L{layer} #{pos} '{token_label(text, 8)}'{chosen}\n"
                                 + (f"max of {per} neurons a column" if per > 1 else "every neuron"))
            start = active_window(cell[[i for i, lab in enumerate(labels) if lab != "SE"]], routed_width)
            size = min(ZOOM_NEURONS, routed_width)
            window = cell[:, start:start + size]
            data[("zoom", v.label, layer, pos)] = (start, window)
            grid.heatmap(r, 2 * c + 1, _thicken(window, labels, wide)[0], [str(start + i) for i in range(size)], rows,
                         cmap, *scale.limits, xlabel="neuron", show_x=r == len(page) - 1, show_y=False, max_xticks=4)
            grid.title(r, 2 * c + 1, f"zoom: neurons {start}–{start + size - 1}\n(most active window)")
    grid.colorbar(im, "|act(W_gate x)|", extend=scale.extend)
    path = out / f"fig5_intermediate_{inp}_{slug(v.label)}_{page_name(page)}{token_part(chunk, default)}.png"
    shown = tokens_text(chunk, total)
    title = f"Fig 5: intermediate states ({inp} input, {shown}) — {v.label}, layers {page[0]}–{page[-1]}"
    return grid.save("fig5_intermediate", path, title, data,
                     f"{shown} of the {inp} input (the store keeps the first tokens' states: "
                     f"dynamic.intermediate_tokens); left of each pair every neuron, a column holding the largest "
                     f"of its neurons where they outnumber the pixels; right, the most active window of "
                     f"{min(ZOOM_NEURONS, routed_width)} neurons; "
                     + (f"{', '.join(wide)} {'is' if len(wide) == 1 else 'are'} wider than the routed experts "
                        f"({routed_width:,} neurons): the neuron axis is to scale, routed rows end at {routed_width:,}, "
                        f"and {'its row is' if len(wide) == 1 else 'their rows are'} drawn thicker; "
                        if wide else "")
                     + f"colour from 0 to the largest |value| of all this model's layers ({scale.hi:.3g}); "
                       f"{scale_note(views)}.")


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
            routed = [i for i, lab in enumerate(labels) if lab.isdigit()]
            grid.title(0, 0, f"mean over routed experts {100 * np.nanmean(ratio[:, routed]):.1f}%")
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
        hi = model_scale(have, f"fig10:{inp}", lambda full: [routing_weights(
            full, inp, _layers(full, inp), min(full.dataset(group(inp)).sizes["token"], MAX_ROUTING_TOKENS))[0]],
            exclude_diagonal=False, limits=lambda a: (0.0, value_span(a)[1])).hi
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
