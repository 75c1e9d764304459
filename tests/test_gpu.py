"""GPUs in static and reorder (issue 13), tested on a CPU machine: the device setting and its flags,
the same numbers whatever dtype or device path a unit takes, reorder batches (tiles, overlap, sizing),
GPU shares and GPU memory in the fit check, units declaring CPUs/GPUs/memory per device, and Ray
scheduling with logical GPUs on a cluster of a CPU-only head and a GPU node."""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import xarray as xr

import moe_ray
from moe_ray.analysis import reorder as R
from moe_ray.analysis import static as S
from moe_ray.cli import build_parser, spec_from_args
from moe_ray.distributed.placement import GIB, GPU_MEMORY, Demand, gpus_for, refusal
from moe_ray.errors import SpecError
from moe_ray.spec import Spec
from moe_ray.units.job import DeviceRequest


# ---- the device setting ----------------------------------------------------------------------------

def _spec(argv: list[str], toml: str | None = None, tmp_path=None) -> Spec:
    args = build_parser().parse_args(["run", "--model", "m", *argv])
    args.spec = None
    if toml is not None:
        path = tmp_path / "job.toml"
        path.write_text(toml)
        args.spec = str(path)
    return spec_from_args(args)


def test_one_device_for_every_analysis_and_dynamic_keeps_its_own(tmp_path):
    spec = _spec(["--device", "cuda"])
    assert [spec.device_of(a) for a in ("static", "reorder", "dynamic")] == ["cuda"] * 3
    spec = _spec(["--device", "cpu", "--dynamic-device", "cuda"])
    assert (spec.device_of("static"), spec.device_of("dynamic")) == ("cpu", "cuda")
    # an older spec naming only [dynamic] device: the shards keep it, the tasks follow `device` (auto)
    old = _spec([], 'model = "m"\n[dynamic]\ndevice = "cpu"\n', tmp_path)
    assert (old.device_of("static"), old.device_of("dynamic")) == ("auto", "cpu")
    flags = [o for a in build_parser()._subparsers._group_actions[0].choices["run"]._actions for o in a.option_strings]
    assert len(flags) == len(set(flags)) and "--device" in flags and "--dynamic-device" in flags


@pytest.mark.parametrize("data, message", [
    ({"device": "tpu"}, "device must be auto, cuda or cpu, not 'tpu'"),
    ({"dynamic": {"device": "gpu"}}, "dynamic.device must be auto, cuda or cpu"),
    ({"resources": {"gpus_per_task": 2}}, "gpus_per_task must be more than 0 and at most 1"),
    ({"resources": {"gpus_per_task": 0}}, "gpus_per_task must be more than 0"),
    ({"resources": {"gpu_memory_gb": 0}}, "gpu_memory_gb must be positive"),
    ({"reorder": {"pairs_per_task": 0}}, "pairs_per_task must be at least 1"),
])
def test_bad_device_settings_are_refused(data, message):
    spec = Spec.from_dict({"model": "m", "analyses": ["static", "dynamic"], **data})
    with pytest.raises(SpecError, match=re.escape(message)):
        spec.validate()


def test_a_task_given_a_gpu_torch_cannot_see():
    """This machine's torch has no CUDA, like a task on Ray's logical GPUs: auto computes on the CPU
    with a note (the same words from every task, so the driver says it once); cuda refuses."""
    assert not torch.cuda.is_available()
    device, note = DeviceRequest("cuda", required=False, gpus=1).resolve()
    assert device.type == "cpu" and note == DeviceRequest("cuda", gpus=0.5, gpu_memory_bytes=GIB).resolve()[1]
    assert "sees no CUDA device there: they compute on the CPU" in note
    with pytest.raises(SpecError, match=r"^Ray gave this task a GPU, but torch .* sees no CUDA device \(device = cuda\)"):
        DeviceRequest("cuda", required=True, gpus=1).resolve()
    assert DeviceRequest().resolve() == (torch.device("cpu"), None)


# ---- the same numbers on every path ----------------------------------------------------------------

