"""Real-image datasets for benchmarks/realdata.py, made from photographs that scikit-image ships
with the package (nothing is downloaded).

Each dataset has a training folder of PNGs (what `ddpm train` and the peer script read), a
held-out set of real images that no model trains on (what samples are measured against), and a
labelled pool of real images (disjoint draws) on which realfeatures.py trains the feature
network that the distances are measured in.

- faces:    the 100 face photographs of `skimage.data.lfw_subset()` (25x25 grayscale), four
            24x24 crops of each (one-pixel shifts) resized to 32x32: 70 people train (280
            images), 30 are held out (120 images). A small set, like many users' own folders.
- faces8:   the same faces at 8x8.
- faces24:  the same faces at 24x24, the size ddpm trains 25x25 images at (no resize): a size
            that is not a power of two.
- photos:   32x32 RGB crops of eight colour photographs (astronaut, coffee, chelsea, rocket,
            hubble_deep_field, immunohistochemistry, retina, the left stereo_motorcycle view),
            each crop a random square of 64 pixels up to the photograph's shorter side, shrunk
            to 32x32: 2,000 to train on, 500 held out (independent draws).
- sources:  the labelled set: 32x32 grayscale crops of five photographs (astronaut, camera,
            chelsea, coffee, rocket) in one subfolder per photograph, so `ddpm train` makes a
            class-conditional model: 300 per class to train on, 100 per class held out.
- sources10: the same with ten photographs (the five, brick, grass, gravel, moon, coins): does
            what suits five classes carry to more?
- sources8: the five classes at 8x8, where a class is little more than its tones.
- sources10at8: the ten classes at 8x8: many classes in few pixels.
- sources2, sources2at8: two of the five (astronaut, camera: both people, in a grayscale
            crop much alike), at 32x32 and 8x8: how the guidance suits few classes.
- sources10at28: the ten classes at 28x28 (the size of many digit and clothing sets).
- photos28: the colour crops at 28x28.

Everything is drawn from fixed seeds: the same images on every machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

RGB_SOURCES = (
    "astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
    "retina", "stereo_motorcycle",
)  # fmt: skip
LABELLED_SOURCES = ("astronaut", "camera", "chelsea", "coffee", "rocket")
# ten classes, to check that what suits five carries to more: the five, and five more
TEN_SOURCES = (*LABELLED_SOURCES, "brick", "grass", "gravel", "moon", "coins")
# two classes that a crop tells apart less easily than five distinct photographs
TWO_SOURCES = ("astronaut", "camera")
# grayscale distractors for the faces' feature network: it must tell faces from these
GRAY_SOURCES = ("camera", "brick", "grass", "gravel", "moon", "coins", "clock", "astronaut")


@dataclass
class RealSet:
    """One dataset: `train` (N, C, H, W) uint8 written to `folder` for training, `held_out`
    (M, C, H, W) uint8 real images nobody trains on, and a labelled pool (`pool`, `pool_labels`)
    for the feature network. `classes`: the class names of a labelled training set (its
    `train_labels` index them), empty for an unconditional one."""

    name: str
    train: torch.Tensor
    held_out: torch.Tensor
    pool: torch.Tensor
    pool_labels: torch.Tensor
    pool_classes: tuple[str, ...]
    classes: tuple[str, ...] = ()
    train_labels: torch.Tensor | None = None
    held_out_labels: torch.Tensor | None = None

    @property
    def image_size(self) -> int:
        return self.train.shape[-1]

    @property
    def channels(self) -> int:
        return self.train.shape[1]

    def write(self, folder: Path) -> Path:
        """The training images as PNGs (in one subfolder per class for a labelled set); kept
        when the folder already holds them."""
        done = folder / ".complete"
        if done.exists():
            return folder
        folder.mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(self.train):
            sub = folder / self.classes[int(self.train_labels[i])] if self.classes else folder
            sub.mkdir(exist_ok=True)
            to_pil(img).save(sub / f"{i:05d}.png")
        done.touch()
        return folder


def to_pil(img: torch.Tensor) -> Image.Image:
    arr = img.permute(1, 2, 0).numpy()
    return Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr)


def _photo(name: str, gray: bool) -> np.ndarray:
    import skimage.data

    img = getattr(skimage.data, name)()
    if isinstance(img, tuple):  # stereo_motorcycle: (left, right, disparity)
        img = img[0]
    img = np.asarray(img)
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    img = img[..., :3]
    if gray:
        img = np.asarray(Image.fromarray(img).convert("L"))[..., None]
    return img


def random_crops(
    names: tuple[str, ...], n: int, size: int, gray: bool, seed: int, min_side: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """n crops (uint8 (n, C, size, size)) and their source index: a source at random, a square
    of min_side up to its shorter side at a random place, shrunk to size x size (antialiased)."""
    rng = np.random.default_rng(seed)
    photos = [_photo(name, gray) for name in names]
    out = np.empty((n, size, size, photos[0].shape[2]), np.uint8)
    labels = rng.integers(0, len(names), n)
    for i, k in enumerate(labels):
        img = photos[k]
        h, w = img.shape[:2]
        side = int(rng.integers(min_side, min(h, w) + 1))
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = Image.fromarray(img[y : y + side, x : x + side].squeeze(2) if gray else
                               img[y : y + side, x : x + side])  # fmt: skip
        crop = np.asarray(crop.resize((size, size), Image.Resampling.LANCZOS))
        out[i] = crop[..., None] if gray else crop
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels)


def _faces(size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train, held_out, non_faces) at size x size, uint8 (N, 1, size, size)."""
    import skimage.data

    lfw = (skimage.data.lfw_subset() * 255).round().astype(np.uint8)  # 100 faces, 100 not
    order = np.random.default_rng(0).permutation(100)

    def crops(images: np.ndarray) -> torch.Tensor:
        out = []
        for img in images:
            for dy in (0, 1):
                for dx in (0, 1):
                    pil = Image.fromarray(img[dy : dy + 24, dx : dx + 24])
                    out.append(np.asarray(pil.resize((size, size), Image.Resampling.LANCZOS)))
        return torch.from_numpy(np.stack(out))[:, None]

    faces = lfw[:100][order]
    return crops(faces[:70]), crops(faces[70:]), crops(lfw[100:])


