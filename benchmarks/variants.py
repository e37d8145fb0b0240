"""Forward-pass variants of ddpm's network, side by side in one process: which way of running
the sampling network is fastest on this device (the experiments behind forward.network).

    python benchmarks/variants.py --preset cifar10 --batch 256 --variants eager,graphs
    python benchmarks/variants.py --variants compile,compile-autotune --evals 50

Variants (comma-separated; each is run under bf16 autocast unless named `pure` or `fp32`):
  fp32, fp32-compile    float32, eager and torch.compile'd (for the CPU)
  eager             the network as it is, channels_last weights (device.place)
  pure              weights cast to bf16 once, inputs bf16, no autocast
  graphs, pure-graphs   the above replayed from a CUDA graph (forward.GraphedForward)
  compile           torch.compile (default mode), then CUDA graphs
  pure-compile      the same on bf16 weights
  compile-autotune  torch.compile(mode="max-autotune-no-cudagraphs"), then CUDA graphs

Each prints one JSON line: variant, img/s, the warm-up seconds (compilation), and the largest
difference from the eager fp32 output relative to its scale (a check, not a speed).
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from ddpm_cli.device import place, resolve_device
from ddpm_cli.model.forward import GraphedForward
from ddpm_cli.model.presets import build_model_config
from ddpm_cli.model.unet import UNet


def variant(name: str, model: UNet, device: torch.device):
    pure = name.startswith("pure")
    net = copy.deepcopy(model).to(torch.bfloat16) if pure else model
    if "compile" in name:
        mode = "max-autotune-no-cudagraphs" if "autotune" in name else None
        net = torch.compile(net, mode=mode)

    def forward(x, t):
        if name.startswith("fp32"):
            return net(x, t)
        if pure:
            return net(x.to(torch.bfloat16), t).float()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return net(x, t).float()

    graphs = device.type == "cuda" and ("graphs" in name or "compile" in name)
    return GraphedForward(forward) if graphs else forward


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="cifar10")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--evals", type=int, default=30)
    p.add_argument("--variants", default="eager,pure,graphs,pure-graphs")
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    model = place(UNet(build_model_config(args.preset, (32, 32), 3)), device).eval()
    for p_ in model.parameters():  # zero-initialised layers would hide differences
        torch.nn.init.normal_(p_, std=0.02)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32, generator=g).to(device)
    t = torch.randint(0, 1000, (args.batch,), generator=g).to(device)
    with torch.no_grad():
        reference = model(x, t).float()
        for name in args.variants.split(","):
            start = time.perf_counter()
            fn = variant(name, model, device)
            out = fn(x, t)
            fn(x, t)
            sync(device)
            warm = time.perf_counter() - start
            start = time.perf_counter()
            for _ in range(args.evals):
                fn(x, t)
            sync(device)
            seconds = time.perf_counter() - start
            error = ((out - reference).abs().max() / reference.abs().max()).item()
            row = {"variant": name, "preset": args.preset, "device": str(device),
                   "batch": args.batch, "img_per_s": args.evals * args.batch / seconds,
                   "warmup_s": warm, "max_rel_error": error}  # fmt: skip
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
