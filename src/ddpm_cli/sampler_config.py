"""How to sample: the sampler, its steps, timestep spacing and variance, and classifier-free
guidance's default, as one frozen dataclass that each image's provenance records; and an edit
(inpaint, upscale, SDEdit, ILVR) as the command line gives it, EditSpec, with its defaults.

Like config.py, the single source of these defaults: the CLI builds a SamplerConfig from its
options; `SamplerConfig.resolved` fills in what was left to the model.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from enum import Enum

from ddpm_cli.config import jsonable
from ddpm_cli.errors import ConfigError


class SamplerName(str, Enum):
    ddpm = "ddpm"  # ancestral sampling, Algorithm 2 of Ho et al. 2020
    ddim = "ddim"  # Song et al. 2021
    dpmpp = "dpm++"  # DPM-Solver++(2M), Lu et al. 2022


# classifier-free guidance when a class is asked for and no --guidance is given: on the labelled
# real-photograph sets (2, 5 and 10 classes, 8 and 32 px, 150 to 2500 CPU steps, guided in the
# interval below) weight 1 was closer to the held-out images than 2 in 8 of 11 runs, 0.8x the
# Frechet distance on the geometric mean (0.4-0.7x on ten classes), and read as the class as
# often to within 0.03; 2 led in the other 3: five classes after 150 and 300 steps, two after
# 150 (docs/sampling.md, "The guidance weight")
DEFAULT_GUIDANCE = 1.0
# ...applied only where the noise level sigma = sqrt((1 - alpha_bar) / alpha_bar) lies in
# (0.28, 2.9], the interval of Kynkaanniemi et al. 2024, the class alone elsewhere: on the
# labelled real-photograph sets after 300 and 600 CPU steps the Frechet distance fell from 1.85
# to 1.53 (five classes) and from 7.6 to 1.4 (ten), the share read as the class rose from 0.92
# to 0.93 and from 0.84 to 0.94, and a guided sample cost 1.2x an unguided one, not 2x
# (docs/sampling.md, benchmarks/guidance_interval.py). None: guided at every step.
DEFAULT_GUIDANCE_INTERVAL = (0.28, 2.9)


def interval_text(interval: tuple[float, float] | None) -> str:
    """A guidance interval as --guidance-interval takes it: "0.28,2.9" (every digit), or
    "all"."""
    return "all" if interval is None else f"{interval[0]!r},{interval[1]!r}"


SAMPLER_DEFAULT_STEPS = {SamplerName.ddpm: None, SamplerName.ddim: 50, SamplerName.dpmpp: 20}
SAMPLER_DEFAULT_SPACING = {
    SamplerName.ddpm: "linspace",
    SamplerName.ddim: "logsnr",
    SamplerName.dpmpp: "logsnr",
}


class Spacing(str, Enum):
    """How a sampler spaces its timesteps over [0, T-1] (samplers.timesteps)."""

    logsnr = "logsnr"  # evenly in log-SNR
    linspace = "linspace"  # evenly in t, both ends included
    leading = "leading"  # diffusers' leading: multiples of T // steps from 0
    trailing = "trailing"  # diffusers' trailing: from T - 1 down in steps of T / steps


class Variance(str, Enum):
    """sigma_t^2 of the reverse process (the ddpm sampler, the bound)."""

    large = "large"  # beta_t, the paper's CIFAR-10 choice
    small = "small"  # beta~_t, the posterior's variance


SPACINGS = tuple(s.value for s in Spacing)


@dataclass(frozen=True)
class SamplerConfig:
    """How to sample. None means the sampler's own default (see `resolved`); the resolved
    config is what goes into each image's provenance."""

    # None: by the model's objective, see `resolved` and docs/sampling.md
    sampler: SamplerName | None = None
    steps: int | None = None  # None: ddpm every timestep (T, the paper), ddim 50, dpm++ 20
    eta: float = 0.0  # ddim: 0 deterministic, 1 ancestral-like
    # ddpm: "large" (sigma^2 = beta, the paper's CIFAR-10) or "small" (beta_tilde); None: large
    # when ddpm is named, small when it is the automatic choice for eps models
    variance: str | None = None
    spacing: str | None = None  # None: linspace for ddpm, logsnr for ddim and dpm++
    clip: bool = True  # clip predicted x_0 to [-1, 1]

    def __post_init__(self) -> None:
        try:
            if self.sampler is not None:
                object.__setattr__(self, "sampler", SamplerName(self.sampler))
        except ValueError:
            names = ", ".join(s.value for s in SamplerName)
            raise ConfigError(f"unknown sampler {self.sampler!r}; choose one of: {names}") from None
        if self.steps is not None and (isinstance(self.steps, bool) or self.steps < 1):
            raise ConfigError(f"steps must be at least 1, got {self.steps}")
        if not (isinstance(self.eta, (int, float)) and 0.0 <= self.eta <= 1.0):
            raise ConfigError(f"eta must be between 0 and 1, got {self.eta}")
        if self.variance not in (None, "large", "small"):
            raise ConfigError(f"variance must be large or small, got {self.variance!r}")
        if self.spacing is not None and self.spacing not in SPACINGS:
            raise ConfigError(
                f"unknown spacing {self.spacing!r}; choose one of: {', '.join(SPACINGS)}"
            )

    def resolved(self, timesteps: int, objective: str = "v") -> SamplerConfig:
        """Sampler, steps and spacing filled in for a model with T = `timesteps` predicting
        `objective`; steps > T refused.

        With no sampler named: dpm++ (20 steps) for v and x0 models; for eps models, ddpm over
        100 steps with the posterior variance, because deterministic samplers keep visible
        noise in eps models trained for minutes rather than days (docs/sampling.md).
        """
        if self.sampler is None:
            if objective != "eps":
                return replace(self, sampler=SamplerName.dpmpp).resolved(timesteps, objective)
            auto = replace(self, sampler=SamplerName.ddpm, variance=self.variance or "small")
            return replace(auto, steps=self.steps or min(100, timesteps)).resolved(timesteps)
        steps = self.steps or SAMPLER_DEFAULT_STEPS[self.sampler] or timesteps
        if self.steps is None:
            steps = min(steps, timesteps)
        elif steps > timesteps:
            raise ConfigError(
                f"--steps {steps} is more than the model's {timesteps} diffusion timesteps"
            )
        spacing = self.spacing or SAMPLER_DEFAULT_SPACING[self.sampler]
        variance = self.variance or "large"
        return SamplerConfig(self.sampler, steps, self.eta, variance, spacing, self.clip)

    def to_dict(self) -> dict:
        return {f.name: jsonable(getattr(self, f.name)) for f in fields(self)}


