"""What every command shares: the stderr console, option types, and the error boundary."""

from __future__ import annotations

import contextlib
import errno
import io
import os
import signal
import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.text import Text
from typer.core import TyperGroup

from ddpm_cli import runtime
from ddpm_cli.config import DEVICE_HELP, MAX_TIMESTEPS, Precision, Schedule
from ddpm_cli.errors import RESOURCE_HINTS, DdpmError, exhausted
from ddpm_cli.text import shown

# The upper bound of numeric options that count (steps, epochs, indices): far beyond any real
# use, so that a typo (a stray exponent) is refused at once rather than run for days. Every
# numeric option has a range, checked while the command line is parsed, before any work; a
# float range also refuses nan (tests/test_cli_app.py).
MAX_COUNT = 10**9

# Progress, tables and messages go to stderr; stdout carries only data (paths, PNG bytes, JSON).
class StreamConsole(Console):
    """A Rich console that reports a reader that has gone (a closed pipe, a hung-up terminal) as
    the BrokenPipeError it is, and then stays silent. Rich's own response is to exit the
    process at once (SystemExit from inside print), which would lose a training run's last
    steps; `ddpm train` instead saves a checkpoint and stops, as on Ctrl-C."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        raise BrokenPipeError(errno.EPIPE, "the reader of this output has gone")


err_console = StreamConsole(stderr=True, highlight=False, soft_wrap=True)


def safe(value: object) -> str:
    """Text from files or file names, ready to go inside Rich markup: brackets escaped (a class
    named `[bold]` shows as itself) and control characters, terminal escape sequences and
    non-UTF-8 bytes spelled out (text.shown)."""
    return escape(shown(str(value)))


def literal(value: object) -> Text:
    """A table cell shown exactly as `value` (text.shown), never read as markup."""
    return Text(shown(str(value)))


def error_line(message: str, usage: bool = False) -> None:
    """One red line on stderr (line breaks inside the message, say from a damaged file's
    metadata quoted in it, are shown escaped); nothing when stderr's reader has gone. In a
    torchrun job, rank 0 alone says a `usage` error (one every process meets alike: a bad
    option; DdpmError.job_wide), and the others name themselves in the errors they say."""
    rank = runtime.torchrun_rank()
    if rank and usage:
        return
    try:
        err_console.print(f"[bold red]{f'rank {rank}: ' if rank else ''}error:[/] "
                          f"{safe(message)}")  # fmt: skip
    except OSError:
        discard(sys.stderr)


def note_line(message: str) -> None:
    err_console.print(f"[dim]note:[/] {safe(message)}")


def warning_line(message: str) -> None:
    err_console.print(f"[yellow]warning:[/yellow] {safe(message)}")


def print_path(path: object) -> None:
    """A path on stdout, one a line, as the file system's bytes: a name that is not UTF-8 reaches
    the next program in the pipeline as the same file, not as an encoding error. A reader that
    has gone (`| head -0`) is not an error: the work is done and saved."""
    try:
        sys.stdout.flush()
        sys.stdout.buffer.write(os.fsencode(str(path)) + b"\n")
        sys.stdout.buffer.flush()
    except OSError:
        discard(sys.stdout)


def discard(stream) -> None:
    """Send what is still written to `stream` to /dev/null, once its reader has gone (a closed
    pipe, a hung-up terminal): later messages, and the interpreter's own flush at exit, are
    dropped instead of raising BrokenPipeError again."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, stream.fileno())
        os.close(null)
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        pass  # not a file descriptor (a test's captured stream): nothing to redirect


# Recent Typer vendors its own copy of click, older Typer uses click itself: take the exception
# classes from the module Typer's own BadParameter comes from, so both work.
_click_exceptions = sys.modules[typer.BadParameter.__module__]
ClickException = _click_exceptions.ClickException
ClickUsageError = _click_exceptions.UsageError
NoArgsIsHelpError = getattr(_click_exceptions, "NoArgsIsHelpError", None) or type(
    "NoArgsIsHelpError", (Exception,), {}
)


def _debugging() -> bool:
    try:
        return runtime.current().debug
    except DdpmError:  # a bad switch is reported as such, not as this error's cause
        return False


