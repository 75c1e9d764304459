"""Will the work fit the cluster? Every analysis states what it asks of Ray (a `Demand`: the resources
of its tasks, or of its placement group's bundles); before anything runs, and before a job is even
submitted, the demands are compared with the resources of the cluster's nodes, and work that no
placement could ever hold is refused with the numbers.

Only necessary conditions are checked, so nothing placeable is refused: a bundle that no single node
holds, more resources at once than the whole cluster has, and STRICT_SPREAD bundles that cannot each
get a node of their own. The nodes are the cluster's as it is now: a cluster that adds nodes on demand
(an autoscaler with workers at zero) must be submitted to with the check off (`check_fit = false`).

GPU memory is not a Ray resource: Ray counts GPUs, not their memory, and nodes do not report it. A
task says how much it needs on its GPU (`GPU_MEMORY` in its bundle), and the spec may say how much
each GPU has (`gpu_memory_gb`, a `Demand`'s `gpu_memory_per_gpu`). With that known, a task asks for
its share of a GPU (`gpus_for`), so Ray never puts more tasks on a GPU than its memory holds, and a
task that no GPU could hold is refused here; either way the task compares its need with its GPU's
real memory when it starts (`units.job`), the one place the cluster tells it.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..errors import SpecError

Resources = dict[str, float]
"""Ray resources by name (CPU, GPU, memory in bytes, custom ones), as a bundle or a node's total."""
EACH = "EACH"
"""Strategy of independent tasks: each bundle needs one node that holds it, not all at once."""
GIB = 2**30
GPU_MEMORY = "gpu_memory"
"""Bytes a bundle needs on its GPU: carried beside Ray's resources, never asked of Ray."""
GPU_FRACTION_STEP = 1e-4
"""Ray's resolution for fractional resources."""


def gpus_for(gpu_memory_bytes: int, gpus_per_task: float | None, gpu_memory_per_gpu: float | None) -> float:
    """GPUs a task asks Ray for: the spec's `gpus_per_task`, else its GPU memory's share of a GPU when
    the GPUs' memory is known (rounded up to Ray's step, at most one GPU), else a whole GPU."""
    if gpus_per_task is not None:
        return gpus_per_task
    if gpu_memory_per_gpu:
        share = math.ceil(gpu_memory_bytes / gpu_memory_per_gpu / GPU_FRACTION_STEP) * GPU_FRACTION_STEP
        return min(1.0, max(GPU_FRACTION_STEP, round(share, 4)))
    return 1.0


@dataclass(frozen=True)
class Demand:
    """What one analysis asks of the cluster.

    `bundles` are (label, resources); with strategy `EACH` they are independent tasks (one at a time
    is enough to make progress), with PACK, SPREAD or STRICT_SPREAD one placement group holding all
    of them at once. `alongside` is what holds resources for as long as the work runs (a submitted
    job's driver).
    """

    what: str
    bundles: tuple[tuple[str, Resources], ...]
    strategy: str = EACH
    alongside: Resources = field(default_factory=dict)
    gpu_memory_per_gpu: float | None = None
    """Bytes of memory each GPU has (the spec's gpu_memory_gb), when known."""


def _amount(name: str, amount: float) -> str:
    if name == "memory":
        return f"{amount / GIB:.1f} GiB of memory"
    if name == GPU_MEMORY:
        return f"{amount / GIB:.1f} GiB of GPU memory"
    return f"{amount:g} {name}"


def describe(resources: Resources, keep_zero: bool = False) -> str:
    """'1 CPU, 2 GPU, 3.5 GiB of memory': resources as a person reads them (zero ones left out unless
    `keep_zero`)."""
    ordered = sorted(resources.items(), key=lambda kv: (kv[0] in ("memory", GPU_MEMORY), kv[0] == GPU_MEMORY, kv[0]))
    return ", ".join(_amount(n, a) for n, a in ordered if a > 0 or keep_zero) or "nothing"


def _ray_resources(bundle: Resources) -> Resources:
    return {name: amount for name, amount in bundle.items() if name != GPU_MEMORY}


def _holds(node: Resources, bundle: Resources) -> bool:
    return all(node.get(name, 0) >= amount for name, amount in _ray_resources(bundle).items() if amount > 0)


def _bundle_refusal(demand: Demand, nodes: Sequence[Resources]) -> str | None:
    """A bundle that no single node of the cluster can hold."""
    for label, bundle in demand.bundles:
        if any(_holds(node, bundle) for node in nodes):
            continue
        bundle = _ray_resources(bundle)
        most = {name: max((node.get(name, 0) for node in nodes), default=0) for name in bundle}
        short = {name: amount for name, amount in bundle.items() if amount > most[name]}
        if short:
            return (f"{label} needs {describe(bundle)} on one node, but no node of the cluster has "
                    f"{describe(short)}: the most one node offers is "
                    f"{describe({name: most[name] for name in short}, keep_zero=True)}")
        return (f"{label} needs {describe(bundle)} on one node, but no node of the cluster has all of "
                f"that at once ({len(nodes)} nodes)")
    return None


def _at_once(demand: Demand) -> Resources:
    """What must be held at one time, per resource: every bundle of a placement group, or any one of
    independent tasks (so the most any of them asks), plus what runs alongside."""
    combine = max if demand.strategy == EACH else sum
    names = {name for _, bundle in demand.bundles for name in _ray_resources(bundle)} | set(demand.alongside)
    return {name: combine(b.get(name, 0) for _, b in demand.bundles) + demand.alongside.get(name, 0)
            for name in names} if demand.bundles else dict(demand.alongside)


