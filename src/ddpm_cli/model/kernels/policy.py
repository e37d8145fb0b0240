"""The one place that decides which of ddpm's fast paths a network's layers take.

The U-Net is written with torch's own layers (unet.py); `install` then gives each layer that
has a fast path its subclass here, once, when the network is built. The subclasses keep the
parameters, names and function of torch's layer, and still look at each input (device, dtype,
shape) to take the fast path only where it was measured faster (docs/benchmarks.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ddpm_cli.model.kernels.dropout import Dropout
from ddpm_cli.model.kernels.groupnorm import GroupNorm
from ddpm_cli.model.kernels.winograd import Conv3x3


@dataclass(frozen=True)
class KernelPolicy:
    """Which fast paths a network may take."""

    conv3x3: bool = True  # Winograd 3x3 convolutions and bf16 rounding (winograd.py)
    groupnorm_nchw: bool = True  # CPU bf16 GroupNorm through an NCHW copy (groupnorm.py)
    cpu_dropout: bool = True  # dropout masks from 16-bit random integers (dropout.py)


FAST = KernelPolicy()
TORCH = KernelPolicy(conv3x3=False, groupnorm_nchw=False, cpu_dropout=False)


def _is_conv3x3(m: nn.Module) -> bool:
    return (
        m.kernel_size == (3, 3) and m.stride == (1, 1) and m.padding == (1, 1)
        and m.dilation == (1, 1) and m.groups == 1 and m.padding_mode == "zeros"
    )  # fmt: skip


# (torch's layer, its fast subclass, the policy's switch for it)
_PATHS = (
    (nn.Conv2d, Conv3x3, "conv3x3"),
    (nn.GroupNorm, GroupNorm, "groupnorm_nchw"),
    (nn.Dropout, Dropout, "cpu_dropout"),
)


def install(model: nn.Module, policy: KernelPolicy = FAST) -> nn.Module:
    """Give `model`'s layers the fast paths `policy` allows, and torch's own layers where it
    does not (in place, any number of times; returns `model`)."""
    for m in model.modules():
        for base, fast, switch in _PATHS:
            if type(m) in (base, fast) and (base is not nn.Conv2d or _is_conv3x3(m)):
                m.__class__ = fast if getattr(policy, switch) else base
    return model
