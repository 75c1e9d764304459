"""Shared pieces of the plotting package: opening stores lazily, layer paging, colour maps per
quantity, tick labels, the fixed layout of the scatter figures' Axes grids (heat maps are drawn by
`grid.PanelGrid`), and the `Figure`/`Table` records every figure function returns.

Every figure function returns the numbers it drew (`Figure.data`), so tests check figures through
data, not pixels. Arrays are opened with xarray lazily and sliced before `.values`, so a report reads
only the chunks of the layers and tokens it shows.
"""
from __future__ import annotations

import copy
import functools
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import xarray as xr  # noqa: E402
import zarr  # noqa: E402

from ..errors import StoreError  # noqa: E402
from ..store import DONE, _exists, _is_moe_ray_store, _zarr_store, damaged_root  # noqa: E402

LAYERS_PER_PAGE = 4
"""Layers drawn in one image; a 64-layer model gives 16 labelled images per figure, not one grid."""
MAX_TICKS = 17
"""At most this many expert tick labels per axis; F and SE are always labelled."""
DPI = 110
MAX_WIDTH = 11.8
"""Widest image, inches: 1,298 px at DPI, so a 1,400 px browser window shows every image unscaled and its
smallest text (MIN_FONT) at least 8 pt; figures choose their panel sizes and panels per image to fit."""
MIN_FONT = 8
"""Smallest text in any image, points (tick labels); measured on every image (`Figure.min_font_pt`)."""
TICK_FONT = MIN_FONT
LABEL_FONT = 9
"""Axis labels, panel titles, colour-bar labels."""
TINY_PLANTED_NAME = "moe_ray_tiny.json"
"""checkpoint.tiny.PLANTED_NAME, the file `make-tiny` writes beside a synthetic checkpoint, spelled out so
the report does not import torch (tested equal)."""
SPECIAL_LABELS = ("F", "SE")
"""Labels that are not routed experts: the dense reference FFN and the shared expert."""


def expert_labels(ds, dim: str) -> list[str]:
    """The expert labels along `dim` of a Dataset or DataArray ("0".."E-1", "F", "SE"): the `<dim>_label`
    coordinate where the store has one (schema 2: the dimension's coordinate holds integer codes), else
    the dimension's own values (schema 1 stored the labels there). The one place plotting reads labels."""
    label = f"{dim}_label"
    values = ds[label].values if label in ds.coords or label in getattr(ds, "variables", {}) else ds[dim].values
    return [str(v) for v in values]

CMAPS = {
    "similarity": "viridis",      # cosine similarity of weights (whole matrices or mean neurons)
    "gate": "plasma",             # cosine similarity of router rows (gate embedding X)
    "output": "cividis",          # similarity of expert outputs (per-token cosine, mean angular)
    "norm": "magma",              # L2 norms of expert outputs (per token, relative to its largest)
    "score": "Blues",             # router scores
    "count": "RdBu_r",            # rank counts, diverging around the uniform count
    "magnitude": "inferno",       # |intermediate state|
    "ratio": "YlGn",              # activation ratio
}
"""One colour map per quantity, the same in every figure and every store; different quantities side by
side never share one."""


@dataclass
class Figure:
    """One image of the report and the data drawn in it (keyed by store label, layer, matrix ...)."""

    key: str
    path: Path
    title: str
    data: dict[Any, Any] = field(default_factory=dict)
    caption: str = ""
    """What the reader needs beside the title: which tokens, colour scale, outliers removed..."""
    min_font_pt: float = 0.0
    """The smallest text drawn in the image, points (at DPI)."""
    size_px: tuple[int, int] = (0, 0)
    store: str = ""
    """The label of the store the image shows (set by the report)."""


@dataclass
class Table:
    """One table of the report, written as CSV beside the HTML; `rows` hold the exact numbers."""

    key: str
    title: str
    columns: list[str]
    rows: list[list[Any]]
    csv: Path | None = None
    note: str = ""
    formats: list[str | None] | None = None
    """Per column: a format spec (".3f") or "order" (see tables.fmt); None prints the value as is."""
    header_groups: list[tuple[str, int]] | None = None
    """A first header row of (label, columns spanned), e.g. the model above its three matrices; then
    `subheaders` name the columns (default: `columns`)."""
    subheaders: list[str] | None = None


