"""The forward process and its posterior: pure functions of tensors.

Names follow Ho et al. 2020 and the authors' code (`q_sample`, `q_posterior_mean_variance`).
Every function takes `DiffusionTables` already in the dtype and on the device of its inputs.
Timesteps `t` are zero-based integer tensors of shape (B,), one per item of the batch.
"""

from __future__ import annotations

import math

import torch

from ddpm_cli.diffusion.schedules import DiffusionTables


def extract(table: torch.Tensor, t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Pick `table[t]` per batch item, shaped to broadcast against a batch of `shape`.

    table: (T,); t: (B,) integer; shape: (B, ...). Returns (B, 1, ..., 1) with len(shape) dims.
    """
    out = table.gather(0, t.to(device=table.device, dtype=torch.long))
    return out.reshape(t.shape[0], *([1] * (len(shape) - 1)))


def q_mean_variance(tables: DiffusionTables, x0: torch.Tensor, t: torch.Tensor):
    """Mean, variance and log-variance of q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, 1 - alpha_bar_t).

    Eq. 4 of Ho et al. 2020. Variance and log-variance are shaped (B, 1, ..., 1).
    """
    mean = extract(tables.sqrt_alpha_bar, t, x0.shape) * x0
    variance = extract(1.0 - tables.alpha_bar, t, x0.shape)
    log_variance = extract(tables.log_one_minus_alpha_bar, t, x0.shape)
    return mean, variance, log_variance


def q_sample(
    tables: DiffusionTables, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """Draw x_t ~ q(x_t | x_0) in closed form: sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps."""
    return (
        extract(tables.sqrt_alpha_bar, t, x0.shape) * x0
        + extract(tables.sqrt_one_minus_alpha_bar, t, x0.shape) * noise
    )


def q_step(
    tables: DiffusionTables, x_prev: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """One step of the chain, x_t ~ q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t) (eq. 2).

    At t = 0, `x_prev` is the clean image x_0 itself.
    """
    return (
        extract(tables.alphas, t, x_prev.shape).sqrt() * x_prev
        + extract(tables.betas, t, x_prev.shape).sqrt() * noise
    )


def q_posterior_mean_variance(
    tables: DiffusionTables, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor
):
    """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0) (eq. 6-7).

    mean = coef1_t x_0 + coef2_t x_t; variance = beta_tilde_t. At t = 0 the posterior is a point
    mass on x_0 (variance 0), so the log-variance uses t = 1's value there, as the authors do.
    """
    mean = (
        extract(tables.posterior_mean_coef1, t, xt.shape) * x0
        + extract(tables.posterior_mean_coef2, t, xt.shape) * xt
    )
    variance = extract(tables.beta_tilde, t, xt.shape)
    log_variance = extract(tables.beta_tilde_log_clipped, t, xt.shape)
    return mean, variance, log_variance


def predict_x0_from_eps(
    tables: DiffusionTables, xt: torch.Tensor, t: torch.Tensor, eps: torch.Tensor
) -> torch.Tensor:
    """x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t), eq. 4 solved for x_0."""
    return (
        extract(tables.sqrt_recip_alpha_bar, t, xt.shape) * xt
        - extract(tables.sqrt_recipm1_alpha_bar, t, xt.shape) * eps
    )


def predict_eps_from_x0(
    tables: DiffusionTables, xt: torch.Tensor, t: torch.Tensor, x0: torch.Tensor
) -> torch.Tensor:
    """eps = (x_t / sqrt(alpha_bar_t) - x_0) / sqrt(1 / alpha_bar_t - 1), eq. 4 solved for eps."""
    return (extract(tables.sqrt_recip_alpha_bar, t, xt.shape) * xt - x0) / extract(
        tables.sqrt_recipm1_alpha_bar, t, xt.shape
    )


def v_target(
    tables: DiffusionTables, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor
) -> torch.Tensor:
    """The velocity v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0 (Salimans & Ho 2022)."""
    return (
        extract(tables.sqrt_alpha_bar, t, x0.shape) * eps
        - extract(tables.sqrt_one_minus_alpha_bar, t, x0.shape) * x0
    )


def predict_x0_from_v(
    tables: DiffusionTables, xt: torch.Tensor, t: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    """x_0 = sqrt(alpha_bar_t) x_t - sqrt(1 - alpha_bar_t) v."""
    return (
        extract(tables.sqrt_alpha_bar, t, xt.shape) * xt
        - extract(tables.sqrt_one_minus_alpha_bar, t, xt.shape) * v
    )


def predict_eps_from_v(
    tables: DiffusionTables, xt: torch.Tensor, t: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    """eps = sqrt(1 - alpha_bar_t) x_t + sqrt(alpha_bar_t) v."""
    return (
        extract(tables.sqrt_one_minus_alpha_bar, t, xt.shape) * xt
        + extract(tables.sqrt_alpha_bar, t, xt.shape) * v
    )


def training_target(objective: str, x0: torch.Tensor, eps: torch.Tensor, v: torch.Tensor):
    """What the network should output for `objective` ("eps", "x0" or "v")."""
    return {"eps": eps, "x0": x0, "v": v}[objective]


def loss_weight(tables: DiffusionTables, t: torch.Tensor, objective: str, gamma: float | None):
    """Per-item weight (B,) of the MSE: 1, or min-SNR-gamma (Hang et al. 2023) when gamma is set.

    Min-SNR weights the x0-space error by min(SNR, gamma); expressed in each objective's space
    that is min(SNR, gamma) / SNR for eps, min(SNR, gamma) for x0, min(SNR, gamma) / (SNR + 1)
    for v.
    """
    if gamma is None:
        return torch.ones(t.shape[0], device=t.device, dtype=tables.snr.dtype)
    snr = tables.snr.gather(0, t.to(tables.snr.device))
    clipped = snr.clamp(max=gamma)
    return {"eps": clipped / snr, "x0": clipped, "v": clipped / (snr + 1)}[objective]


def training_losses(
    model,
    tables: DiffusionTables,
    x0: torch.Tensor,
    t: torch.Tensor,
    eps: torch.Tensor,
    objective: str = "eps",
    gamma: float | None = None,
    y: torch.Tensor | None = None,
    augment: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-item loss (B,): the weighted mean squared error of the model's prediction, given
    class labels `y` for a class-conditional model and the map `augment` of where `x0` was
    augmented for a model told of it (--shift).

    With objective "eps" and no weighting this is L_simple, eq. 14 of Ho et al. 2020.
    """
    xt = q_sample(tables, x0, t, eps)
    target = training_target(objective, x0, eps, v_target(tables, x0, t, eps))
    extra = (y, augment) if augment is not None else (y,) if y is not None else ()
    out = model(xt, t, *extra)  # (a model without classes or a map takes no more)
    mse = (out.float() - target.float()).pow(2).mean(dim=tuple(range(1, x0.ndim)))
    return mse * loss_weight(tables, t, objective, gamma).to(mse.dtype)


