"""Input that is hostile rather than merely broken (issue 27): folder names that are not UTF-8 or
hold Rich markup, terminal escape sequences and bidi overrides (they become class names and so
reach checkpoints, tables, file names and PNG metadata); checkpoint configs that ask for far more
than the file holds, or nest JSON too deep for the parser; a torn line in metrics.jsonl."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from hypothesis import given, seed, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import draw_shapes, train_tiny
from ddpm_cli.cli import app
from ddpm_cli.text import shown
from test_fuzz import MAX_RSS_GIB, SETTINGS, join, peak_rss_gib, run_case, split


def test_shown_spells_out_what_a_terminal_would_act_on():
    assert shown("plain, Ünïcode 日本") == "plain, Ünïcode 日本"
    assert shown(os.fsdecode(b"\xffcat")) == "\\xffcat"  # the byte itself, not U+FFFD
    assert shown("a\x1b[2Jb\x07") == "a\\x1b[2Jb\\x07"
    assert shown("line\nbreak\rtab\t") == "line\\nbreak\\rtab\\t"
    assert shown("\u202eevil\u2028") == "\\u202eevil\\u2028"
    assert shown("\x9b31m") == "\\x9b31m"  # the one-byte CSI of C1


def folder_of_classes(root: Path, names: list[bytes], images: int = 2) -> Path:
    """root/data with one subfolder per name (file-system bytes), `images` pictures each."""
    data = root / "data"
    data.mkdir()
    for k, name in enumerate(names):
        sub = Path(os.fsdecode(os.fsencode(data) + b"/" + name))
        sub.mkdir()
        for i in range(images):
            draw_shapes((12 + i + k, 12)).save(sub / os.fsdecode(name + b"-%d.png" % i))
    return data


def no_raw_controls(out: str) -> None:
    """Nothing in the output a terminal would act on or a UTF-8 stream would refuse."""
    bad = [c for c in out if (ord(c) < 0x20 and c not in "\n") or 0x7F <= ord(c) < 0xA0
           or 0xD800 <= ord(c) <= 0xDFFF or 0x202A <= ord(c) <= 0x202E]  # fmt: skip
    assert not bad, (bad, out)


HOSTILE = [b"\xffcat", b"[bold]dog", b"[red]x", b"esc\x1b[2Jclear", b"\xe2\x80\xaeevil"]


def test_hostile_class_names_train_inspect_and_sample(runner, tmp_path):
    data = folder_of_classes(tmp_path, HOSTILE)
    r = runner.invoke(app, ["inspect", str(data)])
    assert r.exit_code == 0, r.output
    no_raw_controls(r.output)
    for shown_name in ("\\xffcat", "[bold]dog", "[red]x", "esc\\x1b[2Jclear", "\\u202eevil"):
        assert shown_name in r.output, r.output  # shown as itself, markup not applied

    run = tmp_path / "run"
    r = runner.invoke(app, ["train", str(data), "--preset", "tiny", "--image-size", "8",
                            "--steps", "1", "--sample-every", "0", "--out", str(run)])  # fmt: skip
    assert r.exit_code == 0, r.output
    no_raw_controls(r.stderr)
    assert r.stdout_bytes == os.fsencode(run / "model.safetensors") + b"\n"

    r = runner.invoke(app, ["inspect", str(run)])
    assert r.exit_code == 0, r.output
    no_raw_controls(r.output)
    assert "[bold]dog" in r.output and "\\xffcat" in r.output

    out = tmp_path / "s"
    r = runner.invoke(app, ["sample", str(run), "-n", "1", "--steps", "2", "--class", "all",
                            "-o", str(out)])  # fmt: skip
    assert r.exit_code == 0, r.output
    no_raw_controls(r.stderr)  # the header names the classes
    assert "[bold]dog" in r.stderr and "\\xffcat" in r.stderr, r.stderr
    # stdout: the files' own bytes, one a line, each an existing file with the class in its name
    paths = [Path(os.fsdecode(line)) for line in r.stdout_bytes.splitlines()]
    assert len(paths) == len(HOSTILE) and all(p.is_file() for p in paths)
    assert sorted(os.fsencode(p.name) for p in paths) == sorted(n + b"-000000.png" for n in HOSTILE)
    # the PNG's provenance holds the class escaped, not the raw byte
    texts = [Image.open(p).text for p in paths if os.fsencode(p.name).startswith(b"\xff")]
    assert texts and any("\\xffcat" in v for v in texts[0].values()), texts


def test_hostile_names_fuzz_through_inspect_and_train(runner, tmp_path):
    """Folder names of arbitrary bytes (no '/' or NUL): inspect always succeeds and shows them
    escaped; a tenth of the cases also train a step and inspect the run."""
    cases = {"n": 0}
    name = st.binary(min_size=1, max_size=12).filter(
        lambda b: b"/" not in b and b"\0" not in b and b not in (b".", b"..")
    )

    @seed(20261206)
    @settings(max_examples=30, **SETTINGS)
    @given(names=st.lists(name, min_size=2, max_size=3, unique_by=lambda b: b.lower()))
    def check(names):
        root = tmp_path / f"c{cases['n']}"
        root.mkdir()
        try:
            data = folder_of_classes(root, names, images=1)
        except OSError:  # a name this file system refuses (too long once escaped, ...)
            return
        r = runner.invoke(app, ["inspect", str(data)])
        assert r.exit_code == 0, r.output
        no_raw_controls(r.output)
        if cases["n"] % 10 == 0:
            run_case(runner, ["train", str(data), "--preset", "tiny", "--image-size", "8",
                              "--steps", "1", "--sample-every", "0", "--out",
                              str(root / "run"), "-q"])  # fmt: skip
            r = runner.invoke(app, ["inspect", str(root / "run")])
            assert r.exit_code == 0, r.output
            no_raw_controls(r.output)
        cases["n"] += 1

    check()
    assert cases["n"] >= 20


# --- checkpoints whose metadata asks for too much, or is nested too deep ---------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    return train_tiny(tmp_path_factory.mktemp("hostile"), 4)


def with_config(run: Path, dest: Path, change) -> Path:
    """A copy of the run's model file with change(config, metadata) applied (the content hash
    covers only the tensors, so the copy still verifies)."""
    header, body = split((run / "model.safetensors").read_bytes())
    config = json.loads(header["__metadata__"]["config"])
    change(config, header["__metadata__"])
    header["__metadata__"]["config"] = json.dumps(config)
    dest.write_bytes(join(header, body))
    return dest


HOSTILE_CONFIGS = {  # the reproductions and their kin: (change, words in the message)
    "blocks": (lambda c, m: c["model"].update(num_res_blocks=100_000), "num_res_blocks"),
    "size": (lambda c, m: c["model"].update(image_size=[1_000_000, 1_000_000]), "image_size"),
    "float": (lambda c, m: c["model"].update(channels=32.0), "channels must be an integer"),
    "bool": (lambda c, m: c["model"].update(num_res_blocks=True), "num_res_blocks"),
    "negative": (lambda c, m: c["model"].update(channel_mult=[1, -2]), "channel_mult"),
    "timesteps": (lambda c, m: c["diffusion"].update(timesteps=10**12), "timesteps"),
    "nested": (lambda c, m: m.update(step="[" * 100_000 + "]" * 100_000), "'step'"),
    "nested_config": (lambda c, m: c["model"].update(classes=[[[[[]]]]]), "classes"),
    # within every limit, but 4096 channels: built for real it would take gigabytes
    "wide": (lambda c, m: c["model"].update(channels=4096), "do not fit"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_CONFIGS))
def test_hostile_configs_are_refused_before_anything_is_built(runner, tiny_run, tmp_path, case):
    change, words = HOSTILE_CONFIGS[case]
    path = with_config(tiny_run, tmp_path / "m.safetensors", change)
    commands = [["sample", str(path), "-n", "1", "--steps", "1", "-o", str(tmp_path / "o")],
                ["train", str(tiny_run.parent / "pics"), "--init", str(path), "--steps", "1",
                 "--out", str(tmp_path / "ft")]]  # fmt: skip
    if case != "wide":  # inspect shows a file whose tensors do not fit; it builds nothing
        commands.append(["inspect", str(path)])
    for args in commands:
        t0 = time.perf_counter()
        r = runner.invoke(app, args)
        assert time.perf_counter() - t0 < 10, args
        assert r.exit_code == 2 and "m.safetensors" in r.stderr and words in r.stderr, r.output
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert peak_rss_gib() < MAX_RSS_GIB


def test_a_hostile_train_state_is_refused_on_resume(runner, tmp_path):
    run = train_tiny(tmp_path, 4)
    header, body = split((run / "train_state.safetensors").read_bytes())
    config = json.loads(header["__metadata__"]["config"])
    config["model"]["channels"] = 4096
    header["__metadata__"]["config"] = json.dumps(config)
    (run / "train_state.safetensors").write_bytes(join(header, body))
    r = runner.invoke(app, ["train", "--resume", str(run), "--steps", "3"])
    assert r.exit_code == 2 and "do not fit" in r.stderr, r.output


def test_a_damaged_world_size_is_not_resumable_in_inspect_or_train(runner, tmp_path):
    """What `ddpm inspect` says of a run agrees with what `--resume` does with it."""
    run = train_tiny(tmp_path, 4)
    header, body = split((run / "train_state.safetensors").read_bytes())
    header["__metadata__"]["world_size"] = '"two"'
    (run / "train_state.safetensors").write_bytes(join(header, body))
    r = runner.invoke(app, ["inspect", str(run), "--json"])
    shown = json.loads(r.stdout)["run"]
    assert not shown["resumable"] and "'world_size' is not a count" in shown["resume"]
    r = runner.invoke(app, ["train", "--resume", str(run), "--steps", "3"])
    assert r.exit_code == 2 and "'world_size' is not a count" in r.stderr, r.output


def test_config_types_are_checked_against_the_annotations():
    from ddpm_cli.config import DiffusionConfig, ModelConfig, TrainConfig, from_dict
    from ddpm_cli.errors import ConfigError

    for cls in (ModelConfig, DiffusionConfig, TrainConfig):  # every default round-trips
        assert from_dict(cls, json.loads(json.dumps(cls().to_dict()))) == cls()
    bad = [(ModelConfig, "image_size", [8, 8.0]), (ModelConfig, "classes", [1, 2]),
           (ModelConfig, "dropout", "0.1"), (DiffusionConfig, "timesteps", 1000.0),
           (TrainConfig, "lr", "1e-3"), (TrainConfig, "steps", [5]),
           (TrainConfig, "flip", 1)]  # fmt: skip
    for cls, key, value in bad:
        with pytest.raises(ConfigError, match=key):
            from_dict(cls, {**cls().to_dict(), key: value})
    # a float field takes an integer, an optional field null
    assert from_dict(TrainConfig, {**TrainConfig().to_dict(), "lr": 1, "steps": None}).lr == 1


# --- metrics.jsonl with a torn line --------------------------------------------------------------


def test_a_torn_metrics_line_is_dropped_on_resume_with_a_warning(runner, tmp_path):
    run = train_tiny(tmp_path, 4, steps=2, checkpoint_every=1)
    metrics = run / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([*lines, '{"step": 2, "lo']))  # a write cut short, no newline
    r = runner.invoke(app, ["train", "--resume", str(run), "--steps", "4"])
    assert r.exit_code == 0, r.output
    assert "torn line" in r.stderr and "metrics.jsonl" in r.stderr
    records = [json.loads(line) for line in metrics.read_text().splitlines()]  # all whole again
    assert [r["step"] for r in records if "loss" in r][-1] == 4
    assert records[: len(lines)] == [json.loads(line) for line in lines]


# --- a run directory that cannot hold a run --------------------------------------------------


def test_a_run_directory_that_cannot_hold_a_run_is_refused_at_start(runner, tmp_path, monkeypatch,
                                                                    tiny_run):
    data = tmp_path / "pics"
    data.mkdir()
    for i in range(4):
        draw_shapes((12 + i, 12)).save(data / f"{i}.png")
    (tmp_path / "afile").write_text("keep me")
    args = ["train", str(data), "--preset", "tiny", "--image-size", "8", "--steps", "1",
            "--sample-every", "0", "-q"]  # fmt: skip
    cases = {
        str(tmp_path / "afile"): "is a file",
        str(tmp_path / "afile" / "run"): "cannot create it",
        str(data / "run"): "inside the training data",
        str(data): "inside the training data",
    }
    for out, words in cases.items():
        r = runner.invoke(app, [*args, "--out", out])
        assert r.exit_code == 2 and words in r.stderr, (out, r.output)
        assert len(r.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in data.iterdir()) == [f"{i}.png" for i in range(4)]
    assert (tmp_path / "afile").read_text() == "keep me"

    monkeypatch.chdir(data)  # the default runs/NAME-N would land inside the data
    r = runner.invoke(app, [*args[:1], ".", *args[2:]])
    assert r.exit_code == 2 and "inside the training data" in r.stderr, r.output
    assert not (data / "runs").exists()

    # a directory this process may not write to (root may write anywhere: ask os.access)
    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != locked and real(p, mode))
    r = runner.invoke(app, [*args, "--out", str(locked / "run")])
    assert f"cannot write in {locked}: permission denied" in r.stderr, r.output
    # every command ends an output it may not write with exit 1 (errors.py), train included
    outputs = [r.exit_code]
    for command in (["sample", str(tiny_run), "-n", "1", "--steps", "1", "-o", str(locked / "s")],
                    ["noise", str(data / "0.png"), "--t", "5", "-o", str(locked / "n.png")]):
        outputs.append(runner.invoke(app, command).exit_code)
    assert outputs == [1, 1, 1]
    assert not any(locked.iterdir())


def test_an_unreadable_image_with_a_non_utf8_name_is_listed_by_its_bytes(runner, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(4):
        draw_shapes((12 + i, 12)).save(data / f"{i}.png")
    bad = os.fsencode(data) + b"/\xffbroken.png"
    Path(os.fsdecode(bad)).write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "run"
    r = runner.invoke(app, ["train", str(data), "--preset", "tiny", "--image-size", "8",
                            "--steps", "1", "--sample-every", "0", "--out", str(out)])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert b"\xffbroken.png" in (out / "skipped.txt").read_bytes()
    no_raw_controls(r.stderr)
