"""Training data: image folders and the built-in dataset -> uint8 tensors -> batches in [-1, 1].

A folder is scanned recursively and every image decoded once, resized (shorter side) and
center-cropped, into one uint8 tensor of shape (N, C, H, W). Batches come from a seeded
permutation per epoch, so a run's data order is fixed by its seed and resumes exactly.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ddpm_cli.errors import DataError
from ddpm_cli.images import decode_image

EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
TINY_DATASET = 100  # below this many images a model mostly memorises its data
BUILTIN_PREFIX = "builtin:"


@dataclass
class DataReport:
    """The pre-flight report: what was found, what was skipped and why, what it costs."""

    source: str
    found: int = 0
    used: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    modes: Counter = field(default_factory=Counter)
    sizes: list[tuple[int, int]] = field(default_factory=list)  # (width, height) as found
    channels: int = 3
    image_size: tuple[int, int] = (32, 32)  # (height, width)
    bytes: int = 0  # memory of the decoded uint8 data

    @property
    def name(self) -> str:
        """A short name for run directories: the folder's or the built-in dataset's."""
        return Path(self.source.removeprefix(BUILTIN_PREFIX)).name or "run"

    @property
    def warnings(self) -> list[str]:
        out = []
        if self.used < TINY_DATASET:
            out.append(
                f"only {self.used} images: the model will mostly memorise them; "
                f"hundreds or thousands of images give more varied samples"
            )
        th, tw = self.image_size
        small = sum(1 for w, h in self.sizes if w < tw or h < th)
        if small:
            out.append(f"{small} images are smaller than {tw}x{th} and were upscaled")
        return out

    def summary(self) -> dict:
        ws = sorted(w for w, _ in self.sizes) or [0]
        hs = sorted(h for _, h in self.sizes) or [0]
        return {
            "source": self.source,
            "found": self.found,
            "used": self.used,
            "skipped": len(self.skipped),
            "modes": dict(self.modes),
            "min_size": [ws[0], hs[0]],
            "median_size": [ws[len(ws) // 2], hs[len(hs) // 2]],
            "max_size": [ws[-1], hs[-1]],
            "channels": self.channels,
            "image_size": list(self.image_size),
            "bytes": self.bytes,
        }


MEMORY_SHARE = 0.5  # decoded training data may take at most this share of available memory


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux MemAvailable), or None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def scan(folder: Path) -> list[Path]:
    """Image files under `folder`, recursively, in a stable order; hidden files are skipped."""
    folder = Path(folder)
    if not folder.exists():
        raise DataError(f"{folder}: no such directory")
    if not folder.is_dir():
        raise DataError(f"{folder}: not a directory; give a folder of images")
    return sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in EXTENSIONS
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def _to_channels(pixels: torch.Tensor, alpha: torch.Tensor | None, channels: int) -> torch.Tensor:
    """(C, H, W) in [-1, 1] with C = 1 or 3 -> `channels` channels (alpha appended for 4)."""
    if channels in (3, 4) and pixels.shape[0] == 1:
        pixels = pixels.expand(3, -1, -1)
    elif channels == 1 and pixels.shape[0] == 3:  # ITU-R 601 luma, as Pillow's convert("L")
        w = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
        pixels = (pixels * w).sum(0, keepdim=True)
    if channels == 4:
        a = torch.ones_like(pixels[:1]) if alpha is None else alpha[None].float() / 127.5 - 1
        pixels = torch.cat([pixels, a])
    return pixels


def load_folder(
    folder: Path, image_size: tuple[int, int], channels: int | None = None
) -> tuple[torch.Tensor, DataReport]:
    """Decode every image under `folder` into a uint8 tensor (N, C, height, width)."""
    paths = scan(folder)
    report = DataReport(source=str(folder), found=len(paths), image_size=image_size)
    need = len(paths) * (channels or 3) * image_size[0] * image_size[1]
    available = available_memory()
    if available is not None and need > MEMORY_SHARE * available:
        raise DataError(
            f"{folder}: {len(paths)} images at {image_size[1]}x{image_size[0]} need "
            f"{need / 2**30:.1f} GiB decoded, more than {MEMORY_SHARE:.0%} of the "
            f"{available / 2**30:.1f} GiB available; use a smaller --image-size or fewer images "
            "(streaming from disk is not supported yet)"
        )
    decoded = []
    for p in paths:
        try:
            img = decode_image(p.read_bytes(), str(p), size=image_size)
        except (DataError, OSError) as e:
            report.skipped.append((str(p), str(e)))
            continue
        report.modes[img.source_mode] += 1
        report.sizes.append(img.source_size)
        decoded.append(img)
    if not decoded:
        why = f"; e.g. {report.skipped[0][1]}" if report.skipped else ""
        raise DataError(f"{folder}: no readable images found (png, jpg, webp, bmp, tiff, gif){why}")
    if channels is None:
        channels = 1 if all(d.pixels.shape[0] == 1 for d in decoded) else 3
    report.channels = channels
    data = torch.stack([_to_uint8(_to_channels(d.pixels, d.alpha, channels)) for d in decoded])
    report.used = data.shape[0]
    report.bytes = data.numel()
    return data, report


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    """(C, H, W) in [-1, 1] -> uint8 (C, H, W), rounded."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def to_model_range(batch: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 in [-1, 1]."""
    return batch.float() / 127.5 - 1.0


