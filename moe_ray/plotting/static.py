"""Figures of the static (weight) analyses: Fig 1 matrix-level similarity, Fig 6 matrix PCA, Fig 7
neuron PCA (2-D and 3-D), Fig 8 gate embedding beside neuron averaging (paper §4.1, §4.2, App A-C), and
the per-layer trend of the mean expert-expert and expert-F similarity.

`square_pages` is the shared engine for every "expert x expert map per layer" figure; the dynamic
figures reuse it. Every image shows one model (the paper: "figures of different models do not share the
same color-bar"); its colour range is the model's own unless the stores are drawn together with a shared
scale (`render(..., shared_scale=True)`: then a drawing task holds every store and ranges span them).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .common import (BLOCK_GAP, CMAPS, LABEL_FONT, TICK_FONT, Figure, StoreView, colorbar, figure_record,
                     colormap, expert_labels, fit_panel, grid_labels, model_scale, new_figure, nonempty_labels, page_name, pages, panel_title, shared_range)
from .grid import PanelGrid

MATRICES = ("up", "gate", "down")
Getter = Callable[[StoreView, list[int]], "tuple[np.ndarray, list[str], list[str]]"]


@dataclass
class Column:
    """One heat-map column of a figure: a title, how to read [layers, rows, cols] and its colour group
    (columns of one group form a block with one colour bar and one colour map)."""

    title: str
    read: Getter
    group: str
    cmap: str
    xlabel: str = "expert"
    ylabel: str = "expert"
    layers: Callable[[StoreView], list[int]] | None = None
    """The layers this column has in a store, when fewer than the figure's (a note in the panel elsewhere)."""
    center: Callable[[np.ndarray], float] | None = None
    """For a diverging colour map: the value (from a layer's matrix) its middle colour stands for."""


def layers_of(view: StoreView, group: str) -> list[int]:
    return view.done_layers(group)[0]


def slug(label: str) -> str:
    """A store label as a file-name part."""
    return "-".join(part for part in "".join(c if c.isalnum() else " " for c in label).split())


def scale_note(views: list[StoreView]) -> str:
    """How the colour ranges of a drawing call's images were chosen (one store: its own; several: shared)."""
    return ("one colour range for all models and all their layers (shared scale)" if len(views) > 1
            else "one colour range for all this model's layers and images (each model its own, as in the paper)")


def dense_note(view: StoreView, page: list[int], first: bool) -> str:
    """Which of the model's layers near this page are dense FFNs (not drawn: they have no experts)."""
    dense = [l for l in view.dense_layers if (first and l < page[0]) or page[0] <= l <= page[-1]]
    if not dense:
        return ""
    return f"; layer{'s' if len(dense) > 1 else ''} {', '.join(map(str, dense))}: dense FFN, no experts"


def square_pages(views: list[StoreView], out: Path, key: str, title: str, columns: list[Column],
                 layers_for: Callable[[StoreView], list[int]], bar_labels: dict[str, str],
                 exclude_diagonal: bool = True, what: str = "") -> list[Figure]:
    """Heat maps per layer, one image per store and page of layers: rows are layers and columns
    `columns` (one column: the page's layers side by side). Each block of columns of one colour group has
    its own colour map and colour bar; its range spans the image's layers (and every store of the call,
    see the module docstring).

    `Figure.data[(store label, layer, column title)]` is the matrix drawn, `data[("labels", ...)]` its
    (row, column) labels, `data[("range", group)]` the colour range and `data[("center", group)]` the
    value a diverging map is centred on.
    """
    per_view = [(v, pages(layers_for(v))) for v in views]
    scales = {}
    for col in columns:
        if col.group not in scales:
            group_cols = [c for c in columns if c.group == col.group]
            scales[col.group] = model_scale(
                views, f"{key}:{col.group}",
                lambda full, cols=group_cols: [m for c in cols for m in _read_all(full, c, layers_for)],
                exclude_diagonal)
    figures = []
    for index in range(max((len(p) for _, p in per_view), default=0)):
        drawn_by_view = {}
        for v, view_pages in per_view:
            if index < len(view_pages):
                drawn_by_view[v.label] = _read_square(v, view_pages[index], columns, layers_for)
        ranges = {col.group: scales[col.group] for col in columns}
        centers = {}
        for col in columns:
            if col.center is not None:
                mats = [m for drawn in drawn_by_view.values() for k, m in drawn.items()
                        if k[0] != "labels" and k[2] == col.title]
                if mats:
                    centers[col.group] = float(np.median([col.center(m) for m in mats]))
        for v, view_pages in per_view:
            if index >= len(view_pages):
                continue
            page, drawn = view_pages[index], drawn_by_view[v.label]
            drawn.update({("range", g): r.limits for g, r in ranges.items()})
            drawn.update({("extend", g): r.extend for g, r in ranges.items()})
            drawn.update({("center", g): c for g, c in centers.items()})
            figures.append(_draw_square(v, page, drawn, out, key, title, columns, bar_labels, ranges, centers,
                                        f"{what}{'; ' if what else ''}{scale_note(views)}"
                                        f"{dense_note(v, page, index == 0)}."))
    return figures


