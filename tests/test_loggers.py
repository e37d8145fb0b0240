"""`ddpm train --log tensorboard`: the event files hold what metrics.jsonl holds and the sample
grids, read back with tensorboard's own reader; a missing package is one line, before work."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from conftest import train_tiny
from ddpm_cli.cli import app
from ddpm_cli.config import DiffusionConfig, TrainConfig
from ddpm_cli.training.run import train

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def read_events(run) -> event_accumulator.EventAccumulator:
    events = event_accumulator.EventAccumulator(str(run / "tensorboard"), size_guidance={
        event_accumulator.SCALARS: 0, event_accumulator.IMAGES: 0})  # fmt: skip
    events.Reload()
    return events


def test_event_files_hold_the_metrics_and_the_grids_and_resume_appends(tmp_path):
    run = train_tiny(tmp_path, 6, steps=4, log_every=2, sample_every=2, log=("tensorboard",))
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    events = read_events(run)
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [m["step"] for m in metrics] == [2, 4]
    assert [e.value for e in loss] == pytest.approx([m["loss"] for m in metrics], rel=1e-6)
    lr = events.Scalars("train/lr")
    assert [e.value for e in lr] == pytest.approx([m["lr"] for m in metrics], rel=1e-6)
    for tag in ("train/grad_norm", "train/img_per_s", "train/ema_decay"):
        assert len(events.Scalars(tag)) == 2
    quarters = [t for t in events.Tags()["scalars"] if t.startswith("loss_by_t/")]
    assert quarters and all(len(events.Scalars(t)) >= 1 for t in quarters)
    images = events.Images("samples")
    assert [e.step for e in images] == [2, 4] and images[0].width > 8
    # resume: the stored --log goes on, the steps continue
    train(None, TrainConfig(), DiffusionConfig(), resume=run, given={"steps": 6})
    assert [e.step for e in read_events(run).Scalars("train/loss")] == [2, 4, 6]


def test_a_logger_given_twice_is_one_logger():
    from ddpm_cli.config import LogTo

    log = TrainConfig(log=("wandb", "tensorboard", "wandb")).log
    assert log == (LogTo.wandb, LogTo.tensorboard)


def test_a_missing_tensorboard_is_one_line_before_any_work(runner, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard fails
    (tmp_path / "pics").mkdir()
    r = runner.invoke(app, ["train", "builtin:shapes", "--log", "tensorboard", "--steps", "1",
                            "--out", str(tmp_path / "run"), "--device", "cpu"])  # fmt: skip
    assert r.exit_code == 2, r.output
    assert "pip install 'ddpm-cli[tensorboard]'" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()
    r = runner.invoke(app, ["train", "--log", "wandb", "--steps", "1"])
    assert r.exit_code == 2 and "wandb" in r.stderr
    # a resumed run keeps its loggers: one that cannot start says where it comes from
    monkeypatch.delitem(sys.modules, "tensorboard")
    run = train_tiny(tmp_path / "pics", 6, steps=1, log=("tensorboard",))
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    r = runner.invoke(app, ["train", "--resume", str(run), "--steps", "2"])
    assert r.exit_code == 2 and r.stderr.startswith(
        "error: the run logs to tensorboard (--log is kept on resume), which needs the "
        "tensorboard package, not installed here; run: pip install"), r.stderr


def test_a_resume_from_an_older_checkpoint_drops_what_was_logged_after_it(tmp_path):
    """As if a crash came after step 4 was logged but before its checkpoint: resuming from
    step 2 logs steps 3 and 4 again; TensorBoard's events and the snapshots past step 2 are
    dropped, as metrics.jsonl's lines are, so no curve doubles back."""
    import shutil

    run = train_tiny(tmp_path, 6, steps=2, log_every=1, sample_every=0, checkpoint_every=2,
                     keep=5, log=("tensorboard",))  # fmt: skip
    saved = tmp_path / "at-2"
    saved.mkdir()
    for name in ("model.safetensors", "train_state.safetensors"):
        shutil.copy(run / name, saved / name)
    train(None, TrainConfig(), DiffusionConfig(), resume=run, given={"steps": 4})
    assert (run / "model-00000004.safetensors").exists()
    for name in ("model.safetensors", "train_state.safetensors"):  # back to step 2
        shutil.copy(saved / name, run / name)
    train(None, TrainConfig(), DiffusionConfig(), resume=run, given={"steps": 3})
    assert [e.step for e in read_events(run).Scalars("train/loss")] == [1, 2, 3]
    assert sorted(p.name for p in run.glob("model-*")) == [
        "model-00000002.safetensors", "model-00000003.safetensors"]  # fmt: skip