class Batches:
    """Seeded epoch-by-epoch batches from a uint8 tensor, with random horizontal flips.

    The position (epoch, index of the next batch in the epoch) is all the state there is:
    `at(epoch, batch)` rebuilds the same order, so a resumed run sees the same data.
    """

    def __init__(self, data: torch.Tensor, batch_size: int, seed: int, flip: bool):
        if data.shape[0] == 0:
            raise DataError("no training images")
        self.data, self.batch_size, self.seed, self.flip = data, batch_size, seed, flip
        self.per_epoch = max(1, math.ceil(data.shape[0] / batch_size))

    def epoch_order(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The permutation and the flip decisions of one epoch, from (seed, epoch) alone."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        n = self.data.shape[0]
        order = torch.randperm(n, generator=g)
        flips = torch.rand(n, generator=g) < 0.5 if self.flip else torch.zeros(n, dtype=torch.bool)
        return order, flips

    def batch(self, epoch: int, index: int) -> torch.Tensor:
        """Batch `index` of `epoch` as uint8 (B, C, H, W); the last batch of an epoch may be
        short, and a dataset smaller than the batch repeats within the batch."""
        order, flips = self.epoch_order(epoch)
        n = self.data.shape[0]
        if n < self.batch_size:  # tiny datasets: fill the batch by cycling the permutation
            idx = order.repeat(math.ceil(self.batch_size / n))[: self.batch_size]
            fl = flips.repeat(math.ceil(self.batch_size / n))[: self.batch_size]
        else:
            sl = slice(index * self.batch_size, (index + 1) * self.batch_size)
            idx, fl = order[sl], flips[sl]
        x = self.data[idx]
        if fl.any():
            x = x.clone()
            x[fl] = x[fl].flip(-1)
        return x


def load_source(
    source: str | None,
    image_size: tuple[int, int],
    channels: int | None,
    cache: Path | None = None,
) -> tuple[torch.Tensor, DataReport]:
    """Training images for a source: a folder, "builtin:NAME", or None (the default built-in).

    With `cache` (a run's data_cache.safetensors) present, the images stored there are used, so a
    resumed run trains on exactly the data it started with.
    """
    from ddpm_cli import builtin
    from ddpm_cli.checkpoint import load_checkpoint

    if cache is not None and cache.exists():
        ckpt = load_checkpoint(cache, kind="data_cache")
        data = ckpt.tensors["images"]
        summary = ckpt.config.get("data", {})
        report = DataReport(
            source=summary.get("source", str(source)),
            found=data.shape[0],
            used=data.shape[0],
            channels=data.shape[1],
            image_size=tuple(data.shape[-2:]),
            bytes=data.numel(),
        )
        report.modes.update(summary.get("modes", {}))
        return data, report
    if source is None or source.startswith(BUILTIN_PREFIX):
        name = builtin.DEFAULT if source is None else source[len(BUILTIN_PREFIX) :]
        if name not in builtin.DATASETS:
            known = ", ".join(f"{BUILTIN_PREFIX}{k}" for k in builtin.DATASETS)
            raise DataError(f"unknown built-in dataset {name!r}; choose one of: {known}")
        if image_size[0] != image_size[1]:
            raise DataError("built-in datasets are square: use --image-size N")
        data = builtin.DATASETS[name](size=image_size[0])
        if channels is not None and channels != data.shape[1]:
            data = torch.stack(
                [_to_uint8(_to_channels(to_model_range(d), None, channels)) for d in data]
            )
        report = DataReport(
            source=f"{BUILTIN_PREFIX}{name}",
            found=data.shape[0],
            used=data.shape[0],
            channels=data.shape[1],
            image_size=image_size,
            bytes=data.numel(),
        )
        report.modes["RGB"] = data.shape[0]
        report.sizes = [(image_size[1], image_size[0])] * data.shape[0]
        return data, report
    return load_folder(Path(source), image_size, channels)
