"""Dropout on the CPU from 16-bit random integers.

There, drawing a Bernoulli mask costs more than the rest of the layer several times over; the
mask here comes from 16-bit random integers (four per 64-bit draw), so p is rounded to a
multiple of 1/65536 (0.1 becomes 0.100006). Like F.dropout it draws from torch's global
generator, so a seed fixes it. On CUDA and MPS the layer is F.dropout.
"""

from __future__ import annotations

import torch
from torch import nn


class Dropout(nn.Dropout):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu":
            return super().forward(x)
        n = x.numel()
        words = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64)
        keep = words.view(torch.int16)[:n].view(x.shape) >= round(self.p * 65536) - 32768
        return x * keep.to(x.dtype).mul_(1.0 / (1.0 - self.p))
