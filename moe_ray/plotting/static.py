"""Figures of the static (weight) analyses: Fig 1 matrix-level similarity, Fig 6 matrix PCA, Fig 7
neuron PCA (2-D and 3-D), Fig 8 gate embedding beside neuron averaging (paper §4.1, §4.2, App A-C).

`square_pages` is the shared engine for every "expert x expert map per layer" figure; the dynamic
figures reuse it. Several stores go side by side in one image, colour range shared per quantity.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .common import (CMAPS, HEADER_ROOM, RIGHT_MARGIN, Figure, StoreView, colorbar, grid_labels, new_figure,
                     nonempty_labels, page_name, pages, panel_title, save, shared_range, store_headers)
from .grid import PanelGrid

MATRICES = ("up", "gate", "down")
Getter = Callable[[StoreView, list[int]], "tuple[np.ndarray, list[str], list[str]]"]


@dataclass
class Column:
    """One heat-map column per store: a title, how to read [layers, rows, cols] and its colour group."""

    title: str
    read: Getter
    group: str
    cmap: str
    xlabel: str = "expert"
    ylabel: str = "expert"
    layers: Callable[[StoreView], list[int]] | None = None
    """The layers this column has in a store, when fewer than the figure's (blank panels elsewhere)."""


def layers_of(view: StoreView, group: str) -> list[int]:
    return view.done_layers(group)[0]


def square_pages(views: list[StoreView], out: Path, key: str, title: str, columns: list[Column],
                 layers_for: Callable[[StoreView], list[int]], groups_label: dict[str, str],
                 exclude_diagonal: bool = True) -> list[Figure]:
    """Heat maps per layer (rows) x column per store, one image per page of layers.

    Each colour group shares one range over every store and layer of the page (one colour bar).
    `Figure.data[(store label, layer, column title)]` is the matrix drawn, `data[("labels", ...)]`
    its (row, column) labels and `data[("range", group)]` the colour range.
    """
    all_layers = sorted({l for v in views for l in layers_for(v)})
    figures = []
    for page in pages(all_layers):
        drawn: dict = {}
        for v in views:
            have = set(layers_for(v))
            for col in columns:
                col_have = set(col.layers(v)) if col.layers is not None else have
                sel = [l for l in page if l in have and l in col_have]
                if not sel:
                    continue
                values, rows, cols = col.read(v, sel)
                for l, m in zip(sel, values):
                    drawn[(v.label, l, col.title)] = m
                    drawn[("labels", v.label, l, col.title)] = (rows, cols)
        ranges = {}
        for col in columns:
            mats = [m for k, m in drawn.items() if k[0] != "labels" and k[2] == col.title]
            ranges.setdefault(col.group, []).extend(mats)
        ranges = {g: shared_range(ms, exclude_diagonal) for g, ms in ranges.items()}
        ncols = len(views) * len(columns)
        grid = PanelGrid(len(page), ncols, top=HEADER_ROOM)
        for s, v in enumerate(views):
            grid.header(v.label, s * len(columns), (s + 1) * len(columns) - 1)
        panels = {(r, s * len(columns) + c): (v, layer, col)
                  for r, layer in enumerate(page) for s, v in enumerate(views) for c, col in enumerate(columns)
                  if (v.label, layer, col.title) in drawn}
        shown = grid_labels({rc: drawn[("labels", v.label, layer, col.title)]
                             for rc, (v, layer, col) in panels.items()})
        images: dict[str, object] = {}
        for r, layer in enumerate(page):
            for s, v in enumerate(views):
                for c, col in enumerate(columns):
                    rc = (r, s * len(columns) + c)
                    if rc not in panels:
                        grid.note(*rc, f"layer {layer} · {col.title}\nnot in this store")
                        continue
                    rows, cols = drawn[("labels", v.label, layer, col.title)]
                    lo, hi = ranges[col.group]
                    images[col.group] = grid.heatmap(*rc, drawn[(v.label, layer, col.title)], cols, rows, col.cmap,
                                                     lo, hi, col.xlabel, col.ylabel, *shown[rc])
                    grid.title(*rc, f"layer {layer} · {col.title}")
        for slot, (group, im) in enumerate(images.items()):
            grid.colorbar(im, groups_label.get(group, group), slot, len(images))
        path = out / f"{key}_{page_name(page)}.png"
        full = f"{title} — layers {page[0]}–{page[-1]}"
        grid.save(path, full)
        drawn.update({("range", g): r for g, r in ranges.items()})
        figures.append(Figure(key, path, full, drawn))
    return figures


