"""The tables `ddpm inspect` prints: a checkpoint's or run's sections, an image folder's report
and schedules side by side (the JSON it prints instead comes from evaluation/inspection.py)."""

from __future__ import annotations

from rich.table import Table

from ddpm_cli.cli.common import literal
from ddpm_cli.cli.views import parent_text, sizes_text, warmup_text
from ddpm_cli.config import epoch_limit
from ddpm_cli.text import bytes_text, duration_text


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
                ("time embedding", "scales and shifts each block's second norm (adaptive "
                 "group norm)" if m.get("scale_shift") else "added before each block's second "
                 "norm (the paper's)"),  # fmt: skip
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
    if tr and tr.get("lr") is None:  # a run resolves its rate: these weights were imported
        out.append(_table("training", [("settings", "none: imported weights, not a ddpm run")]))
    elif tr:
        share = tr.get("warmup_share")  # metadata may hold anything: only a number counts
        share = share if type(share) in (int, float) else 0
        warmup = warmup_text(tr.get("warmup_steps"), share, bool(tr.get("time_limit")))
        out.append(
            _table(
                "training",
                [
                    # whichever of these comes first ends a run
                    ("steps", tr.get("steps")),
                    ("epochs", epoch_limit(tr.get("epochs"), tr.get("steps"),
                                           tr.get("time_limit"))),  # fmt: skip
                    ("time limit", _limit(tr.get("time_limit"))),
                    ("batch", f"{tr.get('batch_size')} x {tr.get('grad_accum')} (grad accum)"),
                    (
                        "lr",
                        f"{tr.get('lr')} (warm-up {warmup}, cooldown "
                        f"{tr.get('cooldown') or 0:g})",
                    ),
                    ("EMA", tr.get("ema_decay")),
                    ("precision", tr.get("precision")),
                    ("seed", tr.get("seed")),
                    ("fine-tuned from", parent_text(info.get("parent"))),
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
                    ("files", ", ".join([*r["files"], *(f"{d}/" for d in r["folders"])])),
                    (
                        "resumable",
                        f"yes, {r['resume']}" if r["resumable"] else f"no: {r['resume']}",
                    ),
                    ("trained by", _processes(r.get("processes"))),
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
        ("images", f"{data['used']} used of {data.get('found')} found"
                   if data.get("used") is not None else None),
        ("size", size and f"{size}, {data.get('channels')} channels"),
        ("classes", ", ".join(f"{c} {n}" for c, n in zip(names, counts, strict=False)) or None),
        ("skipped", data.get("skipped")),
        ("modes", ", ".join(f"{k} {v}" for k, v in data.get("modes", {}).items()) or None),
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
        ("sizes", sizes_text(r)),
        (
            "decoded",
            f"{bytes_text(r['bytes'])} as {r['channels']}x{r['image_size'][0]}x"
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


def _processes(world) -> str | None:
    """The processes of the torchrun job that last trained a run; None for one process."""
    return f"{world} processes (torchrun)" if world and world > 1 else None


def _limit(seconds) -> str | None:
    """A --time limit as it is typed (10m, 1h30m); metadata may hold anything."""
    ok = type(seconds) in (int, float) and 0 < seconds < float("inf")
    return duration_text(seconds) if ok else None


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


