"""A training run: its directory, data, loop, checkpoints, sample grids, metrics and resume.

    runs/NAME/
      model.safetensors        EMA weights + full config: the file to sample from
      train_state.safetensors  raw weights, EMA, Adam moments, RNG states, data position
                               (written and read by train_state.py)
      metrics.jsonl            one JSON object per logged step
      samples/step-NNNNNNN.png sample grids from the EMA weights
      data_cache.safetensors   the decoded training images (uint8), reused on resume and
                               usable as the DATA of a new run (not written when streaming)
      skipped.txt              images that could not be read, and why
      .lock                    held while a process trains here (files.RunLock)

run_files.py writes the files; under torchrun only rank 0 does (docs/distributed.md).
Progress is reported to `on_event(kind, info)`; nothing here prints.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ddpm_cli import distributed
from ddpm_cli.batches import Batches
from ddpm_cli.checkpoint import config_section, load_checkpoint
from ddpm_cli.config import (
    DiffusionConfig,
    ModelConfig,
    TrainConfig,
    from_dict,
    jsonable,
)
from ddpm_cli.device import resolve_device
from ddpm_cli.errors import UsageError
from ddpm_cli.files import MODEL, STATE, RunLock
from ddpm_cli.presets import build_model_config, recipe_for
from ddpm_cli.run_files import (
    CACHE,
    METRICS,
    SKIPPED,
    metrics_record,
    prepare_directory,
    write_grid,
)
from ddpm_cli.schedules import DiffusionTables
from ddpm_cli.sources import data_image_size, load_source
from ddpm_cli.train import (
    check_finite,
    compiled,
    ema_decay_at,
    new_state,
    resolve,
    to_host,
    total_steps,
    train_step,
)
from ddpm_cli.train_state import restore_state, save_run
from ddpm_cli.unet import count_parameters

# options a resumed run may change; everything else must match the stored run
RESUMABLE = {
    "steps",
    "epochs",
    "time_limit",
    "lr",
    "cooldown",
    "sample_every",
    "checkpoint_every",
    "log_every",
    "num_samples",
    "device",
    "compile",
    "stream",
    "workers",
    "data_cache",
}
DIFFUSION_OPTIONS = ("schedule", "timesteps")  # part of the model: never changed on resume
SYNC_EVERY = 25  # steps between the host's waits for an accelerator (see the loop)

Event = Callable[[str, dict], None]


@dataclass(frozen=True)
class RunResult:
    out: Path
    step: int
    total: int | None  # the step limit; None when only a time limit bounds the run
    status: str  # "done" or "stopped"
    loss: float | None


def _steps_left_by_epoch(config: TrainConfig, state, per_epoch: int, total: int) -> int:
    """After resuming with another number of processes, steps counted so far were of another
    global batch: an epoch limit becomes the steps left to its end, in today's batches."""
    if config.epochs is None:
        return total
    left = (config.epochs - state.epoch) * per_epoch - state.batch_in_epoch
    by_epoch = state.step + max(0, math.ceil(left / config.grad_accum))
    return min(by_epoch, config.steps) if config.steps is not None else by_epoch


def next_run_dir(root: Path, name: str) -> Path:
    n = 1
    while (root / f"{name}-{n}").exists():
        n += 1
    return root / f"{name}-{n}"


def _merge_resume(stored: TrainConfig, diffusion: DiffusionConfig, given: dict) -> TrainConfig:
    """The stored config with the safe options the user gave; refuse conflicting ones."""
    values = stored.to_dict()
    conflicts = []
    for key in DIFFUSION_OPTIONS:
        if key in given:
            have = diffusion.to_dict()[key]
            mine = from_dict(DiffusionConfig, {**diffusion.to_dict(), key: given[key]}).to_dict()
            if mine[key] != have:
                conflicts.append(f"--{key} {jsonable(given[key])} (the run has {have})")
    for key, value in given.items():
        if key in DIFFUSION_OPTIONS:
            continue
        # normalise through the dataclass, so "32" and (32, 32) compare equal to the stored [32, 32]
        normalized = from_dict(TrainConfig, {**values, key: jsonable(value)}).to_dict()[key]
        if key in RESUMABLE:
            values[key] = normalized
        elif normalized != values.get(key):
            conflicts.append(f"--{key.replace('_', '-')} {value} (the run has {values.get(key)})")
    if conflicts:
        raise UsageError(
            "cannot change on resume: " + "; ".join(conflicts) + ". Start a new run with --out"
        )
    return from_dict(TrainConfig, values)


