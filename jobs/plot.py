"""Ray job entrypoint: render the report for one or several stores.

    ray job submit --working-dir . -- python jobs/plot.py STORE [STORE ...] --out DIR
"""
from __future__ import annotations

import argparse
import sys

from moe_ray.errors import MoeRayError
from moe_ray.plotting import plot


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="figures and tables of the paper from moe-ray stores")
    parser.add_argument("stores", nargs="+", help="results stores (several: side by side)")
    parser.add_argument("--out", required=True, help="directory for index.html, figures/ and tables/")
    args = parser.parse_args(argv)
    try:
        print(f"wrote {plot(args.stores, args.out)}")
    except MoeRayError as exc:
        print(f"moe-ray: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
