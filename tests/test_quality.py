"""The quality figure during training (training/quality.py, `ddpm train --eval-every/--holdout`):
the held-out loss penalises a model that memorised its training images (closed form), the images
set aside are never trained on, best.safetensors holds the weights of the lowest figure and
survives pruning and resume, and bad options get one line and exit 2."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import train_tiny
from ddpm_cli.cli import app
from ddpm_cli.config import DiffusionConfig, TrainConfig
from ddpm_cli.data.batches import Batches, split
from ddpm_cli.data.folders import InMemory, to_model_range
from ddpm_cli.data.sources import load_source
from ddpm_cli.diffusion.schedules import DiffusionTables
from ddpm_cli.errors import UsageError
from ddpm_cli.generation.sampling import load_for_sampling
from ddpm_cli.store.checkpoint import config_section, load_checkpoint, save_checkpoint
from ddpm_cli.store.files import BEST, MODEL, snapshots
from ddpm_cli.training import quality
from ddpm_cli.training.run import train
from ddpm_cli.training.run_files import CACHE, METRICS

TABLES = DiffusionTables.from_config(DiffusionConfig())
CPU = torch.device("cpu")


# ---- the figure itself, against closed-form denoisers -------------------------------------------
# Images of 16 independent Gaussian pixels (mean 0, sd 0.3), quantised to uint8 like real data.
SD = 0.3


def gaussian_images(n: int, seed: int) -> torch.Tensor:
    x = torch.randn((n, 1, 4, 4), generator=torch.Generator().manual_seed(seed)) * SD
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class Denoiser(torch.nn.Module):
    """A predictor of eps from the posterior mean of x_0 given x_t (float64)."""

    def __init__(self, x0_mean):
        super().__init__()
        self.x0_mean = x0_mean

    def forward(self, xt, t):
        ab = TABLES.alpha_bar[t].double().view(-1, 1, 1, 1)
        x = xt.double()
        return ((x - ab.sqrt() * self.x0_mean(x, ab)) / (1 - ab).sqrt()).float()


def population(x, ab):
    """E[x_0 | x_t] for the Gaussian the images come from: it generalises."""
    return ab.sqrt() * SD**2 / (ab * SD**2 + 1 - ab) * x


def memoriser(train_images):
    """E[x_0 | x_t] for the training images alone (the optimum of the training loss): a model
    that has memorised them."""
    data = to_model_range(train_images).double().flatten(1)  # (m, 16)

    def x0_mean(x, ab):
        # the posterior over the training images: x_t ~ N(sqrt(ab) x_i, (1 - ab) I)
        diff = x.flatten(1)[:, None, :] - ab.view(-1, 1, 1).sqrt() * data[None]  # (B, m, 16)
        w = torch.softmax(-diff.pow(2).sum(-1) / (2 * (1 - ab.view(-1, 1))), dim=1)
        return (w @ data).view_as(x)

    return x0_mean


def figure(model, images, batch=64, seed=3):
    held = quality.HeldOut(images, None, seed)
    return quality.heldout_loss(model, TABLES, held, "eps", CPU, batch)


def test_the_heldout_loss_penalises_memorisation_that_the_training_loss_rewards():
    train_images, new_images = gaussian_images(12, 0), gaussian_images(64, 1)
    generalises = Denoiser(population)
    memorised = Denoiser(memoriser(train_images))
    # on its own training images the memoriser is the better model (lower loss) ...
    assert figure(memorised, train_images) < 0.9 * figure(generalises, train_images)
    # ... on images it never saw, the worse one: the held-out figure tells them apart
    assert figure(memorised, new_images) > 1.2 * figure(generalises, new_images)


def test_the_figure_is_fixed_stratified_and_independent_of_the_batch():
    images = gaussian_images(10, 2)
    model = Denoiser(population)
    assert figure(model, images, batch=7) == pytest.approx(figure(model, images, batch=256), 1e-6)
    assert figure(model, images) == figure(model, images)  # the same t and noise each time
    assert figure(model, images, seed=4) != figure(model, images, seed=3)
    t, which = quality.evaluation_plan(10, 1000, 5)
    n = 10 * -(-quality.EVALUATIONS // 10)
    assert len(t) == n and torch.bincount(which).tolist() == [n // 10] * 10
    # the timesteps are the n evenly spaced ones, each image's spread over the chain
    expected = ((torch.arange(n, dtype=torch.float64) + 0.5) * 1000 / n).long()
    assert torch.equal(t.sort().values, expected)
    assert all(t[which == i].double().std() > 150 for i in range(10))


def test_holdout_sizes_and_the_split():
    assert [quality.holdout_size(n, None) for n in (100, 159, 160, 1000, 100_000)] == [
        0, 0, 8, 50, 256,
    ]  # fmt: skip
    assert quality.holdout_size(100, 3) == 3 and quality.holdout_size(100, 0) == 0
    use, aside = split(50, 8, seed=4)
    assert sorted(use.tolist() + aside.tolist()) == list(range(50)) and len(aside) == 8
    assert torch.equal(split(50, 8, seed=4)[1], aside)  # the same images on resume
    assert not torch.equal(split(50, 8, seed=5)[1], aside)


def test_batches_never_yield_the_images_set_aside():
    data = torch.arange(30, dtype=torch.uint8).view(30, 1, 1, 1).expand(30, 1, 2, 2).clone()
    use, aside = split(30, 6, seed=0)
    batches = Batches(InMemory(data), 4, seed=1, flip=False, use=use)
    assert batches.per_epoch == 6
    feed = batches.iterate(0, 0)
    seen = torch.cat([next(feed)[0] for _ in range(3 * batches.per_epoch)])[:, 0, 0, 0]
    assert set(seen.tolist()) == set(use.tolist())


# ---- in a run ----------------------------------------------------------------------------------


def run_figures(run) -> list[dict]:
    lines = [json.loads(line) for line in (run / METRICS).read_text().splitlines()]
    return [r for r in lines if "heldout_loss" in r]


def recompute(run, path) -> float:
    """The figure of a model file, from the run's stored data and config (independently of
    the loop that logged it)."""
    cfg = config_section(load_checkpoint(path), "training", TrainConfig)
    images, _ = load_source(str(run / CACHE), cfg.image_size, cfg.channels)
    _, aside = split(len(images), cfg.holdout, cfg.seed, images.labels)
    sm = load_for_sampling(path)
    tables = DiffusionTables.from_config(sm.diffusion).to(CPU, torch.float32)
    held = quality.HeldOut.take(images, aside, cfg.seed)
    return quality.heldout_loss(sm.model, tables, held, cfg.objective.value, CPU, 5)


def test_a_run_logs_the_figure_and_keeps_the_best_weights(tmp_path):
    run = train_tiny(tmp_path, 30, steps=9, checkpoint_every=3, keep=10, holdout=6,
                     eval_every=2)  # fmt: skip
    figures = run_figures(run)
    assert [r["step"] for r in figures] == [2, 4, 6, 8, 9]  # and the finished run's own
    # like a step's line, a figure's has the run's seconds and the loop's, in order
    lines = [json.loads(line) for line in (run / METRICS).read_text().splitlines()]
    assert all(0 < r["trained"] <= r["elapsed"] for r in lines)
    assert [r["trained"] for r in lines] == sorted(r["trained"] for r in lines)
    best = min(figures, key=lambda r: r["heldout_loss"])
    ckpt = load_checkpoint(run / BEST)
    assert ckpt.step == best["step"] and ckpt.json("heldout_loss") == best["heldout_loss"]
    flags = [r["best"] for r in figures]
    lowest = [r["heldout_loss"] < min([f["heldout_loss"] for f in figures[:i]] or [9])
              for i, r in enumerate(figures)]  # fmt: skip
    assert flags == lowest
    # the logged figure is the file's own, recomputed from its weights and the held-out images
    assert recompute(run, run / BEST) == pytest.approx(best["heldout_loss"], rel=1e-5)
    # a step that is both a snapshot and the best: the same weights
    if best["step"] in dict(snapshots(run)):
        snap = load_checkpoint(dict(snapshots(run))[best["step"]])
        assert all(torch.equal(snap.tensors[k], ckpt.tensors[k]) for k in snap.tensors)


def test_resume_compares_against_the_stored_best_and_pruning_keeps_it(tmp_path):
    run = train_tiny(tmp_path, 30, steps=4, checkpoint_every=2, keep=1, holdout=6)
    assert [r["step"] for r in run_figures(run)] == [2, 4]  # default: at every checkpoint
    # make the stored best unbeatable: resumed figures must not replace it
    best = load_checkpoint(run / BEST)
    meta = {k: best.json(k) for k in ("config", "step", "ema_decay", "elapsed")}
    save_checkpoint(run / BEST, best.tensors, "model", {**meta, "weights": "ema",
                                                       "heldout_loss": 1e-9})  # fmt: skip
    train(None, TrainConfig(), DiffusionConfig(), resume=run, given={"steps": 8})
    assert [s for s, _ in snapshots(run)] == [8]  # --keep 1 pruned every older snapshot
    assert load_checkpoint(run / BEST).step == best.step  # the best is not the newest
    assert not any(r["best"] for r in run_figures(run) if r["step"] > 4)
    # a fresh run in the same directory never deletes the old best (it once did)
    (run / MODEL).unlink()
    (run / "train_state.safetensors").unlink()
    with pytest.raises(UsageError, match=r"holds checkpoints of an earlier run \(best"):
        train(str(tmp_path / "pics"), TrainConfig(preset="tiny", image_size=8, batch_size=4,
              steps=2, sample_every=0, seed=1, holdout=0), DiffusionConfig(), run)  # fmt: skip
    assert load_checkpoint(run / BEST).step == best.step


def test_without_images_set_aside_no_figure_and_no_best(tmp_path):
    run = train_tiny(tmp_path, 30, steps=4, checkpoint_every=2)  # 30 images: none by default
    assert run_figures(run) == [] and not (run / BEST).exists()
    r = load_checkpoint(run / MODEL).config["training"]
    assert r["holdout"] == 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--eval-every", "5"], "--eval-every needs images set aside"),
        (["--holdout", "12"], "--holdout 12 leaves no images to train on"),
        (["--holdout", "0", "--eval-every", "2"], "the run sets aside none"),
        (["--holdout", "-1"], "--holdout"),
        (["--eval-every", "-1"], "--eval-every"),
    ],
)
def test_bad_quality_options_are_one_line_exit_2(runner, tmp_path, args, message):
    from conftest import draw_shapes

    (tmp_path / "pics").mkdir()
    for i in range(12):
        draw_shapes((12 + i, 12)).save(tmp_path / "pics" / f"{i}.png")
    r = runner.invoke(app, ["train", str(tmp_path / "pics"), "--steps", "2", "--image-size",
                            "8", "-o", str(tmp_path / "run"), *args])  # fmt: skip
    assert r.exit_code == 2, r.output
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "run" / MODEL).exists()


def test_inspect_shows_the_figures_and_the_best(runner, tmp_path):
    run = train_tiny(tmp_path, 30, steps=4, checkpoint_every=2, holdout=6)
    r = runner.invoke(app, ["inspect", str(run), "--json"])
    info = json.loads(r.stdout)["run"]
    assert info["figures"] == 2 and info["last_figure"]["step"] == 4
    assert info["best"]["heldout_loss"] == load_checkpoint(run / BEST).json("heldout_loss")
    assert info["logged_steps"] == 4 and info["last"]["step"] == 4  # training lines only
    text = runner.invoke(app, ["inspect", str(run)]).output
    assert "2 held-out losses" in text and "best.safetensors" in text


def test_a_run_saved_before_quality_figures_and_shifts_resumes_as_it_was(tmp_path, monkeypatch):
    """On all its images, and unshifted (30 images would now be shifted by default)."""
    monkeypatch.setattr(quality, "HOLDOUT_MIN", 1)  # 30 images would now set aside one
    run = train_tiny(tmp_path, 30, steps=2, holdout=0, shift=0, image_size=16)
    state = load_checkpoint(run / "train_state.safetensors")
    keys = ("world_size", "config", "step", "epoch", "batch_in_epoch", "elapsed",
            "train_seconds", "optimizer_groups", "scaler")  # fmt: skip
    meta = {k: state.json(k) for k in keys}
    for key in ("holdout", "shift"):  # as written before --holdout and --shift existed
        del meta["config"]["training"][key]
    del meta["config"]["model"]["augment"]
    save_checkpoint(run / "train_state.safetensors", state.tensors, "train_state", meta)
    train(None, TrainConfig(), DiffusionConfig(), resume=run, given={"steps": 4})
    config = load_checkpoint(run / MODEL).config
    assert config["training"]["holdout"] == 0 and config["training"]["shift"] == 0
    assert config["model"]["augment"] == 0
    assert run_figures(run) == []


def test_eval_every_0_sets_no_images_aside_and_a_class_is_never_set_aside_whole():
    from ddpm_cli.training.train import resolve

    cfg = resolve(TrainConfig(eval_every=0, seed=1, image_size=8), CPU, 1000, 3)
    assert cfg.holdout == 0 and cfg.evaluates_every == 0
    assert resolve(TrainConfig(seed=1, image_size=8), CPU, 1000, 3).holdout == 50
    # one image of class 1 among 40: whatever the seed, it stays in training
    labels = torch.tensor([0] * 39 + [1])
    for seed in range(30):
        use, aside = split(40, 20, seed, labels)
        assert 39 in use.tolist() and len(aside) == 20
        assert sorted(use.tolist() + aside.tolist()) == list(range(40))


def test_a_non_finite_figure_is_logged_but_never_the_best(tmp_path, monkeypatch):
    values = iter([0.5, float("nan"), 0.4])
    monkeypatch.setattr(quality, "heldout_loss", lambda *a, **k: next(values))
    run = train_tiny(tmp_path, 30, steps=6, checkpoint_every=2, holdout=6)
    figures = run_figures(run)
    assert [r["best"] for r in figures] == [True, False, True]
    assert load_checkpoint(run / BEST).step == 6


def test_a_resume_with_no_steps_left_logs_no_second_figure(tmp_path):
    run = train_tiny(tmp_path, 30, steps=4, checkpoint_every=2, holdout=6)
    with pytest.raises(UsageError, match="nothing to train"):  # refused, nothing written
        train(None, TrainConfig(), DiffusionConfig(), resume=run, given={"steps": 4})
    assert [r["step"] for r in run_figures(run)] == [2, 4]


def test_a_holdout_the_classes_cannot_spare_is_said_and_counted_as_set_aside(tmp_path):
    """--holdout 9 of two classes of 5: each keeps one image to train on, so 8 are set aside;
    the run says so, and its table counts 8 (before: 9), as the figure and `ddpm eval
    --held-out` do. The option stays as typed, so a resume that repeats it is no change."""
    from PIL import Image

    from ddpm_cli.cli.views import preflight_table

    for name, colour in (("a", (255, 0, 0)), ("b", (0, 0, 255))):
        (tmp_path / "d" / name).mkdir(parents=True)
        for i in range(5):
            Image.new("RGB", (8, 8), (colour[0], i * 40, colour[2])).save(
                tmp_path / "d" / name / f"{i}.png")
    starts = []
    config = TrainConfig(preset="tiny", image_size=8, batch_size=2, device="cpu", seed=1,
                         steps=1, sample_every=0, holdout=9)  # fmt: skip
    out = train(str(tmp_path / "d"), config, DiffusionConfig(), out=tmp_path / "run",
                given={"holdout": 9},
                on_event=lambda kind, info: kind == "start" and starts.append(info)).out
    assert starts[0]["set_aside"] == 8
    assert "--holdout 9: 8 images set aside, so that each class keeps one to train on" in (
        starts[0]["warnings"])
    rows = {c.plain if hasattr(c, "plain") else str(c) for c in
            preflight_table(starts[0]).columns[1].cells}  # fmt: skip
    assert any(r.startswith("held-out loss on 8 images set aside") for r in rows), rows
    from ddpm_cli.data.folders import load_folder

    images, report = load_folder(tmp_path / "d", (8, 8))
    assert len(load_for_sampling(out).held_out_split(10, report, images.labels)[1]) == 8
    train(None, TrainConfig(), DiffusionConfig(), resume=out, given={"holdout": 9, "steps": 2},
          on_event=lambda kind, info: kind == "start" and starts.append(info))
    assert starts[1]["set_aside"] == 8 and not any("--holdout" in w for w in starts[1]["warnings"])


def test_a_best_from_training_a_resume_goes_back_over_is_kept_and_said(tmp_path, monkeypatch):
    """Killed after the figure of step 20 saved best.safetensors but before the checkpoint of
    step 20, a run resumes at step 10: that best is a model that was measured, so it stays
    (only a lower figure replaces it), and the resume says where it came from, since the
    metrics of its step are gone."""
    # the figures of steps 5, 10 (kept); 5, 10, 15, 20 (ahead); 12 (the resume: worse)
    values = iter([1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 5.0])
    for name in ("kept", "ahead"):
        (tmp_path / name).mkdir()
    monkeypatch.setattr(quality, "heldout_loss", lambda *a, **k: next(values))
    kept = train_tiny(tmp_path / "kept", 30, steps=10, checkpoint_every=10, holdout=6,
                      eval_every=5)  # fmt: skip
    ahead = train_tiny(tmp_path / "ahead", 30, steps=20, checkpoint_every=10, holdout=6,
                       eval_every=5)  # fmt: skip
    assert load_checkpoint(ahead / BEST).step == 20
    (kept / BEST).write_bytes((ahead / BEST).read_bytes())  # what the kill left
    starts = []
    train(None, TrainConfig(), DiffusionConfig(), resume=kept, given={"steps": 12},
          on_event=lambda kind, info: kind == "start" and starts.append(info))
    assert f"{kept / BEST} is from step 20, after the checkpoint this resume continues from " \
        "(step 10), whose metrics are dropped: kept, as a model that was measured; only a " \
        "lower figure replaces it" in starts[0]["warnings"]  # fmt: skip
    assert load_checkpoint(kept / BEST).step == 20


def test_a_steps_records_and_checkpoint_give_one_training_time(tmp_path):
    """The metrics line, checkpoint and figure of a step record the training seconds up to the
    end of that step, so a resume from its checkpoint goes on from what they say (before, the
    figure after a checkpoint was later, and a resumed run's `trained` went backwards). Runs
    that end on a checkpoint step and between them."""
    for steps, name in ((10, "on"), (7, "between")):
        (tmp_path / name).mkdir()
        run = train_tiny(tmp_path / name, 30, steps=steps, checkpoint_every=5, holdout=6,
                         eval_every=5, log_every=1)  # fmt: skip
        records = [json.loads(line) for line in (run / METRICS).read_text().splitlines()]
        by_step: dict[int, set] = {}
        for r in records:
            by_step.setdefault(r["step"], set()).add(r["trained"])
        assert all(len(times) == 1 for times in by_step.values()), by_step
        saved = load_checkpoint(run / "train_state.safetensors").json("train_seconds")
        assert by_step[steps] == {saved} and "heldout_loss" in records[-1]
        times = [next(iter(by_step[k])) for k in sorted(by_step)]
        assert times == sorted(times)


def test_a_time_stop_just_after_a_checkpoint_step_saves_the_time_it_ended(tmp_path, monkeypatch):
    """--time runs out during a checkpoint step's own writes: the run saves again, with the
    time it stopped (at least the limit), so a resume says there is nothing left to train
    (before, the checkpoint of that step kept an earlier time, and a resume trained on)."""
    from ddpm_cli.training import loop as loop_mod

    real = loop_mod.Loop.trained

    def trained(self, live=False):  # the budget runs out once step 3 (a checkpoint) is done
        spent = real(self, live)
        return spent + 10_000 if live and self.job.state.step >= 3 else spent

    monkeypatch.setattr(loop_mod.Loop, "trained", trained)
    run = train_tiny(tmp_path, 30, steps=None, time_limit=1000.0, checkpoint_every=3,
                     holdout=6, eval_every=3, log_every=1)  # fmt: skip
    state = load_checkpoint(run / "train_state.safetensors")
    assert state.step == 3 and state.json("train_seconds") >= 1000.0
    records = [json.loads(line) for line in (run / METRICS).read_text().splitlines()]
    assert all(r["trained"] <= state.json("train_seconds") for r in records)
    monkeypatch.setattr(loop_mod.Loop, "trained", real)
    with pytest.raises(UsageError, match="nothing to train"):
        train(None, TrainConfig(), DiffusionConfig(), resume=run, given={})
