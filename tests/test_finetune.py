"""Fine-tuning (`ddpm train DATA --init CKPT`): the run starts at the parent's weights, as the
parent's function even where the classes change, keeps its architecture and schedule, records
its provenance, and refuses what the network cannot follow."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import draw_shapes, train_tiny
from ddpm_cli.cli import app
from ddpm_cli.config import DiffusionConfig, TrainConfig
from ddpm_cli.store.checkpoint import load_checkpoint
from ddpm_cli.store.files import MODEL
from ddpm_cli.store.models import load_model
from ddpm_cli.training import train as train_mod
from ddpm_cli.training.run import train

TINY = dict(preset="tiny", batch_size=4, device="cpu", seed=3, steps=1, sample_every=0,
            log_every=1)  # fmt: skip


def class_folder(root, names=("a", "b")):
    for k, name in enumerate(names):
        (root / name).mkdir(parents=True)
        for i in range(4):
            draw_shapes((12 + i + k, 12)).save(root / name / f"{i}.png")
    return root


def first_losses(monkeypatch, parent_dir, same_classes: bool) -> dict:
    """Record the first training step's per-item losses and the same batch's losses under
    the parent's model (its EMA weights, what ddpm sample draws) with the same x_0, t and eps,
    and the same labels where the classes are the same (else the parent's "no class")."""
    parent = load_model(parent_dir).model.train()
    real, seen = train_mod.training_losses, {}

    def spy(model, tables, x0, t, eps, objective="eps", gamma=None, y=None, augment=None):
        out = real(model, tables, x0, t, eps, objective, gamma, y, augment)
        if "run" not in seen:
            seen["run"] = out.detach().clone()
            with torch.no_grad():
                y_parent = y if same_classes else None
                told = augment if parent.augment_in is not None else None  # (its own maps)
                seen["parent"] = real(parent, tables, x0, t, eps, objective, gamma, y_parent,
                                      told)  # fmt: skip
        return out

    monkeypatch.setattr(train_mod, "training_losses", spy)
    return seen


@pytest.mark.parametrize("parent_classes, data_classes", [(False, False), (False, True),
                                                          (True, False), (True, True)])  # fmt: skip
def test_the_first_step_is_the_parents_loss_on_the_same_batch(
    tmp_path, monkeypatch, parent_classes, data_classes
):
    """Also where the classes change: a new class embedding starts as the parent's "no class"
    (zero for an unconditional parent), and dropped classes fold "no class" into the time
    embedding, so the network starts as exactly the parent's function."""
    parent_data = class_folder(tmp_path / "pd") if parent_classes else None
    if parent_classes:
        parent = train(str(parent_data), TrainConfig(**{**TINY, "steps": 3}, image_size=8),
                       DiffusionConfig(), tmp_path / "parent").out  # fmt: skip
    else:
        parent = train_tiny(tmp_path, 6, steps=3)
    data = class_folder(tmp_path / "data", ("x", "y", "z")) if data_classes else tmp_path / "pics"
    if not data_classes and parent_classes:
        data = tmp_path / "flat"
        data.mkdir()
        for i in range(6):
            draw_shapes((14 + i, 12)).save(data / f"{i}.png")
    seen = first_losses(monkeypatch, parent, same_classes=not (parent_classes or data_classes))
    events = {}
    run = train(str(data), TrainConfig(**TINY, init=str(parent)), DiffusionConfig(),
                tmp_path / "ft", on_event=events.setdefault).out  # fmt: skip
    assert torch.allclose(seen["run"], seen["parent"], rtol=1e-5, atol=1e-7)
    notes = events["start"]["parent_notes"]  # the pre-flight table's lines
    assert len(notes) == (parent_classes or data_classes)  # (the class names differ too)
    assert all(("new class embedding" if data_classes else "are dropped") in n for n in notes)
    ckpt = load_checkpoint(run / MODEL)
    assert ckpt.config["model"]["classes"] == (["x", "y", "z"] if data_classes else [])
    parent_meta = load_checkpoint(parent / MODEL).meta
    assert ckpt.config["parent"]["content_hash"] == parent_meta["content_hash"]
    assert ckpt.config["training"]["init"] == str(parent)
    assert ckpt.config["parent"]["file"] == str((parent / MODEL).resolve())


def test_a_run_that_shifts_starts_from_a_parent_that_did_not_as_its_function(
    tmp_path, monkeypatch
):
    """--init with --shift: the network gains the convolution of the shift map at zero, so
    its first loss on the shifted batch is the parent's; the maps then train it."""
    parent = train_tiny(tmp_path, 6, steps=3, shift=0)
    assert "augment_in.weight" not in load_checkpoint(parent / MODEL).tensors
    seen, events = first_losses(monkeypatch, parent, same_classes=True), {}
    run = train(str(tmp_path / "pics"), TrainConfig(**TINY, init=str(parent), shift=2),
                DiffusionConfig(), tmp_path / "ft", on_event=events.setdefault).out  # fmt: skip
    assert torch.allclose(seen["run"], seen["parent"], rtol=1e-5, atol=1e-7)
    ckpt = load_checkpoint(run / MODEL)
    assert ckpt.config["model"]["augment"] == 1
    assert ckpt.tensors["augment_in.weight"].abs().max() > 0  # trained by the maps
    assert events["start"]["parent_notes"] == [
        "a shift-map convolution is added, at zero (this run shifts its images; the parent "
        "did not)"
    ]  # fmt: skip
    # without --shift, a fine-tune keeps its parent's shift (8x8 by default would have none;
    # an unshifted parent at 32x32: test_interop's imported model)
    again = train(str(tmp_path / "pics"), TrainConfig(**TINY, init=str(run)), DiffusionConfig(),
                  tmp_path / "ft2").out  # fmt: skip
    assert load_checkpoint(again / MODEL).config["training"]["shift"] == 2


def test_a_run_without_shift_from_a_parent_with_it_drops_the_map_as_its_function(
    tmp_path, monkeypatch
):
    """The other way: a run that does not shift never gives a map, so the convolution of
    one (which adds nothing at sampling's empty map) is left out, and the first loss is the
    parent's (a crash before: no shifts to make the map from)."""
    train_tiny(tmp_path, 6, steps=3, shift=2)
    parent = tmp_path / "run"
    assert "augment_in.weight" in load_checkpoint(parent / MODEL).tensors
    seen, events = first_losses(monkeypatch, parent, same_classes=True), {}
    run = train(str(tmp_path / "pics"), TrainConfig(**TINY, init=str(parent), shift=0),
                DiffusionConfig(), tmp_path / "ft", on_event=events.setdefault).out  # fmt: skip
    assert torch.allclose(seen["run"], seen["parent"], rtol=1e-5, atol=1e-7)
    ckpt = load_checkpoint(run / MODEL)
    assert ckpt.config["model"]["augment"] == 0 and "augment_in.weight" not in ckpt.tensors
    # the pre-flight table says so
    assert events["start"]["parent_notes"] == [
        "the parent's shift-map convolution is left out (this run does not shift; it added "
        "nothing to samples)"
    ]  # fmt: skip


def test_fine_tuning_keeps_the_parents_architecture_schedule_and_objective(runner, tmp_path):
    parent = train_tiny(tmp_path, 6, steps=2, objective="eps", image_size=8,
                        diffusion=DiffusionConfig(schedule="linear", timesteps=200))  # fmt: skip
    (tmp_path / "big").mkdir()
    for i in range(5):
        draw_shapes((40, 40), "L").save(tmp_path / "big" / f"{i}.png")  # gray, 40px
    config = TrainConfig(device="cpu", steps=1, sample_every=0, init=str(parent))
    run = train(str(tmp_path / "big"), config, DiffusionConfig(), tmp_path / "ft").out
    config = load_checkpoint(run / MODEL).config
    parent_config = load_checkpoint(parent / MODEL).config
    assert config["model"] == parent_config["model"]  # 8x8 RGB, the tiny preset's network
    assert config["diffusion"] == parent_config["diffusion"]
    assert config["training"]["objective"] == "eps"
    assert config["training"]["lr"] == 1e-4  # finetune.FINETUNE_LR
    # resume keeps the provenance, and inspect shows it
    train(None, TrainConfig(), DiffusionConfig(), resume=run, given={"steps": 2})
    assert load_checkpoint(run / MODEL).config["parent"] == config["parent"]
    shown = json.loads(runner.invoke(app, ["inspect", str(run / MODEL), "--json"]).stdout)
    assert shown["parent"]["content_hash"] == load_checkpoint(parent / MODEL).meta["content_hash"]
    assert "fine-tuned from" in runner.invoke(app, ["inspect", str(run / MODEL)]).stdout


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--image-size", "16"], "fine-tuning keeps its size"),
        (["--channels", "1"], "fine-tuning keeps its channels"),
        (["--objective", "eps"], "keeps its objective"),
        (["--timesteps", "500"], "keeps it: drop --timesteps"),
        (["--schedule", "sigmoid"], "trained with schedule linear; a fine-tuned network keeps"),
        (["--preset", "small"], "fine-tuning keeps it: drop --preset"),
        (["--init", "{tmp}/run/train_state.safetensors"], "is a train state; give the run"),
        (["--init", "{tmp}/nothing"], "no such checkpoint"),
    ],
)
def test_bad_fine_tuning_is_one_line_exit_2_and_writes_nothing(runner, tmp_path, extra, message):
    parent = train_tiny(tmp_path, 6, steps=2)
    args = ["train", str(tmp_path / "pics"), "--steps", "1", "--init", str(parent), "--out",
            str(tmp_path / "ft"), "--device", "cpu"]  # fmt: skip
    r = runner.invoke(app, args + [e.format(tmp=tmp_path) for e in extra])
    assert r.exit_code == 2, r.output
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "ft").exists()


def test_init_cannot_change_on_resume(runner, tmp_path):
    parent = train_tiny(tmp_path, 6, steps=2)
    r = runner.invoke(app, ["train", "--resume", str(parent), "--init", str(parent),
                            "--steps", "3"])  # fmt: skip
    assert r.exit_code == 2 and "init" in r.stderr, r.output
    assert json.loads((parent / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 2