def _read_all(view: StoreView, col: Column, layers_for) -> list[np.ndarray]:
    """The column's matrices for every layer the (unrestricted) view has."""
    sel = sorted(set(layers_for(view)) & (set(col.layers(view)) if col.layers is not None else set(layers_for(view))))
    return list(col.read(view, sel)[0]) if sel else []


def _read_square(v: StoreView, page: list[int], columns: list[Column], layers_for) -> dict:
    have = set(layers_for(v))
    drawn: dict = {}
    for col in columns:
        col_have = set(col.layers(v)) if col.layers is not None else have
        sel = [l for l in page if l in have and l in col_have]
        if not sel:
            continue
        values, rows, cols = col.read(v, sel)
        for l, m in zip(sel, values):
            drawn[(v.label, l, col.title)] = m
            drawn[("labels", v.label, l, col.title)] = (rows, cols)
    return drawn


def _blocks(columns: list[Column]) -> list[tuple[int, int]]:
    """(first, last) column of each run of columns of one colour group."""
    blocks: list[tuple[int, int]] = []
    for c, col in enumerate(columns):
        if blocks and columns[blocks[-1][0]].group == col.group:
            blocks[-1] = (blocks[-1][0], c)
        else:
            blocks.append((c, c))
    return blocks


def _draw_square(v: StoreView, page: list[int], drawn: dict, out: Path, key: str, title: str,
                 columns: list[Column], bar_labels: dict[str, str], ranges: dict, centers: dict,
                 caption: str) -> Figure:
    import matplotlib

    across = len(columns) == 1  # one quantity: the page's layers side by side
    cells = ([(0, r, layer, columns[0]) for r, layer in enumerate(page)] if across else
             [(r, c, layer, col) for r, layer in enumerate(page) for c, col in enumerate(columns)])
    nrows, ncols = (1, len(page)) if across else (len(page), len(columns))
    blocks = [(0, ncols - 1)] if across else _blocks(columns)
    breaks = tuple(last for _, last in blocks[:-1])
    panels = {(r, c): (layer, col) for r, c, layer, col in cells if (v.label, layer, col.title) in drawn}
    shown = grid_labels({rc: drawn[("labels", v.label, layer, col.title)] for rc, (layer, col) in panels.items()})
    block_starts = {first for first, _ in blocks}
    # a block after a colour bar names its rows again (the gap holds them)
    shown = {(r, c): (sx, sy or c in block_starts) for (r, c), (sx, sy) in shown.items()}
    inner_y = any(show_y and c not in block_starts for (r, c), (_, show_y) in shown.items())
    inner_x = any(show_x and r < nrows - 1 for (r, c), (show_x, _) in shown.items())
    gap = (0.9 if inner_y else 0.3, 1.1 if inner_x else 0.5)
    side = fit_panel(ncols, gap[0], 2.4, extra=len(breaks) * BLOCK_GAP)
    grid = PanelGrid(nrows, ncols, panel=(side, side), gap=gap, bottom=0.75, breaks=breaks)
    images: dict[str, object] = {}
    for r, c, layer, col in cells:
        name = f"layer {layer}" if across else f"layer {layer} · {col.title}"
        if (r, c) not in panels:
            grid.note(r, c, f"{name}:\nnot computed")
            continue
        rows, cols = drawn[("labels", v.label, layer, col.title)]
        scale = ranges[col.group]
        lo, hi = scale.limits
        norm = None
        if col.group in centers:
            center = centers[col.group]
            norm = matplotlib.colors.TwoSlopeNorm(center, min(lo, center - 1e-9), max(hi, center + 1e-9))
        cmap = colormap(CMAPS[col.cmap] if col.cmap in CMAPS else col.cmap, scale.extend)
        images[col.group] = grid.heatmap(r, c, drawn[(v.label, layer, col.title)], cols, rows, cmap, lo, hi,
                                         col.xlabel, col.ylabel, *shown[(r, c)], norm=norm)
        grid.title(r, c, name)
    for first, last in blocks:
        group = columns[0].group if across else columns[first].group
        if group in images:
            grid.block_colorbar(images[group], bar_labels.get(group, group), last, extend=ranges[group].extend)
    full = f"{title} — {v.label}, layers {page[0]}–{page[-1]}"
    return grid.save(key, out / f"{key}_{slug(v.label)}_{page_name(page)}.png", full, drawn, caption)


