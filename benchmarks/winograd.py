"""Winograd F(4x4, 3x3) against torch's direct convolution, layer by layer, in one process:
the measurements behind winograd.applies (which layers take it) and its accuracy.

    python benchmarks/winograd.py
    python benchmarks/winograd.py --batch 64 --shapes 128x128x32,32x32x32
    python benchmarks/winograd.py --dtype bfloat16
    ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 python benchmarks/winograd.py --dtype bfloat16 \
        --shapes 32x32x32,64x64x16   # as on a CPU without AMX

For each 3x3 layer shape (in_channels x out_channels x size) it prints one JSON line: the
median milliseconds of a forward pass and of forward + backward (gradients of input, weight and
bias) through F.conv2d and through winograd.conv3x3, the forward pass with the transformed
filters computed beforehand (as sampling runs it), the speedups, whether winograd.applies picks
it for sampling and for training, and each method's largest error against a float64
convolution, relative to the output's scale. In bfloat16 it also times torch's float32 direct
convolution between bf16 roundings ("rounded", conv3x3 with direct=True, what ddpm runs for
layers Winograd declines on x86 CPUs without AMX) and says where ddpm runs it, for sampling and
for training (winograd.rounds_in_float32 where winograd.applies declines).
Inputs and weights are channels_last, as the network runs them. The default shapes are the 3x3
convolutions of the cifar10 preset (at batch 16, as bench.py's CPU rows) and of the small one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from ddpm_cli.host import tune_allocator
from ddpm_cli.model.kernels import winograd

SHAPES = "128x128x32,256x128x32,128x256x16,256x256x16,512x256x16,384x256x16,256x256x8,512x256x8"
SHAPES += ",256x256x4,32x32x32,64x64x16,96x64x16,64x64x8"


def timed(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def layer(batch: int, ci: int, co: int, size: int, reps: int, dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(0)
    last = torch.channels_last
    x = torch.randn(batch, ci, size, size, generator=g).to(dtype, memory_format=last)
    w = (torch.randn(co, ci, 3, 3, generator=g) / (9 * ci) ** 0.5).to(dtype, memory_format=last)
    b = (torch.randn(co, generator=g) * 0.1).to(dtype)
    grad = torch.randn(batch, co, size, size, generator=g).to(dtype, memory_format=last)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    methods = {"direct": lambda *a: F.conv2d(*a, padding=1), "winograd": winograd.conv3x3}
    if dtype == torch.bfloat16:
        methods["rounded"] = lambda *a: winograd.conv3x3(*a, direct=True)
    ref = F.conv2d(x.double(), w.double(), b.double(), padding=1)
    rounds = winograd.rounds_in_float32(x, w)  # where Winograd declines
    row = {"dtype": str(dtype).removeprefix("torch."), "batch": batch, "in": ci, "out": co,
           "size": size,
           "applies_sampling": winograd.applies(x, w),
           "applies_training": winograd.applies(x, w, grad=True),
           "rounds_sampling": rounds and not winograd.applies(x, w),
           "rounds_training": rounds and not winograd.applies(x, w, grad=True)}  # fmt: skip
    for name, conv in methods.items():
        with torch.no_grad():
            out = conv(x, w, b)
            row[f"{name}_err"] = float((out.double() - ref).abs().max() / ref.abs().max())
            row[f"{name}_fwd_ms"] = timed(lambda conv=conv: conv(x, w, b), reps)

        def step(conv=conv):
            for leaf in leaves:
                leaf.grad = None
            conv(*leaves).backward(grad)

        row[f"{name}_fwd_bwd_ms"] = timed(step, reps)
    kept = winograd.filters(w.float())  # as sampling runs it, inside winograd.keep_filters()
    with torch.no_grad():
        row["winograd_kept_fwd_ms"] = timed(lambda: winograd.conv3x3(x, w, b, kept), reps)
    row["fwd_speedup"] = row["direct_fwd_ms"] / row["winograd_fwd_ms"]
    row["kept_fwd_speedup"] = row["direct_fwd_ms"] / row["winograd_kept_fwd_ms"]
    row["fwd_bwd_speedup"] = row["direct_fwd_bwd_ms"] / row["winograd_fwd_bwd_ms"]
    if "rounded" in methods:
        row["rounded_fwd_speedup"] = row["direct_fwd_ms"] / row["rounded_fwd_ms"]
        row["rounded_fwd_bwd_speedup"] = row["direct_fwd_bwd_ms"] / row["rounded_fwd_bwd_ms"]
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--shapes", default=SHAPES, help="comma-separated in x out x size")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="bfloat16: bf16 tensors (Winograd computes in float32)")  # fmt: skip
    args = p.parse_args()
    tune_allocator()  # as the ddpm command does: fresh 10-40 MB buffers otherwise page-fault
    for shape in args.shapes.split(","):
        ci, co, size = (int(v) for v in shape.split("x"))
        row = layer(args.batch, ci, co, size, args.reps, getattr(torch, args.dtype))
        print(json.dumps({k: round(v, 7) if isinstance(v, float) else v for k, v in row.items()}),
              flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
