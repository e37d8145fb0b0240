"""Previews of the forward process for `ddpm noise`: pure tensor functions, no I/O.

`noised` draws x_t for several t in closed form from one shared eps, so a strip shows one noise
pattern growing. `chain` runs the Markov chain q(x_t | x_{t-1}) step by step, as an animation
should, and yields the frames asked for. `step_stats` reports what each t means.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch

from ddpm_cli.device import randn
from ddpm_cli.diffusion.process import q_sample, q_step
from ddpm_cli.diffusion.schedules import DiffusionTables


def noised(
    tables: DiffusionTables, x0: torch.Tensor, ts: Sequence[int], eps: torch.Tensor
) -> torch.Tensor:
    """x_t for each t in `ts` from one x0 (C, H, W) and one eps (C, H, W): (len(ts), C, H, W)."""
    t = torch.tensor(list(ts), dtype=torch.long, device=x0.device)
    n = t.shape[0]
    return q_sample(tables, x0.expand(n, *x0.shape), t, eps.expand(n, *eps.shape))


def frame_times(T: int, frames: int) -> list[int]:
    """`frames` timesteps spread evenly over [0, T-1], always including both ends."""
    if frames >= T:
        return list(range(T))
    if frames == 1:
        return [T - 1]
    return sorted({round(i * (T - 1) / (frames - 1)) for i in range(frames)})


def chain(
    tables: DiffusionTables,
    x0: torch.Tensor,
    keep: Sequence[int],
    generator: torch.Generator,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Run x_t ~ q(x_t | x_{t-1}) from t = 0 to max(keep), yielding (t, x_t) for t in `keep`.

    x0 has shape (C, H, W); fresh noise is drawn from `generator` at every step (eq. 2).
    """
    wanted = set(keep)
    x = x0.unsqueeze(0)
    for t in range(max(wanted) + 1):
        eps = randn(tuple(x.shape), generator, device=x.device, dtype=x.dtype)
        x = q_step(tables, x, torch.tensor([t], device=x.device), eps)
        if t in wanted:
            yield t, x[0]


def step_stats(tables: DiffusionTables, ts: Sequence[int]) -> list[dict]:
    """For each t: alpha_bar_t, SNR and SNR in dB, and the weights of signal and noise in x_t.

    `tables` should be the float64 tables, so the reported numbers are exact.
    """
    out = []
    for t in ts:
        alpha_bar = float(tables.alpha_bar[t])
        snr = float(tables.snr[t])
        out.append(
            {
                "t": int(t),
                "beta": float(tables.betas[t]),
                "alpha_bar": alpha_bar,
                "snr": snr,
                "snr_db": 10.0 * math.log10(snr) if snr > 0 else -math.inf,
                "signal_weight": math.sqrt(alpha_bar),
                "noise_weight": math.sqrt(1.0 - alpha_bar),
            }
        )
    return out