def static_square(name: str, matrix: str | None) -> Getter:
    """Read `static/<name>` for some layers (one matrix), dropping labels with no values (F/SE absent)."""
    def read(view: StoreView, layers: list[int]):
        da = view.dataset("static")[name].sel(layer=layers)
        if matrix is not None:
            da = da.sel(matrix=matrix)
        values = np.asarray(da.values, dtype=np.float64)
        labels = [str(x) for x in da["expert_i"].values]
        keep = nonempty_labels(values, labels)
        values = values[:, keep][:, :, keep]
        kept = [labels[i] for i in keep]
        return values, kept, kept
    return read


def fig1_matrix_similarity(views: list[StoreView], out: Path) -> list[Figure]:
    """Fig 1 (§4.1.1): cosine similarity of flattened W_up, W_gate, W_down per layer (F row/column)."""
    cols = [Column(f"W_{m}", static_square("matrix_similarity", m), "sim", CMAPS["similarity"]) for m in MATRICES]
    return square_pages(views, out, "fig1_matrix_similarity", "Fig 1: matrix-level similarity of expert weights",
                        cols, lambda v: layers_of(v, "static"), {"sim": "cosine similarity"})


def fig8_gate_and_neuron_avg(views: list[StoreView], out: Path) -> list[Figure]:
    """Fig 8 (§4.2, App B/C): gate-embedding similarity X beside neuron-averaging similarity Y_m."""
    cols = [Column("gate embedding X", static_square("gate_embedding_similarity", None), "x", CMAPS["similarity"])]
    cols += [Column(f"avg W_{m} (Y_{m})", static_square("neuron_avg_similarity", m), "y", CMAPS["similarity"])
             for m in MATRICES]
    return square_pages(views, out, "fig8_gate_neuron_avg",
                        "Fig 8: gate embedding (left) and neuron-averaged similarity", cols,
                        lambda v: layers_of(v, "static"),
                        {"x": "cosine (gate embedding)", "y": "cosine (neuron average)"})


SPECIAL_COLORS = {"F": "0.1", "SE": "0.5"}
"""Dense reference and shared expert in the PCA scatters: dark and mid grey, whatever the store."""


def _expert_colors(labels: list[str]) -> list:
    """A colour per label, by expert index so stores agree: tab10 up to 10 routed experts, turbo beyond."""
    import matplotlib

    n = sum(lab not in SPECIAL_COLORS for lab in labels)
    cmap = matplotlib.colormaps["tab10" if n <= 10 else "turbo"]
    return [matplotlib.colors.to_rgba(SPECIAL_COLORS[lab]) if lab in SPECIAL_COLORS
            else cmap(int(lab) if n <= 10 else int(lab) / max(n - 1, 1)) for lab in labels]


