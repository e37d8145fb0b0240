"""Named model presets, and the default preset for an image size and device.

The paper's presets reproduce the authors' networks exactly; the small ones trade capacity for
speed so that a laptop CPU can train something useful in minutes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ddpm_cli.config import ModelConfig, Schedule
from ddpm_cli.errors import ConfigError

PAPER_256 = ModelConfig(
    image_size=(256, 256),
    channels=128,
    channel_mult=(1, 1, 2, 2, 4, 4),
    num_res_blocks=2,
    attention_resolutions=(16,),
    dropout=0.0,
)

PRESETS: dict[str, ModelConfig] = {
    # Ho et al. 2020, CIFAR-10: 35,746,307 parameters, as the official code counts them
    "cifar10": ModelConfig(
        image_size=(32, 32),
        channels=128,
        channel_mult=(1, 2, 2, 2),
        num_res_blocks=2,
        attention_resolutions=(16,),
        dropout=0.1,
    ),
    # Ho et al. 2020, CelebA-HQ and LSUN at 256x256 (about 114M parameters; dropout 0 there)
    "celebahq256": PAPER_256,
    "lsun256": PAPER_256,
    # CPU-friendly: the paper's layout at a quarter of the width and fewer blocks, the timestep
    # (and class) scaling and shifting each block's norm: measured 1.1-2.8x closer to real
    # images at 32x32 (docs/training.md, "How the time and class enter each block")
    "small": ModelConfig(
        image_size=(32, 32),
        channels=32,
        channel_mult=(1, 2, 2),
        num_res_blocks=1,
        attention_resolutions=(8,),
        dropout=0.0,
        scale_shift=True,
    ),
    "medium": ModelConfig(
        image_size=(32, 32),
        channels=64,
        channel_mult=(1, 2, 2, 2),
        num_res_blocks=2,
        attention_resolutions=(16,),
        dropout=0.1,
    ),
    # for tests and smoke runs, and images of 16 px and less: a few hundred thousand parameters;
    # the paper's additive timestep (scale and shift were mixed at 8x8: docs/training.md)
    "tiny": ModelConfig(
        image_size=(16, 16),
        channels=32,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(),
        dropout=0.0,
    ),
}


@dataclass(frozen=True)
class Recipe:
    """How a preset trains unless told otherwise (TrainConfig's lr, warmup_steps, cooldown,
    and the forward process's beta schedule)."""

    lr: float
    warmup_steps: int  # at most; a run of known length warms up over at most 5% of it
    # the share at the end of a run of known length (--steps, --epochs, --time) over which
    # the learning rate falls linearly to 0; 0 keeps it constant after the warm-up
    cooldown: float
    schedule: Schedule
    # a --time run's warm-up also ends at this share of its time (0: only by its steps)
    warmup_share: float = 0.0


# Ho et al. 2020: Adam at 2e-4, 5000 warm-up steps, constant; kept for the paper's networks
PAPER_RECIPE = Recipe(lr=2e-4, warmup_steps=5000, cooldown=0.0, schedule=Schedule.linear)
# the CPU presets' recipe for runs of minutes to hours, chosen on real photographs and faces
# (docs/training.md, "Defaults on real images"): 5x the paper's rate, a short warm-up, a
# linear cooldown over the last 30% of the run, and the cosine schedule (Nichol & Dhariwal)
SHORT_RECIPE = Recipe(
    lr=1e-3, warmup_steps=100, cooldown=0.3, schedule=Schedule.cosine, warmup_share=0.05
)
RECIPES = {"cifar10": PAPER_RECIPE, "celebahq256": PAPER_RECIPE, "lsun256": PAPER_RECIPE}


def recipe_for(preset: str) -> Recipe:
    """The training recipe of a preset: the paper's for the paper's networks, SHORT_RECIPE for
    the CPU presets (and any other)."""
    return RECIPES.get(preset, SHORT_RECIPE)


def preset_for(image_size: tuple[int, int], accelerated: bool) -> str:
    """The default preset for (height, width): the paper's networks on a GPU, small on a CPU.

    accelerated: True on CUDA or MPS. The longer side decides.
    """
    image_size = max(image_size)
    if not accelerated:
        return "tiny" if image_size <= 16 else "small"
    return "cifar10" if image_size <= 64 else "celebahq256"


def build_model_config(
    preset: str, image_size: tuple[int, int], channels: int, **overrides
) -> ModelConfig:
    """A preset adapted to the data: its image size and channels, plus explicit overrides."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    base = PRESETS[preset]
    # drop the deepest levels that the image size cannot be halved for (a 4-level preset at 8x8)
    mult = base.channel_mult
    while len(mult) > 1 and (
        min(image_size) < 2 ** len(mult) or any(s % 2 ** (len(mult) - 1) for s in image_size)
    ):
        mult = mult[:-1]
    overrides = {k: v for k, v in overrides.items() if v is not None}
    values = {
        "image_size": image_size,
        "in_channels": channels,
        "out_channels": channels,
        "channel_mult": mult,
        **overrides,
    }
    config = replace(base, **values)
    if "attention_resolutions" in overrides:  # as given
        return config
    levels = [config.resolution(i) for i in range(len(config.channel_mult))]
    return replace(config, attention_resolutions=attention_at(base.attention_resolutions, levels))


def attention_at(wanted: tuple[int, ...], levels: list[int]) -> tuple[int, ...]:
    """A preset's attention resolutions on the levels (feature-map sizes) an image size gives.

    A resolution that no level has moves to the level nearest it by ratio, if that is within a
    factor of 2: the `small` preset attends at 8x8 at 32 px, at 7x7 at 28 and 6x6 at 24, where
    the preset's 8 names no level. At a power of two the levels are the preset's own and
    nothing moves; at 64 px (levels 64, 32, 16) 8 is twice away from 16, and is dropped."""
    out = set()
    for r in wanted:
        near = min(levels, key=lambda s: (max(s / r, r / s), s))
        if max(near / r, r / near) < 2:
            out.add(near)
    return tuple(sorted(out, reverse=True))
