"""diffusers folders in and out: `ddpm import` and `ddpm export --diffusers`.

A diffusers DDPM folder is model_index.json with unet/ (config.json and
diffusion_pytorch_model.safetensors) and scheduler/scheduler_config.json, or a bare UNet2DModel
folder. Only the UNet2DModel configurations that are the paper's network map (all google/ddpm-*
models are); anything else is refused by name. Only safetensors are read: never a pickle.
diffusers itself is not needed: both formats are JSON and safetensors.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from ddpm_cli import __version__
from ddpm_cli.config import DiffusionConfig, ModelConfig, Schedule, TrainConfig
from ddpm_cli.diffusion.schedules import make_betas
from ddpm_cli.errors import DataError
from ddpm_cli.store.checkpoint import (
    CheckpointError,
    config_section,
    save_checkpoint,
)
from ddpm_cli.store.files import make_folder, write_atomic
from ddpm_cli.store.models import build_model, open_checkpoint
from ddpm_cli.text import parse_json

WEIGHTS, PICKLE = "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"
PREDICTION = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
VARIANCE = {"fixed_small": "small", "fixed_small_log": "small", "fixed_large": "large",
            "fixed_large_log": "large"}  # fmt: skip
# UNet2DModel options that must have these values for the paper's network
REQUIRED = {
    "act_fn": "silu", "time_embedding_type": "positional", "flip_sin_to_cos": False,
    "freq_shift": 1, "center_input_sample": False, "mid_block_scale_factor": 1,
    "norm_eps": 1e-6, "norm_num_groups": 32, "resnet_time_scale_shift": "default",
    "add_attention": True, "class_embed_type": None,
    "downsample_type": "conv", "upsample_type": "conv", "time_embedding_dim": None,
    "attn_norm_num_groups": None,
}  # fmt: skip
# a class-conditional model: num_class_embeds = classes + 1 ("no class"), and the class names
# under this key, which diffusers keeps in the config and otherwise ignores
CLASSES_KEY = "ddpm_classes"
# the tensors a layer of each kind in name_pairs has, under the same names on both sides
PLAIN = {"same": ("weight", "bias"), "embedding": ("weight",)}


class InteropError(DataError):
    """A diffusers folder that cannot be converted, or a checkpoint that cannot be exported."""


def _json(path: Path) -> dict:
    try:
        data = parse_json(path.read_text())
    except (OSError, ValueError) as e:
        raise InteropError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise InteropError(f"{path}: not a JSON object")
    return data


def is_diffusers_folder(folder: Path) -> bool:
    """A diffusers pipeline folder, or a UNet folder with its weights."""
    unet = (folder / WEIGHTS).exists() or (folder / PICKLE).exists()
    return (folder / "model_index.json").exists() or ((folder / "config.json").exists() and unet)


def locate(folder: Path) -> tuple[Path, Path | None]:
    """(the UNet folder, the scheduler config or None) of a diffusers pipeline or UNet folder."""
    folder = Path(folder)
    if not folder.is_dir():
        what = "not a directory" if folder.exists() else "no such directory"
        raise InteropError(f"{folder}: {what}; give a diffusers pipeline or UNet folder")
    unet = folder / "unet" if (folder / "model_index.json").exists() else folder
    if not (unet / "config.json").exists():
        raise InteropError(f"{folder}: no model_index.json or config.json; not a diffusers folder")
    if not (unet / WEIGHTS).exists():
        if (unet / PICKLE).exists():
            raise InteropError(
                f"{unet}: has only {PICKLE}, a pickle file (loading one can run code); convert it "
                f"to {WEIGHTS} with diffusers' save_pretrained(safe_serialization=True) first"
            )
        raise InteropError(f"{unet}: no {WEIGHTS}")
    scheduler = folder / "scheduler" / "scheduler_config.json"
    if unet == folder and (folder.parent / "model_index.json").exists():  # a pipeline's unet/
        scheduler = folder.parent / "scheduler" / "scheduler_config.json"
    return unet, scheduler if scheduler.exists() else None


def model_config(cfg: dict) -> ModelConfig:
    """ddpm's ModelConfig for a UNet2DModel config, or a refusal naming the option."""
    try:
        return _model_config(cfg)
    except (TypeError, ValueError, ZeroDivisionError, AttributeError) as e:
        raise InteropError(f"UNet2DModel config does not map: {e}") from None