def faces(size: int = 32, name: str = "faces") -> RealSet:
    train, held_out, non_faces = _faces(size)
    others, other_labels = random_crops(GRAY_SOURCES, 1600, size, True, seed=11, min_side=32)
    pool = torch.cat([train, non_faces, others])
    labels = torch.cat([
        torch.zeros(len(train), dtype=torch.long),
        torch.ones(len(non_faces), dtype=torch.long),
        other_labels + 2,
    ])  # fmt: skip
    return RealSet(name, train, held_out, pool, labels, ("face", "non-face", *GRAY_SOURCES))


def photos(size: int = 32, name: str = "photos") -> RealSet:
    train, _ = random_crops(RGB_SOURCES, 2000, size, False, seed=1)
    held_out, _ = random_crops(RGB_SOURCES, 500, size, False, seed=2)
    pool, labels = random_crops(RGB_SOURCES, 4000, size, False, seed=3)
    return RealSet(name, train, held_out, pool, labels, RGB_SOURCES)


def sources(
    size: int = 32, names: tuple[str, ...] = LABELLED_SOURCES, name: str = "sources"
) -> RealSet:
    k = len(names)
    train, train_labels = _balanced(names, 300 * k, size, seed=4)
    held_out, held_labels = _balanced(names, 100 * k, size, seed=5)
    pool, labels = _balanced(names, 600 * k, size, seed=6)
    return RealSet(
        name, train, held_out, pool, labels, names,
        classes=names, train_labels=train_labels, held_out_labels=held_labels,
    )  # fmt: skip


def _balanced(
    names: tuple[str, ...], n: int, size: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """n grayscale crops of `names`, the same number from each, sorted by class."""
    k = len(names)
    parts = [random_crops((name,), n // k, size, True, seed * 100 + i, min_side=96)[0]
             for i, name in enumerate(names)]  # fmt: skip
    labels = torch.arange(k).repeat_interleave(n // k)
    return torch.cat(parts), labels


DATASETS = {
    "faces": lambda: faces(32),
    "faces8": lambda: faces(8, "faces8"),
    "faces24": lambda: faces(24, "faces24"),
    "photos": photos,
    "sources": sources,
    "sources10": lambda: sources(32, TEN_SOURCES, "sources10"),
    "sources8": lambda: sources(8, LABELLED_SOURCES, "sources8"),
    "sources10at8": lambda: sources(8, TEN_SOURCES, "sources10at8"),
    "sources2": lambda: sources(32, TWO_SOURCES, "sources2"),
    "sources2at8": lambda: sources(8, TWO_SOURCES, "sources2at8"),
    "sources10at28": lambda: sources(28, TEN_SOURCES, "sources10at28"),
    "photos28": lambda: photos(28, "photos28"),
}
