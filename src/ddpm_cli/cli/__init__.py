"""The `ddpm` command line: a thin Typer layer that translates options into core calls.

This package is the only place that imports typer or rich. Its modules import the core (torch)
inside each command's body, never at the top: `ddpm --help`, each command's help and every Tab
press of shell completion then start in a fraction of a second, where importing torch takes
seconds on a laptop CPU (tests/test_cli_app.py checks that they load no torch).
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from ddpm_cli import __version__
from ddpm_cli.cli.common import DdpmGroup, err_console
from ddpm_cli.cli.edit import inpaint, upscale
from ddpm_cli.cli.eval import eval_
from ddpm_cli.cli.inspect import inspect
from ddpm_cli.cli.interop import export, import_
from ddpm_cli.cli.noise import noise
from ddpm_cli.cli.sample import sample
from ddpm_cli.cli.train import train
from ddpm_cli.errors import DdpmError
from ddpm_cli.host import tune_allocator

CONTEXT = {"help_option_names": ["-h", "--help"]}

app = typer.Typer(
    name="ddpm",
    cls=DdpmGroup,
    help=(
        "Train and sample Denoising Diffusion Probabilistic Models (Ho, Jain & Abbeel, 2020).\n\n"
        "Data (paths, images, JSON) goes to stdout; progress and messages go to stderr."
    ),
    epilog="Example: [bold]ddpm noise cat.png --t 0,100,250,500,999 -o strip.png[/bold]",
    rich_markup_mode="rich",
    context_settings=CONTEXT,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)


def _version(value: bool) -> None:
    if value:
        print(f"ddpm {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", "-V", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    pass  # the help text is the Typer app's; this callback only adds --version


app.command(name="noise", context_settings=CONTEXT)(noise)
app.command(name="train", context_settings=CONTEXT)(train)
app.command(name="sample", context_settings=CONTEXT)(sample)
app.command(name="inpaint", context_settings=CONTEXT)(inpaint)
app.command(name="upscale", context_settings=CONTEXT)(upscale)
app.command(name="inspect", context_settings=CONTEXT)(inspect)
app.command(name="eval", context_settings=CONTEXT)(eval_)
app.command(name="import", context_settings=CONTEXT)(import_)
app.command(name="export", context_settings=CONTEXT)(export)


def main() -> None:
    """The command line, as the `ddpm` script and `python -m ddpm_cli` run it (through
    ddpm_cli.__main__, which exits quietly on a Ctrl-C while this module loads)."""
    try:
        tune_allocator()  # a process of ours: keep large blocks mapped (host.tune_allocator)
    except DdpmError:  # a bad environment switch: the app says so in its one error line
        pass
    try:
        app()
    except SystemExit as done:
        distributed = sys.modules.get("ddpm_cli.distributed")  # loaded by the commands that run
        if distributed is not None and distributed.joined():  # a torchrun process: no teardown
            distributed.exit_process(_exit_code(done.code))
        raise


def _exit_code(code) -> int:
    """The status SystemExit(code) ends a process with: None is 0, a message is 1."""
    if code is None:
        return 0
    return code if isinstance(code, int) else 1


__all__ = ["app", "main", "err_console"]
