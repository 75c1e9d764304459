"""Findings: each observation the paper summarises (§4.3 static, §5.4 dynamic, with §5.2-§5.3's numbers), the
number of this model that tests it, whether it holds, and the paper's number beside it where it gives one.

The paper reads its observations off heat maps; here each becomes one number with a stated threshold, so a
reader can check a model against the paper (or a synthetic model against what was planted). The statistics
are pure functions of arrays (`*_stat`); `findings(view)` reads them from a store and `findings_table` lays
them out. A synthetic (make-tiny) model is said to be one: its numbers test the pipeline, not the paper.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .common import StoreView, Table, expert_labels
from .static import MATRICES, layers_of

PAPER_MODEL = {"mixtral": "Mixtral", "deepseek_moe": "DeepSeek", "grok1": "Grok"}
"""The family of each model the paper studies, by moe-ray family name."""


@dataclass
class Finding:
    """One observation tested on one model."""

    section: str          # "§4.3 (1)"
    observation: str      # the paper's words, shortened
    test: str             # what the number is, and the threshold that decides `holds`
    value: float | None   # this model's number (None: the store lacks what it needs)
    holds: bool | None
    paper: str = ""       # the paper's number for this model's family, when it gives one
    needs: str = ""       # what to run when value is None


def _routed(labels: list[str]) -> list[int]:
    return [i for i, lab in enumerate(labels) if lab.isdigit()]


def _offdiag(m: np.ndarray) -> np.ndarray:
    """Upper-triangle entries (i < j) of a square map."""
    return m[np.triu_indices(m.shape[-1], 1)]


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation of two 1-D arrays (finite pairs); NaN for fewer than 3."""
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3:
        return float("nan")
    rx, ry = np.argsort(np.argsort(x[ok])), np.argsort(np.argsort(y[ok]))
    return _pearson(rx.astype(float), ry.astype(float))


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if x.size < 3 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def layer_means(maps: np.ndarray) -> np.ndarray:
    """[layer, E, E] similarity maps of routed experts -> the mean over pairs i<j per layer (S_ee)."""
    return np.array([np.nanmean(_offdiag(m)) for m in maps])


def cross_stat(maps: np.ndarray, z: float = 2.0, least: float = 0.05) -> tuple[float, dict[int, int]]:
    """§4.3 (1), dark crosses: per layer, experts whose mean similarity to the others lies more than `z`
    standard deviations of the other experts' means, and at least `least`, below the others' mean. Returns
    (the fraction of layers with such an expert, how often each expert is one)."""
    counts: dict[int, int] = {}
    layers_with = 0
    for m in maps:
        m = m.astype(np.float64).copy()
        np.fill_diagonal(m, np.nan)
        means = np.nanmean(m, axis=1)
        spread = np.nanstd(means)
        if not np.isfinite(spread) or spread == 0:
            continue
        # each expert against the others' means: one distinct expert pulls a plain z-score towards itself
        low = [e for e in range(len(means)) if means[e] < np.nanmean(np.delete(means, e))
               - max(z * np.nanstd(np.delete(means, e)), least)]
        if low:
            layers_with += 1
            for e in low:
                counts[e] = counts.get(e, 0) + 1
    return (layers_with / len(maps) if len(maps) else float("nan")), counts


def depth_trend(values: np.ndarray, layers: list[int], drop_last: bool = True) -> float:
    """Spearman's rho between a per-layer quantity and depth (the last layer left out where the paper calls
    it an outlier)."""
    values, layers_ = np.asarray(values, dtype=np.float64), np.asarray(layers, dtype=np.float64)
    if drop_last and len(values) > 3:
        values, layers_ = values[:-1], layers_[:-1]
    return _spearman(layers_, values)


def trend_threshold(n_layers: int) -> float:
    """|ρ| a depth trend must pass to count: 2 / sqrt(n - 1), about the 95% bound of Spearman's ρ for n
    unrelated values, so noise of ±0.001 across layers is not called a trend."""
    return 2 / np.sqrt(max(n_layers - 1, 1))


