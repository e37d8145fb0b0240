"""Opening a model, the one way every command does it: a user's path (a checkpoint file or a
run directory) resolved to a file (`model_file`), that file read and checked
(`open_checkpoint`), and the network built from its config and loaded with its weights
(`build_model`, `load_model`).

A run directory holds model.safetensors (the EMA weights: what is sampled by default) and
train_state.safetensors (raw weights under "model.", EMA under "ema.", and the optimizer); see
training/run.py for the whole layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ddpm_cli.config import DiffusionConfig, ModelConfig, TrainConfig
from ddpm_cli.device import place
from ddpm_cli.errors import DataError
from ddpm_cli.model.unet import UNet
from ddpm_cli.store.checkpoint import (
    Checkpoint,
    check_state_dict,
    config_section,
    load_checkpoint,
    read_header,
)
from ddpm_cli.store.files import MODEL, STATE, snapshots

RAW = "model."  # the raw weights' prefix in a train state


def is_run_directory(folder: Path) -> bool:
    return (Path(folder) / MODEL).exists() or (Path(folder) / STATE).exists()


def strip_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors whose names start with `prefix`, named without it."""
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def network_weights(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    """The network's tensors in a checkpoint: all of a model file's, a train state's raw ones."""
    if ckpt.meta.get("kind") == "train_state":
        return strip_prefix(ckpt.tensors, RAW)
    return ckpt.tensors


def model_file(path: Path, raw: bool = False, step: int | None = None) -> Path:
    """The file a user's `path` names: the file itself, or in a run directory its
    model.safetensors (the EMA weights), with `raw` its train state (the raw weights), or with
    `step` the snapshot of that step (ddpm train --keep)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such checkpoint file or run directory")
    folder = path if path.is_dir() else path.parent
    if step is not None:
        if not path.is_dir():  # not a file's neighbour picked in its place
            raise DataError(f"{path}: --step picks a snapshot of a run directory; give the "
                            f"directory ({path.resolve().parent}) instead of a file")  # fmt: skip
        return snapshot_file(folder, step, raw)
    if raw:
        if path.is_file() and _kind(path) == "train_state":
            return path  # a train state of another name
        file = folder / STATE
        if not file.exists():
            raise DataError(
                f"{file}: not found; --raw needs the run directory's train state "
                "(drop --raw to sample from the EMA weights)"
            )
        return file
    file = folder / MODEL if path.is_dir() else path
    if not file.exists():
        raise DataError(f"{path}: no {MODEL} in this directory; is it a run directory?")
    return file


def _kind(file: Path):
    """The kind a ddpm safetensors file says it is (model, train_state, ...), from its header."""
    return (read_header(file).get("__metadata__") or {}).get("kind")


def snapshot_file(folder: Path, step: int, raw: bool) -> Path:
    """The snapshot of `step` in a run directory, or an error that lists the ones there are."""
    if raw:
        raise DataError("--raw and --step: snapshots hold the EMA weights only; drop one")
    kept = snapshots(folder)
    for s, path in kept:
        if s == step:
            return path
    if not kept:
        raise DataError(
            f"{folder}: keeps no step-numbered snapshots (train with --keep N to keep them)"
        )
    steps = ", ".join(str(s) for s, _ in kept)
    raise DataError(f"{folder}: no snapshot of step {step}; it keeps steps {steps}")


def open_checkpoint(
    path: Path, raw: bool = False, raw_option: bool = True, step: int | None = None
) -> Checkpoint:
    """The checkpoint of a model a user's `path` names (model_file), read and verified.
    `raw_option`: whether the command has --raw, for the message refusing a train state."""
    file = model_file(path, raw, step)
    if _kind(file) == "train_state" and not raw:
        ema = file.parent / MODEL
        use = [f"use {ema} (the EMA weights)"] if ema.exists() else []
        use += ["add --raw for its raw weights"] if raw_option else []
        use = use or ["give a model file, such as a run's model.safetensors (the EMA weights)"]
        raise DataError(f"{file}: is a train state; " + ", or ".join(use))
    return load_checkpoint(file, kind="train_state" if raw else "model")


def check_weights(
    config: ModelConfig, tensors: dict[str, torch.Tensor], path: Path | str = "the weights"
) -> None:
    """Refuse `tensors` that do not fit the network of `config`, in one message naming `path`,
    before any memory is spent on that network: it is laid out on the meta device, which
    allocates nothing, so a config that asks for far more than the file holds costs nothing."""
    with torch.device("meta"):
        skeleton = UNet(config)
    check_state_dict(Path(path), skeleton.state_dict(), tensors)


def build_model(
    config: ModelConfig, tensors: dict[str, torch.Tensor], path: Path | str = "the weights"
) -> UNet:
    """The network of `config` with `tensors` as its weights, refused (check_weights) when
    they do not fit it."""
    check_weights(config, tensors, path)
    model = UNet(config)
    model.load_state_dict(tensors)
    return model


@dataclass(frozen=True)
class LoadedModel:
    model: UNet  # in eval mode, on the device asked for
    model_config: ModelConfig
    diffusion: DiffusionConfig
    training: TrainConfig
    ckpt: Checkpoint

    @property
    def weights(self) -> str:
        """ "raw" (a train state's training weights) or "ema"."""
        return "raw" if self.ckpt.meta.get("kind") == "train_state" else "ema"


def load_model(
    path: Path, raw: bool = False, device: torch.device | str = "cpu", step: int | None = None
) -> LoadedModel:
    """The model a user's `path` names (open_checkpoint), built and placed on `device`."""
    ckpt = open_checkpoint(path, raw, step=step)
    model_config = config_section(ckpt, "model", ModelConfig)
    diffusion = config_section(ckpt, "diffusion", DiffusionConfig)
    training = config_section(ckpt, "training", TrainConfig)
    model = build_model(model_config, network_weights(ckpt), ckpt.path)
    return LoadedModel(place(model, device).eval(), model_config, diffusion, training, ckpt)
