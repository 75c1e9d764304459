"""Tables of the paper from a store, as `Table` records written to CSV (and rendered in the report):
Tab 2 neuron reordering (relative growth, its order, Kendall tau; §4.1.2), one row per model and mode,
the paper's separate mode as Tab 2 proper and the joint mode as moe-ray's extension; Tab 3 mean R²
(§4.2); Tab 4 R per layer (App C); the activation ratio per model (§5.3); a comparison across stores.
Numbers are printed with fixed decimals per column as in the paper (the CSV keeps full precision).
"""
from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from ..analysis.summary import (GROWTH_DEFINITION, ORDER_MARK, format_order, format_order_marked, order_boundaries,
                                order_of_growth, tab2_summary)
from .common import StoreView, Table, expert_labels
from .static import MATRICES, layers_of


def _offdiag_mean(values: np.ndarray) -> float:
    """Mean over i != j (and any leading dims) of finite entries; NaN when there are none."""
    values = np.asarray(values, dtype=np.float64)
    n = values.shape[-1]
    mask = np.broadcast_to(~np.eye(n, dtype=bool), values.shape)
    sel = values[mask & np.isfinite(values)]
    return float(sel.mean()) if sel.size else float("nan")


def _routed(da) -> list[int]:
    """Positions of the routed experts along `expert_i` (not F, not SE)."""
    return [i for i, lab in enumerate(expert_labels(da, "expert_i")) if lab.isdigit()]


TAB2_COLUMNS = ["model", "layers", "expert pairs (all layers)", "similarity before (median)",
                "similarity after (median)", "relative growth (median)", "order of growth", "Kendall τ (median)",
                "relative growth IQR"]
TAB2_FORMATS = [None, None, None, "sig3", "sig3", "sig3", None, ".4f", None]
"""Similarities and growth to 3 significant digits (the paper's DeepSeek and Grok similarities are about 1e-4,
which fixed decimals would print as 0), the order as the paper writes it (text: `order_cells`), tau to 4
decimals (its -0.0002)."""
ORDER_NOTE = ("The order of growth is the paper's, 10^round(log10|median|), so that it compares with the paper's "
              "numbers; it flips at 10^(n+½) (… 0.316, 3.16, 31.6, 316 …), so medians of 31 and 32 read 10 and "
              "100. "
              f"{ORDER_MARK}: the relative growth's interquartile range straddles such a boundary (or 0), and the "
              "order reads either way: read the median beside it.")


def tab2_rows(views: list[StoreView], mode: str) -> list[list]:
    """One Tab 2 row per store that has `reorder/<mode>`: medians over every computed layer, pair and
    matrix (analysis.summary.tab2_summary, the numbers `finish` stores as the group's `tab2`)."""
    rows = []
    for v in views:
        if mode not in v.groups("reorder"):
            continue
        ds = v.dataset(f"reorder/{mode}")
        layers = layers_of(v, f"reorder/{mode}")
        arrays = {name: np.asarray(ds[name].sel(layer=layers).values, dtype=np.float64)
                  for name in ("similarity_before", "similarity_after", "growth", "kendall_tau") if name in ds}
        if "growth" not in arrays:
            continue
        nan = np.full(1, np.nan)
        row = tab2_summary(arrays.get("similarity_before", nan), arrays.get("similarity_after", nan), arrays["growth"],
                           arrays.get("kendall_tau", nan))
        growth = arrays["growth"]
        computed = np.isfinite(growth)  # [layer, (matrix,) i, j]: a (layer, pair) counts once
        if computed.ndim == 4:
            computed = computed.any(axis=1)
        order, iqr = order_cells(row)
        rows.append([v.label, len(layers), int(computed.sum()), row["similarity_before"], row["similarity_after"],
                     row["growth_median"], order, row["tau_median"], iqr])
    return rows


def order_cells(tab2: dict) -> tuple[str, str]:
    """Tab 2's order of growth and IQR cells: the paper's order of the median (compared with the paper's
    numbers), marked ‡ where the IQR straddles a rounding boundary of the order, and the IQR saying which
    boundary and which orders its ends have."""
    q25, q75 = tab2["growth_q25"], tab2["growth_q75"]
    order = format_order_marked(tab2["order_of_growth"], q25, q75)
    if not (math.isfinite(q25) and math.isfinite(q75)):
        return order, "—"
    iqr = f"{fmt(q25, 'sig3')} – {fmt(q75, 'sig3')}"
    crossed = order_boundaries(q25, q75)
    if crossed:
        iqr += (f" {ORDER_MARK} straddles {', '.join(fmt(b, 'sig3') for b in crossed)}: orders "
                f"{format_order(order_of_growth(q25))} to {format_order(order_of_growth(q75))}")
    return order, iqr


