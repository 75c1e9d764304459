"""Shared pieces of the plotting package: opening stores lazily, layer paging, colour maps per
quantity, expert tick labels, and the `Figure`/`Table` records every figure function returns.

Every figure function returns the numbers it drew (`Figure.data`), so tests check figures through
data, not pixels. Arrays are opened with xarray lazily and sliced before `.values`, so a report reads
only the chunks of the layers and tokens it shows.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import xarray as xr  # noqa: E402
import zarr  # noqa: E402

from ..errors import StoreError  # noqa: E402
from ..store import DONE, _exists, _is_moe_ray_store, _zarr_store  # noqa: E402

LAYERS_PER_PAGE = 4
"""Layers drawn in one image; a 64-layer model gives 16 labelled images per figure, not one grid."""
MAX_TICKS = 17
"""At most this many expert tick labels per axis; F and SE are always labelled."""
DPI = 110

CMAPS = {
    "similarity": "viridis",      # cosine similarity of weights or outputs
    "angular": "viridis",         # angular similarity, 0..1
    "norm": "magma",              # L2 norms of expert outputs
    "score": "Blues",             # router scores
    "count": "YlOrRd",            # rank counts
    "magnitude": "inferno",       # |intermediate state|
    "ratio": "cividis",           # activation ratio
}
"""One colour map per quantity, the same in every figure and every store."""


@dataclass
class Figure:
    """One image of the report and the data drawn in it (keyed by store label, layer, matrix ...)."""

    key: str
    path: Path
    title: str
    data: dict[Any, Any] = field(default_factory=dict)


@dataclass
class Table:
    """One table of the report, written as CSV beside the HTML; `rows` hold the exact numbers."""

    key: str
    title: str
    columns: list[str]
    rows: list[list[Any]]
    csv: Path | None = None
    note: str = ""


class StoreView:
    """A moe-ray store opened read-only for plotting: provenance, which groups exist, lazy datasets."""

    def __init__(self, url: str | Path):
        self.url = str(url)
        if not _exists(self.url):
            raise StoreError(f"store not found: {self.url}")
        if not _is_moe_ray_store(self.url):
            raise StoreError(f"{self.url} is not a moe-ray store (no moe_ray root attribute)")
        self.root = zarr.open_group(_zarr_store(self.url, "r"), mode="r", use_consolidated=False)
        self.attrs = dict(self.root.attrs)
        self.model = self.attrs.get("model") or {}
        self.reference = self.attrs.get("reference")
        self.label = self._default_label()
        self._datasets: dict[str, xr.Dataset] = {}

    def _default_label(self) -> str:
        family = self.model.get("family", "model")
        location = (self.attrs.get("identity") or {}).get("model", {}) or {}
        name = Path(str(location.get("location", self.url)).rstrip("/")).name
        return f"{family} {name}"

    def groups(self, parent: str) -> list[str]:
        """Sub-group names of `reorder` or `dynamic` (modes or inputs), sorted; [] when absent."""
        if parent not in self.root:
            return []
        return sorted(name for name, _ in self.root[parent].groups())

    def has(self, group: str) -> bool:
        return group in self.root

    def dataset(self, group: str) -> xr.Dataset:
        """The group as a lazy xarray Dataset (nothing read until values are asked for)."""
        if group not in self._datasets:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._datasets[group] = xr.open_zarr(self.url, group=group, consolidated=False,
                                                     chunks=None, decode_times=False)
        return self._datasets[group]

    def done_layers(self, group: str) -> tuple[list[int], list[int]]:
        """(layers whose unit is done, layers not done) for a group with a per-layer `unit_done`."""
        ds = self.dataset(group)
        layers = [int(v) for v in ds["layer"].values] if "layer" in ds.coords else []
        if DONE not in ds or ds[DONE].dims != ("layer",):
            return layers, []
        flags = np.asarray(ds[DONE].values).astype(bool)
        return ([l for l, f in zip(layers, flags) if f], [l for l, f in zip(layers, flags) if not f])


def unique_labels(views: list[StoreView]) -> None:
    """Make store labels distinct (a store name is appended where two models share a name)."""
    seen: dict[str, int] = {}
    for v in views:
        seen[v.label] = seen.get(v.label, 0) + 1
    for v in views:
        if seen[v.label] > 1:
            v.label = f"{v.label} [{Path(v.url.rstrip('/')).name}]"


def pages(layers: list[int], per_page: int = LAYERS_PER_PAGE) -> list[list[int]]:
    """Layers split into consecutive groups of `per_page`."""
    return [layers[i:i + per_page] for i in range(0, len(layers), per_page)]


def page_name(layers: list[int]) -> str:
    return f"L{layers[0]}" if len(layers) == 1 else f"L{layers[0]}-{layers[-1]}"


def tick_positions(labels: list[str]) -> list[int]:
    """Positions to label: all when few; else every k-th routed expert plus F and SE."""
    n = len(labels)
    if n <= MAX_TICKS:
        return list(range(n))
    special = [i for i, lab in enumerate(labels) if not lab.isdigit()]
    routed = [i for i in range(n) if i not in special]
    step = math.ceil(len(routed) / (MAX_TICKS - len(special)))
    step = next(s for s in (2, 4, 8, 16, 32, 64, step) if s >= step)
    return sorted([i for i in routed if int(labels[i]) % step == 0] + special)


def heatmap(ax, values: np.ndarray, xlabels: list[str], ylabels: list[str], cmap: str,
            vmin: float, vmax: float, xlabel: str = "expert", ylabel: str = "expert"):
    """An expert-by-expert (or similar) heat map with readable tick labels; returns the image."""
    im = ax.imshow(values, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest", aspect="auto")
    xt, yt = tick_positions(xlabels), tick_positions(ylabels)
    ax.set_xticks(xt, [xlabels[i] for i in xt], fontsize=7, rotation=90 if len(xt) > 10 else 0)
    ax.set_yticks(yt, [ylabels[i] for i in yt], fontsize=7)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    return im


def shared_range(arrays: list[np.ndarray], exclude_diagonal: bool = True,
                 symmetric: bool = False) -> tuple[float, float]:
    """A colour range shared by several panels: finite values, off-diagonal for square maps."""
    vals = []
    for a in arrays:
        a = np.asarray(a, dtype=np.float64)
        if exclude_diagonal and a.ndim == 2 and a.shape[0] == a.shape[1] and a.shape[0] > 1:
            a = a[~np.eye(a.shape[0], dtype=bool)]
        a = a[np.isfinite(a)]
        if a.size:
            vals.append(a)
    if not vals:
        return 0.0, 1.0
    allv = np.concatenate(vals)
    lo, hi = float(allv.min()), float(allv.max())
    if symmetric:
        m = max(abs(lo), abs(hi)) or 1.0
        return -m, m
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    return lo, hi


def new_figure(nrows: int, ncols: int, panel: tuple[float, float] = (2.9, 2.6), **kw):
    """A grid of panels with fixed margins in inches (room for titles, tick labels and a colour bar).

    A fixed layout instead of matplotlib's constrained/tight layout: measuring every tick label is
    what made large grids slow, and fixed spacing sized for our labels never overlaps.
    """
    kw.pop("layout", None)
    width, height = panel[0] * ncols + 1.6, panel[1] * nrows + 1.0
    fig, axes = plt.subplots(nrows, ncols, figsize=(width, height), squeeze=False, **kw)
    fig.subplots_adjust(left=0.75 / width, right=1 - 1.1 / width, bottom=0.55 / height, top=1 - 0.75 / height,
                        wspace=0.55, hspace=0.75)
    return fig, axes


def colorbar(fig, im, label: str, slot: int = 0, slots: int = 1):
    """A colour bar in the right margin (slot k of n, stacked top to bottom), outside every panel."""
    width, height = fig.get_size_inches()
    top, bottom = 1 - 0.75 / height, 0.55 / height
    span = (top - bottom) / slots
    cax = fig.add_axes([1 - 0.85 / width, top - span * (slot + 1) + span * 0.1, 0.13 / width, span * 0.8])
    return fig.colorbar(im, cax=cax, label=label)


def save(fig, path: Path, title: str) -> None:
    """Title, tight layout without overlaps, PNG at a fixed DPI, figure closed."""
    fig.suptitle(title, fontsize=11, y=1 - 0.15 / fig.get_size_inches()[1], va="top")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def nonempty_labels(values: np.ndarray, labels: list[str]) -> list[int]:
    """Indices of labels whose row of a square map holds any finite value (drops absent F/SE)."""
    return [i for i in range(len(labels)) if np.isfinite(values[..., i, :]).any()]