def _expert_keys(fig, named: dict, ranged: list[tuple[list[str], str]], pad: float = 0.0) -> None:
    """Which colour is which expert, `pad` inches further right of the panels than usual: one legend for
    the stores with few experts (`named`: label -> colour), then a colour bar per store with many
    (`ranged`: labels, store label)."""
    import matplotlib
    from matplotlib.cm import ScalarMappable
    from matplotlib.lines import Line2D

    slots = len(ranged) + (1 if named else 0)
    if named:
        width = fig.get_size_inches()[0]
        handles = [Line2D([], [], marker="o", ls="", color=c, label=lab) for lab, c in named.items()]
        fig.legend(handles=handles, title="expert", fontsize=7, title_fontsize=7, frameon=False, loc="upper left",
                   bbox_to_anchor=(fig.subplotpars.right + (0.1 + pad) / width, fig.subplotpars.top))
    for i, (labels, store_label) in enumerate(ranged):
        routed = [lab for lab in labels if lab not in SPECIAL_COLORS]
        norm = matplotlib.colors.Normalize(0, len(routed) - 1)
        cb = colorbar(fig, ScalarMappable(norm, matplotlib.colormaps["turbo"]), f"expert ({store_label})",
                      i + (1 if named else 0), slots, pad=0.25 + pad)
        ticks = [0, len(routed) // 2, len(routed) - 1]
        cb.set_ticks(ticks, labels=[routed[t] for t in ticks])


def _note_empty(axes: np.ndarray, page: list[int]) -> None:
    """Hide the panels of a store x matrix grid that drew nothing, saying there what is missing (as the
    heat maps' blank panels do)."""
    for (r, c), ax in np.ndenumerate(axes):
        if not ax.has_data():
            ax.set_axis_off()
            text = getattr(ax, "text2D", ax.text)  # 3-D axes place 2-D text with text2D
            text(0.5, 0.5, f"layer {page[r]} · W_{MATRICES[c % len(MATRICES)]}\nnot in this store",
                 transform=ax.transAxes, ha="center", va="center", fontsize=8)


def _label_order(label: str) -> tuple[int, int]:
    """Routed experts by index, then F, then SE."""
    return (0, int(label)) if label.isdigit() else (1, list(SPECIAL_COLORS).index(label))


MAX_NAMED_POINTS = 24
"""Fig 6 names each expert's point up to this many experts (colour alone beyond)."""


def _pca_panel(ax, pts: np.ndarray, labels: list[str], colors: list, outlier: np.ndarray) -> dict:
    """One Fig 6 panel: kept experts coloured (and named when few), DBSCAN outliers as grey crosses,
    axes fitted to the kept experts so one far outlier cannot squash the rest; returns what was drawn."""
    present = np.isfinite(pts).all(axis=1)
    keep = np.flatnonzero(present & ~outlier)
    removed = np.flatnonzero(present & outlier)
    named = len(keep) + len(removed) <= MAX_NAMED_POINTS
    ax.scatter(pts[keep, 0], pts[keep, 1], c=[colors[i] for i in keep], s=18)
    limits = (ax.get_xlim(), ax.get_ylim()) if len(keep) >= 2 else None
    if len(removed):
        ax.scatter(pts[removed, 0], pts[removed, 1], marker="x", c="0.55", s=16, linewidths=0.8)
    if limits is not None:
        ax.set_xlim(*limits[0])
        ax.set_ylim(*limits[1])
    if named:
        for i in np.concatenate([keep, removed]):
            ax.annotate(labels[i], pts[i], fontsize=6, xytext=(2, 2), textcoords="offset points",
                        color="0.4" if i in removed else "black", annotation_clip=True)
    ax.locator_params(nbins=3)
    ax.tick_params(labelsize=6)
    return {"labels": [labels[i] for i in keep], "xy": pts[keep], "removed": [labels[i] for i in removed]}


def fig6_matrix_pca(views: list[StoreView], out: Path) -> list[Figure]:
    """Fig 6 (App A.1): experts' flattened matrices in 2-D PCA space; DBSCAN outliers grey and listed."""
    all_layers = sorted({l for v in views for l in layers_of(v, "static")})
    figures = []
    for page in pages(all_layers):
        fig, axes = new_figure(len(page), len(views) * 3, top=HEADER_ROOM + 0.15)
        store_headers(fig, axes, [(v.label, 3 * s, 3 * s + 2) for s, v in enumerate(views)])
        data: dict = {}
        ranged = []
        for s, v in enumerate(views):
            ds = v.dataset("static")
            have = [l for l in page if l in layers_of(v, "static")]
            if not have:
                continue
            scores = np.asarray(ds["matrix_pca"].sel(layer=have).isel(component=slice(0, 2)).values,
                                dtype=np.float64)
            explained = np.asarray(ds["matrix_pca_explained"].sel(layer=have).values, dtype=np.float64)
            outl = (np.asarray(ds["matrix_pca_outlier"].sel(layer=have).values).astype(bool)
                    if "matrix_pca_outlier" in ds else np.zeros(scores.shape[:3], dtype=bool))
            labels = [str(x) for x in ds["expert"].values]
            colors = _expert_colors(labels)
            if len(labels) > MAX_NAMED_POINTS:
                ranged.append((labels, v.label))
            for li, layer in enumerate(have):
                r = page.index(layer)
                for mi, m in enumerate(MATRICES):
                    ax = axes[r, s * 3 + mi]
                    drawn = _pca_panel(ax, scores[li, mi], labels, colors, outl[li, mi])
                    ev = explained[li, mi]
                    ax.set_xlabel(f"PC1 ({ev[0]:.0%})", fontsize=8)
                    ax.set_ylabel(f"PC2 ({ev[1]:.0%})", fontsize=8)
                    note = f"\noutliers (grey ×): {', '.join(drawn['removed'])}" if drawn["removed"] else ""
                    panel_title(ax, f"layer {layer} · W_{m}{note}")
                    data[(v.label, layer, m)] = drawn
        _expert_keys(fig, {}, ranged)
        _note_empty(axes, page)
        path = out / f"fig6_matrix_pca_{page_name(page)}.png"
        title = f"Fig 6: PCA of expert weight matrices — layers {page[0]}–{page[-1]}"
        save(fig, path, title)
        figures.append(Figure("fig6_matrix_pca", path, title, data))
    return figures


Z_LABEL_ROOM = 0.5
"""Inches a 3-D panel's z-axis label reaches right of its Axes box: the colour key starts beyond it."""

MAX_POINTS_PER_PANEL = 16000
"""Neurons drawn in one Fig 7 panel, over all its experts (every k-th neuron of each expert beyond that;
the caption says so). A page of 12 panels of 16,000 points drew in 2.7 s (2-D) / 4.3 s (3-D) on one
core, DeepSeekMoE's 64 x 1,408 = 90,000 in 14 s / 19 s."""


def fig7_neuron_pca(views: list[StoreView], out: Path, dims: int = 2) -> list[Figure]:
    """Fig 7 (App A.2): every neuron as a point in 2-D (or 3-D) PCA space, coloured by expert."""
    all_layers = sorted({l for v in views for l in layers_of(v, "static")})
    figures = []
    kw = {"subplot_kw": {"projection": "3d"}} if dims == 3 else {}
    for page in pages(all_layers):
        fig, axes = new_figure(len(page), len(views) * 3, panel=(3.1, 2.9), top=HEADER_ROOM,
                               right=RIGHT_MARGIN + (Z_LABEL_ROOM if dims == 3 else 0.0), **kw)
        store_headers(fig, axes, [(v.label, 3 * s, 3 * s + 2) for s, v in enumerate(views)])
        data: dict = {}
        named, ranged = {}, []
        for s, v in enumerate(views):
            ds = v.dataset("static")
            have = [l for l in page if l in layers_of(v, "static")]
            if not have:
                continue
            n_neuron = ds.sizes["neuron"]
            stride = max(1, -(-n_neuron * ds.sizes["expert"] // MAX_POINTS_PER_PANEL))
            da = ds["neuron_pca"].sel(layer=have).isel(neuron=slice(None, None, stride),
                                                       component=slice(0, dims))
            scores = np.asarray(da.values, dtype=np.float64)
            explained = np.asarray(ds["neuron_pca_explained"].sel(layer=have).values, dtype=np.float64)
            labels = [str(x) for x in ds["expert"].values]
            colors = _expert_colors(labels)
            for li, layer in enumerate(have):
                r = page.index(layer)
                for mi, m in enumerate(MATRICES):
                    ax = axes[r, s * 3 + mi]
                    drawn, all_pts, all_colors = {}, [], []
                    for e, lab in enumerate(labels):
                        pts = scores[li, mi, e]
                        pts = pts[np.isfinite(pts).all(axis=1)]
                        if len(pts):
                            drawn[lab] = pts
                            all_pts.append(pts)
                            all_colors += [colors[e]] * len(pts)
                    if all_pts:
                        ax.scatter(*np.concatenate(all_pts).T, s=2, c=all_colors, rasterized=True, alpha=0.6)
                    ev = explained[li, mi]
                    ax.set_xlabel(f"PC1 ({ev[0]:.0%})", fontsize=7)
                    ax.set_ylabel(f"PC2 ({ev[1]:.0%})", fontsize=7)
                    if dims == 3:
                        ax.set_zlabel(f"PC3 ({ev[2]:.0%})", fontsize=7)
                    ax.locator_params(nbins=3)
                    ax.tick_params(labelsize=5)
                    if dims == 3:
                        ax.grid(False)  # the panes give depth; 3-D grid lines cost a third of the drawing
                    panel_title(ax, f"layer {layer} · W_{m}")
                    data[(v.label, layer, m)] = drawn
                    if len(labels) <= 10:
                        named.update({lab: colors[labels.index(lab)] for lab in drawn})
            if len(labels) > 10:
                ranged.append((labels, v.label))
        _expert_keys(fig, dict(sorted(named.items(), key=lambda kv: _label_order(kv[0]))), ranged,
                     pad=Z_LABEL_ROOM if dims == 3 else 0.0)
        _note_empty(axes, page)
        suffix = "3d" if dims == 3 else "2d"
        path = out / f"fig7_neuron_pca_{suffix}_{page_name(page)}.png"
        title = f"Fig 7: PCA of expert neurons ({dims}-D) — layers {page[0]}–{page[-1]}"
        save(fig, path, title)
        figures.append(Figure(f"fig7_neuron_pca_{suffix}", path, title, data))
    return figures


def fig7_neuron_pca_3d(views: list[StoreView], out: Path) -> list[Figure]:
    """Fig 7 (App A.2) on the first three components."""
    return fig7_neuron_pca(views, out, dims=3)
