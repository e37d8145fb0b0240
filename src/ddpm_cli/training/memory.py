"""The memory a training step needs, measured before a run starts, and the micro-batches that make
its batch fit (`ddpm train` chooses --grad-accum itself when the batch would not).

A probe pass (forward and backward of PROBE images, with the run's precision, objective and
activation checkpointing) is measured by the device's own count: the CUDA allocator's peak, or
on the CPU the process's peak resident memory (Linux's VmHWM, reset before the probe). What
one more image costs is the bytes autograd keeps for its backward pass (counted by saved-tensor
hooks; the probe's peak grows less regularly with the batch at a few images); the rest of the
probe's peak is what a step needs anyway (gradients, workspaces), plus Adam's two moments when
they do not exist yet. The probe leaves the weights, the gradients and the random state as it
found them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import torch

from ddpm_cli import distributed
from ddpm_cli.config import TrainConfig
from ddpm_cli.device import available_memory
from ddpm_cli.diffusion.process import training_losses
from ddpm_cli.diffusion.schedules import DiffusionTables
from ddpm_cli.text import bytes_text
from ddpm_cli.training.adam import Adam
from ddpm_cli.training.train import mixed_precision

HEADROOM = 0.85  # the share of the available memory a step may plan to use
PROBE = 2  # images in the probe pass
# what one more image costs, per byte autograd keeps of it for the backward pass: the backward's
# own gradients come on top (more with --grad-checkpoint, whose blocks recompute their
# activations there). Chosen so that the figure was 0.88-1.37x the measured peak of real steps
# in 10 CPU cases (benchmarks/step_memory.py, docs/benchmarks.md); HEADROOM covers the rest.
SLOPE, CHECKPOINTED_SLOPE = 1.35, 2.5


@dataclass(frozen=True)
class StepMemory:
    """Bytes a training step needs beyond what the process holds now, as `fixed + per_image *
    micro_batch`, and the bytes the device can still give (None: unknown)."""

    fixed: int
    per_image: int
    available: int | None

    def need(self, micro_batch: int) -> int:
        return self.fixed + self.per_image * micro_batch

    def fits(self, micro_batch: int) -> bool:
        return self.available is None or self.need(micro_batch) <= HEADROOM * self.available


def measure(
    model: torch.nn.Module,
    optimizer: Adam,
    tables: DiffusionTables,
    config: TrainConfig,
    device: torch.device,
    num_classes: int,
    image_shape: tuple[int, int, int],
) -> StepMemory | None:
    """The step's memory by a probe pass, or None where the device has no peak count (MPS,
    or a CPU without Linux's /proc)."""
    if device.type not in ("cuda", "cpu") or (device.type == "cpu" and not _resettable()):
        return None
    rng = torch.get_rng_state(), (torch.cuda.get_rng_state_all() if device.type == "cuda" else [])
    base = _in_use(device)
    try:
        _reset_peak(device)
        saved = _probe(model, tables, config, device, num_classes, (PROBE, *image_shape))
        peak = _peak(device) - base
    finally:
        model.zero_grad(set_to_none=True)
        torch.set_rng_state(rng[0])
        if rng[1]:
            torch.cuda.set_rng_state_all(rng[1])
        if device.type == "cuda":  # give the probe's cached blocks back (the data may live there)
            torch.cuda.empty_cache()
    slope = CHECKPOINTED_SLOPE if config.grad_checkpoint else SLOPE
    per_image = int(slope * saved / PROBE)
    weights = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    # the optimizer's and the EMA update's temporaries, and Adam's two moments until they exist
    fixed = max(0, peak - saved) + weights * (1 if optimizer.state else 3)
    return StepMemory(fixed, per_image, _available(device))


