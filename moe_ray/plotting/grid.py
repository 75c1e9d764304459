"""`PanelGrid`: a grid of heat maps drawn on one canvas (one matplotlib Axes spanning the figure,
coordinates in inches from its top left corner) instead of one Axes per panel.

An Axes carries axis, tick, spine and title machinery that costs tens of milliseconds a panel to build
and draw; here a panel is an image, a frame and its labels as plain text, which drew a 4 x 8 grid of
labelled heat maps 2.6x faster. The layout is fixed in inches (`common.Layout`): `panel` is one heat map,
`gap` the space between two; margins hold the figure title, tick labels and the colour bar, and each
block of panels showing one quantity (`breaks`) gets its own colour bar beside it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .common import (LABEL_FONT, MAX_TICKS, TICK_FONT, Figure, Layout, figure_record,  # sets the Agg backend
                     side_colorbar, tick_positions)

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.collections import LineCollection, PatchCollection  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

TICK_LENGTH = 0.04
"""Inches of a tick mark; tick labels start just past it."""
CHAR_WIDTH = 0.62
"""A label character's width in ems (generous), to place an axis label beyond its tick labels."""


class PanelGrid:
    """`nrows` x `ncols` heat-map panels in one image; panel (r, c) counts from the top left."""

    def __init__(self, nrows: int, ncols: int, panel: tuple[float, float] = (2.2, 2.2),
                 gap: tuple[float, float] = (0.35, 0.55), top: float = 0.6, bottom: float = 0.6,
                 left: float = 0.8, breaks: tuple[int, ...] = ()):
        self.layout = Layout(nrows, ncols, panel, gap, top, bottom, left, breaks=tuple(breaks))
        self.panel_w, self.panel_h = self.layout.panel_w, self.layout.panel_h
        self.width, self.height = self.layout.width, self.layout.height
        self.fig = plt.figure(figsize=(self.width, self.height))
        self.canvas = self.fig.add_axes((0, 0, 1, 1))
        self.canvas.set_axis_off()
        self.canvas.set_autoscale_on(False)
        self._fix_limits()
        self.frames: list[Rectangle] = []
        self.ticks: list[list[tuple[float, float]]] = []
        self.marks: list[tuple[float, float]] = []
        self.filled_marks: list[tuple[float, float]] = []

    def _fix_limits(self) -> None:
        self.canvas.set_xlim(0, self.width)
        self.canvas.set_ylim(self.height, 0)

    def corner(self, r: int, c: int) -> tuple[float, float]:
        """The top left corner of panel (r, c), inches from the figure's top left."""
        at = self.layout
        return at.col_left(c), at.top + r * (self.panel_h + at.gap[1])

    def heatmap(self, r: int, c: int, values: np.ndarray, xlabels: list[str], ylabels: list[str], cmap,
                vmin: float | None, vmax: float | None, xlabel: str = "expert", ylabel: str = "expert",
                show_x: bool = True, show_y: bool = True, max_xticks: int = MAX_TICKS, max_yticks: int = MAX_TICKS,
                norm=None, interpolation: str = "nearest"):
        """A framed heat map in panel (r, c), row 0 at the top; labels (at most `max_*ticks`, see
        `tick_positions`) only where `show_x`/`show_y`; `norm` (a matplotlib Normalize) instead of vmin/vmax.
        Returns the image (for a colour bar)."""
        x, y = self.corner(r, c)
        scale = {"norm": norm} if norm is not None else {"vmin": vmin, "vmax": vmax}
        im = self.canvas.imshow(values, cmap=cmap, interpolation=interpolation, aspect="auto",
                                extent=(x, x + self.panel_w, y + self.panel_h, y), **scale)
        self.frames.append(Rectangle((x, y), self.panel_w, self.panel_h))
        n_rows, n_cols = np.shape(values)[:2]
        if show_x:
            positions = tick_positions(xlabels, max_xticks)
            self.xticks(r, c, n_cols, positions, [xlabels[i] for i in positions], xlabel)
        if show_y:
            positions = tick_positions(ylabels, max_yticks)
            self.yticks(r, c, n_rows, positions, [ylabels[i] for i in positions], ylabel)
        return im

    def xticks(self, r: int, c: int, n: int, positions: list[float], texts: list[str], label: str) -> None:
        """Labels under panel (r, c) at cell `positions` of `n` columns, then the axis label."""
        x, y = self.corner(r, c)
        top = y + self.panel_h
        rotate = len(texts) > 10 or max(map(len, texts), default=0) > 2
        for pos, text in zip(positions, texts):
            at = x + (pos + 0.5) * self.panel_w / n
            self.ticks.append([(at, top), (at, top + TICK_LENGTH)])
            self.canvas.text(at, top + TICK_LENGTH, text, fontsize=TICK_FONT, ha="center", va="top",
                             rotation=90 if rotate else 0)
        depth = (max(map(len, texts), default=1) * CHAR_WIDTH if rotate else 1.25) * TICK_FONT / 72
        self.canvas.text(x + self.panel_w / 2, top + TICK_LENGTH + depth + 0.05, label, fontsize=LABEL_FONT,
                         ha="center", va="top")

    def numeric_xticks(self, r: int, c: int, n: int, label: str, count: int = 5) -> None:
        """Index labels (0 .. n-1, at most `count` round numbers) under panel (r, c), e.g. neurons."""
        ticks = [int(t) for t in MaxNLocator(count, integer=True).tick_values(0, n - 1) if 0 <= t <= n - 1]
        self.xticks(r, c, n, ticks, [str(t) for t in ticks], label)

    def yticks(self, r: int, c: int, n: int, positions: list[float], texts: list[str], label: str) -> None:
        """Labels left of panel (r, c) at cell `positions` of `n` rows, then the axis label."""
        x, y = self.corner(r, c)
        for pos, text in zip(positions, texts):
            at = y + (pos + 0.5) * self.panel_h / n
            self.ticks.append([(x - TICK_LENGTH, at), (x, at)])
            self.canvas.text(x - TICK_LENGTH - 0.02, at, text, fontsize=TICK_FONT, ha="right", va="center")
        width = max(map(len, texts), default=1) * CHAR_WIDTH * TICK_FONT / 72
        self.canvas.text(x - TICK_LENGTH - width - 0.08, y + self.panel_h / 2, label, fontsize=LABEL_FONT,
                         rotation=90, ha="right", va="center")

    def title(self, r: int, c: int, text: str, fontsize: float = LABEL_FONT) -> None:
        x, y = self.corner(r, c)
        self.canvas.text(x + self.panel_w / 2, y - 0.05, text, fontsize=fontsize, ha="center", va="bottom")

    def note(self, r: int, c: int, text: str) -> None:
        """Text in the middle of an empty panel (what is missing there)."""
        x, y = self.corner(r, c)
        self.canvas.text(x + self.panel_w / 2, y + self.panel_h / 2, text, fontsize=LABEL_FONT, ha="center",
                         va="center", wrap=True)

    def mark(self, r: int, c: int, shape: tuple[int, int], cells: list[tuple[int, int]], filled: bool = False) -> None:
        """A dot on each (row, column) cell of panel (r, c), whose heat map has `shape`: white with a black
        edge, or (`filled`) a larger black one, for a second, stronger criterion."""
        x, y = self.corner(r, c)
        (self.filled_marks if filled else self.marks).extend(
            (x + (col + 0.5) * self.panel_w / shape[1], y + (row + 0.5) * self.panel_h / shape[0])
            for row, col in cells)

    def _fractions(self) -> tuple[float, float]:
        """The grid's top and bottom edges as figure fractions."""
        at = self.layout
        return 1 - at.top / at.height, 1 - at.grid_bottom / at.height

    def colorbar(self, im, label: str, slot: int = 0, slots: int = 1, extend: str = "neither"):
        """A colour bar right of the panels (slot k of n, stacked top to bottom)."""
        at = self.layout
        return side_colorbar(self.fig, im, label, (at.left + at.grid_w) / at.width, *self._fractions(), slot, slots,
                             extend)

    def block_colorbar(self, im, label: str, last_col: int, extend: str = "neither"):
        """A colour bar in the gap right of column `last_col`, the last of a block (a `breaks` entry), or
        at the right margin when it is the grid's last column."""
        at = self.layout
        if last_col == at.ncols - 1:
            return self.colorbar(im, label, extend=extend)
        assert last_col in at.breaks, (last_col, at.breaks)
        right = (at.col_left(last_col) + self.panel_w) / at.width
        return side_colorbar(self.fig, im, label, right, *self._fractions(), extend=extend, pad=0.2)

    def save(self, key: str, path: Path, title: str, data: dict, caption: str = "") -> Figure:
        """Frames, tick marks and dots as one collection each, then the title and the PNG: its `Figure`."""
        self.canvas.add_collection(PatchCollection(self.frames, facecolor="none", edgecolor="black", linewidth=0.8))
        self.canvas.add_collection(LineCollection(self.ticks, colors="black", linewidths=0.6))
        if self.marks:
            self.canvas.scatter(*zip(*self.marks), s=9, facecolors="white", edgecolors="black", linewidths=0.5,
                                zorder=3)
        if self.filled_marks:
            self.canvas.scatter(*zip(*self.filled_marks), s=16, facecolors="black", edgecolors="white", linewidths=0.5,
                                zorder=4)
        self._fix_limits()
        return figure_record(self.fig, key, path, title, data, caption)

