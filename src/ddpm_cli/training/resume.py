"""Continuing a run: what `--resume DIR` reads back, and which options it may change.

A resumed run keeps its model, diffusion settings and data; it may change only the options in
RESUMABLE (a longer run, another device, other logging), and refuses the rest in one message.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

from ddpm_cli.config import (
    DEFAULT_EPOCHS,
    DiffusionConfig,
    ModelConfig,
    TrainConfig,
    epoch_limit,
    from_dict,
    jsonable,
)
from ddpm_cli.errors import DataError, UsageError
from ddpm_cli.store.checkpoint import Checkpoint, config_section, load_checkpoint
from ddpm_cli.store.files import STATE, RunLock
from ddpm_cli.store.models import check_weights, network_weights
from ddpm_cli.text import duration_text, option_text, value_text

# options a resumed run may change; everything else must match the stored run
RESUMABLE = {
    "steps",
    "epochs",
    "time_limit",
    "lr",
    "cooldown",
    "sample_every",
    "checkpoint_every",
    "keep",
    "eval_every",
    "grad_checkpoint",
    "log",
    "log_every",
    "num_samples",
    "device",
    "compile",
    "stream",
    "workers",
    "data_cache",
}
DIFFUSION_OPTIONS = ("schedule", "timesteps")  # part of the model: never changed on resume


@dataclass(frozen=True)
class Resumed:
    """A stored run, read back: its directory, train-state checkpoint and configs (the
    training config merged with the options given now), and its data's summary."""

    out: Path
    ckpt: Checkpoint
    config: TrainConfig
    diffusion: DiffusionConfig
    model: ModelConfig
    data: dict  # the stored data summary: source, fingerprint, counts

    @property
    def source(self) -> str | None:
        """The run's data, as it was given; a relative folder is found where the run started
        (its absolute path is stored as `source_path`), whatever the directory is now."""
        given, absolute = self.data.get("source"), self.data.get("source_path")
        if isinstance(absolute, str) and Path(absolute).exists():
            return absolute
        return given

    def trained_seconds(self, elapsed: float) -> float:
        """Seconds spent in the training loop so far, what --time counts (runs saved before
        --time existed stored only the whole `elapsed` time)."""
        if "train_seconds" not in self.ckpt.meta:
            return elapsed
        return self.ckpt.number("train_seconds", integer=False)

    @property
    def world(self) -> int:
        """The number of processes that trained it."""
        return self.ckpt.world


def open_resume(resume: Path, source: str | None, out: Path | None, given: dict) -> Resumed:
    """Read the run in `resume` for `--resume`, refusing a DATA argument, another --out and
    options the run cannot change (`given`: the options the user set explicitly)."""
    if source is not None:
        raise UsageError("--resume trains on the run's own stored data; drop the DATA argument")
    if out is not None and Path(out).resolve() != Path(resume).resolve():
        raise UsageError("--resume continues in the run's own directory; drop --out")
    out = Path(resume)
    if not out.exists():  # (a DataError: one machine of a job may lack what others see)
        raise DataError(f"{out}: no such run directory")
    if not (out / STATE).exists():
        lock = RunLock(out, resume=True)
        holder = lock.holder()
        if holder is not None:  # a run still before its first checkpoint
            raise lock.busy(holder)
        raise UsageError(f"{out}: no {STATE} to resume from; is this a run directory?")
    ckpt = load_checkpoint(out / STATE, kind="train_state")
    stored = config_section(ckpt, "training", TrainConfig)
    # saved before these options existed, a run goes on as it was: at a constant rate after
    # its warm-up, on all its images (no quality figure), unshifted
    old = {"cooldown": 0.0, "holdout": 0, "shift": 0}
    saved = ckpt.config.get("training", {})
    stored = replace(stored, **{k: v for k, v in old.items() if k not in saved})
    diffusion = config_section(ckpt, "diffusion", DiffusionConfig)
    config = merge_resume(stored, diffusion, given)
    model = config_section(ckpt, "model", ModelConfig)
    check_weights(model, network_weights(ckpt), ckpt.path)  # before the run builds it
    return Resumed(out, ckpt, config, diffusion, model, ckpt.config.get("data", {}))


