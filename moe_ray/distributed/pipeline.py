"""Layer-shard pipelines on Ray (design §6): a placement group with one bundle per shard, one actor
per bundle, and items flowing actor to actor as object refs, several in flight at once.

Nothing here knows what a shard computes: the actor class and its constructor arguments come from
the caller (`units.dynamic`).

Faults. A shard actor whose process dies is restarted by Ray (`MAX_RESTARTS`) and its unfinished
calls retried. A shard whose node is lost is a different event: Ray holds the actor until its
placement-group bundle can be placed again, which may be never (STRICT_SPREAD on the nodes left), so
the pipeline watches the nodes of its bundles itself. It says in one line which shard lost which node,
waits up to `node_wait_s` for the cluster to hold the shard again (a node that comes back or joins),
then runs the unfinished items again, or raises `ShardLost` for the caller to re-plan or give up.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ..errors import MoeRayError, SpecError
from ..spec import DynamicOptions
from .fanout import _unwrap, first_line

READY_TIMEOUT_S = 600
"""How long the first placement of a pipeline's shards may take (busy resources, nodes joining)."""
READY_NOTICE_S = 10
"""After this long waiting for a placement, say so (once)."""
MAX_RESTARTS = 1
"""How often a shard actor whose process dies is restarted, and its unfinished calls retried."""
POLL_S = 0.5
"""How often the nodes holding the shards are checked while items are in flight."""

Notify = Callable[[str], None]
OnStep = Callable[[int, str], None]
"""Called with (shard index, item name) each time a shard has finished an item (progress)."""


def say(line: str) -> None:
    """One line for the user, on stderr (events such as a lost node, whatever the progress setting)."""
    print(f"moe-ray: {line}", file=sys.stderr, flush=True)


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


class ShardLost(MoeRayError):
    """A shard's node was lost and the cluster did not hold the shard again within `node_wait_s`.

    `finished` holds the outputs of the items that had gone through every shard before.
    """

    def __init__(self, label: str, node: str, node_id: str, waited_s: float, finished: dict[str, Any]):
        self.label, self.node, self.node_id, self.waited_s, self.finished = label, node, node_id, waited_s, finished
        super().__init__(f"{label} lost its node {node} and the cluster did not hold it again within "
                         f"{waited_s:g} s (node_wait_s)")


class PlacementTimeout(SpecError):
    """The shards' placement group was not placed in time."""


@dataclass
class _Loss:
    """Why a pipeline pass stopped: shard `shard` lost its node (or stopped answering)."""

    shard: int
    node: str  # "10.0.0.2 (node 1a2b3c4d)"
    node_id: str
    line: str


def _ask_gcs(query: Callable[[], Any], default: Any) -> Any:
    """A state query to Ray's GCS, or `default` while it cannot answer (a head restarting under GCS
    fault tolerance): the watch then learns nothing new this round, it does not fail the job."""
    try:
        return query()
    except Exception:  # RpcError, TimeoutError, ... while the GCS is away
        return default


def _node_names() -> dict[str, tuple[bool, str]] | None:
    """node id (hex) -> (alive, IP) for every node the cluster has known; None if the GCS is away."""
    nodes = _ask_gcs(ray.nodes, None)
    return None if nodes is None else {n["NodeID"]: (bool(n.get("Alive")), n.get("NodeManagerAddress", "?"))
                                       for n in nodes}


def _node_label(node_id: str, nodes: dict[str, tuple[bool, str]] | None) -> str:
    return f"{(nodes or {}).get(node_id, (False, '?'))[1]} (node {node_id[:8]})"


def _alive(node_id: str, nodes: dict[str, tuple[bool, str]] | None) -> bool:
    return bool(nodes) and nodes.get(node_id, (False, ""))[0]


def _actor_info(actor) -> dict:
    return _ask_gcs(lambda: ray._private.state.actors(actor._actor_id.hex()), None) or {}


