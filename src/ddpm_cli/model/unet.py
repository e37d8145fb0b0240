"""The U-Net of Ho et al. 2020, built only from a ModelConfig; it knows nothing of diffusion.

Layout as in the authors' code (diffusion_tf/models/unet.py): conv_in; per resolution level,
`num_res_blocks` residual blocks (with self-attention at the chosen resolutions) and a stride-2
downsampling conv; a middle of res -> attention -> res; the mirror image on the way up with
`num_res_blocks + 1` blocks per level over concatenated skips and nearest x2 + conv upsampling;
GroupNorm -> SiLU -> conv_out. The timestep enters every residual block through a sinusoidal
embedding and two dense layers. A class-conditional network (ModelConfig.classes) adds a
learned class embedding to that timestep embedding, as diffusers' UNet2DModel does with
num_class_embeds; label len(classes), also used when no label is given, means "no class".
A network trained with augmentation it is told of (ModelConfig.augment: --shift; the
non-leaking augmentation of Karras et al. 2022, as a map rather than a vector) adds a bias-free
3x3 convolution of the augmentation map to conv_in's output; it starts at zero, and an empty
map, what sampling gives, adds nothing: the network then is exactly one without it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ddpm_cli.config import ModelConfig
from ddpm_cli.model.kernels.policy import KernelPolicy, install

GROUPS = 32  # GroupNorm groups, as in the paper's code


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding (B,) -> (B, dim): [sin(t f_i), cos(t f_i)], f_i = 1e4^(-i/(half-1))."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - 1)
    )
    args = t.to(torch.float32)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(GROUPS, channels), channels, eps=1e-6)


def zero_init(module: nn.Module) -> nn.Module:
    """The authors initialise the last layer of each residual branch to zero."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def conv3x3(in_ch: int, out_ch: int) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 3, padding=1)


class ResBlock(nn.Module):
    """GN -> SiLU -> conv3x3 -> + Dense(SiLU(temb)) -> GN -> SiLU -> dropout -> conv3x3, + skip.

    With `scale_shift` (ModelConfig.scale_shift) the dense layer gives twice the channels, a
    scale s and a shift b, that modulate the normalised activations instead: GN(h) * (1 + s) + b
    (adaptive group normalisation: Dhariwal & Nichol 2021; diffusers' "scale_shift")."""

    def __init__(
        self, in_ch: int, out_ch: int, temb_ch: int, dropout: float, scale_shift: bool = False
    ):
        super().__init__()
        self.scale_shift = scale_shift
        self.norm1 = norm(in_ch)
        self.conv1 = conv3x3(in_ch, out_ch)
        self.temb_proj = nn.Linear(temb_ch, out_ch * (2 if scale_shift else 1))
        self.norm2 = norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(conv3x3(out_ch, out_ch))
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        emb = self.temb_proj(F.silu(temb))[:, :, None, None]
        if self.scale_shift:
            scale, shift = emb.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + emb)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions, with a residual connection."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj_out = zero_init(nn.Conv2d(ch, ch, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        # positions first, channels last and contiguous: the layout the fused (flash) attention
        # kernels take (the CPU one needs unit stride in C); free with channels_last activations
        qkv = self.qkv(self.norm(x)).permute(0, 2, 3, 1).reshape(b, h * w, 3, 1, c).contiguous()
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, 1, HW, C)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C)
        return x + self.proj_out(out.reshape(b, h, w, c).permute(0, 3, 1, 2))


