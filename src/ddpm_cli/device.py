"""Device selection and seeded randomness.

`resolve_device("auto")` picks CUDA, then MPS, then the CPU. Sampling noise is drawn on the CPU
from an explicit `torch.Generator` and then moved, so one seed gives the same images' noise on every
device. Host-to-device copies go through `to_device`, which does not wait for the device.
"""

from __future__ import annotations

import re
import secrets

import torch

from ddpm_cli.errors import DeviceError

DEVICE_HELP = "auto, cpu, cuda, cuda:N or mps"
_CUDA_INDEX = re.compile(r"cuda:(\d+)")


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


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
