"""Training data: image folders, the built-in dataset and data caches -> uint8 images.

A folder is scanned recursively. When its decoded images fit in memory, every image is decoded
once, resized (shorter side) and center-cropped, into one uint8 tensor (N, C, H, W): `InMemory`.
Otherwise (or with stream=True) images stay on disk, decoded per batch by DataLoader workers:
`OnDisk`. batches.py turns either into the seeded batches of a run; sources.py adds the
built-in dataset and data caches.

A folder whose images all sit in two or more subfolders (torchvision's ImageFolder layout,
DIR/cat/*.png, DIR/dog/*.png) is labelled: the subfolder is the image's class, classes in
sorted name order. Both kinds of data then carry `labels`.
"""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from ddpm_cli.data.images import decode_image, has_alpha
from ddpm_cli.data.search import (
    class_labels,
    fingerprint,
    loose_beside_classes,
    scan,
    unreadable,
)
from ddpm_cli.device import available_memory
from ddpm_cli.errors import DataError
from ddpm_cli.text import count

TINY_DATASET = 100  # below this many images a model mostly memorises its data
IMBALANCE = 10  # warn when the largest class has this many times the images of the smallest
BUILTIN_PREFIX = "builtin:"


@dataclass
class DataReport:
    """The pre-flight report: what was found, what was skipped and why, what it costs."""

    source: str
    found: int = 0
    used: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    # what the search of a folder could not enter, or entered elsewhere (search.scan)
    unsearched: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    modes: Counter = field(default_factory=Counter)
    sizes: list[tuple[int, int]] = field(default_factory=list)  # (width, height) as found
    channels: int = 3
    image_size: tuple[int, int] = (32, 32)  # (height, width)
    bytes: int = 0  # memory of the decoded uint8 data
    fingerprint: str | None = None  # hash of the folder's file names and sizes (folders only)
    streamed: bool = False  # decoded batch by batch from disk rather than held in memory
    stored: dict | None = None  # the summary a data cache was saved with (sizes are not kept)
    classes: list[str] = field(default_factory=list)  # class names, in label order
    class_counts: list[int] = field(default_factory=list)  # images per class, as used
    matted: int = 0  # images with an alpha channel, drawn over white (images.matted)
    loose: list[str] = field(default_factory=list)  # images beside class subfolders

    @property
    def name(self) -> str:
        """A short name for run directories: the folder's or the built-in dataset's."""
        return Path(self.source.removeprefix(BUILTIN_PREFIX)).name or "run"

    @property
    def warnings(self) -> list[str]:
        out = []
        if self.used < TINY_DATASET:
            out.append(
                f"only {count(self.used, 'image')}: the model will mostly memorise "
                f"{'it' if self.used == 1 else 'them'}; hundreds or thousands of images give "
                "more varied samples (docs/training.md#small-datasets)"
            )
        th, tw = self.image_size
        small = sum(1 for w, h in self.sizes if w < tw or h < th)
        if small:
            few = "1 image" if small == 1 else f"{small} images"
            out.append(f"{few} narrower than {tw} or shorter than {th} pixels "
                       f"{'was' if small == 1 else 'were'} upscaled")
        if self.matted:
            out.append(
                f"{self.matted} image{'s have' if self.matted > 1 else ' has'} an alpha "
                "channel: transparent parts are drawn on "
                "white (--channels 4 learns the transparency instead)"
            )
        if self.unsearched:
            n, (_, first) = len(self.unsearched), self.unsearched[0]
            more = f" (and {n - 1} more)" if n > 1 else ""
            out.append(f"searching the folder: {first}{more}")
        if self.loose:
            few = count(len(self.loose), "image")
            names = ", ".join(self.loose[:2]) + (", ..." if len(self.loose) > 2 else "")
            out.append(f"{few} beside the class subfolders ({names}): trained without "
                       f"classes; move {'them' if len(self.loose) > 1 else 'it'} into a "
                       "subfolder for a class-conditional "
                       "model")  # fmt: skip
        if self.empty_classes:
            out.append(f"no readable images in class {', '.join(self.empty_classes)}: "
                       "ddpm train refuses a class it cannot learn")  # fmt: skip
        counts = [c for c in self.class_counts if c]
        if counts and max(counts) >= IMBALANCE * min(counts):
            most, least = (self.class_counts.index(f(counts)) for f in (max, min))
            out.append(
                f"classes are imbalanced: {self.classes[most]} has "
                f"{self.class_counts[most]} images, {self.classes[least]} "
                f"{self.class_counts[least]}; the small classes will be learned poorly"
            )
        return out

    @property
    def empty_classes(self) -> list[str]:
        """The classes none of whose images could be read."""
        return [n for n, c in zip(self.classes, self.class_counts, strict=True) if not c]

    def check_classes(self) -> None:
        """Refuse to train a class that has no readable images: it could not be learned, yet
        `ddpm sample --class` would draw it."""
        names = self.empty_classes
        if not names:
            return
        folder = Path(self.source) / names[0]
        why = next((r for p, r in self.skipped if Path(p).is_relative_to(folder)), None)
        them = "it" if len(names) == 1 else "them"
        raise DataError(
            f"{self.source}: no readable images in class folder{'s' if len(names) > 1 else ''} "
            f"{', '.join(names)}{f' (e.g. {why})' if why else ''}; fix {them}, move {them} "
            "out, or train with --unconditional"
        )

    def left_out(self) -> dict:
        """What reading the data left out, for JSON: the files that could not be read
        (`skipped_files`) and what the search could not enter (`unsearched`), each a list of
        {"path": ..., "reason": ...}."""
        return {key: [{"path": p, "reason": r} for p, r in pairs]
                for key, pairs in (("skipped_files", self.skipped),
                                   ("unsearched", self.unsearched))}  # fmt: skip

    def summary(self) -> dict:
        if self.stored is not None:
            return dict(self.stored)
        # sizes that images have, by area: not a width of one beside a height of another
        sizes = sorted(self.sizes, key=lambda s: (s[0] * s[1], s)) or [(0, 0)]
        return {
            "source": self.source,
            "found": self.found,
            "used": self.used,
            "skipped": len(self.skipped),
            "unsearched": len(self.unsearched),
            "modes": dict(self.modes),
            "min_size": list(sizes[0]),
            "median_size": list(sizes[len(sizes) // 2]),
            "max_size": list(sizes[-1]),
            "channels": self.channels,
            "image_size": list(self.image_size),
            "bytes": self.bytes,
            "fingerprint": self.fingerprint,
            "streamed": self.streamed,
            "classes": list(self.classes),
            "class_counts": list(self.class_counts),
        }

    def set_labels(self, labels: list[int], names: list[str]) -> torch.Tensor:
        """Record the classes of the images used; returns the labels as a tensor."""
        self.classes = list(names)
        self.class_counts = [labels.count(i) for i in range(len(names))]
        return torch.tensor(labels, dtype=torch.long)


MEMORY_SHARE = 0.5  # decoded training data may take at most this share of available memory


def to_channels(pixels: torch.Tensor, alpha: torch.Tensor | None, channels: int) -> torch.Tensor:
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


GRAY_MODES = ("1", "L", "LA", "La", "I", "F")


def _header(path: Path) -> tuple[str, tuple[int, int], bool]:
    """(mode, (width, height), whether it has an alpha channel) from an image file's header,
    without decoding its pixels."""
    try:
        with Image.open(path) as img:
            return img.mode, img.size, has_alpha(img)
    except (PermissionError, FileNotFoundError, IsADirectoryError) as e:
        raise DataError(unreadable(path, e)) from None
    except Exception as e:  # Pillow raises many kinds for files it cannot read
        raise DataError(f"{path}: not an image Pillow can read ({type(e).__name__})") from None


def load_folder(
    folder: Path,
    image_size: tuple[int, int],
    channels: int | None = None,
    stream: bool | None = None,
    classes: bool = True,
) -> tuple[InMemory | OnDisk, DataReport]:
    """The images under `folder`: decoded into memory, or (stream True, or None and the decoded
    images would take more than MEMORY_SHARE of the available memory) left on disk. With
    `classes`, a folder of class subfolders gives labelled images."""
    folder = Path(folder)
    report, paths, labelled = _search(folder, image_size, classes)
    label_of = dict(zip(paths, labelled[0], strict=True)) if labelled else None
    need = len(paths) * (channels or 3) * image_size[0] * image_size[1]
    if stream is None:
        available = available_memory()
        stream = available is not None and need > MEMORY_SHARE * available
    if stream:
        return _on_disk(folder, paths, report, channels, label_of, labelled)
    decoded = list(decode_all(paths, image_size, report, matte=mattes(channels)))
    _check_found(folder, len(decoded), report)
    if channels is None:
        channels = 1 if all(d.pixels.shape[0] == 1 for _, d in decoded) else 3
    report.channels = channels
    data = torch.stack([to_uint8(to_channels(d.pixels, d.alpha, channels)) for _, d in decoded])
    report.used = data.shape[0]
    report.bytes = data.numel()
    labels = None
    if labelled:
        labels = report.set_labels([label_of[p] for p, _ in decoded], labelled[1])
        report.check_classes()
    return InMemory(data, labels), report


def _search(folder: Path, image_size: tuple[int, int], classes: bool):
    """(the report so far, the image files, their classes or None) of a folder."""
    report = DataReport(source=str(folder), image_size=image_size)
    paths = scan(folder, report.unsearched)
    report.found = len(paths)
    report.fingerprint = fingerprint(folder, paths)
    labelled = class_labels(folder, paths) if classes else None
    report.loose = [p.name for p in loose_beside_classes(folder, paths)] if classes else []
    return report, paths, labelled


def mattes(channels: int | None) -> bool:
    """Whether training draws an alpha channel over white and drops it: unless the model learns
    the alpha as a fourth channel (`--channels 4`); `None`, channels still to be chosen, mattes."""
    return channels != 4


def decode_all(paths: list[Path], image_size: tuple[int, int], report: DataReport,
               matte: bool = True):  # fmt: skip
    """Decode each file (resized and cropped; with `matte`, transparency drawn on white),
    recording modes, sizes and failures in `report`; yields (path, decoded image) one at a
    time."""
    for p in paths:
        try:
            img = decode_image(p.read_bytes(), str(p), size=image_size, matte=matte)
        except DataError as e:
            report.skipped.append((str(p), str(e)))
            continue
        except OSError as e:
            report.skipped.append((str(p), unreadable(p, e)))
            continue
        report.modes[img.source_mode] += 1
        report.sizes.append(img.source_size)
        report.matted += img.matted
        yield p, img


def folder_report(folder: Path, image_size: tuple[int, int]) -> DataReport:
    """The pre-flight report of a folder, every image decoded once and dropped: what `ddpm
    train` would find, without training (or holding the images)."""
    folder = Path(folder)
    report, paths, labelled = _search(folder, image_size, True)
    label_of = dict(zip(paths, labelled[0], strict=True)) if labelled else {}
    gray, used = True, []
    for p, img in decode_all(paths, image_size, report):
        gray = gray and img.pixels.shape[0] == 1
        used.append(label_of.get(p))
    report.used = len(used)
    _check_found(folder, report.used, report)
    if labelled:
        report.set_labels(used, labelled[1])
    report.channels = 1 if gray else 3
    report.bytes = report.used * report.channels * image_size[0] * image_size[1]
    return report


def _on_disk(
    folder: Path, paths: list[Path], report: DataReport, channels: int | None,
    label_of: dict | None, labelled,
) -> tuple[OnDisk, DataReport]:  # fmt: skip
    """Read only the headers now (modes, sizes, unreadable files); pixels are decoded per batch."""
    kept = []
    for p in paths:
        try:
            mode, size, alpha = _header(p)
        except DataError as e:
            report.skipped.append((str(p), str(e)))
            continue
        report.modes[mode] += 1
        report.matted += alpha and mattes(channels)
        report.sizes.append(size)
        kept.append(p)
    _check_found(folder, len(kept), report)
    if channels is None:
        gray = all(m in GRAY_MODES or m.startswith("I;") for m in report.modes)
        channels = 1 if gray else 3
    h, w = report.image_size
    report.channels, report.used, report.streamed = channels, len(kept), True
    report.bytes = len(kept) * channels * h * w
    labels = report.set_labels([label_of[p] for p in kept], labelled[1]) if labelled else None
    report.check_classes()
    return OnDisk(kept, report.image_size, channels, labels), report


def _check_found(folder: Path, found: int, report: DataReport) -> None:
    if not found:
        why = f"; e.g. {report.skipped[0][1]}" if report.skipped else ""
        raise DataError(f"{folder}: no readable images found (png, jpg, webp, bmp, tiff, gif){why}")


def decode_for_training(path: Path, image_size: tuple[int, int], channels: int) -> torch.Tensor:
    """One image file -> uint8 (channels, height, width), exactly as the in-memory path does."""
    img = decode_image(Path(path).read_bytes(), str(path), size=image_size, matte=mattes(channels))
    return to_uint8(to_channels(img.pixels, img.alpha, channels))


class InMemory:
    """Decoded images held as one uint8 tensor (N, C, H, W), with their class labels (N,) for
    labelled data."""

    def __init__(self, data: torch.Tensor, labels: torch.Tensor | None = None):
        self.data, self.labels = data, labels

    def __len__(self) -> int:
        return self.data.shape[0]


class OnDisk(torch.utils.data.Dataset):
    """Image files decoded on demand (in DataLoader workers). An image that fails to decode
    is replaced by the next readable one of `pool` (the images a run trains on; None: all),
    the same one every time, and reported: an image set aside never stands in."""

    def __init__(
        self, paths: list[Path], image_size: tuple[int, int], channels: int,
        labels: torch.Tensor | None = None, pool: list[int] | None = None,
    ):  # fmt: skip
        self.paths, self.image_size, self.channels = list(paths), image_size, channels
        self.labels = labels  # (N,) class labels, for labelled data
        self.pool = sorted(pool) if pool is not None else None

    def __len__(self) -> int:
        return len(self.paths)

    def limited_to(self, pool: list[int]) -> OnDisk:
        """The same files, with stand-ins drawn from `pool` only."""
        return OnDisk(self.paths, self.image_size, self.channels, self.labels, pool)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, list[tuple[str, str]], int]:
        """(image, the failures met, the index of the image returned)."""
        failed = []
        for j in self._candidates(i):
            path = self.paths[j]
            try:
                return decode_for_training(path, self.image_size, self.channels), failed, j
            except (DataError, OSError) as e:
                failed.append((str(path), str(e)))
        raise DataError(f"none of the {len(failed)} images can be decoded any more")

    def _candidates(self, i: int):
        """i, then the pool's images after it, wrapping around."""
        yield i
        pool = range(len(self.paths)) if self.pool is None else self.pool
        start = bisect.bisect_right(pool, i)
        for k in range(len(pool)):
            j = pool[(start + k) % len(pool)]
            if j != i:
                yield j


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """(C, H, W) in [-1, 1] -> uint8 (C, H, W), rounded."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def to_model_range(batch: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 in [-1, 1]."""
    return batch.float() / 127.5 - 1.0
