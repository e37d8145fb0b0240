"""Editing images with a trained model, no retraining: pure functions of tensors that turn a
sampler's walk into an edit (`samplers.Edit`), usable with every sampler.

    inpaint  RePaint (Lugmayr et al. 2022): after every step the known pixels of x_{t_prev} are
             replaced by the original image noised to t_prev, so at the end they are the
             original's, bit for bit; with `resample` R > 1 the walk jumps back `jump` steps
             (re-noising with q) R - 1 times at every `jump`-th step and walks down again, which
             lets the generated pixels agree with the known ones (RePaint's Algorithm 1).
    sdedit   Meng et al. 2022: noise the image to t_0 = S T with q and denoise from there.
    ilvr     Choi et al. 2021: after every step the low frequencies of x_{t_prev} (`lowpass`:
             the mean over factor x factor blocks) are replaced by the reference's, noised to
             t_prev, so the sample's block means are the reference's at the end.

Images are (B, C, H, W) in [-1, 1]. `keep` masks are boolean, True where a pixel is known,
shaped (B, 1, H, W) or (B, C, H, W). `noise` draws standard normal noise of a shape, from a
stream apart from the sampler's own, so that an edit that keeps nothing walks as plain sampling.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ddpm_cli.diffusion.samplers import Edit, NoiseFn, q_jump
from ddpm_cli.diffusion.schedules import DiffusionTables

Pairs = list[tuple[int, int]]


def noised_to(tables: DiffusionTables, x0: torch.Tensor, t: int, z: torch.Tensor | None):
    """x_t ~ q(x_t | x_0) = sqrt(ab_t) x_0 + sqrt(1 - ab_t) z (eq. 4); x_0 itself at t = -1.
    The forward jump from t = -1, where alpha_bar is 1 (samplers.q_jump)."""
    return x0 if t < 0 else q_jump(tables, x0, -1, t, z)


def _draw(noise: NoiseFn, like: torch.Tensor) -> torch.Tensor:
    return noise(tuple(like.shape)).to(like.device, like.dtype)


# ---- inpainting (RePaint) ----------------------------------------------------------------------


def resample_pairs(pairs: Pairs, jump: int, resample: int) -> Pairs:
    """RePaint's walk over a sampler's descending `pairs`: at every `jump`-th timestep counted
    from the end, the finished sample included (RePaint counts from t = 0, one step earlier),
    jump back `jump` timesteps and walk down again, `resample - 1` times. A jump back is the
    pair (t, t_up) with t_up > t. resample 1 returns the pairs unchanged."""
    if jump < 1 or resample < 1:
        raise ValueError(f"jump and resample must be at least 1, got {jump} and {resample}")
    ts = [t for t, _ in pairs] + [pairs[-1][1]]
    last = len(ts) - 1
    walk, i, left = [0], 0, {}
    while i < last:
        i += 1
        walk.append(i)
        if resample > 1 and (last - i) % jump == 0 and i >= jump:
            left.setdefault(i, resample - 1)
            if left[i] > 0:
                left[i] -= 1
                i -= jump
                walk.append(i)
    return [(ts[a], ts[b]) for a, b in zip(walk[:-1], walk[1:], strict=True)]


def inpaint(
    tables: DiffusionTables,
    pairs: Pairs,
    known: torch.Tensor,
    keep: torch.Tensor,
    noise: NoiseFn,
    jump: int = 10,
    resample: int = 1,
) -> Edit:
    """Fill the pixels where `keep` is False so that they agree with `known` where it is True.

    After each step, x_{t_prev} takes the known pixels noised to t_prev, a fresh draw each
    time (RePaint eq. 8); at t_prev = -1 they are `known` exactly. The walk is the same for
    every image of a batch, whatever its mask (so an image does not depend on its batch):
    with resample 1 and nothing kept it is plain sampling.
    """
    keep = keep.to(device=known.device, dtype=torch.bool)
    pairs = resample_pairs(pairs, jump, resample)

    def project(x: torch.Tensor, t_prev: int) -> torch.Tensor:
        z = _draw(noise, known) if t_prev >= 0 else None
        return torch.where(keep, noised_to(tables, known, t_prev, z), x)

    return Edit(pairs=pairs, project=project, noise=noise)


def box_mask(height: int, width: int, box: tuple[int, int, int, int]) -> torch.Tensor:
    """A (1, H, W) keep mask: False inside box = (x0, y0, x1, y1), right and bottom exclusive
    (PIL's boxes), True elsewhere."""
    x0, y0, x1, y1 = box
    keep = torch.ones(1, height, width, dtype=torch.bool)
    keep[:, y0:y1, x0:x1] = False
    return keep


def outpaint_canvas(
    image: torch.Tensor, pad: tuple[int, int, int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, H, W) padded by (left, top, right, bottom) pixels: the canvas (padding 0, mid-grey)
    and its (1, H', W') keep mask, True on the image."""
    left, top, right, bottom = pad
    canvas = F.pad(image, (left, right, top, bottom), value=0.0)
    keep = F.pad(torch.ones(1, *image.shape[1:], dtype=torch.bool), (left, right, top, bottom))
    return canvas, keep


# ---- SDEdit --------------------------------------------------------------------------------------


def start_timestep(T: int, strength: float) -> int:
    """t_0 for strength S in (0, 1]: S T rounded, less one (zero-based), so S = 1 is T - 1."""
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    return min(T - 1, max(0, round(strength * T) - 1))


def sdedit(tables: DiffusionTables, pairs: Pairs, init: torch.Tensor, strength: float) -> Edit:
    """Start from `init` noised to t_0 = start_timestep(T, strength) and walk the sampler's
    timesteps below t_0. The noise is the walk's x_T itself, so a seed means the same noise.
    Strength 1 is ordinary sampling: the image is not used."""
    T = tables.timesteps
    t0 = start_timestep(T, strength)
    if strength == 1:
        return Edit(pairs=pairs)
    ts = [t0] + [t for t, _ in pairs if t < t0] + [-1]
    return Edit(
        pairs=[(ts[i], ts[i + 1]) for i in range(len(ts) - 1)],
        start=lambda x_T: noised_to(tables, init.to(x_T.device, x_T.dtype), t0, x_T),
    )


# ---- ILVR (super-resolution, guided variations) -------------------------------------------


def downsample(x: torch.Tensor, factor: int) -> torch.Tensor:
    """The mean of each factor x factor block: (B, C, H, W) -> (B, C, H/factor, W/factor)."""
    return F.avg_pool2d(x, factor) if factor > 1 else x


def upsample(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Each pixel repeated over a factor x factor block; downsample(upsample(y)) is y exactly."""
    return F.interpolate(x, scale_factor=factor, mode="nearest") if factor > 1 else x


def lowpass(x: torch.Tensor, factor: int) -> torch.Tensor:
    """phi_N of ILVR: the block means, spread back over their blocks (a projection)."""
    return upsample(downsample(x, factor), factor)


def match_block_means(
    x: torch.Tensor, small: torch.Tensor, factor: int, iterations: int = 50
) -> torch.Tensor:
    """The image nearest x (in L2) inside the data range [-1, 1] whose factor x factor block
    means are `small` (in [-1, 1]): clamp(x + c) with one shift c per block and channel (the
    projection's optimality conditions), c found by bisection, as the block mean grows with c."""
    small = small.to(x.dtype)
    bound = float(x.abs().amax()) + 1  # every pixel is at -1 below -bound, at 1 above bound
    lo, hi = torch.full_like(small, -bound), torch.full_like(small, bound)
    for _ in range(iterations):
        mid = (lo + hi) / 2
        low = downsample((x + upsample(mid, factor)).clamp(-1, 1), factor) < small
        lo, hi = torch.where(low, mid, lo), torch.where(low, hi, mid)
    return (x + upsample((lo + hi) / 2, factor)).clamp(-1, 1)


def ilvr(
    tables: DiffusionTables, pairs: Pairs, small: torch.Tensor, factor: int, noise: NoiseFn
) -> Edit:
    """Sample images whose factor x factor block means are `small` (B, C, H/N, W/N): after
    each step, x_{t_prev} - phi(x_{t_prev}) + phi(y_{t_prev}), with y_{t_prev} the upsampled
    `small` noised to t_prev at full size (ILVR's eq. 7). At the end, where that could leave
    the data range, the sample is projected onto the images in range with those block means
    (`match_block_means`), so clipping to [-1, 1] cannot move them."""
    reference = upsample(small, factor)

    def project(x: torch.Tensor, t_prev: int) -> torch.Tensor:
        if t_prev < 0:
            return match_block_means(x, small.to(x.device, x.dtype), factor)
        z = _draw(noise, x)
        y = noised_to(tables, reference.to(x.device, x.dtype), t_prev, z)
        return x - lowpass(x, factor) + lowpass(y, factor)

    return Edit(pairs=pairs, project=project, noise=noise)
