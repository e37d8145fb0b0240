"""GroupNorm for CPU bfloat16 channels_last input, through an NCHW copy where that is faster.

There, for NHWC bfloat16 input (torch 2.14), the forward kernel switches below 1024 positions
to an algorithm that walks each group's channels with a stride of C, slow when a group holds
few of them, and the backward kernel is slow at any size. Where an NCHW copy measured faster
(docs/benchmarks.md: 1.4-9x forward, 1.4-5.7x with backward), the input is copied to NCHW,
normalised by torch's NCHW kernel, and the result and the input's gradient are copied back to
NHWC: below 1024 positions with fewer than 16 channels per group, and with a backward pass to
follow, up to 64x64 with 4 or fewer. The precision is the same; a few values differ in their
last bit (another summation order).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ddpm_cli.model.kernels.winograd import compiling


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm that takes the NCHW copy where `nchw_is_faster`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not nchw_is_faster(x, self.num_groups):
            return super().forward(x)
        y = F.group_norm(ToNCHW.apply(x), self.num_groups, self.weight, self.bias, self.eps)
        return y.contiguous(memory_format=torch.channels_last)


def nchw_is_faster(x: torch.Tensor, groups: int) -> bool:
    """Whether GroupNorm on `x` runs faster through an NCHW copy (the module's docstring)."""
    if x.device.type != "cpu" or x.dtype != torch.bfloat16 or x.dim() != 4:
        return False
    if x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last):
        return False
    if compiling():  # inductor writes its own normalisation
        return False
    per_group, positions = x.shape[1] // groups, x.shape[2] * x.shape[3]
    if per_group < 16 and positions < 1024:
        return True
    return x.requires_grad and per_group <= 4 and positions <= 4096


class ToNCHW(torch.autograd.Function):
    """An NCHW copy of an NHWC tensor whose gradient goes back NHWC, the layout of the layers
    before it (an NCHW gradient would be converted there, or summed with NHWC ones)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous(memory_format=torch.channels_last)
