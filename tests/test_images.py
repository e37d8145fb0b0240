"""Image decoding across formats and modes, and the way back to the input's mode family."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import draw_shapes, png_bytes
from ddpm_cli.data.images import decode_image, encode_gif, hstack, labelled, to_8bit, to_pil
from ddpm_cli.errors import DataError


def roundtrip(img: Image.Image, fmt: str = "PNG", **kw):
    loaded = decode_image(png_bytes(img, fmt, **kw), "test")
    return loaded, to_pil(loaded.pixels, loaded.family, loaded.alpha)


def test_rgb_roundtrip_is_exact_and_scaled_to_unit_range():
    img = draw_shapes((37, 21))
    loaded, back = roundtrip(img)
    assert loaded.family == "RGB" and loaded.pixels.shape == (3, 21, 37)
    assert loaded.pixels.min() >= -1 and loaded.pixels.max() <= 1
    assert loaded.pixels.min() == -1 and loaded.size == (37, 21)
    assert back.mode == "RGB" and np.array_equal(np.asarray(back), np.asarray(img))


def test_grayscale_8_and_16_bit_keep_their_depth():
    gray = draw_shapes((20, 10), "L")
    loaded, back = roundtrip(gray)
    assert loaded.family == "L" and loaded.pixels.shape == (1, 10, 20)
    assert back.mode == "L" and np.array_equal(np.asarray(back), np.asarray(gray))

    ramp = (np.arange(16 * 16, dtype=np.uint16).reshape(16, 16) * 257).astype(np.uint16)
    ramp[0, 0], ramp[-1, -1] = 1, 65535  # values that 8 bits could not hold
    img16 = Image.fromarray(ramp)
    loaded, back = roundtrip(img16)
    assert loaded.family == "I;16"
    assert back.mode == "I;16" and np.array_equal(np.asarray(back), ramp)
    assert np.asarray(to_8bit(back)).dtype == np.uint8


def test_a_32_bit_integer_tiff_beyond_16_bits_is_clipped_with_a_note():
    """Pillow reads a 32-bit integer TIFF as mode "I"; ddpm holds gray at 16 bits, so values
    outside 0-65535 are clipped, and the note says so; one within that range reads exactly."""
    wide = np.array([[-5, 0, 1000], [65535, 70000, 200000]], dtype=np.int32)
    loaded, _ = roundtrip(Image.fromarray(wide, "I"), "TIFF")
    assert loaded.family == "I;16" and loaded.source_mode == "I"
    (note,) = [n for n in loaded.notes if "clipped" in n]
    assert note == "integer values -5 to 200000: clipped to 0-65535 (read as 16-bit grayscale)"
    want = (np.clip(wide, 0, 65535) / 65535.0 * 2 - 1).astype(np.float32)
    assert torch.equal(loaded.pixels[0], torch.from_numpy(want))
    narrow = np.array([[0, 300], [65535, 7]], dtype=np.int32)
    loaded, back = roundtrip(Image.fromarray(narrow, "I"), "TIFF")
    assert not any("clipped" in n for n in loaded.notes)
    assert np.array_equal(np.asarray(back), narrow)


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_is_kept_unchanged(mode):
    img = draw_shapes((16, 12)).convert(mode)
    alpha = Image.linear_gradient("L").resize((16, 12))
    img.putalpha(alpha)
    loaded, back = roundtrip(img)
    assert loaded.pixels.shape[0] == (3 if mode == "RGBA" else 1)
    assert any("alpha channel kept" in n for n in loaded.notes)
    assert back.mode == mode
    assert np.array_equal(np.asarray(back.getchannel("A")), np.asarray(alpha))
    assert np.array_equal(np.asarray(back), np.asarray(img))


def test_palette_and_bilevel_images_become_full_colour_or_gray():
    pal = draw_shapes((16, 16)).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    loaded, back = roundtrip(pal)
    assert loaded.family == "RGB" and back.mode == "RGB" and loaded.notes
    assert np.array_equal(np.asarray(back), np.asarray(pal.convert("RGB")))
    pal.info["transparency"] = 0
    loaded, back = roundtrip(pal, transparency=0)
    assert back.mode == "RGBA" and loaded.alpha is not None
    bilevel = draw_shapes((16, 16), "1")
    loaded, back = roundtrip(bilevel)
    assert back.mode == "L" and set(np.unique(np.asarray(back))) <= {0, 255}


@pytest.mark.parametrize(
    ("fmt", "mode", "lossy"),
    [
        ("JPEG", "RGB", True),
        ("JPEG", "CMYK", True),
        ("WEBP", "RGB", False),
        ("BMP", "RGB", False),
        ("TIFF", "RGB", False),
        ("TIFF", "I;16", False),
        ("JPEG", "L", True),
    ],
)
def test_formats(fmt, mode, lossy):
    img = draw_shapes((24, 16))
    img = img.convert("L").convert("I;16") if mode == "I;16" else img.convert(mode)
    kw = {"lossless": True} if fmt == "WEBP" else {}
    data = png_bytes(img, fmt, **kw)
    loaded = decode_image(data, f"x.{fmt.lower()}")
    assert loaded.size == (24, 16)
    got = np.asarray(to_pil(loaded.pixels, loaded.family))
    # exactly what Pillow itself decodes; and for lossless formats, the original pixels
    pillow = Image.open(io.BytesIO(data))
    pillow = pillow.convert("RGB") if mode == "CMYK" else pillow
    assert np.array_equal(got, np.asarray(pillow))
    if not lossy:
        assert np.array_equal(got, np.asarray(img))


def test_gif_uses_the_first_frame():
    red, blue = Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))
    data = png_bytes(red, "GIF", save_all=True, append_images=[blue])
    loaded = decode_image(data, "anim.gif")
    rgb = np.asarray(to_pil(loaded.pixels, loaded.family))
    assert tuple(rgb[0, 0]) == (255, 0, 0)


def test_exif_orientation_is_respected():
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.putpixel((0, 0), (255, 255, 255))  # marker at top-left of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    loaded = decode_image(png_bytes(img, "JPEG", exif=exif, quality=100), "r.jpg")
    assert loaded.size == (20, 40)
    shown = np.asarray(to_pil(loaded.pixels, loaded.family))
    assert shown[0, -1].mean() > 150 and shown[0, 0].mean() < 100  # marker now top-right


def test_size_resizes_the_shorter_side_and_center_crops():
    loaded = decode_image(png_bytes(draw_shapes((60, 40))), "x", size=32)
    assert loaded.pixels.shape == (3, 32, 32)
    img = draw_shapes((60, 40)).convert("RGBA")
    loaded = decode_image(png_bytes(img), "x", size=16)
    assert loaded.pixels.shape == (3, 16, 16) and loaded.alpha.shape == (16, 16)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "not an image"),
        (b"hello, I am text", "not an image"),
        (png_bytes(draw_shapes((64, 64)))[:200], "truncated"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 50, "not an image|corrupt"),
    ],
)
def test_bad_bytes_raise_data_errors(data, message):
    with pytest.raises(DataError, match=message) as err:
        decode_image(data, "bad.png")
    assert err.value.exit_code == 2


def test_decompression_bombs_are_refused(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(DataError, match="too large to decode safely"):
        decode_image(png_bytes(Image.new("L", (100, 100))), "bomb.png")


def test_float_images_are_refused_clearly():
    with pytest.raises(DataError, match="^f.tif: 32-bit float images are not supported"):
        decode_image(png_bytes(Image.new("F", (4, 4)), "TIFF"), "f.tif")


def test_labels_strips_and_gifs():
    cell = labelled(Image.new("RGB", (16, 16), (0, 0, 0)), "t=999")
    assert cell.width == 64 and cell.height > 64  # enlarged 4x so the label fits, plus a band
    band = np.asarray(cell)[64:]
    assert (band < 64).any() and (band == 255).any()  # dark text on white
    strip = hstack([cell, cell, cell])
    assert strip.size == (3 * 64 + 2 * 2, cell.height)
    other = labelled(Image.new("RGBA", (16, 16), (255, 0, 0, 128)), "t=0")
    gif = Image.open(io.BytesIO(encode_gif([cell, other, cell])))
    assert gif.n_frames == 3 and gif.info["loop"] == 0
    gif.seek(1)  # the half-transparent red frame is shown over white: pink
    r, g, b = gif.convert("RGB").getpixel((5, 5))
    assert r > 240 and 110 < g < 145 and 110 < b < 145


def test_quantization_clips_values_outside_the_unit_range():
    x = torch.tensor([[[-3.0, -1.0, 0.0, 1.0, 3.0]]])
    assert np.asarray(to_pil(x, "L")).tolist() == [[0, 0, 128, 255, 255]]


GRIDS = [(1, 1, 3), (5, 2, 1), (16, 4, 3), (7, 3, 4), (3, 8, 1)]  # images, per row, channels


@pytest.mark.parametrize("n, nrow, channels", GRIDS)
def test_grids_have_torchvisions_make_grid_layout(n, nrow, channels):
    """ddpm tiles its own grids (importing torchvision costs 2-3 s of start-up)."""
    from torchvision.utils import make_grid

    from ddpm_cli.generation.output import grid_image_rows, tile

    images = torch.rand(n, channels, 5, 7, generator=torch.Generator().manual_seed(n)) * 2 - 1
    expected = make_grid(images, nrow=nrow, padding=2, pad_value=1.0)
    ours = tile(images, nrow, padding=2, pad_value=1.0)
    assert torch.equal(ours, expected[:channels])  # make_grid turns one channel into three
    picture = grid_image_rows(images, nrow)
    assert picture.size == (expected.shape[2], expected.shape[1])
    assert picture.mode == {1: "L", 3: "RGB", 4: "RGBA"}[channels]
