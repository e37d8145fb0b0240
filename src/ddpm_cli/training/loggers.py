"""Live logs of a run for the tools people watch runs in (`ddpm train --log tensorboard`):
what metrics.jsonl records (loss, loss per quarter of t, learning rate, grad norm, img/s, EMA
decay) as scalars, and each sample grid as an image, under the run directory's tensorboard/.

Optional: the package comes with the `tensorboard` extra; without it the run is refused before
it starts, in one line that says what to install. Only rank 0 of a torchrun job writes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ddpm_cli.config import LogTo
from ddpm_cli.errors import MissingExtra

TENSORBOARD_DIR = "tensorboard"
INSTALL = "pip install 'ddpm-cli[tensorboard]'"


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
        """One metrics.jsonl record (run_files.metrics_record) as scalars at its step."""
        step = r["step"]
        for key in ("loss", "lr", "grad_norm", "img_per_s", "ema_decay"):
            if r.get(key) is not None:
                self.writer.add_scalar(f"train/{key}", r[key], step)
        for q, value in enumerate(r.get("loss_quarters") or []):
            if value is not None:
                self.writer.add_scalar(f"loss_by_t/quarter_{q + 1}", value, step)

    def grid(self, path: Path, step: int) -> None:
        """A sample grid PNG as an image at its step."""
        with Image.open(path) as img:
            pixels = np.asarray(img.convert("RGB"))
        self.writer.add_image("samples", pixels, step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def check(names: tuple[LogTo, ...]) -> None:
    """Refuse, before any work, a logger whose package is missing."""
    if LogTo.tensorboard in names:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise MissingExtra(
                f"--log tensorboard needs the tensorboard package, which is not installed; "
                f"run: {INSTALL}"
            ) from None


def open_loggers(names: tuple[LogTo, ...], out: Path, step: int) -> list[TensorBoard]:
    """The loggers `names` ask for, writing under the run directory `out` from `step` on."""
    return [TensorBoard(out, step) for name in names if name is LogTo.tensorboard]
