"""The steps of a prepared run (run.py prepares it): train until its step or time limit or a
stop, and meanwhile log metrics, draw sample grids and save checkpoints on their schedules.

Under torchrun every rank runs the loop; the ranks agree on a stop and on the time spent, and
only rank 0 writes files and reports. Progress goes to `on_event(kind, info)`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ddpm_cli import distributed
from ddpm_cli.config import DiffusionConfig, ModelConfig, TrainConfig
from ddpm_cli.data.batches import Batches
from ddpm_cli.data.folders import DataReport
from ddpm_cli.diffusion.schedules import DiffusionTables
from ddpm_cli.store.files import BEST, FIGURE, MODEL, append_line
from ddpm_cli.training import quality
from ddpm_cli.training.run_files import METRICS, metrics_record, save_snapshot, write_grid
from ddpm_cli.training.train import (
    TrainState,
    check_finite,
    check_weights_finite,
    ema_decay_at,
    to_host,
    train_step,
)
from ddpm_cli.training.train_state import save_model, save_run

SYNC_EVERY = 25  # steps between the host's waits for an accelerator (see `Loop.run`)

Event = Callable[[str, dict], None]


@dataclass(frozen=True)
class RunResult:
    out: Path
    step: int
    total: int | None  # the step limit; None when only a time limit bounds the run
    status: str  # "done" or "stopped"
    loss: float | None

    @property
    def unsaved(self) -> bool:
        """Stopped before its first step (only a new run can be: a resumed one starts from a
        saved step), so nothing in its directory is worth keeping."""
        return self.status == "stopped" and not self.step


@dataclass
class Prepared:
    """A run ready to train: its directory, configs, data, state and network, in this process
    of a job of d.world (run.prepare makes it)."""

    out: Path
    config: TrainConfig
    diffusion: DiffusionConfig
    model: ModelConfig
    configs: dict  # the JSON sections every checkpoint of the run stores
    report: DataReport
    batches: Batches
    state: TrainState
    tables: DiffusionTables
    forward: torch.nn.Module  # the network as the step calls it (DDP, compiled)
    total: int | None
    elapsed0: float  # seconds of the run before this process started it (resume)
    trained0: float  # of them, seconds in the training loop (--time)
    d: distributed.Dist
    device: torch.device
    stored_world: int
    loggers: list = field(default_factory=list)  # live logs (loggers.py), rank 0's
    held: quality.HeldOut | None = None  # the images set aside for the quality figure (rank 0)
    best: float | None = None  # the lowest quality figure so far (best.safetensors')
    # a new run that made its directory: the outermost folder it made (store.files.new_folder);
    # None for an --out that existed, and on resume
    created: Path | None = None


class Loop:
    """Runs a prepared run's steps; `run()` returns how it ended."""

    def __init__(
        self, job: Prepared, on_event: Event, should_stop: Callable[[], bool], started: float
    ):
        self.job, self.on_event, self.should_stop = job, on_event, should_stop
        self.started = started  # when the command started (the run's elapsed time)
        self.window: list = []  # host results since the last metrics line
        self.pending: list = []  # results still on the device (train.py: steps never wait)
        self.last_loss: float | None = None
        # the step of the last quality figure (a resumed run's figure at its step is logged)
        self.last_eval: int | None = job.state.step or None
        # how often the host waits for the device: every step on the CPU, where it costs
        # nothing; every SYNC_EVERY steps on an accelerator, and always before anything is written
        self.sync_every = 1 if job.device.type == "cpu" else SYNC_EVERY
        self.t_log = self.loop_start = self.stamp = time.perf_counter()

    def trained(self, live: bool = False) -> float:
        """Seconds of training loop so far, over every resumed part of the run (--time): up to
        the end of the last step (its `stamp`), which its metrics line, checkpoint and figure
        all record, so that a resume from that checkpoint goes on from what they say; `live`,
        up to now, for the time limit (the writes after a step count against it)."""
        end = time.perf_counter() if live else self.stamp
        return self.job.trained0 + end - self.loop_start

    def flush(self) -> None:
        """Bring the pending results to the host, check them (TrainingDiverged at the first
        non-finite step), add them to the log window and report progress."""
        r, d = self.job, self.job.d
        if not self.pending:
            return
        results = to_host(self.pending)
        self.pending = []
        if d.active:  # the whole global batch's losses: for the log, and for every rank to
            # reach the same verdict below
            parts = distributed.gather(d, [(x.losses.tolist(), x.t.tolist()) for x in results])
            results = [
                replace(x, losses=torch.tensor([v for p in parts for v in p[i][0]],
                                               dtype=x.losses.dtype),
                        t=torch.tensor([v for p in parts for v in p[i][1]], dtype=x.t.dtype))
                for i, x in enumerate(results)
            ]  # fmt: skip
        check_finite(results, r.config)
        if not d.main:
            return
        self.window.extend(results)
        losses = torch.cat([x.losses for x in results])
        self.last_loss = results[-1].loss
        self.on_event(
            "step",
            {
                "step": r.state.step,
                "total": r.total,
                "trained": self.trained(live=True),
                "epoch": r.state.epoch,
                "loss": losses.mean().item(),
                "steps": len(results),  # the steps this report covers
                "lr": r.state.optimizer.param_groups[0]["lr"],
                "images": losses.numel(),
            },
        )

    def elapsed(self) -> float:
        """Seconds of the run so far, start-up and earlier parts included."""
        return self.job.elapsed0 + time.perf_counter() - self.started

    def log_window(self) -> None:
        r = self.job
        now = time.perf_counter()
        record = metrics_record(self.window, r.state, r.config, r.diffusion.timesteps,
                                now - self.t_log, self.elapsed(), self.trained())  # fmt: skip
        self.record(record, "log")
        self.window, self.t_log = [], now

    def record(self, record: dict, kind: str) -> None:
        """A line of metrics.jsonl, also sent to the live logs and reported as `kind`."""
        append_line(self.job.out / METRICS, json.dumps(record))
        for logger in self.job.loggers:
            logger.record(record)
        self.on_event(kind, record)

    def evaluate(self) -> None:
        """The quality figure of the EMA weights now (quality.py); the lowest yet is saved as
        best.safetensors, with the figure in its metadata."""
        r, state = self.job, self.job.state
        self.last_eval = state.step
        if r.held is None:  # every image set aside stopped decoding (streamed data)
            return
        value = quality.heldout_loss(
            state.ema, r.tables, r.held, r.config.objective.value, r.device,
            r.config.batch_size, r.config.min_snr_gamma,
        )  # fmt: skip
        best = math.isfinite(value) and (r.best is None or value < r.best)
        if best:
            decay = ema_decay_at(state.step, r.config.ema_decay)
            save_model(r.out / BEST, state, r.configs, self.elapsed(), decay, **{FIGURE: value})
            r.best = value
        record = {"step": state.step, FIGURE: value, "best": best, "elapsed": self.elapsed(),
                  "trained": self.trained()}  # fmt: skip
        self.record(record, "eval")

    def checkpoint(self) -> None:
        r = self.job
        # on every rank (their weights are the same), so that all stop together
        check_weights_finite(r.state, r.config)  # never replace a good checkpoint with NaNs
        if not r.d.main:
            return
        decay = ema_decay_at(r.state.step, r.config.ema_decay)
        save_run(r.out, r.state, r.configs, self.elapsed(), decay, world=r.d.world,
                 trained=self.trained())  # fmt: skip
        snapshot = None
        if r.config.keep:
            snapshot, _ = save_snapshot(r.out, r.state.step, r.config.keep)
        self.on_event("checkpoint", {"step": r.state.step, "path": r.out / MODEL,
                                     "snapshot": snapshot})  # fmt: skip

    def grid(self) -> None:
        r = self.job
        path = write_grid(r.out, r.state, r.diffusion, r.config, r.model, r.device, self.on_event)
        for logger in r.loggers:
            logger.grid(path, r.state.step)

    def run(self) -> RunResult:
        r, d, state, config = self.job, self.job.d, self.job.state, self.job.config
        status, total, start, timed_out = "done", r.total, state.step, False
        feed = r.batches.iterate(state.epoch, state.batch_in_epoch)
        time_spent = 0.0  # the share of --time used, as the ranks agree on it
        while total is None or state.step < total:
            # in a job, the ranks agree on a stop and on the time spent (their clocks differ)
            # where they also wait for the device
            if not d.active or state.step % self.sync_every == 0:
                if distributed.any_rank(d, self.should_stop(), r.device):
                    status = "stopped"
                    break
                if config.time_limit is not None:
                    spent = self.trained(live=True) / config.time_limit
                    time_spent = distributed.most(d, spent, r.device)
                    if time_spent >= 1.0:  # the budget is spent: the checkpoint says so (at
                        # least the limit: the ranks stopped by the slowest one's clock)
                        spent_s = time_spent * config.time_limit - self.job.trained0
                        self.stamp = max(time.perf_counter(), self.loop_start + spent_s)
                        timed_out = True
                        break
            # the share of the run done, for the learning rate's cooldown: of its steps, or of
            # its time, whichever limit is nearer
            progress = max(time_spent, state.step / total if total else 0.0)
            micro, labels, shifts = [], [], []
            for _ in range(config.grad_accum):
                x, y, shift = next(feed)
                micro.append(x)
                labels.append(y)
                shifts.append(shift)
                state.batch_in_epoch += 1
                if state.batch_in_epoch >= r.batches.per_epoch:
                    state.epoch, state.batch_in_epoch = state.epoch + 1, 0
            with distributed.collective("a training step"):
                self.pending.append(train_step(
                    state, micro, r.tables, config, r.device, r.forward, (d.rank, d.world),
                    labels if r.model.num_classes else None, r.model.num_classes, progress,
                    shifts if r.model.augment else None,
                ))  # fmt: skip
            step = state.step
            log = step % config.log_every == 0 or step == total
            grid = config.sample_every and step % config.sample_every == 0
            save = step % config.checkpoint_every == 0
            figure = config.evaluates_every and step % config.evaluates_every == 0
            if log or grid or save or figure or step % self.sync_every == 0:
                with distributed.collective("a training step"):
                    self.flush()
            self.stamp = time.perf_counter()  # (the step is done wherever anything records it)
            if not d.main:
                if save:  # only the weight check runs here, so that the ranks stop together
                    self.checkpoint()
                continue
            if log:
                self.log_window()
            if grid:
                self.grid()
            if save:
                self.checkpoint()
            if figure:
                self.evaluate()
        feed.close()  # stops the DataLoader workers, if any
        finishing = bool(self.pending)  # steps not yet brought back (on an accelerator)
        with distributed.collective("a training step"):
            self.flush()
        if finishing:
            self.stamp = time.perf_counter()
        if d.main and self.window:  # a stop between log steps: log the partial window too
            self.log_window()
        # (a resume stopped before its first step leaves the run as it was, its options too)
        moved = state.step != start
        if moved and (state.step % config.checkpoint_every or status == "stopped" or timed_out):
            self.checkpoint()
        done_off_grid = config.sample_every and state.step % config.sample_every
        if status == "done" and done_off_grid and d.main:
            self.grid()
        # the finished run's own figure (a stop leaves at once)
        unmeasured = state.step and self.last_eval != state.step
        if status == "done" and config.evaluates_every and unmeasured and d.main:
            self.evaluate()
        result = RunResult(r.out, state.step, total, status, self.last_loss)
        # an unsaved run is discarded by run.train, once its loggers have closed
        made = r.created is not None
        self.on_event("end", {"status": status, "step": state.step, "out": r.out,
                              "unsaved": result.unsaved, "created": made,
                              "untouched": bool(start) and not moved})  # fmt: skip
        return result
