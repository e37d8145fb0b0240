"""A training run: its directory, data, loop, checkpoints, sample grids, metrics and resume.

    runs/NAME/
      model.safetensors        EMA weights + full config: the file to sample from
      train_state.safetensors  raw weights, EMA, Adam moments, RNG states, data position
                               (written and read by train_state.py)
      metrics.jsonl            one JSON object per logged step
      best.safetensors         the EMA weights with the lowest quality figure (quality.py)
      model-NNNNNNNN.safetensors  step-numbered copies of model.safetensors (--keep)
      samples/step-NNNNNNN.png sample grids from the EMA weights
      data_cache.safetensors   the decoded training images (uint8), reused on resume and
                               usable as the DATA of a new run (not written when streaming)
      skipped.txt              images that could not be read, and why
      .lock                    held while a process trains here (files.RunLock)

Here a run is prepared (a new one, or one read back by resume.py) and handed to loop.py;
run_files.py writes the files; under torchrun only rank 0 does (docs/distributed.md).
Progress is reported to `on_event(kind, info)`; nothing here prints.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from ddpm_cli import distributed
from ddpm_cli.config import AUGMENT_MAPS, DiffusionConfig, LogTo, TrainConfig, from_dict
from ddpm_cli.data.batches import Batches, split
from ddpm_cli.data.folders import BUILTIN_PREFIX
from ddpm_cli.data.sources import data_image_size, load_source
from ddpm_cli.device import resolve_device
from ddpm_cli.diffusion.schedules import DiffusionTables
from ddpm_cli.errors import UsageError
from ddpm_cli.model.presets import build_model_config, recipe_for
from ddpm_cli.model.unet import count_parameters
from ddpm_cli.store.files import STATE, RunLock, append_line, make_folder, new_folder, write_atomic
from ddpm_cli.text import count
from ddpm_cli.training import finetune, loggers, memory, quality
from ddpm_cli.training.loop import Event, Loop, Prepared, RunResult
from ddpm_cli.training.resume import Resumed, nothing_left, open_resume, steps_left_by_epoch
from ddpm_cli.training.run_files import (
    CACHE,
    SKIPPED,
    best_figure,
    check_fresh_folder,
    check_run_directory,
    discard_new_run,
    prepare_directory,
)
from ddpm_cli.training.train import compiled, new_state, resolve, total_steps
from ddpm_cli.training.train_state import restore_state

__all__ = ["RunResult", "next_run_dir", "train"]


def next_run_dir(root: Path, name: str) -> Path:
    n = 1
    while (root / f"{name}-{n}").exists():
        n += 1
    return root / f"{name}-{n}"


def train(
    source: str | None,
    config: TrainConfig,
    diffusion: DiffusionConfig,
    out: Path | None = None,
    resume: Path | None = None,
    given: dict | None = None,
    on_event: Event = lambda kind, info: None,
    should_stop: Callable[[], bool] = lambda: False,
    quiet: bool = False,
) -> RunResult:
    """Train from `source` (a folder, "builtin:NAME" or None for the default built-in dataset)
    into `out`, or continue the run in `resume`. `given`: the options the user set explicitly,
    checked against the stored run on resume. A `diffusion` schedule of None is the preset's
    (presets.Recipe); a resumed run keeps its own."""
    started = time.perf_counter()
    resumed = None
    keep = {"run": False}  # whether a new run's directory stays: once a step is saved
    with contextlib.ExitStack() as held:  # the run directory's lock, the process group
        if resume is not None:
            if distributed.env_main() and (Path(resume) / STATE).exists():
                # before the state is read: two --resumes of one run cannot both read it
                held.enter_context(RunLock(Path(resume), resume=True))
            resumed = open_resume(Path(resume), source, out, given or {})
            source, out, config, diffusion = (
                resumed.source,
                resumed.out,
                resumed.config,
                resumed.diffusion,
            )
        d, device = distributed.init(resolve_device(config.device))
        held.callback(distributed.shutdown)
        if not d.main:  # progress, files and messages are rank 0's
            on_event = lambda kind, info: None  # noqa: E731
        run = prepare(source, config, diffusion, out, resumed, d, device, held, on_event,
                      given, keep, quiet)  # fmt: skip
        keep["run"] = True  # an error in the loop keeps what it saved; a stop before the first
        result = Loop(run, on_event, should_stop, started).run()  # step saves nothing
        keep["run"] = not result.unsaved
        distributed.leave_together(d)
    return result


def prepare(source, config, diffusion, out, resumed: Resumed | None, d, device,
            held: contextlib.ExitStack, on_event: Event, given: dict | None,
            keep: dict, quiet: bool = False) -> Prepared:  # fmt: skip
    """Load the data, claim the run directory, build or restore the training state and the
    network (from a parent's weights with --init), and report the start; what the run must
    release when it ends goes on `held`."""
    labelled = not config.unconditional
    if d.main:  # (rank 0 alone logs)
        typed = {LogTo(x) for x in (given or {}).get("log", ())}
        loggers.check(config.log, kept=() if resumed is None else tuple(set(config.log) - typed))
    if resumed is None and out is not None and d.main:
        check_run_directory(Path(out), source)
    parent = None
    if config.init is not None and resumed is None:
        parent = finetune.open_parent(Path(config.init))
        config, diffusion = finetune.fit(parent, config, diffusion, given or {})
    if config.image_size is None:  # the data's own size (sources.data_image_size)
        config = replace(config, image_size=data_image_size(source))
    if resumed is not None and (out / CACHE).exists():
        images, report = load_source(
            str(out / CACHE), config.image_size, config.channels, classes=labelled
        )
    else:
        images, report = load_source(
            source, config.image_size, config.channels, config.stream, classes=labelled
        )
    seen = distributed.gather(d, report.fingerprint)  # every process must train on the same
    if any(f != seen[0] for f in seen):  # files: each reads them itself
        rank = next(i for i, f in enumerate(seen) if f != seen[0])
        raise UsageError(
            f"the processes of this job see different data in {source}: rank {rank} found other "
            "files (or sizes) than rank 0; give every process the same data (a shared folder, "
            "or identical copies)"
        )
    if resumed is not None and report.fingerprint != resumed.data.get("fingerprint"):
        raise UsageError(
            f"{source} has changed since the run started (files added, removed or resized), so "
            "the run cannot continue exactly; restore the folder, or start a new run with --out"
        )
    if resumed is None:
        if out is None:
            out = next_run_dir(Path("runs"), report.name)
            check_run_directory(out, source)
        check_fresh_folder(out)
        config = resolve(config, device, report.used, report.channels, d.world)
        if diffusion.schedule is None:  # the preset's
            diffusion = replace(diffusion, schedule=recipe_for(config.preset).schedule)
        if parent is not None:  # the parent's network, whatever its preset was called
            model_config = finetune.model_config(parent, tuple(report.classes), config.shift)
        else:  # a run that shifts its images tells the network how (non-leaking)
            model_config = build_model_config(
                config.preset, config.image_size, report.channels, classes=tuple(report.classes),
                augment=AUGMENT_MAPS if config.shift else 0,
            )  # fmt: skip
    else:
        config = resolve(config, device, report.used, report.channels, d.world)
        model_config = resumed.model
    # rank 0's choices (the run directory's name, a random seed) are the job's
    shared = distributed.broadcast(d, {"out": str(out), "config": config.to_dict()})
    out, config = Path(shared["out"]), from_dict(TrainConfig, shared["config"])
    ckpt = resumed.ckpt if resumed is not None else None
    created = new_folder(Path(out)) if d.main else None
    warnings: list[str] = []
    if d.main:
        make_folder(out)
        if resumed is None:  # (a resumed run's was taken before its state was read)
            held.enter_context(RunLock(out))  # before anything in the directory changes
            check_fresh_folder(out)  # again, now that no other run can write there
            # a new run that fails while being prepared, or stops before its first step, leaves
            # nothing behind: undone once the loggers have closed, before the lock is let go
            held.callback(lambda: keep["run"] or discard_new_run(out, created))
            # (a resumed run's directory is readied once it is known to have steps to go)
            warnings = prepare_directory(out, False, config, images, report, ckpt)
        if "cond_drop" in (given or {}) and not model_config.num_classes:
            warnings.append("--cond-drop has no effect on a model without classes (a folder "
                            "of class subfolders trains a class-conditional one)")  # fmt: skip


    reported: set[str] = set()

    def on_skip(failed: list[tuple[str, str]]) -> None:
        """Images that stopped decoding mid-run: replaced by a readable one, listed once."""
        failed = [(p, r) for p, r in dict(failed).items() if p not in reported]
        reported.update(p for p, _ in failed)
        if not failed:
            return
        if d.main:
            for p, r in failed:
                append_line(out / SKIPPED, f"{p}\t{r}")
        on_event("skip", {"failed": failed})

    state = new_state(model_config, config, device)
    tables = DiffusionTables.from_config(diffusion).to(device, torch.float32)
    if device.type == "cuda":  # (weights are channels_last from new_state, device.place)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # fixed shapes: +19% img/s (docs/benchmarks.md)
    shape = (report.channels, *config.image_size)
    adjustable = resumed is None and "grad_accum" not in (given or {})
    config, memory_plan = memory.plan(state, tables, config, model_config.num_classes, shape,
                                      device, d, adjustable)  # fmt: skip

    use, heldout = None, None
    if config.holdout:  # the images the quality figure is computed on, never trained on
        use, aside = split(len(images), config.holdout, config.seed, images.labels)
        if len(aside) < config.holdout and "holdout" in (given or {}) and resumed is None:
            warnings.append(f"--holdout {config.holdout}: {count(len(aside), 'image')} set "
                            "aside, so that each class keeps one to train on")  # fmt: skip
        if len(aside) and d.main:
            heldout = quality.HeldOut.take(images, aside, config.seed)
    batches = Batches(
        images, config.batch_size, config.seed, config.flip, config.workers, on_skip=on_skip,
        shard=(d.rank, d.world), device=device, use=use, shift=config.shift,
    )  # fmt: skip
    total = total_steps(config, batches.per_epoch)
    configs = {
        "model": model_config.to_dict(),
        "diffusion": diffusion.to_dict(),
        "training": config.to_dict(),
        # on resume the cache knows no file sizes or skipped files: keep the stored summary
        "data": resumed.data if resumed is not None else {**report.summary(), **where(source)},
    }
    if parent is not None or (resumed is not None and "parent" in resumed.ckpt.config):
        configs["parent"] = parent.summary if parent else resumed.ckpt.config["parent"]

    parent_notes = finetune.load_parent(state, parent, model_config) if parent else []
    elapsed0 = restore_state(state, ckpt, device, warnings) if resumed is not None else 0.0
    trained0 = resumed.trained_seconds(elapsed0) if resumed is not None else 0.0
    stored_world = resumed.world if resumed is not None else d.world
    if stored_world != d.world:  # keep the data position: the same image of the epoch
        seen = state.batch_in_epoch * config.batch_size * stored_world
        state.batch_in_epoch = seen // batches.batch_size
        total = steps_left_by_epoch(config, state, batches.per_epoch, total)
    done = resumed and nothing_left(config, state.step, total, trained0, given or {})
    if done:  # before anything is written: the run stays as it was
        raise UsageError(f"{out} {done}")
    if resumed is not None and d.main:
        warnings += prepare_directory(out, True, config, images, report, ckpt)
    live = loggers.open_loggers(config.log, out, state.step, configs, quiet) if d.main else []
    for logger in live:
        held.callback(logger.close)
    forward = state.model
    if d.active:
        # every rank starts from the same weights (the same seed); dropout differs per rank
        torch.manual_seed(distributed.rank_seed(config.seed, d.rank, state.step))
        forward = torch.nn.parallel.DistributedDataParallel(
            state.model, device_ids=[device.index] if device.type == "cuda" else None
        )
    forward = compiled(forward, device, d.active) if config.compile else forward

    on_event(
        "start",
        {
            "out": out,
            "report": report,
            "data": configs["data"],
            "config": config,
            "model": model_config,
            "diffusion": diffusion,
            "parameters": count_parameters(state.model),
            "total": total,
            "step": state.step,
            "trained": trained0,
            "device": str(device),
            "resumed": resumed is not None,
            "world": d.world,
            "stored_world": stored_world,
            "set_aside": 0 if use is None else len(images) - len(use),
            "parent": configs.get("parent"),
            "parent_notes": parent_notes,
            "warnings": warnings,
            "memory": memory_plan,
        },
    )
    if (report.skipped or report.unsearched) and d.main:
        lines = "".join(f"{p}\t{r}\n" for p, r in report.unsearched + report.skipped)
        write_atomic(out / SKIPPED, os.fsencode(lines), follow=False)  # names as their bytes
    return Prepared(
        out=out, config=config, diffusion=diffusion, model=model_config, configs=configs,
        report=report, batches=batches, state=state, tables=tables, forward=forward, total=total,
        elapsed0=elapsed0, trained0=trained0, d=d, device=device, stored_world=stored_world,
        loggers=live, held=heldout, best=best_figure(out) if resumed is not None else None,
        created=created if resumed is None else None,
    )  # fmt: skip


def where(source: str | None) -> dict:
    """A folder's absolute path, stored so that `--resume` finds a relative one from any
    working directory (resume.Resumed.source)."""
    if source is None or source.startswith(BUILTIN_PREFIX) or not Path(source).exists():
        return {}
    return {"source_path": str(Path(source).resolve())}