FACTORS = (2, 4, 8)  # ILVR's downsampling factors
DEFAULT_GUIDE_FACTOR = 4  # --guide: keeps the layout and colours, redraws the detail
DEFAULT_STRENGTH = 0.5  # --init: half the noise, see docs/editing.md
# RePaint: jump back one step, R times at every step, with the ancestral sampler over 100 steps
# and the posterior variance where no sampler is named. On real photographs (docs/editing.md)
# this kept the image's class and matched the seam best per second; on the exact model for
# Gaussian data, one-step jumps reach the right conditional in fewer evaluations than 10-step.
DEFAULT_JUMP, DEFAULT_RESAMPLE = 1, 3
INPAINT_STEPS, INPAINT_VARIANCE = 100, "small"


class EditMode(str, Enum):
    inpaint = "inpaint"  # RePaint over a mask, a box or outpainting's padding
    sdedit = "sdedit"  # ddpm sample --init --strength
    upscale = "upscale"  # ILVR from a small image
    guide = "guide"  # ILVR from an image of the model's size (ddpm sample --guide)


@dataclass(frozen=True)
class EditSpec:
    """An edit as the command line gives it; generation/editing.open_inputs reads and checks it."""

    mode: EditMode
    command: str  # "inpaint", "upscale" or "sample": how the redraw command starts
    image: str  # a file, a folder, or "-"
    mask: str | None = None
    box: tuple[int, int, int, int] | None = None
    outpaint: tuple[int, int, int, int] | None = None
    resize: bool = False
    strength: float = DEFAULT_STRENGTH
    factor: int | None = None  # None: upscale infers it from the sizes, guide uses the default
    jump: int = DEFAULT_JUMP
    resample: int = DEFAULT_RESAMPLE
