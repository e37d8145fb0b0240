"""Negative log-likelihood in bits/dim from the variational bound (`ddpm eval --data`).

For each held-out image x_0 (eq. 5 of Ho et al. 2020):

    bits/dim <= L_T + sum_{t=2..T} L_{t-1} + L_0

The prior term L_T and the decoder term L_0 are computed exactly for every image. The T - 1 KL
terms are either all computed (one network evaluation each, the full bound), or estimated
without bias from K timesteps per image, one drawn uniformly from each of K strata of 2..T
(evenly spaced in log t) and weighted by its stratum's size. Each term uses a fresh
x_t ~ q(x_t | x_0).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from ddpm_cli.data.folders import InMemory, OnDisk
from ddpm_cli.diffusion.process import (
    predict_x0_and_eps,
    prior_bpd,
    q_sample,
    reverse_log_variance,
    vb_terms_bpd,
)
from ddpm_cli.diffusion.schedules import DiffusionTables
from ddpm_cli.errors import ConfigError
from ddpm_cli.model.kernels import winograd
from ddpm_cli.sampler_config import Variance

VARIANCES = tuple(v.value for v in Variance)


@dataclass(frozen=True)
class BoundResult:
    per_image: torch.Tensor  # (N,) bits/dim of each image's bound (or its estimate)
    prior: float  # mean L_T, bits/dim
    decoder: float  # mean L_0
    kl: float  # mean of sum_{t>1} L_{t-1} (or its estimate)
    per_t: list[float] | None  # mean term at each zero-based t (full bound only)
    timesteps: int
    t_samples: int | None  # None: the full bound
    variance: str
    seconds: float

    @property
    def bits_per_dim(self) -> float:
        return float(self.per_image.mean())

    @property
    def stderr(self) -> float:
        n = self.per_image.numel()
        return float(self.per_image.std() / math.sqrt(n)) if n > 1 else float("nan")

    def to_dict(self) -> dict:
        return {
            "bits_per_dim": self.bits_per_dim,
            "stderr": self.stderr,
            "images": self.per_image.numel(),
            "timesteps": self.timesteps,
            "t_samples": self.t_samples,
            "estimate": self.t_samples is not None,
            "variance": self.variance,
            "terms": {"prior": self.prior, "kl": self.kl, "decoder": self.decoder},
            "seconds": self.seconds,
            **({"per_t": self.per_t} if self.per_t is not None else {}),
        }


def image_batches(
    dataset: InMemory | OnDisk, n: int, batch_size: int, order: torch.Tensor | None = None
) -> Iterator[torch.Tensor]:
    """The first n images of a dataset, in order (or the first n of the indices `order`), as
    uint8 batches (B, C, H, W)."""
    indices = torch.arange(n) if order is None else order[:n]
    for start in range(0, len(indices), batch_size):
        chunk = indices[start : start + batch_size]
        if isinstance(dataset, InMemory):
            yield dataset.data[chunk]
        else:
            yield torch.stack([dataset[int(i)][0] for i in chunk])


def strata(timesteps: int, k: int) -> list[tuple[int, int]]:
    """K ranges [lo, hi) covering the zero-based KL timesteps 1 .. T-1, spaced evenly in log t.

    The terms shrink roughly like 1/t (most of the bound sits in the first steps), so equal
    ranges in log t hold similar shares of it; even spacing in t would make a K = 20 estimate
    about 40x noisier on Gaussian data (tests/test_likelihood.py checks more than 10x).
    """
    edges = [1]
    for i in range(1, k):
        target = round(timesteps ** (i / k))
        edges.append(min(max(edges[-1] + 1, target), timesteps - (k - i)))
    edges.append(timesteps)
    return list(zip(edges[:-1], edges[1:], strict=True))


def bound(
    network: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    objective: str,
    tables: DiffusionTables,
    batches: Iterator[torch.Tensor],
    *,
    t_samples: int | None = None,
    variance: str | torch.Tensor = "small",
    generator: torch.Generator,
    device: torch.device,
    on_evaluations: Callable[[int], None] = lambda n: None,
) -> BoundResult:
    """The variational bound of each image in `batches` (uint8), in bits/dim.

    `network(x_t, t)` is the trained model. `variance` is sigma_t^2 of p(x_{t-1} | x_t): "small"
    (beta_tilde_t), "large" (beta_t), or log sigma_t^2 itself as a (T,) tensor. `tables` are
    float64 (the bound's math runs in float64 on `device`, or on the CPU for MPS, which has no
    float64). `on_evaluations(n)` is called after each batch of n network evaluations.
    """
    if isinstance(variance, str) and variance not in VARIANCES:
        raise ConfigError(f"unknown variance {variance!r}; choose one of: {', '.join(VARIANCES)}")
    T = tables.timesteps
    if t_samples is not None and not 1 <= t_samples <= T - 1:
        raise ConfigError(f"--t-samples must be between 1 and T - 1 = {T - 1}")
    math_device = torch.device("cpu") if device.type == "mps" else device
    tab64 = tables.to(math_device, torch.float64)
    tab32 = tables.to(device, torch.float32)
    if isinstance(variance, str):
        log_var = reverse_log_variance(tab64, variance)
    else:
        log_var, variance = variance.to(math_device, torch.float64), "custom"
    start = time.perf_counter()
    per_image, priors, decoders, kls = [], [], [], []
    per_t_sum = torch.zeros(T, dtype=torch.float64) if t_samples is None else None
    ranges = strata(T, t_samples) if t_samples is not None else None

    def term(x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(x0.shape, generator=generator).to(device)
        xt = q_sample(tab32, x0, t.to(device), noise)
        with torch.no_grad():
            out = network(xt, t.to(device)).float()
        x0_pred = predict_x0_and_eps(tab32, objective, xt, t.to(device), out)[0].clamp(-1, 1)
        on_evaluations(x0.shape[0])
        return vb_terms_bpd(
            tab64,
            x0.to(math_device),
            xt.to(math_device),
            t.to(math_device),
            x0_pred.to(math_device),
            log_var,
        ).cpu()

    with winograd.keep_filters():  # the network's weights are fixed for the whole evaluation
        for batch in batches:
            x0 = (batch.to(device).float() / 127.5 - 1.0).contiguous()
            b = x0.shape[0]
            prior = prior_bpd(tab64, x0.to(math_device, torch.float64)).cpu()
            decoder = term(x0, torch.zeros(b, dtype=torch.long))
            kl = torch.zeros(b, dtype=torch.float64)
            if ranges is None:
                for t in range(T - 1, 0, -1):
                    value = term(x0, torch.full((b,), t, dtype=torch.long))
                    per_t_sum[t] += value.sum()
                    kl += value
                per_t_sum[0] += decoder.sum()
            else:
                for lo, hi in ranges:
                    t = torch.randint(lo, hi, (b,), generator=generator)
                    kl += (hi - lo) * term(x0, t)
            per_image.append(prior + decoder + kl)
            priors.append(prior)
            decoders.append(decoder)
            kls.append(kl)
    if not per_image:
        raise ConfigError("no images to evaluate")
    n = sum(p.numel() for p in per_image)
    return BoundResult(
        per_image=torch.cat(per_image),
        prior=float(torch.cat(priors).mean()),
        decoder=float(torch.cat(decoders).mean()),
        kl=float(torch.cat(kls).mean()),
        per_t=(per_t_sum / n).tolist() if per_t_sum is not None else None,
        timesteps=T,
        t_samples=t_samples,
        variance=variance,
        seconds=time.perf_counter() - start,
    )


def evaluations(n_images: int, timesteps: int, t_samples: int | None) -> int:
    """How many network evaluations `bound` makes: the decoder term, plus K or T - 1 KL terms."""
    return n_images * (
        1 + (timesteps - 1 if t_samples is None else len(strata(timesteps, t_samples)))
    )
