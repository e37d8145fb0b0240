"""Fine-tuning: a new run that starts from another model's weights (`ddpm train DATA --init
CKPT`), a checkpoint of ddpm's or one `ddpm import` made.

The run keeps the parent's architecture, diffusion schedule and objective; its image size and
channel count become the run's (other ones given are refused), and its shift, unless --shift
is given (the shift map's convolution then comes or goes, the function unchanged). Both the
weights it trains and its EMA start as the parent's model, the EMA weights `ddpm sample` draws
from it (a train state's raw weights would be lost at the first step anyway, where the new
run's EMA warm-up follows the trained weights); the optimizer starts fresh. Where the classes
change, the class embedding is made anew so that the network starts as exactly the parent's
function: every new class starts as the parent's "no class" (zero for an unconditional
parent), and a conditional parent trained on unlabelled data folds its "no class" into the
time embedding's last bias.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ddpm_cli.config import AUGMENT_MAPS, DiffusionConfig, ModelConfig, TrainConfig
from ddpm_cli.errors import UsageError
from ddpm_cli.store.checkpoint import read_header
from ddpm_cli.store.models import load_model, model_file
from ddpm_cli.text import value_text

CLASS_EMB, TEMB_BIAS = "class_emb.weight", "temb.2.bias"  # unet.UNet's names
AUGMENT_IN = "augment_in.weight"
# the learning rate of a fine-tuning run where none is given: on real faces from a model of
# photograph crops, 1e-4 came nearest the data after 30 s and after 2 min of CPU training,
# against 3e-5, 3e-4 and 1e-3, and training from scratch (docs/training.md, "Fine-tuning")
FINETUNE_LR = 1e-4


@dataclass(frozen=True)
class Parent:
    """The model a run starts from: its configs, weights and provenance."""

    model: ModelConfig
    diffusion: DiffusionConfig
    training: TrainConfig
    weights: dict[str, torch.Tensor]  # the model's (EMA) weights: where training starts
    summary: dict  # what the run's checkpoints record: file, content_hash, step

    @property
    def size_text(self) -> str:
        h, w = self.model.image_size
        return f"{w}x{h}"


def open_parent(path: Path) -> Parent:
    """The model at `path`: a checkpoint file or a run directory (its model.safetensors)."""
    file = model_file(Path(path))
    if (read_header(file).get("__metadata__") or {}).get("kind") == "train_state":
        raise UsageError(
            f"--init {file}: is a train state; give the run directory or its model.safetensors"
        )
    loaded = load_model(file)
    summary = {
        "file": str(loaded.ckpt.path.resolve()),
        "content_hash": loaded.ckpt.meta.get("content_hash"),
        "step": loaded.ckpt.step,
    }
    weights = {k: v.detach().cpu() for k, v in loaded.model.state_dict().items()}
    return Parent(loaded.model_config, loaded.diffusion, loaded.training, weights, summary)


def fit(
    parent: Parent, config: TrainConfig, diffusion: DiffusionConfig, given: dict
) -> tuple[TrainConfig, DiffusionConfig]:
    """The run's configs on the parent's terms: its image size, channels, objective, schedule
    and preset (for the recipe), unless given otherwise, which is refused where the network
    cannot follow."""
    h, w = parent.model.image_size
    if config.image_size is not None and tuple(config.image_size) != (h, w):
        raise UsageError(
            f"--init {parent.summary['file']} draws {parent.size_text} images; fine-tuning keeps "
            f"its size: drop --image-size (the data is resized to {parent.size_text})"
        )
    c = parent.model.in_channels
    if config.channels is not None and config.channels != c:
        raise UsageError(
            f"--init {parent.summary['file']} draws {c}-channel images; fine-tuning keeps its "
            "channels: drop --channels (the data is converted)"
        )
    if "preset" in given and config.preset != parent.training.preset:
        raise UsageError(
            f"--init {parent.summary['file']} is the {parent.training.preset} network; "
            "fine-tuning keeps it: drop --preset"
        )
    if "objective" in given and config.objective != parent.training.objective:
        raise UsageError(
            f"--init {parent.summary['file']} predicts {parent.training.objective.value}; a "
            "fine-tuned network keeps its objective: drop --objective"
        )
    for key in ("schedule", "timesteps"):
        if key in given and getattr(diffusion, key) != getattr(parent.diffusion, key):
            raise UsageError(
                f"--init {parent.summary['file']} was trained with {key} "
                f"{value_text(getattr(parent.diffusion, key))}; a fine-tuned network keeps it: "
                f"drop --{key}"
            )
    # the parent's network, shift map included or not: its shift unless --shift is given
    shift = config.shift
    if shift is None:
        shift = (parent.training.shift or 0) if parent.model.augment else 0
    config = replace(
        config,
        shift=shift,
        image_size=(h, w),
        channels=c,
        objective=parent.training.objective,
        preset=parent.training.preset if config.preset == "auto" else config.preset,
        lr=config.lr if config.lr is not None else FINETUNE_LR,
    )
    return config, parent.diffusion


def model_config(parent: Parent, classes: tuple[str, ...], shift: int) -> ModelConfig:
    """The parent's architecture with the data's classes, with the convolution of the shift
    map where the run shifts (load_parent keeps the function the parent's either way)."""
    return replace(parent.model, classes=tuple(classes), augment=AUGMENT_MAPS if shift else 0)


def load_parent(state, parent: Parent, config: ModelConfig) -> list[str]:
    """Put the parent's weights into the run's new state, the trained weights and the EMA;
    returns lines saying what changed in the network (its classes, the shift map's conv)."""
    tensors = dict(parent.weights)
    notes = []
    # a map the run never gives is sampling's empty one, where the conv adds 0; a parent
    # without the conv, for a run that shifts: the run's starts at zero
    if not config.augment and tensors.pop(AUGMENT_IN, None) is not None:
        notes.append("the parent's shift-map convolution is left out (this run does not "
                     "shift; it added nothing to samples)")  # fmt: skip
    elif config.augment and AUGMENT_IN not in tensors:
        notes.append("a shift-map convolution is added, at zero (this run shifts its images; "
                     "the parent did not)")  # fmt: skip
    note = _classes(tensors, parent.model, config)
    with torch.no_grad():
        for module in (state.model, state.ema):
            own = module.state_dict()
            for name, value in tensors.items():
                own[name].copy_(value.to(own[name].dtype))
    return [note, *notes] if note else notes


def _classes(tensors: dict, before: ModelConfig, after: ModelConfig) -> str | None:
    """Make `tensors` fit `after`'s classes, the function unchanged (see the module docstring)."""
    if before.classes == after.classes:
        return None
    null = tensors.pop(CLASS_EMB)[-1] if before.classes else None
    if not after.classes:  # labels gone: "no class" joins the time embedding for good
        tensors[TEMB_BIAS] = tensors[TEMB_BIAS] + null
        return f"the data has no classes: the parent's {before.num_classes} are dropped"
    start = null if null is not None else torch.zeros(tensors[TEMB_BIAS].shape)
    tensors[CLASS_EMB] = start.expand(after.num_classes + 1, -1).clone()
    was = f"{before.num_classes} classes" if before.classes else "no classes"
    return (
        f"a new class embedding for the data's {after.num_classes} classes (the parent had "
        f"{was}); each starts as the parent's unconditional model"
    )
