"""Where training images come from: a folder (folders.py decodes it), the built-in dataset, or
the data cache of an earlier run, with or without their class labels."""

from __future__ import annotations

from pathlib import Path

import torch

from ddpm_cli.data.folders import (
    BUILTIN_PREFIX,
    DataReport,
    InMemory,
    OnDisk,
    load_folder,
    to_channels,
    to_model_range,
    to_uint8,
)
from ddpm_cli.errors import DataError

AUTO_MAX = 32  # the largest size ddpm trains at unless told (--image-size)
HEADERS_READ = 2000  # files whose sizes decide a folder's default size


def auto_image_size(sizes: list[tuple[int, int]]) -> tuple[int, int]:
    """The default training size for images of `sizes` ((width, height) each): square, at the
    median shorter side, at most AUTO_MAX, rounded down to a multiple of 4 (so that the
    presets' levels halve it evenly; 25x25 images train at 24), and at least 8."""
    sides = sorted(min(w, h) for w, h in sizes)
    side = sides[len(sides) // 2] if sides else AUTO_MAX
    side = max(8, min(AUTO_MAX, side) // 4 * 4)
    return side, side


def data_image_size(source: str | None) -> tuple[int, int]:
    """The size a run trains at when --image-size is not given: a data cache's own size, 32 for
    the built-in datasets, and for a folder its images' size (auto_image_size) from the file
    headers of up to HEADERS_READ files spread over it; unreadable files are left to the
    loader to report."""
    from ddpm_cli.data.folders import _header
    from ddpm_cli.data.search import scan

    if is_cache_file(source):
        from ddpm_cli.store.checkpoint import read_header

        shape = (read_header(Path(source)).get("images") or {}).get("shape") or []
        return tuple(shape[-2:]) if len(shape) == 4 else (AUTO_MAX, AUTO_MAX)
    if source is None or source.startswith(BUILTIN_PREFIX):
        return AUTO_MAX, AUTO_MAX
    paths = scan(Path(source))
    step = max(1, len(paths) // HEADERS_READ)
    sizes = []
    for p in paths[::step]:
        try:
            sizes.append(_header(p)[1])
        except DataError:
            continue
    return auto_image_size(sizes)


def is_cache_file(source: str | None) -> bool:
    return source is not None and source.endswith(".safetensors")


def load_cache(
    path: Path, image_size: tuple[int, int], channels: int | None, for_training: bool = True
):
    """The decoded images of an earlier run (its data_cache.safetensors), with its data summary.

    The images were cropped and converted when they were cached, so the size must match, and
    for training the channels too (--channels); to measure a model (`for_training` False),
    gray and colour are converted to its channels, as a folder's images are."""
    from ddpm_cli.store.checkpoint import CheckpointError, load_checkpoint

    try:
        ckpt = load_checkpoint(Path(path), kind="data_cache")
    except CheckpointError as e:
        if "expected a data_cache" not in str(e):
            raise
        load_checkpoint(Path(path))  # a damaged file is reported as such, not sent to --init
        hint = "; to start from a model's weights, add --init MODEL" if for_training else ""
        raise DataError(f"{e}: give images here (a folder, or a run's data_cache.safetensors)"
                        f"{hint}") from None
    data = ckpt.tensors.get("images")
    if (data is None or data.dtype != torch.uint8 or data.ndim != 4 or data.shape[0] == 0
            or data.shape[1] not in (1, 3, 4)):  # fmt: skip
        raise DataError(f"{path}: not a data cache of uint8 images (N, C, H, W)")
    size, c = tuple(data.shape[-2:]), data.shape[1]
    if size != tuple(image_size):
        h, w = size
        if for_training:
            text = str(h) if h == w else f"{w}x{h}"
            raise DataError(f"{path} holds {text} images; train at that size with --image-size "
                            f"{text}")  # fmt: skip
        model = f"{image_size[1]}x{image_size[0]}"
        raise DataError(f"{path} holds {w}x{h} images, not the model's {model}; give a folder "
                        "of the images instead (resized and cropped)")  # fmt: skip
    if channels is not None and channels != c:
        if for_training:
            raise DataError(f"{path} holds {c}-channel images; drop --channels or use --channels "
                            f"{c}")  # fmt: skip
        if c == 4:  # a folder's transparent images are drawn over white: give the folder
            raise DataError(f"{path} holds 4-channel images, the model takes {channels}; give a "
                            "folder of the images instead (converted)")  # fmt: skip
        data = torch.stack([to_uint8(to_channels(to_model_range(d), None, channels)) for d in data])
        c = channels
    summary = dict(ckpt.config.get("data", {}))
    report = DataReport(
        source=summary.get("source", str(path)),
        found=data.shape[0],
        used=data.shape[0],
        channels=c,
        image_size=size,
        bytes=data.numel(),
        fingerprint=summary.get("fingerprint"),
    )
    report.modes.update(summary.get("modes", {}))
    report.stored = summary | {"used": report.used, "streamed": False}
    labels = ckpt.tensors.get("labels")
    names = summary.get("classes") or []
    if labels is not None:
        ok = labels.dtype == torch.long and labels.shape == (data.shape[0],) and names
        if not ok or labels.min() < 0 or labels.max() >= len(names):
            raise DataError(f"{path}: its labels do not fit its images and classes")
        report.set_labels(labels.tolist(), names)
    return InMemory(data, labels), report


def load_source(
    source: str | None,
    image_size: tuple[int, int],
    channels: int | None,
    stream: bool | None = None,
    classes: bool = True,
    for_training: bool = True,
) -> tuple[InMemory | OnDisk, DataReport]:
    """Training images for a source: a folder, "builtin:NAME", None (the default built-in), or
    the data_cache.safetensors of an earlier run (decoded images, used as they are). Without
    `classes`, labels are dropped: the data is unlabelled. Not `for_training`: images to
    measure a model on (evaluation), which a cache's refusals say (load_cache)."""
    images, report = _load_source(source, image_size, channels, stream, classes, for_training)
    if not classes and images.labels is not None:
        images.labels, report.classes, report.class_counts = None, [], []
        if report.stored is not None:
            report.stored = report.stored | {"classes": [], "class_counts": []}
    return images, report


def _load_source(source, image_size, channels, stream, classes, for_training):
    from ddpm_cli.data import builtin

    if is_cache_file(source):
        return load_cache(Path(source), image_size, channels, for_training)
    if source is None or source.startswith(BUILTIN_PREFIX):
        name = builtin.DEFAULT if source is None else source[len(BUILTIN_PREFIX) :]
        if name not in builtin.DATASETS:
            known = ", ".join(f"{BUILTIN_PREFIX}{k}" for k in builtin.DATASETS)
            raise DataError(f"unknown built-in dataset {name!r}; choose one of: {known}")
        if image_size[0] != image_size[1]:
            raise DataError("built-in datasets are square: use --image-size N")
        data, labels, names = builtin.DATASETS[name](size=image_size[0])
        if channels is not None and channels != data.shape[1]:
            data = torch.stack(
                [to_uint8(to_channels(to_model_range(d), None, channels)) for d in data]
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
        return InMemory(data, report.set_labels(labels.tolist(), names)), report
    return load_folder(Path(source), image_size, channels, stream, classes)
