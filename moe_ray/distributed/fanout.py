"""Fan work units out as Ray tasks, with declared resources, bounded retries and a progress bar.

A unit is any picklable callable's argument tuple; the unit function writes its own results into
the store and returns a short summary dict for the log. Nothing here knows what a unit computes.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import ray
from tqdm.auto import tqdm

from ..errors import MoeRayError


@dataclass(frozen=True)
class Unit:
    """One task: a label for logs and progress, the function's arguments, the memory it needs."""

    label: str
    args: tuple
    memory_bytes: int


def first_line(exc: BaseException) -> str:
    """An exception's message as one line (Ray's carry tracebacks and hints on later lines)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _unwrap(exc: BaseException) -> BaseException:
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


def run_units(fn: Callable[..., dict], units: Sequence[Unit], *, what: str, cpus_per_task: int = 1,
              max_retries: int = 3, progress: bool = True) -> list[dict[str, Any]]:
    """Run `fn(*unit.args)` for every unit as a Ray task; returns their summaries in unit order.

    Tasks that die with their worker are retried up to `max_retries` times by Ray; an error raised by
    the unit itself (bad data) is not retried and fails the run with that error.
    """
    if not units:
        return []
    remote = ray.remote(fn)
    refs = {}
    for i, unit in enumerate(units):
        ref = remote.options(num_cpus=cpus_per_task, memory=max(1, unit.memory_bytes),
                             max_retries=max_retries, retry_exceptions=False,
                             name=f"moe-ray {unit.label}").remote(*unit.args)
        refs[ref] = i
    results: list[dict[str, Any] | None] = [None] * len(units)
    started = time.monotonic()
    bar = tqdm(total=len(units), desc=what, unit="unit", disable=not progress, dynamic_ncols=True)
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
                bar.update(1)
                if progress:
                    bar.write(f"  {unit.label}: {summary.get('log', 'done')}")
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
