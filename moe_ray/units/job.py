"""What every analysis contributes to a run: its units, its store group, how to execute them.

`api.run` plans every requested analysis first (all validation happens there, before the store is
touched), then prepares each analysis's store group, executes the pending units and finishes.

Task analyses (static, reorder) compute where the spec's `device` says: `cpu`, `cuda` (each task asks
Ray for a GPU, or `gpus_per_task` of one), or `auto` (cuda when the cluster has GPUs). Their units are
sized for the device they will run on (host memory, GPU memory, pairs per task), so the same job
gives CPU units on a CPU cluster and GPU units where there are GPUs.
"""
from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..distributed.fanout import Unit, run_units
from ..distributed.placement import EACH, GIB, Demand, Resources, gpus_for
from ..errors import MoeRayError, SpecError
from ..fs import with_storage_options
from ..spec import Spec
from ..store import ResultStore

class WeightsRecord:
    """The content digests of the tensors a unit read, by role (model, reference) and tensor piece
    (`Checkpoint.digests`), taken right after the unit read them: stored in the group's
    `unit_weights` with the unit's results, before its done flag, so a resume can prove it is
    computing over the same bytes (`ResultStore.check_weights`)."""

    def __init__(self) -> None:
        self.digests: dict[str, dict[str, str]] = {}

    def add(self, role: str, ckpt, keys) -> None:
        self.digests.setdefault(role, {}).update(ckpt.digests(keys))

    def json(self) -> str:
        return json.dumps(self.digests, sort_keys=True)


class AnalysisJob(ABC):
    """One analysis of one run: `units.static.StaticJob`, `units.reorder.ReorderJob` (tasks) and
    `units.dynamic.DynamicJob` (shard actors)."""

    name: str

    @abstractmethod
    def units(self) -> list[Unit]:
        """Every unit of this analysis (for resource checks and progress)."""

    @abstractmethod
    def demand(self, spec: Spec, nodes: Sequence[Resources] = ()) -> Demand:
        """What this analysis asks of the cluster (checked against its nodes before anything runs);
        `nodes`, the cluster's nodes where known, for analyses whose needs depend on them."""

    @abstractmethod
    def prepare(self, store: ResultStore, overwrite: bool) -> list[Unit]:
        """Create this analysis's group, coordinates and arrays; return the units not yet done."""

    @abstractmethod
    def execute(self, pending: list[Unit], spec: Spec) -> None:
        """Run the pending units."""

    @abstractmethod
    def finish(self, store: ResultStore) -> str:
        """Cross-unit summaries once every unit is done; returns a one-line summary."""


def _ray():
    """Ray, where it is installed (a unit function also runs, and is checked, without it)."""
    try:
        import ray
    except ImportError:
        return None
    return ray if ray.is_initialized() else None


def cluster_gpus() -> float | None:
    """GPUs in the connected Ray cluster; None when not connected (planning offline)."""
    ray = _ray()
    return ray.cluster_resources().get("GPU", 0) if ray else None


@dataclass(frozen=True)
class DeviceRequest:
    """Where a task computes, as planned: `device` (cuda or cpu), whether the spec insisted on cuda
    (`required`; `auto` falls back to the CPU), and on cuda the share of a GPU it asked Ray for and
    the memory it needs there."""

    device: str = "cpu"
    required: bool = False
    gpus: float = 0
    gpu_memory_bytes: int = 0

    def resolve(self) -> tuple[torch.device, str | None]:
        """The torch device to compute on inside the task, and a note when it is not the planned one.

        Ray sets CUDA_VISIBLE_DEVICES to the task's GPU, so it is `cuda:0` here. A task that Ray
        gave a GPU but whose torch sees no CUDA (a CPU build of torch, or Ray's logical GPUs on a
        CPU machine) computes on the CPU under `auto` and says so (the same words from every task,
        so the driver says it once); under `cuda` it fails. A GPU whose memory is smaller than the
        task's share of it needs fails too, before any work.
        """
        if self.device != "cuda":
            return torch.device("cpu"), None
        if not torch.cuda.is_available():
            if self.required:
                raise SpecError(f"Ray gave this task a GPU, but torch {torch.__version__} sees no CUDA device "
                                "(device = cuda); use device = auto or cpu to compute on the CPU")
            return torch.device("cpu"), (f"Ray gave these tasks GPUs, but torch {torch.__version__} sees no "
                                         "CUDA device there: they compute on the CPU")
        device = torch.device("cuda", 0)
        total = torch.cuda.get_device_properties(device).total_memory
        share = min(1.0, self.gpus) * total
        if self.gpu_memory_bytes > share:
            raise MoeRayError(f"needs {self.gpu_memory_bytes / GIB:.1f} GiB of GPU memory, but its share of "
                              f"its GPU ({self.gpus:g} of {total / GIB:.1f} GiB) is {share / GIB:.1f} GiB: set "
                              "resources.gpu_memory_gb to the GPUs' memory, or raise gpus_per_task")
        return device, None