class StoreView:
    """A moe-ray store opened read-only for plotting: provenance, which groups exist, lazy datasets."""

    def __init__(self, url: str | Path, label: str | None = None, inputs: list[str] | None = None,
                 layers: list[int] | None = None):
        """`label` replaces the default one (family and checkpoint name); `inputs` and `layers` restrict
        the view to those dynamic inputs and layers (a drawing task: one input, one page of layers)."""
        # absolute, so a worker with another working directory (a Ray task) opens the same store
        self.url = str(url) if "://" in str(url) else str(Path(url).resolve())
        if not _exists(self.url):
            raise StoreError(f"store not found: {self.url}")
        if not _is_moe_ray_store(self.url):
            damage = damaged_root(self.url)
            if damage:
                raise StoreError(f"store {self.url} is damaged: {damage}; compute it again into a new store (or "
                                 "with --overwrite)")
            raise StoreError(f"{self.url} is not a moe-ray store (no moe_ray root attribute)")
        self.root = zarr.open_group(_zarr_store(self.url, "r"), mode="r", use_consolidated=False)
        self.attrs = dict(self.root.attrs)
        self.model = self.attrs.get("model") or {}
        self.reference = self.attrs.get("reference")
        self.label = label or self._default_label()
        self._limit(inputs, layers)
        self._datasets: dict[str, xr.Dataset] = {}
        self._done: dict[str, tuple[list[int], np.ndarray]] = {}
        self._scales: dict[str, tuple[float, float, float, float]] = {}
        """Per quantity: (low, high of the colour range, smallest, largest value drawn) over all the model's
        layers (`model_scale`), shared by the restricted copies of this view."""

    tokens: "list[int] | str | None" = None
    """The token positions per-token figures draw (Figs 2, 4, 5, 10): a list, "all", or None for each
    figure's default (the input's first ones)."""

    def unrestricted_tokens(self) -> "StoreView":
        """This view with each figure's default tokens (to tell a chosen set from the default)."""
        view = copy.copy(self)
        view.tokens = None
        return view

    def _limit(self, inputs: list[str] | None, layers: list[int] | None) -> None:
        self.inputs = None if inputs is None else list(inputs)
        self.layers = None if layers is None else {int(l) for l in layers}

    def restricted(self, label: str, inputs: list[str] | None, layers: list[int] | None) -> "StoreView":
        """This view under another label, restricted to `inputs` and `layers` (see __init__), sharing
        what it has opened and read: a drawing task in this process, or in one forked from it, opens
        nothing twice."""
        view = copy.copy(self)
        view.label = label
        view._limit(inputs, layers)
        return view

    @property
    def location(self) -> str:
        """Where the model's checkpoint was read from."""
        return str(((self.attrs.get("identity") or {}).get("model") or {}).get("location", self.url))

    @functools.cached_property
    def synthetic(self) -> dict | None:
        """What `moe-ray make-tiny` planted, when the model is one of its synthetic checkpoints (its
        `moe_ray_tiny.json` beside the weights); None for a real model or one no longer readable here."""
        path = Path(self.location) / TINY_PLANTED_NAME
        try:
            return json.loads(path.read_text()) if "://" not in self.location and path.is_file() else None
        except (OSError, ValueError):
            return None

    def _default_label(self) -> str:
        """The checkpoint's name, with its family where the name does not say it, and "(synthetic)" for a
        make-tiny model."""
        family = str(self.model.get("family", "model"))
        name = Path(self.location.rstrip("/")).name
        squash = lambda text: "".join(c for c in text.lower() if c.isalnum())  # noqa: E731
        label = name if squash(family.split("_")[0]) in squash(name) else f"{name} ({family})"
        return label + (" (synthetic)" if self.synthetic is not None else "")

    @property
    def dense_layers(self) -> list[int]:
        """The model's layers that are dense FFNs (no experts), e.g. DeepSeekMoE's layer 0."""
        moe = set(self.model.get("moe_layers") or [])
        return [l for l in range(int(self.model.get("num_layers") or 0)) if moe and l not in moe]

    def groups(self, parent: str) -> list[str]:
        """Sub-group names of `reorder` or `dynamic` (modes or inputs), sorted; [] when absent."""
        if parent not in self.root:
            return []
        names = sorted(name for name, _ in self.root[parent].groups())
        return [n for n in names if n in self.inputs] if parent == "dynamic" and self.inputs is not None else names

    def unrestricted(self) -> "StoreView":
        """This view over all the model's layers (a drawing task's view holds one page of them), sharing what
        it has opened, read and the colour scales it has computed: for ranges that span every page."""
        view = copy.copy(self)
        view.layers = None
        return view

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
        """(layers whose unit is done, layers not done) for a group with a per-layer `unit_done`, among
        the view's layers."""
        if group not in self._done:
            ds = self.dataset(group)
            layers = [int(v) for v in ds["layer"].values] if "layer" in ds.coords else []
            if DONE in ds and ds[DONE].dims == ("layer",):
                flags = np.asarray(ds[DONE].values).astype(bool)
            else:
                flags = np.ones(len(layers), dtype=bool)
            self._done[group] = (layers, flags)
        layers, flags = self._done[group]
        mine = [(l, f) for l, f in zip(layers, flags) if self.layers is None or l in self.layers]
        return [l for l, f in mine if f], [l for l, f in mine if not f]


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


