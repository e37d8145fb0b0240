"""Built-in datasets, generated deterministically (never downloaded).

`shapes`: one bright circle, square or triangle on a dark plain background, at a random place,
size and colour, labelled by its shape (three classes). Simple enough that a small model learns
it in minutes on a laptop CPU, varied enough that a person can tell learned samples (clean
shapes on flat backgrounds) from noise.
"""

from __future__ import annotations

import colorsys
import random

import torch
from PIL import Image, ImageDraw

SUPERSAMPLE = 4  # shapes are drawn 4x larger and downscaled, for smooth (learnable) edges


CLASSES = ("circle", "square", "triangle")


def _shape_image(rng: random.Random, size: int) -> tuple[Image.Image, int]:
    s = size * SUPERSAMPLE
    bg = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.3, 0.8), rng.uniform(0.1, 0.3))
    fg = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.6, 1.0), rng.uniform(0.8, 1.0))
    img = Image.new("RGB", (s, s), tuple(int(255 * c) for c in bg))
    d = ImageDraw.Draw(img)
    r = rng.uniform(0.18, 0.32) * s  # half the shape's extent
    cx, cy = rng.uniform(r, s - r), rng.uniform(r, s - r)
    fill = tuple(int(255 * c) for c in fg)
    kind = rng.randrange(3)
    if kind == 0:
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif kind == 1:
        a = r * 0.85
        d.rectangle((cx - a, cy - a, cx + a, cy + a), fill=fill)
    else:
        d.polygon([(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)], fill=fill)
    return img.resize((size, size), Image.Resampling.LANCZOS), kind


def shapes(n: int = 4096, size: int = 32, seed: int = 0):
    """n images (n, 3, size, size) uint8, their labels (n,) and the class names, the same for
    the same arguments on every machine."""
    rng = random.Random(seed)
    out = torch.empty((n, 3, size, size), dtype=torch.uint8)
    labels = torch.empty(n, dtype=torch.long)
    for i in range(n):
        img, labels[i] = _shape_image(rng, size)
        out[i] = (
            torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
            .view(size, size, 3)
            .permute(2, 0, 1)
        )
    return out, labels, list(CLASSES)


DATASETS = {"shapes": shapes}
DEFAULT = "shapes"
