"""What `ddpm sample`, `ddpm inpaint` and `ddpm upscale` share: their options, defined once and
given to each command by `drawing`, and `draw`, which checks them, builds a SampleRequest, runs
the job with its progress and prints the summary."""

from __future__ import annotations

import functools
import inspect
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from ddpm_cli.cli.common import (
    MAX_COUNT,
    BatchSizeOpt,
    DeviceOpt,
    QuietOpt,
    RawOpt,
    SeedOpt,
    deferred_interrupt,
    err_console,
    json_option,
    overwrite_option,
    precision_option,
    print_path,
    safe,
)
from ddpm_cli.cli.views import SampleProgress
from ddpm_cli.config import MAX_TIMESTEPS
from ddpm_cli.data.search import EXTENSIONS
from ddpm_cli.errors import UsageError
from ddpm_cli.sampler_config import (
    DEFAULT_GUIDANCE,
    EditSpec,
    SamplerConfig,
    SamplerName,
    Spacing,
    Variance,
)
from ddpm_cli.store.files import STDIO, stdout_is_terminal
from ddpm_cli.text import count

if TYPE_CHECKING:
    from ddpm_cli.generation.job import SampleRequest, SampleResult

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


def draw(
    ctx: typer.Context, *, checkpoint: Path, num: int, out: str | None, grid: str | None,
    start: int, classes: list[str] | None, guidance: float | None, seed: int | None,
    sampler: SamplerName | None, steps: int | None, eta: float | None,
    variance: Variance | None, spacing: Spacing | None, clip: bool, raw: bool, step: int | None,
    batch_size: int | None, precision, compile: bool, device: str, trajectory: Path | None,
    trajectory_images: int, overwrite: bool, as_json: bool, quiet: bool,
    edit: EditSpec | None = None,
) -> None:  # fmt: skip
    """The shared body of the drawing commands: the options as the commands name them."""
    # inpainting's default sampler is ddpm (generation/editing.edit_sampler)
    named = sampler.value if sampler else ("ddpm" if edit and edit.mode.value == "inpaint" else "")
    for name, value, applies in (("eta", eta, "ddim"), ("variance", variance, "ddpm")):
        if value is not None and named != applies:
            raise UsageError(f"--{name} applies to --sampler {applies}; add --sampler {applies}")
    config = SamplerConfig(
        sampler=sampler,
        steps=steps,
        eta=S.eta if eta is None else eta,
        variance=None if variance is None else variance.value,
        spacing=None if spacing is None else spacing.value,
        clip=clip,
    )
    if out is None and grid is None:
        raise UsageError("say where the images go: -o DIR, -o - (stdout) or --grid FILE")
    if out == STDIO and grid == STDIO:
        raise UsageError("-o - and --grid - both write to stdout; choose one")
    to_stdout = STDIO in (out, grid)
    if to_stdout and as_json:
        raise UsageError("PNG bytes and --json both go to stdout; choose one")
    if to_stdout and stdout_is_terminal():
        raise UsageError(
            "refusing to write image bytes to a terminal; redirect stdout (> FILE.png) or use "
            f"{'-o DIR' if out == STDIO else '--grid FILE'}"
        )
    looks_like_a_file = out not in (None, STDIO) and Path(out).suffix.lower() in EXTENSIONS
    if looks_like_a_file and not Path(out).is_dir() and not out.endswith(("/", os.sep)):
        raise UsageError(f"-o {out}: -o names a folder for the images, and this looks like a "
                         f"file name; for one file, use --grid {out}, or -o - > {out} (end it "
                         "with / for a folder of that name)")  # fmt: skip
    several_inputs = edit is not None and edit.image != STDIO and Path(edit.image).is_dir()
    if out == STDIO and (num > 1 or several_inputs) and grid is None:
        grid, out = STDIO, None  # several images on stdout: as one grid
    if guidance and not classes:
        raise UsageError("--guidance steers towards a class: add --class NAME")
    if guidance is None:
        guidance = DEFAULT_GUIDANCE if classes else 0.0
    if out == STDIO and grid is None and classes and (num > 1 or len(classes) > 1):
        grid, out = STDIO, None

    with deferred_interrupt():
        from ddpm_cli import distributed
        from ddpm_cli.device import resolve_device
        from ddpm_cli.generation.job import SampleRequest

    if distributed.launched() and edit and STDIO in (edit.image, edit.mask):
        raise UsageError("under torchrun every process reads the inputs: give files, not -")
    if distributed.launched() and (out in (None, STDIO) or grid is not None or trajectory):
        raise UsageError(
            "under torchrun, ddpm writes numbered files only (-o DIR); make a grid or a "
            "trajectory from one process"
        )
    folder = Path(out) if out not in (None, STDIO) else None

    quiet = quiet or not distributed.env_main()
    request = SampleRequest(
        checkpoint=checkpoint, sampler=config, num=num, start=start,
        classes=tuple(classes or ()), guidance=guidance, folder=folder, stdout=out == STDIO,
        grid=grid, trajectory=trajectory, trajectory_images=trajectory_images,
        overwrite=overwrite, seed=seed, raw=raw, step=step, batch_size=batch_size,
        precision=precision,
        compile=compile, clip_given=ctx.get_parameter_source("clip").name == "COMMANDLINE",
        edit=edit,
    )  # fmt: skip
    d, dev = distributed.init(resolve_device(device))
    try:
        result = _run(request, d, dev, quiet, list_paths=not as_json and not to_stdout)
        distributed.leave_together(d)
    finally:
        distributed.shutdown()
    if result is None:  # another process of a torchrun job: rank 0 reports
        return
    if not quiet:
        err_console.print(
            f"{count(result.total, 'image')} in {result.seconds:.1f} s "
            f"({result.total / result.seconds:.2f} img/s)"
            + (f"; grid {result.grid}" if result.grid else "")
            + (f"; trajectory {trajectory}" if trajectory else "")
        )
    if as_json:
        print(json.dumps(result.summary))
    elif not to_stdout:
        extras = [result.grid, result.summary["trajectory"]]
        for path in [*result.written, *(p for p in extras if p)]:
            print_path(path)


