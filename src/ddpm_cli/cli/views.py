"""What `ddpm train` and `ddpm sample` show while they run: the pre-flight table and the
progress views (Rich bars on a terminal, plain lines otherwise), all on stderr."""

from __future__ import annotations

import math
import time

from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from ddpm_cli.cli.common import count_bars, err_console, literal, safe, warning_line
from ddpm_cli.text import bytes_text, count, duration_text


def _batch(config, world: int) -> str:
    """Per-process batch x accumulation (x processes) = the global batch."""
    parts = [str(config.batch_size), str(config.grad_accum)] + ([str(world)] if world > 1 else [])
    text = " x ".join(parts)
    if world > 1:
        text += f" processes = {config.batch_size * config.grad_accum * world} global"
    else:
        text += " (grad accum)"
    return text


def warmup_text(steps, share, timed: bool) -> str:
    """"100", or "100 steps or 5% of the time" when a --time run's share ends it sooner."""
    if not timed or not share:
        return str(steps)
    return f"{steps} steps or {share:.0%} of the time"


def _length(total: int | None, time_limit: float | None) -> str:
    if time_limit is None:
        return f"{total} steps"
    if total is None:
        return f"{duration_text(time_limit)} of training"
    return f"{total} steps or {duration_text(time_limit)}, whichever ends first"


class LiveView:
    """How every command shows progress on stderr: Rich bars on a terminal, plain lines
    otherwise, nothing when quiet. Subclasses say what the bars and lines hold."""

    def __init__(self, quiet: bool):
        self.quiet, self.progress = quiet, None
        self.tasks: dict[str, object] = {}

    def start(self, progress: Progress | None = None) -> bool:
        """Start the bars (count_bars unless given), on a terminal only; whether they run."""
        if not self.quiet and err_console.is_terminal and self.progress is None:
            self.progress = progress or count_bars()
            self.progress.start()
        return self.progress is not None

    def bar(self, key: str, description: str, **update) -> None:
        """Add the bar `key` on first use, then update it (completed=, total=, fields)."""
        if self.progress is None:
            return
        if key not in self.tasks:
            self.tasks[key] = self.progress.add_task(description, total=update.get("total"))
        self.progress.update(self.tasks[key], **update)

    def line(self, text: str, dim: bool = False, warning: bool = False) -> None:
        """A message above the bars, or a plain line without them; `text` is shown as it is,
        never read as markup (it may hold file names)."""
        if self.quiet:
            return
        console = self.progress.console if self.progress else err_console
        line = literal(text)
        if dim:
            line.stylize("dim")
        if warning:
            line = Text.assemble(("warning: ", "yellow"), line)
        console.print(line)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


class ProgressView(LiveView):
    """Rich live progress on a terminal; plain lines at each log step otherwise."""

    def __init__(self, quiet: bool):
        super().__init__(quiet)
        self.smoothed = None  # loss, exponentially smoothed over steps
        self.rate, self.last = None, None  # img/s, smoothed; time of the last step
        self.limit = None  # seconds of training (--time)

    def event(self, kind: str, info: dict) -> None:
        if self.quiet:
            return
        getattr(self, f"on_{kind}", lambda info: None)(info)

    def on_start(self, info: dict) -> None:
        self.limit = info["config"].time_limit
        err_console.print(preflight_table(info))
        for w in [*info["report"].warnings, *info.get("warnings", [])]:
            warning_line(w)
        if info.get("memory") is not None and info["memory"].warning:
            warning_line(info["memory"].warning)
        bars = Progress(
            TextColumn("[bold]train[/bold]"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[position]}"),
            TextColumn("{task.fields[status]}"),
            TimeRemainingColumn(),
            console=err_console,
        )
        if self.start(bars):
            self.bar("train", "train", status="", **self._where(info))

    def on_step(self, info: dict) -> None:
        s, w = self.smoothed, 0.98 ** info["steps"]  # a report may cover several steps
        self.smoothed = info["loss"] if s is None else w * s + (1 - w) * info["loss"]
        now = time.perf_counter()
        if self.last is not None and now > self.last:
            rate = info["images"] / (now - self.last)
            self.rate = rate if self.rate is None else 0.9 * self.rate + 0.1 * rate
        self.last = now
        rate = f"  {self.rate:.1f} img/s" if self.rate else ""
        self.bar(
            "train",
            "train",
            **self._where(info),
            status=f"epoch {info['epoch']}  loss {self.smoothed:.4f}{rate}  lr {info['lr']:.2e}",
        )

    def _where(self, info: dict) -> dict:
        """The bar's extent: over seconds when only a time limit bounds the run, else steps."""
        total, step = info["total"], info["step"]
        if total is None:
            done = min(info["trained"], self.limit)
            return {"total": self.limit, "completed": done, "position": f"step {step}"}
        return {"total": total, "completed": step, "position": f"step {step}/{total}"}

    def on_log(self, r: dict) -> None:
        if self.progress is None:
            ips = f"{r['img_per_s']:.1f} img/s" if r["img_per_s"] else ""
            err_console.print(
                f"step {r['step']}  epoch {r['epoch']}  loss {r['loss']:.4f}  "
                f"grad {r['grad_norm']:.3f}  lr {r['lr']:.2e}  {ips}  ema {r['ema_decay']:.4f}"
            )

    def on_skip(self, info: dict) -> None:
        for _, reason in info["failed"]:
            self.line(f"skipped (listed in skipped.txt): {reason}", dim=True, warning=True)

    def on_sample(self, info: dict) -> None:
        self.line(f"samples: {info['path']}", dim=True)

    def on_checkpoint(self, info: dict) -> None:
        kept = f" (and {info['snapshot'].name})" if info.get("snapshot") else ""
        self.line(f"checkpoint at step {info['step']}: {info['path']}{kept}", dim=True)

    def on_eval(self, r: dict) -> None:
        best = "  (best so far: best.safetensors)" if r["best"] else ""
        self.line(f"step {r['step']}  held-out loss {r['heldout_loss']:.5f}{best}", dim=True)

    def on_end(self, info: dict) -> None:
        self.close()
        if info.get("unsaved"):
            undone = "removed" if info["created"] else "kept, its data cache removed"
            err_console.print(f"stopped before the first step: nothing saved, "
                              f"{safe(info['out'])} {undone}")  # fmt: skip
            return
        if info.get("untouched") and info["status"] == "stopped":
            err_console.print(f"stopped before the first step: {safe(info['out'])} is as it "
                              f"was, at step {info['step']}")  # fmt: skip
            return
        verb = "finished" if info["status"] == "done" else "stopped"
        err_console.print(f"{verb} at step {info['step']}: {safe(info['out'])}")