def test_the_quality_figure_is_logged_as_a_scalar(tmp_path):
    run = train_tiny(tmp_path, 30, steps=4, checkpoint_every=2, holdout=6, log=("tensorboard",))
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    figures = [r for r in lines if "heldout_loss" in r]
    events = read_events(run).Scalars("quality/heldout_loss")
    assert [e.step for e in events] == [r["step"] for r in figures] == [2, 4]
    assert [e.value for e in events] == pytest.approx([r["heldout_loss"] for r in figures], 1e-6)


class FakeRun:
    def __init__(self, run_id: str, settings: dict):
        self.id, self.settings, self.logged, self.finished = run_id, settings, [], False

    def log(self, values: dict, step: int) -> None:
        self.logged.append((step, values))

    def finish(self) -> None:
        self.finished = True


class FakeWandb(types.ModuleType):
    """What ddpm calls of wandb (init, Run.log/finish, Image), recorded; `fail`: init raises
    as wandb does without a login on a non-interactive terminal."""

    def __init__(self, fail: bool = False):
        super().__init__("wandb")
        self.runs: list[FakeRun] = []
        self.fail = fail

        class Image:
            def __init__(self, path: str):
                self.path = path

        class Settings:
            def __init__(self, silent: bool = False):
                self.silent = silent

        self.Image, self.Settings = Image, Settings

    def init(self, **settings) -> FakeRun:
        if self.fail:
            raise RuntimeError("api_key not configured (no-tty). call wandb.login(key=...)\nmore")
        self.runs.append(FakeRun(settings["id"] or f"new{len(self.runs)}", settings))
        return self.runs[-1]


def test_wandb_gets_the_metrics_the_figure_and_the_grids_and_resume_continues_its_run(
    tmp_path, monkeypatch
):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    run = train_tiny(tmp_path, 30, steps=4, log_every=2, sample_every=2, checkpoint_every=2,
                     holdout=6, log=("wandb",))  # fmt: skip
    (first,) = fake.runs
    assert first.settings["dir"] == str(run) and first.settings["resume"] is None
    assert first.settings["config"]["training"]["holdout"] == 6 and first.finished
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [(s, v["train/loss"]) for s, v in first.logged if "train/loss" in v]
    assert losses == [(r["step"], r["loss"]) for r in lines if "loss" in r]
    figures = [(s, v["quality/heldout_loss"]) for s, v in first.logged
               if "quality/heldout_loss" in v]  # fmt: skip
    assert figures == [(r["step"], r["heldout_loss"]) for r in lines if "heldout_loss" in r]
    grids = [(s, v["samples"].path) for s, v in first.logged if "samples" in v]
    assert [s for s, _ in grids] == [2, 4] and all(Path(p).exists() for _, p in grids)
    # resume: the same W&B run, from the next step on
    train(None, TrainConfig(), DiffusionConfig(), resume=run, given={"steps": 6})
    second = fake.runs[1]
    assert second.settings["id"] == first.id and second.settings["resume"] == "allow"
    assert min(s for s, _ in second.logged) > 4
    # --log on resume adds a logger: W&B goes on beside TensorBoard (before, it stopped)
    pytest.importorskip("tensorboard")
    starts = []
    train(None, TrainConfig(), DiffusionConfig(), resume=run,
          given={"steps": 8, "log": ("tensorboard",)},
          on_event=lambda kind, info: kind == "start" and starts.append(info))  # fmt: skip
    from ddpm_cli.cli.views import preflight_table

    logs = [c for c in preflight_table(starts[0]).columns[1].cells][-1]
    assert str(logs) == "metrics.jsonl, wandb (live), tensorboard (live)"
    third = fake.runs[2]
    assert third.settings["id"] == first.id and min(s for s, _ in third.logged) == 8
    assert [e.step for e in read_events(run).Scalars("train/loss")] == [8]


