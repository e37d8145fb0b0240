"""Configuration: one frozen dataclass per concern, modes as `str` enums.

These dataclasses are the single source of truth for defaults. The CLI builds them from its
options and the core reads only them; later they are saved as JSON inside checkpoints.
"""

from __future__ import annotations

import json
import math
import typing
from dataclasses import asdict, dataclass, fields
from enum import Enum

from ddpm_cli.errors import ConfigError
from ddpm_cli.text import json_fits, type_words

# Bounds on what a config may ask for, checked before anything is built or allocated: far beyond
# any network or schedule in use (the largest preset: 256x256, 128 x 1,1,2,2,4,4, 2 blocks), and
# low enough that a hostile checkpoint cannot make `ddpm inspect` or `sample` build for minutes.
MAX_TIMESTEPS = 100_000
MAX_SIDE = 8192  # pixels, per image side
MAX_WIDTH = 16_384  # channels at any level: channels x the largest multiplier
MAX_LEVELS = 10
MAX_RES_BLOCKS = 32
MAX_CLASSES = 100_000
DEFAULT_EPOCHS = 100  # a run's length when no --steps, --epochs or --time bounds it
AUGMENT_MAPS = 1  # ModelConfig.augment of a run with --shift: where its border was reflected

# names that the command line's help shows, here so that the help loads no torch
DEVICE_HELP = "auto, cpu, cuda, cuda:N or mps"  # what --device takes (device.resolve_device)
INCEPTION_WEIGHTS = "inception-2015-12-05.safetensors"  # FID's weights file in the user cache


class Schedule(str, Enum):
    """Named beta schedules. A released name never changes meaning: checkpoints depend on it."""

    linear = "linear"  # Ho et al. 2020: 1e-4 -> 0.02 over T=1000
    cosine = "cosine"  # Nichol & Dhariwal 2021: s = 0.008, beta capped at 0.999
    quadratic = "quadratic"  # linear in sqrt(beta) between the linear schedule's ends
    sigmoid = "sigmoid"  # sigmoid(-6 .. 6) between the linear schedule's ends


