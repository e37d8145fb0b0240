"""The forward process and its posterior: pure functions of tensors.

Names follow Ho et al. 2020 and the authors' code (`q_sample`, `q_posterior_mean_variance`).
Every function takes `DiffusionTables` already in the dtype and on the device of its inputs.
Timesteps `t` are zero-based integer tensors of shape (B,), one per item of the batch.
"""

from __future__ import annotations

import torch

from ddpm_cli.schedules import DiffusionTables


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
) -> torch.Tensor:
    """Per-item loss (B,): the weighted mean squared error of the model's prediction.

    With objective "eps" and no weighting this is L_simple, eq. 14 of Ho et al. 2020.
    """
    xt = q_sample(tables, x0, t, eps)
    target = training_target(objective, x0, eps, v_target(tables, x0, t, eps))
    out = model(xt, t)
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