class _Shards:
    """The actors of one pipeline in their placement group, and the nodes their bundles sit on."""

    def __init__(self, actor_cls: type, ctor_args: Sequence[tuple], bundles: Sequence[dict[str, float]],
                 strategy: str, labels: list[str], notify: Notify, place_timeout_s: float):
        self.ctor_args, self.bundles, self.labels = list(ctor_args), list(bundles), labels
        self.remote_cls = ray.remote(actor_cls)
        self.pg = placement_group(self.bundles, strategy=strategy)
        try:
            self._wait_placed(strategy, notify, place_timeout_s)
        except BaseException:
            remove_placement_group(self.pg)
            raise
        self.actors = [self._actor(i) for i in range(len(self.bundles))]
        self.homes = self._bundle_nodes()
        self.restarts = [0] * len(self.actors)  # each actor's restarts when last seen well

    def _wait_placed(self, strategy: str, notify: Notify, timeout_s: float) -> None:
        ready, _ = ray.wait([self.pg.ready()], timeout=min(READY_NOTICE_S, timeout_s))
        if ready:
            return
        if timeout_s > READY_NOTICE_S:
            from .placement import describe

            notify(f"waiting for the cluster to place {len(self.bundles)} shard(s) ({strategy}, "
                   f"{describe(self.bundles[0])} each; resources busy or nodes still joining), up to "
                   f"{timeout_s:g} s")
            ready, _ = ray.wait([self.pg.ready()], timeout=timeout_s - READY_NOTICE_S)
        if not ready:
            raise PlacementTimeout(f"the cluster did not place {len(self.bundles)} shard(s) of "
                                   f"{self.bundles[0]} each ({strategy}) within {timeout_s:g} s; "
                                   "lower shards or add resources")

    def _actor(self, i: int):
        b = self.bundles[i]
        return self.remote_cls.options(
            num_cpus=b.get("CPU", 1), num_gpus=b.get("GPU", 0), memory=b.get("memory"),
            max_restarts=MAX_RESTARTS, max_task_retries=MAX_RESTARTS,
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i),
        ).remote(*self.ctor_args[i])

    def _bundle_nodes(self) -> list[str]:
        placed = _ask_gcs(lambda: placement_group_table(self.pg), {}).get("bundles_to_node_id", {})
        return [placed.get(i, "") for i in range(len(self.bundles))]

    def shard_of(self, actor_id: str | None) -> int | None:
        return next((i for i, a in enumerate(self.actors) if a._actor_id.hex() == actor_id), None)

    def lost_node(self) -> _Loss | None:
        """The first shard whose node the cluster no longer counts as alive."""
        nodes = _node_names()
        if nodes is None:
            return None
        for i, node in enumerate(self.homes):
            if node and not _alive(node, nodes):
                where = _node_label(node, nodes)
                return _Loss(i, where, node, f"{self.labels[i]} lost its node {where}")
        return None

    def unreachable(self, shard: int, exc: BaseException) -> _Loss:
        """A call to shard `shard` failed because its actor is gone or cannot be reached."""
        nodes = _node_names()
        node = self.homes[shard]
        where = _node_label(node, nodes)
        if _alive(node, nodes):
            line = f"{self.labels[shard]} on node {where} stopped answering ({type(exc).__name__})"
        else:
            line = f"{self.labels[shard]} lost its node {where}"
        return _Loss(shard, where, node, line)

    def recovered(self, loss: _Loss) -> bool:
        """Whether every shard is placed and alive again, the lost one restarted since; a shard actor
        that Ray gave up on (no restarts left) is created anew once its bundle is placed again."""
        if _ask_gcs(lambda: placement_group_table(self.pg), {}).get("state") != "CREATED":
            return False
        nodes = _node_names()
        if nodes is None:
            return False
        ok, restarts = True, []
        for i, actor in enumerate(self.actors):
            info = _actor_info(actor)
            state = info.get("State")
            restarts.append(info.get("NumRestarts", 0))
            if state == "DEAD":
                self.actors[i] = self._actor(i)
                self.restarts[i] = -1  # a new actor: alive at all is a recovery
                ok = False
            elif state != "ALIVE" or not _alive(info.get("Address", {}).get("NodeID", ""), nodes):
                ok = False
            elif i == loss.shard and info.get("NumRestarts", 0) <= self.restarts[i] and \
                    info.get("Address", {}).get("NodeID") == self.homes[i]:
                ok = False  # still the actor that stopped answering, on the node it was lost on
        if ok:
            self.homes, self.restarts = self._bundle_nodes(), restarts
        return ok

    def close(self, wait: bool = True) -> None:
        """Kill the actors (waiting, with `wait`, until Ray reports them dead: one on a live node may
        still be writing) and remove the placement group."""
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        deadline = time.monotonic() + (30 if wait else 0)
        while time.monotonic() < deadline:
            if all(_actor_info(a).get("State") in ("DEAD", None) for a in self.actors):
                break
            time.sleep(0.1)
        remove_placement_group(self.pg)