def tick_positions(labels: list[str], max_ticks: int = MAX_TICKS) -> list[int]:
    """Positions to label: all when few; else every k-th routed expert plus F and SE (expert labels)
    or every k-th position (tokens, ranks)."""
    n = len(labels)
    if n <= max_ticks:
        return list(range(n))
    if not all(lab.isdigit() or lab in SPECIAL_LABELS for lab in labels):
        return list(range(0, n, math.ceil(n / max_ticks)))
    special = [i for i, lab in enumerate(labels) if not lab.isdigit()]
    routed = [i for i in range(n) if i not in special]
    step = math.ceil(len(routed) / (max_ticks - len(special)))
    step = next(s for s in (2, 4, 8, 16, 32, 64, step) if s >= step)
    return sorted([i for i in routed if int(labels[i]) % step == 0] + special)


def fitting_ticks(length_in: float, fontsize: float = TICK_FONT) -> int:
    """How many tick labels of `fontsize` fit along `length_in` inches without touching."""
    return max(2, int(length_in * 72 / (fontsize * 1.35)))


def token_label(token: str, width: int = 12) -> str:
    """A token as a readable label: the tokenizers' space markers (byte-level 'Ġ', SentencePiece '▁')
    as '␣', newlines ('Ċ', '\\n') as '⏎', cut to `width` characters."""
    text = token.replace("Ġ", "␣").replace("▁", "␣").replace("Ċ", "⏎").replace("\n", "⏎")
    return text if len(text) <= width else text[: width - 1] + "…"


def panel_title(ax, text: str, fontsize: float = LABEL_FONT) -> None:
    """A panel title at a fixed height: matplotlib's automatic placement measures every tick label."""
    ax.set_title(text, fontsize=fontsize, y=1.0, pad=3)


def grid_labels(present: dict[tuple[int, int], tuple]) -> dict[tuple[int, int], tuple[bool, bool]]:
    """Which panels of a grid label their axes: `present[(row, col)]` = (row labels, column labels).

    x on the lowest panel of each column run (the panel below is missing or labelled differently),
    y on the leftmost of each row run (the panel to the left is missing or labelled differently).
    """
    shown = {}
    for (r, c), (rows, cols) in present.items():
        below, left = present.get((r + 1, c)), present.get((r, c - 1))
        shown[(r, c)] = (below is None or list(below[1]) != list(cols),
                         left is None or list(left[0]) != list(rows))
    return shown


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


OVER_COLOR = "0.82"
"""Cells above a colour range (a similarity map's diagonal of 1, values clipped at a percentile): light grey,
so they cannot be read as the range's top colour; the colour bar's arrow shows it."""
UNDER_COLOR = "0.3"


@dataclass(frozen=True)
class Scale:
    """A colour range and whether values lie beyond it (the colour bar's `extend`: "max", "min", "both",
    "neither"), drawn in OVER_COLOR / UNDER_COLOR."""

    lo: float
    hi: float
    extend: str = "neither"

    @property
    def limits(self) -> tuple[float, float]:
        return self.lo, self.hi


def extend_of(lo: float, hi: float, smallest: float, largest: float) -> str:
    """The colour bar's `extend` for a range [lo, hi] over values from `smallest` to `largest`."""
    tol = 1e-9 * max(1.0, abs(hi - lo))
    above, below = largest > hi + tol, smallest < lo - tol
    return "both" if above and below else "max" if above else "min" if below else "neither"


def value_span(arrays: list[np.ndarray]) -> tuple[float, float]:
    """(smallest, largest) finite value of the arrays, diagonals included; (inf, -inf) when none."""
    finite = [np.asarray(a, dtype=np.float64) for a in arrays]
    finite = [a[np.isfinite(a)] for a in finite]
    finite = [a for a in finite if a.size]
    if not finite:
        return math.inf, -math.inf
    return min(float(a.min()) for a in finite), max(float(a.max()) for a in finite)


