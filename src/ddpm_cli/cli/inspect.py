"""`ddpm inspect`: what a checkpoint or a run directory holds, as tables or JSON on stdout."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ddpm_cli.cli.common import (
    JsonOpt,
    StreamConsole,
    deferred_interrupt,
    literal,
    overwrite_option,
)
from ddpm_cli.cli.views import loss_curve, warmup_text
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
        int, typer.Option("--timesteps", "-T", max=MAX_TIMESTEPS, min=2, help="With --schedule: T.")
    ] = 1000,
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

    if plot is not None and path is not None and not (path.is_dir() and is_run_directory(path)):
        raise UsageError(
            f"--plot draws a run directory's loss curve or --schedule curves; {path} is not a "
            "run directory"
        )
    if schedule:
        names = [s.value for s in schedule]
        info = inspection.schedule_info(names, timesteps)
        if plot is not None:
            curves = inspection.schedule_curves(names, timesteps)
            write_atomic(plot, schedule_plot(curves, plot_format(plot)))
        if as_json:
            print(json.dumps(info, indent=2))
        else:
            out_console.print(schedule_table(info))
        return
    if not path.exists():
        raise DataError(f"{path}: no such checkpoint file, run directory or image folder")
    if path.is_dir() and not is_run_directory(path):
        if is_diffusers_folder(path):
            raise UsageError(f"{path}: is a diffusers model folder; convert it with ddpm import "
                             f"{path} -o MODEL.safetensors, then inspect that")  # fmt: skip
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


def _table(title: str, rows: list[tuple[str, object]]) -> Table:
    t = Table(title=title, title_justify="left", show_header=False)
    t.add_column(style="bold")
    t.add_column()
    for k, v in rows:
        if v is not None:
            t.add_row(k, literal(v))
    return t


def tables(info: dict, tensors: bool) -> list[Table]:
    m, d, tr, data = (info.get(k) for k in ("model", "diffusion", "training", "data"))
    out = [
        _table(
            "checkpoint",
            [
                ("file", f"{info['path']} ({info['file_bytes'] / 2**20:.1f} MiB)"),
                (
                    "kind",
                    f"{info['kind']}"
                    + (f", {info['weights']} weights" if "weights" in info else ""),
                ),
                ("format", f"{info['format']}, written by ddpm {info['ddpm_version']}"),
                ("with", _versions(info)),
                ("created", info.get("created")),
                ("content hash", info["content_hash"]),
                ("step", info["step"]),
                ("EMA decay", f"{info['ema_decay']:.6f}" if "ema_decay" in info else None),
                ("wall time", _duration(info["elapsed"]) if "elapsed" in info else None),
                *[("warning", w) for w in info.get("warnings", [])],
            ],
        ),
    ]
    if m is None:  # a data cache: no network, no schedule
        return out + [data_table(data)] + (_tensor_table(info) if tensors else [])
    out.append(
        _table(
            "model",
            [
                ("preset", m.get("preset")),
                ("parameters", f"{m['parameters']:,}"),
                ("image size", _size(m.get("image_size"))),
                ("channels in/out", f"{m.get('in_channels')} / {m.get('out_channels')}"),
                ("width", f"{m.get('channels')} x {','.join(map(str, m.get('channel_mult', [])))}"),
                ("res blocks per level", m.get("num_res_blocks")),
                ("attention at", ",".join(map(str, m.get("attention_resolutions", []))) or "none"),
                ("dropout", m.get("dropout")),
                ("classes", ", ".join(m.get("classes") or []) or "none (unconditional)"),
                ("shift map", "yes: told where --shift reflected each border (sampling: empty)"
                 if m.get("augment") else "none"),  # fmt: skip
            ],
        )
    )
    blocks = Table(title="parameters per block", title_justify="left")
    blocks.add_column("block")
    blocks.add_column("parameters", justify="right")
    for name, n in m["blocks"].items():
        blocks.add_row(literal(name), f"{n:,}")
    out.append(blocks)
    out.append(
        _table(
            "diffusion",
            [
                ("schedule", d.get("schedule")),
                ("timesteps T", d.get("timesteps")),
                ("objective", d.get("objective")),
                ("default sampler", d.get("default_sampler")),
            ],
        )
    )
    if tr:
        share = tr.get("warmup_share")  # metadata may hold anything: only a number counts
        share = share if type(share) in (int, float) else 0
        warmup = warmup_text(tr.get("warmup_steps"), share, bool(tr.get("time_limit")))
        out.append(
            _table(
                "training",
                [
                    ("steps / epochs", f"{tr.get('steps')} / {tr.get('epochs')}"),
                    ("time limit", _duration(tr["time_limit"]) if tr.get("time_limit") else None),
                    ("batch", f"{tr.get('batch_size')} x {tr.get('grad_accum')} (grad accum)"),
                    (
                        "lr",
                        f"{tr.get('lr')} (warm-up {warmup}, cooldown "
                        f"{tr.get('cooldown') or 0:g})",
                    ),
                    ("EMA", tr.get("ema_decay")),
                    ("precision", tr.get("precision")),
                    ("seed", tr.get("seed")),
                    ("fine-tuned from", _parent_text(info.get("parent"))),
                ],
            )
        )
    if data:
        out.append(data_table(data))
    if "run" in info:
        r = info["run"]
        last = r["last"] or {}
        out.append(
            _table(
                "run",
                [
                    ("folder", r["folder"]),
                    ("files", ", ".join(r["files"])),
                    (
                        "resumable",
                        f"yes, {r['resume']}" if r["resumable"] else f"no: {r['resume']}",
                    ),
                    (
                        "sample grids",
                        f"{r['grids']}, newest {r['newest_grid']}" if r["grids"] else "none",
                    ),
                    ("snapshots", _steps(r["snapshots"])),
                    ("logged steps", r["logged_steps"]),
                    (
                        "last loss",
                        f"{last['loss']:.4f} at step {last['step']}" if "loss" in last else None,
                    ),
                    ("quality", _figures(r)),
                ],
            )
        )
    return out + (_tensor_table(info) if tensors else [])


def data_table(data: dict) -> Table:
    """The data a checkpoint was trained on, or a data cache holds (metadata may hold anything:
    lists are shown only where they are lists)."""
    names, counts = (v if isinstance(v, list) else [] for v in
                     (data.get("classes"), data.get("class_counts")))  # fmt: skip
    size = data.get("image_size")
    size = _size(size) if isinstance(size, list) and len(size) == 2 else None
    return _table("data", [
        ("source", data.get("source")),
        ("images", f"{data.get('used')} used of {data.get('found')} found"),
        ("size", size and f"{size}, {data.get('channels')} channels"),
        ("classes", ", ".join(f"{c} {n}" for c, n in zip(names, counts, strict=False)) or None),
        ("skipped", data.get("skipped")),
        ("modes", ", ".join(f"{k} {v}" for k, v in data.get("modes", {}).items())),
        ("streamed", data.get("streamed")),
    ])  # fmt: skip


def _tensor_table(info: dict) -> list[Table]:
    t = Table(title="tensors", title_justify="left")
    for col in ("name", "shape", "dtype"):
        t.add_column(col)
    for row in info["tensors"]:
        shape = "x".join(map(str, row["shape"])) or "scalar"
        t.add_row(literal(row["name"]), shape, literal(row["dtype"]))
    return [t]


SKIPPED_SHOWN = 10


def schedule_table(info: dict) -> Table:
    names = list(info["schedules"])
    t = Table(title=f"schedules, T = {info['timesteps']}", title_justify="left")
    t.add_column("t", justify="right")
    for name in names:
        for col in ("beta", "alpha_bar", "SNR"):
            t.add_column(f"{name} {col}", justify="right")
    for i, row in enumerate(info["schedules"][names[0]]):
        cells = [str(row["t"])]
        for name in names:
            r = info["schedules"][name][i]
            cells += [f"{r['beta']:.3g}", f"{r['alpha_bar']:.4g}", f"{r['snr']:.3g}"]
        t.add_row(*cells)
    return t


def folder_table(r: dict) -> Table:
    rows = [
        ("folder", r["source"]),
        ("images", f"{r['used']} readable of {r['found']} found, {r['skipped']} skipped"),
        ("modes", ", ".join(f"{k} {v}" for k, v in sorted(r["modes"].items())) or "-"),
        (
            "classes",
            ", ".join(
                f"{c} {n}"
                for c, n in zip(r.get("classes") or [], r.get("class_counts") or [], strict=False)
            )
            or "none: trains unconditionally",
        ),  # fmt: skip
        (
            "sizes",
            f"min {r['min_size'][0]}x{r['min_size'][1]}, median {r['median_size'][0]}x"
            f"{r['median_size'][1]}, max {r['max_size'][0]}x{r['max_size'][1]}",
        ),
        (
            "decoded",
            f"{r['bytes'] / 2**20:.1f} MiB as {r['channels']}x{r['image_size'][0]}x"
            f"{r['image_size'][1]} uint8",
        ),
    ]
    for s in r["skipped_files"][:SKIPPED_SHOWN]:
        rows.append(("skipped", s["reason"]))
    if len(r["skipped_files"]) > SKIPPED_SHOWN:
        rows.append(("skipped", f"... and {len(r['skipped_files']) - SKIPPED_SHOWN} more"))
    rows += [("warning", w) for w in r["warnings"]]
    return _table("image folder", rows)


def _versions(info: dict) -> str | None:
    """The library versions a checkpoint was written with (absent in files before 0.1)."""
    parts = [
        f"{k} {info[f'{k}_version']}" for k in ("torch", "safetensors") if f"{k}_version" in info
    ]
    return ", ".join(parts) or None


def _size(size) -> str | None:
    if not size:
        return None
    h, w = size
    return f"{w}x{h}"


def _duration(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h {m:02d}m {s:02d}s" if h else f"{m}m {s:02d}s"


def _figures(r: dict) -> str | None:
    """The quality figures logged and best.safetensors' (training/quality.py)."""
    if not r.get("figures") and not r.get("best"):
        return None
    parts = []
    if r.get("last_figure"):
        f = r["last_figure"]
        parts.append(f"{r['figures']} held-out losses, last {f['heldout_loss']:.5f} at step "
                     f"{f['step']}")  # fmt: skip
    if r.get("best"):
        b = r["best"]
        parts.append(f"best {b['heldout_loss']:.5f} at step {b['step']}: {b['file']}")
    return "; ".join(parts)


def _steps(steps: list[int]) -> str:
    """The snapshots' steps, for `ddpm sample RUN --step K`."""
    if not steps:
        return "none (ddpm train --keep N keeps them)"
    return f"steps {', '.join(map(str, steps))} (ddpm sample RUN --step K)"


def _parent_text(parent: dict | None) -> str | None:
    if not parent:
        return None
    return f"{parent.get('file')} (step {parent.get('step')}, sha256 {parent.get('content_hash')})"
