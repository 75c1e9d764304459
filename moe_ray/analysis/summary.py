"""Summaries the paper prints as one number per model (numpy only, no torch: the report imports them).

- Tab 2 (§4.1.2): the relative growth of the flattened-matrix similarity that neuron reordering gives,
  (after - before) / |before|, aggregated by the median over layers, expert pairs and matrices, shown
  with its order of magnitude 10^round(log10|median|) as the paper does (Mixtral 1e-3: "almost
  unchanged similarities"; DeepSeek and Grok 100: from about 1e-4 to 1e-2), and the median Kendall tau.

The order is kept exactly as the paper defines it wherever the paper's number is compared. It rounds the
exponent, so it flips at the boundaries 10^(n+1/2) (..., 0.0316, 0.316, 3.16, 31.6, 316, ...): medians of 31 and
32 have orders 10 and 100. `order_boundaries` finds the boundaries an interval straddles, and the report marks
the order (ORDER_MARK) when the growth's interquartile range straddles one: there the order reads either way
and the median beside it is what to read.
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


ORDER_MARK = "‡"
"""Beside an order whose interquartile range straddles a rounding boundary (see `order_boundaries`)."""


def order_boundaries(low: float, high: float) -> list[float]:
    """The values in (low, high] where `order_of_growth` changes, in increasing order: the rounding boundaries
    ±10^(n+1/2) between the two ends' orders, or just 0 where the interval reaches or crosses 0. [] when both
    ends have the same order (or either is not finite): e.g. (25, 40) -> [31.6...], (32, 40) -> [],
    (-0.5, 2) -> [0]."""
    if not (math.isfinite(low) and math.isfinite(high)) or order_of_growth(low) == order_of_growth(high):
        return []
    low, high = min(low, high), max(low, high)

    def between(a: float, b: float) -> list[float]:  # 0 < a < b: boundaries 10^(n+1/2) in (a, b]
        return [10.0 ** (n + 0.5) for n in range(round(math.log10(a)), round(math.log10(b)))]

    if low > 0:
        return between(low, high)
    if high < 0:
        return [-x for x in reversed(between(-high, -low))]
    return [0.0]  # a change of sign (every magnitude's boundary lies between too): the sign is what is unsure


def format_order_marked(order: float, low: float, high: float) -> str:
    """`format_order(order)`, followed by ORDER_MARK when (low, high), the growth's IQR, straddles a boundary."""
    return format_order(order) + (f" {ORDER_MARK}" if order_boundaries(low, high) else "")


def order_reading(median: float, low: float, high: float) -> str:
    """The order of `median` for a line of text that prints the median just before it: "order 100", or, where
    the IQR (low, high) straddles a boundary, "order 10; IQR 25 – 40 straddles 31.6: the order reads 10 to 100"."""
    text = f"order {format_order(order_of_growth(median))}"
    crossed = order_boundaries(low, high)
    if crossed:
        text += (f"; IQR {low:.3g} – {high:.3g} straddles {', '.join(f'{b:.3g}' for b in crossed)}: the order reads "
                 f"{format_order(order_of_growth(low))} to {format_order(order_of_growth(high))}")
    return text


def tab2_summary(before, after, growth, tau) -> dict[str, float]:
    """Tab 2's numbers for one model and mode: medians over every computed layer, pair (and matrix) of
    the similarity before and after reordering, of the relative growth and of Kendall's tau, and the
    order of growth."""
    median = finite_median(growth)
    values = np.asarray(growth, dtype=np.float64)
    finite = values[np.isfinite(values)]
    q25, q75 = (float(q) for q in np.quantile(finite, [0.25, 0.75])) if finite.size else (math.nan, math.nan)
    return {"similarity_before": finite_median(before), "similarity_after": finite_median(after),
            "growth_median": median, "growth_q25": q25, "growth_q75": q75, "order_of_growth": order_of_growth(median),
            "tau_median": finite_median(tau),
            "n_values": int(np.isfinite(np.asarray(growth, dtype=np.float64)).sum())}
