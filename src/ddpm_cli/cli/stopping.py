"""How `ddpm train` stops: on a signal, when its stderr goes away, or when the machine runs out.

Ctrl-C, SIGTERM and SIGHUP (the terminal or ssh session closed) ask for a checkpoint after the
current step and exit with 128 + the signal; a second Ctrl-C or SIGTERM quits at once (every
write is atomic). A stderr whose reader has gone (`ddpm train ... 2>&1 | head`) stops the same
way, silently, with the shell's code for SIGPIPE. Running out of memory or disk is one line
saying which checkpoint is intact and what to try.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from ddpm_cli.cli.common import discard, err_console
from ddpm_cli.errors import RESOURCE_HINTS, ResourceError, exhausted
from ddpm_cli.store.files import STATE

# each signal that stops training, and its exit code: 128 + the signal
EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}
if hasattr(signal, "SIGHUP"):  # not on Windows
    EXIT_SIGNAL[signal.SIGHUP] = 129
LOST_OUTPUT = "stderr closed"  # a stop with no signal: stderr's reader went away
EXIT_LOST_OUTPUT = 141  # what a shell reports for a writer killed by SIGPIPE
TRAIN_MEMORY_HINT = (
    "resume with --grad-checkpoint (less memory, the same update), or start a new run with "
    "--grad-accum 2 (each step in two halves) or a smaller --batch-size"
)


class Stopper:
    """The stop requests of one training run: install() the signal handlers, pass show() as
    the run's event callback (it wraps `view`), ask requested() between steps."""

    def __init__(self, view: Callable[[str, dict], None], out: Path | None, speaks: bool = True):
        self.view, self.out = view, out  # out: the run directory, once known
        self.speaks = speaks  # False in a torchrun job's processes but rank 0
        self.signal: int | str | None = None
        self.lost = False
        self.previous: dict = {}

    def requested(self) -> bool:
        return self.signal is not None

    def signalled(self) -> bool:
        """Whether a signal (not a lost stderr) asked for the stop."""
        return self.signal in EXIT_SIGNAL

    def lost_output(self) -> None:
        """stderr's reader has gone: go on silently to a checkpoint after this step."""
        self.lost = True
        discard(sys.stderr)
        if self.signal is None:
            self.signal = LOST_OUTPUT

    def handler(self, signum, frame) -> None:
        if self.signal is not None:
            if signum == getattr(signal, "SIGHUP", None):
                return  # a hang-up said again (terminal, then shell): the checkpoint still comes
            os._exit(EXIT_SIGNAL.get(signum, 1))  # second signal: leave now; writes are atomic
        self.signal = signum
        if not self.speaks:
            return
        try:
            err_console.print(
                "[yellow]stopping: saving a checkpoint after this step "
                "(press Ctrl-C again to quit at once)[/yellow]"
            )
        except OSError:  # SIGHUP: the terminal may be gone already
            self.lost_output()

    def show(self, kind: str, info: dict) -> None:
        if kind == "start":
            self.out = info["out"]
        if self.lost:
            return
        try:
            self.view(kind, info)
        except OSError:
            self.lost_output()

    def install(self) -> None:
        # `nohup ddpm train` ignores SIGHUP on purpose: keep it ignored
        caught = [s for s in EXIT_SIGNAL if signal.getsignal(s) is not signal.SIG_IGN]
        self.previous = {s: signal.signal(s, self.handler) for s in caught}

    def restore(self) -> None:
        for s, h in self.previous.items():
            signal.signal(s, h)

    def exit_code(self) -> int:
        if self.signal == LOST_OUTPUT:
            return EXIT_LOST_OUTPUT
        return EXIT_SIGNAL.get(self.signal, 130)

    def out_of(self, error: BaseException) -> ResourceError | None:
        """The one-line error for a run that ran out of memory or disk; None for anything else."""
        what = exhausted(error)
        if what is None:
            return None
        hint = TRAIN_MEMORY_HINT if what == "memory" else RESOURCE_HINTS[what]
        return ResourceError(f"out of {what}: {saved_text(self.out)}; {hint}")


def saved_text(out: Path | None) -> str:
    """What a run that failed has kept: its last checkpoint, and how to continue from it."""
    from ddpm_cli.store.checkpoint import header_value

    step = header_value(Path(out) / STATE, "step") if out is not None else None
    if not isinstance(step, int) or isinstance(step, bool):
        return "nothing was saved yet"
    return f"the checkpoint of step {step} in {out} is intact (ddpm train --resume {out})"
