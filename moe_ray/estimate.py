"""How long a run takes: per analysis and in all, on the cluster `moe-ray plan` is given (nodes, GPUs
and cores per node), from rates the benchmarks measured. Each rate below names its source: the
benchmark, the machine and the date; where a rate is an upper bound (measured on a loaded machine) or
stands in for one not measured (a GPU's host-side solve), it says so. Rates move as the code does:
re-measure with the named benchmark and update the number and its source here, and nowhere else.
Reorder tasks are sized from the same rates (`analysis.reorder.pair_seconds`), so a task's planned
length and `moe-ray plan`'s times agree.

The model, per analysis (`units/sizing.py` sizes memory; this sizes time):
- static: one task per MoE layer, bound by its layer's bytes as stored; a CPU task takes one core,
  a GPU task one GPU's read;
- reorder: per assignment, the n×n similarity build (2·n²·d_hid·matrices FLOP, on a GPU where there
  is one) and the certified sparse solve on one host core (c·n²: it reads the costs a few times);
  joint mode solves one assignment per pair, separate mode three; pairs run on every core (CPU) or
  every GPU with the solves on the host cores beside them, whichever is slower;
- dynamic: every token through every layer's experts (all of them: the capture computes each
  expert's output), layer shards one after another (a pipeline holds one input at a time).

No torch here: `moe-ray plan` stays a config read.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .checkpoint.families import ModelFacts
    from .planning import ModelPlan


@dataclass(frozen=True)
class Rate:
    """A measured rate and where it comes from."""

    value: float
    unit: str
    source: str


RATES = {
    "static_cpu_s_per_gb": Rate(
        14.3, "s per GB of a layer's weights as stored, one CPU core",
        "bench_fullwidth, Mixtral 8x7B layer (2.82 GB bf16) in 40.3 s; 2-core dev machine, shared; 2026-11-29"),
    "static_gpu_s_per_gb": Rate(
        0.37, "s per GB of a layer's weights as stored, one GPU (warm page cache)",
        "gpu_check, Mixtral 8x7B layer in 1.03 s; one H200; 2026-11-29"),
    "build_cpu_flops": Rate(
        59e9, "FLOP/s of the reorder similarity build, one CPU core (float32 GEMM)",
        "bench_fullwidth, Mixtral pair n = 14,336: 5.05 TFLOP in 85 s; 2-core dev machine, shared; 2026-11-29"),
    "build_gpu_flops": Rate(
        4.6e12, "FLOP/s of the reorder similarity build on one GPU, copies included",
        "gpu_check, Mixtral pair n = 14,336: 5.05 TFLOP in 1.1 s; one H200; 2026-11-29"),
    "solve_s_at_4096": Rate(
        0.18, "s per assignment at n = 4,096 on one host core (certified sparse solver), grows as n²",
        "bench_reorder --quick, from-scratch experts (the slower structure): 1.37 s under load average ~30 "
        "where lapjv took 5.6 s in the same run, scaled to lapjv's 0.74 s on a quiet core; 2-core dev "
        "machine; 2026-12-06 (a second run: 0.58 s where lapjv took 5.3 s, i.e. 0.08 s quiet; n = 14,336 "
        "measured 13.3 s in the first run's conditions, consistent with n²)"),
    "read_gb_per_s": Rate(
        2.1, "GB/s reading a checkpoint from disk (cold page cache), one process",
        "bench_static, 1.06 GB of bf16 experts in 0.50 s; 2-core dev machine, otherwise idle; 2026-11-29"),
    "capture_cpu_flops": Rate(
        31e9, "expert FLOP/s of the dynamic capture pass (all experts of every token), one CPU thread",
        "bench_dynamic, Mixtral-style d_hid 256, 4 layers x 8 experts, 1,100 tokens at 1,249 tok/s; "
        "2-core dev machine; 2026-11-29"),
    "capture_gpu_flops": Rate(
        1.9e14, "expert FLOP/s of the dynamic capture pass on one GPU, bf16",
        "profile_dynamic, one Mixtral-width layer, 1,100 tokens in 16.5 ms; one H200; 2026-11-29"),
}
DYNAMIC_TOKENS = 1130
"""Tokens of a default dynamic run: the paper's short prompt and its long input cut at 1,100."""


@dataclass(frozen=True)
class Cluster:
    nodes: int
    gpus_per_node: int
    cores_per_node: int

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def cores(self) -> int:
        return self.nodes * self.cores_per_node


@dataclass(frozen=True)
class Estimate:
    """One analysis's time: its work in task-seconds and the wall time on the cluster."""

    analysis: str
    work: str
    """What one unit of work costs, in words."""
    wall_seconds: float


def _rate(name: str) -> float:
    return RATES[name].value