# the dependencies a command imports when it runs (cli/__init__): module -> package to install
DEPENDENCIES = {"torch": "torch", "torchvision": "torchvision", "numpy": "numpy",
                "safetensors": "safetensors", "PIL": "pillow", "platformdirs": "platformdirs"}


def _missing_package(error: Exception) -> str | None:
    """The package to install when `error` is the import of a dependency that is not there at
    all. A missing part of one (torch._C: a broken install) or any other module stays an
    internal error, whose traceback DDPM_DEBUG shows."""
    if not isinstance(error, ModuleNotFoundError):
        return None
    return DEPENDENCIES.get(error.name or "")


@contextlib.contextmanager
def deferred_interrupt():
    """A Ctrl-C inside the block waits until the block ends, then stops the command (exit 130,
    DdpmGroup.invoke); a second one stops it at once. Around a command's import of the core:
    raised inside torch's import of numpy, a KeyboardInterrupt was swallowed there (the command
    ran on as if never stopped) or left numpy half imported (an internal error)."""
    caught: list[int] = []
    previous = signal.getsignal(signal.SIGINT)

    def hold(signum, frame):
        if caught:  # asked twice (an import that hangs): now
            raise KeyboardInterrupt
        caught.append(signum)

    installed = False
    if previous is not signal.SIG_IGN and previous is not None:  # (ignored in a background
        try:  # job; None: a handler not set from Python, left alone)
            signal.signal(signal.SIGINT, hold)
            installed = True
        except ValueError:  # not the main thread: signals are not this code's to take
            pass
    try:
        yield
    finally:
        if installed:
            signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


# how Typer (pydantic) and click word a number that failed its option's type or range
_RANGE_FAILURES = ("Input should be", "is not in the range", "is not a valid")
# number options whose range excludes an end (Typer's min and max are inclusive): --lr 0 is no
# learning rate, --ema-decay 1 never moves; (lower end open, upper end open)
OPEN_ENDS = {"--lr": (True, False), "--min-snr-gamma": (True, False),
             "--strength": (True, False), "--ema-decay": (False, True)}  # fmt: skip


def open_range(ctx: typer.Context, param: typer.CallbackParam, value):
    """The callback of an OPEN_ENDS option: its excluded end is refused while the command
    line is parsed, in the words of any value out of range (_range_message)."""
    low, high = OPEN_ENDS[max(param.opts, key=len)]
    if value is not None and ((low and value == param.min) or (high and value == param.max)):
        raise typer.BadParameter("Input should be inside the range")
    return value


def _range_message(error: Exception, args: list[str]) -> str | None:
    """"Invalid value for '--lr': must be a number between 0 and 10, got nan": a numeric option's
    failed parse or range check in one wording, with the range and the value given. Typer says
    "Input should be less than or equal to 10" of nan, and of 11 "... greater than or equal
    to" only the bound that failed. None for other errors (a callback's own message)."""
    param = getattr(error, "param", None)
    lo, hi = getattr(param, "min", None), getattr(param, "max", None)
    message = error.format_message()
    if lo is None or hi is None or not any(f in message for f in _RANGE_FAILURES):
        return None
    opts = list(param.opts)
    given = None
    short = [o for o in opts if len(o) == 2 and o[0] == "-" and o[1] != "-"]
    for i, arg in enumerate(args):
        if arg in opts and i + 1 < len(args):
            given = args[i + 1]
        elif "=" in arg and arg.split("=", 1)[0] in opts:
            given = arg.split("=", 1)[1]
        elif any(arg.startswith(o) and len(arg) > 2 for o in short):  # -n0
            given = arg[2:]
    flag = max(opts, key=len)
    low, high = OPEN_ENDS.get(flag, (False, False))
    if isinstance(lo, int) and isinstance(hi, int):
        wanted = f"a whole number from {lo:,} to {hi:,}"
    elif low or high:
        wanted = (f"a number {'above' if low else 'at least'} {lo:g} and "
                  f"{'below' if high else 'at most'} {hi:g}")  # fmt: skip
    else:
        wanted = f"a number from {lo:g} to {hi:g}"
    return (f"Invalid value for '{flag}': must be {wanted}"
            + (f", got {given}" if given is not None else ""))  # fmt: skip