def _model_config(cfg: dict) -> ModelConfig:
    for key, want in REQUIRED.items():
        if key in cfg and cfg[key] != want and not (key == "norm_eps" and _close(cfg[key], want)):
            raise InteropError(f"unsupported UNet2DModel option {key}={cfg[key]!r} (not {want!r})")
    widths = list(cfg.get("block_out_channels", ()))
    down, up = list(cfg.get("down_block_types", ())), list(cfg.get("up_block_types", ()))
    if not widths or len(down) != len(widths) or len(up) != len(widths):
        raise InteropError("UNet2DModel: block_out_channels, down and up block types must match")
    attn = []
    for level, (d, u) in enumerate(zip(down, reversed(up), strict=True)):
        for block, known in ((d, ("DownBlock2D", "AttnDownBlock2D")),
                             (u, ("UpBlock2D", "AttnUpBlock2D"))):  # fmt: skip
            if block not in known:
                raise InteropError(f"unsupported UNet2DModel block type {block}")
        if (d == "AttnDownBlock2D") != (u == "AttnUpBlock2D"):
            raise InteropError(f"UNet2DModel: attention differs down and up at level {level}")
        attn.append(d == "AttnDownBlock2D")
    ch = widths[0]
    if any(w % ch for w in widths):
        raise InteropError(f"block_out_channels {widths} are not multiples of the first")
    heads = cfg.get("attention_head_dim", 8)  # absent: diffusers uses heads of 8 channels
    if heads is not None and (type(heads) is not int or heads < 1):
        raise InteropError(f"unsupported UNet2DModel option attention_head_dim={heads!r} (ddpm's "
                           "attention has one head: none, or the width of each attention level)")
    # the levels with attention, and the middle block, which always has it (add_attention)
    attended = [(f"level {i}", w) for i, (a, w) in enumerate(zip(attn, widths, strict=True))
                if a] + [("the middle block", widths[-1])]  # fmt: skip
    where, width = next(((n, w) for n, w in attended if heads not in (None, w)), (None, None))
    if where is not None:
        raise InteropError(f"unsupported UNet2DModel option attention_head_dim={heads}: "
                           f"{where}'s {width} channels would be {width / heads:g} heads; ddpm's "
                           "attention has one")  # fmt: skip
    size = cfg.get("sample_size", 32)
    h, w = (size, size) if isinstance(size, int) else size
    padding = {0: "bottom_right", 1: "symmetric"}.get(cfg.get("downsample_padding", 1))
    if padding is None:
        raise InteropError(f"unsupported downsample_padding={cfg['downsample_padding']!r}")
    classes = cfg.get(CLASSES_KEY) or []
    embeds = cfg.get("num_class_embeds")
    if embeds is not None and (not isinstance(classes, list) or embeds != len(classes) + 1):
        raise InteropError(
            f"unsupported UNet2DModel option num_class_embeds={embeds!r} without ddpm's class "
            f"names ({CLASSES_KEY}: one per class, and one embedding more for no class)"
        )
    try:
        return ModelConfig(
            image_size=(h, w), in_channels=cfg.get("in_channels", 3),
            out_channels=cfg.get("out_channels", 3), channels=ch,
            channel_mult=tuple(w // ch for w in widths),
            num_res_blocks=cfg.get("layers_per_block", 2),
            attention_resolutions=tuple(min(h, w) >> i for i, a in enumerate(attn) if a),
            dropout=float(cfg.get("dropout", 0.0)), downsample_padding=padding,
            classes=tuple(classes) if embeds is not None else (),
        )  # fmt: skip
    except DataError:
        raise
    except Exception as e:  # a ConfigError from the dataclass
        raise InteropError(f"UNet2DModel config does not map: {e}") from None


def _close(a, b) -> bool:
    return isinstance(a, (int, float)) and math.isclose(a, b, rel_tol=1e-9)


def diffusers_betas(cfg: dict) -> torch.Tensor:
    """The betas a DDPMScheduler config describes, in float64 (diffusers' four formulas)."""
    T = cfg.get("num_train_timesteps", 1000)
    lo, hi = cfg.get("beta_start", 1e-4), cfg.get("beta_end", 0.02)
    kind = cfg.get("beta_schedule", "linear")
    if cfg.get("trained_betas") is not None:
        raise InteropError("unsupported scheduler option trained_betas (explicit betas)")
    if kind == "linear":
        return torch.linspace(lo, hi, T, dtype=torch.float64)
    if kind == "scaled_linear":
        return torch.linspace(lo**0.5, hi**0.5, T, dtype=torch.float64) ** 2
    if kind == "sigmoid":
        return torch.sigmoid(torch.linspace(-6, 6, T, dtype=torch.float64)) * (hi - lo) + lo
    if kind == "squaredcos_cap_v2":
        f = [math.cos((i / T + 0.008) / 1.008 * math.pi / 2) ** 2 for i in range(T + 1)]
        betas = [min(1 - f[i + 1] / f[i], 0.999) for i in range(T)]
        return torch.tensor(betas, dtype=torch.float64)
    raise InteropError(f"unsupported scheduler beta_schedule {kind!r}")


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
    prediction = cfg.get("prediction_type", "epsilon")
    if prediction not in PREDICTION:
        raise InteropError(f"unsupported prediction_type {prediction!r}")
    variance = cfg.get("variance_type", "fixed_small")
    if variance not in VARIANCE:
        raise InteropError(
            f"unsupported variance_type {variance!r}: ddpm's models have a fixed variance"
        )
    defaults = {"variance": VARIANCE[variance], "clip": bool(cfg.get("clip_sample", True))}
    return DiffusionConfig(schedule=schedule, timesteps=T), PREDICTION[prediction], defaults


def name_pairs(config: ModelConfig) -> list[tuple[str, str, str]]:
    """(ddpm name prefix, diffusers name prefix, kind) for every layer; kind "attn" for the
    attention blocks (q, k, v and the output are 1x1 convs in ddpm, linear layers in diffusers)."""
    pairs = [
        ("temb.0", "time_embedding.linear_1", "same"),
        ("temb.2", "time_embedding.linear_2", "same"),
        ("conv_in", "conv_in", "same"),
    ]
    if config.classes:
        pairs.append(("class_emb", "class_embedding", "embedding"))

    def res(ours, theirs, shortcut):
        names = ["norm1", "conv1", "norm2", "conv2"]
        pairs.extend((f"{ours}.{n}", f"{theirs}.{n}", "same") for n in names)
        pairs.append((f"{ours}.temb_proj", f"{theirs}.time_emb_proj", "same"))
        if shortcut:
            pairs.append((f"{ours}.shortcut", f"{theirs}.conv_shortcut", "same"))

    ch, mult, n = config.channels, config.channel_mult, config.num_res_blocks
    cur = ch
    for level, m in enumerate(mult):
        theirs = f"down_blocks.{level}"
        for i in range(n):
            res(f"down.{level}.res.{i}", f"{theirs}.resnets.{i}", cur != ch * m)
            cur = ch * m
            if config.attends_at(level):
                pairs.append((f"down.{level}.attn.{i}", f"{theirs}.attentions.{i}", "attn"))
        if level != len(mult) - 1:
            pairs.append((f"downsample.{level}.conv", f"{theirs}.downsamplers.0.conv", "same"))
    res("mid_res1", "mid_block.resnets.0", False)
    pairs.append(("mid_attn", "mid_block.attentions.0", "attn"))
    res("mid_res2", "mid_block.resnets.1", False)
    for j, level in enumerate(reversed(range(len(mult)))):
        for i in range(n + 1):
            res(f"up.{j}.res.{i}", f"up_blocks.{j}.resnets.{i}", True)
            if config.attends_at(level):
                pairs.append((f"up.{j}.attn.{i}", f"up_blocks.{j}.attentions.{i}", "attn"))
        if level != 0:
            pairs.append((f"upsample.{j}.conv", f"up_blocks.{j}.upsamplers.0.conv", "same"))
    pairs += [("norm_out", "conv_norm_out", "same"), ("conv_out", "conv_out", "same")]
    return pairs


def from_diffusers(state: dict[str, torch.Tensor], config: ModelConfig) -> dict:
    """A UNet2DModel state dict as ddpm's UNet state dict."""
    out = {}
    try:
        for ours, theirs, kind in name_pairs(config):
            if kind in PLAIN:
                out |= {f"{ours}.{p}": state[f"{theirs}.{p}"] for p in PLAIN[kind]}
                continue
            out[f"{ours}.norm.weight"] = state[f"{theirs}.group_norm.weight"]
            out[f"{ours}.norm.bias"] = state[f"{theirs}.group_norm.bias"]
            qkv = [state[f"{theirs}.to_{x}.weight"] for x in "qkv"]
            out[f"{ours}.qkv.weight"] = torch.cat(qkv)[:, :, None, None]
            out[f"{ours}.qkv.bias"] = torch.cat([state[f"{theirs}.to_{x}.bias"] for x in "qkv"])
            out[f"{ours}.proj_out.weight"] = state[f"{theirs}.to_out.0.weight"][:, :, None, None]
            out[f"{ours}.proj_out.bias"] = state[f"{theirs}.to_out.0.bias"]
    except KeyError as e:
        raise InteropError(f"the UNet's weights lack {e.args[0]}; not this configuration") from None
    return {k: v.contiguous() for k, v in out.items()}


def to_diffusers(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """ddpm's UNet state dict as a UNet2DModel state dict."""
    out = {}
    for ours, theirs, kind in name_pairs(config):
        if kind in PLAIN:
            out |= {f"{theirs}.{p}": state[f"{ours}.{p}"] for p in PLAIN[kind]}
            continue
        out[f"{theirs}.group_norm.weight"] = state[f"{ours}.norm.weight"]
        out[f"{theirs}.group_norm.bias"] = state[f"{ours}.norm.bias"]
        for x, w, b in zip("qkv", state[f"{ours}.qkv.weight"].chunk(3),
                           state[f"{ours}.qkv.bias"].chunk(3), strict=True):  # fmt: skip
            out[f"{theirs}.to_{x}.weight"] = w[:, :, 0, 0]
            out[f"{theirs}.to_{x}.bias"] = b
        out[f"{theirs}.to_out.0.weight"] = state[f"{ours}.proj_out.weight"][:, :, 0, 0]
        out[f"{theirs}.to_out.0.bias"] = state[f"{ours}.proj_out.bias"]
    return {k: v.contiguous() for k, v in out.items()}


def import_folder(folder: Path, out: Path) -> dict:
    """Convert a diffusers DDPM folder into a self-describing ddpm checkpoint at `out`."""
    unet_dir, scheduler_path = locate(folder)
    config = model_config(_json(unet_dir / "config.json"))
    if scheduler_path is not None:
        diffusion, objective, defaults = scheduler_mapping(_json(scheduler_path))
    else:  # a bare UNet: the paper's schedule and objective, said as assumed
        diffusion, objective, defaults = DiffusionConfig(), "eps", {}
    try:
        weights = load_file(str(unet_dir / WEIGHTS))
    except (SafetensorError, OSError) as e:
        raise InteropError(f"{unet_dir / WEIGHTS}: not a readable safetensors file ({e})") from None
    state = {k: v.float() for k, v in from_diffusers(weights, config).items()}
    try:
        build_model(config, state, unet_dir / WEIGHTS)
    except CheckpointError as e:
        raise InteropError(f"the UNet's weights do not fit its config: {e}") from None
    training = TrainConfig(objective=objective, image_size=config.image_size, preset="imported",
                           shift=0)  # fmt: skip
    configs = {
        "model": config.to_dict(), "diffusion": diffusion.to_dict(),
        "training": training.to_dict(), "sampler": defaults,
        "data": {"source": f"imported from {Path(folder).resolve()}"},
    }  # fmt: skip
    save_checkpoint(out, state, "model", {"config": configs, "step": 0, "weights": "imported"})
    return {"out": str(out), "model": config.to_dict(), "diffusion": diffusion.to_dict(),
            "objective": objective, "sampler": defaults,
            "assumed": scheduler_path is None}  # fmt: skip


SHIFT_CONV = "the --shift map's input convolution, which adds nothing when sampling"


def export_checkpoint(path: Path, folder: Path) -> dict:
    """Write a diffusers DDPMPipeline folder (UNet2DModel + DDPMScheduler) for a checkpoint."""
    ckpt = open_checkpoint(path, raw_option=False)  # a model file, or a run directory's
    config = config_section(ckpt, "model", ModelConfig)
    diffusion = config_section(ckpt, "diffusion", DiffusionConfig)
    objective = config_section(ckpt, "training", TrainConfig).objective.value
    defaults = ckpt.config.get("sampler") or {}
    if config.channels < 32 or any(config.channels * m % 32 for m in config.channel_mult):
        raise InteropError("diffusers' UNet2DModel needs widths divisible by 32 (norm groups)")
    levels = len(config.channel_mult)
    attn = [config.attends_at(i) for i in range(levels)]
    unet = {
        "_class_name": "UNet2DModel", "_diffusers_version": "0.25.0",
        "sample_size": list(config.image_size) if config.image_size[0] != config.image_size[1]
        else config.image_size[0],
        "in_channels": config.in_channels, "out_channels": config.out_channels,
        "block_out_channels": [config.channels * m for m in config.channel_mult],
        "layers_per_block": config.num_res_blocks,
        "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "downsample_padding": 0 if config.downsample_padding == "bottom_right" else 1,
        "dropout": config.dropout, "attention_head_dim": None, **REQUIRED,
        "num_class_embeds": config.num_classes + 1 if config.classes else None,
    }  # fmt: skip
    if config.classes:
        unet[CLASSES_KEY] = list(config.classes)
    T = diffusion.timesteps
    scale = 1000 / T
    schedule = {
        "linear": ("linear", 1e-4 * scale, 0.02 * scale),
        "quadratic": ("scaled_linear", 1e-4 * scale, 0.02 * scale),
        "sigmoid": ("sigmoid", 1e-4 * scale, 0.02 * scale),
        "cosine": ("squaredcos_cap_v2", 1e-4, 0.02),
    }[diffusion.schedule.value]
    scheduler = {
        "_class_name": "DDPMScheduler", "_diffusers_version": "0.25.0",
        "num_train_timesteps": T, "beta_schedule": schedule[0], "beta_start": schedule[1],
        "beta_end": schedule[2], "trained_betas": None,
        "variance_type": "fixed_large" if defaults.get("variance") == "large" else "fixed_small",
        "clip_sample": bool(defaults.get("clip", True)), "clip_sample_range": 1.0,
        "prediction_type": {v: k for k, v in PREDICTION.items()}[objective],
    }  # fmt: skip
    check = scheduler_mapping(scheduler)[0]  # the mapping must round-trip exactly
    if check.schedule != diffusion.schedule:
        raise InteropError(
            f"the {diffusion.schedule.value} schedule at T={T} has no diffusers twin"
        )
    index = {
        "_class_name": "DDPMPipeline",
        "_diffusers_version": "0.25.0",
        "scheduler": ["diffusers", "DDPMScheduler"],
        "unet": ["diffusers", "UNet2DModel"],
    }
    folder = Path(folder)
    make_folder(folder)
    make_folder(folder / "unet")
    make_folder(folder / "scheduler")
    weights = to_diffusers(ckpt.tensors, config)
    write_atomic(folder / "unet" / WEIGHTS, save(weights, metadata={"format": "pt"}))
    write_atomic(folder / "unet" / "config.json", json.dumps(unet, indent=2).encode())
    scheduler_json = json.dumps(scheduler, indent=2).encode()
    write_atomic(folder / "scheduler" / "scheduler_config.json", scheduler_json)
    write_atomic(folder / "model_index.json", json.dumps(index, indent=2).encode())
    # a --shift run's map conv: sampling gives it no map, so it adds exactly nothing there
    left_out = {"augment_in.weight": SHIFT_CONV} if config.augment else {}
    return {"out": str(folder), "ddpm_version": __version__, "unet": unet, "scheduler": scheduler,
            "left_out": left_out}  # fmt: skip
