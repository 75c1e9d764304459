"""Ray job entrypoint: run one moe-ray spec inside the cluster this job was submitted to.

`moe-ray submit` (`moe_ray.submit`) runs `python -m moe_ray.entrypoints.analyze --submitter-version V --spec
'<spec as JSON>'` with the cluster's own installed moe-ray (the wheel, or the image built from it); a TOML
path readable on the head works too. With `--submitter-version` the job first checks that the moe-ray it
imports is the submitter's version, and otherwise fails in one line before any work (a cluster of another
version would compute another store, or refuse the spec). All the work is `moe_ray.run` (design §1, §6).
`moe-ray stop` (Ray sends SIGTERM, then SIGKILL 3 s later) ends the log with one line: what finished, what did not,
how to resume; exit status 143.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import moe_ray
from moe_ray.errors import MoeRayError
from moe_ray.interrupt import emit, exit_status, handling_signals, progress_line


def check_version(submitter_version: str | None) -> None:
    """Refuse to run a job submitted by another moe-ray version than the one this job imports."""
    if submitter_version and submitter_version != moe_ray.__version__:
        raise MoeRayError(
            f"this cluster runs moe-ray {moe_ray.__version__} ({Path(moe_ray.__file__).parent}), the job was "
            f"submitted with moe-ray {submitter_version}: install the same wheel on both (cluster/README.md, "
            "\"The cluster's moe-ray\"), or submit with --ship-package")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a moe-ray spec as a Ray job.")
    parser.add_argument("--spec", required=True, help="the spec as a JSON object, or a TOML file on the head")
    parser.add_argument("--submitter-version", help="fail unless this job's moe-ray is this version")
    args = parser.parse_args(argv)
    print(f"moe-ray: this job runs moe-ray {moe_ray.__version__} from {Path(moe_ray.__file__).parent}",
          flush=True)  # which one runs
    try:
        check_version(args.submitter_version)
        if args.spec.lstrip().startswith("{"):
            spec = moe_ray.Spec.from_dict(json.loads(args.spec))
        else:
            spec = moe_ray.Spec.from_toml(args.spec)
        resume = "`moe-ray submit` of the same spec (only unfinished units run)"
        with handling_signals(lambda signame: progress_line(signame, spec.store, resume, spec.analyses)):
            store = moe_ray.run(spec)
    except MoeRayError as exc:
        print(f"moe-ray: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # `moe-ray stop` sends SIGTERM (moe_ray.interrupt)
        emit()  # the line describing it, taken when the signal came
        return exit_status()
    print(f"moe-ray: results in {store}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
