"""Images in and out: PIL <-> tensors in [-1, 1], labelled strips and GIF animations.

Loading normalises every Pillow mode to one of three families, which outputs keep:
8-bit grayscale ("L"), 16-bit grayscale ("I;16") and 8-bit colour ("RGB"). An alpha channel is
kept apart, unchanged, and put back on output; the diffusion acts on the colour channels only.
Training images are matted instead (`matte=True`): drawn over white, what the colour under a
transparent pixel holds (often black, or leftovers of an editor) never reaches the model.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps, PngImagePlugin, UnidentifiedImageError

from ddpm_cli.errors import DataError
from ddpm_cli.text import shown

GRAY8, GRAY16, RGB = "L", "I;16", "RGB"
_MAX = {GRAY8: 255.0, GRAY16: 65535.0, RGB: 255.0}
MIN_LABELLED_WIDTH = 64  # frames narrower than this are enlarged in strips so labels fit
WHITE = {"L": 255, "LA": (255, 255), "RGB": (255, 255, 255), "RGBA": (255, 255, 255, 255)}
BLACK = {"L": 0, "LA": (0, 255), "RGB": (0, 0, 0), "RGBA": (0, 0, 0, 255)}


@dataclass(frozen=True)
class LoadedImage:
    """An image ready for diffusion.

    pixels: (C, H, W) float32 in [-1, 1], C = 1 or 3. alpha: (H, W) uint8 or None.
    family: "L", "I;16" or "RGB", the kind of image written back. notes: what loading changed.
    """

    pixels: torch.Tensor
    alpha: torch.Tensor | None
    family: str
    source_mode: str
    notes: tuple[str, ...] = field(default_factory=tuple)
    source_size: tuple[int, int] = (0, 0)  # (width, height) before any resize
    matted: bool = False  # an alpha channel was drawn over white (decode_image's matte)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height), as Pillow reports sizes."""
        return self.pixels.shape[2], self.pixels.shape[1]


MAX_STRIP_CELL_HEIGHT = 4096  # enlarging a thin image for its label stops here


def _rawmode(img: Image.Image) -> str:
    """How the file stores pixels ("RGB;16B" for 16-bit colour PNG), before Pillow converts."""
    try:
        args = img.tile[0][3] if img.tile else ""
        return args if isinstance(args, str) else str(args[0] if args else "")
    except (IndexError, TypeError):
        return ""


