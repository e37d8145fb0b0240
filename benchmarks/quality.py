"""Sample quality against time, per sampler, for trained checkpoints of the built-in dataset.

    python benchmarks/quality.py runs/shapes-1/model.safetensors [more.safetensors ...]
    python benchmarks/quality.py M.safetensors --samplers dpm++:10,dpm++:20,ddpm:100:small -n 256

For each checkpoint and sampler: seconds per image on this machine, and two distances between
the samples and images of the training data (nothing here needs downloaded weights):

- SWD: sliced Wasserstein-1 distance between the images as vectors, at 32x32 (detail, noise)
  and 8x8 (colours and layout), averaged over 256 random unit directions; 0 for identical
  distributions. The 8x8 figure of two independent sets of 256 data images is the noise floor.
- grain: the mean absolute response to a 3x3 Laplacian, relative to the data's (1.0 = as
  smooth as the data; leftover noise pushes it up).
- vs first: with several --precision values, the mean absolute difference from the first
  precision's samples of the same seeds, in 8-bit levels.

Numbers print to stdout; this is an experiment that informs defaults, not a test.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from ddpm_cli.config import Precision
from ddpm_cli.data.builtin import DATASETS
from ddpm_cli.generation.sampling import generate, load_for_sampling
from ddpm_cli.sampler_config import SamplerConfig

LAPLACE = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])


def swd(a: torch.Tensor, b: torch.Tensor, directions: int = 256, seed: int = 0) -> float:
    """Sliced Wasserstein-1 between two equal-sized sets of vectors (rows)."""
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(a.shape[1], directions, generator=g, dtype=torch.float64)
    d /= d.norm(dim=0, keepdim=True)
    pa, pb = (a.double() @ d).sort(0).values, (b.double() @ d).sort(0).values
    return float((pa - pb).abs().mean())


def grain(x: torch.Tensor) -> float:
    k = LAPLACE.view(1, 1, 3, 3).repeat(x.shape[1], 1, 1, 1)
    return float(F.conv2d(x.float(), k, groups=x.shape[1]).abs().mean())


def scores(samples: torch.Tensor, data: torch.Tensor) -> dict:
    n = samples.shape[0]
    small = lambda x: F.avg_pool2d(x.float(), x.shape[-1] // 8)  # noqa: E731
    return {
        "swd32": swd(samples.flatten(1), data[:n].flatten(1)),
        "swd8": swd(small(samples).flatten(1), small(data[:n]).flatten(1)),
        "grain": grain(samples) / grain(data[:n]),
    }


def parse_sampler(spec: str) -> SamplerConfig:
    """name[:steps[:variance-or-eta]], e.g. dpm++:20, ddpm:100:small, ddim:50:1."""
    parts = spec.split(":")
    kw: dict = {"sampler": parts[0]}
    if len(parts) > 1:
        kw["steps"] = int(parts[1])
    if len(parts) > 2:
        if parts[0] == "ddpm":
            kw["variance"] = parts[2]
        else:
            kw["eta"] = float(parts[2])
    return SamplerConfig(**kw)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("checkpoints", nargs="+")
    p.add_argument(
        "--samplers",
        default="dpm++:10,dpm++:20,dpm++:50,ddim:50,ddim:100:1,ddpm:100:small,ddpm:100:large",
    )
    p.add_argument("-n", type=int, default=256, help="samples per row")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", default="fp32", help="comma-separated: fp32, bf16")
    args = p.parse_args()
    device = torch.device("cpu")
    data = DATASETS["shapes"](size=32)[0].float() / 127.5 - 1
    data = data[torch.randperm(data.shape[0], generator=torch.Generator().manual_seed(1))]
    floor = scores(data[: args.n], data[args.n : 2 * args.n])
    print(f"# noise floor (two sets of {args.n} data images): " + _fmt(floor))
    print(f"{'checkpoint':<28} {'sampler':<18} {'prec':<5} {'s/img':>7} {'swd32':>7} {'swd8':>7} "
          f"{'grain':>6} {'vs first':>8}")  # fmt: skip
    for path in args.checkpoints:
        sm = load_for_sampling(path, device=device)
        for spec in args.samplers.split(","):
            config = parse_sampler(spec)
            first = None  # the first precision's samples: the same seeds, pixel by pixel
            for precision in args.precision.split(","):
                t0 = time.perf_counter()
                batches = generate(sm, config, list(range(args.n)), args.seed, args.batch_size,
                                   device, Precision(precision))  # fmt: skip
                samples = torch.cat([x for _, x in batches])
                seconds = (time.perf_counter() - t0) / args.n
                first = samples if first is None else first
                apart = float((samples - first).abs().mean()) * 127.5  # in 8-bit levels
                s = scores(samples, data)
                name = f"{path.split('/')[-2] if '/' in path else path} ({sm.objective})"
                print(f"{name:<28} {spec:<18} {precision:<5} {seconds:>7.3f} "
                      + _fmt(s, short=True) + f" {apart:>8.2f}", flush=True)  # fmt: skip


def _fmt(s: dict, short: bool = False) -> str:
    if short:
        return f"{s['swd32']:>7.4f} {s['swd8']:>7.4f} {s['grain']:>6.2f}"
    return " ".join(f"{k} {v:.4f}" for k, v in s.items())


if __name__ == "__main__":
    main()
