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
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from ddpm_cli.config import DiffusionConfig  # noqa: E402
from ddpm_cli.diffusion import editing  # noqa: E402
from ddpm_cli.diffusion.samplers import config_pairs, evaluations, from_config, run  # noqa: E402
from ddpm_cli.diffusion.schedules import DiffusionTables  # noqa: E402
from ddpm_cli.sampler_config import SamplerConfig  # noqa: E402

TABLES = DiffusionTables.from_config(DiffusionConfig())
MU = torch.tensor([0.1, -0.2, 0.15, 0.05], dtype=torch.float64)
# pixels (0, 1) top row, (2, 3) bottom row; correlation 0.85 between each top pixel and the
# one below it, so the known row moves the unknown one far from its marginal
CORR = torch.tensor(
    [
        [1.0, 0.3, 0.85, 0.25],
        [0.3, 1.0, 0.25, 0.85],
        [0.85, 0.25, 1.0, 0.3],
        [0.25, 0.85, 0.3, 1.0],
    ],
    dtype=torch.float64,
)
SIGMA = 0.09 * CORR  # standard deviation 0.3 per pixel
KNOWN, UNKNOWN = [0, 1], [2, 3]


def exact_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """E[eps | x_t] = sqrt(1 - ab) (ab SIGMA + (1 - ab) I)^-1 (x_t - sqrt(ab) MU)."""
    ab = TABLES.alpha_bar[t].view(-1, 1, 1)
    cov = ab * SIGMA + (1 - ab) * torch.eye(4, dtype=torch.float64)
    d = (x.reshape(-1, 4, 1) - ab.sqrt() * MU.view(1, 4, 1)).to(torch.float64)
    eps = (1 - ab).sqrt() * torch.linalg.solve(cov, d)
    return eps.reshape(x.shape).to(x.dtype)


def oracle(objective: str):
    from ddpm_cli.diffusion.process import predict_x0_from_eps, v_target

    def model(x, t):
        eps = exact_eps(x, t)
        if objective == "eps":
            return eps
        x0 = predict_x0_from_eps(TABLES, x, t, eps)
        return x0 if objective == "x0" else v_target(TABLES, x0, t, eps)

    return model


def conditional(known_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance of the unknown pixels given the known ones (Schur complement)."""
    s_kk = SIGMA[KNOWN][:, KNOWN]
    s_uk = SIGMA[UNKNOWN][:, KNOWN]
    gain = s_uk @ torch.linalg.inv(s_kk)
    mean = MU[UNKNOWN] + gain @ (known_values - MU[KNOWN])
    cov = SIGMA[UNKNOWN][:, UNKNOWN] - gain @ s_uk.T
    return mean, cov


def inpaint_samples(
    sampler: SamplerConfig, known_values: torch.Tensor, n: int, jump: int, resample: int,
    objective: str = "eps", seed: int = 0,
) -> tuple[torch.Tensor, int]:  # fmt: skip
    """n inpaintings of the bottom row given the top row; returns (n, 2) and evaluations."""
    g = torch.Generator().manual_seed(seed)
    g_edit = torch.Generator().manual_seed(seed + 1)

    def noise(shape):
        return torch.randn(shape, generator=g, dtype=torch.float64)

    def edit_noise(shape):
        return torch.randn(shape, generator=g_edit, dtype=torch.float64)

    known = torch.zeros(n, 1, 2, 2, dtype=torch.float64)
    known.view(n, 4)[:, KNOWN] = known_values
    keep = torch.zeros(n, 1, 2, 2, dtype=torch.bool)
    keep.view(n, 4)[:, KNOWN] = True
    pairs = config_pairs(sampler, TABLES, objective)
    edit = editing.inpaint(TABLES, pairs, known, keep, edit_noise, jump, resample)
    x = run(from_config(sampler, oracle(objective), TABLES, noise((n, 1, 2, 2)), noise,
                        objective, edit))  # fmt: skip
    assert torch.equal(x.view(n, 4)[:, KNOWN], known.view(n, 4)[:, KNOWN])
    return x.view(n, 4)[:, UNKNOWN], evaluations(edit.pairs)


def errors(samples: torch.Tensor, known_values: torch.Tensor) -> tuple[float, float]:
    """(max |mean error|, max |std / true std - 1|) over the unknown pixels, in units of the
    true conditional standard deviation for the mean."""
    mean, cov = conditional(known_values)
    std = cov.diagonal().sqrt()
    mean_err = ((samples.mean(0) - mean).abs() / std).max()
    std_err = (samples.std(0) / std - 1).abs().max()
    return float(mean_err), float(std_err)


SAMPLERS = {
    "ddpm-100": SamplerConfig(sampler="ddpm", steps=100, variance="small"),
    "ddpm-250": SamplerConfig(sampler="ddpm", steps=250, variance="small"),
    "ddpm-1000": SamplerConfig(sampler="ddpm", steps=1000, variance="small"),
    "ddpm-100-large": SamplerConfig(sampler="ddpm", steps=100, variance="large"),
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
    # the known row two standard deviations from its mean, against the correlation
    known_values = MU[KNOWN] + torch.tensor([0.6, -0.3], dtype=torch.float64)
    mean, cov = conditional(known_values)
    print(
        f"conditional mean {mean.tolist()}, std {cov.diagonal().sqrt().tolist()}; "
        f"marginal std {math.sqrt(0.09):.3f}; standard error of the mean {1 / args.n**0.5:.4f}"
    )
    print(f"{'sampler':14s} {'R':>3s} {'evals':>6s} {'mean err (sd)':>14s} {'std err':>8s}")
    for name in args.samplers.split(","):
        for r in (int(v) for v in args.resample.split(",")):
            x, evals = inpaint_samples(SAMPLERS[name], known_values, args.n, args.jump, r)
            m, s = errors(x, known_values)
            print(f"{name:14s} {r:3d} {evals:6d} {m:14.3f} {s:8.3f}", flush=True)


if __name__ == "__main__":
    main()