class DdpmGroup(TyperGroup):
    """The app's click group: the one place where errors become a line on stderr and an exit code.

    Usage errors from click (unknown option, bad choice) and every DdpmError from the core are
    reported as a single line, without traceback; exit 2 for usage errors, 1 for runtime errors.
    """

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:  # Ctrl-C in a command, e.g. while it imports torch: quietly
            raise typer.Exit(130) from None  # 128 + SIGINT (older Typer said "error: aborted")

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            runtime.current()  # the environment switches, read and checked once, here
            rv = super().main(
                args=args,
                prog_name=prog_name,
                complete_var=complete_var,
                standalone_mode=False,
                **extra,
            )
        except NoArgsIsHelpError as e:
            typer.echo(e.ctx.get_help() if e.ctx else "", nl=False)
            code = 2
        except ClickException as e:
            hint = ""
            if isinstance(e, ClickUsageError) and e.ctx is not None:
                hint = f" (see '{e.ctx.command_path} -h')"
            # Typer's pydantic-based parsing prefixes messages with "Value error, "
            message = _range_message(e, list(sys.argv[1:] if args is None else args)) or (
                e.format_message().replace("Value error, ", "")
            )
            error_line(f"{message}{hint}", usage=True)
            code = e.exit_code
        except BrokenPipeError:  # `ddpm inspect ... | head`: the reader has what it wanted
            discard(sys.stdout)
            code = 141  # what a shell reports for a writer stopped by SIGPIPE
        except typer.Abort:
            error_line("aborted")
            code = 1
        except DdpmError as e:
            error_line(str(e), usage=e.job_wide)
            code = e.exit_code
        except Exception as e:  # a bug: say so in one line, keep the traceback on request
            what = exhausted(e)  # not a bug when the machine ran out of memory or disk
            package = _missing_package(e)  # nor when an install lost a dependency
            if _debugging() and what is None:
                raise
            if what is not None:
                error_line(f"out of {what}: {RESOURCE_HINTS[what]}")
            elif package is not None:
                error_line(
                    f"{package} is missing from this Python environment ({sys.executable}): "
                    f"pip install {package}"
                )
            else:
                error_line(
                    f"internal error: {type(e).__name__}: {e} "
                    "(please report it; set DDPM_DEBUG=1 to see the traceback)"
                )
            code = 1
        else:
            code = rv if isinstance(rv, int) else 0
        if not standalone_mode:
            return code
        sys.exit(code)


DeviceOpt = Annotated[
    str,
    typer.Option(
        "--device", help=f"Where to compute: {DEVICE_HELP}. auto: CUDA, then MPS, then CPU."
    ),
]


def seed_option(help: str):
    """--seed: a non-negative 64-bit seed."""
    return Annotated[int | None, typer.Option("--seed", min=0, max=2**63 - 1, help=help)]


def overwrite_option(help: str):
    """--overwrite: what it replaces differs by command."""
    return Annotated[bool, typer.Option("--overwrite", help=help)]


def json_option(help: str = "Print the report as JSON on stdout."):
    return Annotated[bool, typer.Option("--json", help=help)]


PRECISION_DEFAULT = "Default: bf16 on CUDA GPUs from Ampere on and on x86 CPUs with AMX, else fp32."


def precision_option(before: str = "", after: str = ""):
    """--precision, its default rule said once, with what the command adds around it."""
    text = " ".join(part for part in (before, PRECISION_DEFAULT, after) if part)
    return Annotated[Precision | None, typer.Option("--precision", help=text, show_default=False)]


SeedOpt = seed_option("Random seed; the same seed gives the same bytes. Default: random.")
ScheduleOpt = Annotated[
    Schedule, typer.Option("--schedule", help="Beta schedule of the forward process.")
]
TimestepsOpt = Annotated[
    int,
    typer.Option(
        "--timesteps", "-T", max=MAX_TIMESTEPS, min=1, help="Number of diffusion steps T."
    ),
]
JsonOpt = json_option()
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Print no report or notes.")]
RawOpt = Annotated[
    bool, typer.Option("--raw", help="Use the raw training weights of the run instead of the EMA.")
]
BatchSizeOpt = Annotated[
    int | None,
    typer.Option("--batch-size", "-b", max=65_536, min=1, help="Default: from the free memory."),
]


def count_bars():
    """Rich progress bars on stderr: description, bar, done/total, time remaining."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err_console,
    )
