"""The one place that decides which of ddpm's fast paths a network's layers take.

The U-Net is written with torch's own layers (unet.py); `install` then gives each layer that
has a fast path its subclass here, once, when the network is built. The subclasses keep the
parameters, names and function of torch's layer, and still look at each input (device, dtype,
shape) to take the fast path only where it was measured faster. `default_policy` leaves out
the paths that measured slower on this kind of CPU (docs/benchmarks.md, "Which fast paths
earn their place").
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import nn

from ddpm_cli.device import cpu_id
from ddpm_cli.model.kernels.groupnorm import GroupNorm
from ddpm_cli.model.kernels.winograd import Conv3x3


@dataclass(frozen=True)
class KernelPolicy:
    """Which fast paths a network may take."""

    conv3x3: bool = True  # Winograd 3x3 convolutions and bf16 rounding (winograd.py)
    groupnorm_nchw: bool = True  # CPU bf16 GroupNorm through an NCHW copy (groupnorm.py)


FAST = KernelPolicy()
TORCH = KernelPolicy(conv3x3=False, groupnorm_nchw=False)


def default_policy() -> KernelPolicy:
    """FAST, but torch's own 3x3 convolutions on AMD CPUs from Zen 5 (family 26) on: there
    oneDNN's AVX-512 direct convolution beat Winograd in every layer (0.63-0.94x) and in whole
    steps (cifar10: 0.85x training, 0.88x sampling), and its bf16 kernels beat the bf16
    rounding path (0.52-0.74x). Elsewhere Winograd measured 1.29x (Intel, AVX-512) to 1.44x
    (AMD Zen 3, AVX2) on cifar10 training steps."""
    cpu = cpu_id()
    if cpu is not None and cpu[0] == "AuthenticAMD" and cpu[1] >= 26:
        return replace(FAST, conv3x3=False)
    return FAST


def _is_conv3x3(m: nn.Module) -> bool:
    return (
        m.kernel_size == (3, 3) and m.stride == (1, 1) and m.padding == (1, 1)
        and m.dilation == (1, 1) and m.groups == 1 and m.padding_mode == "zeros"
    )  # fmt: skip


# (torch's layer, its fast subclass, the policy's switch for it)
_PATHS = (
    (nn.Conv2d, Conv3x3, "conv3x3"),
    (nn.GroupNorm, GroupNorm, "groupnorm_nchw"),
)


def install(model: nn.Module, policy: KernelPolicy | None = None) -> nn.Module:
    """Give `model`'s layers the fast paths `policy` (default_policy() for None) allows, and
    torch's own layers where it does not (in place, any number of times; returns `model`)."""
    policy = default_policy() if policy is None else policy
    for m in model.modules():
        for base, fast, switch in _PATHS:
            if type(m) in (base, fast) and (base is not nn.Conv2d or _is_conv3x3(m)):
                m.__class__ = fast if getattr(policy, switch) else base
    return model