class Downsample(nn.Module):
    """A stride-2 3x3 convolution; `padding` as ModelConfig.downsample_padding."""

    def __init__(self, ch: int, padding: str = "symmetric"):
        super().__init__()
        self.bottom_right = padding == "bottom_right"
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0 if self.bottom_right else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bottom_right:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = conv3x3(ch, ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level's residual blocks, each optionally followed by attention."""

    def __init__(self, chans: list[tuple[int, int]], block, attn: bool):
        """`block(in_ch, out_ch)` makes a residual block."""
        super().__init__()
        self.res = nn.ModuleList(block(i, o) for i, o in chans)
        self.attn = nn.ModuleList(AttnBlock(o) if attn else nn.Identity() for _, o in chans)


class UNet(nn.Module):
    """eps/x0/v-prediction network: (x_t (B, C, H, W), t (B,)) -> (B, out_channels, H, W)."""

    def __init__(self, config: ModelConfig, kernels: KernelPolicy | None = None):
        """`kernels`: the CPU fast paths its layers may take (kernels/policy.py; None: the
        default for this CPU); TORCH keeps torch's own layers throughout."""
        super().__init__()
        self.config = config
        ch, mult, n = config.channels, config.channel_mult, config.num_res_blocks
        temb_ch = 4 * ch

        def block(in_ch: int, out_ch: int) -> ResBlock:
            return ResBlock(in_ch, out_ch, temb_ch, config.dropout, config.scale_shift)

        self.temb = nn.Sequential(nn.Linear(ch, temb_ch), nn.SiLU(), nn.Linear(temb_ch, temb_ch))
        self.class_emb = (
            nn.Embedding(config.num_classes + 1, temb_ch) if config.num_classes else None
        )
        self.augment_in = (
            zero_init(nn.Conv2d(config.augment, ch, 3, padding=1, bias=False))
            if config.augment else None
        )  # fmt: skip
        self.conv_in = conv3x3(config.in_channels, ch)

        skips, cur = [ch], ch
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        for level, m in enumerate(mult):
            chans = []
            for _ in range(n):
                chans.append((cur, ch * m))
                cur = ch * m
                skips.append(cur)
            self.down.append(Level(chans, block, config.attends_at(level)))
            if level != len(mult) - 1:
                self.downsample.append(Downsample(cur, config.downsample_padding))
                skips.append(cur)

        self.mid_res1 = block(cur, cur)
        self.mid_attn = AttnBlock(cur)
        self.mid_res2 = block(cur, cur)

        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for level in reversed(range(len(mult))):
            chans = []
            for _ in range(n + 1):
                chans.append((cur + skips.pop(), ch * mult[level]))
                cur = ch * mult[level]
            self.up.append(Level(chans, block, config.attends_at(level)))
            if level != 0:
                self.upsample.append(Upsample(cur))

        self.norm_out = norm(cur)
        self.conv_out = zero_init(conv3x3(cur, config.out_channels))
        install(self, kernels)  # the fast paths, chosen once, outside the architecture

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | None = None,
        augment: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`y` (B,): class labels, for a class-conditional network (None: no class).
        `augment` (B, config.augment, H, W): where each image of a training batch was
        augmented (None: nowhere, as in sampling)."""
        if x.device.type != "mps":
            # NHWC activations: what cuDNN's tensor-core kernels and oneDNN's CPU convolutions
            # work in natively (measured on the CPU: +4% for the cifar10 preset, no reorders)
            x = x.contiguous(memory_format=torch.channels_last)
        temb = self.temb(timestep_embedding(t, self.config.channels).to(x.dtype))
        if self.class_emb is not None:
            if y is None:
                y = torch.full_like(t, self.config.num_classes, dtype=torch.long)
            temb = temb + self.class_emb(y).to(temb.dtype)
        elif y is not None:
            raise ValueError("class labels given to a network trained without classes")
        h = self.conv_in(x)
        if augment is not None:
            if self.augment_in is None:
                raise ValueError("an augmentation map given to a network trained without one")
            h = h + self.augment_in(augment.to(x.dtype))
        hs = [h]
        for i, level in enumerate(self.down):
            for res, attn in zip(level.res, level.attn, strict=True):
                hs.append(attn(res(hs[-1], temb)))
            if i < len(self.downsample):
                hs.append(self.downsample[i](hs[-1]))
        h = self.mid_res2(self.mid_attn(self.mid_res1(hs[-1], temb)), temb)
        for i, level in enumerate(self.up):
            for res, attn in zip(level.res, level.attn, strict=True):
                h = attn(res(torch.cat([h, hs.pop()], dim=1), temb))
            if i < len(self.upsample):
                h = self.upsample[i](h)
        return self.conv_out(F.silu(self.norm_out(h)))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