def train(
    source: str | None,
    config: TrainConfig,
    diffusion: DiffusionConfig,
    out: Path | None = None,
    resume: Path | None = None,
    given: dict | None = None,
    on_event: Event = lambda kind, info: None,
    should_stop: Callable[[], bool] = lambda: False,
) -> RunResult:
    """Train from `source` (a folder, "builtin:NAME" or None for the default built-in dataset)
    into `out`, or continue the run in `resume`. `given`: the options the user set explicitly,
    checked against the stored run on resume. A `diffusion` schedule of None is the preset's
    (presets.Recipe); a resumed run keeps its own."""
    started = time.perf_counter()
    ckpt = model_config = stored_data = None
    if resume is not None:
        if source is not None:
            raise UsageError("--resume trains on the run's own stored data; drop the DATA argument")
        if out is not None and Path(out).resolve() != Path(resume).resolve():
            raise UsageError("--resume continues in the run's own directory; drop --out")
        out = Path(resume)
        if not (out / STATE).exists():
            raise UsageError(f"{out}: no {STATE} to resume from; is this a run directory?")
        ckpt = load_checkpoint(out / STATE, kind="train_state")
        stored = config_section(ckpt, "training", TrainConfig)
        if "cooldown" not in ckpt.config.get("training", {}):  # saved before cooldowns existed:
            stored = replace(stored, cooldown=0.0)  # it goes on at a constant rate, as planned
        diffusion = config_section(ckpt, "diffusion", DiffusionConfig)
        config = _merge_resume(stored, diffusion, given or {})
        model_config = config_section(ckpt, "model", ModelConfig)
        stored_data = ckpt.config.get("data", {})
        source = stored_data.get("source")
    d, device = distributed.init(resolve_device(config.device))
    with contextlib.ExitStack() as held:  # the process group, then the run directory's lock
        held.callback(distributed.shutdown)
        result = _train(source, config, diffusion, out, resume, on_event, should_stop, started,
                        d, device, ckpt, model_config, stored_data, held)  # fmt: skip
        distributed.leave_together(d)
        return result


