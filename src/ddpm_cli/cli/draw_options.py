"""The options `ddpm sample`, `ddpm inpaint` and `ddpm upscale` share, defined once, and
`drawing`, which gives them to each command (cli/draw.py checks and runs them)."""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from ddpm_cli.cli.common import (
    MAX_COUNT,
    BatchSizeOpt,
    DeviceOpt,
    QuietOpt,
    RawOpt,
    SeedOpt,
    json_option,
    overwrite_option,
    precision_option,
)
from ddpm_cli.config import MAX_TIMESTEPS
from ddpm_cli.errors import UsageError
from ddpm_cli.sampler_config import (
    DEFAULT_GUIDANCE,
    DEFAULT_GUIDANCE_INTERVAL,
    SamplerConfig,
    SamplerName,
    Spacing,
    Variance,
    interval_text,
)

S = SamplerConfig()  # the one source of defaults

CheckpointArg = Annotated[
    Path, typer.Argument(help="A model.safetensors written by ddpm train, or its run directory.")
]
OutOpt = Annotated[
    str | None,
    typer.Option(
        "--out",
        "-o",
        help="Directory for the numbered PNGs (created if missing), "
        "or - for PNG bytes on stdout (the image, or the grid of several).",
    ),
]
GridOpt = Annotated[
    str | None,
    typer.Option("--grid", help="Also (or only) write all images as one grid PNG; - = stdout."),
]
StartOpt = Annotated[
    int,
    typer.Option(
        "--start", max=MAX_COUNT, min=0, help="Index of the first image (to redraw one image)."
    ),
]
ClassOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--class",
        help="Class-conditional models: the class, by name or index (repeatable; all = "
        "every class, a grid row each). Default: no class.",
        show_default=False,
    ),
]
GuidanceOpt = Annotated[
    float | None,
    typer.Option(
        "--guidance",
        max=100.0,
        min=0.0,
        help="Classifier-free guidance weight w with --class: (1+w) eps(class) - w eps(none). "
        f"0 is plain conditional sampling; larger is more typical of the class, less varied. "
        f"Default: {DEFAULT_GUIDANCE:g} with --class.",
        show_default=False,
    ),
]
GuidanceIntervalOpt = Annotated[
    str | None,
    typer.Option(
        "--guidance-interval",
        metavar="LO,HI|all",
        help="The noise levels that --guidance steers: sigma = sqrt((1-alpha_bar)/alpha_bar) "
        "in (LO, HI], the class alone elsewhere (one network pass); 'all' guides every step. "
        f"Default: {interval_text(DEFAULT_GUIDANCE_INTERVAL)}.",
        show_default=False,
    ),
]
SamplerOpt = Annotated[
    SamplerName | None,
    typer.Option(
        "--sampler",
        help="ddpm (the paper's), ddim or dpm++. Default: dpm++ for v and x0 models, "
        "ddpm over 100 steps for eps models.",
        show_default=False,
    ),
]
StepsOpt = Annotated[
    int | None,
    typer.Option(
        "--steps",
        max=MAX_TIMESTEPS,
        min=1,
        help="Network evaluations. Default: ddpm T (1000), ddim 50, dpm++ 20.",
    ),
]
EtaOpt = Annotated[
    float | None,
    typer.Option("--eta", min=0.0, max=1.0, help="ddim: 0 deterministic, 1 ancestral-like."),
]
VarianceOpt = Annotated[
    Variance | None,
    typer.Option("--variance", help="ddpm: large (sigma^2 = beta, the paper's) or small (beta~)."),
]
SpacingOpt = Annotated[
    Spacing | None,
    typer.Option(
        "--spacing", help="Timestep spacing. Default: linspace for ddpm, logsnr for ddim and dpm++."
    ),
]
ClipOpt = Annotated[
    bool, typer.Option("--clip/--no-clip", help="Clip the predicted x_0 to [-1, 1].")
]
SamplePrecisionOpt = precision_option(
    after="bf16 runs bf16 weights; fp16 runs under autocast (CUDA only)."
)
CompileOpt = Annotated[bool, typer.Option("--compile", help="torch.compile the model.")]
TrajectoryOpt = Annotated[
    Path | None,
    typer.Option(
        "--trajectory",
        help="Write how the first images emerge: x_t over the predicted x_0, "
        "as a .gif animation or a .png strip.",
    ),
]
TrajectoryImagesOpt = Annotated[
    int, typer.Option("--trajectory-images", max=1000, min=1, help="Images in the trajectory.")
]
SampleOverwriteOpt = overwrite_option("Replace existing output files.")
SampleJsonOpt = json_option("Print a JSON summary on stdout instead of the paths.")
StepOpt = Annotated[
    int | None,
    typer.Option(
        "--step",
        max=MAX_COUNT,
        min=0,
        help="A run directory's snapshot of this step (ddpm train --keep N); "
        "ddpm inspect RUN lists them.",
        show_default=False,
    ),
]
ResizeOpt = Annotated[
    bool,
    typer.Option(
        "--resize", help="Resize and centre-crop input images to the size the model needs."
    ),
]


