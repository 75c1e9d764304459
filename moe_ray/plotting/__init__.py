"""Figures and tables of the paper from one or several moe-ray stores (matplotlib, Agg backend).

What lives where:
- `common.py`  opening stores lazily (`StoreView`), layer paging, colour maps per quantity, tick labels,
               the `Figure` / `Table` records (every figure function returns the data it drew);
- `grid.py`    `PanelGrid`: a grid of heat maps drawn on one canvas (images and text, not one Axes a panel);
- `static.py`  Fig 1 matrix similarity, Fig 6 matrix PCA, Fig 7 neuron PCA (2-D, 3-D), Fig 8 gate
               embedding beside neuron averaging, and `square_pages`, the per-layer heat-map engine;
- `dynamic.py` Fig 2, 3, 4, 5, 9, 10 and the activation-ratio summary from `dynamic/<input>`;
- `tables.py`  Tab 2 (reorder), Tab 3 (mean R²), Tab 4 (R per layer), the cross-model comparison, CSV;
- `report.py`  `render`/`plot`: every section a store supports, split into drawing tasks (a page of
               layers, an input, a store) run as Ray tasks or in a process pool; `index.html` with
               provenance and what is missing.
"""
from .report import Report, plot, render

__all__ = ["Report", "plot", "render"]
