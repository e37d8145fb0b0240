"""Device selection and seeded randomness.

`resolve_device("auto")` picks CUDA, then MPS, then the CPU. Sampling noise is drawn on the CPU
from an explicit `torch.Generator` and then moved, so one seed gives the same images' noise on every
device. Host-to-device copies go through `to_device`, which does not wait for the device.
Networks go to their device through `place` (channels_last weights), and a CLI process tunes
the C allocator for large tensors once (`tune_allocator`).
"""

from __future__ import annotations

import ctypes
import functools
import platform
import re
import secrets
import sys

import torch

from ddpm_cli import runtime
from ddpm_cli.distributed import local_processes
from ddpm_cli.errors import DeviceError

DEVICE_HELP = "auto, cpu, cuda, cuda:N or mps"
_CUDA_INDEX = re.compile(r"cuda:(\d+)")


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


# oneDNN's ONEDNN_MAX_CPU_ISA values that leave AMX out (oneDNN 3.x; it ignores case)
_ISAS_WITHOUT_AMX = frozenset(
    "SSE41 AVX AVX2 AVX2_VNNI AVX2_VNNI_2 AVX512_CORE AVX512_CORE_VNNI AVX512_CORE_BF16"
    " AVX512_CORE_FP16 AVX10_1_512 AVX10_2_512".split()
)


def cpu_has_amx() -> bool | None:
    """Whether this x86 CPU has AMX tiles (Intel Xeon from Sapphire Rapids on), where torch's
    bf16 matrix kernels run several times faster than float32; None where that is unknown
    (other architectures, torch before 2.3, which cannot tell). False too where oneDNN, which
    runs torch's CPU convolutions and matrix products, is kept to an instruction set without
    AMX (ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16, say): such a process runs as on a CPU without it.
    A value oneDNN does not know caps nothing, there and here."""
    test = getattr(torch.cpu, "_is_amx_tile_supported", None)
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")
    if not x86 or test is None:
        return None
    return bool(test()) and runtime.current().cpu_isa not in _ISAS_WITHOUT_AMX


