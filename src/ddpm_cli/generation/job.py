"""The `ddpm sample` job, from a request to written files: open the model, check every output
before any sampling, resolve the sampler, seed and batch, draw this process's share of the
images and write them (numbered PNGs, a grid, stdout, a trajectory).

It reports through `on_event(kind, info)` ("start", "step", "written", "batch"), never prints; the
command renders the events and the returned summary.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ddpm_cli import distributed
from ddpm_cli.config import Precision
from ddpm_cli.data.images import encode_png
from ddpm_cli.device import new_seed
from ddpm_cli.diffusion.schedules import DiffusionTables
from ddpm_cli.errors import OutputError, UsageError
from ddpm_cli.generation.editing import (
    builder,
    check_jump,
    edit_sampler,
    evaluations_per_image,
    open_inputs,
    spec_args,
)
from ddpm_cli.generation.output import (
    grid_image,
    grid_image_rows,
    image_name,
    provenance,
    regenerate_command,
    render_trajectory,
    to_image,
)
from ddpm_cli.generation.sampling import (
    Trajectory,
    check_model,
    default_batch_size,
    generate,
    load_for_sampling,
    resolve_classes,
    with_model_defaults,
)
from ddpm_cli.model.forward import resolve_precision
from ddpm_cli.sampler_config import (
    DEFAULT_GUIDANCE_INTERVAL,
    EditSpec,
    SamplerConfig,
    interval_text,
)
from ddpm_cli.store.files import (
    STDIO,
    check_output_path,
    output_folder,
    write_atomic,
    write_stdout,
)

Event = Callable[[str, dict], None]


@dataclass(frozen=True)
class SampleRequest:
    """What to draw and where it goes, as the command resolved its options."""

    checkpoint: Path
    sampler: SamplerConfig
    num: int  # images per class asked for (or in all)
    start: int = 0  # the first image's index
    classes: tuple[str, ...] = ()  # names, indices or "all"; () for no class
    guidance: float = 0.0
    # the noise levels sigma (lo, hi] that are guided; None: every step (sampling.generate)
    guidance_interval: tuple[float, float] | None = DEFAULT_GUIDANCE_INTERVAL
    folder: Path | None = None  # numbered PNGs
    stdout: bool = False  # one PNG's bytes on stdout
    grid: str | None = None  # a grid PNG's path, or "-" for stdout
    trajectory: Path | None = None  # a .gif or .png of how the first images emerge
    trajectory_images: int = 4
    overwrite: bool = False
    seed: int | None = None  # None: a new one, said in the start event
    raw: bool = False  # the raw training weights instead of the EMA
    step: int | None = None  # a run's snapshot of this step (ddpm train --keep)
    batch_size: int | None = None  # None: as many as fit (halved with guidance)
    precision: Precision | None = None  # None: the device's default
    compile: bool = False
    clip_given: bool = False  # --clip/--no-clip given: it overrides the checkpoint's default
    edit: EditSpec | None = None  # inpaint, SDEdit, upscale or guide: -n variations per input


@dataclass(frozen=True)
class SampleResult:
    summary: dict  # what `--json` prints
    written: list[str]  # the numbered files, in index order (every process's)
    grid: str | None  # the grid's path, where it went to a file
    total: int  # images drawn by the whole job
    seconds: float


def sample_images(
    request: SampleRequest, d, device: torch.device, on_event: Event = lambda kind, info: None
) -> SampleResult | None:
    """Draw images start..start+num-1 (of each class asked for; in a torchrun job `d`, this
    rank's share) and write them. Returns the summary on rank 0, None on the other ranks."""
    q = request
    precision = resolve_precision(q.precision, device)
    sm = load_for_sampling(q.checkpoint, raw=q.raw, device=device, step=q.step)
    labels = resolve_classes(list(q.classes), sm) if q.classes else None
    names = sm.model_config.classes
    size = sm.model_config.image_size
    inputs = open_inputs(q.edit, size, sm.model_config.in_channels) if q.edit else None
    # (input, index, class) per image: index fastest, then class, then input
    jobs = [
        (i, k, c)
        for i in (range(len(inputs)) if inputs else [None])
        for c in labels or [None]
        for k in range(q.start, q.start + q.num)
    ]

    def name_of(i, k, c):
        return image_name(k, c, names, inputs[i].stem if inputs else None)

    files = [q.folder / name_of(*job) for job in jobs] if q.folder else []
    if len(set(files)) < len(files):
        twice = next(f for f in files if files.count(f) > 1)
        raise UsageError(f"two inputs would both write {twice}: rename one of them")
    sources = [f for e in inputs or () for f in e.files]
    check_outputs(q.folder, files, q.grid, q.trajectory, q.overwrite, sources)
    check_model(sm)
    # the sampler settings, resolved once: the user's, the checkpoint's defaults, the sampler's
    resolved = with_model_defaults(q.sampler, sm, q.clip_given)
    if q.edit is not None:
        resolved = edit_sampler(q.edit, resolved, sm.diffusion.timesteps)
    resolved = resolved.resolved(sm.diffusion.timesteps, sm.objective)
    evals = resolved.steps
    if q.edit is not None:
        check_jump(q.edit, resolved.steps)
        tables = DiffusionTables.from_config(sm.diffusion)
        evals = evaluations_per_image(q.edit, resolved, tables, sm.objective)
    seed = distributed.broadcast(d, new_seed() if q.seed is None else q.seed)
    total = len(jobs)
    jobs = jobs[d.rank :: d.world]  # image k's noise is the same whichever process draws it
    indices = [k for _, k, _ in jobs]
    edit = None
    if inputs:
        items = [i for i, _, _ in jobs]
        edit = builder(q.edit, inputs, items, resolved, sm.objective)
    batch = q.batch_size or default_batch_size(sm.model_config, device, len(jobs))
    if q.guidance and not q.batch_size:  # guidance runs the network on twice the batch
        batch = max(1, batch // 2)
    text = provenance(sm, resolved, seed, precision, q.guidance, q.guidance_interval)
    on_event("start", {
        "model": sm, "total": total, "mine": len(indices), "world": d.world, "active": d.active,
        "classes": [names[c] for c in labels] if labels else None, "guidance": q.guidance,
        "guidance_interval": q.guidance_interval, "sampler": resolved, "seed": seed,
        "batch": batch, "device": device,
        "precision": precision, "edit": q.edit, "inputs": len(inputs or ()),
        "factor": inputs[0].factor if inputs else None, "evaluations": evals,
    })  # fmt: skip

    traj = Trajectory() if q.trajectory else None
    written: list[str] = []
    images, done = [], 0
    t0 = time.perf_counter()
    with output_folder(q.folder, tidy=not d.active):  # an interrupted job leaves no empty one
        for chunk, x in generate(
            sm, resolved, indices, seed, batch, device, precision, q.compile, traj,
            q.trajectory_images, lambda i, n: on_event("step", {"index": i, "total": n}),
            [c for _, _, c in jobs] if labels else None, q.guidance, edit, q.guidance_interval,
        ):  # fmt: skip
            for (i, k, c), img in zip(jobs[done : done + len(chunk)], x, strict=True):
                meta = {**text, "ddpm:index": str(k)}
                if c is not None:
                    meta["ddpm:class"] = names[c]
                if inputs:
                    e = inputs[i]
                    meta["ddpm:edit"] = json.dumps(
                        {"command": q.edit.command, "args": [*e.args, *spec_args(q.edit)]}
                    )
                    meta.update({"ddpm:input": e.name, "ddpm:input_hash": e.digest})
                meta["ddpm:command"] = regenerate_command(meta, k)
                png = encode_png(to_image(img), meta)
                if q.folder:
                    path = q.folder / name_of(i, k, c)
                    write_atomic(path, png)
                    written.append(str(path))
                    on_event("written", {"path": str(path)})  # (a Ctrl-C may come mid-batch)
                elif q.stdout:
                    write_stdout(png)
            if q.grid is not None:
                images.append(x)
            done += len(chunk)
            on_event("batch", {"images": len(chunk), "written": len(written)})
    seconds = time.perf_counter() - t0
    if d.active:  # rank 0 lists every process's files, in index order
        written = sorted(p for part in distributed.gather(d, written) for p in part)
        seconds = max(distributed.gather(d, seconds))
        if not d.main:
            return None

    grid_path = None
    if q.grid is not None:  # a row per class; per input an edit's, the input first
        drawn = torch.cat(images)
        rows = labels and len(labels) > 1
        if inputs:
            cells = [
                torch.cat([inputs[jobs[r][0]].shown(size[0])[None], drawn[r : r + q.num]])
                for r in range(0, len(jobs), q.num)
            ]
            image = grid_image_rows(torch.cat(cells), q.num + 1)
        else:
            image = grid_image_rows(drawn, q.num) if rows else grid_image(drawn)
        png = encode_png(image, text)
        if q.grid == STDIO:
            write_stdout(png)
        else:
            write_atomic(Path(q.grid), png)
            grid_path = q.grid
    if traj is not None:
        gif = q.trajectory.suffix.lower() == ".gif"
        write_atomic(q.trajectory, render_trajectory(traj, gif=gif))
    summary = {
        "checkpoint": str(sm.path),
        "checkpoint_hash": sm.content_hash,
        "weights": sm.weights,
        "sampler": resolved.to_dict(),
        "seed": seed,
        "indices": [q.start, q.start + q.num - 1],
        "classes": [names[c] for c in labels] if labels else None,
        "guidance": q.guidance,
        "guidance_interval": interval_text(q.guidance_interval) if q.guidance else None,
        "edit": {
            "mode": q.edit.mode.value,
            "inputs": [e.name for e in inputs],
            # each input's own arguments (its path; --mask, --box, --outpaint, --factor), then
            # the ones all share: the ddpm:edit of its PNGs is the two together
            "input_args": [list(e.args) for e in inputs],
            "args": spec_args(q.edit),
        }
        if inputs
        else None,
        "files": written,
        "grid": grid_path,
        "trajectory": str(q.trajectory) if q.trajectory else None,
        "device": str(device),
        "precision": precision.value,
        "batch_size": batch,
        "seconds": seconds,
        "img_per_s": total / seconds,
    }
    return SampleResult(summary, written, grid_path, total, seconds)


def check_outputs(folder, files, grid, trajectory, overwrite, inputs=()) -> None:
    """Everything that would stop the writes, checked before any sampling; no output may
    replace one of the `inputs` (the files an edit read)."""
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
            check_output_path(Path(path), overwrite=overwrite, inputs=tuple(inputs))
    if grid is not None and str(grid) != STDIO and Path(grid).suffix.lower() != ".png":
        raise UsageError(f"{grid}: --grid writes a PNG; name it .png (or - for stdout)")
    if trajectory is not None and trajectory.suffix.lower() not in (".gif", ".png"):
        raise UsageError(f"{trajectory}: --trajectory writes a .gif animation or a .png strip")