def test_quiet_silences_wandb_too(runner, tmp_path, monkeypatch):
    """-q: wandb's own lines on stderr (about 30 a run) are silenced with ddpm's."""
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    args = ["train", "builtin:shapes", "--log", "wandb", "--steps", "1", "--preset", "tiny",
            "--image-size", "8", "--sample-every", "0", "--device", "cpu"]  # fmt: skip
    for quiet in (True, False):
        out = tmp_path / f"run-{quiet}"
        r = runner.invoke(app, [*args, "--out", str(out), *(["-q"] if quiet else [])])
        assert r.exit_code == 0, r.output
        settings = fake.runs[-1].settings.get("settings")
        assert (settings is not None and settings.silent) == quiet


def test_a_wandb_that_cannot_start_is_one_line_exit_2(runner, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", FakeWandb(fail=True))
    r = runner.invoke(app, ["train", "builtin:shapes", "--log", "wandb", "--steps", "1",
                            "--out", str(tmp_path / "run"), "--device", "cpu"])  # fmt: skip
    assert r.exit_code == 2, r.output
    assert "api_key not configured" in r.stderr and "WANDB_MODE=offline" in r.stderr
    assert r.stderr.count("wandb login") == 1  # wandb's own line says it, or ddpm's: once
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()  # the new run leaves nothing behind
    told = FakeWandb()  # a message that says how to log in already: said once, not twice

    def refuse(**settings):
        raise RuntimeError("No API key configured. Use `wandb login` to log in.")

    told.init = refuse
    monkeypatch.setitem(sys.modules, "wandb", told)
    r = runner.invoke(app, ["train", "builtin:shapes", "--log", "wandb", "--steps", "1",
                            "--out", str(tmp_path / "run"), "--device", "cpu"])  # fmt: skip
    assert r.exit_code == 2 and " ".join(r.stderr.split()) == (
        "error: --log wandb could not start a W&B run: No API key configured. Use `wandb login` "
        "to log in; set WANDB_MODE=offline to keep the logs local")


def wandb_history(run_dir: Path) -> list[dict]:
    """The history rows of each offline W&B run under `run_dir`/wandb, in order: the .wandb
    file is a LevelDB-style log (32 KiB blocks of fragments: crc32, length, type) after a
    7-byte header, each record one of wandb's own protobuf Records."""
    import struct

    from wandb.proto import wandb_internal_pb2

    rows = []
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        data, pos, pending = path.read_bytes(), 7, b""
        while pos + 7 <= len(data):
            if 32768 - pos % 32768 < 7:  # a block's tail too short for a fragment: padding
                pos += 32768 - pos % 32768
                continue
            _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
            pending += data[pos + 7 : pos + 7 + length]
            pos += 7 + length
            if kind in (1, 4):  # a full record, or the last fragment of one
                record = wandb_internal_pb2.Record()
                record.ParseFromString(pending)
                pending = b""
                if record.WhichOneof("record_type") == "history":
                    rows.append({"/".join(i.nested_key) or i.key: json.loads(i.value_json)
                                 for i in record.history.item})  # fmt: skip
    return rows


def test_the_real_wandb_client_offline_records_the_run(tmp_path):
    """In a fresh process (wandb reads its settings once per process), as a user runs it."""
    import os
    import subprocess

    from conftest import ddpm_executable, draw_shapes

    pytest.importorskip("wandb")
    (tmp_path / "pics").mkdir()
    for i in range(30):
        draw_shapes((12 + i, 12)).save(tmp_path / "pics" / f"{i}.png")
    run = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    subprocess.run([ddpm_executable(), "train", str(tmp_path / "pics"), "-o", str(run),
                    "--preset", "tiny", "--image-size", "8", "--batch-size", "4", "--steps", "4",
                    "--log-every", "2", "--sample-every", "4", "--checkpoint-every", "2",
                    "--holdout", "6", "--seed", "1", "--log", "wandb", "-q"],
                   env=env, check=True, capture_output=True)  # fmt: skip
    rows = wandb_history(run)
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for key, name in (("train/loss", "loss"), ("quality/heldout_loss", "heldout_loss")):
        logged = [(r["_step"], r[key]) for r in rows if key in r]
        expected = [(m["step"], m[name]) for m in lines if name in m]
        assert [s for s, _ in logged] == [s for s, _ in expected] == [2, 4]
        assert [v for _, v in logged] == pytest.approx([v for _, v in expected], rel=1e-6)
    assert [r["_step"] for r in rows if "samples/path" in r] == [4]
