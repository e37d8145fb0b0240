"""`ddpm import` and `ddpm export`: diffusers folders in and out."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ddpm_cli.cli.common import (
    JsonOpt,
    QuietOpt,
    deferred_interrupt,
    err_console,
    overwrite_option,
    print_path,
    safe,
    warning_line,
)
from ddpm_cli.errors import UsageError
from ddpm_cli.store.files import STDIO, check_output_path
from ddpm_cli.text import option_text


def import_(
    folder: Annotated[
        Path,
        typer.Argument(
            help="A diffusers DDPM pipeline folder (model_index.json, unet/, scheduler/) or a "
            "UNet2DModel folder, with safetensors weights."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="The ddpm checkpoint to write.")],
    overwrite: overwrite_option("Replace --out.") = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Convert a diffusers DDPM model (such as google/ddpm-cifar10-32) into a ddpm checkpoint.

    The network, the beta schedule, T, the prediction type, the variance and clipping of the
    scheduler carry over; an option with no ddpm equivalent is refused by name.

    [dim]Examples:[/dim]

      [bold]ddpm import ddpm-cifar10-32/ -o cifar10.safetensors[/bold]

      [bold]ddpm sample cifar10.safetensors -n 64 --grid grid.png[/bold]
    """
    if out.suffix != ".safetensors":
        name = Path(out.name).stem if out.name not in ("", ".", "..", "-") else "model"
        raise UsageError(f"-o {out}: import writes one .safetensors file; name it "
                         f"{name}.safetensors")  # fmt: skip
    check_output_path(out, overwrite=overwrite)
    with deferred_interrupt():
        from ddpm_cli.store.interop import import_folder

    info = import_folder(folder, out)
    if info["assumed"] and not quiet:
        warning_line(f"{folder}: no scheduler config (scheduler/scheduler_config.json) here or "
                     "in a pipeline folder above; assumed the paper's linear schedule, T=1000, "
                     "predicting eps: right only if the UNet was trained so")  # fmt: skip
    if as_json:
        print(json.dumps(info, indent=2))
        return
    if not quiet:
        m, d = info["model"], info["diffusion"]
        flags = " ".join(option_text(k, v) for k, v in info["sampler"].items()) or "none"
        err_console.print(
            f"imported {safe(folder)}: {m['channels']} x {','.join(map(str, m['channel_mult']))} "
            f"at {m['image_size'][1]}x{m['image_size'][0]}, {d['schedule']} T={d['timesteps']}, "
            f"predicting {info['objective']}, sampler defaults {flags}"
        )
    print_path(out)


def export(
    checkpoint: Annotated[Path, typer.Argument(help="A model.safetensors (or its run directory).")],
    diffusers: Annotated[
        Path,
        typer.Option("--diffusers", help="Folder to write: DDPMPipeline.from_pretrained loads it."),
    ],
    overwrite: overwrite_option("Write into a folder that has files.") = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Write a ddpm checkpoint as a diffusers folder (UNet2DModel and DDPMScheduler).

    [dim]Example:[/dim]

      [bold]ddpm export runs/shapes-1 --diffusers shapes-diffusers/[/bold]
    """
    if str(diffusers) == STDIO:
        raise UsageError("--diffusers -: a diffusers model is a folder of files, not a stream; "
                         "give a folder name")  # fmt: skip
    if diffusers.exists() and not diffusers.is_dir():
        raise UsageError(f"{diffusers}: exists and is not a directory")
    if diffusers.is_dir() and any(diffusers.iterdir()) and not overwrite:
        raise UsageError(f"{diffusers}: is not empty; pass --overwrite to write into it")
    with deferred_interrupt():
        from ddpm_cli.store.interop import export_checkpoint

    info = export_checkpoint(checkpoint, diffusers)
    if as_json:
        print(json.dumps(info, indent=2))
        return
    if not quiet:
        u, s = info["unet"], info["scheduler"]
        size = u["sample_size"]
        size = f"{size[1]}x{size[0]}" if isinstance(size, list) else f"{size}x{size}"
        err_console.print(
            f"exported {safe(checkpoint)}: UNet2DModel "
            f"{','.join(map(str, u['block_out_channels']))} at {size}, DDPMScheduler "
            f"{s['beta_schedule']} T={s['num_train_timesteps']}, predicting {s['prediction_type']}"
        )
        for name, why in info["left_out"].items():
            err_console.print(f"left out {name}: {why}")
        if u.get("num_class_embeds"):  # DDPMPipeline gives the UNet no class_labels
            names = u["ddpm_classes"]
            listed = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
            err_console.print(
                f"class-conditional: call the UNet with class_labels, 0 to {len(names) - 1} "
                f"for {safe(listed)} (ddpm_classes in unet/config.json) and {len(names)} for "
                "no class; DDPMPipeline passes none and cannot sample it (docs/interop.md)"
            )
    print_path(diffusers)
