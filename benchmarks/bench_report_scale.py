"""The report at the three real depths (issue 22): Mixtral 8x7B (32 layers x 8 experts, with its dense parent as
F), DeepSeekMoE 16B (28 layers, 27 MoE x 64 experts + SE) and Grok-1 (64 layers x 8, GELU), built by
`make-tiny --shape` at tiny width, with static and dynamic (short and long input) analyses. Measures the
report's size (every page with the images it shows; budget 5 MB a page, 60 MB in all) and its drawing time
(budget 5 minutes on 2 cores: wall time, and CPU seconds / 2 for a busy machine), beside the baseline of the same report with images saved as plain PNGs
(`--no-quantise`), measured in the same run.

    PYTHONPATH=. python benchmarks/bench_report_scale.py [--work DIR] [--no-baseline]

Stores are built into --work (default /tmp/moe-ray-bench-scale) once and reused. Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

SHAPES = (("mixtral", "upcycled", "mixtral:8x7B"), ("deepseek_moe", "scratch", "deepseek_moe:16B"),
          ("grok1", "scratch", "grok1:314B"))


def build(work: Path) -> list[str]:
    """The three stores (reused when complete)."""
    import moe_ray
    from moe_ray.checkpoint.tiny import make_tiny, shape_overrides

    stores = []
    for family, variant, shape in SHAPES:
        name = shape.replace(":", "-")
        store = work / f"{name}.zarr"
        if store.exists():
            stores.append(str(store))
            continue
        ckpt = make_tiny(family, variant, work / name, config_overrides=shape_overrides(family, shape), overwrite=True)
        spec = {"model": str(ckpt.path), "store": str(store), "analyses": ["static", "dynamic"],
                "dynamic": {"inputs": ["short", "long"], "max_tokens": 256}, "progress": False}
        if ckpt.reference:
            spec["reference"] = str(ckpt.reference)
        stores.append(str(moe_ray.run(spec)))
    return stores


def page_weights(out: Path) -> dict[str, int]:
    """Bytes of every HTML page with the images it shows (each image counted on each page that shows it)."""
    weights = {}
    for page in sorted(out.glob("*.html")):
        text = page.read_text()
        images = set(re.findall(r'<img src="([^"]+)"', text))
        weights[page.name] = len(text.encode()) + sum((out / src).stat().st_size for src in images)
    return weights


def _cpu_seconds() -> float:
    """CPU seconds of this process and its finished children (the forked drawing processes): on a busy shared
    machine wall time says little, CPU time / 2 is what 2 idle cores would take."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def measure(stores: list[str], out: Path, quantise: bool) -> dict:
    from moe_ray.plotting import common, render

    common.QUANTISE = quantise
    started, cpu_before = time.perf_counter(), _cpu_seconds()
    report = render(stores, out, parallel="processes")
    seconds, cpu = time.perf_counter() - started, _cpu_seconds() - cpu_before
    weights = page_weights(out)
    images = sum(f.stat().st_size for f in (out / "figures").iterdir())
    return {"seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1), "quiet_2core_estimate_s": round(cpu / 2, 1),
            "figures": len(report.figures), "images_mb": round(images / 1e6, 2),
            "pages": len(weights), "largest_page_mb": round(max(weights.values()) / 1e6, 2),
            "largest_page": max(weights, key=weights.get), "all_pages_mb": round(sum(weights.values()) / 1e6, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="/tmp/moe-ray-bench-scale")
    parser.add_argument("--no-baseline", action="store_true", help="skip the plain-PNG baseline render")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    stores = build(work)
    result = {"build_s": round(time.perf_counter() - started, 1), "stores": stores}
    import shutil

    for name, quantise in (("quantised", True),) + ((("plain_png", False),) if not args.no_baseline else ()):
        out = work / f"report-{name}"
        shutil.rmtree(out, ignore_errors=True)
        result[name] = measure(stores, out, quantise)
    if "plain_png" in result:
        result["image_bytes_ratio"] = round(result["quantised"]["images_mb"] / result["plain_png"]["images_mb"], 3)
        result["seconds_ratio"] = round(result["quantised"]["seconds"] / result["plain_png"]["seconds"], 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
