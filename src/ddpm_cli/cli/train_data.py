"""The options of `ddpm train` that say what it trains on and how the images are read,
augmented and split: the data half of its signature, defined once here (cli/train.py has the
model, the recipe and the run's length)."""

from __future__ import annotations

from typing import Annotated

import typer

from ddpm_cli.cli.common import MAX_COUNT


def _channels(value: str | None) -> int | None:
    """--channels: 1, 3 or 4 (2, gray+alpha, is no model kind); one message for any other."""
    if value not in (None, "1", "3", "4"):
        raise typer.BadParameter(f"must be 1, 3 or 4, got {value}")
    return None if value is None else int(value)


ImageSizeOpt = Annotated[
    str | None,
    typer.Option(
        "--image-size",
        help="Train at N x N, or WIDTHxHEIGHT (e.g. 64x32): images are resized to cover it "
        "and center-cropped. Default: the images' own size (their median shorter side, "
        "rounded down to a multiple of 4), at most 32.",
        show_default=False,
    ),
]

ChannelsOpt = Annotated[
    str | None,
    typer.Option("--channels", callback=_channels, metavar="1|3|4",
                 help="1, 3 or 4. Default: follows the data."),
]

FlipOpt = Annotated[
    bool, typer.Option("--flip/--no-flip", help="Random horizontal flips (the paper).")
]

ShiftOpt = Annotated[
    int | None,
    typer.Option(
        "--shift",
        max=1024,
        min=0,
        help="Random translations by up to N pixels each way, the border reflected; the "
        "network is told where, and samples show no reflected border (0: none). Default: "
        "1/16 of the side (2 at 32x32, none below 16) below 2000 images, else none.",
    ),
]

StreamOpt = Annotated[
    bool | None,
    typer.Option(
        "--stream/--no-stream",
        help="Decode batches from disk with worker processes instead of holding the decoded "
        "images in memory. Default: stream only when they would not fit.",
        show_default=False,
    ),
]

WorkersOpt = Annotated[
    int | None,
    typer.Option(
        "--workers",
        max=256,
        min=0,
        help="Decoding processes when streaming. Default: CPUs - 1, max 4.",
    ),
]

DataCacheOpt = Annotated[
    bool,
    typer.Option(
        "--data-cache/--no-data-cache",
        help="Keep the decoded images in the run directory (data_cache.safetensors): resume "
        "uses them, and a new run can take the file as its DATA.",
    ),
]

UnconditionalOpt = Annotated[
    bool,
    typer.Option(
        "--unconditional",
        help="Ignore the class subfolders of DATA (a folder of subfolders, one per class, "
        "trains a class-conditional model).",
    ),
]

CondDropOpt = Annotated[
    float,
    typer.Option(
        "--cond-drop",
        min=0.0,
        max=1.0,
        help="Class-conditional: the share of images trained with no class, so that "
        "one network also learns unconditional samples for --guidance.",
    ),
]

HoldoutOpt = Annotated[
    int | None,
    typer.Option(
        "--holdout",
        max=MAX_COUNT,
        min=0,
        help="Images set aside from training for the quality figure. Default: 5% of them, "
        "at most 256 (none under 160 images); 0: train on all, no figure.",
        show_default=False,
    ),
]