def parent_text(parent: dict | None, short: bool = False) -> str | None:
    """A fine-tuned model's parent: its file, step and content hash (the first 12 digits when
    `short`); None for a model that has none."""
    if not parent:
        return None
    digest = str(parent.get("content_hash"))
    return (f"{parent.get('file')} (step {parent.get('step')}, content hash "
            f"{digest[:12] if short else digest})")  # fmt: skip


def sizes_text(summary: dict) -> str:
    """The smallest, median and largest image of a data summary, each by its area."""
    return ", ".join(f"{k} {summary[f'{k}_size'][0]}x{summary[f'{k}_size'][1]}"
                     for k in ("min", "median", "max"))  # fmt: skip


def preflight_table(info: dict) -> Table:
    report, config, model = info["report"], info["config"], info["model"]
    s = info["data"]
    warmup = warmup_text(config.warmup_steps, config.warmup_share, config.time_limit is not None)
    table = Table(title="ddpm train", title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    modes = ", ".join(f"{m} {n}" for m, n in sorted(s["modes"].items()))
    rows = [
        (
            "data",
            f"{s['source']}: {s['used']} images used of {s['found']} found"
            + (f", {s['skipped']} skipped (see skipped.txt)" if s["skipped"] else ""),
        ),
        ("modes", modes or "-"),
        (
            "classes",
            ", ".join(
                f"{c} {n}" for c, n in zip(model.classes, s.get("class_counts", []), strict=False)
            )
            + f" (class-conditional, label dropped for {config.cond_drop:.0%}; "
            "--unconditional ignores the subfolders)"
            if model.classes
            else "none (unconditional)",
        ),
        ("sizes", sizes_text(s)),
        (
            "decoded",
            f"{bytes_text(s['bytes'])} as {report.channels}x{report.image_size[0]}x"
            f"{report.image_size[1]} uint8 (channels x height x width)"
            + (
                f"; streamed from disk, {config.workers} decoding processes"
                if s.get("streamed")
                else ", held in memory"
            ),
        ),
        ("augment", _augment(config, model)),
        (
            "model",
            f"{config.preset}: {info['parameters']:,} parameters, channels "
            f"{model.channels} x {','.join(map(str, model.channel_mult))}, "
            f"attention at {','.join(map(str, model.attention_resolutions)) or 'none'}"
            + (", scale-shift norms" if model.scale_shift else ""),
        ),
        (
            "diffusion",
            f"{info['diffusion'].schedule.value}, T={info['diffusion'].timesteps}, "
            f"predicting {config.objective.value}",
        ),
        (
            "training",
            f"{_length(info['total'], config.time_limit)}, batch "
            f"{_batch(config, info.get('world', 1))}, "
            f"lr {config.lr:g} (warm-up {warmup}"
            + (f", cooldown over the last {config.cooldown:.0%}" if config.cooldown else "")
            + f"), EMA up to {config.ema_decay}, "
            f"seed {config.seed}",
        ),
        ("quality", _quality(config, info["set_aside"])),
        (
            "device",
            f"{info['device']}, {config.precision.value}"
            + (", compiled" if config.compile else ""),
        ),
        (
            "run",
            f"{info['out']}" + (f" (resuming at step {info['step']})" if info["resumed"] else ""),
        ),
        ("logs", ", ".join(["metrics.jsonl", *(f"{x.value} (live)" for x in config.log)])),
    ]
    parent = info.get("parent")
    if parent:
        what = f"{parent_text(parent, short=True)}: fine-tuning its weights"
        rows.insert(5, ("from", what))
    rows += [("note", note) for note in info.get("parent_notes", [])]
    plan = info.get("memory")
    if plan is not None and plan.step is not None:
        need = bytes_text(plan.step.need(config.batch_size))
        have = bytes_text(plan.step.available)
        run = [name for name, _ in rows].index("run")
        rows.insert(run, ("memory", f"a step needs about {need} (measured), {have} available"))
    if plan is not None and plan.note:
        rows.append(("note", plan.note))
    world, stored = info.get("world", 1), info.get("stored_world", 1)
    if info["resumed"] and world != stored:
        now = config.batch_size * config.grad_accum * world
        note = (f"saved by {count(stored, 'process')}, resumed by {world}: the global batch "
                f"is now {now}")  # fmt: skip
        rows.append(("note", note + " (docs/distributed.md)"))
    for k, v in rows:
        table.add_row(k, literal(v))
    return table


def _augment(config, model) -> str:
    flips = "random horizontal flips" if config.flip else "no flips (--no-flip)"
    if not config.shift:
        return flips
    if model.augment:
        told = "the network is told each image's shift; samples are drawn unshifted"
    else:
        told = "started before ddpm told the network of them: samples may show reflected borders"
    n = config.shift
    return f"{flips}; shifts of up to {n} pixel{'s' * (n != 1)} each way ({told})"


def _quality(config, set_aside: int) -> str:
    if not config.evaluates_every or not set_aside:
        aside = "no images set aside (--holdout N)" if not set_aside else "--eval-every 0"
        return f"none: {aside}"
    return (
        f"held-out loss on {set_aside} images set aside, every {config.evaluates_every} "
        "steps and at the end; the lowest is kept as best.safetensors"
    )


class SampleProgress(LiveView):
    """Bars over images and over the denoising steps of the current batch; a plain line per
    batch otherwise."""

    def __init__(self, quiet: bool, total: int, steps: int):
        super().__init__(quiet)
        self.done, self.total = 0, total
        self.t = time.perf_counter()
        if self.start():
            self.bar("images", "images", total=total)
            self.bar("denoise", "denoise", total=steps)

    def step(self, i: int, total: int) -> None:
        self.bar("denoise", "denoise", completed=i, total=total)

    def batch_done(self, n: int) -> None:
        self.done += n
        if self.progress is not None:
            self.bar("images", "images", completed=self.done)
        else:
            self.line(f"{self.done}/{self.total} images ({time.perf_counter() - self.t:.1f} s)")


EVAL_TASKS = {
    "bound": "bound (network evaluations)",
    "reference": "reference images",
    "samples": "samples drawn",
    "features": "samples embedded",
}


class EvalProgress(LiveView):
    """A bar per task (EVAL_TASKS); otherwise a plain line at most every 10 seconds. The
    header is shown when the first task begins."""

    def __init__(self, quiet: bool, header: str):
        super().__init__(quiet)
        self.header, self.last = header, 0.0

    def update(self, task: str, done: int, total: int) -> None:
        if self.header is not None:
            self.line(self.header)
            self.start()
            self.header = None
        name = EVAL_TASKS.get(task, task)
        if self.progress is not None:
            self.bar(task, name, completed=done, total=total)
        elif (now := time.perf_counter()) - self.last >= 10 or done == total:
            self.last = now
            self.line(f"{name}: {done}/{total}")


SPARK = "▁▂▃▄▅▆▇█"


def loss_curve(metrics: list[dict], width: int = 60) -> str:
    """The loss over training as one line of block characters (log scale, mean per column)."""
    points = [(m["step"], m["loss"]) for m in metrics if m.get("loss", 0) > 0 and "step" in m]
    if not points:
        return "loss curve: no loss logged yet"
    logs = [math.log(loss) for _, loss in points]
    columns = min(width, len(logs))
    means = []
    for c in range(columns):
        chunk = logs[c * len(logs) // columns : (c + 1) * len(logs) // columns]
        means.append(sum(chunk) / len(chunk))
    lo, hi = min(means), max(means)
    span = (hi - lo) or 1.0
    line = "".join(SPARK[round((m - lo) / span * (len(SPARK) - 1))] for m in means)
    (s0, l0), (s1, l1) = points[0], points[-1]
    return (
        f"[bold]loss[/bold] (log scale) {l0:.4g} at step {s0} [cyan]{line}[/cyan] "
        f"{l1:.4g} at step {s1}"
    )