def matrix_agreement(maps: np.ndarray) -> float:
    """§4.3 (4): [layer, matrix, E, E] -> the mean over layers and matrix pairs of Pearson R between two
    matrices' off-diagonal similarities (1 = the same pattern)."""
    rs = []
    for layer in maps:
        for a in range(len(layer)):
            for b in range(a + 1, len(layer)):
                rs.append(_pearson(_offdiag(layer[a]), _offdiag(layer[b])))
    rs = [r for r in rs if np.isfinite(r)]
    return float(np.mean(rs)) if rs else float("nan")


def map_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """§5.4 (2): [layer, E, E] x 2 -> mean over layers of Pearson R between their off-diagonal entries."""
    if np.shape(a) != np.shape(b):  # not the same experts (a store whose groups disagree): nothing to compare
        return float("nan")
    rs = [_pearson(_offdiag(x), _offdiag(y)) for x, y in zip(a, b)]
    rs = [r for r in rs if np.isfinite(r)]
    return float(np.mean(rs)) if rs else float("nan")


def norm_score_stat(norms: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """§5.4 (4): [layer, token, E] norms and gate scores of the routed experts -> (how often the top-1 expert
    by score is the one with the largest output norm; mean over tokens of Spearman's rho between the two)."""
    n, s = norms.reshape(-1, norms.shape[-1]), scores.reshape(-1, scores.shape[-1])
    ok = np.isfinite(n).all(axis=1) & np.isfinite(s).all(axis=1)
    n, s = n[ok], s[ok]
    if not len(n):
        return float("nan"), float("nan")
    agree = float(np.mean(np.argmax(n, axis=1) == np.argmax(s, axis=1)))
    rhos = [_spearman(a, b) for a, b in zip(n, s)]
    rhos = [r for r in rhos if np.isfinite(r)]
    return agree, (float(np.mean(rhos)) if rhos else float("nan"))


def top_gap(scores: np.ndarray) -> float:
    """§5.2: the median over tokens of (top-1 score) / (top-2 score) (the paper: the top-1 expert's score is
    usually much higher than the others', the second included)."""
    s = scores.reshape(-1, scores.shape[-1])
    s = s[np.isfinite(s).all(axis=1)]
    if not len(s) or s.shape[-1] < 2:
        return float("nan")
    top = -np.sort(-s, axis=1)
    return float(np.median(top[:, 0] / np.maximum(top[:, 1], 1e-30)))


def vertical_lines(states: np.ndarray) -> float:
    """§5.4 (5): [layer, token, E, neuron] |act(W_gate x)| of the routed experts -> the mean over layers and
    tokens of the mean pairwise Pearson R between experts' |values| at the same neuron index (vertical lines
    across experts: R > 0)."""
    rs = []
    for cell in np.abs(states.reshape(-1, *states.shape[-2:])):
        width = int(np.isfinite(cell).all(axis=0).sum())
        if width < 3:
            continue
        c = cell[:, np.isfinite(cell).all(axis=0)]
        r = np.corrcoef(c)
        rs.append(float(np.nanmean(_offdiag(r))))
    return float(np.mean(rs)) if rs else float("nan")


def _static_findings(v: StoreView, family: str) -> list[Finding]:
    out: list[Finding] = []
    needs = "static analyses"
    ds = v.dataset("static") if v.has("static") else None
    if ds is None or "matrix_similarity" not in ds or not layers_of(v, "static"):
        return [Finding(f"§4.3 ({n})", obs, "", None, None, needs=needs) for n, obs in (
            (1, "Mixtral has experts with special attributes (dark crosses)"),
            (2, "DeepSeek and Grok expert weights are about 0 alike, Mixtral's about 0.3"),
            (3, "experts' weights are less similar in deep layers"),
            (4, "W_up, W_gate, W_down share similar similarity patterns"),
            (5, "the gate embedding's similarity goes with W_gate's (the highest R²)"))]
    layers = layers_of(v, "static")
    da = ds["matrix_similarity"].sel(layer=layers)
    routed = _routed(expert_labels(da, "expert_i"))
    maps = np.asarray(da.isel(expert_i=routed, expert_j=routed).values, dtype=np.float64)  # [L, 3, E, E]
    mean_maps = np.nanmean(maps, axis=1)
    fraction, counts = cross_stat(mean_maps)
    most = max(counts, key=counts.get) if counts else None
    out.append(Finding("§4.3 (1)", "Mixtral has experts with special attributes (dark crosses in Fig 1)",
                       "share of layers with an expert whose mean similarity to the others is > 2 SD (and 0.05) "
                       "below theirs"
                       + (f" (most often expert {expert_labels(da, 'expert_i')[routed[most]]}: {counts[most]} layers)"
                          if most is not None else ""),
                       fraction, bool(fraction > 0) if np.isfinite(fraction) else None,
                       "Mixtral: frequent, most often expert 3" if family == "mixtral" else ""))
    see = float(np.nanmean(layer_means(mean_maps)))
    paper = {"mixtral": ("about 0.3 (0.2–0.4)", 0.2 <= see <= 0.4), "deepseek_moe": ("about 0", abs(see) < 0.05),
             "grok1": ("about 0", abs(see) < 0.05)}.get(family)
    out.append(Finding("§4.3 (2)", "DeepSeek and Grok expert weights are about 0 alike, Mixtral's about 0.3",
                       "mean cosine similarity of routed-expert pairs (S_ee), all layers and matrices", see,
                       paper[1] if paper else None, paper[0] if paper else ""))
    per_layer = layer_means(mean_maps)
    rho, bound = depth_trend(per_layer, layers), trend_threshold(len(layers) - 1)
    out.append(Finding("§4.3 (3)", "experts' weights are less similar in deep layers",
                       f"Spearman's ρ of the per-layer S_ee with depth (last layer left out); holds if < -{bound:.2f}",
                       rho, bool(rho < -bound) if np.isfinite(rho) else None,
                       "Mixtral: lower in layers 22–30" if family == "mixtral" else ""))
    agree = matrix_agreement(maps)
    out.append(Finding("§4.3 (4)", "W_up, W_gate, W_down share similar similarity patterns (Fig 1)",
                       "mean Pearson R between two matrices' pair similarities, per layer; holds if > 0.5", agree,
                       bool(agree > 0.5) if np.isfinite(agree) else None))
    if "gate_weight_r2_mean" in ds:
        r2 = {m: float(ds["gate_weight_r2_mean"].sel(matrix=m).values) for m in MATRICES}
        paper_r2 = {"mixtral": "0.06 / 0.33 / 0.07", "deepseek_moe": "0.00 / 0.40 / 0.00",
                    "grok1": "0.04 / 0.15 / 0.04"}.get(family, "")
        out.append(Finding("§4.3 (5)", "the gate embedding's similarity goes with W_gate's (Tab 3: the highest R²)",
                           f"R²_avg (X, Y_gate) = {r2['gate']:.2f}; (X, Y_up) {r2['up']:.2f}, (X, Y_down) "
                           f"{r2['down']:.2f}; holds if gate's is the highest", r2["gate"],
                           bool(r2["gate"] > max(r2["up"], r2["down"])) if all(np.isfinite(list(r2.values()))) else None,
                           f"up / gate / down {paper_r2}" if paper_r2 else ""))
    return out


def _dynamic_findings(v: StoreView, family: str) -> list[Finding]:
    from .dynamic import group, ordered_inputs

    inputs = ordered_inputs(v.groups("dynamic"))
    out: list[Finding] = []
    needs = "dynamic analyses"

    def with_(name: str, prefer: tuple[str, ...] = ("long", "short")) -> str | None:
        have = [i for i in inputs if name in v.dataset(group(i)) and layers_of(v, group(i))]
        for p in prefer:
            if p in have:
                return p
        return have[0] if have else None

    inp = with_("expert_output_angular_mean")
    if inp is None:
        out.append(Finding("§5.4 (1)", "outputs are less alike in deep layers, much alike in the last", "", None, None,
                           needs=needs))
    else:
        layers = layers_of(v, group(inp))
        da = v.dataset(group(inp))["expert_output_angular_mean"].sel(layer=layers)
        routed = _routed(expert_labels(da, "expert_i"))
        maps = np.asarray(da.isel(expert_i=routed, expert_j=routed).values, dtype=np.float64)
        per_layer = layer_means(maps)
        rho, bound = depth_trend(per_layer, layers), trend_threshold(len(layers) - 1)
        last = float(per_layer[-1] - np.nanmedian(per_layer[:-1])) if len(per_layer) > 1 else float("nan")
        out.append(Finding("§5.4 (1)", "outputs are less alike in deep layers (Figs 2, 3)",
                           f"Spearman's ρ of the per-layer mean angular similarity ({inp} input) with depth, last "
                           f"layer left out; holds if < -{bound:.2f}", rho,
                           bool(rho < -bound) if np.isfinite(rho) else None,
                           "Mixtral: lower in layers 22–27" if family == "mixtral" else ""))
        out.append(Finding("§5.4 (1)", "… and much alike in the last layer",
                           "last layer's mean angular similarity minus the median of the others'; holds if > 0", last,
                           bool(last > 0) if np.isfinite(last) else None,
                           "Mixtral: many values > 0.8 in the last two layers" if family == "mixtral" else ""))
        if v.has("static") and "matrix_similarity" in v.dataset("static"):
            static_layers = sorted(set(layers) & set(layers_of(v, "static")))
            sim = v.dataset("static")["matrix_similarity"].sel(layer=static_layers, matrix="gate")
            s_routed = _routed(expert_labels(sim, "expert_i"))
            weights = np.asarray(sim.isel(expert_i=s_routed, expert_j=s_routed).values, dtype=np.float64)
            outputs = np.asarray(da.sel(layer=static_layers).isel(expert_i=routed, expert_j=routed).values)
            r = map_agreement(outputs, weights)
            out.append(Finding("§5.4 (2)", "averaged output similarity has the weights' pattern (Fig 3)",
                               f"mean over layers of Pearson R between the {inp} input's mean angular similarity and "
                               "W_gate's matrix-level similarity, pairs i<j; holds if > 0.3", r,
                               bool(r > 0.3) if np.isfinite(r) else None))
    inp = with_("expert_output_similarity", ("short", "long"))
    if inp is not None:
        ds = v.dataset(group(inp))
        da = ds["expert_output_similarity"].sel(layer=layers_of(v, group(inp)))
        routed = _routed(expert_labels(da, "expert_i"))
        values = np.asarray(da.isel(expert_i=routed, expert_j=routed).values, dtype=np.float64)
        mean = float(np.nanmean([_offdiag(m) for m in values.reshape(-1, *values.shape[-2:])]))
        out.append(Finding("§5.4 (3)", "Grok's expert outputs are highly similar (Fig 2)",
                           f"mean cosine similarity of routed experts' outputs per token ({inp} input); high if > 0.5",
                           mean, bool(mean > 0.5), "Grok: high for every token; Mixtral, DeepSeek: lower"
                           if family in PAPER_MODEL else ""))
    inp = with_("expert_output_norms", ("short", "long"))
    if inp is not None and "gate_scores" in v.dataset(group(inp)):
        ds = v.dataset(group(inp))
        layers = layers_of(v, group(inp))
        norms_da = ds["expert_output_norms"].sel(layer=layers)
        routed = _routed(expert_labels(norms_da, "expert"))
        norms = np.asarray(norms_da.isel(expert=routed).values, dtype=np.float64)
        scores = np.asarray(ds["gate_scores"].sel(layer=layers).isel(expert=routed).values, dtype=np.float64)
        agree, rho = norm_score_stat(norms, scores)
        chance = 1 / len(routed)
        out.append(Finding("§5.4 (4)", "experts with larger output norms get higher gate scores (Fig 4, Fig 9)",
                           f"share of tokens whose top-1 expert by score has the largest norm ({inp} input; chance "
                           f"{chance:.2f}); mean per-token Spearman ρ(norm, score) {rho:.2f}; holds if the share > "
                           f"twice chance", agree, bool(agree > 2 * chance) if np.isfinite(agree) else None,
                           {"mixtral": "Mixtral: yes, the chosen two usually the largest",
                            "deepseek_moe": "DeepSeek: less obviously", "grok1": "Grok: no correspondence"}.get(family, "")))
        gap = top_gap(scores)
        out.append(Finding("§5.2", "the top-1 expert's gate score is much higher than the rest, the second included",
                           f"median over tokens of top-1 score ÷ top-2 score ({inp} input); holds if > 1.5", gap,
                           bool(gap > 1.5) if np.isfinite(gap) else None,
                           "all three models: usually much higher" if family in PAPER_MODEL else ""))
        per_layer = np.nanmedian(norms.reshape(len(layers), -1), axis=1)
        rho, bound = depth_trend(per_layer, layers, drop_last=False), trend_threshold(len(layers))
        out.append(Finding("§5.2", "the deeper the layer, the larger the output norms",
                           f"Spearman's ρ of the per-layer median output norm with depth; holds if > {bound:.2f}", rho,
                           bool(rho > bound) if np.isfinite(rho) else None,
                           {"mixtral": "Mixtral: grows", "deepseek_moe": "DeepSeek: grows, less than Mixtral",
                            "grok1": "Grok: hardly changes"}.get(family, "")))
    inp = with_("intermediate_states", ("short", "long"))
    if inp is not None:
        ds = v.dataset(group(inp))
        da = ds["intermediate_states"].sel(layer=layers_of(v, group(inp)))
        routed = _routed(expert_labels(da, "expert"))
        r = vertical_lines(np.asarray(da.isel(expert=routed).values, dtype=np.float64))
        out.append(Finding("§5.4 (5)", "neurons at the same index of different experts are active alike (vertical "
                           "lines in Fig 5)", f"mean Pearson R between two experts' |act(W_gate x)| over neuron "
                           f"indices ({inp} input, the stored tokens); holds if > 0.1", r,
                           bool(r > 0.1) if np.isfinite(r) else None,
                           {"mixtral": "Mixtral: common", "deepseek_moe": "DeepSeek: rare"}.get(family, "")))
    inp = with_("activation_ratio", ("long", "short"))
    if inp is not None:
        da = v.dataset(group(inp))["activation_ratio"].sel(layer=layers_of(v, group(inp)))
        routed = _routed(expert_labels(da, "expert"))
        ratio = 100 * float(np.nanmean(np.asarray(da.isel(expert=routed).values, dtype=np.float64)))
        paper = {"mixtral": "Mixtral 99.6%", "deepseek_moe": "DeepSeek 99.7%", "grok1": "Grok 25.3%"}.get(family, "")
        act = str(v.model.get("activation", "?"))
        out.append(Finding("§5.3", "SiLU experts activate almost every neuron, GELU (Grok) about a quarter",
                           f"mean share of act(W_gate x) elements with |value| > 1e-3, routed experts ({inp} input, "
                           f"{act}), %", ratio, None, paper))
    return out


def findings(view: StoreView) -> list[Finding]:
    """Every observation of §4.3 and §5.4 (and §5.2-§5.3's numbers) tested on the store's model."""
    family = str(view.model.get("family", ""))
    return _static_findings(view, family) + _dynamic_findings(view, family)


def findings_tables(views: list[StoreView]) -> list[Table]:
    """One table per model: observation, the number that tests it, whether it holds, the paper's number."""
    tables = []
    for v in views:
        family = str(v.model.get("family", ""))
        rows = []
        for f in findings(v):
            holds = ("—" if f.holds is None else "yes" if f.holds else "no") if f.value is not None else "—"
            rows.append([f.section, f.observation, f.test or f"needs {f.needs}", f.value, holds, f.paper or "—"])
        if v.synthetic is not None:
            note = ("A synthetic model (make-tiny, random weights): these numbers test the pipeline against what was "
                    "planted, not the paper's claims about trained models.")
        elif family in PAPER_MODEL:
            note = f"The paper's numbers are for {PAPER_MODEL[family]}, the model of this family it studies."
        else:
            note = "The paper studies no model of this family: its numbers are for Mixtral, DeepSeekMoE and Grok-1."
        tables.append(Table(f"findings_{_slug(v.label)}", f"Findings — {v.label}",
                            ["§", "observation (the paper)", "tested by", "this model", "holds", "the paper"], rows,
                            formats=[None, None, None, "sig3", None, None],
                            note=note + " Thresholds are this tool's; the paper reads its observations off figures."))
    return tables


def _slug(label: str) -> str:
    from .static import slug

    return slug(label)
