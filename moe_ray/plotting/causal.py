"""Figures and tables of the causal checks (beyond the paper), from `causal/*`: routing by expert output
norm (the gate's top-k against the top-k by norm, and the change of loss when a layer, or every layer,
routes by norm: §5.2, §6), expert ablation (the change of loss with each expert removed) and the
agreement of weight and output similarity (§6 "Correlation measurement", a table beside Tab 4).

One image per store; every caption says which corpus, how many sequences and tokens, and what the
intervals are. Changes of loss are in nats per predicted token, intervals percentile bootstraps over the
corpus's sequences.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .common import (LABEL_FONT, MAX_WIDTH, RIGHT_MARGIN, TICK_FONT, Figure, StoreView, Table, figure_record,
                     expert_labels, new_figure, pages, panel_title)
from .grid import PanelGrid
from ..store import SUMMARISED, SUMMARY_ARRAYS

from matplotlib.ticker import FormatStrFormatter  # noqa: E402 (after .common set the backend)
from .static import MATRICES, slug

NORM, NORM_ALL, ABLATION, AGREEMENT = "causal/norm_routing", "causal/norm_routing_all", "causal/ablation", "causal/agreement"
LEFT = 0.9
"""Inches left of the ablation map (layer labels)."""
ABLATION_ROWS_PER_IMAGE = 32
"""Layers per ablation image: a 64-layer model gives two."""
LEGEND_LINE = 0.2
"""Inches per line of the ablation map's dot legend."""
DELTA_CMAP = "PuOr_r"
"""Changes of loss: diverging around 0 (orange: the loss grows without the expert), not used elsewhere."""


def done(view: StoreView, group: str) -> bool:
    """Whether every unit of a causal group is done and its summaries written over them (a run that
    stopped before writing them leaves `summarised` unset: `store.SUMMARISED`)."""
    if not view.has(group):
        return False
    ds = view.dataset(group)
    if ds.attrs.get(SUMMARY_ARRAYS) and ds.attrs.get(SUMMARISED) is not True:
        return False
    return "unit_done" in ds and bool(np.asarray(ds["unit_done"].values).all())


def corpus_text(view: StoreView) -> str:
    """The corpus in words: which, how many sequences and predicted tokens."""
    ds = view.dataset("causal")
    attrs = ds.attrs
    tokens = int(np.asarray(ds["sequence_tokens"].values).sum())
    return f"{attrs.get('corpus', 'the corpus')}: {ds.sizes['sequence']} sequences, {tokens:,} predicted tokens"


def interval_text(view: StoreView, group: str) -> str:
    boot = view.dataset(group).attrs.get("bootstrap") or {}
    return (f"{100 * float(boot.get('level', 0.95)):g}% percentile bootstrap intervals over sequences "
            f"({int(boot.get('resamples', 0)):,} resamples, seed {boot.get('seed', '?')})")


def _delta(view: StoreView, group: str) -> np.ndarray:
    return np.asarray(view.dataset(group)["delta_loss"].values, dtype=np.float64)


def excludes_0(delta: np.ndarray) -> np.ndarray:
    """[..., stat] -> where the bootstrap interval (low, high) excludes 0: the uncorrected criterion."""
    return (delta[..., 1] > 0) | (delta[..., 2] < 0)


def ablation_tests(view: StoreView) -> tuple[np.ndarray, dict] | None:
    """(the Holm-adjusted p-values [layer, expert], the group's `multiple_comparison` attributes: method,
    alpha, tests, ...), or None for a store written before moe-ray corrected the counts."""
    ds = view.dataset(ABLATION)
    mc = ds.attrs.get("multiple_comparison")
    if "p_holm" not in ds or not isinstance(mc, dict):
        return None
    return np.asarray(ds["p_holm"].values, dtype=np.float64), mc


def corrected_count_text(view: StoreView) -> str:
    """"N of M experts change the loss (corrected: Holm-Bonferroni, α 0.05)", or what the store lacks."""
    tests = ablation_tests(view)
    if tests is None:
        return "no multiple-comparison correction in this store (written by an older moe-ray; a new run computes it)"
    adjusted, mc = tests
    alpha = float(mc["alpha"])
    return (f"{int((adjusted <= alpha).sum())} of {int(mc['tests'])} experts change the loss (corrected: "
            f"{mc['method']} over the {int(mc['tests'])} paired t-tests, α {alpha:g})")