def micro_batches(memory: StepMemory, batch: int) -> int:
    """The fewest micro-batches K (a divisor of `batch`, so each has batch / K images) whose
    step fits the available memory; `batch` when even one image does not fit."""
    for k in range(1, batch + 1):
        if batch % k == 0 and memory.fits(batch // k):
            return k
    return batch


def _probe(model, tables, config: TrainConfig, device, num_classes: int, shape) -> int:
    """Forward and backward of `shape` noise images at spread timesteps, as a step runs them;
    returns the bytes autograd kept for the backward pass (each storage once, the weights'
    own not counted)."""
    g = torch.Generator().manual_seed(0)
    x0 = (torch.rand(shape, generator=g) * 2 - 1).to(device)
    t = torch.linspace(0, tables.timesteps - 1, shape[0]).long().to(device)
    eps = torch.randn(shape, generator=g).to(device)
    y = torch.zeros(shape[0], dtype=torch.long, device=device) if num_classes else None
    told = model.config.augment  # a --shift run's map
    augment = torch.ones((shape[0], told, *shape[2:]), device=device) if told else None
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(x: torch.Tensor) -> torch.Tensor:
        storage = x.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return x

    was_training = model.training
    model.train()
    with mixed_precision(config, device), torch.autograd.graph.saved_tensors_hooks(
        pack, lambda x: x
    ):
        loss = training_losses(model, tables, x0, t, eps, config.objective.value,
                               config.min_snr_gamma, y, augment).sum()  # fmt: skip
    loss.backward()
    del loss
    model.train(was_training)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return sum(kept.values())


def _in_use(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.memory_allocated(device)
    return _status("VmRSS") or 0


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak resident size
        f.write("5")


def _peak(device: torch.device) -> int:
    """The peak since `_reset_peak`: the allocator's, or the process's resident (VmHWM)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return _status("VmHWM") or 0


def _resettable() -> bool:
    """Whether this system reports and resets the process's peak resident memory (Linux)."""
    try:
        _reset_peak(torch.device("cpu"))
    except OSError:
        return False
    return _status("VmHWM") is not None


def _status(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            found = re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.MULTILINE)
    except OSError:
        return None
    return int(found.group(1)) * 1024 if found else None


def _available(device: torch.device) -> int | None:
    """What a step may still take: CUDA's free memory plus what torch holds but does not use;
    on the CPU, the memory available to the process (its cgroup's limit included)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return available_memory()


@dataclass(frozen=True)
class Plan:
    """What the run's start reports about memory: the step's figure (None: not measured here),
    a line saying how the batch was fitted, or a warning that it may not fit."""

    step: StepMemory | None
    note: str | None = None
    warning: str | None = None


def plan(state, tables, config: TrainConfig, num_classes: int, image_shape, device,
         d: distributed.Dist, adjustable: bool) -> tuple[TrainConfig, Plan]:  # fmt: skip
    """Measure a step's memory for the run's `state` (train.TrainState) and fit its batch
    (fit_batch); in a job, the ranks agree on the most micro-batches any of them needs."""
    step = measure(state.model, state.optimizer, tables, config, device, num_classes, image_shape)
    fitted, note, warning = fit_batch(step, config, adjustable)
    k = round(distributed.most(d, fitted.grad_accum / config.grad_accum, device))
    if k > 1:
        config = replace(config, batch_size=config.batch_size // k,
                         grad_accum=config.grad_accum * k)  # fmt: skip
    return config, Plan(step, note, warning)


def fit_batch(
    memory: StepMemory | None, config: TrainConfig, adjustable: bool
) -> tuple[TrainConfig, str | None, str | None]:
    """(the config a step fits with, a line saying what was done, a warning): a batch that
    would not fit runs as K micro-batches of batch / K images (the same update, --grad-accum
    K) when `adjustable` (a new run whose --grad-accum was not given); otherwise it is kept,
    with a warning."""
    if memory is None or memory.fits(config.batch_size):
        return config, None, None
    b, need = config.batch_size, memory.need(config.batch_size)
    k = micro_batches(memory, b)
    have = bytes_text(memory.available)
    what = f"a step on a batch of {b} needs about {bytes_text(need)} of the {have} available"
    if adjustable and memory.fits(b // k):
        micro = b // k
        config = replace(config, batch_size=micro, grad_accum=config.grad_accum * k)
        note = (f"{what}: each step runs as {k} micro-batches of {micro} "
                f"(--grad-accum {config.grad_accum}), the same update")  # fmt: skip
        return config, note, None
    return config, None, (f"{what}; the run may run out of memory: try a smaller "
                          "--batch-size, --grad-accum K or --grad-checkpoint")  # fmt: skip