def model_scale(views: list[StoreView], quantity: str, arrays_of: Callable[[StoreView], list[np.ndarray]],
                exclude_diagonal: bool = True, limits: Callable[[list[np.ndarray]], tuple[float, float]] | None = None
                ) -> Scale:
    """One colour range for `quantity` over every layer (every page) of each model, so a 32-layer model's
    images of a figure share one colour bar and its depth trends can be read across them (the paper gives
    each model one bar); several views (a shared scale) share one range over all of them.

    `arrays_of(view)` reads the quantity for every layer of an unrestricted view; `limits` turns the arrays
    into (low, high) (default `shared_range`: finite values, diagonals of square maps excluded). Computed
    once per view and quantity (cached on the view and its restricted copies)."""
    spans = []
    for v in views:
        if quantity not in v._scales:
            arrays = arrays_of(v.unrestricted())
            lo, hi = (limits(arrays) if limits is not None else shared_range(arrays, exclude_diagonal))
            v._scales[quantity] = (lo, hi, *value_span(arrays))
        spans.append(v._scales[quantity])
    if not spans:
        return Scale(0.0, 1.0)
    lo, hi = min(s[0] for s in spans), max(s[1] for s in spans)
    return Scale(lo, hi, extend_of(lo, hi, min(s[2] for s in spans), max(s[3] for s in spans)))


def colormap(name: str, extend: str = "neither", over: str = OVER_COLOR):
    """The colour map `name` (a CMAPS value or any matplotlib name) with values beyond the range in `over`
    / UNDER_COLOR where `extend` says there are some."""
    import matplotlib

    cmap = matplotlib.colormaps[name] if isinstance(name, str) else name
    extremes = {}
    if extend in ("max", "both"):
        extremes["over"] = over
    if extend in ("min", "both"):
        extremes["under"] = UNDER_COLOR
    return cmap.with_extremes(**extremes) if extremes else cmap


MIN_WIDTH = 6.0
"""Narrowest image (inches): a narrow grid is centred in it, so the figure title still fits."""
RIGHT_MARGIN = 1.15
"""Room (inches) right of the panels for a colour bar, its tick labels and its label."""
BLOCK_GAP = 1.6
"""Room (inches) between two blocks of panels: the left block's colour bar, then the right block's tick labels."""
TITLE_FONT = 11


@dataclass(frozen=True)
class Layout:
    """A grid of panels fixed in inches: `panel` is one panel (width, height) and `gap` the space between
    two panels, so gaps stay the same whatever the panel size; margins hold titles, tick labels and (right)
    a colour bar; after each column in `breaks` a BLOCK_GAP holds the colour bar of the block it ends. A
    grid narrower than MIN_WIDTH is centred."""

    nrows: int
    ncols: int
    panel: tuple[float, float] = (2.2, 2.2)
    gap: tuple[float, float] = (0.35, 0.55)
    top: float = 0.6
    bottom: float = 0.6
    margin_left: float = 0.8
    margin_right: float = RIGHT_MARGIN
    breaks: tuple[int, ...] = ()

    @property
    def panel_w(self) -> float:
        return self.panel[0]

    @property
    def panel_h(self) -> float:
        return self.panel[1]

    @property
    def grid_w(self) -> float:
        return self.ncols * self.panel_w + (self.ncols - 1) * self.gap[0] + len(self.breaks) * BLOCK_GAP

    @property
    def width(self) -> float:
        return max(self.margin_left + self.grid_w + self.margin_right, MIN_WIDTH)

    @property
    def left(self) -> float:
        """Inches from the figure's left edge to the first panel."""
        return self.margin_left + (self.width - self.margin_left - self.grid_w - self.margin_right) / 2

    def col_left(self, c: int) -> float:
        """Inches from the figure's left edge to column c."""
        return self.left + c * (self.panel_w + self.gap[0]) + BLOCK_GAP * sum(1 for b in self.breaks if b < c)

    @property
    def grid_bottom(self) -> float:
        """Inches from the figure's top edge to the last row's lower edge."""
        return self.top + self.nrows * self.panel_h + (self.nrows - 1) * self.gap[1]

    @property
    def height(self) -> float:
        return self.grid_bottom + self.bottom


def fit_panel(ncols: int, gap: float, largest: float, extra: float = 0.0, smallest: float = 1.2,
              margins: float = 0.8 + RIGHT_MARGIN) -> float:
    """The widest panel, at most `largest` inches, that lets `ncols` panels with `gap` between them, `extra`
    inches of other room (block gaps) and the margins fit MAX_WIDTH; never below `smallest`."""
    room = (MAX_WIDTH - margins - extra - (ncols - 1) * gap) / ncols
    return max(smallest, min(largest, room))