# every drawing command's options after its own, in the order --help lists them: (type, default)
DRAW_OPTIONS = {
    "out": (OutOpt, None),
    "grid": (GridOpt, None),
    "start": (StartOpt, 0),
    "classes": (ClassOpt, None),
    "guidance": (GuidanceOpt, None),
    "guidance_interval": (GuidanceIntervalOpt, None),
    "seed": (SeedOpt, None),
    "sampler": (SamplerOpt, S.sampler),
    "steps": (StepsOpt, S.steps),
    "eta": (EtaOpt, None),
    "variance": (VarianceOpt, None),
    "spacing": (SpacingOpt, S.spacing),
    "clip": (ClipOpt, S.clip),
    "raw": (RawOpt, False),
    "step": (StepOpt, None),
    "batch_size": (BatchSizeOpt, None),
    "precision": (SamplePrecisionOpt, None),
    "compile": (CompileOpt, False),
    "device": (DeviceOpt, "auto"),
    "trajectory": (TrajectoryOpt, None),
    "trajectory_images": (TrajectoryImagesOpt, 4),
    "overwrite": (SampleOverwriteOpt, False),
    "as_json": (SampleJsonOpt, False),
    "quiet": (QuietOpt, False),
}


def parse_interval(text: str | None) -> tuple[float, float] | None:
    """--guidance-interval: "LO,HI" (0 <= LO < HI), "all" (None: every step), or the default."""
    if text is None:
        return DEFAULT_GUIDANCE_INTERVAL
    if text.strip().lower() == "all":
        return None
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        lo = hi = math.nan
    if not 0 <= lo < hi:  # also false for nan
        raise UsageError(f"--guidance-interval {text!r}: give LO,HI with 0 <= LO < HI (noise "
                         "levels sigma), e.g. 0.28,2.9, or all")  # fmt: skip
    return lo, hi


def drawing(**types) -> Callable[[Callable], Callable]:
    """Give a command the DRAW_OPTIONS after its own parameters (with `types` replacing some
    of theirs, e.g. another --sampler help); the command receives them as one dict, `options`,
    to pass on to `draw`. Typer reads the parameters from `inspect.signature`, which takes the
    wrapper's `__signature__` (set here) before following `__wrapped__`; every parameter is
    keyword-only, as Typer passes them all by name."""

    def decorate(command: Callable) -> Callable:
        own = inspect.signature(command, eval_str=True).parameters.values()
        shared = [
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                              annotation=types.get(name, kind))
            for name, (kind, default) in DRAW_OPTIONS.items()
        ]  # fmt: skip
        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own
                  if p.name != "options"] + shared  # fmt: skip

        @functools.wraps(command)
        def run(**kwargs):
            options = {name: kwargs.pop(name) for name in DRAW_OPTIONS}
            return command(**kwargs, options=options)

        run.__signature__ = inspect.Signature(params)
        run.__annotations__ = {p.name: p.annotation for p in params}
        return run

    return decorate