def static_estimate(facts: ModelFacts, layer_bytes: int, cluster: Cluster) -> Estimate:
    layers = len(facts.moe_layers)
    gb = layer_bytes / 1e9
    if cluster.gpus:
        per_layer = gb * _rate("static_gpu_s_per_gb")
        wall = -(-layers // cluster.gpus) * per_layer
        work = f"{layers} layers x {per_layer:.1f} s on a GPU"
    else:
        per_layer = gb * _rate("static_cpu_s_per_gb")
        wall = -(-layers // max(1, cluster.cores)) * per_layer
        work = f"{layers} layers x {per_layer:.0f} s on a core"
    return Estimate("static", work, wall)


def assignment_seconds(n: int, d_hid: int, matrices: int, on_gpu: bool) -> tuple[float, float]:
    """(build, solve) seconds of one assignment at n neurons over `matrices` of the three."""
    flops = 2.0 * n * n * d_hid * matrices
    build = flops / _rate("build_gpu_flops" if on_gpu else "build_cpu_flops")
    return build, _rate("solve_s_at_4096") * (n / 4096) ** 2


def reorder_estimate(facts: ModelFacts, cluster: Cluster, mode: str = "joint") -> Estimate:
    pairs = len(facts.moe_layers) * facts.num_experts * (facts.num_experts - 1) // 2
    solves, matrices = (1, 3) if mode == "joint" else (3, 1)
    build, solve = assignment_seconds(facts.d_mid, facts.d_hid, matrices, cluster.gpus > 0)
    problems = pairs * solves
    cores = max(1, cluster.cores)
    if cluster.gpus:
        wall = max(problems * build / cluster.gpus, problems * solve / cores)
        where = "GPU"
    else:
        wall = problems * (build + solve) / cores
        where = "core"
    work = (f"{problems:,} assignments at n = {facts.d_mid:,} x (build {_seconds(build)} on a {where} + "
            f"solve {_seconds(solve)} on a core)")
    return Estimate(f"reorder ({mode})", work, wall)


def dynamic_estimate(facts: ModelFacts, model_bytes: int, cluster: Cluster, tokens: int = DYNAMIC_TOKENS) -> Estimate:
    """Loading the weights (every GPU, or every node without GPUs, reads its shards at once), then
    the tokens through every layer's experts, shard after shard."""
    per_token_layer = 2.0 * 3 * facts.d_hid * facts.d_mid * facts.num_experts
    flops = per_token_layer * len(facts.moe_layers) * tokens
    rate = _rate("capture_gpu_flops" if cluster.gpus else "capture_cpu_flops")
    readers = cluster.gpus or cluster.nodes
    load = model_bytes / 1e9 / _rate("read_gb_per_s") / max(1, readers)
    where = "GPUs" if cluster.gpus else "a core per shard"
    return Estimate("dynamic", f"load {_seconds(load)}, then {tokens:,} tokens x {len(facts.moe_layers)} MoE layers, "
                    f"{flops / 1e12:.1f} TFLOP of experts on {where}, one shard after another",
                    load + flops / rate)


def estimates(facts: ModelFacts, layer_bytes: int, model_bytes: int, cluster: Cluster) -> list[Estimate]:
    return [static_estimate(facts, layer_bytes, cluster), reorder_estimate(facts, cluster, "joint"),
            reorder_estimate(facts, cluster, "separate"), dynamic_estimate(facts, model_bytes, cluster)]


def _seconds(s: float) -> str:
    if s < 1:
        return f"{s * 1000:.0f} ms"
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def report_lines(plan: ModelPlan) -> list[str]:
    """The plan's time section: per analysis on the cluster given and on its CPUs alone, the total
    of a default run (static, reorder joint, dynamic), and the rates with their sources."""
    facts, gpus_per_node, cores_per_node = plan.facts, plan.gpus_per_node, plan.cores_per_node
    nodes = plan.nodes_given or plan.nodes  # the cluster given (--nodes), else the nodes the model needs
    layer_bytes = plan.layer_disk_bytes or max(plan.layer_bytes)
    model_bytes = plan.disk_bytes or plan.nbytes
    with_gpus = Cluster(nodes, gpus_per_node, cores_per_node)
    cpus_only = Cluster(nodes, 0, cores_per_node)
    lines = [f"  time (estimated from measured rates, below), on {nodes} node(s) x {gpus_per_node} GPUs and "
             f"{cores_per_node} cores; in brackets on the {cpus_only.cores} cores alone:"]
    total = total_cpu = 0.0
    for gpu, cpu in zip(estimates(facts, layer_bytes, model_bytes, with_gpus),
                        estimates(facts, layer_bytes, model_bytes, cpus_only)):
        lines.append(f"    {gpu.analysis}: {_seconds(gpu.wall_seconds)} ({_seconds(cpu.wall_seconds)}): {gpu.work}")
        if gpu.analysis != "reorder (separate)":
            total += gpu.wall_seconds
            total_cpu += cpu.wall_seconds
    lines.append(f"    in all (static, reorder joint, dynamic, one after another): {_seconds(total)} "
                 f"({_seconds(total_cpu)})")
    lines.append("  rates:")
    lines += [f"    {name} = {rate.value:g} {rate.unit} [{rate.source}]" for name, rate in RATES.items()]
    return lines
