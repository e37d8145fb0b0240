"""Samplers: walk explicit (t, t_prev) pairs from one timestep list, as generators.

Each sampler yields a `SampleStep` after every network evaluation, so callers draw progress bars
and trajectory previews without the sampler knowing about them. The last step has t_prev = -1
and its `x` is the sample.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from ddpm_cli.diffusion import extract, predict_x0_and_eps
from ddpm_cli.schedules import DiffusionTables

NoiseFn = Callable[[tuple[int, ...]], torch.Tensor]  # shape -> standard normal noise


def timestep_pairs(T: int, steps: int | None = None) -> list[tuple[int, int]]:
    """(t, t_prev) pairs from T-1 down to -1 ("x_0"), over `steps` evenly spaced timesteps.

    steps None or T: every timestep, the paper's Algorithm 2.
    """
    steps = T if steps is None else steps
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in [1, {T}], got {steps}")
    ts = torch.linspace(T - 1, 0, steps, dtype=torch.float64).round().long().tolist()
    ts = sorted(set(ts), reverse=True)
    return list(zip(ts, ts[1:] + [-1], strict=True))


@dataclass(frozen=True)
class SampleStep:
    index: int  # 0-based number of this step
    total: int  # number of steps
    t: int
    t_prev: int
    x: torch.Tensor  # x_{t_prev}; the sample itself after the last step
    x0: torch.Tensor  # the model's prediction of x_0 at this step


def _alpha_bar(tables: DiffusionTables, t: int, like: torch.Tensor) -> torch.Tensor:
    if t < 0:
        return torch.ones(like.shape[0], *([1] * (like.ndim - 1)), device=like.device)
    return extract(
        tables.alpha_bar, torch.full((like.shape[0],), t, device=like.device), like.shape
    )


@torch.no_grad()
def ddpm(
    model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    tables: DiffusionTables,
    x_T: torch.Tensor,
    noise: NoiseFn,
    objective: str = "eps",
    steps: int | None = None,
    variance: str = "large",
    clip: bool = True,
) -> Iterator[SampleStep]:
    """Ancestral sampling, Algorithm 2 of Ho et al. 2020, over (t, t_prev) pairs.

    With fewer steps than T, each pair's beta is respaced, 1 - alpha_bar_t / alpha_bar_{t_prev}
    (as improved-diffusion's respacing does), so the chain stays a valid diffusion.
    variance: "large" (sigma^2 = beta, the authors' CIFAR-10 choice) or "small" (beta_tilde).
    """
    pairs = timestep_pairs(tables.timesteps, steps)
    x = x_T
    for i, (t, t_prev) in enumerate(pairs):
        t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        # 1. predict x_0 (clipped to the data range) from the network's output
        x0, _ = predict_x0_and_eps(tables, objective, x, t_batch, model(x, t_batch).to(x.dtype))
        if clip:
            x0 = x0.clamp(-1, 1)
        # 2. the posterior q(x_{t_prev} | x_t, x_0) of eq. 7, with this pair's beta
        ab_t, ab_prev = _alpha_bar(tables, t, x), _alpha_bar(tables, t_prev, x)
        beta = 1 - ab_t / ab_prev
        mean = (ab_prev.sqrt() * beta * x0 + (1 - beta).sqrt() * (1 - ab_prev) * x) / (1 - ab_t)
        # 3. add noise, except at the last step (Algorithm 2, line 4: z = 0 when t = 1)
        if t_prev >= 0:
            var = beta if variance == "large" else beta * (1 - ab_prev) / (1 - ab_t)
            x = mean + var.sqrt() * noise(tuple(x.shape)).to(x.device, x.dtype)
        else:
            x = mean
        yield SampleStep(i, len(pairs), t, t_prev, x, x0)


def run(steps: Iterator[SampleStep]) -> torch.Tensor:
    """Exhaust a sampler and return the final sample."""
    x = None
    for step in steps:
        x = step.x
    if x is None:
        raise ValueError("sampler produced no steps")
    return x