def _open(data: bytes, name: str) -> tuple[Image.Image, list[str]]:
    notes = []
    try:
        img = Image.open(io.BytesIO(data))
        if getattr(img, "n_frames", 1) > 1:
            notes.append(f"{img.n_frames} frames: using the first")
        img.seek(0)  # animated GIF / multi-page TIFF: the first frame
        raw = _rawmode(img)
        img.load()
    except Image.DecompressionBombError:
        raise DataError(
            f"{name}: image is too large to decode safely (over {Image.MAX_IMAGE_PIXELS:,} pixels)"
        ) from None
    except UnidentifiedImageError:
        raise DataError(
            f"{name}: not an image Pillow can read (PNG, JPEG, WebP, BMP, TIFF, GIF)"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise DataError(f"{name}: corrupt or truncated image ({e})") from None
    if img.width == 0 or img.height == 0:
        raise DataError(f"{name}: image has no pixels ({img.width}x{img.height})")
    if raw.startswith("LA;16") and img.mode == "RGBA":
        # Pillow widens 16-bit gray+alpha to RGBA; it is gray, so keep it gray
        img = img.convert("LA")
        notes.append("16-bit gray+alpha: read at 8 bits (Pillow cannot hold 16-bit with alpha)")
    elif raw.startswith(("RGB;16", "RGBA;16")):
        notes.append("16-bit colour: read at 8 bits per channel (Pillow holds colour at 8 bits)")
    return img, notes


ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")


def has_alpha(img: Image.Image) -> bool:
    """Whether an opened image carries transparency that loading keeps: an alpha band, or a
    palette with a transparent index (known from the header, before decoding)."""
    return img.mode in ALPHA_MODES or (img.mode == "P" and "transparency" in img.info)


def _normalise(img: Image.Image, name: str) -> tuple[Image.Image, Image.Image | None, str,
                                                      list[str]]:  # fmt: skip
    """Split an image (`name` in messages) into (colour image, alpha or None, family, notes)."""
    mode, notes = img.mode, []
    if mode == "P" or mode == "PA":
        img = img.convert("RGBA" if has_alpha(img) else "RGB")
        notes.append("palette image: written as full colour (a palette cannot hold noise)")
    elif mode in ("CMYK", "YCbCr", "LAB", "HSV", "RGBX"):
        img = img.convert("RGB")
        notes.append(f"{mode} image: converted to RGB")
    elif mode == "1":
        img = img.convert("L")
        notes.append("1-bit image: written as 8-bit grayscale")
    elif mode in ("La", "RGBa"):
        img = img.convert(mode.upper())
    elif mode.startswith("I"):
        # 16-bit grayscale (PNG, TIFF) arrives as "I;16*" or as 32-bit "I" holding 0..65535
        img = img.convert("I") if mode != "I" else img
        lo, hi = img.getextrema()
        if lo < 0 or hi > 65535:  # 32-bit or signed integers: more than 16 bits of gray hold
            notes.append(f"integer values {lo} to {hi}: clipped to 0-65535 (read as 16-bit "
                         "grayscale)")  # fmt: skip
        return img, None, GRAY16, notes
    elif mode == "F":
        raise DataError(f"{name}: 32-bit float images are not supported; save it as 8- or "
                        "16-bit")  # fmt: skip

    alpha = None
    if img.mode in ("LA", "RGBA"):
        alpha = img.getchannel("A")
        img = img.convert(img.mode[:-1])
        notes.append("alpha channel kept unchanged; noise is added to the colour channels only")
    if img.mode not in (GRAY8, RGB):
        raise DataError(f"{name}: unsupported image mode {mode!r}")
    return img, alpha, img.mode, notes


def _resize_crop(img: Image.Image, size: int | tuple[int, int]) -> Image.Image:
    """Resize to cover `size` (an int: square; else (height, width)), then center-crop to it."""
    th, tw = (size, size) if isinstance(size, int) else size
    scale = max(tw / img.width, th / img.height)
    w, h = max(tw, round(img.width * scale)), max(th, round(img.height * scale))
    img = img.resize((w, h), Image.Resampling.BICUBIC)
    left, top = (w - tw) // 2, (h - th) // 2
    return img.crop((left, top, left + tw, top + th))


def matted(colour: Image.Image, alpha: Image.Image) -> Image.Image:
    """`colour` drawn over white through `alpha`, at full size (resizing the colour and the
    alpha apart first would bleed the hidden colour into the edges)."""
    canvas = Image.new(colour.mode, colour.size, WHITE[colour.mode])
    canvas.paste(colour, mask=alpha)
    return canvas


def decode_image(
    data: bytes, name: str = "image", size: int | tuple[int, int] | None = None,
    matte: bool = False,
) -> LoadedImage:  # fmt: skip
    """Decode image bytes: EXIF orientation applied, first frame, mode normalised, optional crop.
    With `matte`, an alpha channel is drawn over white and dropped (for training)."""
    img, open_notes = _open(data, name)
    source_mode = img.mode
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # a broken EXIF block should not make a readable image unusable
        pass
    colour, alpha, family, notes = _normalise(img, name)
    notes = open_notes + notes
    source_size = colour.size
    had_alpha = matte and alpha is not None
    if had_alpha:
        colour, alpha = matted(colour, alpha), None
        notes = [n for n in notes if not n.startswith("alpha")] + ["transparency drawn on white"]
    if size is not None:
        colour = _resize_crop(colour, size)
        alpha = _resize_crop(alpha, size) if alpha is not None else None
    arr = np.asarray(colour, dtype=np.float64)
    if family == GRAY16:
        arr = np.clip(arr, 0, 65535)
    arr = arr.reshape(colour.height, colour.width, -1) / _MAX[family]
    pixels = torch.from_numpy(arr * 2.0 - 1.0).permute(2, 0, 1).to(torch.float32).contiguous()
    alpha_t = torch.from_numpy(np.array(alpha, dtype=np.uint8)) if alpha is not None else None
    return LoadedImage(pixels, alpha_t, family, source_mode, tuple(notes), source_size, had_alpha)


def quantize(x: torch.Tensor, family: str) -> np.ndarray:
    """(C, H, W) values in [-1, 1] -> (H, W[, C]) integers at the family's bit depth (clipped)."""
    maxval = _MAX[family]
    q = ((x.detach().double().cpu().clamp(-1, 1) + 1.0) / 2.0 * maxval).round()
    arr = q.permute(1, 2, 0).numpy()
    arr = arr[..., 0] if arr.shape[2] == 1 else arr
    return arr.astype(np.uint16 if family == GRAY16 else np.uint8)


def to_pil(x: torch.Tensor, family: str, alpha: torch.Tensor | None = None) -> Image.Image:
    """A (C, H, W) tensor in [-1, 1] as a Pillow image of `family`, with `alpha` put back."""
    arr = quantize(x, family)
    if family == GRAY16:
        img = Image.fromarray(arr)
        img = img if img.mode == GRAY16 else img.convert(GRAY16)
    else:
        img = Image.fromarray(arr)
    if alpha is not None:
        img = img.convert("LA" if family != RGB else "RGBA")
        img.putalpha(Image.fromarray(alpha.cpu().numpy().astype(np.uint8)))
    return img


def to_8bit(img: Image.Image) -> Image.Image:
    """16-bit grayscale reduced to 8 bits (for strips and GIFs); other images unchanged."""
    if img.mode in ("I;16", "I"):
        arr = np.asarray(img, dtype=np.float64)
        return Image.fromarray(np.clip(np.round(arr / 257.0), 0, 255).astype(np.uint8))
    return img


def encode_png(img: Image.Image, text: dict[str, str] | None = None) -> bytes:
    """PNG bytes, with `text` as tEXt chunks (provenance) when given; a value that holds bytes
    that were not UTF-8 (a class named after such a folder) is stored with them escaped."""
    info = PngImagePlugin.PngInfo()
    for k, v in (text or {}).items():
        info.add_text(k, shown(v))
    buf = io.BytesIO()
    img.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def labelled(img: Image.Image, label: str, min_width: int = MIN_LABELLED_WIDTH) -> Image.Image:
    """`img` (8-bit) enlarged by a whole factor to at least `min_width`, above a `label` band."""
    factor = max(1, min(-(-min_width // img.width), MAX_STRIP_CELL_HEIGHT // img.height))
    if factor > 1:
        img = img.resize((img.width * factor, img.height * factor), Image.Resampling.NEAREST)
    font = _font(max(10, min(32, img.width // 6)))
    draw_probe = ImageDraw.Draw(Image.new("L", (1, 1)))
    left, top, right, bottom = draw_probe.textbbox((0, 0), label, font=font)
    band = bottom - top + 8
    mode = img.mode if img.mode in ("L", "LA", "RGB", "RGBA") else "RGB"
    cell = Image.new(mode, (img.width, img.height + band), WHITE[mode])
    cell.paste(img.convert(mode), (0, 0))
    draw = ImageDraw.Draw(cell)
    x = (img.width - (right - left)) // 2 - left
    draw.text((x, img.height + 4 - top), label, fill=BLACK[mode], font=font)
    return cell


def hstack(cells: list[Image.Image], gap: int = 2) -> Image.Image:
    """Cells side by side on white, `gap` pixels apart (cells share one mode and height)."""
    mode = cells[0].mode
    width = sum(c.width for c in cells) + gap * (len(cells) - 1)
    strip = Image.new(mode, (width, max(c.height for c in cells)), WHITE[mode])
    x = 0
    for c in cells:
        strip.paste(c, (x, 0))
        x += c.width + gap
    return strip


def encode_gif(frames: list[Image.Image], frame_ms: int = 80, hold_ms: int = 1000) -> bytes:
    """An endlessly looping GIF; the first and last frames are held for `hold_ms`.

    GIF has no partial transparency, so alpha is dropped (composited over white).
    """
    flat = []
    for f in frames:
        if f.mode in ("LA", "RGBA"):
            bg = Image.new(f.mode[:-1], f.size, WHITE[f.mode[:-1]])
            bg.paste(f, (0, 0), f.getchannel("A"))
            f = bg
        flat.append(f)
    durations = [frame_ms] * len(flat)
    durations[0] = durations[-1] = hold_ms
    buf = io.BytesIO()
    flat[0].save(
        buf, format="GIF", save_all=True, append_images=flat[1:], duration=durations, loop=0
    )
    return buf.getvalue()
