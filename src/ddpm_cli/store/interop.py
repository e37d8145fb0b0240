"""diffusers folders in and out: `ddpm import` and `ddpm export --diffusers`.

A diffusers DDPM folder is model_index.json with unet/ (config.json and
diffusion_pytorch_model.safetensors) and scheduler/scheduler_config.json, or a bare UNet2DModel
folder. Only the UNet2DModel configurations that are the paper's network map (all google/ddpm-*
models are); anything else is refused by name (store/diffusers_configs.py maps the configs).
Only safetensors are read: never a pickle. diffusers itself is not needed: both formats are
JSON and safetensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from ddpm_cli import __version__
from ddpm_cli.config import DiffusionConfig, ModelConfig, TrainConfig
from ddpm_cli.store.checkpoint import (
    CheckpointError,
    config_section,
    save_checkpoint,
)
from ddpm_cli.store.diffusers_configs import (
    VERSION,
    InteropError,
    model_config,
    scheduler_config,
    scheduler_mapping,
    unet_config,
)
from ddpm_cli.store.files import make_folder, write_atomic
from ddpm_cli.store.models import build_model, open_checkpoint
from ddpm_cli.text import parse_json

WEIGHTS, PICKLE = "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"
# the tensors a layer of each kind in name_pairs has, under the same names on both sides
PLAIN = {"same": ("weight", "bias"), "embedding": ("weight",)}


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
    unet = unet_config(config)
    scheduler = scheduler_config(diffusion, objective, defaults)
    index = {
        "_class_name": "DDPMPipeline",
        "_diffusers_version": VERSION,
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
