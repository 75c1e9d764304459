"""Report rendering speed (issue 5), as ratios against baselines measured in the same run:
- reading every array of the stores once (the floor of any report that shows all of them);
- the whole report drawn in this process (`parallel="none"`) vs in a pool of forked processes
  (`"processes"`, one per usable CPU) and, with --ray, as tasks on a local Ray;
- seconds per drawing task (one page of layers of one figure, for one input), slowest first.

    PYTHONPATH=. python benchmarks/bench_plot.py [STORE ...] [--repeat 2] [--ray]

Without stores it plots `demo/results.zarr` and `demo/results-scratch.zarr` (what `make demo`
writes: static, reorder and dynamic analyses of two tiny Mixtral-style models), and builds two such
stores (static and dynamic) in a scratch directory when those are missing. Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

DEMO_STORES = ("demo/results.zarr", "demo/results-scratch.zarr")


def read_once(urls: list[str]) -> tuple[float, int]:
    """(seconds, bytes) to read every array of the stores once, chunk by chunk as zarr stores them."""
    def arrays(group):
        for _, array in group.arrays():
            yield array
        for _, sub in group.groups():
            yield from arrays(sub)

    started, nbytes = time.perf_counter(), 0
    for url in urls:
        for array in arrays(zarr.open_group(url, mode="r")):
            nbytes += np.asarray(array[...]).nbytes
    return time.perf_counter() - started, nbytes


def build_stores(work: Path) -> list[str]:
    """Two stores like the demo's (an upcycled model with its dense parent as F, and a scratch one)."""
    import moe_ray
    from moe_ray.checkpoint.tiny import make_tiny

    stores = []
    for name, variant, seed in (("results", "upcycled", 0), ("results-scratch", "scratch", 1)):
        ckpt = make_tiny("mixtral", variant, work / variant, seed=seed)
        spec = {"model": str(ckpt.path), "store": str(work / f"{name}.zarr"), "analyses": ["static", "dynamic"],
                "dynamic": {"inputs": ["short", "long"]}, "progress": False}
        if ckpt.reference:
            spec["reference"] = str(ckpt.reference)
        stores.append(moe_ray.run(spec))
    return [str(s) for s in stores]


def best_render(urls: list[str], out: Path, parallel: str, repeat: int):
    """(best seconds over `repeat` renders, the last report)."""
    from moe_ray.plotting import render

    times, report = [], None
    for _ in range(repeat):
        shutil.rmtree(out, ignore_errors=True)
        started = time.perf_counter()
        report = render(urls, out, parallel=parallel)
        times.append(time.perf_counter() - started)
    return min(times), report


def task_times(urls: list[str]) -> list[tuple[str, str, float, int]]:
    """(section, input and layers, seconds, images) of every drawing task, drawn one by one here."""
    from moe_ray.plotting.common import StoreView, unique_labels
    from moe_ray.plotting.report import SECTIONS, _has, draw_section, section_tasks

    views = [StoreView(u) for u in urls]
    unique_labels(views)
    rows = []
    for section in SECTIONS:
        have = [v for v in views if _has(v, section)[0]]
        if section.draw is None or not have:
            continue
        for key, refs in section_tasks(section, have):
            started = time.perf_counter()
            figures = draw_section(key, refs)
            inputs, layers = refs[0][2], refs[0][3]
            where = f"{','.join(inputs or ())} L{layers[0]}-{layers[-1]}" if layers else ",".join(inputs or ())
            rows.append((key, where.strip(), time.perf_counter() - started, len(figures)))
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("stores", nargs="*", help=f"stores to plot (default: {' '.join(DEMO_STORES)})")
    parser.add_argument("--repeat", type=int, default=2, help="renders per mode; the best counts")
    parser.add_argument("--ray", action="store_true", help="also draw as tasks on a local Ray (2 CPUs)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="moe-ray-bench-plot-"))
    urls = args.stores or [s for s in DEMO_STORES if Path(s).is_dir()]
    if not urls:
        from moe_ray.distributed.cluster import connect

        os.environ.setdefault("RAY_AUTH_TOKEN_PATH", str(work / "auth_token"))
        connect(num_cpus=2, object_store_memory_gb=0.5)
        urls = build_stores(work)
    read_once(urls)  # warm the page cache: every measurement below reads from memory
    read_s, nbytes = min(read_once(urls) for _ in range(3))
    serial_s, report = best_render(urls, work / "serial", "none", args.repeat)
    processes_s, _ = best_render(urls, work / "processes", "processes", args.repeat)
    result = {
        "stores": urls, "array_bytes": nbytes, "figures": len(report.figures), "tables": len(report.tables),
        "read_once_s": round(read_s, 3), "report_serial_s": round(serial_s, 2),
        "report_processes_s": round(processes_s, 2),
        "serial_over_read_once": round(serial_s / read_s, 1),
        "processes_over_read_once": round(processes_s / read_s, 1),
        "processes_speedup": round(serial_s / processes_s, 2),
    }
    if args.ray:
        from moe_ray.distributed.cluster import connect

        os.environ.setdefault("RAY_AUTH_TOKEN_PATH", str(work / "auth_token"))
        connect(num_cpus=2, object_store_memory_gb=0.5)
        best_render(urls, work / "ray-warm", "ray", 1)  # workers import matplotlib once
        ray_s, _ = best_render(urls, work / "ray", "ray", args.repeat)
        result.update({"report_ray_s": round(ray_s, 2), "ray_speedup": round(serial_s / ray_s, 2)})
    tasks = task_times(urls)
    result["tasks"] = len(tasks)
    result["task_seconds_total"] = round(sum(t[2] for t in tasks), 2)
    result["slowest_tasks"] = [[k, w, round(s, 2), n] for k, w, s, n in sorted(tasks, key=lambda t: -t[2])[:6]]
    print(json.dumps(result))
    shutil.rmtree(work, ignore_errors=True)
    return result


if __name__ == "__main__":
    main()
