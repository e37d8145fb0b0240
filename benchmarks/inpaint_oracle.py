"""How exactly inpainting samples the right conditional distribution, per sampler and RePaint
resampling count, with the exact (oracle) network for Gaussian data (issue 25).

The data: 2x2 single-channel images x ~ N(MU, SIGMA), the top row strongly correlated with the
bottom row. Given the top row, the bottom row is Gaussian with a mean and covariance known in
closed form; inpainting the bottom row must reproduce them. The oracle is E[eps | x_t] in closed
form, so the only errors are the sampler's and RePaint's. Prints, per sampler and R, the error
of the conditional mean and of the conditional standard deviation (in units of the latter),
and the network evaluations per image.

    python benchmarks/inpaint_oracle.py
    python benchmarks/inpaint_oracle.py --n 20000 --resample 1,2,5,10 --jump 10

The data, its exact model and the inpainting are tests/test_editing.py's, which holds one point
of this table (ddpm at R = 10) to a tolerance.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]

from ddpm_cli.sampler_config import SamplerConfig  # noqa: E402
from test_editing import UNKNOWN, conditional, inpaint_gaussian  # noqa: E402

SAMPLERS = {
    "ddpm-100": SamplerConfig(sampler="ddpm", steps=100, variance="small"),
    "ddpm-100-large": SamplerConfig(sampler="ddpm", steps=100, variance="large"),
    "ddpm-250": SamplerConfig(sampler="ddpm", steps=250, variance="small"),
    "ddpm-1000": SamplerConfig(sampler="ddpm", steps=1000, variance="small"),
    "ddim-50-eta1": SamplerConfig(sampler="ddim", steps=50, eta=1.0),
    "ddim-50": SamplerConfig(sampler="ddim", steps=50),
    "dpm++-20": SamplerConfig(sampler="dpm++", steps=20),
    "dpm++-50": SamplerConfig(sampler="dpm++", steps=50),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--samplers", default=",".join(SAMPLERS))
    ap.add_argument("--resample", default="1,2,5,10")
    ap.add_argument("--jump", type=int, default=10)
    args = ap.parse_args()
    print(f"{'sampler':14s} {'R':>3s} {'evals':>6s} {'mean err (sd)':>14s} {'std err':>8s}"
          f"   (standard error of the mean: {1 / args.n**0.5:.4f} sd)")  # fmt: skip
    for name in args.samplers.split(","):
        for r in (int(v) for v in args.resample.split(",")):
            x, known_values, evals = inpaint_gaussian(SAMPLERS[name], args.n, args.jump, r)
            mean, cov = conditional(known_values)
            sd = cov.diagonal().sqrt()
            m = float(((x[:, UNKNOWN].mean(0) - mean).abs() / sd).max())
            s = float((x[:, UNKNOWN].std(0) / sd - 1).abs().max())
            print(f"{name:14s} {r:3d} {evals:6d} {m:14.3f} {s:8.3f}", flush=True)


if __name__ == "__main__":
    main()
