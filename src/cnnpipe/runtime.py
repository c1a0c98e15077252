"""Where a fit runs: the device, the process group when several processes train (DDP), the
seeds, and the arithmetic precision."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from cnnpipe.errors import UserError

# CPU flags of the instructions that make bf16 matrix products fast (Intel AMX, AVX-512 BF16).
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


@dataclass(frozen=True)
class Runtime:
    """Where the loop runs: the device, and this process's place among DDP processes."""

    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' was asked for but no CUDA GPU is visible: use auto or cpu")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


LAUNCH_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")  # torchrun
SINGLE_PROCESS = {"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}  # unset, or these
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt options, from <malloc.h>


def keep_freed_memory() -> None:
    """Let glibc keep freed activation buffers for the next step instead of unmapping them.

    By default glibc serves blocks above 128 KiB from fresh mappings and returns them to the
    kernel when freed, so every CPU training step page-faults its activations in again. Raising
    the mmap threshold (to glibc's 32 MiB maximum) and the trim threshold keeps them: a step of
    the source document's network on CPU runs about 2x faster (docs/benchmarks.md).
    Process-wide; nothing happens where the C library is not glibc.
    """
    _mallopt(M_MMAP_THRESHOLD, 32 << 20)
    _mallopt(M_TRIM_THRESHOLD, 1 << 30)


def return_freed_memory() -> None:
    """Let glibc hand every freed block of 1 MiB or more back to the kernel, as a server needs.

    glibc raises its mmap threshold each time a large block is freed, after which such blocks
    come from per-thread heaps that keep them: a served model answering 20 requests at once for
    40-megapixel images grew to almost twice the memory, and kept most of it; with the
    threshold fixed it peaks as for one such request (docs/benchmarks.md, "Serving"; measured
    with bench/serve_memory.py). Process-wide; glibc only.
    """
    _mallopt(M_MMAP_THRESHOLD, 1 << 20)


def _mallopt(option: int, value: int) -> None:
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(option, value)


def start_runtime(requested_device: str) -> Runtime:
    """A single process, or, under torchrun, one rank of a process group: NCCL on GPUs
    (one GPU per local rank), gloo on CPU."""
    device = resolve_device(requested_device)
    keep_freed_memory()
    world_size = launched_world_size()
    if world_size == 1:
        return Runtime(device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Runtime(device, dist.get_rank(), world_size)


def launched_world_size() -> int:
    """The number of processes torchrun started (1 without torchrun). torchrun sets all of
    `LAUNCH_VARIABLES`; some of them alone, or values that are no ranks, are left over from
    another launcher and would fail deep in torch.distributed: a one-line `UserError`."""
    given = {name: os.environ.get(name) for name in LAUNCH_VARIABLES}
    if all(given[name] in (None, "", alone) for name, alone in SINGLE_PROCESS.items()):
        return 1
    found = ", ".join(f"{name}={value}" for name, value in given.items() if value is not None)
    ranks = [given[name] or "" for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK")]
    if all(rank.isdigit() for rank in ranks) and given["MASTER_ADDR"] and given["MASTER_PORT"]:
        world_size, rank, local_rank = map(int, ranks)
        if 0 <= local_rank <= rank < world_size:
            return world_size
    raise UserError(
        f"the environment describes no process group torchrun started ({found}): set "
        "train.nproc to train on several processes, or unset these variables"
    )


def stop_runtime(runtime: Runtime) -> None:
    if runtime.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def available_memory(runtime: Runtime) -> int | None:
    """Bytes one process of a fit may still allocate on its device, or None where that cannot
    be read: a GPU's free memory; on the CPU, what the kernel can give without taking memory
    from other programs (MemAvailable and free swap), within the container's limit if one is
    set, shared by the fit's processes on this machine."""
    if runtime.device.type == "cuda":
        return torch.cuda.mem_get_info(runtime.device)[0]
    meminfo = _read_numbers(Path("/proc/meminfo"))
    if "MemAvailable" not in meminfo:
        return None
    available = (meminfo["MemAvailable"] + meminfo.get("SwapFree", 0)) * 1024  # kB
    room = _container_room()
    if room is not None:
        available = min(available, room)
    local = os.environ.get("LOCAL_WORLD_SIZE", "")  # torchrun's processes on this machine
    processes = int(local) if runtime.world_size > 1 and local.isdigit() else runtime.world_size
    return available // max(1, processes)


def memory_holder(device: torch.device) -> str:
    """What `available_memory` is the memory of, as a message names it."""
    return "the GPU" if device.type == "cuda" else "this machine"


# A container's memory limit, use and file cache: cgroup v2, then v1. The cache can be
# reclaimed, so it counts as free, as in MemAvailable.
CGROUP_MEMORY = (
    ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current", "/sys/fs/cgroup/memory.stat",
     "file"),
    ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes",
     "/sys/fs/cgroup/memory/memory.stat", "total_cache"),
)  # fmt: skip


def _container_room() -> int | None:
    """Memory left under this container's limit, or None: no limit (or none readable)."""
    for limit_file, usage_file, stat_file, cache_key in CGROUP_MEMORY:
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text())
        except (OSError, ValueError):
            continue
        if not limit.isdigit() or int(limit) >= 1 << 60:  # "max", or v1's "unlimited"
            return None
        cache = _read_numbers(Path(stat_file)).get(cache_key, 0)
        return max(0, int(limit) - usage + cache)
    return None