def predict_x0_and_eps(
    tables: DiffusionTables, objective: str, xt: torch.Tensor, t: torch.Tensor, out: torch.Tensor
):
    """Turn the network's output into both x_0 and eps predictions, whatever it predicts."""
    if objective == "eps":
        return predict_x0_from_eps(tables, xt, t, out), out
    if objective == "x0":
        return out, predict_eps_from_x0(tables, xt, t, out)
    return predict_x0_from_v(tables, xt, t, out), predict_eps_from_v(tables, xt, t, out)


# --- The variational bound (eq. 5 of Ho et al. 2020), in bits per dimension -------------------
#
# L = L_T + sum_{t>1} L_{t-1} + L_0, where L_T = KL(q(x_T | x_0) || N(0, I)) (the prior term),
# L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) and L_0 = -log p(x_0 | x_1), the
# discretized Gaussian decoder (eq. 13). The math runs in float64; divided by ln 2 and by the
# number of dimensions, nats per image become bits per dimension. Zero-based t = 0 is the
# paper's t = 1 (the decoder term).

BIN = 1.0 / 255.0  # half the width of one of the 256 intensity levels in [-1, 1]


def normal_kl(mean1, log_var1, mean2, log_var2) -> torch.Tensor:
    """KL(N(mean1, exp(log_var1)) || N(mean2, exp(log_var2))) per element, in nats."""
    return 0.5 * (
        log_var2 - log_var1 + torch.exp(log_var1 - log_var2)
        + (mean1 - mean2).pow(2) * torch.exp(-log_var2) - 1.0
    )  # fmt: skip


