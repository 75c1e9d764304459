"""`PanelGrid`: a grid of heat maps drawn on one canvas (one matplotlib Axes spanning the figure,
coordinates in inches from its top left corner) instead of one Axes per panel.

An Axes carries axis, tick, spine and title machinery that costs tens of milliseconds a panel to build
and draw; here a panel is an image, a frame and its labels as plain text, which drew a 4 x 8 grid of
labelled heat maps 2.6x faster. The layout is fixed in inches, like `common.new_figure`'s: `panel` is
one heat map plus its share of the gaps; margins hold the figure title, store headers, tick labels and
the colour bars.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .common import MAX_TICKS, TICK_FONT, Layout, save, side_colorbar, tick_positions  # sets the Agg backend

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

    def __init__(self, nrows: int, ncols: int, panel: tuple[float, float] = (2.9, 2.6),
                 gap: tuple[float, float] = (0.95, 1.1), top: float = 0.75, bottom: float = 0.55,
                 left: float = 0.75):
        self.layout = Layout(nrows, ncols, panel, gap, top, bottom, left)
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

    def _fix_limits(self) -> None:
        self.canvas.set_xlim(0, self.width)
        self.canvas.set_ylim(self.height, 0)

    def corner(self, r: int, c: int) -> tuple[float, float]:
        """The top left corner of panel (r, c), inches from the figure's top left."""
        at = self.layout
        return at.left + c * (self.panel_w + at.gap[0]), at.top + r * (self.panel_h + at.gap[1])

    def heatmap(self, r: int, c: int, values: np.ndarray, xlabels: list[str], ylabels: list[str], cmap,
                vmin: float, vmax: float, xlabel: str = "expert", ylabel: str = "expert", show_x: bool = True,
                show_y: bool = True, max_xticks: int = MAX_TICKS, max_yticks: int = MAX_TICKS):
        """A framed heat map in panel (r, c), row 0 at the top; labels (at most `max_*ticks`, see
        `tick_positions`) only where `show_x`/`show_y`. Returns the image (for a colour bar)."""
        x, y = self.corner(r, c)
        im = self.canvas.imshow(values, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest", aspect="auto",
                                extent=(x, x + self.panel_w, y + self.panel_h, y))
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
        self.canvas.text(x + self.panel_w / 2, top + TICK_LENGTH + depth + 0.05, label, fontsize=8, ha="center",
                         va="top")

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
        self.canvas.text(x - TICK_LENGTH - width - 0.08, y + self.panel_h / 2, label, fontsize=8, rotation=90,
                         ha="right", va="center")

    def title(self, r: int, c: int, text: str, fontsize: float = 8) -> None:
        x, y = self.corner(r, c)
        self.canvas.text(x + self.panel_w / 2, y - 0.04, text, fontsize=fontsize, ha="center", va="bottom")

    def note(self, r: int, c: int, text: str) -> None:
        """Text in the middle of an empty panel (what is missing there)."""
        x, y = self.corner(r, c)
        self.canvas.text(x + self.panel_w / 2, y + self.panel_h / 2, text, fontsize=8, ha="center", va="center")

    def mark(self, r: int, c: int, shape: tuple[int, int], cells: list[tuple[int, int]]) -> None:
        """A dot on each (row, column) cell of panel (r, c), whose heat map has `shape`."""
        x, y = self.corner(r, c)
        self.marks += [(x + (col + 0.5) * self.panel_w / shape[1], y + (row + 0.5) * self.panel_h / shape[0])
                       for row, col in cells]

    def header(self, text: str, first: int, last: int) -> None:
        """A store's name above columns `first`..`last`, under the figure title (top margin HEADER_ROOM)."""
        left, right = self.corner(0, first)[0], self.corner(0, last)[0] + self.panel_w
        self.canvas.text((left + right) / 2, 0.36, text, fontsize=9, fontweight="bold", ha="center", va="top")

    def colorbar(self, im, label: str, slot: int = 0, slots: int = 1, extend: str = "neither"):
        """A colour bar right of the panels (slot k of n, stacked top to bottom)."""
        at = self.layout
        return side_colorbar(self.fig, im, label, (at.left + at.grid_w) / at.width, 1 - at.top / at.height,
                             1 - at.grid_bottom / at.height, slot, slots, extend)

    def save(self, path: Path, title: str) -> None:
        """Frames, tick marks and dots as one collection each, then the title and the PNG (see `save`)."""
        self.canvas.add_collection(PatchCollection(self.frames, facecolor="none", edgecolor="black", linewidth=0.8))
        self.canvas.add_collection(LineCollection(self.ticks, colors="black", linewidths=0.6))
        if self.marks:
            self.canvas.scatter(*zip(*self.marks), s=7, facecolors="white", edgecolors="black", linewidths=0.4,
                                zorder=3)
        self._fix_limits()
        save(self.fig, path, title)