def _run(request: SampleRequest, d, dev, quiet: bool, list_paths: bool) -> SampleResult | None:
    """The job, its header line and its progress. Ctrl-C lists the images written so far on
    stdout (as a finished job does) and says how many, and for plain sampling how to draw
    the rest."""
    from ddpm_cli.generation.job import sample_images

    view: SampleProgress | None = None
    paths: list[str] = []
    seed = None

    def on_event(kind: str, info: dict) -> None:
        nonlocal view, seed
        if kind == "start":
            if not quiet:
                err_console.print(_header(info))
            view, seed = SampleProgress(quiet, info["mine"], info["sampler"].steps), info["seed"]
        elif kind == "step":
            view.step(info["index"], info["total"])
        elif kind == "written":
            paths.append(info["path"])
        elif kind == "batch":
            view.batch_done(info["images"])

    try:
        return sample_images(request, d, dev, on_event)
    except KeyboardInterrupt:
        if view is not None:
            view.close()
        q, rest = request, ""
        if paths and not (q.classes or q.edit or d.active):  # images start .. start + n - 1
            rest = (f"; the rest: --start {q.start + len(paths)} -n {q.num - len(paths)} "
                    f"--seed {seed}")  # fmt: skip
        err_console.print(f"[yellow]interrupted[/yellow]: {count(len(paths), 'image')} "
                          f"written{rest}")  # fmt: skip
        if list_paths and not d.active:  # (a torchrun process knows only its own files)
            for path in paths:
                print_path(path)
        raise typer.Exit(130) from None
    finally:
        if view is not None:
            view.close()


def _header(info: dict) -> str:
    sm, s, e = info["model"], info["sampler"], info["edit"]
    share = f" ({info['mine']} per process, {info['world']} processes)" if info["active"] else ""
    which = ""
    if info["classes"]:
        which = f" of {safe(', '.join(info['classes']))}, guidance {info['guidance']:g}"
    command = f"ddpm {e.command}" if e else "ddpm sample"
    what = ""
    if e is not None:
        what = f" from {count(info['inputs'], 'input')} ({_edit_text(e, info['factor'])})"
    return (
        f"[bold]{command}[/bold] {safe(sm.path)} ({sm.weights} weights, step {sm.step}): "
        f"{count(info['total'], 'image')}{which}{what}{share}, {s.sampler.value} "
        f"{s.steps} steps ({s.spacing}){_evaluations(info)}, seed {info['seed']}, "
        f"batch {info['batch']}, "
        f"{info['device']}, {info['precision'].value}"
    )


def _evaluations(info: dict) -> str:
    n = info["evaluations"]
    return "" if n == info["sampler"].steps else f", {count(n, 'network evaluation')} an image"


def _edit_text(e: EditSpec, factor: int | None) -> str:
    if e.mode.value == "inpaint":
        return f"RePaint, resample {e.resample}, jump {e.jump}"
    if e.mode.value == "sdedit":
        return f"SDEdit, strength {e.strength:g}"
    return f"ILVR, factor {factor}"
