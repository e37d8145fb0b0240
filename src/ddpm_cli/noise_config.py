"""The forward-process preview's settings (`ddpm noise`): which timesteps, what to write."""

from __future__ import annotations

from dataclasses import dataclass

from ddpm_cli.config import DiffusionConfig
from ddpm_cli.errors import ConfigError

MAX_STRIP = 64  # timesteps in one strip


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
        if self.size is not None and not 1 <= self.size <= 8192:
            raise ConfigError(f"size must be between 1 and 8192 pixels, got {self.size}")
        if len(self.ts) > MAX_STRIP:
            raise ConfigError(f"at most {MAX_STRIP} timesteps in one strip, got {len(self.ts)}")
        if self.seed is not None and self.seed < 0:
            raise ConfigError(f"seed must be non-negative, got {self.seed}")
