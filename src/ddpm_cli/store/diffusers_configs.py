"""diffusers' JSON configurations and ddpm's, both ways: which UNet2DModel and DDPMScheduler
configurations are the paper's network and one of ddpm's schedules (store/interop.py moves the
folders and weights). Anything else is refused by the option's name, with the value given.
"""

from __future__ import annotations

import math

import torch

from ddpm_cli.config import MAX_TIMESTEPS, DiffusionConfig, ModelConfig, Schedule
from ddpm_cli.diffusion.schedules import make_betas
from ddpm_cli.errors import DataError

VERSION = "0.25.0"  # the diffusers version an exported folder says it was written for
PREDICTION = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
VARIANCE = {"fixed_small": "small", "fixed_small_log": "small", "fixed_large": "large",
            "fixed_large_log": "large"}  # fmt: skip
# UNet2DModel options that must have these values for the paper's network
REQUIRED = {
    "act_fn": "silu", "time_embedding_type": "positional", "flip_sin_to_cos": False,
    "freq_shift": 1, "center_input_sample": False, "mid_block_scale_factor": 1,
    "norm_eps": 1e-6, "norm_num_groups": 32,
    "add_attention": True, "class_embed_type": None,
    "downsample_type": "conv", "upsample_type": "conv", "time_embedding_dim": None,
}  # fmt: skip
# resnet_time_scale_shift: ModelConfig.scale_shift. With "scale_shift" diffusers leaves the
# middle block's attention without its group norm unless attn_norm_num_groups names the groups
SCALE_SHIFT = {"default": False, "scale_shift": True}
# a class-conditional model: num_class_embeds = classes + 1 ("no class"), and the class names
# under this key, which diffusers keeps in the config and otherwise ignores
CLASSES_KEY = "ddpm_classes"
# ddpm's schedules as diffusers' beta_schedule, with the paper's end points at T = 1000
TWINS = {"linear": "linear", "quadratic": "scaled_linear", "sigmoid": "sigmoid",
         "cosine": "squaredcos_cap_v2"}  # fmt: skip


class InteropError(DataError):
    """A diffusers folder that cannot be converted, or a checkpoint that cannot be exported."""


def _whole(cfg: dict, key: str, default: int, where: str, high: int | None = None) -> int:
    """cfg[key] (or `default`), which must be a whole number from 1 (to `high`)."""
    value = cfg.get(key, default)
    if type(value) is not int or value < 1 or (high is not None and value > high):
        upto = f" to {high:,}" if high is not None else ""
        raise InteropError(f"{where} option {key}={value!r}: expected a whole number, 1{upto}")
    return value


def _number(cfg: dict, key: str, default: float, where: str, low: float = -math.inf) -> float:
    value = cfg.get(key, default)
    if type(value) not in (int, float) or not low <= value < math.inf:
        least = f" from {low:g}" if low > -math.inf else ""
        raise InteropError(f"{where} option {key}={value!r}: expected a number{least}")
    return float(value)


def _name(cfg: dict, key: str, default: str, known) -> str:
    """cfg[key] (or `default`), a name among `known`, else refused with them listed."""
    value = cfg.get(key, default)
    if not isinstance(value, str) or value not in known:
        raise InteropError(f"unsupported scheduler option {key}={value!r} (known: "
                           f"{', '.join(known)})")  # fmt: skip
    return value


def _close(a, b) -> bool:
    return isinstance(a, (int, float)) and math.isclose(a, b, rel_tol=1e-9)


def model_config(cfg: dict) -> ModelConfig:
    """ddpm's ModelConfig for a UNet2DModel config, or a refusal naming the option."""
    try:
        return _model_config(cfg)
    except (TypeError, ValueError, ZeroDivisionError, AttributeError) as e:
        raise InteropError(f"UNet2DModel config does not map: {e}") from None


