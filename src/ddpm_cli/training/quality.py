"""The run's quality figure (`ddpm train --eval-every`): the EMA model's loss on images the run
sets aside and never trains on, at timesteps and noise fixed for the whole run.

A diffusion model's training loss barely moves while its samples improve, and it keeps falling
when the model starts to copy its training images. The loss on held-out images at fixed (t, eps)
is a paired comparison between evaluations (the same images, timesteps and noise each time), so
small changes show, and it rises when the model fits its training images at the expense of
images like them. Over the snapshots of a real-data run it ranked them as the benchmark's
Frechet distance did (docs/training.md#quality-figure). It costs EVALUATIONS forward passes.

Lower is better; the run keeps the weights with the lowest figure as best.safetensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ddpm_cli.data.folders import InMemory, OnDisk, decode_for_training, to_model_range
from ddpm_cli.device import to_device
from ddpm_cli.diffusion.process import training_losses
from ddpm_cli.diffusion.schedules import DiffusionTables
from ddpm_cli.errors import DataError, UsageError

# by default a run sets aside this share of its images, at most HOLDOUT_MAX; a run that would set
# aside fewer than HOLDOUT_MIN sets aside none (too few for a figure worth the images)
HOLDOUT_SHARE, HOLDOUT_MAX, HOLDOUT_MIN = 0.05, 256, 8
EVALUATIONS = 256  # network evaluations per figure: each held-out image at several timesteps
NOISE_SEED = 8_888_888  # added to the run's seed: the figure's timesteps and noise


def holdout_size(n_images: int, holdout: int | None) -> int:
    """The number of images to set aside: `holdout` when given (0: none), else the default."""
    if holdout is not None:
        if holdout >= n_images:
            raise UsageError(
                f"--holdout {holdout} leaves no images to train on (the data has {n_images}); "
                "set aside fewer"
            )
        return holdout
    k = min(HOLDOUT_MAX, int(HOLDOUT_SHARE * n_images))
    return k if k >= HOLDOUT_MIN else 0


@dataclass(frozen=True)
class HeldOut:
    """The images a run set aside (uint8 (k, C, H, W)), their labels, and the seed of the
    figure's fixed timesteps and noise."""

    images: torch.Tensor
    labels: torch.Tensor | None
    seed: int

    @classmethod
    def take(cls, images: InMemory | OnDisk, held: torch.Tensor, seed: int) -> HeldOut | None:
        """The images at indices `held`, decoded once and kept in memory; images on disk
        that no longer decode are left out (None when none does)."""
        if isinstance(images, InMemory):
            labels = None if images.labels is None else images.labels[held]
            return cls(images.data[held], labels, seed + NOISE_SEED)
        decoded, kept = [], []
        for i in held.tolist():
            try:
                decoded.append(decode_for_training(images.paths[i], images.image_size,
                                                   images.channels))  # fmt: skip
                kept.append(i)
            except (DataError, OSError):
                continue
        if not decoded:
            return None
        labels = None if images.labels is None else images.labels[kept]
        return cls(torch.stack(decoded), labels, seed + NOISE_SEED)


@torch.no_grad()
def heldout_loss(
    model: torch.nn.Module,
    tables: DiffusionTables,
    held: HeldOut,
    objective: str,
    device: torch.device,
    batch_size: int,
    min_snr_gamma: float | None = None,
) -> float:
    """The mean training loss (the run's objective and weighting) of `model` on the held-out
    images, each at ceil(EVALUATIONS / k) timesteps: the timesteps evenly spaced over [0, T)
    (stratified, so every figure weighs the whole chain alike) and dealt to the images by a
    seeded shuffle, the noise of evaluation i drawn from its own seed, so the figure does not
    depend on `batch_size` (the evaluation's batches). Class-conditional models see each
    image's own class."""
    k, T = held.images.shape[0], tables.timesteps
    t, which = evaluation_plan(k, T, held.seed)
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64)
    g = torch.Generator()
    for start in range(0, len(t), batch_size):
        part = which[start : start + batch_size]
        x0 = to_model_range(to_device(held.images[part], device))
        eps = torch.stack([
            torch.randn(x0.shape[1:], generator=g.manual_seed((held.seed * 4099 + i) % 2**64))
            for i in range(start, start + len(part))
        ])  # fmt: skip
        y = None if held.labels is None else to_device(held.labels[part], device)
        losses = training_losses(
            model, tables, x0, to_device(t[start : start + batch_size], device),
            to_device(eps, device), objective, min_snr_gamma, y,
        )  # fmt: skip
        total += losses.double().sum().cpu()
    model.train(was_training)
    return float(total / len(t))


def evaluation_plan(k: int, T: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(timestep, held-out image index) of each of the figure's k * ceil(EVALUATIONS / k)
    evaluations: n timesteps evenly spaced over [0, T), shuffled by `seed`; image i % k."""
    n = k * math.ceil(EVALUATIONS / k)
    t = ((torch.arange(n, dtype=torch.float64) + 0.5) * T / n).long().clamp(max=T - 1)
    t = t[torch.randperm(n, generator=torch.Generator().manual_seed(seed))]
    return t, torch.arange(n) % k
