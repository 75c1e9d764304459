"""`make demo`: build tiny checkpoints, run the analyses on a local Ray, print what came out.

    python -m moe_ray.demo --out demo

Writes `demo/checkpoints/*` (tiny models in the real hub layout), `demo/spec.toml` (rerun it with
`moe-ray run demo/spec.toml`), `demo/results.zarr` (an upcycled Mixtral-style model with its dense
parent as F: static, reorder and dynamic analyses), `demo/results-<name>.zarr` for the comparison
models, and `demo/report/index.html` with the paper's figures and tables for all of them.
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

MODELS = {  # store name -> (family, variant, seed, analyses)
    "results": ("mixtral", "upcycled", 0, ["static", "reorder", "dynamic"]),
    "results-scratch": ("mixtral", "scratch", 1, ["static", "reorder", "dynamic"]),
    "results-deepseek": ("deepseek_moe", "scratch", 2, ["static"]),
}


def _spec_toml(model: Path, reference: Path | None, store: Path, analyses: list[str]) -> str:
    lines = [f'model = "{model}"']
    if reference:
        lines.append(f'reference = "{reference}"')
    lines += [f'store = "{store}"', f"analyses = {analyses!r}".replace("'", '"'), "",
              "[static]", "dbscan_eps = 50.0"]
    if "dynamic" in analyses:
        lines += ["", "[dynamic]", 'inputs = ["short", "long"]', "shards = 2"]
    return "\n".join(lines) + "\n"


def summarize(store: str) -> str:
    """A few lines a person can read: Tab 3 and the mean expert similarity per layer."""
    ds = xr.open_zarr(store, group="static")
    experts = [lab for lab in ds.expert_i.values if lab not in ("F", "SE")]
    sim = ds.matrix_similarity.sel(expert_i=experts, expert_j=experts).values
    mask = ~np.eye(len(experts), dtype=bool)
    lines = ["  Tab 3 mean R² (X, Y_m): " + ", ".join(
        f"{m} {float(v):.3f}" for m, v in zip(ds.matrix.values, ds.gate_weight_r2_mean.values))]
    for li, layer in enumerate(ds.layer.values):
        per_matrix = [np.nanmean(sim[li, mi][mask]) for mi in range(ds.sizes["matrix"])]
        text = "  layer %d: mean expert similarity (up, gate, down) %s" % (
            layer, ", ".join(f"{v:+.3f}" for v in per_matrix))
        if "F" in ds.expert_i.values:
            ef = ds.matrix_similarity.sel(layer=layer, expert_i=experts, expert_j="F").values
            text += f"; vs F {np.nanmean(ef):+.3f}"
        lines.append(text)
    import zarr

    group = zarr.open_group(store, mode="r")
    if "reorder/joint" in group:
        tab2 = group["reorder/joint"].attrs.get("tab2", {})
        lines.append(f"  Tab 2 (joint reordering): {tab2}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo", help="demo directory")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    try:
        stores = []
        for name, (family, variant, seed, analyses) in MODELS.items():
            ckpt = make_tiny(family, variant, out / "checkpoints" / f"{family}-{variant}", seed=seed, overwrite=True)
            store = out / f"{name}.zarr"
            spec_text = _spec_toml(ckpt.path, ckpt.reference, store, analyses)
            spec_path = out / ("spec.toml" if name == "results" else f"spec-{name}.toml")
            spec_path.write_text(spec_text)
            print(f"\n== {family} ({variant}) -> {store}")
            run(spec_path, overwrite=True)
            print(summarize(str(store)))
            stores.append(store)
        from .plotting import render

        print(f"\n== report: figures and tables of every store, side by side")
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
