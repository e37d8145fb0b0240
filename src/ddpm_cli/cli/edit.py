"""`ddpm inpaint` (RePaint: fill a mask, a box or outpainting's padding) and `ddpm upscale`
(ILVR super-resolution): edits of images with a trained model, written like `ddpm sample`'s."""

from __future__ import annotations

from typing import Annotated

import typer

from ddpm_cli.cli.draw import draw
from ddpm_cli.cli.draw_options import CheckpointArg, ResizeOpt, drawing
from ddpm_cli.config import MAX_TIMESTEPS
from ddpm_cli.errors import UsageError
from ddpm_cli.sampler_config import (
    DEFAULT_JUMP,
    DEFAULT_RESAMPLE,
    FACTORS,
    INPAINT_STEPS,
    INPAINT_VARIANCE,
    EditMode,
    EditSpec,
    SamplerName,
)

ImageArg = Annotated[str, typer.Argument(help="An image file, a folder of images, or - for stdin.")]
NumOpt = Annotated[
    int, typer.Option("--num", "-n", max=100_000, min=1, help="Variations per input image.")
]
InpaintSamplerOpt = Annotated[
    SamplerName | None,
    typer.Option(
        "--sampler",
        help=f"ddpm (the paper's), ddim or dpm++. Default: ddpm over {INPAINT_STEPS} steps "
        f"with the {INPAINT_VARIANCE} variance, which fills best per second (docs/editing.md).",
        show_default=False,
    ),
]


def parse_ints(text: str | None, option: str, example: str) -> tuple[int, int, int, int] | None:
    """'8,0,8,0' -> (8, 0, 8, 0): four non-negative integers."""
    if text is None:
        return None
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 4 or min(values) < 0:
        raise UsageError(f"{option} takes four non-negative integers like {example}; got {text!r}")
    return values  # type: ignore[return-value]


InpaintStepsOpt = Annotated[
    int | None,
    typer.Option(
        "--steps",
        max=MAX_TIMESTEPS,
        min=1,
        help=f"Sampler steps (default {INPAINT_STEPS} with ddpm); RePaint "
        "evaluates the network about --resample times as often.",
    ),
]


@drawing(sampler=InpaintSamplerOpt, steps=InpaintStepsOpt)
def inpaint(
    ctx: typer.Context,
    checkpoint: CheckpointArg,
    image: ImageArg,
    mask: Annotated[
        str | None,
        typer.Option(
            "--mask",
            "-m",
            help="White = regenerate, black = keep (grey above 50% counts as white); the image's "
            "size. A file, a folder (paired with the images by file name), or -.",
        ),
    ] = None,
    box: Annotated[
        str | None,
        typer.Option(
            "--box",
            help="Regenerate the box X0,Y0,X1,Y1 instead of a mask (pixels of the image the "
            "model sees, right and bottom edges exclusive, as PIL's boxes).",
        ),
    ] = None,
    outpaint: Annotated[
        str | None,
        typer.Option(
            "--outpaint",
            help="Pad the image by LEFT,TOP,RIGHT,BOTTOM pixels and draw the padding; the "
            "padded canvas must be the model's size.",
        ),
    ] = None,
    resample: Annotated[
        int,
        typer.Option(
            "--resample",
            "-r",
            max=1000,
            min=1,
            help="RePaint: walk each stretch of --jump steps this "
            "many times, re-noising in between; more agrees better with the kept pixels, and "
            "costs about as many times the network evaluations. 1: no resampling.",
        ),
    ] = DEFAULT_RESAMPLE,
    jump: Annotated[
        int,
        typer.Option("--jump", max=1000, min=1, help="RePaint: sampler steps per jump back."),
    ] = DEFAULT_JUMP,
    resize: ResizeOpt = False,
    num: NumOpt = 1,
    options: dict | None = None,
) -> None:
    """Fill part of an image so that it agrees with the rest (RePaint, Lugmayr et al. 2022).

    The kept pixels come back bit for bit; the grid (--grid) shows each input, the
    regenerated part grey, before its variations. Works with every sampler.

    [dim]Examples:[/dim]

      [bold]ddpm inpaint runs/faces face.png --mask mask.png -n 4 --grid fills.png[/bold]

      [bold]ddpm inpaint runs/faces face.png --box 0,16,32,32 -o out/[/bold]

      [bold]ddpm inpaint runs/faces face.png --outpaint 8,0,8,0 --resize -o out/[/bold]

      [bold]ddpm inpaint runs/faces photos/ --mask masks/ -o out/[/bold]
    """
    given = [o for o, v in (("--mask", mask), ("--box", box), ("--outpaint", outpaint)) if v]
    if len(given) != 1:
        raise UsageError(
            "say what to regenerate: one of --mask MASK, --box X0,Y0,X1,Y1 or "
            "--outpaint LEFT,TOP,RIGHT,BOTTOM" + (f" (got {' and '.join(given)})" if given else "")
        )
    pad = parse_ints(outpaint, "--outpaint", "8,0,8,0")
    if pad is not None and not any(pad):
        raise UsageError("--outpaint 0,0,0,0 pads nothing; give the pixels to add per side")
    edit = EditSpec(
        EditMode.inpaint, "inpaint", image, mask=mask, box=parse_ints(box, "--box", "0,16,32,32"),
        outpaint=pad, resize=resize, jump=jump, resample=resample,
    )  # fmt: skip
    draw(ctx, checkpoint=checkpoint, num=num, **options, edit=edit)


@drawing()
def upscale(
    ctx: typer.Context,
    checkpoint: CheckpointArg,
    image: ImageArg,
    factor: Annotated[
        int | None,
        typer.Option(
            "--factor",
            min=2,
            max=8,
            help="2, 4 or 8: the model's size over the image's. Default: from the sizes.",
            show_default=False,
        ),
    ] = None,
    resize: ResizeOpt = False,
    num: NumOpt = 1,
    options: dict | None = None,
) -> None:
    """Upscale a small image to the model's size with the same model (ILVR, Choi et al. 2021).

    The output's means over --factor x --factor blocks are the small image's pixels; the
    model draws the detail inside them, differently per seed.

    [dim]Examples:[/dim]

      [bold]ddpm upscale runs/faces small.png -o out/[/bold]

      [bold]ddpm upscale runs/faces small.png --factor 4 -n 4 --grid ups.png[/bold]
    """
    if factor is not None and factor not in FACTORS:
        raise UsageError(f"--factor must be 2, 4 or 8, got {factor}")
    if resize and factor is None:
        raise UsageError("--resize needs --factor: the size to resize to is the model's / N")
    edit = EditSpec(EditMode.upscale, "upscale", image, resize=resize, factor=factor)
    draw(ctx, checkpoint=checkpoint, num=num, **options, edit=edit)
