"""3x3 convolutions by Winograd's minimal filtering algorithm F(4x4, 3x3), for the CPU.

A direct 3x3 convolution spends 9 multiply-adds per output pixel per input channel. Winograd's
algorithm (Lavin & Gray 2016) cuts each image into overlapping 6x6 tiles, moves tiles and
filters into a space where the convolution is an elementwise product (V = B^T d B,
U = G g G^T), multiplies there, and brings 4x4 output tiles back (Y = A^T (U . V) A): 36
products per 16 outputs, a quarter of the arithmetic. Summed over input channels, the 36
products are one batched GEMM; the transforms are small GEMMs by Kronecker products.

torch's CPU convolutions (oneDNN) are direct only. `applies` picks the layers where this was
measured faster (both channel counts 128 or more, images 8x8 or larger; the figures are in
docs/benchmarks.md). The result is about 1e-5 relative from a float64 convolution (direct:
about 1e-6). bfloat16 convolutions take the same path on x86 CPUs without AMX, where bf16
arithmetic is no faster than float32: inputs and weights rounded to bf16, float32 arithmetic,
the output rounded to bf16, the points where torch's bf16 kernels round; narrower bf16 layers
take torch's float32 direct convolution between the same roundings (`rounds_in_float32`).
Sampling keeps each layer's transformed filters inside `keep_filters()`. DDPM_WINOGRAD=0
(runtime.Runtime.winograd) keeps torch's kernels throughout.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from ddpm_cli import runtime
from ddpm_cli.device import cpu_has_amx


def _kron(rows: list[list[float]]) -> torch.Tensor:
    m = torch.tensor(rows, dtype=torch.float64)
    return torch.kron(m, m)  # vec(M X M^T) = kron(M, M) @ vec(X) for row-major vec


# Lavin & Gray's F(4x4, 3x3) with interpolation points 0, +-1, +-2 and infinity
_KB = _kron([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
             [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]])  # fmt: skip
_KG = _kron([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
             [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]])  # fmt: skip
_KA = _kron([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]])
_CACHE: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
_kept: dict[tuple, tuple[torch.Tensor, torch.Tensor]] | None = None  # inside keep_filters()

# measured on the CPU (benchmarks/winograd.py): 64 channels break even, 32 run at half speed; a
# 4x4 image is one tile padded to 6x6; with few tiles, transforming the filters at every call
# (as training must) costs more than it saves
MIN_CHANNELS = 128
MIN_SIZE = 8
MIN_TRAIN_TILES = 64
# bf16 without AMX, float32 direct convolution between bf16 roundings: 1.16-1.46x faster from 32
# input channels at 8x8 and larger; no faster from 3 channels or at 4x4
MIN_ROUNDED_CHANNELS = 32


def _mats(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(36, 36) input, (36, 9) filter and (16, 36) output transforms in `dtype`."""
    if dtype not in _CACHE:
        _CACHE[dtype] = (_KB.to(dtype), _KG.to(dtype), _KA.to(dtype))
    return _CACHE[dtype]


def _cpu_autocast() -> torch.dtype | None:
    """The CPU autocast dtype where autocast is on, else None."""
    try:
        on = torch.is_autocast_enabled("cpu")
        return torch.get_autocast_dtype("cpu") if on else None
    except TypeError:  # torch < 2.4
        return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None


def _no_amx() -> bool:
    """Whether this is an x86 CPU known to lack AMX tiles (torch 2.3 and later can tell). Only
    x86 was measured: ARM CPUs' bf16 instructions may well beat float32 there."""
    return cpu_has_amx() is False


def compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype | None:
    """The dtype F.conv2d(x, weight) computes in: the CPU autocast dtype where autocast is on
    for float32 and bfloat16 inputs (which it casts), else the inputs' shared dtype (None if they
    differ)."""
    amp = _cpu_autocast()
    floats = (torch.float32, torch.bfloat16)
    if amp is not None and x.dtype in floats and weight.dtype in floats:
        return amp
    return x.dtype if x.dtype == weight.dtype else None


def compiling() -> bool:
    """Whether torch.compile is tracing the caller (it then keeps torch's own kernels)."""
    compiler = getattr(torch, "compiler", None)
    return bool(compiler and getattr(compiler, "is_compiling", lambda: False)())


def _ours(x: torch.Tensor) -> bool:
    """Whether ddpm's own convolution paths may take `x` at all: a 4-d CPU tensor, outside
    torch.compile, unless DDPM_WINOGRAD=0."""
    return (
        x.dim() == 4 and x.device.type == "cpu" and not compiling() and runtime.current().winograd
    )


