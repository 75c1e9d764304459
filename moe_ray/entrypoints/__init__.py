"""The Ray job entrypoints, modules of the installed package so that a cluster running the wheel (or
an image built from it) has them: `python -m moe_ray.entrypoints.analyze` (what `moe-ray submit` runs)
and `python -m moe_ray.entrypoints.plot`. (Not `moe_ray.jobs`: that name is the public function that
lists a cluster's moe-ray jobs.)
"""