def tab2_reorder(views: list[StoreView]) -> list[Table]:
    """Tab 2 as in the paper (mode `separate`: each matrix reordered on its own), then the joint mode
    (one permutation per neuron), labelled as this tool's extension; a table for each mode some store has."""
    tables = []
    separate = tab2_rows(views, "separate")
    if separate:
        tables.append(Table("tab2_reorder", "Tab 2: reordering results of expert neurons (each matrix reordered "
                            "separately, as in the paper)", TAB2_COLUMNS, separate, formats=TAB2_FORMATS,
                            note=GROWTH_DEFINITION + ". τ: Kendall's tau between the identity order and the optimal "
                            "permutation (1 = order unchanged). The paper: Mixtral 1e-3 and τ 0.75, DeepSeek and "
                            "Grok 100 and τ ≈ 0. " + ORDER_NOTE))
    joint = tab2_rows(views, "joint")
    if joint:
        tables.append(Table("tab2_reorder_joint", "Tab 2 (moe-ray extension, not in the paper): joint reordering, "
                            "one permutation per neuron for W_up, W_gate and W_down together", TAB2_COLUMNS, joint,
                            formats=TAB2_FORMATS,
                            note="The same quantities with one permutation shared by the three matrices, which "
                            "keeps the expert's function; each matrix's similarity grows less than when it is "
                            "reordered on its own. " + GROWTH_DEFINITION + ". " + ORDER_NOTE))
    return tables


def tab3_r2(views: list[StoreView]) -> list[Table]:
    """Tab 3: R² of (X, Y_m) averaged over layers, as stored in `static/gate_weight_r2_mean`."""
    rows = []
    for v in views:
        ds = v.dataset("static")
        if "gate_weight_r2_mean" not in ds:
            continue
        r2 = ds["gate_weight_r2_mean"]
        rows.append([v.label] + [float(r2.sel(matrix=m).values) for m in MATRICES])
    return [Table("tab3_r2_mean", "Tab 3: square of Pearson correlation coefficients averaged over all layers (R²_avg)",
                  ["model"] + [f"(X, Y_{m})" for m in MATRICES], rows, formats=[None, ".2f", ".2f", ".2f"],
                  note="X: similarity of gate-embedding (router) rows; Y_m: similarity of the experts' mean neurons "
                       "of W_m; R over the pairs i<j of routed experts, per layer (Tab 4). The paper (Y_up, Y_gate, "
                       "Y_down): Mixtral 0.06, 0.33, 0.07; DeepSeek 0.00, 0.40, 0.00; Grok 0.04, 0.15, 0.04.")]


DENSE = "dense FFN"
"""Tab 4's cell for a layer of a model that has no experts there (DeepSeekMoE's layer 0)."""


def tab4_r_per_layer(views: list[StoreView]) -> list[Table]:
    """Tab 4: Pearson R of (X, Y_m) per layer, under a two-level header (model, then matrix)."""
    per_store = {}
    for v in views:
        ds = v.dataset("static")
        layers = layers_of(v, "static")
        r = ds["gate_weight_correlation"].sel(layer=layers)
        per_store[v.label] = ({l: [float(x) for x in r.sel(layer=l).sel(matrix=list(MATRICES)).values] for l in layers},
                              set(v.dense_layers))
    all_layers = sorted({l for d, dense in per_store.values() for l in list(d) + list(dense)})
    columns = ["layer"] + [f"{label} R(X, Y_{m})" for label in per_store for m in MATRICES]
    rows = []
    for l in all_layers:
        row: list = [l]
        for d, dense in per_store.values():
            row += d.get(l, [DENSE if l in dense else None] * len(MATRICES))
        rows.append(row)
    return [Table("tab4_r_per_layer", "Tab 4: Pearson correlation coefficients (R) of the paired dataset (X, Y_m) "
                  "per layer", columns, rows, formats=[None] + [".2f"] * (len(columns) - 1),
                  header_groups=[("", 1)] + [(label, len(MATRICES)) for label in per_store],
                  subheaders=["layer"] + [f"Y_{m}" for _ in per_store for m in MATRICES])]


