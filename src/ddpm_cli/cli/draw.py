"""What `ddpm sample`, `ddpm inpaint` and `ddpm upscale` share: `draw`, which checks their
options (cli/draw_options.py defines them), builds a SampleRequest, runs the job with its
progress and prints the summary."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from ddpm_cli.cli.common import (
    deferred_interrupt,
    err_console,
    print_path,
    safe,
)
from ddpm_cli.cli.draw_options import S, parse_interval
from ddpm_cli.cli.views import SampleProgress
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

def draw(
    ctx: typer.Context, *, checkpoint: Path, num: int, out: str | None, grid: str | None,
    start: int, classes: list[str] | None, guidance: float | None,
    guidance_interval: str | None, seed: int | None,
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
    if guidance_interval is not None and not classes:
        raise UsageError("--guidance-interval steers towards a class: add --class NAME")
    if guidance is None:
        guidance = DEFAULT_GUIDANCE if classes else 0.0
    interval = parse_interval(guidance_interval)
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
        classes=tuple(classes or ()), guidance=guidance, guidance_interval=interval,
        folder=folder, stdout=out == STDIO,
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
        if info["guidance"]:
            interval = info["guidance_interval"]
            which += (" at every step" if interval is None
                      else f" at sigma ({interval[0]:g}, {interval[1]:g}]")  # fmt: skip
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
