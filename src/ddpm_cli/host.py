"""The machine this process runs on, as far as memory goes, without torch: the C allocator's
tuning for large tensors (`tune_allocator`, which the CLI applies once at start-up) and the memory
free for a new allocation (`free_memory`: Linux's MemAvailable, capped by the cgroup's limit).
device.available_memory shares the latter among a torchrun job's processes."""

from __future__ import annotations

import ctypes
import sys

from ddpm_cli import runtime

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


def free_memory() -> int | None:
    """Bytes of memory free for a new allocation on this machine, or None if unknown: Linux's
    MemAvailable, or less where this process's cgroup (a container) limits its memory."""
    found = [v for v in (_meminfo_available(), _cgroup_available()) if v is not None]
    return min(found) if found else None


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
