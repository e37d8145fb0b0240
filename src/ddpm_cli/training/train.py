"""The training loop. It reports through a callback and never prints.

One optimizer step: `grad_accum` micro-batches of L_simple (or the chosen objective) with t
uniform and eps ~ N(0, I) drawn from the run's own generator, global grad-norm clipping, Adam
with linear warm-up, then an EMA update. Everything random comes from seeded generators whose
states are saved, so a resumed run continues bit for bit on the CPU.

A step never waits for the device: its losses and gradient norm stay where they were computed
(`StepResult`), and the caller brings a few steps' worth to the host at once (`to_host`), then
checks them (`check_finite`). On a GPU the host thus queues the next steps while the device
works, instead of stalling at every `.item()` (docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch.utils.checkpoint import checkpoint

from ddpm_cli.config import ModelConfig, Precision, TrainConfig, epoch_limit
from ddpm_cli.data.batches import reflected
from ddpm_cli.data.folders import to_model_range
from ddpm_cli.device import place, to_device
from ddpm_cli.diffusion.process import training_losses
from ddpm_cli.diffusion.schedules import DiffusionTables
from ddpm_cli.errors import DdpmError, UsageError
from ddpm_cli.model.forward import compile_for, resolve_precision
from ddpm_cli.model.presets import preset_for, recipe_for
from ddpm_cli.model.unet import ResBlock, UNet
from ddpm_cli.training.adam import Adam
from ddpm_cli.training.quality import holdout_size

WARMUP_SHARE = 0.05  # runs of known length warm up over at most 5% of their steps
# the power-function EMA's exponent (Karras et al. 2024): an average over about the last
# 1/(EMA_GAMMA + 1) of the run at any length (docs/training.md: 16 measured better than 8,
# the old warm-up's equivalent, at 1 and 5 minutes on real images)
EMA_GAMMA = 16
MAX_WORKERS = 4  # DataLoader processes decoding ahead when data is streamed from disk
# a CUDA run of this many steps or more compiles its network: on an H100, compiling took
# about 1.5-3 minutes and the steps then ran 1.9x faster (docs/benchmarks.md); a run that
# only --time bounds compiles from this many seconds on (5x the longest compile)
COMPILE_MIN_STEPS = 10_000
COMPILE_MIN_SECONDS = 900
# smaller data sets are shifted by default, the network told (docs/training.md#small-datasets)
SHIFT_BELOW = 2000


def default_shift(n_images: int, image_size: tuple[int, int]) -> int:
    """--shift's default: 1/16 of the shorter side (2 pixels at 32x32; none below 16) below
    SHIFT_BELOW images; none for larger sets."""
    return min(image_size) // 16 if n_images < SHIFT_BELOW else 0


class TrainingDiverged(DdpmError):
    """The loss or gradients became non-finite; the last good checkpoint is kept."""

    job_wide = True  # every process of a job checks the same gathered losses and weights


def ema_decay_at(step: int, max_decay: float) -> float:
    """EMA decay after `step` optimizer steps (the update that follows step n uses n):
    min(max_decay, (1 - 1/n)^(EMA_GAMMA + 1)), the power-function EMA of Karras et al. 2024.

    The average then weighs the weights of step i about as i^EMA_GAMMA: it always covers about
    the last 1/(EMA_GAMMA + 1) of the run, whether the run is 300 steps (the last 18) or 100k
    (the last 5.9k), so a run stopped at any point has useful EMA weights and the random
    initial weights never dominate. Step 1 copies the weights; the paper's 0.9999 (max_decay)
    is reached after about 170k steps.
    """
    if step <= 1:
        return 0.0
    return min(max_decay, (1.0 - 1.0 / step) ** (EMA_GAMMA + 1))


def lr_at(step: int, lr: float, warmup: int, progress: float = 0.0, cooldown: float = 0.0,
          warmup_share: float = 0.0) -> float:  # fmt: skip
    """The learning rate of step `step` (0-based): a linear warm-up from lr/warmup to lr over
    `warmup` steps, then constant (the paper), and over the last `cooldown` share of the run
    a linear fall to 0; `progress` is the share of the run done (0 when its length is unknown,
    e.g. a run that only Ctrl-C ends). With `warmup_share`, the warm-up ends by that share of
    the run at the latest (a --time run on a slow machine may not reach `warmup` steps)."""
    ramp = (step + 1) / warmup if warmup > 0 else 1.0
    if warmup_share > 0:
        ramp = max(ramp, progress / warmup_share)
    value = lr * min(1.0, ramp)
    if cooldown > 0 and progress > 1.0 - cooldown:
        value *= max(0.0, 1.0 - progress) / cooldown
    return value


def total_steps(config: TrainConfig, per_epoch: int) -> int | None:
    """Whichever of --steps and --epochs ends training first; 100 epochs when neither is given,
    and None (no step limit) when only --time bounds the run."""
    candidates = [] if config.steps is None else [config.steps]
    epochs = epoch_limit(config.epochs, config.steps, config.time_limit)
    if epochs is not None:  # an optimizer step consumes grad_accum batches
        candidates.append(math.ceil(epochs * per_epoch / config.grad_accum))
    return min(candidates) if candidates else None


def resolve(
    config: TrainConfig, device: torch.device, n_images: int, channels: int, world: int = 1
):
    """Fill in the values left as None ("auto") from the device and data (`n_images` of them,
    before any are set aside); refuse bad mixes. `world` processes each take `batch_size`
    images of every global batch."""
    accelerated = device.type in ("cuda", "mps")
    precision = resolve_precision(config.precision, device)
    batch = config.batch_size or (128 if device.type == "cuda" else 32)
    preset = (
        config.preset if config.preset != "auto" else preset_for(config.image_size, accelerated)
    )
    # --eval-every 0 computes no figure: nothing to set aside unless --holdout says so
    holdout = holdout_size(n_images, 0 if config.eval_every == 0 and config.holdout is None
                           else config.holdout)  # fmt: skip
    if config.eval_every and not holdout:
        why = (
            f"{n_images} images are too few to set aside some by default; add --holdout N "
            "(e.g. --holdout 8)"
            if config.holdout is None
            else "the run sets aside none (--holdout 0; a run chooses them when it starts)"
        )
        raise UsageError(f"--eval-every needs images set aside for the quality figure: {why}")
    per_epoch = max(1, math.ceil((n_images - holdout) / (batch * world)))
    steps = total_steps(replace(config, batch_size=batch), per_epoch)
    recipe = recipe_for(preset)
    warmup, warmup_share = config.warmup_steps, config.warmup_share
    if warmup is None:  # the preset's: the CPU presets' also ends by 5% of a --time run
        warmup, warmup_share = recipe.warmup_steps, recipe.warmup_share
        if steps:
            warmup = min(warmup, max(1, int(WARMUP_SHARE * steps)))
    seed = config.seed if config.seed is not None else int(torch.randint(0, 2**31, (1,)).item())
    workers = config.workers
    if workers is None:  # leave a core to the training step
        workers = min(MAX_WORKERS, max(1, (os.cpu_count() or 2) - 1))
    compile = config.compile
    if compile is None:
        long = (steps >= COMPILE_MIN_STEPS if steps is not None
                else config.time_limit >= COMPILE_MIN_SECONDS)  # fmt: skip
        compile = device.type == "cuda" and long
    shift = config.shift
    if shift is None:  # (the size is always known in a run; not in some callers' checks)
        shift = default_shift(n_images, config.image_size) if config.image_size else 0
    return replace(
        config,
        shift=shift,
        compile=compile,
        workers=workers,
        precision=precision,
        batch_size=batch,
        preset=preset,
        lr=config.lr if config.lr is not None else recipe.lr,
        warmup_steps=warmup,
        warmup_share=warmup_share,
        cooldown=config.cooldown if config.cooldown is not None else recipe.cooldown,
        seed=seed,
        channels=channels,
        holdout=holdout,
    )


def compiled(
    forward: torch.nn.Module, device: torch.device, distributed: bool, mode: str | None = None
):
    """torch.compile'd `forward`. On CUDA in one process with CUDA graphs as well
    ("reduce-overhead"): eager dispatch, not arithmetic, bounds the cifar10 preset's step on an
    H100 (docs/benchmarks.md). DistributedDataParallel's gradient hooks stay outside graphs.
    `mode` overrides that choice (torch.compile's modes; benchmarks/bench.py --compile-mode)."""
    if mode is None:
        mode = "reduce-overhead" if device.type == "cuda" and not distributed else None
    # where compiling fails (no C compiler for Triton, an unsupported GPU), run eagerly: torch
    # logs a warning, and the run goes on at eager speed
    torch._dynamo.config.suppress_errors = True
    return compile_for(forward, device, mode)


@dataclass
class TrainState:
    """Everything a run needs to continue: weights, EMA, optimizer, randomness, position."""

    model: UNet
    ema: UNet
    optimizer: Adam
    scaler: torch.amp.GradScaler | None
    noise_gen: torch.Generator  # draws t and eps
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0


def new_state(model_config: ModelConfig, config: TrainConfig, device: torch.device) -> TrainState:
    torch.manual_seed(config.seed)  # weight init and dropout
    model = place(UNet(model_config), device)  # before Adam: its moments follow the layout
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    if config.grad_checkpoint:
        checkpoint_blocks(model)
    optimizer = Adam(model.parameters(), config.lr)
    scaler = torch.amp.GradScaler("cuda") if config.precision is Precision.fp16 else None
    return TrainState(model, ema, optimizer, scaler, noise_generator(config.seed, device))


def checkpoint_blocks(model: UNet) -> None:
    """Activation checkpointing per residual block (`--grad-checkpoint`): each ResBlock keeps
    only its inputs for the backward pass and recomputes the rest there, with the same random
    state (dropout), so the gradients are the same. The training network's own instances are
    patched; the architecture, its weights and the EMA copy are untouched."""
    for block in model.modules():
        if isinstance(block, ResBlock):
            block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def noise_generator(seed: int, device: torch.device) -> torch.Generator:
    """The generator of t and eps: on the GPU itself for CUDA (drawing a batch's eps on the
    host took longer than the rest of the host's work for a step), on the CPU otherwise."""
    where = device if device.type == "cuda" else torch.device("cpu")
    return torch.Generator(where).manual_seed(seed + 1)


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    ema_params = list(ema.parameters())
    torch._foreach_lerp_(ema_params, [p.detach() for p in model.parameters()], 1.0 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers(), strict=True):
        b_ema.copy_(b)


@dataclass(frozen=True)
class StepResult:
    """One optimizer step's numbers, left on the device that computed them until `to_host`."""

    step: int  # the optimizer step this was (1-based)
    losses: torch.Tensor  # (B * grad_accum,) per-item losses
    t: torch.Tensor  # (B * grad_accum,) their timesteps
    grad_norm: torch.Tensor  # () before clipping

    @property
    def loss(self) -> float:
        return float(self.losses.float().mean())


def to_host(results: list[StepResult]) -> list[StepResult]:
    """The results with their tensors on the CPU: one wait for the device for all of them."""
    if not results:
        return []
    sizes = [r.losses.numel() for r in results]
    flat = torch.cat([torch.cat([r.losses.float(), r.t.float()]) for r in results])
    norms = torch.stack([r.grad_norm.float().reshape(()) for r in results])
    flat, norms = flat.cpu(), norms.cpu()
    out, at = [], 0
    for r, n, norm in zip(results, sizes, norms, strict=True):
        losses, t = flat[at : at + n], flat[at + n : at + 2 * n].long()
        out.append(StepResult(r.step, losses, t, norm))
        at += 2 * n
    return out


def check_finite(results: list[StepResult], config: TrainConfig) -> None:
    """Raise TrainingDiverged at the first step (host results) whose loss or gradient norm is
    not finite. Under fp16 a non-finite gradient norm is the grad scaler's business (it skips
    that step), so only the loss counts there."""
    for r in results:
        if not torch.isfinite(r.losses).all():
            raise TrainingDiverged(_diverged_message(config, r.step - 1, "loss"))
        if config.precision is not Precision.fp16 and not torch.isfinite(r.grad_norm):
            raise TrainingDiverged(_diverged_message(config, r.step - 1, "gradient norm"))


def check_weights_finite(state: TrainState, config: TrainConfig) -> None:
    """Raise TrainingDiverged when a weight, raw or EMA, is not finite: a checkpoint must never
    replace a good one with such weights. The loss and gradient checks cannot see an update
    that broke the weights after its own loss was finite (an fp16 step the scaler let through,
    a learning rate too high for a moment); one device sync per checkpoint."""
    tensors = [t for m in (state.model, state.ema) for t in m.state_dict().values()
               if t.is_floating_point()]  # fmt: skip
    if tensors and not bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()):
        raise TrainingDiverged(_diverged_message(config, state.step - 1, "weights"))


