"""torchrun jobs on the CPU (gloo): two processes train and sample exactly as one does."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import draw_shapes
from ddpm_cli.cli import app
from ddpm_cli.store.checkpoint import load_checkpoint

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="gloo jobs on Linux and macOS")

# --lr 2e-4: Adam turns rounding-level differences in near-zero gradients into steps of up to
# lr, so the tolerance below scales with it; the paper's rate keeps them under 1e-5
TRAIN = ["train", "pics", "--preset", "tiny", "--image-size", "8", "--seed", "3",
         "--sample-every", "0", "--log-every", "1", "--lr", "2e-4"]  # fmt: skip


def torchrun(cwd: Path, *args: str, procs: int = 2, wait: bool = True, **env):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={procs}", "-m", "ddpm_cli", "--", *args]  # fmt: skip
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    if not wait:
        return subprocess.Popen(cmd, cwd=cwd, env=environment, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    return subprocess.run(cmd, cwd=cwd, env=environment, capture_output=True, text=True,
                          timeout=240)  # fmt: skip


def ddpm(cwd: Path, *args: str):
    """`ddpm ARGS` in this process, from cwd: the one-process runs the jobs are compared with
    (a process of their own would only add the start-up of another interpreter)."""
    here = os.getcwd()
    os.chdir(cwd)
    try:
        return CliRunner().invoke(app, list(args))
    finally:
        os.chdir(here)


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """16 pictures; a 2-process run with batch 4 and a 1-process run with batch 8."""
    root = tmp_path_factory.mktemp("dist")
    (root / "pics").mkdir()
    for i in range(16):
        draw_shapes((12 + i, 12)).save(root / "pics" / f"{i}.png")
    two = torchrun(root, *TRAIN, "--batch-size", "4", "--steps", "4", "--out", "two")
    one = ddpm(root, *TRAIN, "--batch-size", "8", "--steps", "4", "--out", "one")
    assert two.returncode == 0, two.stderr
    assert one.exit_code == 0, one.output
    return root, two, one


def test_two_processes_train_the_weights_of_one_with_the_global_batch(jobs):
    root, two, _ = jobs
    a = load_file(str(root / "one" / "train_state.safetensors"))
    b = load_file(str(root / "two" / "train_state.safetensors"))
    for prefix in ("model.", "ema."):
        diff = max((a[k] - b[k]).abs().max().item() for k in a if k.startswith(prefix))
        assert diff < 1e-5, prefix
    # the same losses, logged once, for the whole global batch
    logs = [[json.loads(line)["loss"] for line in (root / run / "metrics.jsonl").open()]
            for run in ("one", "two")]  # fmt: skip
    assert len(logs[0]) == 4 and logs[0] == pytest.approx(logs[1], rel=1e-5)
    assert "batch 4 x 1 x 2 processes = 8 global" in two.stderr


def test_only_rank_0_writes_and_reports(jobs):
    root, two, _ = jobs
    files = sorted(p.name for p in (root / "two").iterdir() if not p.name.startswith("."))
    assert files == ["data_cache.safetensors", "metrics.jsonl", "model.safetensors",
                     "train_state.safetensors"]  # fmt: skip
    assert two.stdout.strip().splitlines() == [str(Path("two") / "model.safetensors")]
    assert two.stderr.count("finished at step 4") == 1 and two.stderr.count("step 1 ") == 1
    assert load_checkpoint(root / "two" / "train_state.safetensors").json("world_size") == 2
    shown = ddpm(root, "inspect", "two")
    assert shown.exit_code == 0 and "trained by" in shown.stdout
    assert "2 processes (torchrun)" in shown.stdout


def test_resume_with_another_world_size(jobs):
    root, _, _ = jobs
    r = ddpm(root, "train", "--resume", "two", "--steps", "6")
    assert r.exit_code == 0, r.output
    assert "saved by 2 processes, resumed by 1: the global batch is now 4" in r.stderr
    state = load_checkpoint(root / "two" / "train_state.safetensors")
    assert state.step == 6 and state.json("world_size") == 1


def test_distributed_sampling_writes_the_images_of_one_process(jobs):
    root, _, _ = jobs
    # --num: torchrun would read it as its own --numa-binding without the -- (docs)
    args = ["sample", "one", "--num", "5", "--seed", "4", "--steps", "4"]
    two = torchrun(root, *args, "-o", "s2")
    one = ddpm(root, *args, "-o", "s1")
    assert two.returncode == 0 and one.exit_code == 0, two.stderr + one.output
    for k in range(5):
        name = f"{k:06d}.png"
        assert (root / "s2" / name).read_bytes() == (root / "s1" / name).read_bytes()
    assert two.stdout.splitlines() == [str(Path("s2") / f"{k:06d}.png") for k in range(5)]



def test_distributed_sampling_refuses_a_grid(jobs, monkeypatch):
    """Refused before any work from what torchrun sets: WORLD_SIZE, here in this process."""
    root, _, _ = jobs
    monkeypatch.setenv("WORLD_SIZE", "2")
    grid = ddpm(root, "sample", "one", "-n", "2", "--grid", "g.png")
    assert grid.exit_code == 2 and "writes numbered files only" in grid.stderr
    assert len(grid.stderr.strip().splitlines()) == 1 and not (root / "g.png").exists()


def test_a_job_says_a_usage_error_once_and_names_the_rank_of_other_errors(jobs, monkeypatch):
    """Every process of a job finds the same usage error: rank 0 says it, the others keep
    quiet (before, the job printed it once per process). An error of one process's own is
    said by that process, with its rank."""
    root, _, _ = jobs
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, said in (("0", True), ("1", False)):
        monkeypatch.setenv("RANK", rank)
        r = ddpm(root, "sample", "one", "-n", "2", "--grid", "g.png")
        assert r.exit_code == 2 and ("writes numbered files only" in r.stderr) == said
        r = ddpm(root, "train", "--bogus")
        assert r.exit_code == 2 and ("No such option: --bogus" in r.stderr) == said
        # a file one machine lacks is that process's own error: said, with its rank
        r = ddpm(root, "inspect", "not-here")
        prefix = "rank 1: " if rank == "1" else ""
        assert r.exit_code == 2 and r.stderr.startswith(f"{prefix}error: not-here"), r.stderr
    monkeypatch.setenv("WORLD_SIZE", "1")  # a RANK without a job (another launcher's): all said
    monkeypatch.setenv("RANK", "3")
    r = ddpm(root, "train", "--bogus")
    assert r.exit_code == 2 and r.stderr.startswith("error: No such option: --bogus")



def test_a_process_names_its_rank_in_an_error_of_its_own(monkeypatch, capsys):
    from ddpm_cli.cli.common import error_line

    monkeypatch.setenv("RANK", "1")  # a RANK alone (another launcher's) makes no job
    error_line("the same usage error on every process", usage=True)
    assert capsys.readouterr().err == "error: the same usage error on every process\n"
    monkeypatch.setenv("WORLD_SIZE", "2")
    error_line("out of memory: try a smaller --batch-size")
    error_line("the same usage error on every process", usage=True)
    assert capsys.readouterr().err == "rank 1: error: out of memory: try a smaller --batch-size\n"


def _rank_pids(parent: int) -> dict[int, int]:
    """The torchrun workers of `parent`, by RANK (read from /proc)."""
    out = {}
    for pid in Path("/proc").iterdir():
        if not pid.name.isdigit():
            continue
        try:
            stat = (pid / "stat").read_text().split()
            env = (pid / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        ranks = [e[5:] for e in env if e.startswith(b"RANK=")]
        if ranks and int(stat[3]) != 1 and _descends(int(pid.name), parent):
            out[int(ranks[0])] = int(pid.name)
    return out


def _descends(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().split()[3])
        except OSError:
            return False
    return False


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc")
def test_a_rank_that_dies_ends_the_job_quickly_and_non_zero(jobs):
    root, _, _ = jobs
    job = torchrun(root, *TRAIN, "--batch-size", "4", "--steps", "100000", "--out", "killed",
                   "--checkpoint-every", "2", wait=False, DDPM_DIST_TIMEOUT="30")  # fmt: skip
    try:
        deadline = time.time() + 120
        while not (root / "killed" / "model.safetensors").exists() and time.time() < deadline:
            time.sleep(0.5)
        ranks = _rank_pids(job.pid)
        assert 1 in ranks, ranks
        os.kill(ranks[1], signal.SIGKILL)
        t0 = time.time()
        job.wait(timeout=90)
        assert time.time() - t0 < 90 and job.returncode != 0
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    # the last checkpoint is whole
    assert load_checkpoint(root / "killed" / "train_state.safetensors").step >= 2


def test_an_epoch_limit_survives_a_change_in_the_number_of_processes():
    """Steps of the old global batch do not count against the new one: 100 epochs of CIFAR-10
    at batch 128 on one GPU, stopped at step 20,000 (epoch 51), resumed on four GPUs."""
    from types import SimpleNamespace

    from ddpm_cli.config import TrainConfig
    from ddpm_cli.training.resume import steps_left_by_epoch

    state = SimpleNamespace(step=20_000, epoch=51, batch_in_epoch=10)
    config = TrainConfig(epochs=100, batch_size=128)
    per_epoch = 98  # 50,000 images / (128 x 4)
    assert steps_left_by_epoch(config, state, per_epoch, 9_800) == 20_000 + 49 * 98 - 10
    capped = TrainConfig(epochs=100, steps=21_000, batch_size=128)
    assert steps_left_by_epoch(capped, state, per_epoch, 9_800) == 21_000
    assert steps_left_by_epoch(TrainConfig(steps=30_000), state, per_epoch, 30_000) == 30_000
    # no limit given: the default 100 epochs, counted the same way (before, 9,800 steps in
    # today's batches, which the run had passed: "nothing to train")
    default = TrainConfig(batch_size=128)
    assert steps_left_by_epoch(default, state, per_epoch, 9_800) == 20_000 + 49 * 98 - 10


def test_a_class_conditional_job_trains_and_samples_as_one_process(tmp_path):
    """Labels and the dropped-label draws are sharded like the images: 2 x 4 equals 1 x 8."""
    for i in range(16):
        folder = tmp_path / "pics" / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        draw_shapes((12 + i, 12)).save(folder / f"{i}.png")
    two = torchrun(tmp_path, *TRAIN, "--batch-size", "4", "--steps", "3", "--out", "two")
    one = ddpm(tmp_path, *TRAIN, "--batch-size", "8", "--steps", "3", "--out", "one")
    assert two.returncode == 0 and one.exit_code == 0, two.stderr + one.output
    a = load_file(str(tmp_path / "one" / "train_state.safetensors"))
    b = load_file(str(tmp_path / "two" / "train_state.safetensors"))
    assert "model.class_emb.weight" in a
    assert max((a[k] - b[k]).abs().max().item() for k in a if k.startswith("model.")) < 1e-5
    args = [
        "sample",
        "one",
        "-n",
        "2",
        "--class",
        "all",
        "--guidance",
        "2",
        "--steps",
        "3",
        "--seed",
        "5",
    ]
    s2 = torchrun(tmp_path, *args, "-o", "s2")
    s1 = ddpm(tmp_path, *args, "-o", "s1")
    assert s2.returncode == 0 and s1.exit_code == 0, s2.stderr + s1.output
    names = sorted(p.name for p in (tmp_path / "s1").iterdir())
    assert names == ["a-000000.png", "a-000001.png", "b-000000.png", "b-000001.png"]
    for name in names:
        assert (tmp_path / "s2" / name).read_bytes() == (tmp_path / "s1" / name).read_bytes()


def test_processes_that_see_different_data_are_refused(tmp_path):
    """Each process reads the data itself: rank 1 finding other files than rank 0 (here, one
    image more) is refused at start by every process, before a step (issue 27)."""
    for rank in (0, 1):
        (tmp_path / f"pics{rank}").mkdir()
        for i in range(8 + rank):
            draw_shapes((12 + i, 12)).save(tmp_path / f"pics{rank}" / f"{i}.png")
    # one folder name for both processes: a link each process resolves to its own copy
    wrapper = tmp_path / "per_rank.py"
    wrapper.write_text(
        "import os, sys\n"
        "os.symlink(f\"pics{os.environ['RANK']}\", f\"pics-r{os.environ['RANK']}\")\n"
        "sys.argv[2] = f\"pics-r{os.environ['RANK']}\"\n"
        "from ddpm_cli.cli import main\n"
        "main()\n"
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(wrapper), *TRAIN, "--steps", "2", "--out", "run"]  # fmt: skip
    r = subprocess.run(cmd, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"},
                       capture_output=True, text=True, timeout=240)  # fmt: skip
    assert r.returncode != 0
    assert "see different data" in r.stderr and "rank 1" in r.stderr, r.stderr
    assert not (tmp_path / "run" / "model.safetensors").exists()


class Exited(Exception):
    pass


@pytest.mark.parametrize("argv, code", [(["--version"], 0), (["sample", "--no-such"], 2)])
def test_a_torchrun_process_ends_without_the_interpreter_teardown(monkeypatch, capsys, argv, code):
    """gloo's workers can still be dropping the last collective when Python finalizes, which
    aborts a job that went well (exit -6); a process that joined a job ends in os._exit after
    running the exit handlers and flushing its streams."""
    from ddpm_cli import cli, distributed

    calls = []
    monkeypatch.setattr(distributed, "_joined", True)
    monkeypatch.setattr(distributed.atexit, "_run_exitfuncs", lambda: calls.append("atexit"))

    def leave(status):
        calls.append(status)
        raise Exited

    monkeypatch.setattr(distributed.os, "_exit", leave)
    monkeypatch.setattr(sys, "argv", ["ddpm", *argv])
    with pytest.raises(Exited):
        cli.main()
    assert calls == ["atexit", code]
    if code == 0:
        assert capsys.readouterr().out.startswith("ddpm ")
    # a process that never joined a job exits as usual
    monkeypatch.setattr(distributed, "_joined", False)
    with pytest.raises(SystemExit) as done:
        cli.main()
    assert done.value.code == code and calls == ["atexit", code]


def test_only_rank_0_says_it_is_stopping(capsys):
    """Ctrl-C reaches every process of a job; each stops after the step, rank 0 says so."""
    import signal as signals

    from ddpm_cli.cli.stopping import Stopper

    for speaks in (True, False):
        stop = Stopper(lambda kind, info: None, None, speaks=speaks)
        stop.handler(signals.SIGINT, None)
        assert stop.requested() and stop.signalled() and stop.exit_code() == 130
        assert ("stopping: saving a checkpoint" in capsys.readouterr().err) == speaks
