"""`ddpm inspect`: what a checkpoint or a run directory holds, as tables or JSON on stdout."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ddpm_cli.cli.common import JsonOpt, StreamConsole, deferred_interrupt, overwrite_option
from ddpm_cli.cli.reports import folder_table, schedule_table, tables
from ddpm_cli.cli.views import loss_curve
from ddpm_cli.config import MAX_TIMESTEPS, Schedule, parse_size
from ddpm_cli.errors import DataError, UsageError
from ddpm_cli.evaluation.plots import loss_plot, plot_format, schedule_plot
from ddpm_cli.store.files import check_output_path, write_atomic

out_console = StreamConsole(highlight=False, soft_wrap=True)  # the report is this command's data


def inspect(
    path: Annotated[
        Path | None,
        typer.Argument(
            help="A checkpoint (.safetensors) written by ddpm, a run directory, or a folder of "
            "training images (the report ddpm train would print, without training)."
        ),
    ] = None,
    schedule: Annotated[
        list[Schedule] | None,
        typer.Option(
            "--schedule",
            help="Instead of a PATH: beta_t, alpha_bar_t and SNR at key t (repeat to compare).",
            show_default=False,
        ),
    ] = None,
    timesteps: Annotated[
        int | None,
        typer.Option("--timesteps", "-T", max=MAX_TIMESTEPS, min=2,
                     help="With --schedule: T (default 1000).", show_default=False),
    ] = None,
    image_size: Annotated[
        str | None,
        typer.Option(
            "--image-size",
            help="For image folders: the training size, N or WxH. Default: as ddpm train "
            "chooses it (the images' own size, at most 32).",
            show_default=False,
        ),
    ] = None,
    tensors: Annotated[
        bool, typer.Option("--tensors", help="Also list every tensor with its shape and dtype.")
    ] = False,
    plot: Annotated[
        Path | None,
        typer.Option(
            "--plot",
            help="Also draw a chart (.png, .svg or .pdf): the loss curve of a run directory, or "
            "alpha_bar_t and log-SNR of the --schedule(s). Needs matplotlib (the plot extra).",
            show_default=False,
        ),
    ] = None,
    overwrite: overwrite_option("Replace an existing --plot file.") = False,
    as_json: JsonOpt = False,
) -> None:
    """Show what a checkpoint, run or image folder holds.

    [dim]Examples:[/dim]

      [bold]ddpm inspect runs/shapes-1[/bold]

      [bold]ddpm inspect model.safetensors --json | jq .model.parameters[/bold]

      [bold]ddpm inspect ./images --image-size 64[/bold]

      [bold]ddpm inspect runs/shapes-1 --plot loss.png[/bold]

      [bold]ddpm inspect --schedule linear --schedule cosine --plot schedules.png[/bold]
    """
    if (path is None) == (not schedule):
        raise UsageError("give a PATH (checkpoint, run or image folder) or --schedule NAME"
                         + (", not both" if schedule else ""))  # fmt: skip
    if plot is not None:
        plot_format(plot)
        check_output_path(plot, overwrite=overwrite)

    with deferred_interrupt():
        from ddpm_cli.data.sources import data_image_size
        from ddpm_cli.evaluation import inspection
        from ddpm_cli.store.interop import is_diffusers_folder
        from ddpm_cli.store.models import is_run_directory

    if path is not None and not path.exists():
        raise DataError(f"{path}: no such checkpoint file, run directory or image folder")
    if plot is not None and path is not None and not (path.is_dir() and is_run_directory(path)):
        raise UsageError(
            f"--plot draws a run directory's loss curve or --schedule curves; {path} is not a "
            "run directory"
        )
    folder = path is not None and path.is_dir() and not is_run_directory(path)
    if folder and is_diffusers_folder(path):
        raise UsageError(f"{path}: is a diffusers model folder; convert it with ddpm import "
                         f"{path} -o MODEL.safetensors, then inspect that")  # fmt: skip
    subject = ("--schedule" if schedule else "an image folder" if folder
               else "a run directory" if path.is_dir()
               else "a checkpoint" if path.suffix == ".safetensors" else "a file")  # fmt: skip
    stored = ("a run directory", "a checkpoint", "a file")  # a file is refused when loaded
    for flag, given, applies, subjects in [
        ("--timesteps", timesteps is not None, "--schedule", ("--schedule",)),
        ("--image-size", image_size is not None, "an image folder", ("an image folder",)),
        ("--tensors", tensors, "a checkpoint or run", stored),
    ]:
        if given and subject not in subjects:
            raise UsageError(f"{flag} applies to {applies}, not to {subject}; drop it")
    if schedule:
        names, timesteps = [s.value for s in schedule], timesteps or 1000
        info = inspection.schedule_info(names, timesteps)
        if plot is not None:
            curves = inspection.schedule_curves(names, timesteps)
            write_atomic(plot, schedule_plot(curves, plot_format(plot)))
        if as_json:
            print(json.dumps(info, indent=2))
        else:
            out_console.print(schedule_table(info))
        return
    if folder:
        size = parse_size(image_size) if image_size else data_image_size(str(path))
        report = inspection.folder_info(path, size)
        if as_json:
            print(json.dumps(report, indent=2))
        else:
            out_console.print(folder_table(report))
        return
    info = inspection.run_info(path) if path.is_dir() else inspection.checkpoint_info(path)
    if plot is not None:
        write_atomic(plot, loss_plot(info["metrics"], plot_format(plot), title=str(path)))
    if as_json:
        if not tensors:
            info.pop("tensors")
        info.pop("metrics", None)
        print(json.dumps(info, indent=2))
        return
    for table in tables(info, tensors):
        out_console.print(table)
    if info.get("metrics"):
        out_console.print(loss_curve(info["metrics"]))