@dataclass(frozen=True)
class DiffusionConfig:
    """The forward process: which beta schedule, over how many steps. A schedule of None is
    "the preset's" (presets.Recipe), which training resolves before anything uses it."""

    schedule: Schedule | None = Schedule.linear
    timesteps: int = 1000  # T; the paper's value

    def __post_init__(self) -> None:
        try:
            if self.schedule is not None:
                object.__setattr__(self, "schedule", Schedule(self.schedule))
        except ValueError:
            names = ", ".join(s.value for s in Schedule)
            raise ConfigError(
                f"unknown schedule {self.schedule!r}; choose one of: {names}"
            ) from None
        if isinstance(self.timesteps, bool) or not isinstance(self.timesteps, int):
            raise ConfigError(f"timesteps must be an integer, got {self.timesteps!r}")
        if not 1 <= self.timesteps <= MAX_TIMESTEPS:
            raise ConfigError(f"timesteps must be 1 to {MAX_TIMESTEPS:,}, got {self.timesteps}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["schedule"] = None if self.schedule is None else self.schedule.value
        return d


class Objective(str, Enum):
    """What the network predicts."""

    eps = "eps"  # the noise: L_simple, the paper's default
    x0 = "x0"  # the clean image
    v = "v"  # the velocity sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0 (Salimans & Ho 2022)


@dataclass(frozen=True)
class ModelConfig:
    """The U-Net's architecture. Everything the network needs to be rebuilt from a checkpoint."""

    image_size: tuple[int, int] = (32, 32)  # (height, width)
    in_channels: int = 3  # 1 (gray), 3 (RGB) or 4 (RGBA)
    out_channels: int = 3
    channels: int = 128  # base width, "ch" in the authors' code
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)  # width multiplier per resolution level
    num_res_blocks: int = 2  # residual blocks per level on the way down (one more going up)
    attention_resolutions: tuple[int, ...] = (16,)  # shorter-side sizes that get self-attention
    dropout: float = 0.1
    # how the stride-2 convolutions pad: "symmetric" (1 pixel on every side; ddpm's own models)
    # or "bottom_right" (1 pixel after the last row and column only: TensorFlow's SAME padding,
    # as in the authors' code and the google/ddpm-* weights)
    downsample_padding: str = "symmetric"
    # class-conditional models: the class names, in label order (empty: unconditional). The
    # network learns one embedding per class and one more for "no class" (label len(classes)),
    # which classifier-free guidance needs.
    classes: tuple[str, ...] = ()
    # maps of the augmentation the network is told of (Karras et al. 2022's non-leaking
    # augmentation, made spatial): 1 for a run with --shift, the pixels its reflected border
    # filled, which sampling leaves empty, as in unshifted images; 0: none
    augment: int = 0
    # how the timestep (and class) embedding enters each residual block: False adds it to the
    # activations before the second normalisation, as in the paper; True scales and shifts the
    # normalised activations with it (adaptive group normalisation, Dhariwal & Nichol 2021),
    # what the small preset uses (docs/training.md, "How the time and class enter each block")
    scale_shift: bool = False

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def norm_widths(self) -> set[int]:
        """The channel counts the network group-normalizes: each level's width, and what the
        up path's blocks take in, a width concatenated with a skip connection's (the U-Net's
        skip stack in order; tests/test_unet.py checks it against the network built)."""
        ch, n = self.channels, self.num_res_blocks
        skips = [ch]
        for level, m in enumerate(self.channel_mult):
            skips += [ch * m] * (n + (level != len(self.channel_mult) - 1))
        widths, cur = {ch}, skips[-1]
        for m in reversed(self.channel_mult):
            for _ in range(n + 1):
                widths |= {cur + skips.pop(), ch * m}
                cur = ch * m
        return widths

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))
        if len(self.classes) > MAX_CLASSES:
            raise ConfigError(f"at most {MAX_CLASSES:,} classes, got {len(self.classes):,}")
        if len(set(self.classes)) != len(self.classes):
            seen: set[str] = set()
            twice = next(c for c in self.classes if c in seen or seen.add(c))
            raise ConfigError(f"class names must be distinct; {twice!r} appears more than once")
        for c in self.classes:  # they name sampled files: CLASS-000000.png
            if c in ("", ".", "..") or any(ch in c for ch in "/\\\0"):
                raise ConfigError(f"class name {c!r} cannot name a file; rename the class")
        size = self.image_size
        if isinstance(size, int):
            size = (size, size)
        object.__setattr__(self, "image_size", tuple(int(v) for v in size))
        object.__setattr__(self, "channel_mult", tuple(int(v) for v in self.channel_mult))
        object.__setattr__(
            self, "attention_resolutions", tuple(int(v) for v in self.attention_resolutions)
        )
        for name in ("in_channels", "out_channels"):
            if getattr(self, name) not in (1, 3, 4):
                raise ConfigError(f"{name} must be 1, 3 or 4, got {getattr(self, name)}")
        size = self.image_size
        if len(size) != 2 or not 1 <= min(size) <= max(size) <= MAX_SIDE:
            raise ConfigError(f"image_size must be (height, width), each 1 to {MAX_SIDE}, got "
                              f"{self.image_size}")  # fmt: skip
        if not 1 <= len(self.channel_mult) <= MAX_LEVELS or min(self.channel_mult) < 1:
            raise ConfigError(f"channel_mult must be 1 to {MAX_LEVELS} positive integers, got "
                              f"{self.channel_mult}")  # fmt: skip
        if not 1 <= self.channels * max(self.channel_mult) <= MAX_WIDTH:
            raise ConfigError(f"channels x channel_mult must be 1 to {MAX_WIDTH:,} at every level, "
                              f"got {self.channels} x {max(self.channel_mult)}")  # fmt: skip
        if not 1 <= self.num_res_blocks <= MAX_RES_BLOCKS:
            raise ConfigError(f"num_res_blocks must be 1 to {MAX_RES_BLOCKS}, got "
                              f"{self.num_res_blocks}")  # fmt: skip

        factor = 2 ** (len(self.channel_mult) - 1)
        h, w = self.image_size
        if h % factor or w % factor:
            raise ConfigError(
                f"image size {h}x{w} must be divisible by {factor} for "
                f"{len(self.channel_mult)} resolution levels"
            )
        for c in sorted(self.norm_widths()):
            if c % min(32, c):
                raise ConfigError(f"{c} channels cannot be split into {min(32, c)} norm groups")
        if self.downsample_padding not in ("symmetric", "bottom_right"):
            raise ConfigError(
                "downsample_padding must be symmetric or bottom_right, "
                f"got {self.downsample_padding}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.augment not in (0, AUGMENT_MAPS):
            raise ConfigError(f"augment must be 0 or {AUGMENT_MAPS}, got {self.augment}")

    def resolution(self, level: int) -> int:
        """The shorter side of the feature maps at resolution `level` (0 = full size)."""
        return min(self.image_size) // 2**level

    def attends_at(self, level: int) -> bool:
        return self.resolution(level) in self.attention_resolutions

    def to_dict(self) -> dict:
        return {f.name: jsonable(getattr(self, f.name)) for f in fields(self)}


def jsonable(value):
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, tuple):
        return list(value)
    return value