def static_square(name: str, matrix: str | None, like: Getter | None = None) -> Getter:
    """Read `static/<name>` for some layers (one matrix), dropping labels with no values (F/SE absent); with
    `like`, on that getter's labels instead (blank rows and columns where this map has none), so the panels of
    one figure line up column for column (Fig 8's X beside Y with F and SE, Fig 3's weights beside outputs)."""
    def read(view: StoreView, layers: list[int]):
        da = view.dataset("static")[name].sel(layer=layers)
        if matrix is not None:
            da = da.sel(matrix=matrix)
        values = np.asarray(da.values, dtype=np.float64)
        labels = expert_labels(da, "expert_i")
        if like is not None:
            return align(values, labels, like(view, layers)[1])
        keep = nonempty_labels(values, labels)
        values = values[:, keep][:, :, keep]
        kept = [labels[i] for i in keep]
        return values, kept, kept
    return read


def align(values: np.ndarray, labels: list[str], target: list[str]) -> tuple[np.ndarray, list[str], list[str]]:
    """[layer, label, label] maps on `target`'s labels: NaN (blank) rows and columns for labels this map lacks."""
    out = np.full(values.shape[:-2] + (len(target), len(target)), np.nan)
    where = {lab: i for i, lab in enumerate(labels)}
    src = [where.get(lab) for lab in target]
    pick = [k for k, s in enumerate(src) if s is not None]
    have = [src[k] for k in pick]
    out[..., np.ix_(pick, pick)[0], np.ix_(pick, pick)[1]] = values[..., np.ix_(have, have)[0], np.ix_(have, have)[1]]
    return out, list(target), list(target)


def fig1_matrix_similarity(views: list[StoreView], out: Path) -> list[Figure]:
    """Fig 1 (§4.1.1): cosine similarity of flattened W_up, W_gate, W_down per layer (F row/column)."""
    cols = [Column(f"W_{m}", static_square("matrix_similarity", m), "sim", "similarity") for m in MATRICES]
    return square_pages(views, out, "fig1_matrix_similarity", "Fig 1: matrix-level similarity", cols,
                        lambda v: layers_of(v, "static"), {"sim": "cosine similarity of weights"},
                        what="diagonal (1) excluded from the colour range")


def fig8_gate_and_neuron_avg(views: list[StoreView], out: Path) -> list[Figure]:
    """Fig 8 (§4.2, App B/C): gate-embedding similarity X beside neuron-averaging similarity Y_m, each
    quantity with its own colour map and colour bar."""
    cols = [Column("X", static_square("gate_embedding_similarity", None,
                                      like=static_square("neuron_avg_similarity", "up")), "x", "gate")]
    cols += [Column(f"Y_{m}", static_square("neuron_avg_similarity", m), "y", "similarity") for m in MATRICES]
    return square_pages(views, out, "fig8_gate_neuron_avg", "Fig 8: gate embedding X and neuron averaging Y", cols,
                        lambda v: layers_of(v, "static"),
                        {"x": "X: cosine of router rows", "y": "Y_m: cosine of mean neurons"},
                        what="X: routed experts only (F and SE have no router row: blank, so X's cells line up with "
                             "Y's); Y: F and SE where the store has them")


SPECIAL_COLORS = {"F": "0.1", "SE": "0.5"}
SPECIAL_MARKERS = {"F": "x", "SE": "+"}
"""Fig 7 draws F's and SE's neurons as crosses over the experts' dots, so they can be told apart."""
"""Dense reference and shared expert in the PCA scatters: dark and mid grey, whatever the store."""


NAMED_COLORS = 9
"""Up to this many routed experts get a colour each (tab10 without its grey, kept for F, SE and outliers);
more are coloured along a colour map with a colour bar."""


def _expert_colors(labels: list[str]) -> list:
    """A colour per label, by expert index so stores agree: tab10 less grey up to NAMED_COLORS routed
    experts, turbo beyond."""
    import matplotlib

    n = sum(lab not in SPECIAL_COLORS for lab in labels)
    palette = [c for i, c in enumerate(matplotlib.colormaps["tab10"].colors) if i != 7]
    turbo = matplotlib.colormaps["turbo"]
    return [matplotlib.colors.to_rgba(SPECIAL_COLORS[lab]) if lab in SPECIAL_COLORS
            else matplotlib.colors.to_rgba(palette[int(lab)]) if n <= NAMED_COLORS
            else turbo(int(lab) / max(n - 1, 1)) for lab in labels]


