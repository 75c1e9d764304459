"""`moe-ray plan`'s time estimate (moe_ray/estimate.py): the numbers follow from the rates by hand,
the cluster changes them as it should, every rate shows its source, and the module needs no torch."""
from __future__ import annotations

import subprocess
import sys

import pytest

from moe_ray import estimate as E
from moe_ray.planning import plan_model


def test_mixtral_reorder_and_static_by_hand():
    plan = plan_model("mixtral:8x7B", gpus_per_node=8, nodes=1, cores_per_node=64)
    n, d_hid = 14336, 4096
    build = 2 * n * n * d_hid * 3 / E.RATES["build_gpu_flops"].value
    solve = E.RATES["solve_s_at_4096"].value * (n / 4096) ** 2
    gpus = E.Cluster(1, 8, 64)
    joint = E.reorder_estimate(plan.facts, gpus, "joint")
    assert joint.wall_seconds == pytest.approx(max(896 * build / 8, 896 * solve / 64))
    cpu_build = 2 * n * n * d_hid * 3 / E.RATES["build_cpu_flops"].value
    on_cpus = E.reorder_estimate(plan.facts, E.Cluster(1, 0, 64), "joint")
    assert on_cpus.wall_seconds == pytest.approx(896 * (cpu_build + solve) / 64)
    separate = E.reorder_estimate(plan.facts, E.Cluster(1, 0, 64), "separate")
    assert separate.wall_seconds == pytest.approx(3 * 896 * (cpu_build / 3 + solve) / 64)
    # static: 32 layers over 8 GPUs, 4 rounds of one layer's bytes at the GPU's rate
    static = E.static_estimate(plan.facts, plan.layer_disk_bytes, gpus)
    assert static.wall_seconds == pytest.approx(4 * plan.layer_disk_bytes / 1e9 * E.RATES["static_gpu_s_per_gb"].value)
    # twice the nodes: the reorder's GPU-bound wall time halves
    assert E.reorder_estimate(plan.facts, E.Cluster(2, 8, 64), "joint").wall_seconds == pytest.approx(
        joint.wall_seconds / 2)


def test_reorder_tasks_are_sized_from_the_same_rates():
    """One source for the solver's and the build's rates: a reorder task's pair time (which sizes its
    batch of pairs) is the plan's build + solve, by hand (a CPU build on the task's cores)."""
    from moe_ray.analysis import reorder as R

    n, d_hid = 2048, 7168
    build_gpu = 2 * n * n * d_hid * 3 / E.RATES["build_gpu_flops"].value
    build_cpu = 2 * n * n * d_hid * 3 / E.RATES["build_cpu_flops"].value
    solve = E.RATES["solve_s_at_4096"].value * (n / 4096) ** 2
    assert R.pair_seconds(n, d_hid, 3, "cuda") == pytest.approx(build_gpu + solve)
    assert R.pair_seconds(n, d_hid, 3, "cpu", cpus=4) == pytest.approx(build_cpu / 4 + solve)
    per_task = R.pairs_per_task(n, d_hid, "joint", "cpu")
    assert per_task == int(R.TARGET_TASK_SECONDS // (build_cpu + solve))


def test_plan_report_has_the_time_section_and_every_source():
    report = plan_model("grok1:314B", gpus_per_node=8, cores_per_node=32).report()
    section = report[report.index("  time (estimated"):]
    for analysis in ("static:", "reorder (joint):", "reorder (separate):", "dynamic:", "in all"):
        assert analysis in section
    for rate in E.RATES.values():
        assert rate.source in section
    assert "x 8 GPUs and 32 cores" in section


def test_estimate_imports_no_torch():
    code = "import sys, moe_ray.estimate; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
