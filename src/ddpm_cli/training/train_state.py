"""Saving and restoring everything a training run needs to continue exactly.

train_state.safetensors holds the raw weights ("model.*"), the EMA ("ema.*"), Adam's moments
("optim.<param>.<name>"), and the random states ("rng.torch", "rng.noise", "rng.cuda.<i>");
its metadata holds the step, the data position, Adam's hyperparameters and the grad scaler.
model.safetensors holds the EMA weights alone: the file users sample from.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ddpm_cli.store.checkpoint import CheckpointError, check_state_dict, save_checkpoint
from ddpm_cli.store.files import MODEL, STATE
from ddpm_cli.store.models import RAW, strip_prefix
from ddpm_cli.training.train import TrainState


def _state_tensors(state: TrainState) -> dict[str, torch.Tensor]:
    tensors = {f"model.{k}": v for k, v in state.model.state_dict().items()}
    tensors |= {f"ema.{k}": v for k, v in state.ema.state_dict().items()}
    for i, s in state.optimizer.state_dict()["state"].items():
        for k, v in s.items():
            tensors[f"optim.{i}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.noise"] = state.noise_gen.get_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    return tensors


def save_run(
    out: Path,
    state: TrainState,
    configs: dict,
    elapsed: float,
    decay: float,
    world: int = 1,
    trained: float | None = None,
) -> None:
    """train_state first, then the model: each atomic, so a crash leaves both loadable.
    `world`: the number of processes training (the global batch is batch_size x world);
    `elapsed`: seconds of the run so far, start-up included; `trained`: of the training loop
    alone (what --time counts; `elapsed` when not given)."""
    meta = {
        "world_size": world,
        "config": configs,
        "step": state.step,
        "epoch": state.epoch,
        "batch_in_epoch": state.batch_in_epoch,
        "elapsed": elapsed,
        "train_seconds": elapsed if trained is None else trained,
        "optimizer_groups": state.optimizer.state_dict()["param_groups"],
        "scaler": state.scaler.state_dict() if state.scaler else None,
    }
    save_checkpoint(out / STATE, _state_tensors(state), "train_state", meta, follow=False)
    save_model(out / MODEL, state, configs, elapsed, decay)


def save_model(
    path: Path, state: TrainState, configs: dict, elapsed: float, decay: float, **extra
) -> None:
    """The EMA weights and the run's configs as a model file, atomically; `extra`: more
    metadata (e.g. the quality figure of best.safetensors)."""
    data = {k: v for k, v in configs.get("data", {}).items() if k != "source_path"}
    shared = {**configs, "data": data} if "data" in configs else configs  # files people share:
    # not the absolute path of the data folder (only resume needs it, from the train state)
    meta = {"config": shared, "step": state.step, "ema_decay": decay, "elapsed": elapsed,
            "weights": "ema", **extra}  # fmt: skip
    save_checkpoint(path, state.ema.state_dict(), "model", meta, follow=False)


def restore_state(
    state: TrainState, ckpt, device: torch.device, warnings: list[str] | None = None
) -> float:
    """Load a train_state checkpoint into a freshly built state; returns the elapsed seconds.
    A random state that is missing or cannot be restored here is replaced by a fresh, seeded
    one, and said in `warnings`: the run goes on, no longer bit-identical to one that never
    stopped."""
    warnings = [] if warnings is None else warnings
    t = ckpt.tensors
    model_sd, ema_sd = strip_prefix(t, RAW), strip_prefix(t, "ema.")
    check_state_dict(ckpt.path, state.model.state_dict(), model_sd)
    check_state_dict(ckpt.path, state.ema.state_dict(), ema_sd)
    state.model.load_state_dict(model_sd)
    state.ema.load_state_dict(ema_sd)
    optim_state: dict[int, dict] = {}
    for k, v in t.items():
        if k.startswith("optim."):
            _, i, name = k.split(".", 2)
            optim_state.setdefault(int(i), {})[name] = v
    try:  # how Adam runs (fused or not) stays this machine's choice
        state.optimizer.load_state_dict(
            {"state": optim_state, "param_groups": ckpt.json("optimizer_groups")}
        )
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(
            f"{ckpt.path}: optimizer state does not fit the model ({e})"
        ) from None
    if state.scaler and ckpt.json("scaler"):
        state.scaler.load_state_dict(ckpt.json("scaler"))
    lost = []
    try:
        torch.set_rng_state(t["rng.torch"])
    except (KeyError, RuntimeError, TypeError):  # missing, or not a generator state
        torch.manual_seed(state.noise_gen.initial_seed() + 2 * ckpt.step)
        lost.append("dropout and flips")
    try:
        state.noise_gen.set_state(t["rng.noise"])
    except (KeyError, RuntimeError, TypeError):  # missing, or saved on another kind of
        # device (train.noise_generator): fresh draws, as seeded as ever
        state.noise_gen.manual_seed(state.noise_gen.initial_seed() + ckpt.step)
        lost.append("timesteps and noise")
    if lost:
        warnings.append(
            f"{ckpt.path}: the saved random state of the {' and of the '.join(lost)} is missing "
            "or from another kind of device; the run goes on with fresh seeded draws, so it "
            "will not match an uninterrupted run bit for bit"
        )
    if device.type == "cuda":
        keys = sorted((k for k in t if k.startswith("rng.cuda.")), key=lambda k: int(k[9:]))
        cuda_states = [t[k] for k in keys]
        if cuda_states:
            torch.cuda.set_rng_state_all(cuda_states[: torch.cuda.device_count()])
    state.step = ckpt.step
    state.epoch, state.batch_in_epoch = ckpt.number("epoch"), ckpt.number("batch_in_epoch")
    return float(ckpt.number("elapsed", integer=False))
