"""Live logs of a run for the tools people watch runs in (`ddpm train --log tensorboard`,
`--log wandb`): what metrics.jsonl records (loss, loss per quarter of t, learning rate, grad
norm, img/s, EMA decay, the quality figure) as scalars, and each sample grid as an image,
under the run directory's tensorboard/ or wandb/.

Optional: the packages come with the `tensorboard` and `wandb` extras; without one, the run is
refused before it starts, in one line that says what to install. Only rank 0 of a torchrun job
writes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ddpm_cli.config import LogTo
from ddpm_cli.errors import LoggerError, MissingExtra
from ddpm_cli.store.files import FIGURE

TENSORBOARD_DIR, WANDB_DIR = "tensorboard", "wandb"
INSTALL = {
    LogTo.tensorboard: "pip install 'ddpm-cli[tensorboard]'",
    LogTo.wandb: "pip install 'ddpm-cli[wandb]'",
}


class TensorBoard:
    """Event files under RUN/tensorboard/, one writer per process that trains the run."""

    def __init__(self, out: Path, step: int = 0):
        """`step`: where the run starts; a resumed run's events past it (logged after its
        checkpoint) are dropped, as metrics.jsonl's lines are."""
        check((LogTo.tensorboard,))
        from torch.utils.tensorboard import SummaryWriter

        log_dir = str(Path(out) / TENSORBOARD_DIR)
        self.writer = SummaryWriter(log_dir=log_dir, purge_step=step + 1 if step else None)

    def record(self, r: dict) -> None:
        """One metrics.jsonl record (run_files.metrics_record, or a quality figure's from
        Loop.evaluate) as scalars at its step."""
        for tag, value in scalars(r).items():
            self.writer.add_scalar(tag, value, r["step"])
        if r.get(FIGURE) is not None:
            self.writer.flush()

    def grid(self, path: Path, step: int) -> None:
        """A sample grid PNG as an image at its step."""
        with Image.open(path) as img:
            pixels = np.asarray(img.convert("RGB"))
        self.writer.add_image("samples", pixels, step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandB:
    """A Weights & Biases run for the run directory, its files under RUN/wandb/. Its id is kept
    in RUN/wandb/ddpm-run-id, so a resumed run goes on logging into the same W&B run (W&B
    ignores steps it has already seen). wandb's own settings apply: WANDB_MODE=offline (or
    `wandb offline`) keeps everything local, WANDB_PROJECT names the project."""

    def __init__(self, out: Path, step: int = 0, config: dict | None = None,
                 quiet: bool = False):  # fmt: skip
        """`quiet` (ddpm's -q): wandb's own lines on stderr are silenced too."""
        check((LogTo.wandb,))
        import wandb

        self.wandb = wandb
        folder = Path(out) / WANDB_DIR
        folder.mkdir(parents=True, exist_ok=True)
        id_file = folder / "ddpm-run-id"
        run_id = id_file.read_text().strip() if step and id_file.exists() else None
        try:
            self.run = wandb.init(
                dir=str(out), name=Path(out).name, id=run_id, config=config or {},
                resume="allow" if run_id else None,
                **({"settings": wandb.Settings(silent=True)} if quiet else {}),
            )
        except Exception as e:  # wandb's own errors: no login, no network, a bad setting
            why = first_line(e)
            raise LoggerError(
                f"--log wandb could not start a W&B run: {why.rstrip('. ')}; "
                + ("" if "wandb login" in why else "log in with `wandb login`, or ")
                + "set WANDB_MODE=offline to keep the logs local"
            ) from None
        id_file.write_text(self.run.id)

    def record(self, r: dict) -> None:
        """One metrics.jsonl record, under the same names as TensorBoard's."""
        values = scalars(r)
        if values:
            self.run.log(values, step=r["step"])

    def grid(self, path: Path, step: int) -> None:
        self.run.log({"samples": self.wandb.Image(str(path))}, step=step)

    def close(self) -> None:
        self.run.finish()


def scalars(r: dict) -> dict[str, float]:
    """The scalars of a metrics.jsonl record (run_files.metrics_record, or a quality figure's
    from Loop.evaluate) by their live-log names."""
    values = {f"train/{k}": r[k] for k in ("loss", "lr", "grad_norm", "img_per_s", "ema_decay")
              if r.get(k) is not None}  # fmt: skip
    for q, value in enumerate(r.get("loss_quarters") or []):
        if value is not None:
            values[f"loss_by_t/quarter_{q + 1}"] = value
    if r.get(FIGURE) is not None:
        values[f"quality/{FIGURE}"] = r[FIGURE]
    return values


def first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def check(names: tuple[LogTo, ...], kept: tuple[LogTo, ...] = ()) -> None:
    """Refuse, before any work, a logger whose package is missing; `kept`: those a resumed
    run logs to because it did before (not typed again)."""
    for name in names:
        try:
            __import__(name.value)
        except ImportError:
            what = (f"the run logs to {name.value} (--log is kept on resume), which needs"
                    if name in kept else f"--log {name.value} needs")  # fmt: skip
            raise MissingExtra(
                f"{what} the {name.value} package, not installed here; run: {INSTALL[name]}"
            ) from None


def open_loggers(names: tuple[LogTo, ...], out: Path, step: int, config: dict | None = None,
                 quiet: bool = False):  # fmt: skip
    """The loggers `names` ask for, writing under the run directory `out` from `step` on;
    `config`: the run's configs, for loggers that record them (W&B); `quiet`: say nothing."""
    made = []
    try:
        for name in names:
            made.append(TensorBoard(out, step) if name is LogTo.tensorboard
                        else WandB(out, step, config, quiet))  # fmt: skip
    except Exception:
        for logger in made:  # the ones that did start
            logger.close()
        raise
    return made
