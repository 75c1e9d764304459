"""moe-ray: look inside Mixture-of-Experts language models (arXiv 2406.18219), at full scale, on Ray.

    import moe_ray
    store = moe_ray.run({"model": "ckpt/", "analyses": ["static"], "store": "out.zarr"})
    tree = moe_ray.open_results(store)   # xarray.DataTree: static, reorder/<mode>, dynamic/<input>
"""
__version__ = "0.1.0"

from .api import run  # noqa: E402
from .service import JobHandle, jobs, submit  # noqa: E402
from .spec import Spec  # noqa: E402
from .store import open_results  # noqa: E402

__all__ = ["JobHandle", "Spec", "__version__", "jobs", "open_results", "run", "submit"]
__all__ += ["plot"]


def plot(stores: "str | list[str]", out: str = "report", parallel: str = "auto") -> "Path":
    """Figures and tables of the paper from one or several stores -> path of `out/index.html`
    (see `moe_ray.plotting`; imported lazily so Ray workers never load matplotlib). `parallel`:
    "auto" (Ray tasks when this process has a Ray session, else a process pool), "ray",
    "processes" or "none"."""
    from .plotting import plot as _plot

    return _plot(stores, out, parallel)