@functools.lru_cache(maxsize=1)
def cpu_id() -> tuple[str, int] | None:
    """(vendor, family) of this x86 CPU as Linux reports it (/proc/cpuinfo), for example
    ("AuthenticAMD", 26) for AMD's Zen 5; None where that is unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read(1 << 16)
    except OSError:
        return None
    vendor = re.search(r"^vendor_id\s*:\s*(\S+)", text, re.M)
    family = re.search(r"^cpu family\s*:\s*(\d+)", text, re.M)
    if not (vendor and family):
        return None
    return vendor.group(1), int(family.group(1))


def available_devices() -> list[str]:
    """Names of the devices present on this machine, e.g. ['cuda:0', 'cuda:1', 'cpu']."""
    names = []
    if torch.cuda.is_available():
        names += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if _mps_available():
        names.append("mps")
    names.append("cpu")
    return names


def resolve_device(spec: str = "auto") -> torch.device:
    """Turn a user's device string into a `torch.device` that exists here.

    Raises DeviceError, naming the devices that do exist, for an absent or malformed device.
    """
    spec = spec.strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", 0)
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    present = ", ".join(available_devices())
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "mps":
        if not _mps_available():
            raise DeviceError(
                f"device 'mps' is not available on this machine (available: {present})"
            )
        return torch.device("mps")
    if spec == "cuda" or _CUDA_INDEX.fullmatch(spec):
        index = 0 if spec == "cuda" else int(spec.split(":")[1])
        if not torch.cuda.is_available():
            raise DeviceError(
                f"device '{spec}' is not available: CUDA is not available (available: {present})"
            )
        count = torch.cuda.device_count()
        if index >= count:
            raise DeviceError(
                f"device '{spec}' is not available: this machine has {count} CUDA device(s) "
                f"(available: {present})"
            )
        return torch.device("cuda", index)
    raise DeviceError(f"unknown device {spec!r}; use {DEVICE_HELP}")


def new_seed() -> int:
    """A fresh random seed, for runs where the user gave none (report it so they can repeat)."""
    return secrets.randbits(32)


def make_generator(seed: int) -> torch.Generator:
    """A CPU generator seeded once; pass it explicitly to everything that draws noise."""
    return torch.Generator(device="cpu").manual_seed(seed)


def randn(
    shape: tuple[int, ...],
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard normal noise drawn on the CPU from `generator`, then moved to `device`."""
    return to_device(torch.randn(shape, generator=generator, dtype=dtype), torch.device(device))


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`x` on `device`. A CPU tensor bound for CUDA is copied through pinned memory without
    waiting: a plain `.to("cuda")` from pageable memory blocks the host until the device has
    finished all the work queued before it, one stall per copy in a loop that should run ahead
    of the device (docs/benchmarks.md)."""
    if x.device == device:
        return x
    if device.type == "cuda" and x.device.type == "cpu":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def sync(device: torch.device) -> None:
    """Wait for the work queued on `device` (CUDA and MPS run asynchronously), for timing."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def place(model: torch.nn.Module, device: torch.device | str) -> torch.nn.Module:
    """`model` on `device` with its 4-D weights channels_last (NHWC), the layout the U-Net's
    activations use there, except on MPS. With weights left NCHW, every convolution copied its
    weight into NHWC in the forward pass and its weight gradient back in the backward pass:
    5% of a cifar10 training step on the CPU (docs/benchmarks.md). Optimizer moments created
    afterwards follow the weights' layout."""
    device = torch.device(device)
    model = model.to(device)
    if device.type != "mps":
        model.to(memory_format=torch.channels_last)
    return model


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def tune_allocator() -> bool:
    """Keep freed large blocks in the process instead of returning them to the system, on glibc
    (Linux). By default glibc maps each block over a few MB fresh from the kernel and unmaps it
    when freed, so every activation of every step faulted its pages in again, zero-filled:
    30,000-150,000 page faults per cifar10 step, 4-6% of the time on the CPU
    (docs/benchmarks.md). The cost is that the process keeps its peak memory until it exits,
    which suits a command that trains or samples. DDPM_TUNE_MALLOC=0 leaves glibc as it is.
    Returns whether the allocator was tuned."""
    if not runtime.current().tune_malloc or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # this process's C library
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # blocks up to 1 GiB come from the heap (older glibc refuses more than 32 MiB), and up to
    # 2 GiB of free heap stays mapped
    if not (mallopt(M_MMAP_THRESHOLD, 1 << 30) or mallopt(M_MMAP_THRESHOLD, 32 << 20)):
        return False
    return bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation by this process, or None if unknown:
    Linux's MemAvailable, or less where the process's cgroup (a container) limits its memory,
    shared evenly among the processes a torchrun job starts on this machine (each holds its
    own copy of the data and its own step)."""
    found = [v for v in (_meminfo_available(), _cgroup_available()) if v is not None]
    return min(found) // local_processes() if found else None


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


# (limit, usage, memory.stat's reclaimable file cache) for cgroup v2, then v1
CGROUP_FILES = (
    ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current",
     "/sys/fs/cgroup/memory.stat", "inactive_file"),
    ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes",
     "/sys/fs/cgroup/memory/memory.stat", "total_inactive_file"),
)  # fmt: skip
NO_LIMIT = 2**60  # cgroup v1 writes "no limit" as a number near 2^63


def _cgroup_available() -> int | None:
    """The cgroup's memory limit less what it uses (its inactive file cache counted as free,
    as the kernel reclaims it); None without a limit."""
    for limit_file, usage_file, stat_file, cache_key in CGROUP_FILES:
        try:
            with open(limit_file) as f:
                text = f.read().strip()
            if text == "max" or int(text) >= NO_LIMIT:
                return None
            with open(usage_file) as f:
                usage = int(f.read().strip())
            cache = 0
            with open(stat_file) as f:
                for line in f:
                    key, _, value = line.partition(" ")
                    if key == cache_key:
                        cache = int(value)
            return max(0, int(text) - usage + cache)
        except (OSError, ValueError):
            continue
    return None