def norm_routing(views: list[StoreView], out: Path) -> list[Figure]:
    """Per layer: how often the gate's top-k are the experts with the largest output norms (left), and the
    change of loss when that layer, or every layer ("all"), routes by norm (right)."""
    figures = []
    for v in views:
        if not done(v, NORM):
            continue
        ds = v.dataset(NORM)
        layers = [int(x) for x in ds["layer"].values]
        k, E = int(v.model.get("top_k") or 1), int(v.model.get("num_experts") or 1)
        agreement = np.asarray(ds["agreement"].values, dtype=np.float64)
        match = np.asarray(ds["match_rate"].values, dtype=np.float64)
        delta = _delta(v, NORM)
        all_layers = _delta(v, NORM_ALL) if done(v, NORM_ALL) else np.full(3, np.nan)
        fig, axes = new_figure(1, 2, panel=(4.3, 2.8), gap=(1.2, 0.9), top=0.75, bottom=1.05, right=0.4)
        ax = axes[0, 0]
        ax.plot(layers, agreement, "-o", color="C0", ms=3, label="|gate top-k ∩ norm top-k| / k")
        ax.plot(layers, match, "--s", color="C1", ms=3, label="same set")
        ax.axhline(k / E, color="grey", lw=0.8, ls=":", label=f"chance k/E = {k / E:.2f}")
        ax.set_ylim(0, 1.02)
        ax.set_ylabel("fraction of tokens", fontsize=LABEL_FONT)
        panel_title(ax, f"gate top-{k} vs top-{k} by output norm")
        _layer_axis(ax, layers)
        ax = axes[0, 1]
        x = np.arange(len(layers))
        ax.errorbar(x, delta[:, 0], yerr=_yerr(delta), fmt="o", color="C2", ms=3, capsize=2, lw=0.9,
                    label="this layer by norm")
        if np.isfinite(all_layers[0]):
            ax.errorbar([len(layers)], [all_layers[0]], yerr=_yerr(all_layers[None]), fmt="D", color="C3", ms=4,
                        capsize=2, lw=0.9, label="every layer by norm")
        ax.axhline(0, color="black", lw=0.6)
        ticks = list(x) + ([len(layers)] if np.isfinite(all_layers[0]) else [])
        labels = [str(l) for l in layers] + (["all"] if np.isfinite(all_layers[0]) else [])
        step = max(1, len(ticks) // 16)
        ax.set_xticks(ticks[::step] + ([ticks[-1]] if (len(ticks) - 1) % step else []))
        ax.set_xticklabels(labels[::step] + ([labels[-1]] if (len(ticks) - 1) % step else []))
        ax.set_xlabel("layer routed by output norm", fontsize=LABEL_FONT)
        ax.set_ylabel("Δ loss (nats / token)", fontsize=LABEL_FONT)
        panel_title(ax, "change of next-token loss")
        _finish_axes(ax)
        data = {(v.label, "agreement"): agreement, (v.label, "match_rate"): match, (v.label, "delta_loss"): delta,
                (v.label, "delta_loss_all_layers"): all_layers}
        semantics = (v.dataset("causal").attrs.get("interventions") or {}).get("norm_routing", "")
        caption = (f"{corpus_text(v)}. Left: per layer, the share of each token's gate top-{k} that are also its "
                   f"top-{k} experts by output norm (all {E} experts computed), and the tokens where the two sets "
                   f"are equal. Right: the change of the loss when that layer (or every layer) routes by norm, with "
                   f"{interval_text(v, NORM)}. Norm routing: {semantics}.")
        figures.append(figure_record(fig, "causal_norm_routing", out / f"causal_norm_routing_{slug(v.label)}.png",
                                     f"Norm routing (§5.2, §6) — {v.label}", data, caption))
    return figures


def ablation(views: list[StoreView], out: Path) -> list[Figure]:
    """The change of loss with each expert (and SE) of each layer removed: a map of layers x experts on a
    diverging colour map centred on 0 (this model's range); a black dot where the ablation changes the loss
    after the multiple-comparison correction, a white one where only the uncorrected bootstrap interval
    excludes 0. The caption leads with the corrected count, the uncorrected one beside it."""
    figures = []
    for v in views:
        if not done(v, ABLATION):
            continue
        ds = v.dataset(ABLATION)
        layers = [int(x) for x in ds["layer"].values]
        labels = expert_labels(ds, "expert")
        delta = _delta(v, ABLATION)  # [layer, expert, stat]
        routed = [i for i, lab in enumerate(labels) if lab.isdigit()]
        m = float(np.nanmax(np.abs(delta[:, routed, 0]))) or 1e-9  # SE can dwarf the routed experts
        beyond = bool(np.nanmax(np.abs(delta[..., 0])) > m)
        uncorrected = excludes_0(delta)
        tests = ablation_tests(v)
        corrected = tests[0] <= float(tests[1]["alpha"]) if tests else np.zeros(uncorrected.shape, dtype=bool)
        count = corrected_count_text(v)
        if tests:
            counts = (f"{count[0].upper()}{count[1:]}, in all layers; uncorrected, {int(uncorrected.sum())} bootstrap "
                      "intervals exclude 0. ")
            marks = ("black dots: a change of the loss after the correction; white dots: the "
                     f"{interval_text(v, ABLATION)} exclude 0 without it")
        else:
            counts = ""
            marks = f"a dot where the {interval_text(v, ABLATION)} exclude 0 (uncorrected; {count})"
        for page in pages(list(range(len(layers))), ABLATION_ROWS_PER_IMAGE):
            values = delta[page, :, 0]
            cell = min(0.45, (MAX_WIDTH - LEFT - RIGHT_MARGIN) / len(labels))
            grid = PanelGrid(1, 1, panel=(max(1.5, cell * len(labels)), max(1.2, 0.3 * len(page))), top=0.75,
                             bottom=0.75 + (LEGEND_LINE * 2 if tests else 0), left=LEFT)
            im = grid.heatmap(0, 0, values, labels, [str(layers[i]) for i in page], DELTA_CMAP, -m, m,
                              ylabel="layer")
            sure = [(r, c) for r, i in enumerate(page) for c in range(len(labels)) if corrected[i, c]]
            only_uncorrected = [(r, c) for r, i in enumerate(page) for c in range(len(labels))
                                if uncorrected[i, c] and not corrected[i, c]]
            grid.mark(0, 0, values.shape, only_uncorrected)
            grid.mark(0, 0, values.shape, sure, filled=True)
            if tests:  # the two dots explained under the map
                for line, (kind, text) in enumerate(((grid.filled_marks, f"changes the loss after the correction "
                                                      f"({tests[1]['method']}, α {float(tests[1]['alpha']):g})"),
                                                     (grid.marks, "interval excludes 0, uncorrected only"))):
                    y = grid.height - LEGEND_LINE * (2 - line) + 0.05
                    kind.append((0.25, y))
                    grid.canvas.text(0.4, y, text, fontsize=TICK_FONT, va="center")
            bar = grid.colorbar(im, "Δ loss (nats / token)", extend="both" if beyond else "neither")
            bar.ax.yaxis.set_major_formatter(FormatStrFormatter("%.2g"))  # no offset text beyond the image
            shown = [layers[i] for i in page]
            data = {(v.label, "delta_loss"): delta[page], (v.label, "layers"): shown, (v.label, "corrected"): sure,
                    (v.label, "excludes_0_uncorrected_only"): only_uncorrected}
            name = f"L{shown[0]}" if len(shown) == 1 else f"L{shown[0]}-{shown[-1]}"
            semantics = v.dataset("causal").attrs.get("interventions") or {}
            caption = (f"{corpus_text(v)}. {counts}Each cell: the change of the loss with that expert removed from "
                       f"that layer's routing ({semantics.get('ablation', '')}"
                       + ("; SE: " + semantics.get("shared_expert_ablation", "") if "SE" in labels else "")
                       + f"). Colour range ±{m:.2g}, this model's largest among routed experts"
                       + ("; SE's larger change is drawn in the end colour (its value: the table below)" if beyond else "")
                       + f"; {marks}.")
            figures.append(grid.save("causal_ablation", out / f"causal_ablation_{slug(v.label)}_{name}.png",
                                     f"Expert ablation — {v.label}, layers {shown[0]}–{shown[-1]}", data, caption))
    return figures


def weight_output(views: list[StoreView], out: Path) -> list[Figure]:
    """Per layer, Pearson R between S1's matrix-level similarity and the outputs' similarity over the corpus
    (D1 cosine left, D2 angular right), a line per matrix."""
    figures = []
    for v in views:
        if not done(v, AGREEMENT):
            continue
        ds = v.dataset(AGREEMENT)
        layers = [int(x) for x in ds["layer"].values]
        r = np.asarray(ds["correlation"].values, dtype=np.float64)  # [layer, matrix, output]
        outputs = [str(o) for o in ds["output"].values]
        fig, axes = new_figure(1, len(outputs), panel=(4.3, 2.8), gap=(1.2, 0.9), top=0.75, bottom=1.0, right=0.4)
        names = {"cosine": "D1: cosine of outputs, corpus mean", "angular": "D2: angular similarity, corpus mean"}
        for oi, o in enumerate(outputs):
            ax = axes[0, oi]
            for mi, m in enumerate(MATRICES):
                ax.plot(layers, r[:, mi, oi], "-o", color=f"C{mi}", ms=3, label=f"S1 W_{m}")
            ax.axhline(0, color="black", lw=0.6)
            ax.set_ylim(-1.02, 1.02)
            ax.set_ylabel("Pearson R (pairs i<j)", fontsize=LABEL_FONT)
            panel_title(ax, names.get(o, o))
            _layer_axis(ax, layers)
        tokens = int(ds.attrs.get("tokens") or 0)
        caption = (f"{corpus_text(v)}. R between the i<j entries of the routed experts' S1 similarity (flattened "
                   f"W_up, W_gate, W_down) and of their outputs' similarity averaged over the corpus's {tokens:,} "
                   "tokens (Topk = ALL): the paper's claim that measuring weights is partly equivalent to measuring "
                   "outputs over many tokens (§6).")
        figures.append(figure_record(fig, "causal_weight_output", out / f"causal_weight_output_{slug(v.label)}.png",
                                     f"Weight vs output similarity per layer (§6) — {v.label}",
                                     {(v.label, "correlation"): r}, caption))
    return figures


def _yerr(delta: np.ndarray) -> np.ndarray:
    """Error-bar lengths below and above each estimate from (estimate, low, high) rows."""
    return np.abs(np.stack([delta[:, 0] - delta[:, 1], delta[:, 2] - delta[:, 0]]))


def _layer_axis(ax, layers: list[int]) -> None:
    ax.set_xlabel("layer", fontsize=LABEL_FONT)
    if len(layers) <= 16:
        ax.set_xticks(layers)
    _finish_axes(ax)


def _finish_axes(ax) -> None:
    ax.tick_params(labelsize=TICK_FONT)
    ax.legend(fontsize=TICK_FONT, frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=3,
              borderaxespad=0, columnspacing=1.0, handlelength=2.2)
    ax.grid(alpha=0.3)


# ---- tables ------------------------------------------------------------------------------------------

def summary_table(views: list[StoreView]) -> list[Table]:
    """One row per store: the corpus, the loss, the norm-routing agreement and loss change, the largest
    ablation effect, the mean weight-output R²."""
    rows = []
    for v in views:
        if not done(v, "causal"):
            continue
        ds = v.dataset("causal")
        row: list = [v.label, ds.sizes["sequence"], int(np.asarray(ds["sequence_tokens"].values).sum()),
                     float(ds.attrs.get("loss", np.nan))]
        if done(v, NORM):
            row += [float(np.nanmean(v.dataset(NORM)["agreement"].values))]
        else:
            row += [None]
        d = _delta(v, NORM_ALL) if done(v, NORM_ALL) else [None] * 3
        row += [_num(d[0]), _num(d[1]), _num(d[2])]
        if done(v, ABLATION):
            a = v.dataset(ABLATION)
            delta = _delta(v, ABLATION)
            li, ei = np.unravel_index(np.nanargmax(delta[..., 0]), delta.shape[:2])
            sure = int(excludes_0(delta).sum())
            tests = ablation_tests(v)
            corrected = (f"{int((tests[0] <= float(tests[1]['alpha'])).sum())} of {int(tests[1]['tests'])}"
                         if tests else None)
            row += [f"layer {int(a['layer'].values[li])} expert {a['expert'].values[ei]}", float(delta[li, ei, 0]),
                    corrected, f"{sure} of {delta.shape[0] * delta.shape[1]}"]
        else:
            row += [None, None, None, None]
        r2 = (v.dataset(AGREEMENT).attrs.get("r2_mean") or {}) if done(v, AGREEMENT) else {}
        row += [r2.get("gate/angular")]
        rows.append(row)
    columns = ["model", "sequences", "tokens", "loss (nats/token)", "gate/norm top-k agreement (mean over layers)",
               "Δ loss, every layer by norm", "low", "high", "largest ablation Δ at", "Δ loss",
               "experts that change the loss (Holm-corrected)", "ablations whose interval excludes 0 (uncorrected)",
               "mean R² (S1 W_gate, D2 angular)"]
    return [Table("causal_summary", "Causal checks (beyond the paper): summary", columns, rows,
                  formats=[None, None, None, ".3f", ".3f", "sig3", "sig3", "sig3", None, "sig3", None, None, ".2f"],
                  note="Δ loss: the change of the corpus's next-token loss per predicted token (nats) from an "
                       "intervention, with its percentile bootstrap interval over sequences (see each store's "
                       "causal attributes). Agreement: the share of each token's gate top-k that are also its "
                       "top-k experts by output norm, averaged over tokens and layers. Experts that change the loss: "
                       "ablations whose paired t-test on the per-sequence loss differences stays significant after "
                       "the Holm-Bonferroni correction over every (layer, expert) ablation, at family-wise error rate α "
                       "= 1 - the interval level (0.05 for 95% intervals); the uncorrected count beside it is how "
                       "many bootstrap intervals exclude 0, of which about α × the number of ablations would do so "
                       "by chance alone.")]


def norm_routing_table(views: list[StoreView]) -> list[Table]:
    rows = []
    for v in views:
        if not done(v, NORM):
            continue
        ds = v.dataset(NORM)
        delta = _delta(v, NORM)
        for i, layer in enumerate(ds["layer"].values):
            rows.append([v.label, int(layer), float(ds["agreement"].values[i]), float(ds["match_rate"].values[i]),
                         *map(float, delta[i])])
        if done(v, NORM_ALL):
            rows.append([v.label, "all", None, None, *map(float, _delta(v, NORM_ALL))])
    return [Table("causal_norm_routing", "Norm routing per layer: agreement with the gate and change of loss",
                  ["model", "layer", "top-k agreement", "same set", "Δ loss (nats/token)", "low", "high"], rows,
                  formats=[None, None, ".3f", ".3f", "sig3", "sig3", "sig3"],
                  note="Layer 'all': every analysed MoE layer routes by norm at once.")]


def ablation_table(views: list[StoreView], top: int = 10) -> list[Table]:
    """The `top` ablations that raise the loss most, per store (every one is in the store and the figure)."""
    rows = []
    for v in views:
        if not done(v, ABLATION):
            continue
        ds = v.dataset(ABLATION)
        delta = _delta(v, ABLATION)
        order = np.argsort(-np.nan_to_num(delta[..., 0], nan=-np.inf), axis=None)[:top]
        tests = ablation_tests(v)
        p = np.asarray(ds["p_value"].values, dtype=np.float64) if tests else None
        for flat in order:
            li, ei = np.unravel_index(flat, delta.shape[:2])
            rows.append([v.label, int(ds["layer"].values[li]), expert_labels(ds, "expert")[ei],
                         *map(float, delta[li, ei]), float(p[li, ei]) if tests else None,
                         float(tests[0][li, ei]) if tests else None])
    return [Table("causal_ablation_top", f"Expert ablation: the {top} removals that raise the loss most",
                  ["model", "layer", "expert", "Δ loss (nats/token)", "low", "high", "p (paired t)",
                   "p, Holm-adjusted"], rows,
                  formats=[None, None, None, "sig3", "sig3", "sig3", "sig3", "sig3"],
                  note="All (layer, expert) changes are in the store (causal/ablation/delta_loss, p_value, p_holm) and "
                       "the figure. p: two-sided paired t-test on the per-sequence loss differences; Holm-adjusted "
                       "over every ablation of the store: the ablation changes the loss where it is <= α (the "
                       "summary's count).")]


def weight_output_table(views: list[StoreView]) -> list[Table]:
    """Beside Tab 4: Pearson R per layer between S1 and the outputs' corpus-mean similarity."""
    per_store = {}
    for v in views:
        if not done(v, AGREEMENT):
            continue
        ds = v.dataset(AGREEMENT)
        r = np.asarray(ds["correlation"].values, dtype=np.float64)
        outputs = [str(o) for o in ds["output"].values]
        per_store[v.label] = ({int(l): r[i] for i, l in enumerate(ds["layer"].values)}, outputs)
    if not per_store:
        return []
    layers = sorted({l for d, _ in per_store.values() for l in d})
    columns, subheaders, groups = ["layer"], ["layer"], [("", 1)]
    for label, (_, outputs) in per_store.items():
        names = [f"{m} / {o}" for o in outputs for m in MATRICES]
        columns += [f"{label} R(S1 W_{m}, {o})" for o in outputs for m in MATRICES]
        subheaders += names
        groups.append((label, len(names)))
    rows = []
    for layer in layers:
        row: list = [layer]
        for d, outputs in per_store.values():
            values = d.get(layer)
            row += ([float(values[mi, oi]) for oi in range(len(outputs)) for mi in range(len(MATRICES))]
                    if values is not None else [None] * (len(outputs) * len(MATRICES)))
        rows.append(row)
    return [Table("causal_weight_output", "Beside Tab 4: Pearson R per layer between S1 (weights) and the outputs' "
                  "similarity over the corpus", columns, rows, formats=[None] + [".2f"] * (len(columns) - 1),
                  header_groups=groups, subheaders=subheaders,
                  note="Matrix / output: S1 of that matrix against D1's cosine or D2's angular similarity of the "
                       "routed experts' outputs, averaged over every token of the corpus; R over the pairs i<j.")]


def _num(x) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)