def activation_ratios(views: list[StoreView]) -> list[Table]:
    """§5.3: the mean activation ratio per model and input (the paper's one number per model: 99.6% of
    Mixtral's and 99.7% of DeepSeek's intermediate elements above 1e-3 after SiLU, 25.3% of Grok's after
    GELU)."""
    from .dynamic import group, ordered_inputs

    rows = []
    for v in views:
        for inp in ordered_inputs(v.groups("dynamic")):
            ds = v.dataset(group(inp))
            if "activation_ratio" not in ds:
                continue
            da = ds["activation_ratio"].sel(layer=layers_of(v, group(inp)))
            values = np.asarray(da.values, dtype=np.float64)
            routed = [i for i, lab in enumerate(expert_labels(da, "expert")) if lab.isdigit()]
            rows.append([v.label, inp, int(ds.sizes["token"]), 100 * float(np.nanmean(values[..., routed])),
                         str(v.model.get("activation", "?"))])
    return [Table("activation_ratio", "Mean activation ratio: elements of act(W_gate x) with |value| > 1e-3",
                  ["model", "input", "tokens", "routed experts (%)", "activation"], rows,
                  formats=[None, None, None, ".1f", None],
                  note="Mean over tokens, layers and routed experts (the paper: Mixtral 99.6%, DeepSeek 99.7%, "
                       "Grok 25.3%).")]


def comparison(views: list[StoreView]) -> list[Table]:
    """Headline numbers side by side: mean off-diagonal similarity among routed experts, R² (Tab 3)."""
    columns = ["quantity"] + [v.label for v in views]
    rows = []
    for m in MATRICES:
        row: list = [f"mean matrix similarity W_{m} (routed, i≠j)"]
        for v in views:
            if not v.has("static"):
                row.append(None)
                continue
            da = v.dataset("static")["matrix_similarity"]
            routed = _routed(da)
            sel = da.sel(layer=layers_of(v, "static"), matrix=m).isel(expert_i=routed, expert_j=routed)
            row.append(_offdiag_mean(sel.values))
        rows.append(row)
    if any(v.has("static") and "F" in expert_labels(v.dataset("static"), "expert_i") for v in views):
        for m in MATRICES:
            row = [f"mean similarity expert-F W_{m}"]
            for v in views:
                labels = expert_labels(v.dataset("static"), "expert_i") if v.has("static") else []
                if "F" not in labels:
                    row.append(None)
                    continue
                da = v.dataset("static")["matrix_similarity"]
                vals = np.asarray(da.sel(layer=layers_of(v, "static"), matrix=m).isel(
                    expert_i=labels.index("F"), expert_j=_routed(da)).values, dtype=np.float64)
                row.append(float(np.nanmean(vals)) if np.isfinite(vals).any() else None)
            rows.append(row)
    for m in MATRICES:
        row = [f"mean R² (X, Y_{m}) (Tab 3)"]
        for v in views:
            ds = v.dataset("static") if v.has("static") else None
            row.append(float(ds["gate_weight_r2_mean"].sel(matrix=m).values)
                       if ds is not None and "gate_weight_r2_mean" in ds else None)
        rows.append(row)
    rows += _reorder_rows(views) + _dynamic_rows(views)
    return [Table("comparison", "Comparison across models", columns, rows, formats=[None] + ["sig3"] * len(views),
                  note="Tab 2: the median relative growth of the flattened similarity after reordering (mode separate, "
                       "as the paper) over every layer, pair and matrix, and its order (the paper: Mixtral 1e-3, "
                       f"DeepSeek and Grok 100; {ORDER_MARK}: its IQR straddles a rounding boundary, see Tab 2). "
                       "Dynamic rows from the short input where the store has it, else the first input; routed "
                       "experts only (the paper's activation ratios: Mixtral 99.6%, DeepSeek "
                       "99.7%, Grok 25.3%).")]


