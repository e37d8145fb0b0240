"""The app's shape: version, help for every command, completion, unknown commands."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import typer
import typer.main

from conftest import ddpm_executable
from ddpm_cli import __version__
from ddpm_cli.cli import app


def test_version(runner):
    for flag in ("--version", "-V"):
        r = runner.invoke(app, [flag])
        assert r.exit_code == 0 and r.stdout == f"ddpm {__version__}\n"
    assert __version__ != "0.0.0+unknown"  # the installed package's metadata is found


COMMANDS = {"noise", "train", "sample", "inpaint", "upscale", "inspect", "eval", "import", "export"}


@pytest.mark.parametrize("command", [[], *([c] for c in sorted(COMMANDS))])
def test_help_short_and_long(runner, command):
    long = runner.invoke(app, [*command, "--help"])
    short = runner.invoke(app, [*command, "-h"])
    assert long.exit_code == 0 and short.exit_code == 0
    assert long.stdout == short.stdout and "Usage" in long.stdout


def test_root_help_lists_every_command(runner):
    out = runner.invoke(app, ["-h"]).stdout
    panel = out.split("Commands", 1)[1]
    # a command's row starts with its name; wrapped help lines start with spaces
    listed = {
        line.split()[1] for line in panel.splitlines() if line.startswith("│ ") and line[2] != " "
    }
    assert listed == COMMANDS  # every command, and nothing unannounced
    assert "--install-completion" in out and "--show-completion" in out


def test_unknown_command_is_one_line(runner):
    r = runner.invoke(app, ["nosie"])
    assert r.exit_code == 2
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("error:") and "nosie" in line


HEAVY = ("torch", "numpy", "PIL", "safetensors")  # what a command's work needs, its help not


def test_shell_completion_completes_commands_and_choices_without_torch():
    """Each Tab press starts the installed script; it answers without importing torch (seconds
    on a laptop CPU), as `python -X importtime` shows."""

    def complete(words: str, cword: int) -> list[str]:
        env = {
            **os.environ,
            "_DDPM_COMPLETE": "complete_bash",
            "COMP_WORDS": words,
            "COMP_CWORD": str(cword),
        }
        command = [sys.executable, "-X", "importtime", ddpm_executable()]
        out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        loaded = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines()
                  if line.startswith("import time:")}  # fmt: skip
        assert "ddpm_cli.cli" in loaded
        assert sorted(m for m in loaded if m.split(".")[0] in HEAVY) == []
        return out.stdout.split()

    assert complete("ddpm no", 1) == ["noise"]
    assert complete("ddpm noise x.png --schedule ", 4) == [
        "linear",
        "cosine",
        "quadratic",
        "sigmoid",
    ]


def test_help_and_usage_errors_load_no_torch():
    """`ddpm --help`, every command's help and options refused while parsing or by a command's
    own checks answer in a fraction of a second: the CLI imports the core inside each command,
    after those checks (cli/__init__). One fresh process runs them all, listing the heavy
    modules loaded after each."""
    cases = [[], *([c, "--help"] for c in sorted(COMMANDS)), ["train", "--epochs", "0"],
             ["sample", "run", "--steps", "0"], ["inspect", "--schedule", "nope"],
             # refused in the command's body, before it loads the core
             ["sample", "run"], ["eval", "run"], ["noise", "x.png", "--gif", "--t", "5"],
             ["inspect"], ["import", "folder", "-o", "x.pt"]]  # fmt: skip
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from ddpm_cli.cli import app\n"
        f"for args in {cases!r}:\n"
        "    code = CliRunner().invoke(app, args).exit_code\n"
        f"    print(args, code, sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    # each line: the arguments, the exit code, and the heavy modules loaded so far
    codes = [2] + [0] * len(COMMANDS) + [2] * 8
    assert out.stdout.splitlines() == [f"{a} {c} []" for a, c in zip(cases, codes, strict=True)]


def test_a_dependency_missing_from_the_install_is_one_line_saying_what_to_install():
    """The core loads when a command runs, so a broken install (here: torch hidden) shows
    there: one line naming the package, not an internal error or a traceback."""
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"  # import torch raises ModuleNotFoundError
        "from typer.testing import CliRunner\n"
        "from ddpm_cli.cli import app\n"
        "r = CliRunner().invoke(app, ['noise', 'cat.png', '--t', '5'])\n"
        "print(r.exit_code, repr(r.stdout), repr(r.stderr))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == (
        f"1 '' 'error: torch is missing from this Python environment ({sys.executable}): "
        "pip install torch\\n'"
    )


def test_only_a_declared_dependency_missing_as_a_whole_reads_as_an_install_to_mend():
    from ddpm_cli.cli.common import _missing_package

    def missing(name):
        return _missing_package(ModuleNotFoundError(f"No module named {name!r}", name=name))

    assert (missing("torch"), missing("PIL"), missing("safetensors")) == (
        "torch", "pillow", "safetensors")
    # a broken torch, a typo in our code, a module of ours: bugs, reported as such
    assert missing("torch._C") is missing("nunpy") is missing("ddpm_cli.cli.nope") is None


def test_ctrl_c_inside_a_command_exits_130_quietly(runner, monkeypatch, tmp_path):
    """A KeyboardInterrupt that no command handles (a Ctrl-C while one imports the core, or
    in `ddpm noise`'s work) ends the command with 130 and nothing on stdout or stderr."""
    from PIL import Image

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    Image.new("RGB", (8, 8)).save(tmp_path / "cat.png")
    monkeypatch.setattr("ddpm_cli.generation.noising.run_noise", interrupted)
    r = runner.invoke(app, ["noise", str(tmp_path / "cat.png"), "--t", "5"])
    assert (r.exit_code, r.stdout, r.stderr) == (130, "", "")
    # the app's group itself turns it into Exit(130): older Typer releases said "error: aborted"
    group = typer.main.get_command(app)
    with group.make_context("ddpm", ["noise", str(tmp_path / "cat.png"), "--t", "5"]) as ctx:
        try:
            group.invoke(ctx)
        except KeyboardInterrupt:  # (not raised on, which would stop the whole test run)
            pytest.fail("a Ctrl-C went through the app's group")
        except typer.Exit as stop:
            assert stop.exit_code == 130
        else:
            pytest.fail("the interrupted command ran to its end")


SIGINT_WHILE_IMPORTING = (
    "import importlib.abc, os, signal, sys\n"
    "class Interrupt(importlib.abc.MetaPathFinder):\n"  # Ctrl-C mid-way through torch's import
    "    def find_spec(self, name, path=None, target=None):\n"  # of numpy, as a user's may come
    "        if name == 'numpy.linalg':\n"
    "            sys.meta_path.remove(self)\n"
    "            os.kill(os.getpid(), signal.SIGINT)\n"
    "sys.meta_path.insert(0, Interrupt())\n"
    "sys.argv = ['ddpm', *sys.argv[1:]]\n"
    "from ddpm_cli.cli import main\n"
    "main()\n"
)


@pytest.mark.parametrize("command", ["noise", "train"])
def test_ctrl_c_while_torch_loads_stops_the_command(tmp_path, command):
    """Raised inside torch's import of numpy, a KeyboardInterrupt was swallowed there (the
    command ran to its end, exit 0) or broke numpy (an internal error): the commands hold a
    Ctrl-C until the core has loaded, then stop with 130, having made nothing."""
    from PIL import Image

    (tmp_path / "pics").mkdir()
    for i in range(4):
        Image.new("RGB", (8, 8), (60 * i, 0, 0)).save(tmp_path / "pics" / f"{i}.png")
    out = tmp_path / "made" / "here"
    pics = tmp_path / "pics"
    argv = {"noise": ["noise", str(pics / "0.png"), "--t", "5", "-o", f"{out}.png"],
            "train": ["train", str(pics), "--steps", "2", "-o", str(out)]}[command]  # fmt: skip
    r = subprocess.run([sys.executable, "-c", SIGINT_WHILE_IMPORTING, *argv],
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert (r.returncode, r.stdout, r.stderr) == (130, "", "")
    assert not (tmp_path / "made").exists()


def test_a_ctrl_c_deferred_over_imports_keeps_an_ignored_sigint_ignored():
    import signal

    from ddpm_cli.cli.common import deferred_interrupt

    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt), deferred_interrupt():
        os.kill(os.getpid(), signal.SIGINT)  # held until the block ends
        assert signal.getsignal(signal.SIGINT) is not before
    assert signal.getsignal(signal.SIGINT) is before
    with pytest.raises(KeyboardInterrupt), deferred_interrupt():  # an import that hangs
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # asked twice: at once
        pytest.fail("a second Ctrl-C was held too")
    assert signal.getsignal(signal.SIGINT) is before
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a background job's
    try:
        with deferred_interrupt():
            os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


def numeric_options():
    """(command, flag, type, min, max) for every int or float option of every command."""
    import typing

    import typer.main

    out = []
    for name, command in typer.main.get_command(app).commands.items():
        for hint in typing.get_type_hints(command.callback, include_extras=True).values():
            if typing.get_origin(hint) is not typing.Annotated:
                continue
            base, info = typing.get_args(hint)[:2]
            kinds = [k for k in (typing.get_args(base) or (base,)) if k in (int, float)]
            # Annotated options: Typer keeps the first declaration as `default`
            given = [getattr(info, "default", None), *(getattr(info, "param_decls", None) or ())]
            decls = [d for d in given if isinstance(d, str) and d.startswith("--")]
            if kinds and decls:
                out.append((name, decls[0], kinds[0], info.min, info.max))
    return out


def test_every_numeric_option_has_a_range_checked_before_any_work(runner):
    """--lr nan, --guidance inf, --steps 10**12: refused while the command line is parsed (the
    argument "x" is never opened), naming the option, exit 2 (issue 27)."""
    import time

    options = numeric_options()  # (--channels is a choice: 1, 3 or 4, tested below)
    assert len(options) > 50  # the enumeration found the options
    unbounded = [(c, f) for c, f, _, lo, hi in options if lo is None or hi is None]
    assert not unbounded, unbounded
    for command, flag, kind, lo, hi in options:
        bad = ["nan", "inf", "-inf", str(hi + 1)] if kind is float else [str(hi + 1), str(lo - 1)]
        for value in bad:
            t0 = time.perf_counter()
            r = runner.invoke(app, [command, "x", flag, value])
            assert time.perf_counter() - t0 < 2, (command, flag, value)
            assert r.exit_code == 2 and flag in r.stderr, (command, flag, value, r.output)
            assert len(r.stderr.strip().splitlines()) == 1, r.stderr
            # the range, whole, and the value given (Typer said "less than or equal to" of nan)
            word = "a number " if kind is float else "a whole number from "
            assert word in r.stderr and f", got {value} (" in r.stderr, r.stderr
    r = runner.invoke(app, ["train", "x", "--steps=0"])
    assert "'--steps': must be a whole number from 1 to 1,000,000,000, got 0 (" in r.stderr
    r = runner.invoke(app, ["train", "x", "--lr", "abc"])
    assert "'--lr': must be a number above 0 and at most 10, got abc (see 'ddpm train -h')" in (
        r.stderr)  # fmt: skip
    r = runner.invoke(app, ["train", "x", "--cond-drop", "2"])
    assert "'--cond-drop': must be a number from 0 to 1, got 2 (" in r.stderr
    # an end a range excludes is refused while parsing, in the same words as any other value
    for command, flag, value, wanted in [
        ("train", "--lr", "0", "above 0 and at most 10"),
        ("train", "--min-snr-gamma", "0", "above 0 and at most 1000"),
        ("train", "--ema-decay", "1", "at least 0 and below 1"),
        ("train", "--ema-decay", "1.5", "at least 0 and below 1"),
        ("sample", "--strength", "0", "above 0 and at most 1"),
        ("sample", "--strength", "2", "above 0 and at most 1"),
    ]:
        r = runner.invoke(app, [command, "x", flag, value])
        assert r.exit_code == 2 and f"'{flag}': must be a number {wanted}, got {value} (" in (
            r.stderr), r.stderr  # fmt: skip
    for command, flag, value in [("train", "--ema-decay", "0"), ("sample", "--strength", "1"),
                                 ("train", "--lr", "10")]:  # fmt: skip
        r = runner.invoke(app, [command, "x", flag, value])  # the ends kept pass the parse
        assert r.stderr.startswith("error: ") and "Invalid value" not in r.stderr, r.stderr
    r = runner.invoke(app, ["train", "x", "-b0"])  # an attached short option's value
    assert "'--batch-size': must be a whole number from 1 to 65,536, got 0 (" in r.stderr
    for value in ("2", "5", "0", "-1", "x", "3.0"):  # one wording for every other value
        r = runner.invoke(app, ["train", "x", "--channels", value])
        assert r.exit_code == 2 and f"'--channels': must be 1, 3 or 4, got {value}" in r.stderr


def test_refusals_name_what_the_user_typed(runner, tmp_path):
    """Messages quote the option as given (not None, not an enum's repr) and say the way out."""
    from conftest import train_tiny

    run = train_tiny(tmp_path, 4)

    def error(*args: str) -> str:
        r = runner.invoke(app, list(args))
        assert r.exit_code == 2, r.output
        (line,) = r.stderr.strip().splitlines()
        return line

    assert error("train", str(tmp_path / "pics"), "--image-size", "8x8x8") == (
        "error: image size '8x8x8': use N or WIDTHxHEIGHT, e.g. 32 or 64x32"
    )
    line = error("train", "--resume", str(run), "--precision", "bf16", "--steps", "9")
    assert "--precision bf16 (the run has fp32)" in line
    line = error("train", "--resume", str(run), "--init", str(run), "--steps", "9")
    assert f"--init {run} (the run has none)" in line
    assert error("inspect", str(run), "--schedule", "linear").endswith(", not both")
    assert "'--channels': must be 1, 3 or 4, got 2" in error("train", str(run), "--channels", "2")
    line = error("train", str(run / "model.safetensors"), "--steps", "2")
    assert "is a model file" in line and line.endswith("add --init MODEL")
    # a damaged model is reported as damaged, not sent to --init (which would then refuse it)
    data = (run / "model.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 64])
    line = error("train", str(tmp_path / "cut.safetensors"), "--steps", "2")
    assert "corrupt" in line and "--init" not in line


def test_cond_drop_on_data_without_classes_is_warned_about(runner, tmp_path):
    from conftest import draw_shapes

    (tmp_path / "pics").mkdir()
    for i in range(4):
        draw_shapes((8 + i, 8)).save(tmp_path / "pics" / f"{i}.png")
    args = ["train", str(tmp_path / "pics"), "--preset", "tiny", "--image-size", "8", "--steps",
            "1", "--sample-every", "0", "--device", "cpu"]  # fmt: skip
    warned = runner.invoke(app, [*args, "--cond-drop", "0.3", "--out", str(tmp_path / "a")])
    assert warned.exit_code == 0 and "--cond-drop has no effect" in warned.stderr
    quiet = runner.invoke(app, [*args, "--out", str(tmp_path / "b")])
    assert quiet.exit_code == 0 and "cond-drop" not in quiet.stderr