def _model_config(cfg: dict) -> ModelConfig:
    where = "UNet2DModel"
    for key, want in REQUIRED.items():
        if key in cfg and cfg[key] != want and not (key == "norm_eps" and _close(cfg[key], want)):
            raise InteropError(f"unsupported {where} option {key}={cfg[key]!r} (not {want!r})")
    widths = cfg.get("block_out_channels", ())
    down, up = cfg.get("down_block_types", ()), cfg.get("up_block_types", ())
    if not isinstance(widths, list) or not all(type(w) is int and w > 0 for w in widths):
        raise InteropError(f"{where} option block_out_channels={widths!r}: expected a list of "
                           "whole numbers from 1")  # fmt: skip
    if not widths or len(down) != len(widths) or len(up) != len(widths):
        raise InteropError(f"{where}: block_out_channels, down and up block types must match")
    attn = []
    for level, (d, u) in enumerate(zip(down, reversed(up), strict=True)):
        for block, known in ((d, ("DownBlock2D", "AttnDownBlock2D")),
                             (u, ("UpBlock2D", "AttnUpBlock2D"))):  # fmt: skip
            if block not in known:
                raise InteropError(f"unsupported {where} block type {block}")
        if (d == "AttnDownBlock2D") != (u == "AttnUpBlock2D"):
            raise InteropError(f"{where}: attention differs down and up at level {level}")
        attn.append(d == "AttnDownBlock2D")
    ch = widths[0]
    if any(w % ch for w in widths):
        raise InteropError(f"block_out_channels {widths} are not multiples of the first")
    shift = cfg.get("resnet_time_scale_shift", "default")
    if not isinstance(shift, str) or shift not in SCALE_SHIFT:
        raise InteropError(f"unsupported {where} option resnet_time_scale_shift={shift!r} (not "
                           "'default' or 'scale_shift')")  # fmt: skip
    groups = cfg.get("attn_norm_num_groups")
    if groups not in (None, REQUIRED["norm_num_groups"]) or (groups is None and SCALE_SHIFT[shift]):
        why = (f"ddpm's attention norms have {REQUIRED['norm_num_groups']} groups"
               if groups is not None else "diffusers then builds the middle block's attention "
               "without the group norm that ddpm's has")  # fmt: skip
        raise InteropError(f"unsupported {where} option attn_norm_num_groups={groups!r} with "
                           f"resnet_time_scale_shift={shift!r}: {why}")  # fmt: skip
    heads = cfg.get("attention_head_dim", 8)  # absent: diffusers uses heads of 8 channels
    if heads is not None and (type(heads) is not int or heads < 1):
        raise InteropError(f"unsupported {where} option attention_head_dim={heads!r} (ddpm's "
                           "attention has one head: none, or the width of each attention level)")
    # the levels with attention, and the middle block, which always has it (add_attention)
    attended = [(f"level {i}", w) for i, (a, w) in enumerate(zip(attn, widths, strict=True))
                if a] + [("the middle block", widths[-1])]  # fmt: skip
    at, width = next(((n, w) for n, w in attended if heads not in (None, w)), (None, None))
    if at is not None:
        raise InteropError(f"unsupported {where} option attention_head_dim={heads}: "
                           f"{at}'s {width} channels would be {width / heads:g} heads; ddpm's "
                           "attention has one")  # fmt: skip
    size = cfg.get("sample_size", 32)
    sizes = [size] * 2 if type(size) is int else size
    if not isinstance(sizes, list) or len(sizes) != 2 or not all(
            type(s) is int and s > 0 for s in sizes):  # fmt: skip
        raise InteropError(f"{where} option sample_size={size!r}: expected a whole number, or "
                           "[height, width]")  # fmt: skip
    h, w = sizes
    padding = {0: "bottom_right", 1: "symmetric"}.get(cfg.get("downsample_padding", 1))
    if padding is None:
        raise InteropError(f"unsupported downsample_padding={cfg['downsample_padding']!r}")
    classes = cfg.get(CLASSES_KEY) or []
    embeds = cfg.get("num_class_embeds")
    if embeds is not None and (not isinstance(classes, list) or type(embeds) is not int
                               or embeds != len(classes) + 1):  # fmt: skip
        raise InteropError(
            f"unsupported {where} option num_class_embeds={embeds!r} without ddpm's class "
            f"names ({CLASSES_KEY}: one per class, and one embedding more for no class)"
        )
    try:
        return ModelConfig(
            image_size=(h, w), in_channels=_whole(cfg, "in_channels", 3, where),
            out_channels=_whole(cfg, "out_channels", 3, where), channels=ch,
            channel_mult=tuple(w // ch for w in widths),
            num_res_blocks=_whole(cfg, "layers_per_block", 2, where),
            attention_resolutions=tuple(min(h, w) >> i for i, a in enumerate(attn) if a),
            dropout=_number(cfg, "dropout", 0.0, where), downsample_padding=padding,
            classes=tuple(classes) if embeds is not None else (),
            scale_shift=SCALE_SHIFT[shift],
        )  # fmt: skip
    except DataError:
        raise
    except Exception as e:  # a ConfigError from the dataclass
        raise InteropError(f"{where} config does not map: {e}") from None


def unet_config(config: ModelConfig) -> dict:
    """The UNet2DModel config of ddpm's network `config` (export)."""
    if config.channels < 32 or any(config.channels * m % 32 for m in config.channel_mult):
        raise InteropError("diffusers' UNet2DModel needs widths divisible by 32 (norm groups)")
    attn = [config.attends_at(i) for i in range(len(config.channel_mult))]
    h, w = config.image_size
    unet = {
        "_class_name": "UNet2DModel", "_diffusers_version": VERSION,
        "sample_size": [h, w] if h != w else h,
        "in_channels": config.in_channels, "out_channels": config.out_channels,
        "block_out_channels": [config.channels * m for m in config.channel_mult],
        "layers_per_block": config.num_res_blocks,
        "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "downsample_padding": 0 if config.downsample_padding == "bottom_right" else 1,
        "dropout": config.dropout, "attention_head_dim": None, **REQUIRED,
        "num_class_embeds": config.num_classes + 1 if config.classes else None,
        "resnet_time_scale_shift": "scale_shift" if config.scale_shift else "default",
        "attn_norm_num_groups": REQUIRED["norm_num_groups"] if config.scale_shift else None,
    }  # fmt: skip
    if config.classes:
        unet[CLASSES_KEY] = list(config.classes)
    return unet


def diffusers_betas(cfg: dict) -> torch.Tensor:
    """The betas a DDPMScheduler config describes, in float64 (diffusers' four formulas)."""
    where = "scheduler"
    T = _whole(cfg, "num_train_timesteps", 1000, where, MAX_TIMESTEPS)
    lo, hi = (_number(cfg, key, value, where, low=0.0)
              for key, value in (("beta_start", 1e-4), ("beta_end", 0.02)))  # fmt: skip
    kind = _name(cfg, "beta_schedule", "linear", TWINS.values())
    if cfg.get("trained_betas") is not None:
        raise InteropError("unsupported scheduler option trained_betas (explicit betas)")
    if kind == "linear":
        return torch.linspace(lo, hi, T, dtype=torch.float64)
    if kind == "scaled_linear":
        return torch.linspace(lo**0.5, hi**0.5, T, dtype=torch.float64) ** 2
    if kind == "sigmoid":
        return torch.sigmoid(torch.linspace(-6, 6, T, dtype=torch.float64)) * (hi - lo) + lo
    f = [math.cos((i / T + 0.008) / 1.008 * math.pi / 2) ** 2 for i in range(T + 1)]  # cosine
    betas = [min(1 - f[i + 1] / f[i], 0.999) for i in range(T)]
    return torch.tensor(betas, dtype=torch.float64)


def scheduler_mapping(cfg: dict) -> tuple[DiffusionConfig, str, dict]:
    """(DiffusionConfig, objective, sampler defaults) for a diffusers scheduler config."""
    for key, ok in (("thresholding", False), ("rescale_betas_zero_snr", False)):
        if cfg.get(key, ok) != ok:
            raise InteropError(f"unsupported scheduler option {key}={cfg[key]!r}")
    if cfg.get("clip_sample", True) and not _close(cfg.get("clip_sample_range", 1.0), 1.0):
        raise InteropError(f"unsupported clip_sample_range={cfg['clip_sample_range']!r} (1.0)")
    betas = diffusers_betas(cfg)
    T = betas.shape[0]
    schedule = next(
        (s for s in Schedule
         if torch.allclose(make_betas(DiffusionConfig(schedule=s, timesteps=T)), betas,
                           rtol=1e-6, atol=1e-12)),
        None,
    )  # fmt: skip
    if schedule is None:
        raise InteropError(
            f"the scheduler's betas ({cfg.get('beta_schedule', 'linear')}, "
            f"{cfg.get('beta_start')}..{cfg.get('beta_end')}, T={T}) match none of ddpm's "
            "schedules (linear, cosine, quadratic, sigmoid)"
        )
    prediction = _name(cfg, "prediction_type", "epsilon", PREDICTION)
    variance = _name(cfg, "variance_type", "fixed_small", VARIANCE)  # ddpm's are fixed
    defaults = {"variance": VARIANCE[variance], "clip": bool(cfg.get("clip_sample", True))}
    return DiffusionConfig(schedule=schedule, timesteps=T), PREDICTION[prediction], defaults


def scheduler_config(diffusion: DiffusionConfig, objective: str, defaults: dict) -> dict:
    """The DDPMScheduler config of ddpm's schedule, objective and sampler defaults (export);
    refused where diffusers has no twin of the schedule (read back, it must be the same)."""
    T = diffusion.timesteps
    scale = 1.0 if diffusion.schedule is Schedule.cosine else 1000 / T  # cosine has no ends
    scheduler = {
        "_class_name": "DDPMScheduler", "_diffusers_version": VERSION,
        "num_train_timesteps": T, "beta_schedule": TWINS[diffusion.schedule.value],
        "beta_start": 1e-4 * scale, "beta_end": 0.02 * scale, "trained_betas": None,
        "variance_type": "fixed_large" if defaults.get("variance") == "large" else "fixed_small",
        "clip_sample": bool(defaults.get("clip", True)), "clip_sample_range": 1.0,
        "prediction_type": {v: k for k, v in PREDICTION.items()}[objective],
    }  # fmt: skip
    if scheduler_mapping(scheduler)[0].schedule != diffusion.schedule:
        raise InteropError(
            f"the {diffusion.schedule.value} schedule at T={T} has no diffusers twin"
        )
    return scheduler