def run_pipeline(actor_cls: type, ctor_args: Sequence[tuple], bundles: Sequence[dict[str, float]],
                 items: Sequence[tuple[str, Any]], method: str = "run", strategy: str = "PACK",
                 labels: Sequence[str] | None = None, node_wait_s: float = DynamicOptions.node_wait_s,
                 notify: Notify = say, place_timeout_s: float = READY_TIMEOUT_S,
                 on_step: OnStep | None = None) -> dict[str, Any]:
    """Create one actor per shard in a placement group with `strategy` (PACK: as few nodes as fit;
    STRICT_SPREAD: one node per shard), push every item through the shards in order, return
    {name: last output}.

    Each item is (name, first shard's input); shard i's `method(name, value)` output goes to shard
    i+1 as an object ref, so all items are in flight at once and every shard stays busy. A shard
    whose process dies is restarted (its constructor runs again) and its unfinished calls are
    retried, `MAX_RESTARTS` times; after that, or on an error raised by the shard itself, the run
    fails with one line naming the shard (`labels[i]`, default "shard i"). A shard whose node is lost
    is reported through `notify` at once; when the cluster holds it again within `node_wait_s` the
    unfinished items run again from the first shard (a shard's method must be idempotent), else
    `ShardLost` is raised. The shards must be placed within `place_timeout_s`, else `PlacementTimeout`.
    `on_step(shard, name)` is told each time a shard has finished an item (an item that starts over
    after a lost node is told again).
    """
    if not items:
        return {}
    labels = list(labels) if labels is not None else [f"shard {i}" for i in range(len(bundles))]
    shards = _Shards(actor_cls, ctor_args, bundles, strategy, labels, notify, place_timeout_s)
    finished: dict[str, Any] = {}
    try:
        todo = list(items)
        while todo:
            loss = _run_items(shards, todo, method, finished, on_step)
            if loss is None:
                break
            notify(f"{loss.line}; waiting up to {node_wait_s:g} s (node_wait_s) for the cluster to hold it again")
            started = time.monotonic()
            while not shards.recovered(loss):
                if time.monotonic() - started > node_wait_s:
                    raise ShardLost(labels[loss.shard], loss.node, loss.node_id, node_wait_s, dict(finished))
                time.sleep(POLL_S)
            todo = [item for item in items if item[0] not in finished]
            nodes = _node_names()
            notify(f"{labels[loss.shard]} runs again, on node {_node_label(shards.homes[loss.shard], nodes)}, "
                   f"{time.monotonic() - started:.0f} s later; {len(todo)} unfinished input(s) start over")
        return finished
    finally:
        failure = sys.exc_info()[1]  # SIGINT/SIGTERM (a BaseException): no waiting, the driver is leaving
        shards.close(wait=failure is None or isinstance(failure, Exception))


def _run_items(shards: _Shards, items: Sequence[tuple[str, Any]], method: str,
               finished: dict[str, Any], on_step: OnStep | None = None) -> _Loss | None:
    """One pass of `items` through the shards; their outputs go into `finished`. Returns the loss
    that stopped the pass (its unfinished calls cancelled), or None when every item got through."""
    calls: dict[str, list] = {}
    for name, value in items:
        ref, chain = value, []
        for actor in shards.actors:
            ref = getattr(actor, method).remote(name, ref)
            chain.append(ref)
        calls[name] = chain
    pending = {chain[-1]: name for name, chain in calls.items()}
    steps = {ref: (shard, name) for name, chain in calls.items() for shard, ref in enumerate(chain)} if on_step else {}
    labels = {a._actor_id.hex(): label for a, label in zip(shards.actors, shards.labels)}
    loss = None
    while pending and loss is None:
        ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=POLL_S)
        if steps:  # which shards finished which items since the last look (a ready ref may hold an error)
            done_steps, _ = ray.wait(list(steps), num_returns=len(steps), timeout=0, fetch_local=False)
            for ref in sorted(done_steps, key=lambda r: steps[r]):
                on_step(*steps.pop(ref))
        for ref in ready:
            name = pending.pop(ref)
            try:
                finished[name] = ray.get(ref)
            except ray.exceptions.RayActorError as exc:
                shard = shards.shard_of(exc.actor_id)
                if shard is None or (_actor_info(shards.actors[shard]).get("State") == "DEAD"
                                     and _alive(shards.homes[shard], _node_names())):
                    raise shard_failure(exc, labels) from None  # died for good on a live node
                pending[ref] = name  # started over below with the others
                loss = loss or shards.unreachable(shard, exc)
            except ray.exceptions.RayError as exc:
                raise shard_failure(exc, labels) from None
        if loss is None and pending:
            loss = shards.lost_node()
    if loss is not None:
        for name in pending.values():
            for ref in calls[name]:
                try:
                    ray.cancel(ref)
                except Exception:  # already finished or failed: nothing to cancel
                    pass
    return loss


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
