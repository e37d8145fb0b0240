"""`ddpm noise`: show what the forward process does to an image."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ddpm_cli.cli.common import (
    DeviceOpt,
    JsonOpt,
    QuietOpt,
    ScheduleOpt,
    SeedOpt,
    TimestepsOpt,
    deferred_interrupt,
    err_console,
    note_line,
    overwrite_option,
    print_path,
)
from ddpm_cli.config import DiffusionConfig, Schedule
from ddpm_cli.errors import UsageError
from ddpm_cli.noise_config import NoiseConfig
from ddpm_cli.store.files import (
    STDIO,
    check_output_path,
    read_input_bytes,
    stdout_is_terminal,
    write_atomic,
    write_stdout,
)


def noise(
    image: Annotated[
        str, typer.Argument(help="Image file (PNG, JPEG, WebP, BMP, TIFF, GIF), or - for stdin.")
    ],
    t: Annotated[
        str | None,
        typer.Option(
            "--t",
            "-t",
            help="Timestep(s) in [0, T-1]: one (writes x_t) or a comma list (writes a labelled "
            "strip). Default: a strip of six from 0 to T-1.",
        ),
    ] = None,
    output: Annotated[
        str | None,
        typer.Option(
            "--output",
            "-o",
            help="Output .png (.gif with --gif), or - for stdout. "
            "Default: IMAGE-noise-tN.png, IMAGE-noise-strip.png or IMAGE-noise.gif here.",
        ),
    ] = None,
    gif: Annotated[
        bool, typer.Option("--gif", help="Write an animation of the chain from t=0 to T-1.")
    ] = False,
    frames: Annotated[
        int, typer.Option("--frames", max=10_000, min=2, help="Frames in the --gif animation.")
    ] = NoiseConfig.frames,
    schedule: ScheduleOpt = DiffusionConfig.schedule,
    timesteps: TimestepsOpt = DiffusionConfig.timesteps,
    seed: SeedOpt = None,
    size: Annotated[
        int | None,
        typer.Option(
            "--size",
            min=1,
            max=8192,
            help="Resize the shorter side and center-crop to SIZE x SIZE first.",
        ),
    ] = None,
    device: DeviceOpt = NoiseConfig.device,
    overwrite: overwrite_option("Replace the output file if it exists.") = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Show what the forward (noising) process does to an image.

    Draws x_t ~ q(x_t | x_0) in closed form (eq. 4 of Ho et al. 2020); [bold]--gif[/bold] runs
    the chain q(x_t | x_(t-1)) step by step. Timesteps are zero-based: [bold]--t 0[/bold] is one
    noising step, [bold]--t 999[/bold] the last of T=1000. Writes the output path on stdout, or
    the image itself with [bold]-o -[/bold]; the table of alpha_bar_t and SNR goes to stderr.

    [dim]Examples:[/dim]

      [bold]ddpm noise cat.png --t 500[/bold]

      [bold]ddpm noise cat.png --t 0,100,250,500,999 -o strip.png[/bold]

      [bold]ddpm noise cat.png --gif --schedule cosine[/bold]

      [bold]cat cat.png | ddpm noise - --t 250 -o - > noisy.png[/bold]
    """
    if gif and t is not None:
        raise UsageError("--gif animates every t from 0 to T-1; drop --t, or drop --gif")
    with deferred_interrupt():
        from ddpm_cli.generation.noising import parse_timesteps, run_noise

    diffusion = DiffusionConfig(schedule=Schedule(schedule), timesteps=timesteps)
    config = NoiseConfig(
        diffusion=diffusion,
        ts=parse_timesteps(t, diffusion.timesteps),
        gif=gif,
        frames=frames,
        seed=seed,
        size=size,
        device=device,
    )
    out = _output_path(image, output, config.ts, gif)
    if out == STDIO:
        if as_json:
            raise UsageError("-o - and --json both write to stdout; choose one")
        if stdout_is_terminal():
            raise UsageError(
                "refusing to write image bytes to a terminal; redirect stdout (> FILE) or use "
                "-o FILE"
            )
    else:
        check_output_path(Path(out), overwrite=overwrite, inputs=(image,))

    data = read_input_bytes(image)
    result = run_noise(data, "stdin" if image == STDIO else image, config)

    if out == STDIO:
        write_stdout(result.data)
    else:
        write_atomic(Path(out), result.data)

    if not quiet:
        for note in result.notes:
            note_line(note)
    report = {
        "input": image,
        "output": out,
        "kind": result.kind,
        "size": list(result.size),
        "mode": result.mode,
        **diffusion.to_dict(),
        "seed": result.seed,
        "device": result.device,
        "steps": result.stats,
    }
    if as_json:
        print(json.dumps(report))
        return
    if not quiet:
        err_console.print(_table(report))
    if out != STDIO:
        print_path(out)


def _output_path(image: str, output: str | None, ts: tuple[int, ...], gif: bool) -> str:
    suffix = ".gif" if gif else ".png"
    if output is not None:
        if output != STDIO and not output.lower().endswith(suffix):
            kind = "an animation (--gif)" if gif else "an image"
            raise UsageError(f"output {output!r} must end in {suffix} for {kind}")
        return output
    stem = "stdin" if image == STDIO else Path(image).stem
    if gif:
        return f"{stem}-noise.gif"
    return f"{stem}-noise-t{ts[0]}.png" if len(ts) == 1 else f"{stem}-noise-strip.png"


def _table(report: dict) -> Table:
    title = (
        f"{report['schedule']} schedule, T={report['timesteps']}, seed {report['seed']}, "
        f"{report['size'][0]}x{report['size'][1]} {report['mode']}"
    )
    table = Table(title=title, title_justify="left")
    columns = ("t", "beta_t", "alpha_bar_t", "SNR", "SNR dB", "signal", "noise")
    for name in columns:
        table.add_column(name, justify="right")
    for s in report["steps"]:
        table.add_row(
            str(s["t"]),
            f"{s['beta']:.3g}",
            f"{s['alpha_bar']:.4g}",
            f"{s['snr']:.4g}",
            f"{s['snr_db']:+.2f}",
            f"{s['signal_weight']:.4f}",
            f"{s['noise_weight']:.4f}",
        )
    table.caption = "x_t = signal * x_0 + noise * eps"
    return table