def fitting_columns(panel: float, gap: float, extra: float = 0.0, margins: float = 0.8 + RIGHT_MARGIN) -> int:
    """How many panels `panel` inches wide, `gap` apart, fit MAX_WIDTH beside `extra` inches of other room."""
    return max(1, int((MAX_WIDTH - margins - extra + gap) // (panel + gap)))


def new_figure(nrows: int, ncols: int, panel: tuple[float, float] = (2.2, 2.0), gap: tuple[float, float] = (0.9, 0.95),
               top: float = 0.6, bottom: float = 0.55, left: float = 0.8, right: float = RIGHT_MARGIN, **kw):
    """A figure and a grid of Axes at a fixed `Layout` (for scatter panels; heat maps use `PanelGrid`).

    A fixed layout instead of matplotlib's constrained/tight layout: measuring every tick label is
    what made large grids slow, and fixed spacing sized for our labels never overlaps.
    """
    kw.pop("layout", None)
    at = Layout(nrows, ncols, panel, gap, top, bottom, left, right)
    fig, axes = plt.subplots(nrows, ncols, figsize=(at.width, at.height), squeeze=False, **kw)
    fig.subplots_adjust(left=at.left / at.width, right=(at.left + at.grid_w) / at.width,
                        bottom=1 - at.grid_bottom / at.height, top=1 - top / at.height,
                        wspace=gap[0] / at.panel_w, hspace=gap[1] / at.panel_h)
    return fig, axes


def colorbar(fig, im, label: str, slot: int = 0, slots: int = 1, extend: str = "neither", pad: float = 0.25):
    """A colour bar right of the grid of `new_figure` (slot k of n, stacked top to bottom)."""
    pars = fig.subplotpars
    return side_colorbar(fig, im, label, pars.right, pars.top, pars.bottom, slot, slots, extend, pad)


def side_colorbar(fig, im, label: str, right: float, top: float, bottom: float, slot: int = 0, slots: int = 1,
                  extend: str = "neither", pad: float = 0.25):
    """A colour bar `pad` inches right of a grid whose right, top and bottom edges are figure fractions."""
    width = fig.get_size_inches()[0]
    span = (top - bottom) / slots
    cax = fig.add_axes([right + pad / width, top - span * (slot + 1) + span * 0.1, 0.13 / width, span * 0.8])
    cb = fig.colorbar(im, cax=cax, extend=extend)
    cb.set_label(label, fontsize=LABEL_FONT)
    cb.ax.tick_params(labelsize=TICK_FONT)
    return cb


QUANTISE = True
"""Images are written as PNGs with a palette of at most 256 colours (Pillow's fast octree, no dithering): a
colour map has 256 entries, so heat maps lose nothing; antialiased text and blended scatter points snap to
the nearest of the image's colours. See benchmarks/bench_report_scale.py for the bytes it saves."""


def write_quantised_png(fig, path: Path) -> None:
    """The figure as a palette PNG (see QUANTISE)."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, pil_kwargs={"compress_level": 1})
    buffer.seek(0)
    with Image.open(buffer) as image:
        palette = image.convert("RGB").quantize(256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
    palette.save(path, format="PNG", compress_level=6)


def save(fig, path: Path, title: str) -> tuple[float, tuple[int, int]]:
    """The figure title (smaller, down to 9 pt, where a long one would not fit), PNG at a fixed DPI, figure
    closed. Returns (the smallest text drawn, points; the image's size in pixels)."""
    from matplotlib.text import Text

    width, height = fig.get_size_inches()
    fits = (width - 0.3) * 72 / (0.55 * len(title))  # a character is about 0.55 em wide
    fig.suptitle(title, fontsize=max(LABEL_FONT, min(TITLE_FONT, fits)), y=1 - 0.12 / height, va="top")
    path.parent.mkdir(parents=True, exist_ok=True)
    if QUANTISE:
        write_quantised_png(fig, path)
    else:
        fig.savefig(path, dpi=DPI, pil_kwargs={"compress_level": 3})  # zlib level 3: a third faster, ~10% larger
    # after drawing: tick labels get their text when drawn
    sizes = [t.get_fontsize() for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]
    with path.open("rb") as png:  # the PNG header's width and height
        header = png.read(24)
    size = (int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big"))
    plt.close(fig)
    return (min(sizes) if sizes else 0.0), size


def figure_record(fig, key: str, path: Path, title: str, data: dict, caption: str = "") -> Figure:
    """Save `fig` (see `save`) and return its `Figure` record with what was drawn and measured."""
    min_font, size = save(fig, path, title)
    return Figure(key, path, title, data, caption, min_font, size)


def nonempty_labels(values: np.ndarray, labels: list[str]) -> list[int]:
    """Indices of labels whose row of a square map holds any finite value (drops absent F/SE)."""
    return [i for i in range(len(labels)) if np.isfinite(values[..., i, :]).any()]