def _expert_key(fig, labels: list[str], shown: set[str], pad: float = 0.0, crosses: bool = False) -> dict:
    """Which colour is which expert, `pad` inches further right of the panels than usual: a legend naming
    each shown label (up to 10 routed experts), or a colour bar over the routed experts with a legend for
    F and SE. Returns what the key lists: {"legend": [labels], "colorbar": [first, last] or None}."""
    import matplotlib
    from matplotlib.cm import ScalarMappable
    from matplotlib.lines import Line2D

    colors = dict(zip(labels, _expert_colors(labels)))
    routed = [lab for lab in labels if lab not in SPECIAL_COLORS]
    ranged = len(routed) > NAMED_COLORS
    named = [lab for lab in labels if lab in shown and (not ranged or lab in SPECIAL_COLORS)]
    width = fig.get_size_inches()[0]
    if named:
        handles = [Line2D([], [], marker=SPECIAL_MARKERS.get(lab, "o") if crosses else "o", ls="", color=colors[lab],
                          label=lab) for lab in named]
        fig.legend(handles=handles, title="expert", fontsize=TICK_FONT, title_fontsize=TICK_FONT, frameon=False,
                   loc="upper left", bbox_to_anchor=(fig.subplotpars.right + (0.1 + pad) / width, fig.subplotpars.top),
                   handletextpad=0.2, borderaxespad=0)
    if ranged:
        norm = matplotlib.colors.Normalize(0, len(routed) - 1)
        cb = colorbar(fig, ScalarMappable(norm, matplotlib.colormaps["turbo"]), "routed expert",
                      1 if named else 0, 2 if named else 1, pad=0.25 + pad)
        ticks = [0, len(routed) // 2, len(routed) - 1]
        cb.set_ticks(ticks, labels=[routed[t] for t in ticks])
    return {"legend": named, "colorbar": [routed[0], routed[-1]] if ranged else None}


def _label_order(label: str) -> tuple[int, int]:
    """Routed experts by index, then F, then SE."""
    return (0, int(label)) if label.isdigit() else (1, list(SPECIAL_COLORS).index(label))


MAX_NAMED_POINTS = 24
"""Fig 6 names each expert's point up to this many experts (colour alone beyond)."""
EDGE_MARKERS = {(1, 0): ">", (-1, 0): "<", (0, 1): "^", (0, -1): "v"}


def _to_edge(pts: np.ndarray, xlim: tuple[float, float], ylim: tuple[float, float]) -> tuple[np.ndarray, list[str]]:
    """Points outside the limits moved onto the panel's edge, each with a marker pointing the way it lies
    (a cross for one inside)."""
    inset = 0.03
    lo = np.array([xlim[0], ylim[0]]) + inset * np.array([xlim[1] - xlim[0], ylim[1] - ylim[0]])
    hi = np.array([xlim[1], ylim[1]]) - inset * np.array([xlim[1] - xlim[0], ylim[1] - ylim[0]])
    placed = np.clip(pts, lo, hi)
    markers = []
    for p, q in zip(pts, placed):
        beyond = (p - q) / np.maximum(hi - lo, 1e-12)
        if not beyond.any():
            markers.append("x")
            continue
        axis = int(np.argmax(np.abs(beyond)))
        direction = (int(np.sign(beyond[0])), 0) if axis == 0 else (0, int(np.sign(beyond[1])))
        markers.append(EDGE_MARKERS[direction])
    return placed, markers


def _pca_panel(ax, pts: np.ndarray, labels: list[str], colors: list, outlier: np.ndarray) -> dict:
    """One Fig 6 panel: kept experts coloured (and named when few), axes fitted to them so a far outlier
    cannot squash the rest; DBSCAN outliers grey, on the panel's edge (a triangle pointing to where they
    lie) when outside it. Returns what was drawn."""
    present = np.isfinite(pts).all(axis=1)
    keep = np.flatnonzero(present & ~outlier)
    removed = np.flatnonzero(present & outlier)
    named = len(keep) + len(removed) <= MAX_NAMED_POINTS
    ax.scatter(pts[keep, 0], pts[keep, 1], c=[colors[i] for i in keep], s=18)
    fit = keep if len(keep) >= 2 else np.flatnonzero(present)
    if len(fit):
        span = np.ptp(pts[fit], axis=0)
        span = np.where(span > 0, span, 1.0)
        lo, hi = pts[fit].min(axis=0) - 0.12 * span, pts[fit].max(axis=0) + 0.12 * span
        ax.set_xlim(lo[0], hi[0])
        ax.set_ylim(lo[1], hi[1])
    placed, markers = _to_edge(pts[removed], ax.get_xlim(), ax.get_ylim()) if len(removed) else (pts[removed], [])
    for (x, y), marker in zip(placed, markers):
        ax.scatter([x], [y], marker=marker, c="0.45", s=26 if marker != "x" else 22, linewidths=1.0)
    if named:
        for i, xy in list(zip(keep, pts[keep])) + list(zip(removed, placed)):
            ax.annotate(labels[i], xy, fontsize=TICK_FONT, xytext=(2, 2), textcoords="offset points",
                        color="0.4" if i in removed else "black", annotation_clip=False)
    ax.locator_params(nbins=4)
    ax.tick_params(labelsize=TICK_FONT)
    return {"labels": [labels[i] for i in keep], "xy": pts[keep], "removed": [labels[i] for i in removed],
            "removed_drawn_at": placed, "removed_markers": markers, "limits": (ax.get_xlim(), ax.get_ylim())}


def _dbscan(view: StoreView) -> tuple[float | None, int | None]:
    params = view.dataset("static").attrs.get("params") or {}
    return params.get("dbscan_eps"), params.get("dbscan_min_samples")


def fig6_matrix_pca(views: list[StoreView], out: Path) -> list[Figure]:
    """Fig 6 (App A.1): experts' flattened matrices in 2-D PCA space, one image per store and page of
    layers; where DBSCAN ran, every panel names the experts it removed (or says none), drawn grey."""
    figures = []
    for v in views:
        ds = v.dataset("static")
        eps, min_samples = _dbscan(v)
        labels = expert_labels(ds, "expert")
        colors = _expert_colors(labels)
        for page in pages(layers_of(v, "static")):
            side = fit_panel(3, 0.95, 2.7)
            fig, axes = new_figure(len(page), 3, panel=(side, side * 0.9), gap=(0.95, 1.15 if eps else 0.95),
                                   top=0.85 if eps else 0.65)
            scores = np.asarray(ds["matrix_pca"].sel(layer=page).isel(component=slice(0, 2)).values, dtype=np.float64)
            explained = np.asarray(ds["matrix_pca_explained"].sel(layer=page).values, dtype=np.float64)
            outl = (np.asarray(ds["matrix_pca_outlier"].sel(layer=page).values).astype(bool)
                    if eps is not None and "matrix_pca_outlier" in ds else np.zeros(scores.shape[:3], dtype=bool))
            data: dict = {("dbscan",): (eps, min_samples)}
            shown: set[str] = set()
            for r, layer in enumerate(page):
                for mi, m in enumerate(MATRICES):
                    ax = axes[r, mi]
                    drawn = _pca_panel(ax, scores[r, mi], labels, colors, outl[r, mi])
                    ev = explained[r, mi]
                    ax.set_xlabel(f"PC1 ({ev[0]:.0%})", fontsize=LABEL_FONT)
                    ax.set_ylabel(f"PC2 ({ev[1]:.0%})", fontsize=LABEL_FONT)
                    text = f"layer {layer} · W_{m}"
                    if eps is not None:
                        text += "\nDBSCAN removed: " + (", ".join(drawn["removed"]) if drawn["removed"] else "none")
                    panel_title(ax, text)
                    data[(v.label, layer, m)] = drawn
                    shown.update(drawn["labels"])
            data[("key",)] = _expert_key(fig, labels, shown) if len(labels) > MAX_NAMED_POINTS else {}
            caption = (f"DBSCAN (eps {eps:g}, min_samples {min_samples}) outliers are left out of the axes' fit and "
                       "drawn grey (a triangle on the edge points to one outside)" if eps is not None else
                       "DBSCAN not run for this store (dbscan_eps unset), no expert removed")
            title = f"Fig 6: PCA of expert matrices — {v.label}, layers {page[0]}–{page[-1]}"
            figures.append(figure_record(fig, "fig6_matrix_pca",
                                         out / f"fig6_matrix_pca_{slug(v.label)}_{page_name(page)}.png", title, data,
                                         caption + dense_note(v, page, page == pages(layers_of(v, "static"))[0]) + "."))
    return figures


Z_LABEL_ROOM = 0.45
"""Inches a 3-D panel's z-axis label reaches right of its Axes box: the colour key starts beyond it."""

MAX_POINTS_PER_PANEL = 16000
"""Neurons drawn in one Fig 7 panel, over all its experts (every k-th neuron of each expert beyond that;
the caption says so). A page of 12 panels of 16,000 points drew in 2.7 s (2-D) / 4.3 s (3-D) on one
core, DeepSeekMoE's 64 x 1,408 = 90,000 in 14 s / 19 s."""


def fig7_neuron_pca(views: list[StoreView], out: Path, dims: int = 2) -> list[Figure]:
    """Fig 7 (App A.2): every neuron as a point in 2-D (or 3-D) PCA space, coloured by expert (F and SE
    grey, named in the key), drawn in a shuffled order so no expert hides the others."""
    figures = []
    kw = {"subplot_kw": {"projection": "3d"}} if dims == 3 else {}
    suffix = "3d" if dims == 3 else "2d"
    for v in views:
        ds = v.dataset("static")
        labels = expert_labels(ds, "expert")
        colors = np.array(_expert_colors(labels))
        n_neuron = ds.sizes["neuron"]
        stride = max(1, -(-n_neuron * ds.sizes["expert"] // MAX_POINTS_PER_PANEL))
        for page in pages(layers_of(v, "static")):
            room = Z_LABEL_ROOM if dims == 3 else 0.0
            side = fit_panel(3, 0.95, 2.7, extra=room)
            fig, axes = new_figure(len(page), 3, panel=(side, side * 0.92), gap=(0.95, 0.95), right=1.15 + room, **kw)
            scores = np.asarray(ds["neuron_pca"].sel(layer=page).isel(neuron=slice(None, None, stride),
                                                                      component=slice(0, dims)).values, dtype=np.float64)
            explained = np.asarray(ds["neuron_pca_explained"].sel(layer=page).values, dtype=np.float64)
            data: dict = {("stride",): stride}
            shown: set[str] = set()
            rng = np.random.default_rng(0)
            for r, layer in enumerate(page):
                for mi, m in enumerate(MATRICES):
                    ax = axes[r, mi]
                    drawn, pts, owner = {}, [], []
                    for e, lab in enumerate(labels):
                        p = scores[r, mi, e]
                        p = p[np.isfinite(p).all(axis=1)]
                        if len(p):
                            drawn[lab] = p
                            pts.append(p)
                            owner += [e] * len(p)
                    if pts:
                        allp, owner = np.concatenate(pts), np.asarray(owner)
                        special = np.isin(owner, [e for e, lab in enumerate(labels) if lab in SPECIAL_COLORS])
                        routed_p, routed_owner = allp[~special], owner[~special]
                        order = rng.permutation(len(routed_owner))  # interleaved: no expert drawn last over the rest
                        ax.scatter(*routed_p[order].T, s=2, c=colors[routed_owner[order]], rasterized=True, alpha=0.6)
                        data[("order", v.label, layer, m)] = [labels[e] for e in routed_owner[order]]
                        for e in sorted(set(owner[special].tolist())):  # F and SE on top, as crosses
                            ax.scatter(*allp[owner == e].T, s=7, marker=SPECIAL_MARKERS[labels[e]], c=[colors[e]],
                                       linewidths=0.6, rasterized=True)
                    ev = explained[r, mi]
                    ax.set_xlabel(f"PC1 ({ev[0]:.0%})", fontsize=LABEL_FONT, labelpad=1)
                    ax.set_ylabel(f"PC2 ({ev[1]:.0%})", fontsize=LABEL_FONT, labelpad=1)
                    if dims == 3:
                        ax.set_zlabel(f"PC3 ({ev[2]:.0%})", fontsize=LABEL_FONT, labelpad=1)
                        ax.grid(False)  # the panes give depth; 3-D grid lines cost a third of the drawing
                        ax.tick_params(pad=0)
                    ax.locator_params(nbins=3)
                    ax.tick_params(labelsize=TICK_FONT)
                    panel_title(ax, f"layer {layer} · W_{m}")
                    data[(v.label, layer, m)] = drawn
                    shown.update(drawn)
            data[("key",)] = _expert_key(fig, sorted(labels, key=_label_order), shown, pad=room, crosses=True)
            sampled = (f"every {stride}th neuron of each expert drawn ({MAX_POINTS_PER_PANEL:,} points at most a panel)"
                       if stride > 1 else "every neuron drawn")
            title = f"Fig 7: PCA of expert neurons ({dims}-D) — {v.label}, layers {page[0]}–{page[-1]}"
            figures.append(figure_record(
                fig, f"fig7_neuron_pca_{suffix}", out / f"fig7_neuron_pca_{suffix}_{slug(v.label)}_{page_name(page)}.png",
                title, data, sampled + ", in a shuffled order" + dense_note(v, page, page == pages(
                    layers_of(v, "static"))[0]) + "."))
    return figures


def fig7_neuron_pca_3d(views: list[StoreView], out: Path) -> list[Figure]:
    """Fig 7 (App A.2) on the first three components."""
    return fig7_neuron_pca(views, out, dims=3)


def _pair_means(values: np.ndarray, labels: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per layer of [layer, label, label] maps: the mean over routed-expert pairs i≠j (S_ee) and over the
    routed experts' similarity to F (S_ef, NaN without F)."""
    see, sef = _pair_values(values, labels)
    return _nan_stat(see, np.mean), _nan_stat(sef, np.mean)


def _pair_values(values: np.ndarray, labels: list[str]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per layer: the finite values over routed-expert pairs i≠j, and over the routed experts' similarity to
    F (empty without F)."""
    routed = [i for i, lab in enumerate(labels) if lab.isdigit()]
    sub = values[:, routed][:, :, routed]
    off = ~np.eye(len(routed), dtype=bool)
    see = [m[off][np.isfinite(m[off])] for m in sub]
    if "F" in labels:
        ef = values[:, routed, labels.index("F")]
        sef = [row[np.isfinite(row)] for row in ef]
    else:
        sef = [np.zeros(0) for _ in values]
    return see, sef


def _nan_stat(groups: list[np.ndarray], stat, *args) -> np.ndarray:
    """`stat(group, *args)` per layer, NaN for a layer with no values."""
    return np.array([stat(g, *args) if g.size else np.nan for g in groups], dtype=np.float64)


MIN_TREND_SPAN = 0.1
"""The per-layer trend axes of similarities span at least this much: a change of ±0.001 is drawn as the flat
line it is, not zoomed into a trend with depth."""


def layer_trends(views: list[StoreView], out: Path) -> list[Figure]:
    """Per layer, the mean expert-expert similarity S_ee and expert-F similarity S_ef of the weights (each
    matrix, Fig 1's maps) and of the outputs (mean angular similarity, Fig 3's maps, per input), each with the
    interquartile range of its pairs as a band, and the experts' output L2 norms (median and IQR over tokens
    and routed experts; F and SE beside): the per-layer means the paper's depth claims rest on (§4.1.1, §4.3,
    §5.1, §5.2)."""
    from .dynamic import group as dyn_group, ordered_inputs

    figures = []
    for v in views:
        has_static = v.has("static") and "matrix_similarity" in v.dataset("static")
        inputs = [i for i in ordered_inputs(v.groups("dynamic"))
                  if "expert_output_angular_mean" in v.dataset(dyn_group(i))]
        norm_inputs = [i for i in ordered_inputs(v.groups("dynamic"))
                       if "expert_output_norms" in v.dataset(dyn_group(i))]
        if not has_static and not inputs and not norm_inputs:
            continue
        ncols = int(has_static) + int(bool(inputs)) + int(bool(norm_inputs))
        panel = (4.0, 2.8) if ncols < 3 else (2.75, 2.6)
        fig, axes = new_figure(1, ncols, panel=panel, gap=(1.0, 0.9), top=0.75, bottom=1.45, right=0.4)
        data: dict = {}
        col = 0
        if has_static:
            ax = axes[0, col]
            col += 1
            layers = layers_of(v, "static")
            da = v.dataset("static")["matrix_similarity"].sel(layer=layers)
            labels = expert_labels(da, "expert_i")
            for mi, m in enumerate(MATRICES):
                data.update(_trend_lines(ax, layers, da.sel(matrix=m).values, labels, f"C{mi}", f"W_{m}",
                                         (v.label, "weights", m)))
            ax.set_ylabel("mean cosine similarity", fontsize=LABEL_FONT)
            panel_title(ax, "weights (matrix level)")
            _trend_axes(ax, layers)
        if inputs:
            ax = axes[0, col]
            col += 1
            for k, inp in enumerate(inputs):
                layers = layers_of(v, dyn_group(inp))
                da = v.dataset(dyn_group(inp))["expert_output_angular_mean"].sel(layer=layers)
                labels = expert_labels(da, "expert_i")
                data.update(_trend_lines(ax, layers, da.values, labels, f"C{3 + k}", inp, (v.label, "outputs", inp)))
            ax.set_ylabel("mean angular similarity", fontsize=LABEL_FONT)
            panel_title(ax, "expert outputs (mean over tokens)")
            _trend_axes(ax, layers)
        if norm_inputs:
            ax = axes[0, col]
            for k, inp in enumerate(norm_inputs):
                layers = layers_of(v, dyn_group(inp))
                da = v.dataset(dyn_group(inp))["expert_output_norms"].sel(layer=layers)
                data.update(_norm_lines(ax, layers, np.asarray(da.values, dtype=np.float64), expert_labels(da, "expert"),
                                        f"C{3 + k}", inp, (v.label, "norms", inp)))
            ax.set_ylabel("output L2 norm", fontsize=LABEL_FONT)
            panel_title(ax, "expert output norms")
            _trend_axes(ax, layers, similarity=False)
        title = f"Per-layer means — {v.label}"
        figures.append(figure_record(
            fig, "layer_trends", out / f"layer_trends_{slug(v.label)}.png", title, data,
            "S_ee: mean over routed-expert pairs i≠j; "
            + ("S_ef: mean similarity of the routed experts to F (dashed); " if any(
                k[-1] == "S_ef" for k in data) else "no F in this store, so no S_ef; ")
            + "bands: the interquartile range of the pairs (norms: of tokens × routed experts, line = median); "
            f"similarity axes span at least {MIN_TREND_SPAN}, so noise is not drawn as a trend"
            + dense_note(v, [0, int(v.model.get("num_layers") or 1) - 1], True) + "."))
    return figures


def _trend_lines(ax, layers: list[int], similarity, labels: list[str], color: str, name: str,
                 key: tuple) -> dict:
    """Draw one quantity's per-layer S_ee (solid) and, where F is there, S_ef (dashed) in `color`, each with
    its pairs' interquartile range as a band; return the plotted values keyed `key + ("S_ee",)` /
    `key + ("S_ef",)` (and `+ ("S_ee", "iqr")`: [layer, (q25, q75)])."""
    see_values, sef_values = _pair_values(np.asarray(similarity, dtype=np.float64), labels)
    drawn = {}
    for name_, groups, style in (("S_ee", see_values, "-o"), ("S_ef", sef_values, "--s")):
        mean = _nan_stat(groups, np.mean)
        if not np.isfinite(mean).any():
            continue
        q = np.stack([_nan_stat(groups, np.quantile, 0.25), _nan_stat(groups, np.quantile, 0.75)], axis=-1)
        ax.plot(layers, mean, style, color=color, ms=3, label=f"{name_} {name}")
        ax.fill_between(layers, q[:, 0], q[:, 1], color=color, alpha=0.15 if name_ == "S_ee" else 0.08, lw=0)
        drawn[key + (name_,)] = mean
        drawn[key + (name_, "iqr")] = q
    return drawn


def _norm_lines(ax, layers: list[int], norms: np.ndarray, labels: list[str], color: str, name: str,
                key: tuple) -> dict:
    """Per layer the median output norm of the routed experts over tokens (solid, IQR band) and F's and SE's
    median (dashed, dotted); [layer, token, label] norms in."""
    routed = [i for i, lab in enumerate(labels) if lab.isdigit()]
    groups = [m[np.isfinite(m)] for m in norms[:, :, routed].reshape(len(layers), -1)]
    median = _nan_stat(groups, np.median)
    q = np.stack([_nan_stat(groups, np.quantile, 0.25), _nan_stat(groups, np.quantile, 0.75)], axis=-1)
    ax.plot(layers, median, "-o", color=color, ms=3, label=f"experts {name}")
    ax.fill_between(layers, q[:, 0], q[:, 1], color=color, alpha=0.15, lw=0)
    drawn = {key + ("experts",): median, key + ("experts", "iqr"): q}
    for lab, style in (("F", "--s"), ("SE", ":^")):
        if lab in labels:
            values = norms[:, :, labels.index(lab)]
            med = _nan_stat([r[np.isfinite(r)] for r in values], np.median)
            if np.isfinite(med).any():
                ax.plot(layers, med, style, color=color, ms=3, label=f"{lab} {name}")
                drawn[key + (lab,)] = med
    return drawn


def _trend_axes(ax, layers: list[int], similarity: bool = True) -> None:
    ax.set_xlabel("layer", fontsize=LABEL_FONT)
    ax.tick_params(labelsize=TICK_FONT)
    if len(layers) <= 16:
        ax.set_xticks(layers)
    if similarity:
        lo, hi = ax.get_ylim()
        if hi - lo < MIN_TREND_SPAN:
            mid = (lo + hi) / 2
            ax.set_ylim(mid - MIN_TREND_SPAN / 2, mid + MIN_TREND_SPAN / 2)
    else:
        ax.set_ylim(0, ax.get_ylim()[1] * 1.05)  # norms from 0: their size with depth, not zoomed
    # one column per colour (a matrix or an input), S_ee above S_ef, when every colour has both
    colours = [line.get_color() for line in ax.get_lines()]
    per_colour = {colours.count(c) for c in colours}
    ncol = len(set(colours)) if len(per_colour) == 1 else len(colours)
    ax.legend(fontsize=TICK_FONT, frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=min(ncol, 3),
              borderaxespad=0, columnspacing=1.0, handlelength=2.2)
    ax.grid(alpha=0.3)