@pytest.mark.parametrize("method, d_hid", [("covariance", 16), ("randomized", 96)])
def test_static_numbers_do_not_depend_on_the_held_dtype(method, d_hid):
    """A unit holds bf16 experts as stored and converts each block; the results are bit for bit those
    of the same values held in float32 (S1/S2 Grams, S3 averages, S5 scores)."""
    gen = torch.Generator().manual_seed(0)
    held = [(torch.randn(40, d_hid, generator=gen) * 0.02).to(torch.bfloat16) for _ in range(5)]
    wide = [m.float() for m in held]
    for a, b in zip(S.flattened_grams(held), S.flattened_grams(wide)):
        assert torch.equal(a, b)
    for name in ("up", "down"):
        assert torch.equal(S.neuron_average(held[0].T if name == "down" else held[0], name),
                           S.neuron_average(wide[0].T if name == "down" else wide[0], name))
    scores_h, ratio_h = S.neuron_pca(held, 3, method)
    scores_w, ratio_w = S.neuron_pca(wide, 3, method)
    assert torch.equal(ratio_h, ratio_w) and all(torch.equal(a, b) for a, b in zip(scores_h, scores_w))


def _experts(count: int, n: int = 48, d: int = 20, seed: int = 0) -> dict[int, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    shapes = {"up": (n, d), "gate": (n, d), "down": (d, n)}
    return {e: {m: torch.randn(s, generator=gen).to(torch.bfloat16) for m, s in shapes.items()} for e in range(count)}


def test_a_batch_with_and_without_overlap_equals_pair_by_pair():
    """Several pairs (joint and single-matrix problems mixed) through one task, with the solve on a
    thread while the next cost builds, and several solved as one batch on two threads, give exactly what
    each pair gives on its own; each expert is loaded once."""
    experts = _experts(5)
    loads = []

    def load(e):
        loads.append(e)
        return experts[e]

    problems = [(0, 1, R.MATRICES), (0, 2, ("up",)), (1, 3, R.MATRICES), (2, 4, ("down",)), (3, 4, R.MATRICES)]
    for overlap, batch in ((False, 1), (True, 1), (False, 3), (True, 2)):
        loads.clear()
        got = list(R.reorder_pairs(load, problems, overlap=overlap, chunk_elements=7 * 48, batch=batch,
                                   workers=2 if batch > 1 else 1))
        assert [p for p, _ in got] == problems and sorted(loads) == [0, 1, 2, 3, 4]
        for (i, j, ms), result in got:
            alone = R.reorder_pair(experts[i], experts[j], ms)
            np.testing.assert_array_equal(result.perm, alone.perm)
            assert result.similarity_before == alone.similarity_before
            assert result.similarity_after == alone.similarity_after
            assert result.gap_bound == alone.gap_bound and result.kendall_tau == alone.kendall_tau
            a = {m: experts[i][m].double() for m in ms}
            b = {m: experts[j][m].double() for m in ms}
            for m in ms:  # the flattened cosine, before and after, against a float64 reference
                perm = torch.as_tensor(result.perm)
                b_after = b[m][:, perm] if m == "down" else b[m][perm]
                for got_value, other in ((result.similarity_before[m], b[m]), (result.similarity_after[m], b_after)):
                    ref = float((a[m] * other).sum() / (a[m].norm() * other.norm()))
                    assert got_value == pytest.approx(ref, abs=1e-6)


def _tile_count(experts: int, side: int) -> int:
    """Tiles of the pair triangle with a pair in them: every (block i < block j), and the diagonal
    blocks of two or more experts."""
    blocks = [min(side, experts - start) for start in range(0, experts, side)]
    return len(blocks) * (len(blocks) - 1) // 2 + sum(b >= 2 for b in blocks)


def test_tiles_cover_every_pair_once():
    pairs = [(i, j) for i in range(64) for j in range(i + 1, 64)]
    for per_task, side in ((1, 1), (9, 3), (100, 10), (2016, 44)):
        assert R.tile_side(per_task) == side
        batches = R.tile_batches(pairs, side)
        flat = [p for b in batches for p in b]
        assert sorted(flat) == pairs and all(len(b) <= per_task for b in batches)
        assert len(batches) == _tile_count(64, side)  # 2016, 252, 28, 3
        # one tile per batch, so a batch reads at most 2 x side experts, not 2 per pair
        assert all(len({(i // side, j // side) for i, j in b}) == 1 for b in batches)
        assert max(len({e for p in b for e in p}) for b in batches) <= 2 * side


def test_pairs_per_task_is_sized_from_the_plan():
    # Mixtral 8x7B and Grok-1: a pair alone takes minutes on a CPU, so one pair per task
    assert R.pairs_per_task(14336, 4096, "joint", "cpu") == 1
    assert R.pairs_per_task(32768, 6144, "joint", "cuda") == 1
    # DeepSeek-V3 (n = 2,048, d_hid 7,168, 256 experts): 58 layers x 32,640 pairs = 1.9 M assignments
    pairs = 256 * 255 // 2
    for device, at_least in (("cpu", 8), ("cuda", 50)):
        k = R.pairs_per_task(2048, 7168, "joint", device)
        tasks = 58 * math.ceil(pairs / k)
        assert k >= at_least and tasks <= 58 * pairs / at_least
        assert R.TARGET_TASK_SECONDS / 2 <= k * R.pair_seconds(2048, 7168, 3, device) <= R.TARGET_TASK_SECONDS
    assert R.pairs_per_task(2048, 7168, "joint", "cuda", requested=7) == 7
    # separate mode solves three assignments per pair: fewer pairs per task
    assert R.pairs_per_task(1408, 2048, "separate", "cpu") < R.pairs_per_task(1408, 2048, "joint", "cpu")


def test_batch_size_and_what_a_task_declares_for_it():
    """A GPU task solves up to 32 pairs at once (512 MiB of costs at most), a CPU task one per core; the
    memory it declares (`reorder_unit_memory`, as `moe-ray plan` and the job size it) holds the batch's
    cost matrices and the solver's per-pair workspace, by hand."""
    from moe_ray.analysis import assignment as A
    from moe_ray.units.sizing import ALLOCATOR_FACTOR, reorder_unit_memory

    assert R.batch_size(2048, 576, "cuda") == 32 and R.batch_size(2048, 5, "cuda") == 5
    assert R.batch_size(8192, 100, "cuda") == 2 and R.batch_size(14336, 16, "cuda") == 1
    assert R.batch_size(2048, 576, "cpu", cpus=4) == 4 and R.batch_size(2048, 576, "cpu") == 1
    n, d_hid = 2048, 7168
    one = R.device_memory_bytes(n, d_hid, experts_held=48, batch=1)
    many = R.device_memory_bytes(n, d_hid, experts_held=48, batch=32)
    assert many - one == 31 * (2 * 4 * n * n + n * (A.NEAREST + 8) * 8 * 4)
    host_one, gpu_one = reorder_unit_memory(n, d_hid, 2, 48, "cuda", True, problems=1)
    host_many, gpu_many = reorder_unit_memory(n, d_hid, 2, 48, "cuda", True, problems=576)
    assert gpu_many - gpu_one == ALLOCATOR_FACTOR * (many - one)
    assert host_many - host_one == 31 * A.workspace_bytes(n)  # one thread: lapjv's one copy either way
    cpu_one = reorder_unit_memory(n, d_hid, 2, 8, "cpu", True, problems=16, cpus=1)[0]
    cpu_four = reorder_unit_memory(n, d_hid, 2, 8, "cpu", True, problems=16, cpus=4)[0]
    assert cpu_four - cpu_one == 3 * (2 * 4 * n * n + A.workspace_bytes(n) + 2048 * n * 8)


# ---- GPUs and their memory in the fit check ---------------------------------------------------------

def test_gpu_share_from_declared_gpu_memory():
    assert gpus_for(4 * GIB, None, None) == 1.0                 # memory of the GPUs unknown: a whole GPU
    assert gpus_for(4 * GIB, None, 80 * GIB) == 0.05            # 4 of 80 GiB
    assert gpus_for(4 * GIB + 1, None, 80 * GIB) == 0.0501      # rounded up to Ray's 1e-4
    assert gpus_for(100 * GIB, None, 80 * GIB) == 1.0           # never more than one GPU
    assert gpus_for(4 * GIB, 0.25, 80 * GIB) == 0.25            # the spec's gpus_per_task wins


def test_a_task_needing_more_than_its_gpu_share_is_refused():
    nodes = [{"CPU": 8.0, "GPU": 2.0, "memory": 64 * GIB}]
    task = {"CPU": 1.0, "GPU": 0.25, "memory": GIB, GPU_MEMORY: 30 * GIB}
    assert refusal(Demand("reorder", (("reorder layer 0 pair 0-1", task),)), nodes) is None  # memory unknown
    assert refusal(Demand("reorder", (("reorder layer 0 pair 0-1", task),), gpu_memory_per_gpu=80 * GIB), nodes) == (
        "reorder layer 0 pair 0-1 needs 30.0 GiB of GPU memory, but it asks for 0.25 of a GPU (20.0 GiB) "
        "of 80.0 GiB (gpu_memory_gb)")
    whole = dict(task, GPU=1.0)
    assert refusal(Demand("static", (("static layer 0", whole),), gpu_memory_per_gpu=24 * GIB), nodes) == (
        "static layer 0 needs 30.0 GiB of GPU memory, but it asks for a whole GPU of 24.0 GiB (gpu_memory_gb)")
    # GPU memory is never asked of Ray nor summed per node: a 30 GiB task fits an 80 GiB GPU
    assert refusal(Demand("x", (("t", whole),), gpu_memory_per_gpu=80 * GIB), nodes) is None


def test_units_declare_what_they_take_on_each_device(tiny):
    from moe_ray import api

    ck = tiny("mixtral", "scratch")
    spec = api.as_spec(model=str(ck.path), store="unused.zarr", analyses=["static", "reorder"],
                       resources={"gpu_memory_gb": 80, "cpus_per_task": 1})
    _, _, (static, reorder) = api.plan(spec)
    for job in (static, reorder):
        cpu, cuda = job.units_on("cpu"), job.units_on("cuda")
        assert all(u.gpus == 0 and u.gpu_memory_bytes == 0 and u.memory_bytes > 0 for u in cpu)
        assert all(0 < u.gpus < 0.1 and u.gpu_memory_bytes > GIB and u.resources()["GPU"] == u.gpus for u in cuda)
        assert all(u.gpus == gpus_for(u.gpu_memory_bytes, None, 80 * GIB) for u in cuda)
        assert all(u.args[-1 if job is static else -3].device == "cuda" for u in cuda)
    assert sum(u.cells for u in reorder.units_on("cpu")) == 4 * 28  # done flags: layers x pairs
    assert len(reorder.units_on("cpu")) < 4 * 28                       # tiny pairs share a task
    gpu_node, cpu_node = {"CPU": 4.0, "GPU": 1.0, "memory": 8 * GIB}, {"CPU": 4.0, "memory": 8 * GIB}
    # auto: GPU tasks when the cluster has a GPU anywhere, CPU tasks when it has none
    assert all("GPU" in b for _, b in static.demand(spec, [gpu_node, cpu_node]).bundles)
    assert not any("GPU" in b for _, b in static.demand(spec, [cpu_node]).bundles)


def test_static_on_cuda_is_refused_on_a_cluster_without_gpus(ray_session, tiny, tmp_path):
    store = tmp_path / "s.zarr"
    with pytest.raises(SpecError, match=r"^static layer 0 needs 1 CPU, 1 GPU, .* but no node of the cluster has "
                                        r"1 GPU: the most one node offers is 0 GPU"):
        moe_ray.run(model=str(tiny("mixtral", "scratch").path), store=str(store), device="cuda", progress=False)
    assert not store.exists()


def test_plan_says_what_tasks_take_on_cpu_and_gpu(capsys):
    from moe_ray.cli import main

    assert main(["plan", "--model", "deepseek_moe:16B", "--gpu-mem", "80"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"static on cuda: 27 tasks of 1 layer, each 1 CPU, .* of GPU memory \(0\.\d+ of one 80 GiB GPU\)", out)
    cpu = re.search(r"reorder joint on cpu: ([\d,]+) tasks of (\d+) pairs", out)
    tasks, per_task = int(cpu.group(1).replace(",", "")), int(cpu.group(2))
    side = math.isqrt(per_task)
    assert side > 1 and per_task == side * side and tasks == 27 * _tile_count(64, side)


# ---- Ray scheduling with logical GPUs ---------------------------------------------------------------

SCRIPT = textwrap.dedent("""
    import logging
    import sys
    import ray
    from ray.cluster_utils import Cluster
    import moe_ray
    from moe_ray.errors import MoeRayError

    # each unit's own summary (where it computed) is a debug line of the moe_ray logger, not progress
    logging.basicConfig(stream=sys.stdout, format="%(message)s")
    logging.getLogger("moe_ray").setLevel(logging.DEBUG)

    model, store = sys.argv[1], sys.argv[2]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0, "include_dashboard": False})
    cluster.add_node(num_cpus=2, num_gpus=2)   # the only GPUs: logical ones, torch here has no CUDA
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    moe_ray.run(model=model, store=store, analyses=["static", "reorder"], layers=[1, 2],
                reorder={"pairs": "0-1,2-3,0-3"})
    try:
        moe_ray.run(model=model, store=store + ".cuda", analyses=["static"], layers=[1], device="cuda", progress=False)
    except MoeRayError as exc:
        print("CUDA ERROR:", exc)
    ray.shutdown()
    cluster.shutdown()
""")


def test_units_on_logical_gpus_of_a_mixed_cluster(ray_session, tiny, tmp_path):
    """A CPU-only head and a node with 2 (logical) GPUs: with device auto every static and reorder
    task asks for a GPU and gets one (so it runs on the GPU node); torch there sees no CUDA, so each
    computes on the CPU and the driver says so once per analysis; the store equals a CPU run's.
    With device cuda the job fails at its first task with one line."""
    ck = tiny("mixtral", "scratch", dtype="float32")
    store = str(tmp_path / "gpu.zarr")
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(ck.path), store], capture_output=True, text=True,
                          timeout=600, env=dict(os.environ))
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    units = [l for l in out.splitlines() if re.match(r"(static layer|reorder joint layer) ", l)]
    assert len(units) == 2 + 2 and all(re.search(r", cpu, Ray GPU [01], ", l) for l in units), out
    for what in ("static", "reorder"):
        notes = [l for l in out.splitlines() if l.startswith(f"moe-ray: {what} units: Ray gave these tasks GPUs")]
        assert len(notes) == 1 and "sees no CUDA device there: they compute on the CPU" in notes[0], out
    assert "moe-ray: reorder units: 6/6 pair (100%" in out, out  # pairs, not tasks (a plain line: no terminal)
    error = [l for l in out.splitlines() if l.startswith("CUDA ERROR:")]
    assert len(error) == 1 and re.match(r"CUDA ERROR: static layer 1: Ray gave this task a GPU, but torch .* sees "
                                        r"no CUDA device \(device = cuda\)", error[0]), out

    cpu = moe_ray.run(model=str(ck.path), store=str(tmp_path / "cpu.zarr"), analyses=["static", "reorder"],
                      layers=[1, 2], reorder={"pairs": "0-1,2-3,0-3"}, device="cpu", progress=False)
    for group in ("static", "reorder/joint"):
        a, b = xr.open_zarr(cpu, group=group), xr.open_zarr(store, group=group)
        for name in a.data_vars:
            if a[name].dtype.kind not in "fciu":  # unit_weights: the digests, equal as text
                np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)
                continue
            np.testing.assert_allclose(a[name].values, b[name].values, rtol=1e-6, atol=1e-7, err_msg=name)