class Precision(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"  # autocast to bfloat16; weights and optimizer stay fp32
    fp16 = "fp16"  # autocast to float16 with a gradient scaler (CUDA)


class LogTo(str, Enum):
    """Where `ddpm train --log` sends live metrics and sample grids (training/loggers.py)."""

    tensorboard = "tensorboard"
    wandb = "wandb"


@dataclass(frozen=True)
class TrainConfig:
    """How to train. Values of None are resolved from the data and device at the start of a run
    (and the resolved values are what the checkpoint stores)."""

    preset: str = "auto"  # a name from presets.PRESETS; auto: by image size and device
    # (height, width): images are resized to cover it and center-cropped; an int means square.
    # None: the images' own size, at most 32 (sources.data_image_size)
    image_size: tuple[int, int] | None = None
    channels: int | None = None  # None: 1 for all-grayscale data, else 3
    flip: bool = True  # random horizontal flips, as in the paper
    # random translations by up to this many pixels each way, the border reflected (0: none),
    # the network told where; None: by data size (training.train.default_shift)
    shift: int | None = None
    stream: bool | None = None  # decode batches from disk; None: only when memory is short
    workers: int | None = None  # DataLoader processes when streaming; None: by CPU count
    data_cache: bool = True  # keep the decoded images in the run directory (in-memory data)
    # v, not the paper's eps: 5x closer to the data at the same compute (docs/training.md)
    objective: Objective = Objective.v
    min_snr_gamma: float | None = None  # None: L_simple's uniform weights
    # None (lr, warmup_steps, cooldown): the preset's recipe (presets.recipe_for): the
    # paper's (2e-4, 5000 steps, none) for its networks, 1e-3, 100 steps and 0.3 on the CPU
    lr: float | None = None
    warmup_steps: int | None = None  # linear warm-up; at most 5% of a run of known length
    warmup_share: float = 0.0  # a --time run's warm-up also ends at this share of its time
    cooldown: float | None = None  # the share at a run's end where lr falls linearly to 0
    grad_clip: float = 1.0  # global gradient-norm clipping, as in the paper
    ema_decay: float = 0.9999  # the paper's, as an upper bound; see train.ema_decay_at
    batch_size: int | None = None  # None: 128 (paper) on CUDA, 32 elsewhere
    grad_accum: int = 1
    # recompute each residual block's activations in the backward pass instead of keeping them:
    # 0.26-0.32x the bytes kept at 1.13-1.15x the step time on the CPU (docs/benchmarks.md)
    grad_checkpoint: bool = False
    epochs: int | None = None  # training ends at whichever of epochs, steps and time comes
    steps: int | None = None  # first; with none of them, DEFAULT_EPOCHS
    time_limit: float | None = None  # seconds of training (the loop, summed over resumes)
    seed: int | None = None
    precision: Precision | None = None  # None: forward.default_precision (bf16 on Ampere+, AMX)
    compile: bool | None = None  # None: on CUDA for runs of train.COMPILE_MIN_STEPS or more
    unconditional: bool = False  # ignore the class subfolders of the data
    # fine-tune: start from this checkpoint's or run's weights, architecture and schedule
    # (training/finetune.py); None: from scratch
    init: str | None = None
    # classifier-free guidance: the share of training images whose class is replaced by "no
    # class", so that one network learns both (Ho & Salimans 2022 use 0.1 or 0.2)
    cond_drop: float = 0.1
    device: str = "auto"
    sample_every: int = 1000  # steps between sample grids (0: never)
    checkpoint_every: int = 1000  # steps between checkpoints
    # step-numbered copies of model.safetensors (model-00050000.safetensors) kept besides it,
    # one per checkpoint, the oldest pruned first; None: none
    keep: int | None = None
    # steps between quality figures (training/quality.py: the loss on images set aside), each
    # saving best.safetensors when it is the lowest yet; None: at every checkpoint; 0: never
    eval_every: int | None = None
    # images set aside from training for the quality figure; None: 5% of them, at most 256,
    # none when that is under 8 (quality.holdout_size); 0: none (and no figure)
    holdout: int | None = None
    log_every: int = 50  # steps between metrics lines
    log: tuple[LogTo, ...] = ()  # live logs besides metrics.jsonl (training/loggers.py)
    num_samples: int = 16  # images in each sample grid

    def __post_init__(self) -> None:
        object.__setattr__(self, "objective", Objective(self.objective))
        try:
            # each logger once (--log wandb --log wandb), in the order given
            object.__setattr__(self, "log", tuple(dict.fromkeys(LogTo(v) for v in self.log)))
        except ValueError:
            names = ", ".join(v.value for v in LogTo)
            raise ConfigError(f"unknown --log {list(self.log)}; choose from: {names}") from None
        if self.image_size is not None:
            object.__setattr__(self, "image_size", parse_size(self.image_size))
            if self.shift is not None and self.shift >= min(self.image_size):
                raise ConfigError(f"shift {self.shift} must be less than the image size "
                                  f"{min(self.image_size)}")  # fmt: skip
        if self.precision is not None:
            object.__setattr__(self, "precision", Precision(self.precision))
        for name in ("grad_accum", "log_every", "num_samples"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("batch_size", "epochs", "steps", "keep"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be at least 1, got {value}")
        for name in ("eval_every", "holdout", "shift"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"{name} must be 0 or more, got {value}")
        if not 0.0 <= self.cond_drop <= 1.0:
            raise ConfigError(f"cond_drop must be in [0, 1], got {self.cond_drop}")
        if self.workers is not None and self.workers < 0:
            raise ConfigError(f"workers must be 0 or more, got {self.workers}")
        if self.channels not in (None, 1, 3, 4):
            raise ConfigError(f"channels must be 1, 3 or 4, got {self.channels}")
        if self.lr is not None and not 0 < self.lr < math.inf:
            raise ConfigError(f"lr must be positive, got {self.lr}")
        for name in ("cooldown", "warmup_share"):
            if getattr(self, name) is not None and not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} must be between 0 and 1, got {getattr(self, name)}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.min_snr_gamma is not None and not 0 < self.min_snr_gamma < math.inf:
            raise ConfigError(f"min_snr_gamma must be positive, got {self.min_snr_gamma}")
        if not 0 < self.grad_clip < math.inf:
            raise ConfigError(f"grad_clip must be positive, got {self.grad_clip}")
        if self.time_limit is not None and not 0 < self.time_limit < math.inf:
            raise ConfigError(f"time_limit must be a positive number of seconds: {self.time_limit}")

    def to_dict(self) -> dict:
        return {f.name: jsonable(getattr(self, f.name)) for f in fields(self)}

    @property
    def evaluates_every(self) -> int:
        """Steps between quality figures; 0 when the run computes none."""
        if not self.holdout:
            return 0
        return self.checkpoint_every if self.eval_every is None else self.eval_every


def epoch_limit(epochs, steps, time_limit) -> int | None:
    """The passes over the data that end a run: --epochs, else DEFAULT_EPOCHS when neither
    --steps nor --time bounds it, else none."""
    if epochs is not None:
        return epochs
    return None if steps is not None or time_limit is not None else DEFAULT_EPOCHS


def parse_size(value) -> tuple[int, int]:
    """32, "32", "64x32" (width x height), (h, w) or [h, w] -> (height, width), each >= 8."""
    usage = f"image size {value!r}: use N or WIDTHxHEIGHT, e.g. 32 or 64x32"
    if isinstance(value, str):
        try:
            nums = [int(p) for p in value.lower().split("x")]
        except ValueError:
            raise ConfigError(usage) from None
        value = nums[0] if len(nums) == 1 else tuple(reversed(nums))  # (height, width)
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if not (isinstance(value, (tuple, list)) and len(value) == 2):
        raise ConfigError(usage)
    h, w = (int(v) for v in value)
    if min(h, w) < 8 or max(h, w) > 4096:
        raise ConfigError(f"image size {w}x{h}: each side must be between 8 and 4096 pixels")
    return h, w


def from_dict(cls, data: dict):
    """Rebuild a config dataclass from its JSON form, refusing unknown keys, values of the
    wrong type (a float where an integer belongs) and bad values, before anything is built."""
    if not isinstance(data, dict):
        raise ConfigError(f"{cls.__name__}: expected a JSON object, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown fields {', '.join(unknown)}")
    hints = typing.get_type_hints(cls)
    for key, value in data.items():
        if not json_fits(value, hints[key]):
            shown = json.dumps(value)
            shown = shown if len(shown) <= 40 else shown[:37] + "..."
            raise ConfigError(f"{cls.__name__}: {key} must be {type_words(hints[key])}, "
                              f"got {shown}")  # fmt: skip
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{cls.__name__}: {e}") from None
