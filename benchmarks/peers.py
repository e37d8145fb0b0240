"""The peers' networks and training steps at ddpm's configuration, for `bench.py --peers`.

diffusers: UNet2DModel with the block layout of google/ddpm-cifar10-32 (the paper's network,
parameter for parameter), trained as diffusers' train_unconditional.py example does (AdamW,
grad clipping, diffusers' EMAModel), sampled with its DDPMScheduler / DDIMScheduler /
DPMSolverMultistepScheduler.

denoising-diffusion-pytorch: its Unet at the same width and channel multipliers. Its blocks
differ from the paper's (linear attention at every level, other resnet blocks), so this is the
closest configuration, not an identical one; the parameter count is printed beside it.
"""

from __future__ import annotations

import copy
import time

import torch
import torch.nn.functional as F

from ddpm_cli.config import ModelConfig


def diffusers_unet(config: ModelConfig):
    """UNet2DModel with the same layers and parameter count as ddpm's UNet(config)."""
    from diffusers import UNet2DModel

    levels = len(config.channel_mult)
    attn = [config.attends_at(i) for i in range(levels)]
    return UNet2DModel(
        sample_size=config.image_size[0],
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        time_embedding_type="positional",
        freq_shift=1,
        flip_sin_to_cos=False,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        block_out_channels=tuple(config.channels * m for m in config.channel_mult),
        layers_per_block=config.num_res_blocks,
        downsample_padding=0,
        act_fn="silu",
        attention_head_dim=None,
        norm_num_groups=min(32, config.channels),
        norm_eps=1e-6,
        dropout=config.dropout,
    )


def ddp_unet(config: ModelConfig):
    """denoising-diffusion-pytorch's Unet at the same width and multipliers (not identical)."""
    from denoising_diffusion_pytorch import Unet

    return Unet(
        dim=config.channels,
        dim_mults=tuple(config.channel_mult),
        channels=config.in_channels,
        dropout=config.dropout,
        flash_attn=True,
    )


class PeerTrainer:
    """One training step as the peer's own example does it, on batches of uint8 images."""

    def __init__(self, impl: str, config: ModelConfig, device: torch.device, precision: str):
        self.impl, self.device = impl, device
        self.model = (diffusers_unet if impl == "diffusers" else ddp_unet)(config).to(device)
        self.model.train()
        self.autocast = precision != "fp32"
        self.dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        self.alpha_bar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0).to(device)
        if impl == "diffusers":
            from diffusers.training_utils import EMAModel

            self.optimizer = torch.optim.AdamW(
                self.model.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6
            )
            self.ema = EMAModel(self.model.parameters(), decay=0.9999, use_ema_warmup=True)
        else:
            from ema_pytorch import EMA

            self.optimizer = torch.optim.Adam(self.model.parameters(), lr=8e-5, betas=(0.9, 0.99))
            self.ema = EMA(self.model, beta=0.995, update_every=10)

    def forward(self, x, t):
        out = self.model(x, t)
        return out.sample if self.impl == "diffusers" else out

    def step(self, batch: torch.Tensor) -> float:
        x0 = batch.to(self.device).float() / 127.5 - 1
        t = torch.randint(0, 1000, (x0.shape[0],), device=self.device)
        noise = torch.randn_like(x0)
        a = self.alpha_bar[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.autocast):
            out = self.forward(xt, t)
        loss = F.mse_loss(out.float(), noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.impl == "diffusers":
            self.ema.step(self.model.parameters())
        else:
            self.ema.update()
        return float(loss.detach())


def peer_sampler(impl: str, sampler: str, steps: int):
    """The peer's scheduler for our sampler name, set to `steps` steps (diffusers only)."""
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    cls = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "dpm++": DPMSolverMultistepScheduler}
    scheduler = cls[sampler](num_train_timesteps=1000, beta_schedule="linear")
    scheduler.set_timesteps(steps)
    return scheduler


def time_peer_sampling(model_fn, scheduler, x, evals: int, sync) -> tuple[float, int]:
    """Seconds for `evals` scheduler steps (one network evaluation each) after one warm-up."""
    timesteps = list(scheduler.timesteps)
    sample = x
    with torch.no_grad():
        for i, t in enumerate(timesteps[: evals + 1]):
            if i == 1:
                sync()
                start = time.perf_counter()
            tt = torch.full((x.shape[0],), int(t), device=x.device)
            sample = scheduler.step(model_fn(sample, tt), t, sample).prev_sample
        sync()
    return time.perf_counter() - start, min(evals, len(timesteps) - 1)


def parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def copy_model(model):
    return copy.deepcopy(model).eval().requires_grad_(False)