def _as_typed(key: str, value) -> str:
    """A config value as the option is typed: 32x16 for an image size (stored height, width);
    a switch "it on" or "it off"."""
    value = jsonable(value)
    if isinstance(value, bool):
        return "it on" if value else "it off"
    if key == "image_size" and isinstance(value, list) and len(value) == 2:
        return f"{value[1]}x{value[0]}"
    return value_text(value)


def _option(key: str, value) -> str:
    """An option as typed: --image-size 32x16, --flip, --no-flip."""
    return option_text(key, value if isinstance(value, bool) else _as_typed(key, value))


def merge_resume(stored: TrainConfig, diffusion: DiffusionConfig, given: dict) -> TrainConfig:
    """The stored config with the safe options the user gave; refuse conflicting ones."""
    values = stored.to_dict()
    conflicts = []  # options are typed by the CLI: normalised through the dataclass (replace)
    for key in DIFFUSION_OPTIONS:
        if key in given:
            have = diffusion.to_dict()[key]
            mine = replace(diffusion, **{key: given[key]}).to_dict()
            if mine[key] != have:
                conflicts.append(f"{_option(key, given[key])} (the run has "
                                 f"{_as_typed(key, have)})")  # fmt: skip
    for key, value in given.items():
        if key in DIFFUSION_OPTIONS:
            continue
        # normalise through the dataclass, so "32" and (32, 32) compare equal to the stored [32, 32]
        normalized = replace(stored, **{key: value}).to_dict()[key]
        if key == "log":  # loggers are added on resume, never taken away
            values[key] = list(dict.fromkeys([*(values.get(key) or []), *normalized]))
        elif key in RESUMABLE:
            values[key] = normalized
        elif normalized != values.get(key):
            conflicts.append(f"{_option(key, value)} (the run has "
                             f"{_as_typed(key, values.get(key))})")  # fmt: skip
    if conflicts:
        raise UsageError(
            "cannot change on resume: " + "; ".join(conflicts) + ". Start a new run with --out"
        )
    return from_dict(TrainConfig, values)


def steps_left_by_epoch(config: TrainConfig, state, per_epoch: int, total: int) -> int:
    """After resuming with another number of processes, steps counted so far were of another
    global batch: an epoch limit becomes the steps left to its end, in today's batches."""
    epochs = epoch_limit(config.epochs, config.steps, config.time_limit)
    if epochs is None:
        return total
    left = (epochs - state.epoch) * per_epoch - state.batch_in_epoch
    by_epoch = state.step + max(0, math.ceil(left / config.grad_accum))
    return min(by_epoch, config.steps) if config.steps is not None else by_epoch


def nothing_left(config: TrainConfig, step: int, total: int | None, trained: float,
                 given: dict) -> str | None:  # fmt: skip
    """Why a resumed run would end before its first step (its limits are reached already),
    said for the user; None when it has training to do. A limit not given now is the run's."""

    def named(key: str, text: str) -> str:
        return text + ("" if key in given else ", kept from the run")

    if total is not None and step >= total:
        if config.steps is not None and step >= config.steps:
            flag, limit = "--steps", named("steps", f"--steps {config.steps}")
        else:
            epochs = f"{DEFAULT_EPOCHS}, the default" if config.epochs is None else config.epochs
            flag, limit = "--epochs", named("epochs", f"--epochs {epochs}: {total} steps")
        return (f"is at step {step}, where its limit ends it ({limit}): nothing to train; "
                f"give a larger {flag} to go on")  # fmt: skip
    if config.time_limit is not None and trained >= config.time_limit:
        limit = named("time_limit", f"--time {duration_text(config.time_limit)}")
        return (f"has trained for {duration_text(round(trained, 1))}, its whole time ({limit}): "
                "nothing to train; give a larger --time to go on")  # fmt: skip
    return None
