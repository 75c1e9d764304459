"""moe-ray: look inside Mixture-of-Experts language models (arXiv 2406.18219), at full scale, on Ray.

    import moe_ray
    store = moe_ray.run({"model": "ckpt/", "analyses": ["static"], "store": "out.zarr"})
    tree = moe_ray.open_results(store)   # xarray.DataTree: static, reorder/<mode>, dynamic/<input>
"""
from importlib.metadata import PackageNotFoundError, version as _distribution_version

try:
    __version__ = _distribution_version("moe-ray")
    """The installed distribution's version: pyproject.toml's `version`, the one place it is written."""
except PackageNotFoundError:  # a source tree on sys.path without an install (a job's shipped py_modules)
    __version__ = "0+unknown"

_PUBLIC = {"run": ".api", "JobHandle": ".service", "jobs": ".service", "submit": ".service", "Spec": ".spec",
           "open_results": ".store"}
"""Public names and the module each lives in, imported on first use: `import moe_ray.plotting` (a plot
job, a drawing task) and `moe-ray plot` never load torch or Ray."""

__all__ = ["JobHandle", "Spec", "__version__", "jobs", "open_results", "plot", "run", "submit"]


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'moe_ray' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_PUBLIC[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))


def plot(stores: "str | list[str]", out: str = "report", parallel: str = "auto", shared_scale: bool = False,
         tokens: "list[int] | str | None" = None, progress: bool = True) -> "Path":
    """Figures and tables of the paper from one or several stores -> path of `out/index.html`
    (see `moe_ray.plotting`; imported lazily so Ray workers never load matplotlib). `parallel`:
    "auto" (Ray tasks on a cluster larger than this machine, else a process pool), "ray", "processes"
    or "none"; `shared_scale`: one colour range across the stores' images (default: each model its own);
    `tokens`: the dynamic inputs' token positions Figs 2, 4, 5 and 10 show ("0-6", [0, 3], "all"; default
    each figure's first ones); `progress`: count the figures as they are drawn."""
    from .plotting import plot as _plot

    return _plot(stores, out, parallel, shared_scale, tokens, progress)
