"""Tables of the paper from a store, as `Table` records written to CSV (and rendered in the report):
Tab 2 neuron reordering (growth, Kendall tau; §4.1.2), Tab 3 mean R² (§4.2), Tab 4 R per layer
(App C), and a comparison table of headline numbers across stores.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from .common import StoreView, Table
from .static import MATRICES, layers_of


def _offdiag_mean(values: np.ndarray) -> float:
    """Mean over i != j (and any leading dims) of finite entries; NaN when there are none."""
    values = np.asarray(values, dtype=np.float64)
    n = values.shape[-1]
    mask = np.broadcast_to(~np.eye(n, dtype=bool), values.shape)
    sel = values[mask & np.isfinite(values)]
    return float(sel.mean()) if sel.size else float("nan")


def _routed(da) -> list[str]:
    return [str(x) for x in da["expert_i"].values if str(x).isdigit()]


def tab2_reorder(views: list[StoreView]) -> Table:
    """Tab 2: per store, mode and matrix the mean over expert pairs (i != j) and layers of the
    similarity before/after reordering, the order of growth, and Kendall's tau."""
    rows = []
    for v in views:
        for mode in v.groups("reorder"):
            ds = v.dataset(f"reorder/{mode}")
            layers = layers_of(v, f"reorder/{mode}")
            # each array read once (a chunk per layer and pair), then split by matrix in memory
            per_matrix = {name: ds[name].sel(layer=layers).transpose("matrix", ...).load()
                          for name in ("similarity_before", "similarity_after", "growth") if name in ds}
            tau = ds["kendall_tau"].sel(layer=layers).load() if "kendall_tau" in ds else None
            for m in MATRICES:
                row = [v.label, mode, m]
                for name in ("similarity_before", "similarity_after", "growth"):
                    row.append(_offdiag_mean(per_matrix[name].sel(matrix=m).values) if name in per_matrix
                               else float("nan"))
                if tau is None:
                    row.append(float("nan"))
                else:
                    row.append(_offdiag_mean((tau.sel(matrix=m) if "matrix" in tau.dims else tau).values))
                rows.append(row)
    return Table("tab2_reorder", "Tab 2: neuron reordering (mean over expert pairs i≠j and layers)",
                 ["model", "mode", "matrix", "similarity before", "similarity after", "order of growth",
                  "Kendall tau"], rows,
                 note="joint mode: one permutation for all three matrices, so tau is the same for each")


def tab3_r2(views: list[StoreView]) -> Table:
    """Tab 3: R² of (X, Y_m) averaged over layers, as stored in `static/gate_weight_r2_mean`."""
    rows = []
    for v in views:
        ds = v.dataset("static")
        if "gate_weight_r2_mean" not in ds:
            continue
        r2 = ds["gate_weight_r2_mean"]
        rows.append([v.label] + [float(r2.sel(matrix=m).values) for m in MATRICES])
    return Table("tab3_r2_mean", "Tab 3: mean R² over layers between gate-embedding and neuron-averaged similarity",
                 ["model"] + [f"(X, Y_{m})" for m in MATRICES], rows)


def tab4_r_per_layer(views: list[StoreView]) -> Table:
    """Tab 4: Pearson R of (X, Y_m) per layer, one column per store and matrix (blank = not a layer)."""
    per_store = {}
    for v in views:
        ds = v.dataset("static")
        layers = layers_of(v, "static")
        r = ds["gate_weight_correlation"].sel(layer=layers)
        per_store[v.label] = {l: [float(x) for x in r.sel(layer=l).sel(matrix=list(MATRICES)).values] for l in layers}
    all_layers = sorted({l for d in per_store.values() for l in d})
    columns = ["layer"] + [f"{label} R(X, Y_{m})" for label in per_store for m in MATRICES]
    rows = []
    for l in all_layers:
        row: list = [l]
        for d in per_store.values():
            row += d.get(l, [None] * len(MATRICES))
        rows.append(row)
    return Table("tab4_r_per_layer", "Tab 4: Pearson R between gate-embedding similarity X and Y_m, per layer",
                 columns, rows)


def comparison(views: list[StoreView]) -> Table:
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
            sel = da.sel(layer=layers_of(v, "static"), matrix=m, expert_i=routed, expert_j=routed)
            row.append(_offdiag_mean(sel.values))
        rows.append(row)
    if any(v.has("static") and "F" in [str(x) for x in v.dataset("static")["expert_i"].values] for v in views):
        for m in MATRICES:
            row = [f"mean similarity expert-F W_{m}"]
            for v in views:
                labels = [str(x) for x in v.dataset("static")["expert_i"].values] if v.has("static") else []
                if "F" not in labels:
                    row.append(None)
                    continue
                da = v.dataset("static")["matrix_similarity"]
                vals = np.asarray(da.sel(layer=layers_of(v, "static"), matrix=m, expert_i="F",
                                         expert_j=_routed(da)).values, dtype=np.float64)
                row.append(float(np.nanmean(vals)) if np.isfinite(vals).any() else None)
            rows.append(row)
    for m in MATRICES:
        row = [f"mean R² (X, Y_{m}) (Tab 3)"]
        for v in views:
            ds = v.dataset("static") if v.has("static") else None
            row.append(float(ds["gate_weight_r2_mean"].sel(matrix=m).values)
                       if ds is not None and "gate_weight_r2_mean" in ds else None)
        rows.append(row)
    return Table("comparison", "Comparison across models", columns, rows)


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


def fmt(x) -> str:
    """A table cell for HTML: 4 significant digits, '—' for missing or NaN."""
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "—"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)