def _reorder_rows(views: list[StoreView]) -> list[list]:
    """Tab 2's median growth and its order of magnitude per model (mode `separate`), and Kendall's tau."""
    by_label = {row[0]: row for row in tab2_rows(views, "separate")}
    if not by_label:
        return []
    names = [("Tab 2: relative growth after reordering (median)", 5), ("Tab 2: order of growth", 6),
             ("Tab 2: Kendall τ (median)", 7)]
    return [[name] + [by_label[v.label][i] if v.label in by_label else None for v in views] for name, i in names]


def _dynamic_rows(views: list[StoreView]) -> list[list]:
    """The dynamic metrics side by side: output similarity (§5.1), norm/score agreement and the top-1/top-2
    score gap (§5.2), the activation ratio (§5.3)."""
    from . import findings as F
    from .dynamic import group, ordered_inputs

    def first_with(v: StoreView, names: set[str]) -> str | None:
        have = [i for i in ordered_inputs(v.groups("dynamic")) if names <= set(v.dataset(group(i)))
                and layers_of(v, group(i))]
        return have[0] if have else None

    def metric(v: StoreView, names: set[str], compute) -> float | None:
        inp = first_with(v, names)
        if inp is None:
            return None
        ds = v.dataset(group(inp)).sel(layer=layers_of(v, group(inp)))
        return compute(ds)

    def routed(da, dim: str) -> np.ndarray:
        keep = [i for i, lab in enumerate(expert_labels(da, dim)) if lab.isdigit()]
        return np.asarray(da.isel({dim: keep} if dim == "expert" else {"expert_i": keep, "expert_j": keep}).values,
                          dtype=np.float64)

    def similarity(ds) -> float:
        values = routed(ds["expert_output_similarity"], "expert_i")
        return float(np.nanmean([F._offdiag(m) for m in values.reshape(-1, *values.shape[-2:])]))

    def agreement(ds) -> float:
        return F.norm_score_stat(routed(ds["expert_output_norms"], "expert"), routed(ds["gate_scores"], "expert"))[0]

    def gap(ds) -> float:
        return F.top_gap(routed(ds["gate_scores"], "expert"))

    def ratio(ds) -> float:
        return 100 * float(np.nanmean(routed(ds["activation_ratio"], "expert")))

    specs = [("mean output similarity per token (cosine, routed, i≠j)", {"expert_output_similarity"}, similarity),
             ("top-1 by score has the largest norm (share of tokens)", {"expert_output_norms", "gate_scores"}, agreement),
             ("top-1 ÷ top-2 gate score (median over tokens)", {"gate_scores"}, gap),
             ("activation ratio, routed experts (%)", {"activation_ratio"}, ratio)]
    rows = []
    for name, needs, compute in specs:
        row = [name] + [metric(v, needs, compute) for v in views]
        if any(x is not None for x in row[1:]):
            rows.append(row)
    return rows


def write_csv(table: Table, out: Path) -> Path:
    """Write the table as CSV (full precision) and remember the path."""
    path = out / f"{table.key}.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(table.columns)
        for row in table.rows:
            w.writerow(["" if x is None else (repr(x) if isinstance(x, float) else x) for x in row])
    table.csv = path
    return path


def fmt(x, spec: str | None = None) -> str:
    """A table cell for HTML: `spec` a format (".3f": fixed decimals, as the paper prints them), "sig3" (3
    significant digits) or "order" (an order of magnitude as the paper writes it, 1e-3 / 100); '—' for
    missing or NaN."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    if isinstance(x, str):  # text in a column of numbers (an order marked ‡) is printed as it is
        return x
    if spec == "order":
        return format_order(float(x))
    if spec == "sig3":  # 3 significant digits, trailing zeros kept, no exponent in a column of small
        # numbers: 0.800, 0.000150, -0.0000673, 12.3, 100 (an exponent only outside 1e-6 .. 1e6)
        v = float(f"{float(x):.2e}")  # rounded first, so 0.0009996 is 0.00100, not 0.001000
        if v == 0 or not 1e-6 <= abs(v) < 1e6:
            return f"{v:#.3g}".rstrip(".").replace(".e", "e")
        return f"{v:.{max(0, 2 - math.floor(math.log10(abs(v))))}f}"
    if spec and isinstance(x, (float, int)) and not isinstance(x, bool):
        text = format(float(x), spec)
        return text.lstrip("-") if float(text) == 0 else text  # no "-0.00"
    return str(x)
