"""Configuration: one frozen dataclass per concern, modes as `str` enums.

These dataclasses are the single source of truth for defaults. The CLI builds them from its
options and the core reads only them; later they are saved as JSON inside checkpoints.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import Enum

from ddpm_cli.errors import ConfigError


class Schedule(str, Enum):
    """Named beta schedules. A released name never changes meaning: checkpoints depend on it."""

    linear = "linear"  # Ho et al. 2020: 1e-4 -> 0.02 over T=1000
    cosine = "cosine"  # Nichol & Dhariwal 2021: s = 0.008, beta capped at 0.999
    quadratic = "quadratic"  # linear in sqrt(beta) between the linear schedule's ends
    sigmoid = "sigmoid"  # sigmoid(-6 .. 6) between the linear schedule's ends


@dataclass(frozen=True)
class DiffusionConfig:
    """The forward process: which beta schedule, over how many steps."""

    schedule: Schedule = Schedule.linear
    timesteps: int = 1000  # T; the paper's value

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "schedule", Schedule(self.schedule))
        except ValueError:
            names = ", ".join(s.value for s in Schedule)
            raise ConfigError(
                f"unknown schedule {self.schedule!r}; choose one of: {names}"
            ) from None
        if isinstance(self.timesteps, bool) or not isinstance(self.timesteps, int):
            raise ConfigError(f"timesteps must be an integer, got {self.timesteps!r}")
        if self.timesteps < 1:
            raise ConfigError(f"timesteps must be at least 1, got {self.timesteps}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["schedule"] = self.schedule.value
        return d


@dataclass(frozen=True)
class NoiseConfig:
    """A forward-process preview (`ddpm noise`): which timesteps, what to write."""

    diffusion: DiffusionConfig = DiffusionConfig()
    ts: tuple[int, ...] = ()  # zero-based timesteps; empty means a default strip
    gif: bool = False  # animate the chain t = 0 .. T-1 instead
    frames: int = 50  # frames in the animation; GIFs of noise compress poorly, so not many
    seed: int | None = None  # None: a fresh seed, reported back
    size: int | None = None  # resize + center-crop to size x size; None keeps the input size
    device: str = "auto"

    def __post_init__(self) -> None:
        T = self.diffusion.timesteps
        for t in self.ts:
            if not 0 <= t < T:
                raise ConfigError(f"t={t} is outside [0, {T - 1}] for T={T} (t is zero-based)")
        if self.frames < 2:
            raise ConfigError(f"frames must be at least 2, got {self.frames}")
        if self.size is not None and self.size < 1:
            raise ConfigError(f"size must be a positive number of pixels, got {self.size}")
        if self.seed is not None and self.seed < 0:
            raise ConfigError(f"seed must be non-negative, got {self.seed}")
