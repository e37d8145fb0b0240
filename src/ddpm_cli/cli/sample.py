"""`ddpm sample`: generate PNGs (files, a grid, stdout) from a checkpoint or run directory."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Annotated

import torch
import typer

from ddpm_cli import distributed
from ddpm_cli.cli.common import (
    BatchSizeOpt,
    DeviceOpt,
    QuietOpt,
    RawOpt,
    SeedOpt,
    count,
    err_console,
    json_option,
    overwrite_option,
    precision_option,
)
from ddpm_cli.cli.views import SampleProgress
from ddpm_cli.config import (
    DEFAULT_GUIDANCE,
    SamplerConfig,
    SamplerName,
    Spacing,
    Variance,
)
from ddpm_cli.device import new_seed, resolve_device
from ddpm_cli.errors import OutputError, UsageError
from ddpm_cli.files import STDIO, check_output_path, stdout_is_terminal, write_atomic, write_stdout
from ddpm_cli.forward import resolve_precision
from ddpm_cli.images import encode_png
from ddpm_cli.sampling import (
    Trajectory,
    check_model,
    default_batch_size,
    generate,
    grid_image,
    grid_image_rows,
    image_name,
    load_for_sampling,
    provenance,
    regenerate_command,
    render_trajectory,
    resolve_classes,
    to_image,
    with_model_defaults,
)

S = SamplerConfig()  # the one source of defaults


def sample(
    ctx: typer.Context,
    checkpoint: Annotated[
        Path,
        typer.Argument(help="A model.safetensors written by ddpm train, or its run directory."),
    ],
    num: Annotated[
        int, typer.Option("--num", "-n", min=1, help="Number of images (per class with --class).")
    ] = 16,
    out: Annotated[
        str | None,
        typer.Option(
            "--out",
            "-o",
            help="Directory for 000000.png, 000001.png, ... (created if missing), "
            "or - for PNG bytes on stdout (the image, or the grid of several).",
        ),
    ] = None,
    grid: Annotated[
        str | None,
        typer.Option("--grid", help="Also (or only) write all images as one grid PNG; - = stdout."),
    ] = None,
    start: Annotated[
        int,
        typer.Option("--start", min=0, help="Index of the first image (to redraw one image)."),
    ] = 0,
    classes: Annotated[
        list[str] | None,
        typer.Option(
            "--class",
            help="Class-conditional models: the class, by name or index (repeatable; all = "
            "every class, a grid row each). Default: no class.",
            show_default=False,
        ),
    ] = None,
    guidance: Annotated[
        float | None,
        typer.Option(
            "--guidance",
            min=0.0,
            help="Classifier-free guidance weight w with --class: (1+w) eps(class) - w eps(none). "
            f"0 is plain conditional sampling; larger is more typical of the class, less varied. "
            f"Default: {DEFAULT_GUIDANCE:g} with --class.",
            show_default=False,
        ),
    ] = None,
    seed: SeedOpt = None,
    sampler: Annotated[
        SamplerName | None,
        typer.Option(
            "--sampler",
            help="ddpm (the paper's), ddim or dpm++. Default: dpm++ for v and x0 models, "
            "ddpm over 100 steps for eps models.",
            show_default=False,
        ),
    ] = S.sampler,
    steps: Annotated[
        int | None,
        typer.Option(
            "--steps", min=1, help="Network evaluations. Default: ddpm T (1000), ddim 50, dpm++ 20."
        ),
    ] = S.steps,
    eta: Annotated[
        float | None,
        typer.Option("--eta", min=0.0, max=1.0, help="ddim: 0 deterministic, 1 ancestral-like."),
    ] = None,
    variance: Annotated[
        Variance | None,
        typer.Option(
            "--variance", help="ddpm: large (sigma^2 = beta, the paper's) or small (beta~)."
        ),
    ] = None,
    spacing: Annotated[
        Spacing | None,
        typer.Option(
            "--spacing",
            help="Timestep spacing. Default: linspace for ddpm, logsnr for ddim and dpm++.",
        ),
    ] = S.spacing,
    clip: Annotated[
        bool, typer.Option("--clip/--no-clip", help="Clip the predicted x_0 to [-1, 1].")
    ] = S.clip,
    raw: RawOpt = False,
    batch_size: BatchSizeOpt = None,
    precision: precision_option(
        after="bf16 runs bf16 weights; fp16 runs under autocast (CUDA only)."
    ) = None,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the model.")] = False,
    device: DeviceOpt = "auto",
    trajectory: Annotated[
        Path | None,
        typer.Option(
            "--trajectory",
            help="Write how the first images emerge: x_t over the predicted x_0, "
            "as a .gif animation or a .png strip.",
        ),
    ] = None,
    trajectory_images: Annotated[
        int, typer.Option("--trajectory-images", min=1, help="Images in the trajectory.")
    ] = 4,
    overwrite: overwrite_option("Replace existing output files.") = False,
    as_json: json_option("Print a JSON summary on stdout instead of the paths.") = False,
    quiet: QuietOpt = False,
) -> None:
    """Generate images from a trained checkpoint.

    Image k of a seed is the same whatever -n and --batch-size are, and every PNG records how
    it was made (checkpoint hash, sampler, steps, seed, index) in its text chunks. stdout
    lists the written files, one per line.

    [dim]Examples:[/dim]

      [bold]ddpm sample runs/shapes-1 -n 64 -o out/[/bold]

      [bold]ddpm sample model.safetensors -n 16 --grid grid.png --sampler ddpm[/bold]

      [bold]ddpm sample model.safetensors -n 1 --seed 7 -o - > one.png[/bold]
    """
    for name, value, applies in (("eta", eta, "ddim"), ("variance", variance, "ddpm")):
        if value is not None and (sampler is None or sampler.value != applies):
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
        raise UsageError("refusing to write image bytes to a terminal; redirect stdout or use -o")
    if out == STDIO and num > 1 and grid is None:
        grid, out = STDIO, None  # several images on stdout: as one grid

    if distributed.launched() and (out in (None, STDIO) or grid is not None or trajectory):
        raise UsageError(
            "under torchrun, ddpm sample writes numbered files only (-o DIR); make a grid or a "
            "trajectory from one process"
        )
    if guidance and not classes:
        raise UsageError("--guidance steers towards a class: add --class NAME")
    if guidance is None:
        guidance = DEFAULT_GUIDANCE if classes else 0.0
    if out == STDIO and grid is None and classes and (num > 1 or len(classes) > 1):
        grid, out = STDIO, None
    folder = Path(out) if out not in (None, STDIO) else None

    quiet = quiet or not distributed.env_main()
    clip_given = ctx.get_parameter_source("clip").name == "COMMANDLINE"
    d, dev = distributed.init(resolve_device(device))
    try:
        _sample(d, dev, checkpoint, config, start, num, classes, guidance, folder, out, grid,
                trajectory, overwrite, seed, raw, batch_size, precision, compile,
                trajectory_images, as_json, quiet, clip_given)  # fmt: skip
        distributed.leave_together(d)
    finally:
        distributed.shutdown()


def _sample(d, dev, checkpoint, config, start, num, classes, guidance, folder, out, grid,
            trajectory, overwrite, seed, raw, batch_size, precision, compile,
            trajectory_images, as_json, quiet, clip_given) -> None:  # fmt: skip
    """Draw images start.. start+num-1 (of each class asked for; in a torchrun job, this
    rank's share) and write them."""
    to_stdout = STDIO in (out, grid)
    precision = resolve_precision(precision, dev)
    sm = load_for_sampling(checkpoint, raw=raw, device=dev)
    labels = resolve_classes(classes, sm) if classes else None
    names = sm.model_config.classes
    jobs = [(k, c) for c in labels or [None] for k in range(start, start + num)]
    files = [folder / image_name(k, c, names) for k, c in jobs] if folder else []
    _check_outputs(folder, files, grid, trajectory, overwrite)
    check_model(sm)
    config = with_model_defaults(config, sm, clip_given)
    resolved = config.resolved(sm.diffusion.timesteps, sm.objective)
    seed = distributed.broadcast(d, new_seed() if seed is None else seed)
    total = len(jobs)
    jobs = jobs[d.rank :: d.world]  # image k's noise is the same whichever process draws it
    indices = [k for k, _ in jobs]
    batch = batch_size or default_batch_size(sm.model_config, dev, len(jobs))
    if guidance and not batch_size:  # guidance runs the network on twice the batch
        batch = max(1, batch // 2)
    text = provenance(sm, config, seed, precision, guidance)
    if not quiet:
        share = f" ({len(indices)} per process, {d.world} processes)" if d.active else ""
        which = ""
        if labels:
            which = f" of {', '.join(names[c] for c in labels)}, guidance {guidance:g}"
        err_console.print(
            f"[bold]ddpm sample[/bold] {sm.path} ({sm.weights} weights, step {sm.step}): "
            f"{count(total, 'image')}{which}{share}, {resolved.sampler.value} "
            f"{resolved.steps} steps ({resolved.spacing}), seed {seed}, batch {batch}, {dev}, "
            f"{precision.value}"
        )
    if folder:
        folder.mkdir(parents=True, exist_ok=True)

    traj = Trajectory() if trajectory else None
    view = SampleProgress(quiet, len(indices), resolved.steps)
    written: list[str] = []
    images, images_done = [], []
    t0 = time.perf_counter()
    try:
        for chunk, x in generate(
            sm,
            config,
            indices,
            seed,
            batch,
            dev,
            precision,
            compile,
            traj,
            trajectory_images,
            view.step,
            [c for _, c in jobs] if labels else None,
            guidance,
        ):
            done = len(images_done)
            for (k, c), img in zip(jobs[done : done + len(chunk)], x, strict=True):
                meta = {**text, "ddpm:index": str(k)}
                if c is not None:
                    meta["ddpm:class"] = names[c]
                png = encode_png(
                    to_image(img), {**meta, "ddpm:command": regenerate_command(meta, k)}
                )
                if folder:
                    path = folder / image_name(k, c, names)
                    write_atomic(path, png)
                    written.append(str(path))
                elif out == STDIO:
                    write_stdout(png)
            if grid is not None:
                images.append(x)
            images_done.extend(chunk)
            view.batch_done(len(chunk))
    except KeyboardInterrupt:
        view.close()
        err_console.print(f"[yellow]interrupted[/yellow]: {count(len(written), 'image')} written")
        raise typer.Exit(130) from None
    view.close()
    seconds = time.perf_counter() - t0
    if d.active:  # rank 0 lists every process's files, in index order
        written = sorted(p for part in distributed.gather(d, written) for p in part)
        seconds = max(distributed.gather(d, seconds))
        if not d.main:
            return

    grid_path = None
    if grid is not None:  # a row per class
        drawn = torch.cat(images)
        rows = labels and len(labels) > 1
        png = encode_png(grid_image_rows(drawn, num) if rows else grid_image(drawn), text)
        if grid == STDIO:
            write_stdout(png)
        else:
            write_atomic(Path(grid), png)
            grid_path = grid
    if traj is not None:
        write_atomic(trajectory, render_trajectory(traj, gif=trajectory.suffix.lower() == ".gif"))

    if not quiet:
        err_console.print(
            f"{count(total, 'image')} in {seconds:.1f} s ({total / seconds:.2f} img/s)"
            + (f"; grid {grid_path}" if grid_path else "")
            + (f"; trajectory {trajectory}" if trajectory else "")
        )
    if as_json:
        summary = {
            "checkpoint": str(sm.path),
            "checkpoint_hash": sm.content_hash,
            "weights": sm.weights,
            "sampler": resolved.to_dict(),
            "seed": seed,
            "indices": [start, start + num - 1],
            "classes": [names[c] for c in labels] if labels else None,
            "guidance": guidance,
            "files": written,
            "grid": grid_path,
            "trajectory": str(trajectory) if trajectory else None,
            "device": str(dev),
            "precision": precision.value,
            "batch_size": batch,
            "seconds": seconds,
            "img_per_s": total / seconds,
        }
        print(json.dumps(summary))
    elif not to_stdout:
        for path in [*written, *([grid_path] if grid_path else [])]:
            print(path)


def _check_outputs(folder, files, grid, trajectory, overwrite) -> None:
    """Everything that would stop the writes, checked before any sampling."""
    if folder is not None:
        if folder.exists() and not folder.is_dir():
            raise UsageError(f"{folder}: exists and is not a directory")
        existing = next(p for p in (folder, *folder.absolute().parents) if p.exists())
        if not existing.is_dir():
            raise UsageError(f"{folder}: cannot create it, {existing} is a file")
        if not os.access(existing, os.W_OK):
            raise OutputError(f"{folder}: cannot write to {existing}: permission denied")
        if not overwrite:
            existing = [f for f in files if f.exists()]
            if existing:
                raise UsageError(
                    f"{existing[0]} already exists ({len(existing)} of the {len(files)} files "
                    "do); pass --overwrite, another -o, or --start to continue the numbering"
                )
    for path in (grid, trajectory):
        if path is not None and str(path) != STDIO:
            check_output_path(Path(path), overwrite=overwrite)
    if trajectory is not None and trajectory.suffix.lower() not in (".gif", ".png"):
        raise UsageError(f"{trajectory}: --trajectory writes a .gif animation or a .png strip")
