"""The U-Net of Ho et al. 2020, built only from a ModelConfig; it knows nothing of diffusion.

Layout as in the authors' code (diffusion_tf/models/unet.py): conv_in; per resolution level,
`num_res_blocks` residual blocks (with self-attention at the chosen resolutions) and a stride-2
downsampling conv; a middle of res -> attention -> res; the mirror image on the way up with
`num_res_blocks + 1` blocks per level over concatenated skips and nearest x2 + conv upsampling;
GroupNorm -> SiLU -> conv_out. The timestep enters every residual block through a sinusoidal
embedding and two dense layers. A class-conditional network (ModelConfig.classes) adds a
learned class embedding to that timestep embedding, as diffusers' UNet2DModel does with
num_class_embeds; label len(classes), also used when no label is given, means "no class".
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ddpm_cli import winograd
from ddpm_cli.config import ModelConfig

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


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm that steps around torch's slow channels_last bfloat16 kernels on the CPU.

    There, for NHWC bfloat16 input (torch 2.14), the forward kernel switches below 1024
    positions to an algorithm that walks each group's channels with a stride of C, slow when a
    group holds few of them, and the backward kernel is slow at any size. Where an NCHW copy
    measured faster (docs/benchmarks.md: 1.4-9x forward, 1.4-5.7x with backward), the input is
    copied to NCHW, normalised by torch's NCHW kernel, and the result and the input's gradient
    are copied back to NHWC: below 1024 positions with fewer than 16 channels per group, and
    with a backward pass to follow, up to 64x64 with 4 or fewer. The precision is the same;
    a few values differ in their last bit (another summation order).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _nchw_is_faster(x, self.num_groups):
            return super().forward(x)
        y = F.group_norm(_ToNCHW.apply(x), self.num_groups, self.weight, self.bias, self.eps)
        return y.contiguous(memory_format=torch.channels_last)


def _nchw_is_faster(x: torch.Tensor, groups: int) -> bool:
    """Whether GroupNorm on `x` runs faster through an NCHW copy (GroupNorm's docstring)."""
    if x.device.type != "cpu" or x.dtype != torch.bfloat16 or x.dim() != 4:
        return False
    if x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last):
        return False
    if winograd.compiling():  # inductor writes its own normalisation
        return False
    per_group, positions = x.shape[1] // groups, x.shape[2] * x.shape[3]
    if per_group < 16 and positions < 1024:
        return True
    return x.requires_grad and per_group <= 4 and positions <= 4096


class _ToNCHW(torch.autograd.Function):
    """An NCHW copy of an NHWC tensor whose gradient goes back NHWC, the layout of the layers
    before it (an NCHW gradient would be converted there, or summed with NHWC ones)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous(memory_format=torch.channels_last)


def norm(channels: int) -> GroupNorm:
    return GroupNorm(min(GROUPS, channels), channels, eps=1e-6)


def zero_init(module: nn.Module) -> nn.Module:
    """The authors initialise the last layer of each residual branch to zero."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class Conv3x3(nn.Conv2d):
    """A 3x3 convolution with stride 1 and padding 1. Where it is faster (on the CPU, 128+
    channels; float32, or bfloat16 on x86 without AMX) it runs Winograd's algorithm: the same
    function, a quarter of the arithmetic. Narrower bfloat16 ones on x86 without AMX run in
    float32 arithmetic between bf16 roundings, as torch's bf16 kernel rounds (winograd.py)."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__(in_ch, out_ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if winograd.applies(x, self.weight, torch.is_grad_enabled()):
            return winograd.conv3x3(x, self.weight, self.bias)
        if winograd.rounds_in_float32(x, self.weight):
            return winograd.conv3x3(x, self.weight, self.bias, direct=True)
        return super().forward(x)


class Dropout(nn.Module):
    """Dropout with probability p. On CUDA and MPS this is F.dropout. On the CPU, where drawing a
    Bernoulli mask costs more than the rest of the layer several times over, the mask comes from
    16-bit random integers (four per 64-bit draw), so p is rounded to a multiple of 1/65536
    (0.1 becomes 0.100006). Both draw from torch's global generator, so a seed fixes them."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, training=True)
        n = x.numel()
        words = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64)
        keep = words.view(torch.int16)[:n].view(x.shape) >= round(self.p * 65536) - 32768
        return x * keep.to(x.dtype).mul_(1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}"


class ResBlock(nn.Module):
    """GN -> SiLU -> conv3x3 -> + Dense(SiLU(temb)) -> GN -> SiLU -> dropout -> conv3x3, + skip."""

    def __init__(self, in_ch: int, out_ch: int, temb_ch: int, dropout: float):
        super().__init__()
        self.norm1 = norm(in_ch)
        self.conv1 = Conv3x3(in_ch, out_ch)
        self.temb_proj = nn.Linear(temb_ch, out_ch)
        self.norm2 = norm(out_ch)
        self.dropout = Dropout(dropout)
        self.conv2 = zero_init(Conv3x3(out_ch, out_ch))
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
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
        self.conv = Conv3x3(ch, ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level's residual blocks, each optionally followed by attention."""

    def __init__(self, chans: list[tuple[int, int]], temb_ch: int, dropout: float, attn: bool):
        super().__init__()
        self.res = nn.ModuleList(ResBlock(i, o, temb_ch, dropout) for i, o in chans)
        self.attn = nn.ModuleList(AttnBlock(o) if attn else nn.Identity() for _, o in chans)


class UNet(nn.Module):
    """eps/x0/v-prediction network: (x_t (B, C, H, W), t (B,)) -> (B, out_channels, H, W)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        ch, mult, n = config.channels, config.channel_mult, config.num_res_blocks
        temb_ch = 4 * ch
        self.temb = nn.Sequential(nn.Linear(ch, temb_ch), nn.SiLU(), nn.Linear(temb_ch, temb_ch))
        self.class_emb = (
            nn.Embedding(config.num_classes + 1, temb_ch) if config.num_classes else None
        )
        self.conv_in = Conv3x3(config.in_channels, ch)

        skips, cur = [ch], ch
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        for level, m in enumerate(mult):
            chans = []
            for _ in range(n):
                chans.append((cur, ch * m))
                cur = ch * m
                skips.append(cur)
            self.down.append(Level(chans, temb_ch, config.dropout, config.attends_at(level)))
            if level != len(mult) - 1:
                self.downsample.append(Downsample(cur, config.downsample_padding))
                skips.append(cur)

        self.mid_res1 = ResBlock(cur, cur, temb_ch, config.dropout)
        self.mid_attn = AttnBlock(cur)
        self.mid_res2 = ResBlock(cur, cur, temb_ch, config.dropout)

        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for level in reversed(range(len(mult))):
            chans = []
            for _ in range(n + 1):
                chans.append((cur + skips.pop(), ch * mult[level]))
                cur = ch * mult[level]
            self.up.append(Level(chans, temb_ch, config.dropout, config.attends_at(level)))
            if level != 0:
                self.upsample.append(Upsample(cur))

        self.norm_out = norm(cur)
        self.conv_out = zero_init(Conv3x3(cur, config.out_channels))

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`y` (B,): class labels, for a class-conditional network (None: no class)."""
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
        hs = [self.conv_in(x)]
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
