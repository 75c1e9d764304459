"""`make demo`: build tiny checkpoints, run the analyses on a local Ray, print what came out.

    python -m moe_ray.demo --out demo

Writes `demo/checkpoints/*` (tiny models in the real hub layout), `demo/spec.toml` (rerun it with
`moe-ray run demo/spec.toml`), `demo/results.zarr` (an upcycled Mixtral-style model with its dense
parent as F: static, reorder, dynamic analyses and the causal checks on the first CAUSAL_SEQUENCES
sequences of the built-in corpus), `demo/results-<name>.zarr` for the comparison models (a scratch
Mixtral-style one; DeepSeekMoE-style, 64 experts + a shared expert, and Grok-1-style with GELU, both with
static and dynamic analyses), and
`demo/report/index.html` with the paper's figures and tables for all of them.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import xarray as xr

from .api import run
from .checkpoint.tiny import make_tiny
from .errors import MoeRayError

MODELS = {  # store name -> (family, variant, seed, analyses, DBSCAN eps)
    "results": ("mixtral", "upcycled", 0, ["static", "reorder", "dynamic", "causal"], None),
    "results-scratch": ("mixtral", "scratch", 1, ["static", "reorder", "dynamic", "causal"], None),
    # DBSCAN at the paper's eps 50 where the paper used it: DeepSeekMoE's 64 experts (App A.1)
    "results-deepseek": ("deepseek_moe", "scratch", 2, ["static", "dynamic"], 50.0),
    # the paper's GELU model: Grok-1's layout and activation (its activation-ratio contrast, §5.3)
    "results-grok": ("grok1", "scratch", 3, ["static", "dynamic"], None),
}


CAUSAL_SEQUENCES = 16
"""Sequences of the built-in corpus (38) the demo's causal checks run on."""


def _spec_toml(model: Path, reference: Path | None, store: Path, analyses: list[str], dbscan_eps: float | None) -> str:
    lines = [f'model = "{model}"']
    if reference:
        lines.append(f'reference = "{reference}"')
    lines += [f'store = "{store}"', f"analyses = {analyses!r}".replace("'", '"')]
    if dbscan_eps is not None:
        lines += ["", "[static]", f"dbscan_eps = {dbscan_eps}"]
    if "reorder" in analyses:  # the paper's per-matrix reordering (Tab 2) and moe-ray's joint one
        lines += ["", "[reorder]", 'reorder_mode = "both"']
    if "dynamic" in analyses or "causal" in analyses:
        lines += ["", "[dynamic]", 'inputs = ["short", "long"]', "shards = 2"]
    if "causal" in analyses:  # the corpus's first sequences keep the demo near two minutes on 2 cores
        lines.append(f"max_sequences = {CAUSAL_SEQUENCES}")
    return "\n".join(lines) + "\n"


def summarize(store: str) -> str:
    """A few lines a person can read: Tab 3 and the mean expert similarity per layer."""
    from .plotting.common import expert_labels

    ds = xr.open_zarr(store, group="static")
    labels = expert_labels(ds, "expert_i")
    experts = [i for i, lab in enumerate(labels) if lab not in ("F", "SE")]
    sim = ds.matrix_similarity.isel(expert_i=experts, expert_j=experts).values
    mask = ~np.eye(len(experts), dtype=bool)
    lines = ["  Tab 3 mean R² (X, Y_m): " + ", ".join(
        f"{m} {float(v):.3f}" for m, v in zip(ds.matrix.values, ds.gate_weight_r2_mean.values))]
    for li, layer in enumerate(ds.layer.values):
        per_matrix = [np.nanmean(sim[li, mi][mask]) for mi in range(ds.sizes["matrix"])]
        text = "  layer %d: mean expert similarity (up, gate, down) %s" % (
            layer, ", ".join(f"{v:+.3f}" for v in per_matrix))
        if "F" in labels:
            ef = ds.matrix_similarity.sel(layer=layer).isel(expert_i=experts, expert_j=labels.index("F")).values
            text += f"; vs F {np.nanmean(ef):+.3f}"
        lines.append(text)
    from math import nan

    import zarr

    from .analysis.summary import order_reading

    group = zarr.open_group(store, mode="r")
    if "causal" in group:
        causal = group["causal"].attrs
        line = f"  causal: loss {causal['loss']:.3f} nats/token"
        if "causal/norm_routing" in group:
            agreement = np.asarray(group["causal/norm_routing/agreement"][...])
            d = group["causal/norm_routing_all"].attrs
            line += (f"; gate/norm top-k agreement {agreement.min():.2f}-{agreement.max():.2f}, every layer routed by "
                     f"norm: Δ loss {d['estimate']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]")
        mc = group["causal/ablation"].attrs.get("multiple_comparison") if "causal/ablation" in group else None
        if mc:
            line += (f"; {mc['significant']} of {mc['tests']} expert ablations change the loss ({mc['method']}, "
                     f"α {mc['alpha']:g}; {mc['interval_excludes_0']} uncorrected)")
        if "causal/agreement" in group:
            r2 = group["causal/agreement"].attrs["r2_mean"]
            line += f"; weights vs outputs mean R² (W_gate, angular) {r2['gate/angular']:.2f}"
        lines.append(line)
    for mode, what in (("separate", "the paper's, each matrix on its own"), ("joint", "moe-ray's joint")):
        if f"reorder/{mode}" in group:
            tab2 = group[f"reorder/{mode}"].attrs.get("tab2", {})
            order = order_reading(tab2["growth_median"], tab2.get("growth_q25", nan), tab2.get("growth_q75", nan))
            lines.append(f"  Tab 2 {mode} reordering ({what}): similarity {tab2['similarity_before']:.3f} -> "
                         f"{tab2['similarity_after']:.3f}, relative growth {tab2['growth_median']:.3g} ("
                         f"{order}), Kendall tau {tab2['tau_median']:.4f} "
                         "(medians over layers, pairs and matrices)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo", help="demo directory")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    try:
        stores = []
        for name, (family, variant, seed, analyses, dbscan_eps) in MODELS.items():
            ckpt = make_tiny(family, variant, out / "checkpoints" / f"{family}-{variant}", seed=seed, overwrite=True)
            store = out / f"{name}.zarr"
            spec_text = _spec_toml(ckpt.path, ckpt.reference, store, analyses, dbscan_eps)
            spec_path = out / ("spec.toml" if name == "results" else f"spec-{name}.toml")
            spec_path.write_text(spec_text)
            print(f"\n== {family} ({variant}) -> {store}")
            run(spec_path, overwrite=True)
            print(summarize(str(store)))
            stores.append(store)
        from .plotting import render

        print("\n== report: figures and tables of every store, one model after another")
        report = render([str(s) for s in stores], out / "report")
        print(report.summary())
        index = report.index
    except MoeRayError as exc:
        print(f"moe-ray: error: {exc}", file=sys.stderr)
        return 2
    print(f"\nDone. Report: {index}. Rerun one with `moe-ray run {out / 'spec.toml'}`; read results with "
          f"moe_ray.open_results('{stores[0]}').")
    return 0


if __name__ == "__main__":
    sys.exit(main())
