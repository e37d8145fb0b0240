"""Samplers: walk explicit (t, t_prev) pairs from one timestep list, as generators.

Every sampler is the same loop (`_walk`): evaluate the network at (x_t, t), turn its output into
predictions of x_0 (clipped to the data range) and eps, and hand both to the sampler's update,
a pure function of the pair (t, t_prev). The last pair has t_prev = -1, where alpha_bar is 1:
the update's result is the sample. Each evaluation yields a `SampleStep`, so callers draw
progress bars and trajectory previews without the sampler knowing about them.

    ddpm   ancestral sampling, Algorithm 2 of Ho et al. 2020 (respaced when strided)
    ddim   Song et al. 2021, eta = 0 deterministic, eta = 1 ancestral-like
    dpm++  DPM-Solver++(2M), Lu et al. 2022: second-order multistep in data prediction

An `Edit` (built by editing.py: inpainting, SDEdit, ILVR) changes the walk without changing the
samplers: its own pairs, where a pair with t_prev > t is a jump back that re-noises x_t to
x_{t_prev} with q and evaluates nothing (RePaint's resampling), and a projection of every
x_{t_prev} onto what the edit keeps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from ddpm_cli.diffusion.process import predict_x0_and_eps
from ddpm_cli.diffusion.schedules import DiffusionTables
from ddpm_cli.sampler_config import SPACINGS, SamplerConfig, SamplerName

NoiseFn = Callable[[tuple[int, ...]], torch.Tensor]  # shape -> standard normal noise
Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Projection = Callable[[torch.Tensor, int], torch.Tensor]  # (x_{t_prev}, t_prev) -> x_{t_prev}


def timesteps(
    T: int,
    steps: int | None = None,
    spacing: str = "linspace",
    tables: DiffusionTables | None = None,
) -> list[int]:
    """`steps` timesteps from [0, T-1], descending.

    logsnr:   evenly in log-SNR from t = T-1 to t = 0 (Lu et al. 2022's choice for pixel models;
              needs `tables`): more steps at low noise, where fine detail forms.
    linspace: evenly in t from T-1 down to 0 (both ends), rounded.
    leading:  0, T//steps, 2*T//steps, ... (the last one is below T-1), as diffusers' DDIM.
    trailing: T-1, T-1-T/steps, ... rounded (starts at T-1, ends above 0; Lin et al. 2023).
    steps None or T: every timestep, the paper's Algorithm 2, whatever the spacing.
    """
    steps = T if steps is None else steps
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in [1, {T}], got {steps}")
    if spacing == "logsnr":
        if tables is None:
            raise ValueError("logsnr spacing needs the diffusion tables")
        return _logsnr_timesteps(tables, steps)
    if spacing == "linspace":
        ts = torch.linspace(T - 1, 0, steps, dtype=torch.float64).round().long().tolist()
    elif spacing == "leading":
        ts = [i * (T // steps) for i in range(steps)][::-1]
    elif spacing == "trailing":
        ts = [round(T - i * T / steps) - 1 for i in range(steps)]
    else:
        raise ValueError(f"unknown spacing {spacing!r}; choose one of {', '.join(SPACINGS)}")
    return sorted(set(ts), reverse=True)


def _logsnr_timesteps(tables: DiffusionTables, steps: int) -> list[int]:
    T = tables.timesteps
    ab = tables.alpha_bar.double().cpu()
    lam = 0.5 * torch.log(ab / (1 - ab))  # decreasing in t
    if steps == 1:
        return [T - 1]
    targets = torch.linspace(float(lam[T - 1]), float(lam[0]), steps, dtype=torch.float64)
    # the timestep whose log-SNR is nearest each target, ascending from t = 0
    ts = sorted(int((lam - v).abs().argmin()) for v in targets)
    # near t = 0 log-SNR moves fast and targets can share a timestep: keep them distinct
    for i in range(1, steps):
        ts[i] = max(ts[i], ts[i - 1] + 1)
    for i in range(steps - 1, -1, -1):
        ts[i] = min(ts[i], T - steps + i)
    return ts[::-1]


def timestep_pairs(
    T: int,
    steps: int | None = None,
    spacing: str = "linspace",
    tables: DiffusionTables | None = None,
) -> list[tuple[int, int]]:
    """(t, t_prev) pairs over `timesteps(...)`, the last one ending at -1 (x_0)."""
    ts = timesteps(T, steps, spacing, tables)
    return list(zip(ts, ts[1:] + [-1], strict=True))


@dataclass(frozen=True)
class SampleStep:
    index: int  # 0-based number of this step
    total: int  # number of steps
    t: int
    t_prev: int
    x: torch.Tensor  # x_{t_prev}; the sample itself after the last step
    x0: torch.Tensor  # the model's prediction of x_0 at this step
    x_t: torch.Tensor  # x_t, as the network saw it at this step


@dataclass(frozen=True)
class Edit:
    """How an edit changes a sampler's walk (see the module docstring; editing.py builds them).

    pairs: the walk, jumps back (t_prev > t) included; it ends at t_prev = -1.
    project: applied to x_{t_prev} after every step of the network, and to the sample.
    start: x_T (standard normal noise) -> the walk's first x (SDEdit's noised image).
    noise: the draws for the jumps back, a stream apart from the sampler's own.
    """

    pairs: list[tuple[int, int]]
    project: Projection | None = None
    start: Callable[[torch.Tensor], torch.Tensor] | None = None
    noise: NoiseFn | None = None


def evaluations(pairs: list[tuple[int, int]]) -> int:
    """Network evaluations in a walk: its pairs that step down (jumps back evaluate nothing)."""
    return sum(1 for t, t_prev in pairs if t_prev < t)


def q_jump(tables: DiffusionTables, x: torch.Tensor, t: int, t_up: int, z: torch.Tensor):
    """x_{t_up} ~ q(x_{t_up} | x_t), t_up > t: the forward process over several steps at once,
    N(sqrt(ab_up / ab_t) x_t, 1 - ab_up / ab_t) (eq. 4 composed; ab_{-1} = 1)."""
    ratio = alpha_bar(tables, t_up) / alpha_bar(tables, t)
    return math.sqrt(ratio) * x + math.sqrt(1 - ratio) * z


def alpha_bar(tables: DiffusionTables, t: int) -> float:
    """alpha_bar_t as a Python float (float64); 1 at t = -1, "before" the first step."""
    return 1.0 if t < 0 else tables.host_alpha_bar[t]


# ---- updates: pure functions of one pair -------------------------------------------------------


def ddpm_update(tables, x, t, t_prev, x0, variance: str, noise: torch.Tensor | None):
    """x_{t_prev} ~ q(x_{t_prev} | x_t, x_0) (eq. 7) with the pair's own beta,
    1 - alpha_bar_t / alpha_bar_{t_prev} (improved-diffusion's respacing; = beta_t unstrided).

    variance "large": sigma^2 = beta; "small": beta_tilde. No noise at the last step (t_prev = -1).
    """
    ab_t, ab_prev = alpha_bar(tables, t), alpha_bar(tables, t_prev)
    beta = 1 - ab_t / ab_prev
    mean = (math.sqrt(ab_prev) * beta / (1 - ab_t)) * x0 + (
        math.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab_t)
    ) * x
    if t_prev < 0 or noise is None:
        return mean
    var = beta if variance == "large" else beta * (1 - ab_prev) / (1 - ab_t)
    return mean + math.sqrt(var) * noise


def ddim_update(tables, x, t, t_prev, x0, eps, eta: float, noise: torch.Tensor | None):
    """Song et al. 2021, eq. 12: x_{t_prev} = sqrt(ab') x0 + sqrt(1 - ab' - s^2) eps + s z,
    s = eta * sqrt((1 - ab') / (1 - ab)) * sqrt(1 - ab / ab')."""
    ab_t, ab_prev = alpha_bar(tables, t), alpha_bar(tables, t_prev)
    sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev))
    x_prev = math.sqrt(ab_prev) * x0 + math.sqrt(max(0.0, 1 - ab_prev - sigma**2)) * eps
    if sigma > 0 and noise is not None:
        x_prev = x_prev + sigma * noise
    return x_prev


def dpmpp_2m_update(tables, x, t, t_prev, x0, previous: tuple[int, torch.Tensor] | None):
    """One step of DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2, midpoint form) from t to t_prev.

    With alpha = sqrt(ab), sigma = sqrt(1 - ab), lambda = log(alpha / sigma), h = lambda' - lambda:
    first order x' = (sigma'/sigma) x - alpha' (e^-h - 1) x0 (DDIM); second order also uses the
    previous step's x0 prediction, `previous` = (its t, its x0). The step to t_prev = -1
    (sigma' = 0) is first order: the sample is the last x0 prediction.
    """
    if t_prev < 0:
        return x0
    ab_t, ab_prev = alpha_bar(tables, t), alpha_bar(tables, t_prev)

    def lam(ab: float) -> float:
        return 0.5 * math.log(ab / (1 - ab))

    h = lam(ab_prev) - lam(ab_t)
    alpha_prev = math.sqrt(ab_prev)
    first = math.sqrt((1 - ab_prev) / (1 - ab_t)) * x - alpha_prev * math.expm1(-h) * x0
    if previous is None:
        return first
    t_last, x0_last = previous
    r = (lam(ab_t) - lam(alpha_bar(tables, t_last))) / h
    d1 = (x0 - x0_last) / r
    return first - 0.5 * alpha_prev * math.expm1(-h) * d1


# ---- samplers ----------------------------------------------------------------------------------


def _walk(
    model: Model,
    tables: DiffusionTables,
    x_T: torch.Tensor,
    objective: str,
    pairs: list[tuple[int, int]],
    clip: bool,
    update: Callable[[int, int, int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    edit: Edit | None = None,
) -> Iterator[SampleStep]:
    x = x_T
    project = None
    if edit is not None:
        pairs, project = edit.pairs, edit.project
        x = edit.start(x_T) if edit.start is not None else x_T
    total, i = evaluations(pairs), 0
    for t, t_prev in pairs:
        if t_prev > t:  # a jump back: re-noise, nothing to evaluate
            x = q_jump(tables, x, t, t_prev, edit.noise(tuple(x.shape)).to(x.device, x.dtype))
            continue
        t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        out = model(x, t_batch).to(x.dtype)
        x0, eps = predict_x0_and_eps(tables, objective, x, t_batch, out)
        if clip:  # predicted x_0 in the data range (samplers that use eps re-derive it)
            x0 = x0.clamp(-1, 1)
        x_t, x = x, update(i, t, t_prev, x, x0, eps)
        if project is not None:
            x = project(x, t_prev)
        yield SampleStep(i, total, t, t_prev, x, x0, x_t)
        i += 1


@torch.no_grad()
def ddpm(
    model: Model,
    tables: DiffusionTables,
    x_T: torch.Tensor,
    noise: NoiseFn,
    objective: str = "eps",
    steps: int | None = None,
    variance: str = "large",
    clip: bool = True,
    spacing: str = "linspace",
    edit: Edit | None = None,
) -> Iterator[SampleStep]:
    """Ancestral sampling, Algorithm 2 of Ho et al. 2020 (see `ddpm_update`)."""
    pairs = timestep_pairs(tables.timesteps, steps, spacing, tables)

    def update(i, t, t_prev, x, x0, eps):
        z = noise(tuple(x.shape)).to(x.device, x.dtype) if t_prev >= 0 else None
        return ddpm_update(tables, x, t, t_prev, x0, variance, z)

    yield from _walk(model, tables, x_T, objective, pairs, clip, update, edit)


@torch.no_grad()
def ddim(
    model: Model,
    tables: DiffusionTables,
    x_T: torch.Tensor,
    noise: NoiseFn,
    objective: str = "eps",
    steps: int | None = 50,
    eta: float = 0.0,
    clip: bool = True,
    spacing: str = "logsnr",
    edit: Edit | None = None,
) -> Iterator[SampleStep]:
    """DDIM (see `ddim_update`); with eta = 0 no noise is drawn and the map from x_T is fixed."""
    pairs = timestep_pairs(tables.timesteps, steps, spacing, tables)

    def update(i, t, t_prev, x, x0, eps):
        if clip:  # the eps that goes with the clipped x_0 (as improved-diffusion does)
            ab = alpha_bar(tables, t)
            eps = (x - math.sqrt(ab) * x0) / math.sqrt(1 - ab)
        z = noise(tuple(x.shape)).to(x.device, x.dtype) if eta > 0 and t_prev >= 0 else None
        return ddim_update(tables, x, t, t_prev, x0, eps, eta, z)

    yield from _walk(model, tables, x_T, objective, pairs, clip, update, edit)


@torch.no_grad()
def dpmpp_2m(
    model: Model,
    tables: DiffusionTables,
    x_T: torch.Tensor,
    noise: NoiseFn | None = None,
    objective: str = "eps",
    steps: int | None = 20,
    clip: bool = True,
    spacing: str = "logsnr",
    edit: Edit | None = None,
) -> Iterator[SampleStep]:
    """DPM-Solver++(2M) (see `dpmpp_2m_update`): first order at the first and last steps,
    second order between. Deterministic: `noise` is not used. The previous prediction is used
    only when it came from a higher t (after an edit's jump back the step is first order)."""
    pairs = timestep_pairs(tables.timesteps, steps, spacing, tables)
    previous: list[tuple[int, torch.Tensor]] = []

    def update(i, t, t_prev, x, x0, eps):
        last = previous[-1] if previous and previous[-1][0] > t else None
        x_prev = dpmpp_2m_update(tables, x, t, t_prev, x0, last)
        previous[:] = [(t, x0)]
        return x_prev

    yield from _walk(model, tables, x_T, objective, pairs, clip, update, edit)


def run(steps: Iterator[SampleStep]) -> torch.Tensor:
    """Exhaust a sampler and return the final sample."""
    x = None
    for step in steps:
        x = step.x
    if x is None:
        raise ValueError("sampler produced no steps")
    return x


def from_config(
    config: SamplerConfig,
    model: Model,
    tables: DiffusionTables,
    x_T: torch.Tensor,
    noise: NoiseFn,
    objective: str = "eps",
    edit: Edit | None = None,
) -> Iterator[SampleStep]:
    """The sampler a (resolved) SamplerConfig names, ready to iterate (with `edit`, over the
    edit's pairs: build them from `config_pairs`)."""
    c = config.resolved(tables.timesteps, objective)
    x, o, e = x_T, objective, edit
    if c.sampler is SamplerName.ddpm:
        return ddpm(model, tables, x, noise, o, c.steps, c.variance, c.clip, c.spacing, e)
    if c.sampler is SamplerName.ddim:
        return ddim(model, tables, x, noise, o, c.steps, c.eta, c.clip, c.spacing, e)
    return dpmpp_2m(model, tables, x, noise, o, c.steps, c.clip, c.spacing, e)


def config_pairs(config: SamplerConfig, tables: DiffusionTables, objective: str = "eps"):
    """The (t, t_prev) pairs a SamplerConfig walks: what an edit starts from."""
    c = config.resolved(tables.timesteps, objective)
    return timestep_pairs(tables.timesteps, c.steps, c.spacing, tables)
