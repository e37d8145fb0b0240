"""Step-numbered snapshots (`ddpm train --keep N`): one per checkpoint, the oldest pruned,
kept across resume, sampled with `ddpm sample RUN --step K`, listed by `ddpm inspect`."""

from __future__ import annotations

import json

import pytest

from conftest import train_tiny
from ddpm_cli.cli import app
from ddpm_cli.config import DiffusionConfig, TrainConfig
from ddpm_cli.errors import UsageError
from ddpm_cli.store.checkpoint import load_checkpoint
from ddpm_cli.store.files import MODEL, snapshots
from ddpm_cli.training.run import train


def steps(run) -> list[int]:
    return [s for s, _ in snapshots(run)]


def test_snapshots_are_kept_pruned_oldest_first_and_survive_resume(tmp_path):
    run = train_tiny(tmp_path, 6, steps=30, checkpoint_every=10, keep=2)
    assert steps(run) == [20, 30]
    newest = snapshots(run)[-1][1]
    assert newest.read_bytes() == (run / MODEL).read_bytes()  # a copy of the model at its step
    assert load_checkpoint(snapshots(run)[0][1]).step == 20
    # resume: the stored --keep goes on, the earlier snapshots are kept until pruned
    train(None, TrainConfig(), DiffusionConfig(), resume=run, given={"steps": 40})
    assert steps(run) == [30, 40]
    # a smaller --keep on resume prunes down to it, never the newest
    train(None, TrainConfig(), DiffusionConfig(), resume=run, given={"steps": 45, "keep": 1})
    assert steps(run) == [45]


def test_without_keep_no_snapshots_and_a_fresh_run_refuses_a_folder_with_some(tmp_path):
    run = train_tiny(tmp_path, 6, steps=20, checkpoint_every=10)
    assert steps(run) == []
    stale = tmp_path / "old" / "model-00000999.safetensors"
    stale.parent.mkdir()
    stale.write_bytes(b"an earlier run's")
    with pytest.raises(UsageError, match="holds checkpoints of an earlier run"):
        config = TrainConfig(preset="tiny", image_size=8, batch_size=4, steps=2, device="cpu")
        train(str(tmp_path / "pics"), config, DiffusionConfig(), tmp_path / "old")
    assert stale.read_bytes() == b"an earlier run's"  # (before, a new run deleted it)


def test_sample_step_draws_from_the_snapshot_and_inspect_lists_them(runner, tmp_path):
    run = train_tiny(tmp_path, 6, steps=20, checkpoint_every=10, keep=3)
    fast = ["-n", "2", "--seed", "1", "--steps", "3", "-q"]
    a = runner.invoke(
        app, ["sample", str(run), "--step", "10", "--json", "-o", str(tmp_path / "a"), *fast]
    )
    snapshot = str(run / "model-00000010.safetensors")
    b = runner.invoke(app, ["sample", snapshot, "-o", str(tmp_path / "b"), *fast])
    assert a.exit_code == 0 and b.exit_code == 0, a.output + b.output
    summary = json.loads(a.stdout)
    assert summary["checkpoint"].endswith("model-00000010.safetensors")
    for name in ("000000.png", "000001.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    latest = runner.invoke(app, ["sample", str(run), "-o", str(tmp_path / "c"), *fast])
    assert latest.exit_code == 0
    assert (tmp_path / "c" / "000000.png").read_bytes() != (
        tmp_path / "a" / "000000.png"
    ).read_bytes()
    r = runner.invoke(app, ["inspect", str(run), "--json"])
    assert json.loads(r.stdout)["run"]["snapshots"] == [10, 20]


@pytest.mark.parametrize(
    "args, message",
    [
        (["sample", "{run}", "--step", "5"], "no snapshot of step 5; it keeps steps 10, 20"),
        (["sample", "{run}", "--step", "10", "--raw"], "--raw and --step"),
        (["sample", "{bare}", "--step", "10"], "keeps no step-numbered snapshots"),
        (["sample", "{run}/model.safetensors", "--step", "10"],
         "model.safetensors: --step picks a snapshot of a run directory; give the directory"),
        (["train", "{pics}", "--keep", "0", "--steps", "1"], "--keep"),
    ],
)
def test_bad_steps_and_keep_are_one_line_exit_2(runner, tmp_path, args, message):
    run = train_tiny(tmp_path, 6, steps=20, checkpoint_every=10, keep=2)
    bare = None
    if "{bare}" in args:
        (tmp_path / "b").mkdir()
        bare = train_tiny(tmp_path / "b", 6, steps=2)
    paths = {"run": run, "bare": bare, "pics": tmp_path / "pics"}
    r = runner.invoke(app, [a.format(**paths) for a in args] + ["-o", str(tmp_path / "out")])
    assert r.exit_code == 2, r.output
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_stop_between_the_model_and_its_snapshot_is_made_good_on_resume(tmp_path):
    """The snapshot is a copy written after model.safetensors: a kill in between leaves the
    step without one; resume writes it from the model, which is of that step."""
    run = train_tiny(tmp_path, 6, steps=20, checkpoint_every=10, keep=3)
    (run / "model-00000020.safetensors").unlink()
    train(None, TrainConfig(), DiffusionConfig(), resume=run, given={"steps": 30})
    assert steps(run) == [10, 20, 30]
    assert load_checkpoint(run / "model-00000020.safetensors").step == 20