def _train(source, config, diffusion, out, resume, on_event, should_stop, started, d, device,
           ckpt, model_config, stored_data, held: contextlib.ExitStack) -> RunResult:  # fmt: skip
    """The run itself, in this process of a job of d.world (1 without torchrun); what it
    must release when it ends goes on `held`."""
    if not d.main:  # progress, files and messages are rank 0's
        on_event = lambda kind, info: None  # noqa: E731

    labelled = not config.unconditional
    if config.image_size is None:  # the data's own size (sources.data_image_size)
        config = replace(config, image_size=data_image_size(source))
    if resume is not None and (out / CACHE).exists():
        images, report = load_source(
            str(out / CACHE), config.image_size, config.channels, classes=labelled
        )
    else:
        images, report = load_source(
            source, config.image_size, config.channels, config.stream, classes=labelled
        )
    if resume is not None and report.fingerprint != stored_data.get("fingerprint"):
        raise UsageError(
            f"{source} has changed since the run started (files added, removed or resized), so "
            "the run cannot continue exactly; restore the folder, or start a new run with --out"
        )
    if resume is None:
        out = Path(out) if out is not None else next_run_dir(Path("runs"), report.name)
        if (out / STATE).exists() or (out / MODEL).exists():
            raise UsageError(
                f"{out} already holds a run; continue it with --resume {out} "
                "or choose another --out"
            )
        config = resolve(config, device, report.used, report.channels, d.world)
        if diffusion.schedule is None:  # the preset's
            diffusion = replace(diffusion, schedule=recipe_for(config.preset).schedule)
        model_config = build_model_config(
            config.preset, config.image_size, report.channels, classes=tuple(report.classes)
        )
    else:
        config = resolve(config, device, report.used, report.channels, d.world)
    # rank 0's choices (the run directory's name, a random seed) are the job's
    out, config = distributed.broadcast(d, (out, config))
    if d.main:
        Path(out).mkdir(parents=True, exist_ok=True)
        held.enter_context(RunLock(out))  # before anything in the directory changes
        prepare_directory(out, resume, config, images, report, ckpt)

    reported: set[str] = set()

    def on_skip(failed: list[tuple[str, str]]) -> None:
        """Images that stopped decoding mid-run: replaced by a readable one, listed once."""
        failed = [(p, r) for p, r in dict(failed).items() if p not in reported]
        reported.update(p for p, _ in failed)
        if not failed:
            return
        if d.main:
            with open(out / SKIPPED, "a") as f:
                f.writelines(f"{p}\t{r}\n" for p, r in failed)
        on_event("skip", {"failed": failed})

    batches = Batches(
        images, config.batch_size, config.seed, config.flip, config.workers, on_skip=on_skip,
        shard=(d.rank, d.world), device=device,
    )  # fmt: skip
    total = total_steps(config, batches.per_epoch)
    configs = {
        "model": model_config.to_dict(),
        "diffusion": diffusion.to_dict(),
        "training": config.to_dict(),
        # on resume the cache knows no file sizes or skipped files: keep the stored summary
        "data": stored_data if resume is not None else report.summary(),
    }

    state = new_state(model_config, config, device)
    elapsed0 = restore_state(state, ckpt, device) if resume is not None else 0.0
    # seconds spent in the training loop so far, what --time counts (runs saved before --time
    # existed stored only the whole elapsed time)
    trained0 = 0.0
    if resume is not None:
        trained0 = ckpt.json("train_seconds") if "train_seconds" in ckpt.meta else elapsed0
    stored_world = d.world
    if resume is not None:  # runs saved before distributed training had one process
        stored_world = ckpt.json("world_size") if "world_size" in ckpt.meta else 1
    if stored_world != d.world:  # keep the data position: the same image of the epoch
        seen = state.batch_in_epoch * config.batch_size * stored_world
        state.batch_in_epoch = seen // batches.batch_size
        total = _steps_left_by_epoch(config, state, batches.per_epoch, total)
    tables = DiffusionTables.from_config(diffusion).to(device, torch.float32)
    if device.type == "cuda":  # (weights are channels_last from new_state, device.place)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # fixed shapes: +19% img/s (docs/benchmarks.md)
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
            "resumed": resume is not None,
            "world": d.world,
            "stored_world": stored_world,
        },
    )
    if report.skipped and d.main:
        lines = "".join(f"{p}\t{r}\n" for p, r in report.skipped)
        (out / SKIPPED).write_text(lines)

    window: list = []  # host results since the last metrics line
    pending: list = []  # results still on the device (train.py: steps never wait for it)
    # how often the host waits for the device: every step on the CPU, where it costs nothing;
    # every SYNC_EVERY steps on an accelerator, and always before anything is written
    sync_every = 1 if device.type == "cpu" else SYNC_EVERY
    t_log = loop_start = time.perf_counter()
    status, last_loss = "done", None

    def trained() -> float:
        """Seconds of training loop so far, over every resumed part of the run (--time)."""
        return trained0 + time.perf_counter() - loop_start

    def flush() -> None:
        """Bring the pending results to the host, check them (TrainingDiverged at the first
        non-finite step), add them to the log window and report progress."""
        nonlocal pending, last_loss
        if not pending:
            return
        results = to_host(pending)
        pending = []
        if d.active:  # the whole global batch's losses: for the log, and for every rank to
            # reach the same verdict below
            parts = distributed.gather(d, [(r.losses, r.t) for r in results])
            results = [
                replace(r, losses=torch.cat([p[i][0] for p in parts]),
                        t=torch.cat([p[i][1] for p in parts]))
                for i, r in enumerate(results)
            ]  # fmt: skip
        check_finite(results, config)
        if not d.main:
            return
        window.extend(results)
        losses = torch.cat([r.losses for r in results])
        last_loss = results[-1].loss
        on_event(
            "step",
            {
                "step": state.step,
                "total": total,
                "trained": trained(),
                "epoch": state.epoch,
                "loss": losses.mean().item(),
                "steps": len(results),  # the steps this report covers
                "lr": state.optimizer.param_groups[0]["lr"],
                "images": losses.numel(),
            },
        )

    def log_window() -> None:
        nonlocal window, t_log
        now = time.perf_counter()
        elapsed = elapsed0 + now - started
        record = metrics_record(window, state, config, diffusion.timesteps, now - t_log, elapsed)
        with open(out / METRICS, "a") as f:
            f.write(json.dumps(record) + "\n")
        on_event("log", record)
        window, t_log = [], now

    def checkpoint() -> None:
        if not d.main:
            return
        elapsed = elapsed0 + time.perf_counter() - started
        decay = ema_decay_at(state.step, config.ema_decay)
        save_run(out, state, configs, elapsed, decay, world=d.world, trained=trained())
        on_event("checkpoint", {"step": state.step, "path": out / MODEL})

    feed = batches.iterate(state.epoch, state.batch_in_epoch)
    time_spent = 0.0  # the share of --time used, as the ranks agree on it
    while total is None or state.step < total:
        # in a job, the ranks agree on a stop and on the time spent (their clocks differ)
        # where they also wait for the device
        if not d.active or state.step % sync_every == 0:
            if distributed.any_rank(d, should_stop(), device):
                status = "stopped"
                break
            if config.time_limit is not None:
                time_spent = distributed.most(d, trained() / config.time_limit, device)
                if time_spent >= 1.0:
                    break
        # the share of the run done, for the learning rate's cooldown: of its steps, or of its
        # time, whichever limit is nearer
        progress = max(time_spent, state.step / total if total else 0.0)
        micro, labels = [], []
        for _ in range(config.grad_accum):
            x, y = next(feed)
            micro.append(x)
            labels.append(y)
            state.batch_in_epoch += 1
            if state.batch_in_epoch >= batches.per_epoch:
                state.epoch, state.batch_in_epoch = state.epoch + 1, 0
        with distributed.collective("a training step"):
            pending.append(train_step(
                state, micro, tables, config, device, forward, (d.rank, d.world),
                labels if model_config.num_classes else None, model_config.num_classes,
                progress,
            ))  # fmt: skip
        step = state.step
        log = step % config.log_every == 0 or step == total
        grid = config.sample_every and step % config.sample_every == 0
        save = step % config.checkpoint_every == 0
        if log or grid or save or step % sync_every == 0:
            with distributed.collective("a training step"):
                flush()
        if not d.main:
            continue
        if log:
            log_window()
        if grid:
            write_grid(out, state, diffusion, config, model_config, device, on_event)
        if save:
            checkpoint()
    feed.close()  # stops the DataLoader workers, if any
    with distributed.collective("a training step"):
        flush()
    if d.main and window:  # a stop between log steps: log the partial window too
        log_window()
    if state.step and (state.step % config.checkpoint_every or status == "stopped"):
        checkpoint()
    done_off_grid = config.sample_every and state.step % config.sample_every
    if status == "done" and done_off_grid and d.main:
        write_grid(out, state, diffusion, config, model_config, device, on_event)
    on_event("end", {"status": status, "step": state.step, "out": out})
    return RunResult(out, state.step, total, status, last_loss)
