"""Device selection and seeded randomness.

`resolve_device("auto")` picks CUDA, then MPS, then the CPU. Sampling noise is drawn on the CPU
from an explicit `torch.Generator` and then moved, so one seed gives the same images' noise on every
device. Host-to-device copies go through `to_device`, which does not wait for the device.
Networks go to their device through `place` (channels_last weights). What the machine has free
for a new allocation comes from host.py, shared among a torchrun job's local processes.
"""

from __future__ import annotations

import functools
import platform
import re
import secrets

import torch

from ddpm_cli import host, runtime
from ddpm_cli.config import DEVICE_HELP
from ddpm_cli.distributed import local_processes
from ddpm_cli.errors import DeviceError

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


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation by this process, or None if unknown: the
    machine's free memory (host.free_memory) shared evenly among the processes a torchrun job
    starts on it (each holds its own copy of the data and its own step)."""
    free = host.free_memory()
    return None if free is None else free // local_processes()
