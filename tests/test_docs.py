"""Docs that cannot drift: the CLI reference, the README's commands, and .ci/run."""

from __future__ import annotations

from pathlib import Path

import typer

from ddpm_cli.cli import app
from ddpm_cli.cli.docs import render

ROOT = Path(__file__).resolve().parents[1]
TEST_COMMAND = 'pip install -e ".[test]" && pytest'


def test_cli_reference_is_up_to_date():
    current = (ROOT / "docs" / "cli.md").read_text()
    assert current == render(app), (
        "docs/cli.md is out of date: run `python -m ddpm_cli.cli.docs > docs/cli.md`"
    )


def test_every_command_and_option_is_documented():
    text = (ROOT / "docs" / "cli.md").read_text()
    root = typer.main.get_command(app)
    for name, command in root.commands.items():
        assert f"## `ddpm {name}`" in text, name
        section = text.split(f"## `ddpm {name}`", 1)[1].split("\n## ", 1)[0]
        for param in command.params:
            for opt in param.opts:
                shown = f"`{opt}`" if opt.startswith("-") else f"`{param.name.upper()}`"
                assert shown in section, f"ddpm {name}: {opt} is not in docs/cli.md"


def test_readme_and_ci_run_the_same_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert TEST_COMMAND in readme
    assert TEST_COMMAND in ci
    # a failed install must fail the run: set -e does not stop on the left of `&&`
    assert f"{TEST_COMMAND} || exit $?" in ci
    assert "ruff check" in ci


def test_the_options_a_resume_may_change_are_the_ones_training_md_lists():
    """docs/training.md names the options a resume may change; resume.RESUMABLE decides. Each
    of them, under its command-line name, and no other option of `ddpm train`."""
    from ddpm_cli.training.resume import RESUMABLE

    text = (ROOT / "docs" / "training.md").read_text()
    paragraph = text.split("On resume, ", 1)[1].split("may change;", 1)[0]
    listed = {word.strip("`,") for word in paragraph.split() if word.startswith("`--")}
    train = typer.main.get_command(app).commands["train"]
    flags = {p.name: max(p.opts, key=len) for p in train.params}
    assert listed == {flags[name] for name in RESUMABLE}
