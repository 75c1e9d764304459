"""Summaries the paper prints as one number per model (numpy only, no torch: the report imports them).

- Tab 2 (§4.1.2): the relative growth of the flattened-matrix similarity that neuron reordering gives,
  (after - before) / |before|, aggregated by the median over layers, expert pairs and matrices, shown
  with its order of magnitude 10^round(log10|median|) as the paper does (Mixtral 1e-3: "almost
  unchanged similarities"; DeepSeek and Grok 100: from about 1e-4 to 1e-2), and the median Kendall tau.
"""
from __future__ import annotations

import math

import numpy as np

GROWTH_DEFINITION = ("relative growth = (similarity after - similarity before) / |similarity before| of the "
                     "flattened-matrix cosine, per layer, expert pair i<j and matrix; Tab 2 shows its median over "
                     "them all and the order of magnitude 10^round(log10|median|)")


def relative_growth(before: float, after: float) -> float:
    """(after - before) / |before|; NaN where before is 0 or not finite."""
    if not math.isfinite(before) or not math.isfinite(after) or before == 0:
        return float("nan")
    return (after - before) / abs(before)


def finite_median(values) -> float:
    """Median of the finite entries (unfilled pairs are NaN); NaN when there are none."""
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    return float(np.median(finite)) if finite.size else float("nan")


def order_of_growth(value: float) -> float:
    """10^round(log10|value|), signed like `value` (the paper's 1e-3, 100); 0 for 0, NaN for NaN."""
    if not math.isfinite(value):
        return float("nan")
    if value == 0:
        return 0.0
    return math.copysign(10.0 ** round(math.log10(abs(value))), value)


def format_order(order: float) -> str:
    """An order of magnitude as the paper writes it: 1e-3, 0.1, 1, 10, 100, 1e4."""
    if not math.isfinite(order):
        return "—"
    if order == 0:
        return "0"
    exponent = round(math.log10(abs(order)))
    sign = "-" if order < 0 else ""
    if -1 <= exponent <= 3:
        return sign + (f"{10.0 ** exponent:g}")
    return f"{sign}1e{exponent}"


def tab2_summary(before, after, growth, tau) -> dict[str, float]:
    """Tab 2's numbers for one model and mode: medians over every computed layer, pair (and matrix) of
    the similarity before and after reordering, of the relative growth and of Kendall's tau, and the
    order of growth."""
    median = finite_median(growth)
    return {"similarity_before": finite_median(before), "similarity_after": finite_median(after),
            "growth_median": median, "order_of_growth": order_of_growth(median),
            "tau_median": finite_median(tau),
            "n_values": int(np.isfinite(np.asarray(growth, dtype=np.float64)).sum())}
