"""GroupNorm on channels_last CPU tensors: torch's kernel against an NCHW copy, shape by shape,
in one process: the measurements behind kernels.groupnorm.GroupNorm (which inputs take the copy).

    python benchmarks/groupnorm.py
    python benchmarks/groupnorm.py --dtype float32 --shapes 16x128x32,4x128x128

For each shape (batch x channels x size) it prints one JSON line: the median milliseconds of a
forward pass and of forward + backward (gradients of input, weight and bias) through
F.group_norm on the channels_last input ("native") and through an NCHW copy, normalised and
copied back to channels_last ("nchw", what kernels.groupnorm.GroupNorm does where it picks it), the
speedups, whether ddpm picks the copy for a forward pass and for training, and each method's
largest error against float64, relative to the output's scale. Weights are float32, as in
training under autocast. The default shapes are those of the cifar10 and small presets at
batch 16, and larger images.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from winograd import timed  # benchmarks/winograd.py

from ddpm_cli.host import tune_allocator
from ddpm_cli.model.kernels.groupnorm import ToNCHW, nchw_is_faster

SHAPES = "16x32x32,16x64x16,16x64x8,16x96x32,16x128x32,16x256x32,16x256x16,16x384x16,16x512x8"
SHAPES += ",16x64x64,4x128x128,1x128x256"


def shape(batch: int, channels: int, size: int, reps: int, dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(0)
    last = torch.channels_last
    x = torch.randn(batch, channels, size, size, generator=g) * 2 + 1
    x = x.to(dtype, memory_format=last)
    w = 1 + 0.1 * torch.randn(channels, generator=g)
    b = 0.1 * torch.randn(channels, generator=g)
    grad = torch.randn(x.shape, generator=g).to(dtype, memory_format=last)
    groups = min(32, channels)

    def native(x, w, b):
        return F.group_norm(x, groups, w, b, 1e-6)

    def nchw(x, w, b):  # as ddpm's GroupNorm does it: the gradient goes back NHWC
        return F.group_norm(ToNCHW.apply(x), groups, w, b, 1e-6).contiguous(memory_format=last)

    ref = F.group_norm(x.double(), groups, w.double(), b.double(), 1e-6)
    training = x.detach().requires_grad_()
    row = {"dtype": str(dtype).removeprefix("torch."), "batch": batch, "channels": channels,
           "size": size, "ddpm_copies_forward": nchw_is_faster(x, groups),
           "ddpm_copies_training": nchw_is_faster(training, groups)}  # fmt: skip
    for name, norm in (("native", native), ("nchw", nchw)):
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        with torch.no_grad():
            out = norm(x, w, b)
            row[f"{name}_fwd_ms"] = timed(lambda norm=norm: norm(x, w, b), reps)
        row[f"{name}_fwd_bwd_ms"] = timed(
            lambda norm=norm, leaves=leaves: norm(*leaves).backward(grad), reps
        )
        row[f"{name}_error"] = ((out.double() - ref).abs().max() / ref.abs().max()).item()
    row["nchw_speedup_fwd"] = row["native_fwd_ms"] / row["nchw_fwd_ms"]
    row["nchw_speedup_fwd_bwd"] = row["native_fwd_bwd_ms"] / row["nchw_fwd_bwd_ms"]
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shapes", default=SHAPES, help="comma-separated batch x channels x size")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    args = p.parse_args()
    tune_allocator()  # as the ddpm command does
    for spec in args.shapes.split(","):
        batch, channels, size = (int(v) for v in spec.split("x"))
        row = shape(batch, channels, size, args.reps, getattr(torch, args.dtype))
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
