"""What one static or reorder unit takes, from shapes alone: host memory, GPU memory, and whether a
reorder batch overlaps its solves with its builds. Used by the jobs (each unit declares it to Ray) and
by `moe-ray plan` (no checkpoint, no Ray), so both say the same numbers.

Every figure is a sum of named parts, checked against measured peaks in benchmarks/bench_fullwidth.py
(declared must be at least the measured peak and at most 1.5x of it).
"""
from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace

from ..analysis import reorder as R
from ..analysis import static as S

GIB = 2**30
PROCESS_BYTES = 440 * 2**20
"""Host memory of a worker process beside its data: a Ray worker with the units imported (measured
279 MiB) and what reading the checkpoint and writing the store add (up to ~130 MiB in
bench_fullwidth.py's smallest units)."""
CUDA_CONTEXT_BYTES = 1 * GIB
"""GPU memory a task's process takes beside its tensors: the CUDA context and cuBLAS workspaces."""
ALLOCATOR_FACTOR = 3
"""What PyTorch's caching allocator reserves over the tensors a unit holds at once. Measured on an
H200 (benchmarks/gpu_check.sh, 2026-11-29, torch 2.11): reserved peak plus context 4.57 GiB for a
static unit at Mixtral 8x7B's width whose tensors peaked at 1.19 GiB, 5.19 GiB for a reorder pair at
n = 14,336 (1.83 GiB of tensors); the sum of parts without this factor declared 2.38 and 2.83 GiB.
With it they declare 5.14 and 6.5 GiB (1.12x and 1.25x the measured peaks)."""
CUDA_HOST_BYTES = 1 * GIB
"""Host memory the CUDA runtime and its libraries add to a task's process (likewise unmeasured here)."""


DEFAULT_GPU_MEMORY_GB = 80.0
"""The GPU memory a static unit plans its read-ahead for where the spec does not say (`gpu_memory_gb`)."""


def static_unit_memory(label_rows: Sequence[int], d_hid: int, stored_bytes: int, held_bytes: int,
                       covariance: bool, device: str, read_ahead: bool = False) -> tuple[int, int]:
    """(host, GPU) bytes of a static unit whose labels' matrices of one kind are `label_rows[l]` x
    `d_hid` (d_mid of each expert, of F and of SE).

    Host: the kind's stored bytes (read through memory maps, resident while the kind is analysed), a
    converted copy where the held dtype differs from the stored one (CPU only), the analysis's working
    set where it runs there, the neuron-PCA results and the worker process (plus the CUDA runtime on
    cuda). GPU: one kind as held, two with `read_ahead` (one analysed, the next read ahead:
    `units.static._ReadAhead`), one tensor arriving as stored, the working set, the CUDA context.
    """
    kind = sum(label_rows) * d_hid
    working = S.working_set_bytes(sum(label_rows), d_hid, covariance, SimpleNamespace(type=device))  # only .type
    results = 3 * len(label_rows) * max(label_rows) * 3 * 8
    host = kind * stored_bytes + results + PROCESS_BYTES
    if device == "cuda":
        kinds = 2 if read_ahead else 1
        tensors = kinds * kind * held_bytes + max(label_rows) * d_hid * stored_bytes + working
        gpu = ALLOCATOR_FACTOR * tensors + CUDA_CONTEXT_BYTES
        return host + CUDA_HOST_BYTES, gpu
    if held_bytes != stored_bytes:
        host += kind * held_bytes
    return host + working, 0


def static_read_ahead(label_rows: Sequence[int], d_hid: int, stored_bytes: int, held_bytes: int,
                      covariance: bool, gpu_bytes: float) -> bool:
    """Whether a static unit on a GPU of `gpu_bytes` reads the next matrix kind while one is analysed:
    only where two kinds fit it (a DeepSeek-V3 layer's do not fit 80 GiB: it reads kind by kind)."""
    return static_unit_memory(label_rows, d_hid, stored_bytes, held_bytes, covariance, "cuda", True)[1] <= gpu_bytes


def overlaps(device: str, cpus: float) -> bool:
    """Whether a reorder batch solves on a host thread while the next pair builds: on a GPU, or with
    more than one CPU (on one core the build and the solve compete for it; bench_reorder.py measures)."""
    return device == "cuda" or cpus > 1


def reorder_unit_memory(n: int, d_hid: int, stored_bytes: int, experts_held: int, device: str,
                        overlap: bool, problems: int = 1, cpus: float = 1) -> tuple[int, int]:
    """(host, GPU) bytes of a reorder batch holding `experts_held` prepared experts at n neurons and
    solving its `problems` assignments `R.batch_size` at a time on `cpus` threads; each expert is
    prepared with all three matrices (separate mode solves them one by one from them)."""
    m = len(R.MATRICES)
    batch, workers = R.batch_size(n, problems, device, cpus), max(1, int(cpus))
    if device != "cuda":
        return R.memory_bytes(n, d_hid, m, experts_held, overlap, True, stored_bytes, batch=batch,
                              workers=workers) + PROCESS_BYTES, 0
    host = R.memory_bytes(n, d_hid, m, experts_held, overlap, False, stored_bytes, batch=batch,
                          workers=workers) + PROCESS_BYTES + CUDA_HOST_BYTES
    gpu = ALLOCATOR_FACTOR * R.device_memory_bytes(n, d_hid, m, experts_held, stored_bytes, batch=batch,
                                                   workers=workers) + CUDA_CONTEXT_BYTES
    return host, gpu
