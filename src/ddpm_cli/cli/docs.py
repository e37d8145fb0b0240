"""Generate docs/cli.md from the commands themselves, so the reference cannot drift.

    python -m ddpm_cli.cli.docs > docs/cli.md

tests/test_docs.py fails when the file differs from what this prints.
"""

from __future__ import annotations

from enum import Enum

import typer
from rich.text import Text

from ddpm_cli import runtime

HEADER = """\
# CLI reference

Generated from the commands' own help by `python -m ddpm_cli.cli.docs > docs/cli.md`;
do not edit by hand. `tests/test_docs.py` fails when this file is out of date.

Every command takes `-h`/`--help`. Data (output paths, image bytes, JSON) goes to stdout;
progress, tables, notes and errors go to stderr, except the report of `ddpm inspect`, which is
its data: its tables (or `--json`) go to stdout, its notes and errors to stderr. Exit codes: 0
success, 1 runtime failure (a write that fails), 2 usage error (bad option or value, missing or
unreadable input), 130 when stopped with Ctrl-C.
"""


def _plain(markup: str | None) -> str:
    """Help text without Rich markup, as one paragraph per blank-line-separated block."""
    if not markup:
        return ""
    blocks = [" ".join(b.split()) for b in Text.from_markup(markup).plain.split("\n\n")]
    # example command lines read best as code
    blocks = [f"`{b}`" if b.startswith(("ddpm ", "cat ")) else b for b in blocks]
    return "\n\n".join(b for b in blocks if b)


def _default(param) -> str:
    value = param.default
    if value is None or getattr(param, "is_flag", False) or callable(value):
        return ""
    if isinstance(value, Enum):
        value = value.value
    return f"`{value}`"


def _describe(param) -> str:
    help_text = _plain(getattr(param, "help", None)).replace("|", "\\|")
    # an Enum option's choices, whether its default is a member or None
    kind = getattr(getattr(param, "type_descriptor", None), "annotation", None)
    if not (isinstance(kind, type) and issubclass(kind, Enum)) and isinstance(param.default, Enum):
        kind = type(param.default)
    if isinstance(kind, type) and issubclass(kind, Enum):
        help_text = f"{help_text} One of: {', '.join(f'`{c.value}`' for c in kind)}."
    return help_text


def _command_section(path: str, command) -> list[str]:
    lines = [f"## `{path}`", ""]
    help_text = _plain(command.help)
    if help_text:
        lines += [help_text, ""]
    params = [p for p in command.params if not getattr(p, "hidden", False)]
    arguments = [p for p in params if not p.opts[0].startswith("-")]
    options = [p for p in params if p.opts[0].startswith("-")]
    usage = " ".join([path, "[OPTIONS]"] + [  # an optional argument in brackets, as --help
        p.name.upper() if p.required else f"[{p.name.upper()}]" for p in arguments])
    if getattr(command, "commands", None):
        usage += " COMMAND [ARGS]..."
    lines += ["```", usage, "```", ""]
    if arguments:
        lines += ["| Argument | Description |", "| --- | --- |"]
        for p in arguments:
            lines.append(f"| `{p.name.upper()}` | {_describe(p)} |")
        lines.append("")
    if options:
        lines += ["| Option | Default | Description |", "| --- | --- | --- |"]
        for p in options:
            names = ", ".join(f"`{o}`" for o in [*p.opts, *p.secondary_opts])
            lines.append(f"| {names} | {_default(p)} | {_describe(p)} |")
        lines.append("")
    return lines


def _environment_section() -> list[str]:
    lines = [
        "## Environment switches",
        "",
        "Read once when a command starts (`ddpm_cli.runtime`); a bad value is refused there. "
        "Those marked *recorded* can change a result's bits: every checkpoint's metadata "
        "(`runtime`) and every sampled PNG (`ddpm:runtime`) records them, and a PNG's "
        "redraw command sets them.",
        "",
        "| Variable | Meaning |",
        "| --- | --- |",
    ]
    for s in runtime.SWITCHES:
        recorded = " *Recorded.*" if s.field in runtime.RECORDED else ""
        lines.append(f"| `{s.variable}` | {s.meaning}.{recorded} |")
    return [*lines, ""]


def render(app: typer.Typer) -> str:
    """The Markdown reference for every command of `app`, in the order they were registered,
    and the environment switches."""
    root = typer.main.get_command(app)
    lines = [HEADER]
    lines += _command_section("ddpm", root)
    for name, command in root.commands.items():
        if not getattr(command, "hidden", False):
            lines += _command_section(f"ddpm {name}", command)
    lines += _environment_section()
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    from ddpm_cli.cli import app

    print(render(app), end="")
