"""Named beta schedules and the float64 tables derived from them.

Every schedule is a small pure function `T -> betas` returning a float64 tensor of shape (T,).
`DiffusionTables.build` turns the betas into every per-timestep quantity the diffusion math needs,
all in float64; `DiffusionTables.to` then stores them in the model's dtype on its device.

Timesteps are zero-based, as in the authors' code: index t in [0, T-1] is the paper's t+1.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields

import torch

from ddpm_cli.config import DiffusionConfig, Schedule

MAX_BETA = 0.999  # caps betas so that alpha_t = 1 - beta_t never reaches 0 (Nichol & Dhariwal)
COSINE_S = 0.008  # Nichol & Dhariwal 2021, eq. 17: keeps beta_t from being tiny near t = 0


def _scaled_ends(T: int) -> tuple[float, float]:
    """The paper's beta_1 = 1e-4 and beta_T = 0.02 at T=1000, scaled by 1000/T for other T.

    The scaling (from improved-diffusion) keeps the total amount of noise roughly the same for
    any T. For T <= 20 the end exceeds MAX_BETA; the schedules cap their betas there.
    """
    scale = 1000.0 / T
    return scale * 1e-4, scale * 0.02


def linear_betas(T: int) -> torch.Tensor:
    start, end = _scaled_ends(T)
    return torch.linspace(start, end, T, dtype=torch.float64).clamp(max=MAX_BETA)


def quadratic_betas(T: int) -> torch.Tensor:
    start, end = _scaled_ends(T)
    root = torch.linspace(math.sqrt(start), math.sqrt(end), T, dtype=torch.float64)
    return (root**2).clamp(max=MAX_BETA)


def sigmoid_betas(T: int) -> torch.Tensor:
    start, end = _scaled_ends(T)
    s = torch.sigmoid(torch.linspace(-6.0, 6.0, T, dtype=torch.float64))
    return (s * (end - start) + start).clamp(max=MAX_BETA)


def cosine_betas(T: int) -> torch.Tensor:
    """beta_t = 1 - f(t+1)/f(t) with f(u) = cos((u/T + s)/(1 + s) * pi/2)^2, capped at 0.999."""
    u = torch.arange(T + 1, dtype=torch.float64) / T
    f = torch.cos((u + COSINE_S) / (1 + COSINE_S) * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=MAX_BETA)


SCHEDULES = {
    Schedule.linear: linear_betas,
    Schedule.cosine: cosine_betas,
    Schedule.quadratic: quadratic_betas,
    Schedule.sigmoid: sigmoid_betas,
}


def make_betas(config: DiffusionConfig) -> torch.Tensor:
    """The float64 betas of shape (T,) for a configuration."""
    if config.schedule is None:
        raise ValueError("the schedule is still the preset's: resolve it first (run.train does)")
    return SCHEDULES[config.schedule](config.timesteps)


@dataclass(frozen=True)
class DiffusionTables:
    """Per-timestep quantities of the forward process, each a 1-D tensor of shape (T,).

    Symbols follow Ho et al. 2020: alpha_t = 1 - beta_t, alpha_bar_t = prod_{s<=t} alpha_s,
    and the posterior q(x_{t-1} | x_t, x_0) = N(coef1 * x_0 + coef2 * x_t, beta_tilde) (eq. 6-7).
    """

    betas: torch.Tensor
    alphas: torch.Tensor
    alpha_bar: torch.Tensor
    alpha_bar_prev: torch.Tensor  # alpha_bar_{t-1}, with alpha_bar_{-1} = 1
    sqrt_alpha_bar: torch.Tensor
    sqrt_one_minus_alpha_bar: torch.Tensor
    log_one_minus_alpha_bar: torch.Tensor
    sqrt_recip_alpha_bar: torch.Tensor  # 1 / sqrt(alpha_bar)
    sqrt_recipm1_alpha_bar: torch.Tensor  # sqrt(1 / alpha_bar - 1)
    beta_tilde: torch.Tensor  # posterior variance, eq. 7; exactly 0 at t = 0
    # log(beta_tilde) with the t = 0 entry replaced by t = 1's, since beta_tilde_0 = 0
    beta_tilde_log_clipped: torch.Tensor
    posterior_mean_coef1: torch.Tensor  # multiplies x_0
    posterior_mean_coef2: torch.Tensor  # multiplies x_t
    snr: torch.Tensor  # alpha_bar / (1 - alpha_bar)

    @property
    def timesteps(self) -> int:
        return self.betas.shape[0]

    @functools.cached_property
    def host_alpha_bar(self) -> list[float]:
        """alpha_bar as Python floats (the values of this copy's dtype), read from the device
        once: samplers need scalars every step, and reading one from a GPU waits for it."""
        return self.alpha_bar.double().cpu().tolist()

    @classmethod
    def build(cls, betas: torch.Tensor) -> DiffusionTables:
        """All tables from betas of shape (T,), computed in float64."""
        betas = betas.to(torch.float64)
        alphas = 1.0 - betas
        alpha_bar = torch.cumprod(alphas, dim=0)
        alpha_bar_prev = torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]])
        beta_tilde = betas * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar)
        if betas.shape[0] > 1:
            log_clipped = torch.log(torch.cat([beta_tilde[1:2], beta_tilde[1:]]))
        else:  # T = 1: beta_tilde is all zeros; log of beta is the only finite choice
            log_clipped = torch.log(betas)
        return cls(
            betas=betas,
            alphas=alphas,
            alpha_bar=alpha_bar,
            alpha_bar_prev=alpha_bar_prev,
            sqrt_alpha_bar=alpha_bar.sqrt(),
            sqrt_one_minus_alpha_bar=(1.0 - alpha_bar).sqrt(),
            log_one_minus_alpha_bar=torch.log1p(-alpha_bar),
            sqrt_recip_alpha_bar=alpha_bar.rsqrt(),
            sqrt_recipm1_alpha_bar=(1.0 / alpha_bar - 1.0).sqrt(),
            beta_tilde=beta_tilde,
            beta_tilde_log_clipped=log_clipped,
            posterior_mean_coef1=betas * alpha_bar_prev.sqrt() / (1.0 - alpha_bar),
            posterior_mean_coef2=(1.0 - alpha_bar_prev) * alphas.sqrt() / (1.0 - alpha_bar),
            snr=alpha_bar / (1.0 - alpha_bar),
        )

    @classmethod
    def from_config(cls, config: DiffusionConfig) -> DiffusionTables:
        return cls.build(make_betas(config))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        """A copy with every table cast to `dtype` (after the float64 math), moved to `device`."""
        return DiffusionTables(
            **{f.name: getattr(self, f.name).to(device=device, dtype=dtype) for f in fields(self)}
        )
