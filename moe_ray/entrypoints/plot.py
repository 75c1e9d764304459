"""Ray job entrypoint: render the report for one or several stores.

    ray job submit -- python -m moe_ray.entrypoints.plot STORE [STORE ...] --out DIR

Inside a Ray job (RAY_ADDRESS set) on a cluster of more CPUs than this machine has, the figures are
drawn as Ray tasks and their PNGs come back to this process, which writes the report; stores must be
readable from the workers (shared storage or an fsspec URL). On one machine they are drawn in forked
processes (`--parallel ray` forces Ray tasks).
"""
from __future__ import annotations

import argparse
import os
import sys

from moe_ray.errors import MoeRayError
from moe_ray.plotting import render
from moe_ray.plotting.report import PARALLEL


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="figures and tables of the paper from moe-ray stores")
    parser.add_argument("stores", nargs="+", help="results stores (several: side by side)")
    parser.add_argument("--out", required=True, help="directory for index.html, figures/ and tables/")
    parser.add_argument("--parallel", choices=PARALLEL, default="auto",
                        help="auto: Ray tasks inside a Ray job on a cluster larger than this machine, "
                             "else a process pool")
    parser.add_argument("--shared-scale", action="store_true",
                        help="one colour range across all stores' images of a figure (default: each its own)")
    parser.add_argument("--tokens", default=None, help="token positions Figs 2, 4, 5, 10 draw (0-6, 0,3,10-12, all)")
    args = parser.parse_args(argv)
    try:
        if args.parallel == "ray" or (args.parallel == "auto" and os.environ.get("RAY_ADDRESS")):
            from moe_ray.distributed.cluster import connect

            print(f"drawing on {connect()}")
        print(render(args.stores, args.out, args.parallel, args.shared_scale, args.tokens).summary())
    except MoeRayError as exc:
        print(f"moe-ray: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