def train_step(
    state: TrainState,
    batches: list[torch.Tensor],
    tables: DiffusionTables,
    config: TrainConfig,
    device: torch.device,
    forward: Callable,
    shard: tuple[int, int] = (0, 1),
    labels: list[torch.Tensor] | None = None,
    num_classes: int = 0,
    progress: float = 0.0,
    shifts: list[torch.Tensor] | None = None,
) -> StepResult:
    """One optimizer step over `grad_accum` uint8 micro-batches (on the CPU or on `device`),
    with their class labels for a model of `num_classes` classes. A share config.cond_drop
    of the labels, drawn from the noise generator, becomes "no class" (label num_classes).
    `shifts`: each micro-batch's shifts (B, 2), for a model told of them (ModelConfig.augment)
    as the map of where each image was filled by reflection.

    Nothing here waits for the device: a non-finite loss is found later, by `check_finite`.
    Until then the weights may hold NaN; the caller checks before anything is written.

    In a job of `world` processes (`shard` = (rank, world)), each micro-batch is this rank's
    equal share of a global batch, and `forward` is the DistributedDataParallel model, which
    averages the gradients. Every rank draws t and eps for the whole global batch from the
    same generator and keeps its share, so the job computes what one process would with the
    global batch. `progress`: the share of the run done, for the learning rate's cooldown
    (lr_at); every rank must pass the same.
    """
    rank, world = shard
    T = tables.timesteps
    gen = state.noise_gen
    state.model.train()
    for group in state.optimizer.param_groups:
        group["lr"] = lr_at(
            state.step, config.lr, config.warmup_steps, progress, config.cooldown or 0.0,
            config.warmup_share,
        )
    autocast = mixed_precision(config, device)
    all_losses, all_t = [], []
    n_images = sum(b.shape[0] for b in batches)
    no_sync = getattr(forward, "no_sync", None)  # DDP: all-reduce once, after the last micro
    for i, micro in enumerate(batches):
        x0 = to_model_range(to_device(micro, device))
        b = x0.shape[0]
        mine = slice(rank * b, (rank + 1) * b)
        t = torch.randint(0, T, (b * world,), generator=gen, device=gen.device)[mine]
        eps = torch.randn((b * world, *x0.shape[1:]), generator=gen, device=gen.device)[mine]
        y = None
        if labels is not None:
            drop = torch.rand(b * world, generator=gen, device=gen.device)[mine] < config.cond_drop
            y = to_device(labels[i], device)
            y = torch.where(to_device(drop, device), num_classes, y)
        augment = None
        if shifts is not None:
            augment = reflected(to_device(shifts[i], device), *x0.shape[2:])
        accumulate = no_sync() if no_sync and i < len(batches) - 1 else contextlib.nullcontext()
        with accumulate:
            with autocast:
                per_item = training_losses(
                    forward, tables, x0, to_device(t, device), to_device(eps, device),
                    config.objective.value, config.min_snr_gamma, y, augment,
                )  # fmt: skip
            # every image counts the same, however the images fall into micro-batches
            loss = per_item.sum() / n_images
            (state.scaler.scale(loss) if state.scaler else loss).backward()
        all_losses.append(per_item.detach())
        all_t.append(t)
    if state.scaler:
        state.scaler.unscale_(state.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(state.model.parameters(), config.grad_clip)
    if state.scaler:
        state.scaler.step(state.optimizer)  # skips the step when fp16 overflowed
        state.scaler.update()
    else:
        state.optimizer.step()
    state.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    update_ema(state.ema, state.model, ema_decay_at(state.step, config.ema_decay))
    return StepResult(state.step, torch.cat(all_losses), torch.cat(all_t), grad_norm.detach())


_AMP = {Precision.bf16: torch.bfloat16, Precision.fp16: torch.float16}


def mixed_precision(config: TrainConfig, device: torch.device):
    """The autocast context a training step runs its forward pass in (a no-op for fp32)."""
    if config.precision in (None, Precision.fp32):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_AMP[config.precision])


def _diverged_message(config: TrainConfig, step: int, what: str) -> str:
    causes = []
    if config.precision is Precision.fp16:
        causes.append("fp16 overflow (try --precision bf16 or fp32)")
    causes.append(f"a learning rate too high for this model (now {config.lr:g}; try --lr lower)")
    causes.append("bad input data (check the pre-flight report)")
    return (
        f"the {what} became non-finite at step {step + 1}; training stopped and the last good "
        f"checkpoint was kept. Likely causes: " + "; ".join(causes)
    )