def _total_refusal(demand: Demand, nodes: Sequence[Resources]) -> str | None:
    """More of a resource at once than the whole cluster has."""
    need = _at_once(demand)
    have = {name: sum(node.get(name, 0) for node in nodes) for name in need}
    short = {name: amount for name, amount in need.items() if amount > have[name]}
    if not short:
        return None
    parts = f"{len(demand.bundles)} bundles together" if demand.strategy != EACH else "its largest task"
    with_driver = " with the job's driver" if demand.alongside else ""
    return (f"{demand.what} needs {describe(short)} at once ({parts}{with_driver}), but the whole "
            f"cluster has {describe({name: have[name] for name in short}, keep_zero=True)}")


def _distinct_nodes(bundles: Sequence[Resources], nodes: Sequence[Resources]) -> int:
    """How many of the bundles can sit on distinct nodes at once (maximum bipartite matching)."""
    holder: dict[int, int] = {}  # node index -> bundle index

    def place(b: int, tried: set[int]) -> bool:
        for n, node in enumerate(nodes):
            if n in tried or not _holds(node, bundles[b]):
                continue
            tried.add(n)
            if n not in holder or place(holder[n], tried):
                holder[n] = b
                return True
        return False

    return sum(place(b, set()) for b in range(len(bundles)))


def _spread_refusal(demand: Demand, nodes: Sequence[Resources]) -> str | None:
    """STRICT_SPREAD bundles that cannot each have a node of their own."""
    if demand.strategy != "STRICT_SPREAD":
        return None
    bundles = [b for _, b in demand.bundles]
    placed = _distinct_nodes(bundles, nodes)
    if placed >= len(bundles):
        return None
    return (f"{demand.what} puts each of its {len(bundles)} bundles on a node of its own (STRICT_SPREAD), "
            f"but only {placed} of the cluster's {len(nodes)} nodes can hold one at the same time")


def _gpu_memory_refusal(demand: Demand) -> str | None:
    """A task needing more memory on its GPU than its share of a GPU has (when the GPUs' memory is known)."""
    per_gpu = demand.gpu_memory_per_gpu
    if not per_gpu:
        return None
    for label, bundle in demand.bundles:
        need, gpus = bundle.get(GPU_MEMORY, 0), bundle.get("GPU", 0)
        if not need or not gpus:
            continue
        share = min(1.0, gpus) * per_gpu
        if need > share:
            of = "a whole GPU" if gpus >= 1 else f"{gpus:g} of a GPU ({share / GIB:.1f} GiB)"
            return (f"{label} needs {need / GIB:.1f} GiB of GPU memory, but it asks for {of} of "
                    f"{per_gpu / GIB:.1f} GiB (gpu_memory_gb)")
    return None


def refusal(demand: Demand, nodes: Sequence[Resources]) -> str | None:
    """Why `demand` can never be placed on `nodes` (their total resources), or None if it may be."""
    return (_bundle_refusal(demand, nodes) or _gpu_memory_refusal(demand) or _spread_refusal(demand, nodes)
            or _total_refusal(demand, nodes))


def check_placement(demands: Sequence[Demand], nodes: Sequence[Resources], where: str = "the cluster") -> None:
    """Refuse, with the numbers, the first demand that can never be placed on `nodes`."""
    for demand in demands:
        reason = refusal(demand, nodes)
        if reason:
            raise SpecError(f"{reason}. It cannot run on {where}: change the spec's resources (or shards), "
                            "add nodes, or, if the cluster adds nodes on demand, set check_fit = false "
                            "(--no-check-fit)")


NODE_REPORT_WAIT_S = 30.0
"""How long the fit check waits for nodes that have joined but not yet reported their resources."""
NODE_REPORT_POLL_S = 1.0


def unreported(nodes: Sequence[Resources]) -> int:
    """How many of `nodes` have not reported their resources yet (no CPU, GPU or memory at all: a
    node that just joined); an empty cluster counts as one such node."""
    if not nodes:
        return 1
    return sum(1 for node in nodes if not any(node.get(name, 0) > 0 for name in ("CPU", "GPU", "memory")))


def reported_nodes(read_nodes: Callable[[], list[Resources]], where: str = "the cluster",
                   wait_s: float = NODE_REPORT_WAIT_S, poll_s: float = NODE_REPORT_POLL_S,
                   say: Callable[[str], None] | None = None) -> list[Resources]:
    """The nodes' resources for the fit check, once every node has reported them: a just-started
    cluster (its nodes alive, their resources not yet known) is read again every `poll_s` for up to
    `wait_s` seconds, saying so once, so that it is not refused for "0 CPU"; after that, the nodes as
    they are (the check then refuses with the numbers it has)."""
    nodes = read_nodes()
    deadline = time.monotonic() + wait_s
    told = False
    while unreported(nodes) and time.monotonic() < deadline:
        if not told:
            (say or _say)(f"{where}: {unreported(nodes)} of {max(1, len(nodes))} node(s) have not reported their "
                          f"resources yet; waiting up to {wait_s:g} s for them before checking that the work fits")
            told = True
        time.sleep(poll_s)
        nodes = read_nodes()
    return nodes


def _say(line: str) -> None:
    print(f"moe-ray: {line}", flush=True)


__all__ = ["EACH", "GPU_MEMORY", "Demand", "Resources", "check_placement", "describe", "gpus_for", "refusal",
           "reported_nodes", "unreported"]
