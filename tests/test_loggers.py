"""`ddpm train --log tensorboard`: the event files hold what metrics.jsonl holds and the sample
grids, read back with tensorboard's own reader; a missing package is one line, before work."""

from __future__ import annotations

import json
import sys

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
