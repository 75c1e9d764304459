"""Layer-shard pipelines on Ray (design §6): a placement group with one bundle per shard, one actor
per bundle, and items flowing actor to actor as object refs, several in flight at once.

Nothing here knows what a shard computes: the actor class and its constructor arguments come from
the caller (`units.dynamic`).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ..errors import MoeRayError, SpecError
from .fanout import _unwrap, first_line

READY_TIMEOUT_S = 600
MAX_RESTARTS = 1
"""How often a shard actor whose process dies is restarted, and its unfinished calls retried."""


def balance_layers(sizes: Sequence[int], shards: int) -> list[tuple[int, int]]:
    """Split layers 0..n-1 into `shards` contiguous [start, end) ranges minimising the largest
    range's bytes (exact, by dynamic programming); `sizes[i]` is layer i's bytes."""
    n = len(sizes)
    if not 1 <= shards <= n:
        raise SpecError(f"cannot split {n} layers over {shards} shards (1 to {n} shards)")
    prefix = [0]
    for s in sizes:
        prefix.append(prefix[-1] + s)
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(shards + 1)]
    cut = [[0] * (n + 1) for _ in range(shards + 1)]
    best[0][0] = 0
    for k in range(1, shards + 1):
        for end in range(k, n + 1):
            for start in range(k - 1, end):
                cost = max(best[k - 1][start], prefix[end] - prefix[start])
                if cost < best[k][end]:
                    best[k][end], cut[k][end] = cost, start
    ranges, end = [], n
    for k in range(shards, 0, -1):
        start = cut[k][end]
        ranges.append((start, end))
        end = start
    return ranges[::-1]


def run_pipeline(actor_cls: type, ctor_args: Sequence[tuple], bundles: Sequence[dict[str, float]],
                 items: Sequence[tuple[str, Any]], method: str = "run", strategy: str = "PACK",
                 labels: Sequence[str] | None = None) -> dict[str, Any]:
    """Create one actor per shard in a placement group with `strategy` (PACK: as few nodes as fit;
    STRICT_SPREAD: one node per shard), push every item through the shards in order, return
    {name: last output}.

    Each item is (name, first shard's input); shard i's `method(name, value)` output goes to shard
    i+1 as an object ref, so all items are in flight at once and every shard stays busy. A shard
    whose process dies is restarted (its constructor runs again) and its unfinished calls are
    retried, `MAX_RESTARTS` times; after that, or on an error raised by the shard itself, the run
    fails with one line naming the shard (`labels[i]`, default "shard i").
    """
    if not items:
        return {}
    labels = list(labels) if labels is not None else [f"shard {i}" for i in range(len(bundles))]
    pg = placement_group(list(bundles), strategy=strategy)
    try:
        ready, _ = ray.wait([pg.ready()], timeout=READY_TIMEOUT_S)
        if not ready:
            raise SpecError(f"the cluster cannot place {len(bundles)} shard(s) of {bundles[0]} each; "
                            "lower shards or add resources")
        remote_cls = ray.remote(actor_cls)
        actors = [remote_cls.options(
            num_cpus=b.get("CPU", 1), num_gpus=b.get("GPU", 0), memory=b.get("memory"),
            max_restarts=MAX_RESTARTS, max_task_retries=MAX_RESTARTS,
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i),
        ).remote(*args) for i, (b, args) in enumerate(zip(bundles, ctor_args))]
        finals = {}
        for name, value in items:
            ref = value
            for actor in actors:
                ref = getattr(actor, method).remote(name, ref)
            finals[name] = ref
        try:
            return {name: ray.get(ref) for name, ref in finals.items()}
        except ray.exceptions.RayError as exc:
            shard_of = {actor._actor_id.hex(): label for actor, label in zip(actors, labels)}
            raise shard_failure(exc, shard_of) from None
        finally:
            for actor in actors:
                ray.kill(actor)
    finally:
        remove_placement_group(pg)


def shard_failure(exc: ray.exceptions.RayError, shard_of: dict[str, str]) -> MoeRayError:
    """One line for a failed pipeline: the shard's own error (its type kept for moe-ray errors), or
    which shard died for good; `shard_of` maps actor ids (hex) to shard labels."""
    if isinstance(exc, ray.exceptions.RayTaskError):
        cause = _unwrap(exc)
        if isinstance(cause, MoeRayError):
            return type(cause)(str(cause))
        return MoeRayError(f"shard actor failed: {type(cause).__name__}: {first_line(cause)}")
    if isinstance(exc, ray.exceptions.RayActorError):
        shard = shard_of.get(exc.actor_id or "", "a shard actor")
        return MoeRayError(
            f"{shard} died and was restarted {MAX_RESTARTS} time(s) (max_restarts), then died again: its "
            f"process was killed, ran out of memory or crashed; see `ray logs actor --id {exc.actor_id}`")
    return MoeRayError(f"shard pipeline failed: {first_line(exc)}")