def _read_numbers(path: Path) -> dict[str, int]:
    """`name value` lines (`/proc/meminfo`, a cgroup's memory.stat) as a dict; {} if unreadable."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    fields = [line.split() for line in lines]
    return {f[0].rstrip(":"): int(f[1]) for f in fields if len(f) > 1 and f[1].isdigit()}


def make_deterministic(seed: int, deterministic: bool, device: torch.device) -> None:
    """Seed Python, NumPy and torch; with `deterministic` on CUDA, also forbid nondeterministic
    kernels (with CUBLAS_WORKSPACE_CONFIG and no cuDNN autotuning). The CPU kernels these
    models use are deterministic already, and the switch would import torch's compiler
    (~1.5 s at every stage start)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if device.type != "cuda":
        return
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        torch.backends.cudnn.benchmark = True


@functools.cache
def _cpuinfo() -> dict[str, str]:
    """The first processor's entries of /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as info:
            first = info.read().split("\n\n")[0]
    except OSError:
        return {}
    pairs = (line.split(":", 1) for line in first.splitlines() if ":" in line)
    return {key.strip(): value.strip() for key, value in pairs}


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AMX or AVX-512 BF16)."""
    flags = _cpuinfo().get("flags", "").split()
    return any(flag in flags for flag in BF16_CPU_FLAGS)


def host_record(device: torch.device) -> dict[str, str]:
    """What a model's bytes depend on beyond code, data and params: the processor and the
    kernels torch picks for it. Hosts with the same record train the same bytes; other hosts
    train models about as good, in other bytes (docs/training.md, "Reproducible")."""
    onednn = re.search(r"MKL-DNN (v[\d.]+)", torch.__config__.show())
    flags = _cpuinfo().get("flags", "").split()
    return {
        "cpu": _cpuinfo().get("model name", "unknown"),
        "cpu_kernels": torch.backends.cpu.get_cpu_capability(),
        "bf16_instructions": " ".join(f for f in BF16_CPU_FLAGS if f in flags) or "none",
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "none",
        "torch": torch.__version__,
        "onednn": onednn.group(1) if onednn else "none",
    }


def precision(requested: str, device: torch.device, fast_in_bf16_on_cpu: bool) -> str:
    """The precision a fit runs in: `requested` (bf16 | fp32), or for `auto` bf16 on CUDA, and
    on a CPU with fast bf16 when the model gains from it (measured per model, models.py)."""
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16"
    return "bf16" if fast_in_bf16_on_cpu and cpu_has_fast_bf16() else "fp32"


def autocast(device: torch.device, precision: str = "fp32") -> contextlib.AbstractContextManager:
    """bf16 autocast where `precision` says so; full precision otherwise."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
