"""ddpm's training state for a preset on 32x32 RGB images, as the benchmarks that run the
network in their own process (interleaved.py, threads.py, breakdown.py) build it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ddpm_cli.config import DiffusionConfig, ModelConfig, Precision, TrainConfig
from ddpm_cli.diffusion.schedules import DiffusionTables
from ddpm_cli.model.presets import build_model_config
from ddpm_cli.training.train import TrainState, new_state, resolve


@dataclass
class Workload:
    model_config: ModelConfig
    config: TrainConfig  # resolved for the device, as `ddpm train` resolves it
    tables: DiffusionTables
    state: TrainState  # a fresh model, its EMA copy and Adam, seed 0


def workload(preset: str, batch_size: int, precision: str, device: torch.device) -> Workload:
    model_config = build_model_config(preset, (32, 32), 3)
    config = TrainConfig(
        preset=preset, image_size=32, batch_size=batch_size, seed=0, steps=10**6,
        precision=Precision(precision), device=str(device),
    )  # fmt: skip
    config = resolve(config, device, 1024, 3)
    tables = DiffusionTables.from_config(DiffusionConfig()).to(device, torch.float32)
    return Workload(model_config, config, tables, new_state(model_config, config, device))
