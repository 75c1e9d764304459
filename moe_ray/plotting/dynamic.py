"""Figures of the dynamic (text in) analyses, from `dynamic/<input>/*` (paper §5, App D, App E):
Fig 2 per-token expert-output similarity with each token's top-k above the map, Fig 3 averaged
angular similarity beside the matrix-level map, Fig 4 expert output norms and gate scores per token,
Fig 9 (norm rank, score rank) counts, Fig 5 intermediate-state magnitudes for the stored tokens,
the activation-ratio summary, and Fig 10 routing pattern (top-k scores per token across layers).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .common import (CMAPS, Figure, colorbar, StoreView, heatmap, new_figure, page_name, pages, save, shared_range)
from .static import Column, layers_of, square_pages, static_square

MAX_TOKENS = 8
"""Tokens drawn per image in the per-token figures (Fig 2, Fig 5); longer inputs show the first ones."""
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


def _short(s: str, n: int = 12) -> str:
    s = s.replace("\n", "⏎")
    return s if len(s) <= n else s[: n - 1] + "…"


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
                fig, axes = new_figure(len(page), n_tok, panel=(2.4, 2.5))
                data = {("range",): (lo, hi)}
                for r, layer in enumerate(page):
                    for t in range(n_tok):
                        ax = axes[r, t]
                        im = heatmap(ax, values[r, t], labels, labels, CMAPS["similarity"], lo, hi)
                        chosen = "" if topk is None else "top-k: " + ",".join(str(int(e)) for e in topk[r, t])
                        ax.set_title(f"L{layer} · '{_short(texts[t])}'\n{chosen}", fontsize=7)
                        data[(v.label, layer, t)] = values[r, t]
                        if topk is not None:
                            data[("topk", v.label, layer, t)] = [int(e) for e in topk[r, t]]
                colorbar(fig, im, "cosine similarity of outputs")
                path = out / f"fig2_output_similarity_{inp}_{_slug(v.label)}_{page_name(page)}.png"
                title = f"Fig 2: expert-output similarity per token ({inp} input) — {v.label}, layers {page[0]}–{page[-1]}"
                save(fig, path, title)
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


def fig4_norms_scores(views: list[StoreView], out: Path) -> list[Figure]:
    """Fig 4 (§5.2): per token (rows) and expert (columns) the output L2 norm beside the gate score,
    with each token's top-k experts written at the row's right end."""
    figures = []
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
                topk = _topk(v, inp, sel, n_tok)
                for i, l in enumerate(sel):
                    data[(v.label, l, "norm")] = np.asarray(norms.values[i], dtype=np.float64)
                    data[(v.label, l, "score")] = np.asarray(scores.values[i], dtype=np.float64)
                    data[("labels", v.label, l)] = ([str(x) for x in norms["expert"].values],
                                                    [str(x) for x in scores["expert"].values],
                                                    token_texts(v, inp, n_tok))
                    if topk is not None:
                        data[("topk", v.label, l)] = topk[i]
            n_range = shared_range([m for k, m in data.items() if k[-1] == "norm"], exclude_diagonal=False)
            fig, axes = new_figure(len(page), 2 * len(have), panel=(3.2, 3.0))
            im_n = im_s = None
            for r, layer in enumerate(page):
                for s, v in enumerate(have):
                    an, asc = axes[r, 2 * s], axes[r, 2 * s + 1]
                    if (v.label, layer, "norm") not in data:
                        an.set_axis_off(), asc.set_axis_off()
                        continue
                    nl, sl, toks = data[("labels", v.label, layer)]
                    ylab = [_short(t, 10) for t in toks]
                    im_n = heatmap(an, data[(v.label, layer, "norm")], nl, ylab, CMAPS["norm"], *n_range,
                                   ylabel="token")
                    im_s = heatmap(asc, data[(v.label, layer, "score")], sl, ylab, CMAPS["score"], 0.0, 1.0,
                                   ylabel="token")
                    an.set_title(f"{v.label}\nlayer {layer} · output L2 norm", fontsize=8)
                    asc.set_title(f"{v.label}\nlayer {layer} · gate score", fontsize=8)
                    topk = data.get(("topk", v.label, layer))
                    if topk is not None and len(toks) <= 24:
                        for ax in (an, asc):
                            sec = ax.secondary_yaxis("right")
                            sec.set_yticks(range(len(toks)), [",".join(str(int(e)) for e in row) for row in topk],
                                           fontsize=6)
                            sec.set_ylabel("top-k", fontsize=7)
            if im_n is not None:
                colorbar(fig, im_n, "L2 norm of expert output", 0, 2)
                colorbar(fig, im_s, "gate score (softmax over all)", 1, 2)
            data[("range", "norm")] = n_range
            path = out / f"fig4_norms_scores_{inp}_{page_name(page)}.png"
            title = f"Fig 4: expert output norms and gate scores ({inp} input) — layers {page[0]}–{page[-1]}"
            save(fig, path, title)
            figures.append(Figure("fig4_norms_scores", path, title, data))
    return figures


def fig9_rank_counts(views: list[StoreView], out: Path) -> list[Figure]:
    """Fig 9 (App D): how often the expert with norm rank r has score rank s, per layer."""
    figures = []
    for inp in _inputs_with(views, "norm_score_rank_counts"):
        def read(view: StoreView, layers: list[int], inp=inp):
            da = view.dataset(group(inp))["norm_score_rank_counts"].sel(layer=layers)
            return (np.asarray(da.values, dtype=np.float64), [str(x) for x in da["norm_rank"].values],
                    [str(x) for x in da["score_rank"].values])

        have = [v for v in views if "norm_score_rank_counts" in v.dataset(group(inp))]
        cols = [Column(f"rank counts ({inp})", read, "count", CMAPS["count"], "gate score rank", "norm rank")]
        figures += square_pages(have, out, f"fig9_rank_counts_{inp}",
                                f"Fig 9: counts of gate-score rank per norm rank ({inp} input; larger rank = larger)",
                                cols, lambda v, inp=inp: _layers(v, inp), {"count": "tokens"}, exclude_diagonal=False)
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
            texts = token_texts(v, inp)
            for page in pages(_layers(v, inp)):
                da = da_all.sel(layer=page).isel({tdim: slice(0, n_tok)})
                values = np.abs(np.asarray(da.values, dtype=np.float64))
                labels = [str(x) for x in da["expert"].values]
                hi = float(np.nanpercentile(values, 99)) if np.isfinite(values).any() else 1.0
                fig, axes = new_figure(len(page), n_tok, panel=(3.4, 2.2))
                data: dict = {("range",): (0.0, hi)}
                topk = _topk(v, inp, page, ds.sizes["token"])
                for r, layer in enumerate(page):
                    for t in range(n_tok):
                        ax = axes[r, t]
                        im = ax.imshow(values[r, t], aspect="auto", cmap=CMAPS["magnitude"], vmin=0, vmax=hi,
                                       interpolation="nearest")
                        yt = list(range(len(labels))) if len(labels) <= 16 else list(range(0, len(labels), 8))
                        ax.set_yticks(yt, [labels[i] for i in yt], fontsize=6)
                        ax.set_xlabel("neuron", fontsize=7)
                        ax.set_ylabel("expert", fontsize=7)
                        ax.tick_params(labelsize=6)
                        pos = tok_idx[t]
                        text = texts[pos] if pos < len(texts) else str(pos)
                        chosen = ("" if topk is None or pos >= topk.shape[1]
                                  else " top-k: " + ",".join(str(int(e)) for e in topk[r, pos]))
                        ax.set_title(f"L{layer} · token {pos} '{_short(text)}'\n{chosen}", fontsize=7)
                        data[(v.label, layer, pos)] = values[r, t]
                colorbar(fig, im, "|act(W_gate x)| (clipped at 99th pct)")
                path = out / f"fig5_intermediate_{inp}_{_slug(v.label)}_{page_name(page)}.png"
                title = f"Fig 5: intermediate-state magnitudes ({inp} input) — {v.label}, layers {page[0]}–{page[-1]}"
                save(fig, path, title)
                figures.append(Figure("fig5_intermediate", path, title, data))
    return figures


def activation_ratio_summary(views: list[StoreView], out: Path) -> list[Figure]:
    """§5.3: fraction of intermediate elements with |value| > 1e-3, mean over tokens, layer x expert."""
    figures = []
    for inp in _inputs_with(views, "activation_ratio"):
        have = [v for v in views if "activation_ratio" in v.dataset(group(inp))]
        fig, axes = new_figure(1, len(have), panel=(4.2, 3.4))
        data: dict = {}
        for s, v in enumerate(have):
            da = v.dataset(group(inp))["activation_ratio"].sel(layer=_layers(v, inp))
            mean = np.asarray(da.mean("token").values, dtype=np.float64)
            labels = [str(x) for x in da["expert"].values]
            layers = [str(int(l)) for l in da["layer"].values]
            im = heatmap(axes[0, s], mean, labels, layers, CMAPS["ratio"], 0.0, 1.0, ylabel="layer")
            axes[0, s].set_title(f"{v.label}\nmean activation ratio {np.nanmean(mean):.3f}", fontsize=8)
            data[v.label] = mean
        colorbar(fig, im, "fraction |act| > 1e-3 (mean over tokens)")
        path = out / f"activation_ratio_{inp}.png"
        title = f"Activation ratio per layer and expert ({inp} input)"
        save(fig, path, title)
        figures.append(Figure("activation_ratio", path, title, data))
    return figures


def fig10_routing(views: list[StoreView], out: Path) -> list[Figure]:
    """Fig 10 (App E): gate scores of each token's top-k experts (others blank), token x expert per layer."""
    figures = []
    for inp in _inputs_with(views, "topk_experts"):
        have = [v for v in views if {"topk_experts", "gate_scores"} <= set(v.dataset(group(inp)))]
        all_layers = sorted({l for v in have for l in _layers(v, inp)})
        for page in pages(all_layers):
            fig, axes = new_figure(len(page), len(have), panel=(4.0, 3.0))
            data: dict = {}
            im = None
            for s, v in enumerate(have):
                ds = v.dataset(group(inp))
                sel = [l for l in page if l in _layers(v, inp)]
                if not sel:
                    continue
                n_tok = min(ds.sizes["token"], MAX_ROUTING_TOKENS)
                scores = np.asarray(ds["gate_scores"].sel(layer=sel).isel(token=slice(0, n_tok)).values,
                                    dtype=np.float64)
                topk = _topk(v, inp, sel, n_tok)
                labels = [str(x) for x in ds["gate_scores"]["expert"].values]
                toks = [_short(t, 8) for t in token_texts(v, inp, n_tok)]
                for i, layer in enumerate(sel):
                    shown = np.full(scores[i].shape, np.nan)
                    rows = np.arange(n_tok)[:, None]
                    shown[rows, topk[i]] = scores[i][rows, topk[i]]
                    ax = axes[page.index(layer), s]
                    im = heatmap(ax, shown.T, toks, labels, CMAPS["score"], 0.0, 1.0, xlabel="token")
                    ax.set_title(f"{v.label}\nlayer {layer} · top-k gate scores", fontsize=8)
                    data[(v.label, layer)] = shown
            for ax in axes.ravel():
                if not ax.has_data():
                    ax.set_axis_off()
            if im is not None:
                colorbar(fig, im, "gate score of a top-k expert")
            path = out / f"fig10_routing_{inp}_{page_name(page)}.png"
            title = f"Fig 10: routing pattern ({inp} input) — layers {page[0]}–{page[-1]}"
            save(fig, path, title)
            figures.append(Figure("fig10_routing", path, title, data))
    return figures