def _log_diff_ndtr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """log(Phi(b) - Phi(a)) for a < b, accurate in both tails (Phi the standard normal CDF)."""
    right = (a + b) > 0  # on the right, Phi(b) - Phi(a) = Phi(-a) - Phi(-b): stay in a left tail
    lo, hi = torch.where(right, -b, a), torch.where(right, -a, b)
    log_hi, log_lo = torch.special.log_ndtr(hi), torch.special.log_ndtr(lo)
    return log_hi + torch.log(-torch.expm1((log_lo - log_hi).clamp(max=-1e-300)))


def discretized_gaussian_log_likelihood(
    x0: torch.Tensor, mean: torch.Tensor, log_var: torch.Tensor
) -> torch.Tensor:
    """log p(x_0 | x_1) per element: the mass of N(mean, exp(log_var)) on x_0's intensity bin,
    with the lowest and highest bins reaching out to -inf and +inf (eq. 13)."""
    inv_std = torch.exp(-0.5 * log_var)
    lower, upper = (x0 - BIN - mean) * inv_std, (x0 + BIN - mean) * inv_std
    first, last = x0 < -1.0 + BIN, x0 > 1.0 - BIN
    return torch.where(
        first,
        torch.special.log_ndtr(upper),
        torch.where(last, torch.special.log_ndtr(-lower), _log_diff_ndtr(lower, upper)),
    )


def reverse_log_variance(tables: DiffusionTables, variance: str) -> torch.Tensor:
    """log sigma_t^2 of p(x_{t-1} | x_t), shape (T,): "small" is beta_tilde_t, "large" is beta_t
    with t = 0's entry set to beta_tilde at t = 1 (a decoder with beta_1 would be too narrow to be
    useful at 1e-4, and beta_tilde_0 is 0), as in the authors' code."""
    if variance == "small":
        return tables.beta_tilde_log_clipped
    if variance == "large":
        return torch.log(torch.cat([tables.beta_tilde[1:2], tables.betas[1:]]))
    raise ValueError(f"unknown variance {variance!r}")


def _bits(nats: torch.Tensor) -> torch.Tensor:
    """Mean over all but the batch dimension, in bits."""
    return nats.mean(dim=tuple(range(1, nats.ndim))) / math.log(2.0)


def prior_bpd(tables: DiffusionTables, x0: torch.Tensor) -> torch.Tensor:
    """L_T per image (B,), bits/dim: how far q(x_T | x_0) is from the prior N(0, I)."""
    t = torch.full((x0.shape[0],), tables.timesteps - 1, dtype=torch.long)
    mean, _, log_var = q_mean_variance(tables, x0, t)
    zero = torch.zeros_like(mean)
    return _bits(normal_kl(mean, log_var.expand_as(mean), zero, zero))


def vb_terms_bpd(
    tables: DiffusionTables,
    x0: torch.Tensor,
    xt: torch.Tensor,
    t: torch.Tensor,
    x0_pred: torch.Tensor,
    log_var: torch.Tensor,
) -> torch.Tensor:
    """The bound's term at t per image (B,), bits/dim: L_{t-1} for t > 0, L_0 at t = 0.

    p(x_{t-1} | x_t) = N(posterior mean from x0_pred and x_t, sigma_t^2) (eq. 6-7 with x0_pred
    for x_0), with log sigma_t^2 = log_var[t] (shape (T,), see `reverse_log_variance`). The
    `tables` should be float64; every input is promoted to float64.
    """
    x0, xt, x0_pred = x0.double(), xt.double(), x0_pred.double()
    true_mean, _, true_log_var = q_posterior_mean_variance(tables, x0, xt, t)
    model_mean, _, _ = q_posterior_mean_variance(tables, x0_pred, xt, t)
    log_var = extract(log_var, t, xt.shape).expand_as(xt)
    kl = normal_kl(true_mean, true_log_var.expand_as(xt), model_mean, log_var)
    decoder = -discretized_gaussian_log_likelihood(x0, model_mean, log_var)
    first = (t == 0).reshape(-1, *([1] * (xt.ndim - 1)))
    return _bits(torch.where(first, decoder, kl))
