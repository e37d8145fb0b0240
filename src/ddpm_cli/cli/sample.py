"""`ddpm sample`: generate PNGs (files, a grid, stdout) from a checkpoint or run directory, from
noise, or from an image: SDEdit (--init) and ILVR-guided variations (--guide)."""

from __future__ import annotations

from typing import Annotated

import typer

from ddpm_cli.cli.common import open_range
from ddpm_cli.cli.draw import draw
from ddpm_cli.cli.draw_options import CheckpointArg, ResizeOpt, drawing
from ddpm_cli.errors import UsageError
from ddpm_cli.sampler_config import (
    DEFAULT_GUIDE_FACTOR,
    DEFAULT_STRENGTH,
    FACTORS,
    EditMode,
    EditSpec,
)


@drawing()
def sample(
    ctx: typer.Context,
    checkpoint: CheckpointArg,
    num: Annotated[
        int,
        typer.Option(
            "--num",
            "-n",
            max=10_000_000,
            min=1,
            help="Number of images (per class with --class, per input "
            "image with --init or --guide).",
        ),
    ] = 16,
    init: Annotated[
        str | None,
        typer.Option(
            "--init",
            help="SDEdit: start from this image (a file, a folder of images, or - for stdin) "
            "noised to t = strength T, instead of from pure noise.",
        ),
    ] = None,
    strength: Annotated[
        float | None,
        typer.Option(
            "--strength",
            min=0.0,
            callback=open_range,
            max=1.0,
            help=f"With --init, in (0, 1]: how much of the image is redrawn; near 0 keeps it, 1 "
            f"is ordinary sampling. Default: {DEFAULT_STRENGTH:g}.",
            show_default=False,
        ),
    ] = None,
    guide: Annotated[
        str | None,
        typer.Option(
            "--guide",
            help="ILVR: variations that keep this image's layout and colours (its means over "
            "--factor blocks); a file, a folder of images, or -.",
        ),
    ] = None,
    factor: Annotated[
        int | None,
        typer.Option(
            "--factor",
            min=2,
            max=8,
            help=f"With --guide: the block size kept, 2, 4 or 8 (larger keeps less). "
            f"Default: {DEFAULT_GUIDE_FACTOR}.",
            show_default=False,
        ),
    ] = None,
    resize: ResizeOpt = False,
    options: dict | None = None,
) -> None:
    """Generate images from a trained checkpoint.

    Image k of a seed is the same whatever -n and --batch-size are, and every PNG records how
    it was made (checkpoint hash, sampler, steps, seed, index) in its text chunks. stdout
    lists the written files, one per line. With --init or --guide the files are named after
    the input: photo-000000.png.

    [dim]Examples:[/dim]

      [bold]ddpm sample runs/shapes-1 -n 64 -o out/[/bold]

      [bold]ddpm sample model.safetensors -n 16 --grid grid.png --sampler ddpm[/bold]

      [bold]ddpm sample model.safetensors -n 1 --seed 7 -o - > one.png[/bold]

      [bold]ddpm sample runs/faces --init sketch.png --strength 0.5 -n 4 --grid edits.png[/bold]
    """
    edit = sample_edit(init, strength, guide, factor, resize)
    draw(ctx, checkpoint=checkpoint, num=num, **options, edit=edit)


def sample_edit(init, strength, guide, factor, resize) -> EditSpec | None:
    """The edit that --init (SDEdit) or --guide (ILVR) asks for, its options checked."""
    if init is not None and guide is not None:
        raise UsageError("--init and --guide each start from an image; use one")
    if strength is not None and init is None:
        raise UsageError("--strength applies to --init IMAGE; add --init")
    if factor is not None and guide is None:
        raise UsageError("--factor applies to --guide IMAGE; add --guide")
    if resize and init is None and guide is None:
        raise UsageError("--resize applies to --init or --guide images")
    if init is not None:
        strength = DEFAULT_STRENGTH if strength is None else strength  # (0, 1]: open_range
        return EditSpec(EditMode.sdedit, "sample", init, resize=resize, strength=strength)
    if guide is not None:
        if factor is not None and factor not in FACTORS:
            raise UsageError(f"--factor must be 2, 4 or 8, got {factor}")
        return EditSpec(EditMode.guide, "sample", guide, resize=resize, factor=factor)
    return None
