"""The `ddpm noise` job: decode an image, run the forward process on it, encode the result.

No printing here: the result carries the encoded bytes, the per-t statistics and notes, and the
command line decides what to show.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import torch
from PIL import Image

from ddpm_cli.data.images import (
    decode_image,
    encode_gif,
    encode_png,
    hstack,
    labelled,
    to_8bit,
    to_pil,
)
from ddpm_cli.device import available_memory, make_generator, new_seed, randn, resolve_device
from ddpm_cli.diffusion.preview import chain, frame_times, noised, step_stats
from ddpm_cli.diffusion.schedules import DiffusionTables
from ddpm_cli.errors import ConfigError, DataError
from ddpm_cli.noise_config import NoiseConfig

REPORT_POINTS = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)  # default strip: fractions of T


def parse_timesteps(text: str | None, T: int) -> tuple[int, ...]:
    """'500' or '0,100,250' -> (0, 100, 250). None gives the default strip for this T.

    Only the syntax is checked here; NoiseConfig checks the range.
    """
    if text is None:
        return tuple(sorted({min(round(f * T), T - 1) for f in REPORT_POINTS}))
    ts = []
    for part in text.split(","):
        part = part.strip()
        try:
            ts.append(int(part))
        except ValueError:
            raise ConfigError(
                f"--t expects integers like 500 or 0,100,250,500,999; got {text!r}"
            ) from None
    return tuple(ts)


@dataclass(frozen=True)
class NoiseResult:
    data: bytes  # encoded PNG or GIF
    kind: str  # "image", "strip" or "gif"
    size: tuple[int, int]  # (width, height) of the image that was noised
    mode: str  # image family written: "L", "I;16" or "RGB" (+ alpha when kept)
    seed: int
    device: str
    stats: list[dict]  # step_stats for the reported timesteps
    notes: tuple[str, ...]


# bytes per pixel and channel that previewing at full size needs: the decode in float64, the
# image, its noise and each panel in float32, the 8-bit panels and the strip they are joined in
BYTES_PER_VALUE = 8 + 4 * 2
BYTES_PER_PANEL_VALUE = 4 + 2


def check_memory(data: bytes, name: str, config: NoiseConfig) -> None:
    """Refuse, before decoding, an image too large to preview in the memory there is (Pillow's
    bomb limit allows 179 million pixels: tens of GiB here), and say to pass --size."""
    try:
        header = Image.open(io.BytesIO(data))  # the header only
        width, height = header.size
        channels = 4 if header.mode == "P" else len(header.getbands())
    except Exception:  # decode_image reports what is wrong with it
        return
    side = config.size
    pixels = width * height if side is None else side * side
    panels = config.frames if config.gif else len(config.ts or REPORT_POINTS)
    need = (pixels * channels * (BYTES_PER_VALUE + panels * BYTES_PER_PANEL_VALUE)
            + width * height * channels)  # fmt: skip
    have = available_memory()
    if have is not None and need > 0.8 * have:
        hint = "pass --size N to shrink it first" if side is None else "pass a smaller --size"
        raise DataError(
            f"{name}: a {width}x{height} image: previewing it"
            f"{'' if side is None else f' at --size {side}'} needs about "
            f"{need / 2**30:.1f} GiB, more than the {have / 2**30:.1f} GiB available; {hint}"
        )


def run_noise(data: bytes, name: str, config: NoiseConfig) -> NoiseResult:
    """Noise the image in `data` as `config` asks; see NoiseResult."""
    check_memory(data, name, config)
    device = resolve_device(config.device)
    image = decode_image(data, name, size=config.size)
    tables64 = DiffusionTables.from_config(config.diffusion)
    tables = tables64.to(device, torch.float32)
    seed = new_seed() if config.seed is None else config.seed
    generator = make_generator(seed)
    x0 = image.pixels.to(device)
    T = config.diffusion.timesteps
    ts = config.ts or parse_timesteps(None, T)
    notes = list(image.notes)
    mode = image.family + ("+alpha" if image.alpha is not None else "")

    if config.gif:
        keep = frame_times(T, config.frames)
        if len(keep) < config.frames:
            notes.append(f"T={T} has only {T} timesteps: the animation has {len(keep)} frames")
        frames = [
            labelled(to_8bit(to_pil(x, image.family, image.alpha)), f"t={t}")
            for t, x in chain(tables, x0, keep, generator)
        ]
        if image.alpha is not None:
            notes.append("GIF has no partial transparency: frames are shown over white")
        kind, encoded, report_ts = "gif", encode_gif(frames), parse_timesteps(None, T)
    else:
        eps = randn(tuple(x0.shape), generator, device=device)
        xs = noised(tables, x0, ts, eps)
        if len(ts) == 1:
            kind, encoded = "image", encode_png(to_pil(xs[0], image.family, image.alpha))
        else:
            cells = [
                labelled(to_8bit(to_pil(x, image.family, image.alpha)), f"t={t}")
                for t, x in zip(ts, xs, strict=True)
            ]
            kind, encoded = "strip", encode_png(hstack(cells))
        report_ts = ts
    return NoiseResult(
        data=encoded,
        kind=kind,
        size=image.size,
        mode=mode,
        seed=seed,
        device=str(device),
        stats=step_stats(tables64, report_ts),
        notes=tuple(notes),
    )
