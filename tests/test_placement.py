"""Work that no placement on the cluster's nodes could hold is refused before it starts, with the
numbers (issue 6): the pure check (`distributed.placement`), and a local run refusing a dynamic job
whose shards ask for GPUs the cluster does not have. Submission-time refusals: tests/test_service.py."""
from __future__ import annotations

import pytest

from moe_ray.distributed.placement import EACH, Demand, check_placement, describe, refusal
from moe_ray.errors import SpecError

GIB = 2**30
CPU_NODE = {"CPU": 16.0, "memory": 64 * GIB}
GPU_NODE = {"CPU": 32.0, "GPU": 8.0, "memory": 512 * GIB}


def _shards(n: int, gpus: float, memory_gib: float, strategy: str = "PACK") -> Demand:
    bundle = {"CPU": 1.0, "GPU": gpus, "memory": memory_gib * GIB}
    return Demand(f"dynamic ({n} shards, {strategy})",
                  tuple((f"dynamic shard {i} of {n}", dict(bundle)) for i in range(n)), strategy)


def test_describe_reads_like_a_sentence():
    assert describe({"memory": 3.5 * GIB, "GPU": 2.0, "CPU": 1.0}) == "1 CPU, 2 GPU, 3.5 GiB of memory"
    assert describe({"GPU": 0.0, "CPU": 1.0}) == "1 CPU"
    assert describe({"GPU": 0.0}, keep_zero=True) == "0 GPU"


def test_a_shard_needing_more_gpus_or_memory_than_any_node_is_refused_with_both_numbers():
    assert refusal(_shards(2, 1, 40), [CPU_NODE, GPU_NODE]) is None
    assert refusal(_shards(1, 16, 40), [CPU_NODE, GPU_NODE]) == (
        "dynamic shard 0 of 1 needs 1 CPU, 16 GPU, 40.0 GiB of memory on one node, but no node of the "
        "cluster has 16 GPU: the most one node offers is 8 GPU")
    assert "no node of the cluster has 600.0 GiB of memory: the most one node offers is 512.0 GiB" in \
        refusal(_shards(1, 1, 600), [CPU_NODE, GPU_NODE])
    # each resource exists somewhere, but never together on one node
    assert "no node of the cluster has all of that at once (2 nodes)" in \
        refusal(Demand("x", (("a task", {"CPU": 12.0, "memory": 100 * GIB}),)), [CPU_NODE, {"CPU": 4.0, "memory": 200 * GIB}])


def test_more_gpus_in_all_than_the_cluster_has_is_refused():
    two_gpu_nodes = [{"CPU": 8.0, "GPU": 1.0, "memory": 64 * GIB}] * 2
    assert refusal(_shards(2, 1, 10), two_gpu_nodes) is None
    assert refusal(_shards(3, 1, 10), two_gpu_nodes) == (
        "dynamic (3 shards, PACK) needs 3 GPU at once (3 bundles together), but the whole cluster has 2 GPU")


def test_strict_spread_needs_a_node_per_shard():
    nodes = [GPU_NODE, GPU_NODE, CPU_NODE]
    assert refusal(_shards(2, 1, 10, "STRICT_SPREAD"), nodes) is None
    assert refusal(_shards(3, 1, 10, "STRICT_SPREAD"), nodes) == (
        "dynamic (3 shards, STRICT_SPREAD) puts each of its 3 bundles on a node of its own (STRICT_SPREAD), "
        "but only 2 of the cluster's 3 nodes can hold one at the same time")
    # PACK may share a node: the same three shards fit
    assert refusal(_shards(3, 1, 10, "PACK"), nodes) is None


def test_independent_tasks_need_one_at_a_time_plus_the_driver():
    tasks = Demand("static", tuple((f"static layer {l}", {"CPU": 2.0, "memory": GIB}) for l in range(32)), EACH)
    one_node = [{"CPU": 2.0, "memory": 8 * GIB}]
    assert refusal(tasks, one_node) is None  # 32 tasks, one at a time
    with_driver = Demand(tasks.what, tasks.bundles, EACH, alongside={"CPU": 0.5, "memory": GIB})
    assert refusal(with_driver, one_node) == (
        "static needs 2.5 CPU at once (its largest task with the job's driver), but the whole cluster has 2 CPU")


def test_check_placement_raises_the_first_refusal_with_what_to_do():
    with pytest.raises(SpecError, match=r"^dynamic shard 0 of 1 needs .* 16 GPU.* cannot run on the cluster at X: "
                                        r"change the spec's resources .* check_fit = false \(--no-check-fit\)$"):
        check_placement([_shards(1, 1, 1), _shards(1, 16, 1)], [GPU_NODE], "the cluster at X")


def test_local_run_refuses_gpu_shards_on_a_cpu_cluster_before_the_store_exists(ray_session, tiny, tmp_path):
    import moe_ray

    store = tmp_path / "gpu.zarr"
    spec = {"model": str(tiny("mixtral", "scratch").path), "store": str(store), "analyses": ["dynamic"],
            "dynamic": {"inputs": ["short"], "shards": 2, "device": "cuda"}, "progress": False}
    with pytest.raises(SpecError, match=r"dynamic shard 0 of 2 \(layers 0-1\) needs 1 CPU, 1 GPU, .* on one node, "
                                        r"but no node of the cluster has 1 GPU: the most one node offers is 0 GPU"):
        moe_ray.run(spec)
    assert not store.exists()


def test_fit_check_waits_for_nodes_that_have_not_reported(capsys):
    """A just-joined node reports no resources for a moment: the check reads the nodes again until it
    has (saying so once), and gives up waiting after its bound."""
    from moe_ray.distributed.placement import reported_nodes, unreported

    views = [[{}], [{"CPU": 0.0}], [{"CPU": 8.0, "memory": 2.0**34}]]
    got = reported_nodes(lambda: views.pop(0) if len(views) > 1 else views[0], "the cluster at X",
                         wait_s=5, poll_s=0.01)
    assert got == [{"CPU": 8.0, "memory": 2.0**34}]
    out = capsys.readouterr().out.splitlines()
    assert out == ["moe-ray: the cluster at X: 1 of 1 node(s) have not reported their resources yet; waiting up "
                   "to 5 s for them before checking that the work fits"]
    assert unreported([]) == 1 and unreported([{"memory": 1.0}, {}]) == 1
    reads = []
    assert reported_nodes(lambda: reads.append(1) or [{}], wait_s=0.05, poll_s=0.01) == [{}]  # bounded
    assert len(reads) >= 2
    assert reported_nodes(lambda: [GPU_NODE], wait_s=5) == [GPU_NODE] and capsys.readouterr().out.count("waiting") == 1
