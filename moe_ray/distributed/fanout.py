"""Fan work units out as Ray tasks, with declared resources, bounded retries and a progress bar.

A unit is any picklable callable's argument tuple plus what it asks of Ray (CPUs, GPUs, memory); the
unit function writes its own results into the store and returns a short summary dict for the log.
Nothing here knows what a unit computes.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import MoeRayError
from ..progress import counter
from .placement import GPU_MEMORY, Resources

log = logging.getLogger("moe_ray")


@dataclass(frozen=True)
class Unit:
    """One task: a label for logs, the function's arguments, and what it takes.

    `cpus`, `gpus` (a fraction shares a GPU with other tasks) and `memory_bytes` (host) are asked of
    Ray; `gpu_memory_bytes` is what it needs on its GPU, which Ray does not count (see
    `distributed.placement`). `cells` is how many done flags the unit sets (a batch of reorder pairs
    sets one per pair): progress counts those, not tasks.
    """

    label: str
    args: tuple
    memory_bytes: int
    cpus: float = 1
    gpus: float = 0
    gpu_memory_bytes: int = 0
    cells: int = 1

    def resources(self) -> Resources:
        """What the unit asks for, as a placement bundle (GPU memory beside its GPUs)."""
        out: Resources = {"CPU": self.cpus, "memory": max(1, self.memory_bytes)}
        if self.gpus:
            out.update({"GPU": self.gpus, GPU_MEMORY: self.gpu_memory_bytes})
        return out


def first_line(exc: BaseException) -> str:
    """An exception's message as one line (Ray's carry tracebacks and hints on later lines)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _unwrap(exc: BaseException) -> BaseException:
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


def run_units(fn: Callable[..., dict], units: Sequence[Unit], *, what: str, max_retries: int = 3,
              progress: bool = True, cell_name: str = "unit") -> list[dict[str, Any]]:
    """Run `fn(*unit.args)` for every unit as a Ray task with the unit's resources; returns their
    summaries in unit order.

    Tasks that die with their worker are retried up to `max_retries` times by Ray; an error raised by
    the unit itself (bad data) is not retried and fails the run with that error. A task with GPUs
    runs in a worker of its own that exits after it (Ray's default for GPU tasks: the GPU memory is
    released, and a worker never computes on a GPU it was not given). A summary's `note` (e.g. a
    unit that was given a GPU torch cannot see) is said once per run, not once per unit. The
    progress counter (`moe_ray.progress`) counts the units' `cells` (done flags), named `cell_name`;
    each unit's own summary goes to the `moe_ray` logger (debug), not the terminal or the job's log.
    """
    if not units:
        return []
    import ray  # here, not at the top: a unit function can run (and be checked) where Ray is not installed

    on_cpu, on_gpu = ray.remote(fn), ray.remote(max_calls=1)(fn)
    refs = {}
    for i, unit in enumerate(units):
        remote = on_gpu if unit.gpus else on_cpu
        ref = remote.options(num_cpus=unit.cpus, num_gpus=unit.gpus, memory=max(1, unit.memory_bytes),
                             max_retries=max_retries, retry_exceptions=False,
                             name=f"moe-ray {unit.label}").remote(*unit.args)
        refs[ref] = i
    results: list[dict[str, Any] | None] = [None] * len(units)
    started = time.monotonic()
    bar = counter(sum(u.cells for u in units), what, cell_name, progress)
    said: set[str] = set()
    pending = list(refs)
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for ref in ready:
                unit = units[refs[ref]]
                try:
                    summary = ray.get(ref)
                except ray.exceptions.RayTaskError as exc:
                    cause = _unwrap(exc)
                    if isinstance(cause, MoeRayError):
                        raise type(cause)(f"{unit.label}: {cause}") from None
                    raise MoeRayError(f"{unit.label} failed: {type(cause).__name__}: {cause}") from None
                except ray.exceptions.RayError as exc:
                    raise MoeRayError(f"{unit.label} failed after {max_retries} retries: {first_line(exc)}") from None
                results[refs[ref]] = summary
                note = summary.get("note")
                if note and note not in said:
                    said.add(note)
                    if progress:
                        bar.note(f"{what}: {note}")
                    else:
                        log.warning("moe-ray: %s: %s", what, note)
                bar.update(unit.cells)
                log.debug("%s: %s", unit.label, summary.get("log", "done"))
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    finally:
        bar.close()
    elapsed = time.monotonic() - started
    for r in results:
        r.setdefault("elapsed_total", elapsed)
    return results  # type: ignore[return-value]