def where(device: torch.device) -> str:
    """Where a task computed, for its log line: the torch device and the GPU ids Ray gave it."""
    ray = _ray()
    ids = [str(i) for i in ray.get_gpu_ids()] if ray else []
    return device.type + (f", Ray GPU {','.join(ids)}" if ids else "")


def held_dtype(stored: str) -> torch.dtype:
    """The dtype a unit holds a tensor stored as `stored` (a safetensors dtype name) in: as stored when
    it is bfloat16, float16 or float32 (exact in float32, which every analysis converts its blocks to,
    and on the CPU read without a copy), else float32 (quantised or wider formats, converted once)."""
    from ..checkpoint.reader import DTYPES

    dtype = DTYPES.get(stored)
    return dtype if dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.float32


def release(device: torch.device) -> None:
    """Give a GPU's cached memory back once a task is done with it (other tasks may share the GPU)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


class TaskJob(AnalysisJob):
    """An analysis whose units are independent Ray tasks (static, reorder), sized per device."""

    cell_name = "unit"
    """What the progress bar counts (a unit's done flags)."""

    def __init__(self, spec: Spec):
        self.spec = spec
        self._units: dict[str, list[Unit]] = {}

    @abstractmethod
    def build_units(self, device: str) -> list[Unit]:
        """Every unit, sized for computing on `device` (cuda or cpu); `self.request(...)` gives each
        its resources there."""

    @abstractmethod
    def unit_function(self):
        """The function a Ray task runs for one unit: fn(*unit.args) -> summary dict."""

    def device_for(self, gpus: float | None) -> str:
        """The device the spec's setting resolves to on a cluster with `gpus` GPUs (None: unknown)."""
        setting = self.spec.device_of(self.name)
        if setting == "auto":
            return "cuda" if (gpus or 0) > 0 else "cpu"
        return setting

    def request(self, device: str, memory_bytes: int, gpu_memory_bytes: int) -> tuple[DeviceRequest, dict]:
        """A unit's device request and its Unit resources (cpus, gpus, memory) on `device`; the spec's
        memory_per_task_gb, when set, replaces the host memory."""
        res = self.spec.resources
        memory = int(res.memory_per_task_gb * GIB) if res.memory_per_task_gb else memory_bytes
        if device != "cuda":
            return DeviceRequest(), {"memory_bytes": memory, "cpus": res.cpus_per_task}
        per_gpu = res.gpu_memory_gb * GIB if res.gpu_memory_gb else None
        gpus = gpus_for(gpu_memory_bytes, res.gpus_per_task, per_gpu)
        req = DeviceRequest("cuda", self.spec.device_of(self.name) == "cuda", gpus, gpu_memory_bytes)
        return req, {"memory_bytes": memory, "cpus": res.cpus_per_task, "gpus": gpus,
                     "gpu_memory_bytes": gpu_memory_bytes}

    def units_on(self, device: str) -> list[Unit]:
        if device not in self._units:
            self._units[device] = self.build_units(device)
        return self._units[device]

    def units(self) -> list[Unit]:
        """The units for the device the spec resolves to on the connected cluster (CPU offline)."""
        return self.units_on(self.device_for(cluster_gpus()))

    def demand(self, spec: Spec, nodes: Sequence[Resources] = ()) -> Demand:
        """One task per unit, each asking for its CPUs, GPUs and memory on the device the spec
        resolves to on these nodes."""
        gpus = sum(node.get("GPU", 0) for node in nodes) if nodes else cluster_gpus()
        per_gpu = spec.resources.gpu_memory_gb * GIB if spec.resources.gpu_memory_gb else None
        units = self.units_on(self.device_for(gpus))
        return Demand(self.name, tuple((u.label, u.resources()) for u in units), EACH, gpu_memory_per_gpu=per_gpu)

    def execute(self, pending: list[Unit], spec: Spec) -> None:
        run_units(with_storage_options(self.unit_function(), spec.storage_options), pending,
                  what=f"{self.name} units", progress=spec.progress, cell_name=self.cell_name)
