"""The Ray job entrypoints, modules of the installed package so that a cluster running the wheel (or
an image built from it) has them: `python -m moe_ray.jobs.analyze` (what `moe-ray submit` runs) and
`python -m moe_ray.jobs.plot`.

`moe_ray.jobs` is also the public function that lists a cluster's moe-ray jobs (`moe_ray.service.jobs`).
Importing this package rebinds the name `moe_ray.jobs` to it (Python sets a subpackage as an attribute
of its parent), so the package is made callable as that function: `moe_ray.jobs(address)` lists the
jobs whichever of the two a process met first.
"""
from __future__ import annotations

import sys
import types


class _JobsPackage(types.ModuleType):
    def __call__(self, address: str | None = None, headers: dict[str, str] | None = None):
        from ..service import jobs

        return jobs(address, headers)


sys.modules[__name__].__class__ = _JobsPackage
