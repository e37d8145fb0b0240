"""The forward process and posterior: closed forms, empirical moments, Bayes' rule."""

from __future__ import annotations

import math

import pytest
import torch

from ddpm_cli.config import DiffusionConfig, Schedule
from ddpm_cli.diffusion.preview import chain, frame_times, noised, step_stats
from ddpm_cli.diffusion.process import (
    extract,
    predict_eps_from_v,
    predict_eps_from_x0,
    predict_x0_from_eps,
    predict_x0_from_v,
    q_mean_variance,
    q_posterior_mean_variance,
    q_sample,
    q_step,
    v_target,
)
from ddpm_cli.diffusion.schedules import DiffusionTables


def tables64(schedule=Schedule.linear, T=1000) -> DiffusionTables:
    return DiffusionTables.from_config(DiffusionConfig(schedule, T))


def ks_statistic(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov statistic sup |F_a - F_b|."""
    grid = torch.cat([a, b]).sort().values
    fa = torch.searchsorted(a.sort().values, grid, right=True) / a.numel()
    fb = torch.searchsorted(b.sort().values, grid, right=True) / b.numel()
    return (fa - fb).abs().max().item()


def test_extract_broadcasts_per_item():
    table = torch.arange(10, dtype=torch.float64)
    out = extract(table, torch.tensor([3, 7]), torch.Size([2, 3, 4, 5]))
    assert out.shape == (2, 1, 1, 1)
    assert out.flatten().tolist() == [3.0, 7.0]


@pytest.mark.parametrize("schedule", [Schedule.linear, Schedule.cosine])
@pytest.mark.parametrize("t", [0, 100, 500, 999])
def test_q_sample_has_the_closed_form_moments(schedule, t):
    tables = tables64(schedule)
    n = 200_000
    g = torch.Generator().manual_seed(t)
    x0 = torch.tensor([-0.8, 0.1, 0.9], dtype=torch.float64).repeat(n, 1)  # (n, 3)
    ts = torch.full((n,), t)
    xt = q_sample(tables, x0, ts, torch.randn(x0.shape, generator=g, dtype=torch.float64))
    mean, var, log_var = q_mean_variance(tables, x0[:1], ts[:1])
    sd = math.sqrt(var.item())
    # 6-sigma bounds for the sample mean and the sample variance
    assert (xt.mean(0) - mean[0]).abs().max() < 6 * sd / math.sqrt(n)
    assert (xt.var(0) - var.item()).abs().max() < 6 * var.item() * math.sqrt(2 / n)
    assert math.isclose(log_var.item(), math.log(var.item()), rel_tol=1e-9, abs_tol=1e-12)


@pytest.mark.parametrize("schedule", [Schedule.linear, Schedule.cosine])
@pytest.mark.parametrize("t", [10, 300])
def test_chain_iterated_t_times_matches_closed_form_in_distribution(schedule, t):
    tables = tables64(schedule)
    n = 60_000
    g = torch.Generator().manual_seed(1)
    x0 = torch.full((n, 1), 0.7, dtype=torch.float64)
    x = x0
    for s in range(t + 1):  # x_0 -> x_{t} (zero-based: t + 1 steps)
        x = q_step(tables, x, torch.full((n,), s), torch.randn(x.shape, generator=g, dtype=x.dtype))
    direct = q_sample(
        tables, x0, torch.full((n,), t), torch.randn(x0.shape, generator=g, dtype=x0.dtype)
    )
    mean, var, _ = q_mean_variance(tables, x0[:1], torch.tensor([t]))
    assert abs(x.mean().item() - mean.item()) < 6 * math.sqrt(var.item() / n)
    assert abs(x.var().item() - var.item()) < 6 * var.item() * math.sqrt(2 / n)
    # KS two-sample test at alpha = 0.001: c = 1.95
    assert ks_statistic(x.flatten(), direct.flatten()) < 1.95 * math.sqrt(2 / n)


@pytest.mark.parametrize("schedule", list(Schedule))
def test_posterior_matches_bayes_rule(schedule):
    """q(x_{t-1} | x_t, x_0) ∝ q(x_t | x_{t-1}) q(x_{t-1} | x_0), two Gaussians in x_{t-1}."""
    tables = tables64(schedule)
    t = torch.arange(1, 1000)
    x0 = torch.linspace(-1, 1, 999, dtype=torch.float64).unsqueeze(1)
    xt = torch.linspace(2, -2, 999, dtype=torch.float64).unsqueeze(1)
    mean, var, log_var = q_posterior_mean_variance(tables, x0, xt, t)
    beta, ab_prev = tables.betas[t], tables.alpha_bar_prev[t]
    precision = (1 - beta) / beta + 1 / (1 - ab_prev)
    bayes_mean = (1 - beta).sqrt() / beta * xt[:, 0] + ab_prev.sqrt() / (1 - ab_prev) * x0[:, 0]
    torch.testing.assert_close(var[:, 0], 1 / precision, rtol=1e-9, atol=0)
    torch.testing.assert_close(mean[:, 0], bayes_mean / precision, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(log_var[:, 0], torch.log(1 / precision), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("t", [50, 500])
def test_posterior_is_the_regression_of_x_prev_on_x_t(t):
    """Empirically: draw x_{t-1} | x_0, then x_t | x_{t-1}; regress x_{t-1} on x_t."""
    tables = tables64()
    n = 200_000
    g = torch.Generator().manual_seed(t)
    x0 = torch.full((n, 1), 0.5, dtype=torch.float64)
    x_prev = q_sample(tables, x0, torch.full((n,), t - 1), torch.randn(n, 1, generator=g).double())
    xt = q_step(tables, x_prev, torch.full((n,), t), torch.randn(n, 1, generator=g).double())
    xc, pc = xt - xt.mean(), x_prev - x_prev.mean()
    slope = (xc * pc).sum() / (xc * xc).sum()
    residual = pc - slope * xc
    mean, var, _ = q_posterior_mean_variance(tables, x0[:1], xt[:1], torch.tensor([t]))
    coef2 = tables.posterior_mean_coef2[t].item()
    assert abs(slope.item() - coef2) < 0.01
    assert abs(residual.var().item() / var.item() - 1) < 0.02
    # the intercept: E[x_{t-1}] - coef2 E[x_t] is coef1 * x_0
    intercept = x_prev.mean() - slope * xt.mean()
    assert abs(intercept.item() - tables.posterior_mean_coef1[t].item() * 0.5) < 0.01


@pytest.mark.parametrize("schedule", [Schedule.linear, Schedule.cosine])
def test_parameterisations_invert_each_other(schedule):
    tables = tables64(schedule)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(8, 3, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(8, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 5, 100, 400, 700, 998, 999])
    xt = q_sample(tables, x0, t, eps)
    torch.testing.assert_close(predict_x0_from_eps(tables, xt, t, eps), x0, rtol=0, atol=1e-8)
    torch.testing.assert_close(predict_eps_from_x0(tables, xt, t, x0), eps, rtol=0, atol=1e-8)
    v = v_target(tables, x0, t, eps)
    torch.testing.assert_close(predict_x0_from_v(tables, xt, t, v), x0, rtol=0, atol=1e-10)
    torch.testing.assert_close(predict_eps_from_v(tables, xt, t, v), eps, rtol=0, atol=1e-10)
    # (x_t, v) is (x_0, eps) rotated by the angle phi with cos(phi) = sqrt(alpha_bar): norms agree
    torch.testing.assert_close(xt**2 + v**2, x0**2 + eps**2, rtol=1e-10, atol=1e-10)


def test_noised_shares_one_eps_across_t():
    tables = tables64()
    x0 = torch.zeros(1, 2, 2, dtype=torch.float64)
    eps = torch.ones(1, 2, 2, dtype=torch.float64)
    xs = noised(tables, x0, [0, 500, 999], eps)
    assert xs.shape == (3, 1, 2, 2)
    expected = tables.sqrt_one_minus_alpha_bar[[0, 500, 999]]
    torch.testing.assert_close(xs[:, 0, 0, 0], expected)


def test_chain_yields_requested_frames_with_closed_form_statistics():
    tables = tables64()
    keep = frame_times(1000, 5)
    assert keep == [0, 250, 500, 749, 999]
    x0 = torch.full((1, 64, 64), 0.6)
    frames = list(
        chain(tables.to("cpu", torch.float32), x0, keep, torch.Generator().manual_seed(0))
    )
    assert [t for t, _ in frames] == keep
    for t, x in frames:
        mean, var, _ = q_mean_variance(tables, x0.double().unsqueeze(0), torch.tensor([t]))
        n = x.numel()
        assert abs(x.mean().item() - mean.mean().item()) < 6 * math.sqrt(var.item() / n)
        assert abs(x.var().item() / var.item() - 1) < 6 * math.sqrt(2 / n)
    assert frame_times(10, 50) == list(range(10))


def test_step_stats_report_consistent_quantities():
    tables = tables64()
    (s,) = step_stats(tables, [250])
    assert s["alpha_bar"] == pytest.approx(tables.alpha_bar[250].item())
    assert s["signal_weight"] ** 2 + s["noise_weight"] ** 2 == pytest.approx(1.0)
    assert s["snr_db"] == pytest.approx(10 * math.log10(s["alpha_bar"] / (1 - s["alpha_bar"])))