def applies(x: torch.Tensor, weight: torch.Tensor, grad: bool = False) -> bool:
    """Whether conv3x3 (stride 1, padding 1) is the faster way for this input and weight. The
    rule without gradients does not look at the batch, so that an image's bytes do not depend
    on it (docs/sampling.md); with them (`grad`), the filters are transformed at every call and
    it takes 64 tiles or more to pay (batch 1 at 8x8: 0.27x). torch.compile keeps torch's
    convolution (its graphs do not take this function). It runs float32 convolutions, and
    bfloat16 ones (weights or autocast) on x86 CPUs without AMX, where bf16 arithmetic is slower."""
    if not _ours(x):
        return False
    dtype = compute_dtype(x, weight)
    tiles = x.shape[0] * -(-x.shape[2] // 4) * -(-x.shape[3] // 4)
    return (
        (tiles >= MIN_TRAIN_TILES or not grad)
        and (dtype == torch.float32 or (dtype == torch.bfloat16 and _no_amx()))
        and min(weight.shape[0], weight.shape[1]) >= MIN_CHANNELS
        and min(x.shape[2], x.shape[3]) >= MIN_SIZE
    )


def rounds_in_float32(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a bfloat16 3x3 convolution that `applies` declines runs faster as torch's float32
    convolution of its bf16-rounded operands, rounded back to bf16 (conv3x3 with direct=True): on
    x86 CPUs without AMX, with 32 or more input channels, on images 8x8 or larger, unless
    DDPM_WINOGRAD=0. Like `applies` without gradients, the rule does not look at the batch."""
    return (
        _ours(x)
        and compute_dtype(x, weight) == torch.bfloat16
        and _no_amx()
        and weight.shape[1] >= MIN_ROUNDED_CHANNELS
        and min(x.shape[2], x.shape[3]) >= MIN_SIZE
    )


def filters(w: torch.Tensor, flip: bool = False) -> torch.Tensor:
    """U = G w G^T for each channel pair: (Co, Ci, 3, 3) -> (36, Ci, Co), or with `flip` the
    filters of the gradient's convolution (rotated 180 degrees, channels swapped): (36, Co, Ci)."""
    co, ci = w.shape[:2]
    _, kg, _ = _mats(w.dtype)
    w9 = w.flip(2, 3).reshape(co, ci, 9).permute(2, 0, 1) if flip else (
        w.reshape(co, ci, 9).permute(2, 1, 0))  # fmt: skip
    return (kg @ w9.reshape(9, -1)).view(36, *w9.shape[1:])


def _tiles(x: torch.Tensor, nh: int, nw: int) -> torch.Tensor:
    """V = B^T d B for every overlapping 6x6 tile d of `x` (B, H, W, C), zero-padded by one
    pixel and up to whole tiles: (36, tiles, C)."""
    b, h, w, c = x.shape
    kb, _, _ = _mats(x.dtype)
    xp = F.pad(x, (0, 0, 1, 4 * nw - w + 1, 1, 4 * nh - h + 1))
    d = xp.unfold(1, 6, 4).unfold(2, 6, 4).permute(4, 5, 0, 1, 2, 3).reshape(36, -1)
    return (kb @ d).view(36, -1, c)


def _convolve(v: torch.Tensor, u: torch.Tensor, shape: tuple[int, ...], bias: torch.Tensor | None):
    """Output tiles Y = A^T (U . V) A, summed over input channels, laid out as (B, H, W, Co)."""
    b, h, w, nh, nw = shape
    co = u.shape[2]
    _, _, ka = _mats(v.dtype)
    y = (ka @ torch.bmm(v, u).view(36, -1)).view(4, 4, b, nh, nw, co).permute(2, 3, 0, 4, 1, 5)
    out = torch.empty(b, nh, 4, nw, 4, co, dtype=v.dtype, device=v.device)
    if bias is None:
        out.copy_(y)
    else:
        torch.add(y, bias, out=out)
    out = out.view(b, 4 * nh, 4 * nw, co)
    return out if (4 * nh, 4 * nw) == (h, w) else out[:, :h, :w].contiguous()


@contextlib.contextmanager
def keep_filters() -> Iterator[None]:
    """Within this block, conv3x3 without gradients transforms each weight's filters once and
    keeps them (about 4x the weights' memory): for a sampling or evaluation loop, whose weights
    must not change meanwhile. Sampling at small batches would otherwise spend most of its time
    transforming filters. They are dropped on leaving the outermost block."""
    global _kept
    outer = _kept
    _kept = {} if outer is None else outer
    try:
        yield
    finally:
        _kept = outer


def _kept_filters(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """filters() of the weight rounded to `dtype`, made once per weight inside keep_filters()."""
    if _kept is None or torch.is_grad_enabled():
        return None
    entry = _kept.get((id(weight), dtype))
    if entry is None or entry[0] is not weight:  # the weight is held, so its id stays unique
        entry = _kept[id(weight), dtype] = (weight, filters(_rounded(weight, dtype)))
    return entry[1]


def _rounded(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t rounded to `dtype`, in float32 or wider for the arithmetic."""
    return t.to(dtype).to(torch.promote_types(dtype, torch.float32))


class _Conv3x3(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, u):
        b, _, h, w = x.shape
        shape = (b, h, w, -(-h // 4), -(-w // 4))
        v = _tiles(x.permute(0, 2, 3, 1), *shape[3:])
        ctx.save_for_backward(v, weight)
        ctx.shape = shape
        u = filters(weight) if u is None else u
        return _convolve(v, u, shape, bias).permute(0, 3, 1, 2)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        with _no_autocast():
            return _Conv3x3._backward(ctx, grad)

    @staticmethod
    def _backward(ctx, grad):
        v, weight = ctx.saved_tensors
        b, h, w, nh, nw = ctx.shape
        co, ci = weight.shape[:2]
        g = grad.permute(0, 2, 3, 1)  # (B, H, W, Co)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:  # the input's gradient is the same convolution, flipped
            u = filters(weight, flip=True)
            dx = _convolve(_tiles(g, nh, nw), u, ctx.shape, None).permute(0, 3, 1, 2)
        if ctx.needs_input_grad[1]:  # dU = V^T dM with dM = A dY A^T per tile; dw = G^T dU G
            _, kg, ka = _mats(g.dtype)
            gp = F.pad(g, (0, 0, 0, 4 * nw - w, 0, 4 * nh - h))
            dy = gp.reshape(b, nh, 4, nw, 4, co).permute(2, 4, 0, 1, 3, 5).reshape(16, -1)
            dm = (ka.t() @ dy).view(36, -1, co)
            du = torch.bmm(v.transpose(1, 2), dm)  # (36, Ci, Co)
            dw9 = (kg.t() @ du.view(36, -1)).view(3, 3, ci, co)
            dw = torch.empty_like(weight).copy_(dw9.permute(3, 2, 0, 1))
        if ctx.needs_input_grad[2]:
            db = g.sum((0, 1, 2))
        return dx, dw, db, None


def _no_autocast():
    return torch.autocast("cpu", enabled=False)


def conv3x3(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    kept: torch.Tensor | None = None,
    direct: bool = False,
) -> torch.Tensor:
    """F.conv2d(x, weight, bias, padding=1) for (Co, Ci, 3, 3) weights, differentiable (once);
    returns a channels_last tensor. float32 and float64 compute in their own dtype; bfloat16
    (both inputs, or under CPU bf16 autocast, which casts float32 ones as F.conv2d does there)
    rounds the inputs to bf16, computes in float32 and returns bf16. `kept`: filters() of the
    (rounded) weight computed beforehand, for inference (no gradient flows into them); inside
    keep_filters() they are kept there. `direct`: torch's direct convolution does the float32
    arithmetic instead of Winograd's (for bf16: `rounds_in_float32`)."""
    dtype = compute_dtype(x, weight)
    if dtype not in (torch.float32, torch.float64, torch.bfloat16):
        raise ValueError(f"conv3x3 takes float32, float64 or bfloat16 inputs, not {x.dtype} "
                         f"and {weight.dtype}")  # fmt: skip
    with _no_autocast():
        if kept is None and not direct:
            kept = _kept_filters(weight, dtype)
        x, weight = _rounded(x, dtype), _rounded(weight, dtype)
        bias = None if bias is None else _rounded(bias, dtype)
        if direct:
            out = F.conv2d(x, weight, bias, padding=1).to(dtype)
            return out.contiguous(memory_format=torch.channels_last)
        return _Conv3x3.apply(x, weight, bias, kept).to(dtype)


class Conv3x3(nn.Conv2d):
    """A 3x3 convolution with stride 1 and padding 1 that runs `conv3x3` where it is faster (on
    the CPU, 128+ channels; float32, or bfloat16 on x86 without AMX); narrower bfloat16 ones on
    x86 without AMX run in float32 arithmetic between bf16 roundings, as torch's bf16 kernel
    rounds. policy.install gives it to a network's nn.Conv2d(k=3, s=1, p=1) layers."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__(in_ch, out_ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if applies(x, self.weight, torch.is_grad_enabled()):
            return conv3x3(x, self.weight, self.bias)
        if rounds_in_float32(x, self.weight):
            return conv3x3(x, self.weight, self.bias, direct=True)
        return super().forward(x)
