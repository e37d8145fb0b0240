"""Reliability: no pickle anywhere, one trainer per run directory, full disks, kills."""

from __future__ import annotations

import ast
import errno
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import ddpm_executable, draw_shapes
from ddpm_cli.cli import app
from ddpm_cli.store.checkpoint import load_checkpoint
from ddpm_cli.store.files import RunLock

SRC = Path(__file__).resolve().parents[1] / "src" / "ddpm_cli"


def test_the_source_never_unpickles():
    """No module imports pickle (or its relatives), calls torch.load / numpy.load, or uses a
    torch.distributed collective that unpickles what another process sends."""
    banned_modules = {"pickle", "cPickle", "dill", "joblib", "shelve", "marshal"}
    found = []
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [(node.module or "").split(".")[0]]
            else:
                names = []
            found += [f"{path.name}: import {n}" for n in names if n in banned_modules]
            if isinstance(node, ast.Attribute) and node.attr == "load":
                owner = node.value
                if isinstance(owner, ast.Name) and owner.id in ("torch", "np", "numpy"):
                    found.append(f"{path.name}:{node.lineno}: {owner.id}.load")
            # torch.distributed's *_object collectives unpickle what other processes send
            if isinstance(node, ast.Attribute) and node.attr.endswith(("_object", "_object_list")):
                found.append(f"{path.name}:{node.lineno}: {node.attr}")
    assert found == []
    assert len(list(SRC.rglob("*.py"))) > 20  # the scan saw the package


def _pics(root: Path, n: int = 8) -> Path:
    (root / "pics").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        draw_shapes((12 + i, 12)).save(root / "pics" / f"{i}.png")
    return root / "pics"


TRAIN = ["--preset", "tiny", "--image-size", "8", "--batch-size", "4", "--seed", "1",
         "--sample-every", "0", "--log-every", "1"]  # fmt: skip


def test_a_second_trainer_on_the_same_run_directory_refuses(runner, tmp_path):
    pics = _pics(tmp_path)
    held = RunLock(tmp_path / "run")
    (tmp_path / "run").mkdir()
    held.acquire()
    try:
        r = runner.invoke(app, ["train", str(pics), *TRAIN, "--steps", "2", "--out",
                                str(tmp_path / "run")])  # fmt: skip
        assert r.exit_code == 2, r.output
        (line,) = r.stderr.strip().splitlines()
        assert f"another ddpm train (pid {os.getpid()}) is using this run directory" in line
        assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock"]
        # a resume of a run still before its first checkpoint is told the run is busy, not
        # that the folder is no run
        r = runner.invoke(app, ["train", "--resume", str(tmp_path / "run")])
        assert r.exit_code == 2 and f"another ddpm train (pid {os.getpid()})" in r.stderr
        assert "--out" not in r.stderr  # which a resume may not choose
    finally:
        held.release()
    r = runner.invoke(app, ["train", "--resume", str(tmp_path / "run")])
    assert r.exit_code == 2 and "no train_state.safetensors to resume from" in r.stderr
    ok = runner.invoke(app, ["train", str(pics), *TRAIN, "--steps", "2", "--out",
                             str(tmp_path / "run")])  # fmt: skip
    assert ok.exit_code == 0, ok.output  # released: the next one trains


def test_two_real_processes_on_one_out(runner, tmp_path):
    """A training process holds the run; this one (pytest's) is refused a second run in it
    and a resume of it."""
    pics = _pics(tmp_path)
    cmd = [sys.executable, "-m", "ddpm_cli", "train", str(pics), *TRAIN, "--out",
           str(tmp_path / "run")]  # fmt: skip
    first = subprocess.Popen([*cmd, "--steps", "100000", "--checkpoint-every", "1"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.time() + 60
        while not (tmp_path / "run" / "model.safetensors").exists() and time.time() < deadline:
            time.sleep(0.2)
        second = runner.invoke(app, [*cmd[3:], "--steps", "2"])
        assert second.exit_code == 2 and "already holds a run" in second.stderr
        third = runner.invoke(app, ["train", "--resume", str(tmp_path / "run")])
        assert third.exit_code == 2 and "another ddpm train" in third.stderr
    finally:
        first.kill()
        first.wait()


class DiskFull:
    """Makes os.replace fail with ENOSPC for files whose name matches, as a full disk would
    fail the write before it (the temporary file is written, then the rename is refused)."""

    def __init__(self, monkeypatch, pattern: str, after: int = 0):
        self.pattern, self.after, self.calls = pattern, after, 0
        real = os.replace

        def replace(src, dst, *a, **k):
            if self.pattern in str(dst):
                self.calls += 1
                if self.calls > self.after:
                    raise OSError(errno.ENOSPC, "No space left on device")
            return real(src, dst, *a, **k)

        monkeypatch.setattr(os, "replace", replace)


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(runner, tmp_path, monkeypatch):
    pics = _pics(tmp_path)
    out = tmp_path / "run"
    # the first two checkpoint writes (train_state, model at step 2) succeed, then the disk fills
    DiskFull(monkeypatch, ".safetensors", after=3)
    r = runner.invoke(app, ["train", str(pics), *TRAIN, "--steps", "6", "--checkpoint-every",
                            "2", "--no-data-cache", "--out", str(out)])  # fmt: skip
    assert r.exit_code == 1, r.output
    (line,) = r.stderr.strip().splitlines()[-1:]
    assert "cannot write: disk full" in line and "Traceback" not in r.output
    assert load_checkpoint(out / "model.safetensors").step == 2
    assert load_checkpoint(out / "train_state.safetensors").step in (2, 4)
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]  # no half-written files


def test_a_full_disk_while_sampling_is_one_line(runner, tmp_path, monkeypatch):
    from conftest import train_tiny

    run = train_tiny(tmp_path, 4)
    DiskFull(monkeypatch, "000001.png")
    r = runner.invoke(app, ["sample", str(run), "-n", "3", "--steps", "2", "-o",
                            str(tmp_path / "imgs")])  # fmt: skip
    assert r.exit_code == 1, r.output
    assert r.stderr.strip().splitlines()[-1].endswith("000001.png: cannot write: disk full")
    assert sorted(p.name for p in (tmp_path / "imgs").iterdir()) == ["000000.png"]


def test_an_output_folder_that_cannot_be_created_is_one_line(runner, tmp_path, monkeypatch):
    """A read-only file system or a folder without permission (root passes os.access, so the
    refusal comes from mkdir itself): one line naming the folder, for every command that makes
    one, and nothing sampled or trained."""
    from conftest import train_tiny

    run = train_tiny(tmp_path, 4)
    real = Path.mkdir

    def refused(self, *args, **kwargs):
        if "denied" in self.parts:
            raise PermissionError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refused)
    target = tmp_path / "denied"
    for args in (["sample", str(run), "-n", "1", "--steps", "2", "-o", str(target)],
                 ["train", str(_pics(tmp_path / "p")), *TRAIN, "--steps", "2", "--out",
                  str(target)],
                 ["export", str(run), "--diffusers", str(target)]):  # fmt: skip
        r = runner.invoke(app, args)
        assert r.exit_code == 1, (args, r.output)
        lines = r.stderr.strip().splitlines()  # (sample's header line comes first)
        assert [x for x in lines if x.startswith("error")] == lines[-1:] == [
            f"error: {target}: cannot create this folder: Read-only file system"
        ], args
        assert "Traceback" not in r.output
        assert not target.exists()


def _train_cmd(pics: Path, out: Path, steps: int) -> list[str]:
    return [sys.executable, "-m", "ddpm_cli", "train", str(pics), *TRAIN, "--steps", str(steps),
            "--checkpoint-every", "1", "--no-data-cache", "--out", str(out), "-q"]  # fmt: skip


KILL_TRIALS = int(os.environ.get("DDPM_KILL_TRIALS", "6"))  # CI's slice; the full suite: 20+


def _stamp(path: Path) -> tuple[int, int] | None:
    """Which file is at path now: an atomic replace gives a new inode and modification time."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_sigkill_at_random_moments_always_leaves_a_loadable_checkpoint(runner, tmp_path):
    """Kill a run at a random moment, then kill its resumption, and so on (many kills land
    inside checkpoint writes, which happen every step here): the latest checkpoint always
    loads, each resumption sweeps the torn write away and goes on from the last step saved,
    and the last one finishes the run."""
    pics, out = _pics(tmp_path), tmp_path / "run"
    rng = random.Random(0)  # fixed seed: the same moments every run of the suite
    in_write, last, torn = 0, 0, set()
    for trial in range(KILL_TRIALS):
        before = _stamp(out / "model.safetensors")
        cmd = [sys.executable, "-m", "ddpm_cli", "train", "--resume", str(out), "-q"]
        job = subprocess.Popen(cmd if trial else _train_cmd(pics, out, 1000),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            deadline = time.time() + 60
            while _stamp(out / "model.safetensors") in (None, before) and time.time() < deadline:
                time.sleep(0.02)  # until this process has saved a checkpoint of its own
            assert not torn & set(out.glob(".*.tmp"))  # it swept the last kill's torn writes
            if trial % 2:  # inside a checkpoint write: while its temporary file exists
                while not list(out.glob(".*.tmp")) and time.time() < deadline:
                    pass
                in_write += bool(list(out.glob(".*.tmp")))
            else:
                time.sleep(rng.uniform(0.0, 1.5))
        finally:  # a failed check must not leave a 1000-step run behind
            job.kill()
            job.wait()
        state = load_checkpoint(out / "train_state.safetensors")  # whole, hash verified
        model = load_checkpoint(out / "model.safetensors")
        assert model.step in (state.step, state.step - 1)  # killed between the two writes
        assert state.step > last  # went on from the last step saved, not from the start
        last, torn = state.step, set(out.glob(".*.tmp"))
    r = runner.invoke(app, ["train", "--resume", str(out), "--steps", str(last + 2), "-q"])
    assert r.exit_code == 0, r.output
    assert load_checkpoint(out / "train_state.safetensors").step == last + 2
    assert not list(out.glob(".*.tmp"))
    assert in_write >= KILL_TRIALS // 2 - 1  # most of the odd trials caught a write in progress


def test_a_run_resumed_after_a_kill_ends_with_the_uninterrupted_weights(tmp_path):
    pics = _pics(tmp_path)
    whole = subprocess.run(_train_cmd(pics, tmp_path / "whole", 12), capture_output=True,
                           text=True, timeout=120)  # fmt: skip
    assert whole.returncode == 0, whole.stderr
    job = subprocess.Popen(_train_cmd(pics, tmp_path / "cut", 12), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 60
    while time.time() < deadline:  # kill right after a checkpoint at step 3 or later
        try:
            if load_checkpoint(tmp_path / "cut" / "train_state.safetensors").step >= 3:
                break
        except Exception:
            pass
        time.sleep(0.02)
    os.kill(job.pid, signal.SIGKILL)
    job.wait()
    cut_at = load_checkpoint(tmp_path / "cut" / "train_state.safetensors").step
    assert 3 <= cut_at < 12  # really interrupted
    resumed = subprocess.run([sys.executable, "-m", "ddpm_cli", "train", "--resume",
                              str(tmp_path / "cut"), "-q"], capture_output=True, text=True,
                             timeout=120)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    a = load_checkpoint(tmp_path / "whole" / "train_state.safetensors").tensors
    b = load_checkpoint(tmp_path / "cut" / "train_state.safetensors").tensors
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith(("model.", "ema.", "optim.")))


def _stop_mid_run(tmp_path: Path, how: str) -> tuple[int, Path]:
    """Start a long run that logs every step, wait for its third step line, then close its
    terminal (SIGHUP) or the pipe its stderr goes to (`ddpm train ... 2>&1 | head`); returns
    the exit code and the run directory."""
    out = tmp_path / how
    cmd = [sys.executable, "-m", "ddpm_cli", "train", str(_pics(tmp_path / how, 4)), *TRAIN,
           "--steps", "100000", "--out", str(out)]  # fmt: skip
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _read_until(job, b"step 3")
        if how == "sighup":
            job.send_signal(signal.SIGHUP)
            job.stderr.close()  # the terminal is gone too
        else:
            job.stderr.close()  # the reader of the pipe exits; the next line written hits EPIPE
        job.stdout.read()
        return job.wait(timeout=120), out
    finally:  # a failed check must not leave a 100,000-step run behind
        job.kill()
        job.wait()


def _read_until(job: subprocess.Popen, prefix: bytes, seconds: float = 90) -> None:
    """Read the job's stderr up to a line that starts with prefix; fails (rather than waiting
    for ever) when the job ends without one, or is still silent after `seconds` (it is then
    killed, which ends the blocked read)."""
    timer = threading.Timer(seconds, job.kill)
    timer.start()
    try:
        for line in iter(job.stderr.readline, b""):
            if line.startswith(prefix):
                return
    finally:
        timer.cancel()
    code = job.wait(timeout=30)
    raise AssertionError(f"no {prefix.decode()!r} line: the job ended (exit {code}) or was "
                         f"killed after {seconds} s")  # fmt: skip


def test_a_run_stopped_before_its_first_step_leaves_nothing_behind(runner, tmp_path, monkeypatch):
    """A stop during the data loading or set-up: the directory the run made is removed (the
    next `ddpm train` would otherwise count past a run with nothing in it); in an --out that
    was there before, the user's files stay and the data cache goes."""
    from ddpm_cli.config import DiffusionConfig, TrainConfig
    from ddpm_cli.training.run import train

    pics, mine = _pics(tmp_path), tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("kept")
    config = TrainConfig(preset="tiny", image_size=8, batch_size=4, device="cpu", seed=1,
                         steps=5, sample_every=0)  # fmt: skip
    ends = []
    # runs/ made for the run goes with it; so does shared/ made for it, unless another run
    # has put something there meanwhile (here: its first event does)
    other = tmp_path / "shared" / "other"
    (tmp_path / "empty").mkdir()  # folders that were there stay, however --out reaches them
    for out in (tmp_path / "runs" / "new", mine, tmp_path / "shared" / "a",
                tmp_path / "empty" / "runs" / "b", tmp_path / "no" / ".." / "empty" / "c"):
        def on_event(kind, info, out=out):
            if out.parent.name == "shared" and not other.exists():
                other.mkdir()
            if kind == "end":
                ends.append(info)

        r = train(str(pics), config, DiffusionConfig(), out=out, should_stop=lambda: True,
                  on_event=on_event)  # fmt: skip
        assert (r.status, r.step) == ("stopped", 0)
    # (no/ itself, made by mkdir on the way to no/../empty/c, is left: it was never the run's)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "mine", "no", "pics", "shared"]
    assert sorted(p.name for p in mine.iterdir()) == [".lock", "notes.txt"]
    assert [p.name for p in (tmp_path / "shared").iterdir()] == ["other"]
    assert list((tmp_path / "empty").iterdir()) == []
    assert [(e["unsaved"], e["created"]) for e in ends] == [(True, True), (True, False),
                                                            *[(True, True)] * 3]  # fmt: skip
    asked = []  # stopped at its third look, after two steps: a run to keep
    stopped = train(str(pics), config, DiffusionConfig(), out=tmp_path / "one",
                    should_stop=lambda: asked.append(1) or len(asked) > 2)  # fmt: skip
    assert (stopped.status, stopped.step) == ("stopped", 2)
    assert load_checkpoint(tmp_path / "one" / "model.safetensors").step == 2
    from ddpm_cli.cli import stopping  # the command says so, and exits as a stop does

    monkeypatch.setattr(stopping.Stopper, "requested", lambda self: True)
    monkeypatch.setattr(stopping.Stopper, "exit_code", lambda self: 130)
    r = runner.invoke(app, ["train", str(pics), *TRAIN, "--out", str(tmp_path / "cli")])
    assert r.exit_code == 130 and r.stdout == "", r.output
    assert r.stderr.strip().splitlines()[-1] == (
        f"stopped before the first step: nothing saved, {tmp_path / 'cli'} removed"
    )
    assert not (tmp_path / "cli").exists()
    # a resume stopped before its first step leaves the run as it was: not rewritten with the
    # options it was resumed with (before, the next plain --resume took the new --time)
    def files():  # (.lock holds the pid of the last process to train there)
        return {p.name: p.read_bytes() for p in (tmp_path / "one").iterdir()
                if p.is_file() and p.name != RunLock.NAME}  # fmt: skip

    before = files()
    r = runner.invoke(app, ["train", "--resume", str(tmp_path / "one"), "--time", "10m"])
    assert r.exit_code == 130 and r.stderr.strip().splitlines()[-1] == (
        f"stopped before the first step: {tmp_path / 'one'} is as it was, at step 2"), r.output
    assert files() == before


def test_a_stop_asked_during_the_last_step_still_exits_as_a_stop(runner, tmp_path, monkeypatch):
    """The run finishes (its last step was under way) and says so, but exits 130, so that
    `ddpm train ... && ddpm sample ...` stops at the Ctrl-C."""
    from ddpm_cli.cli import stopping

    pics = _pics(tmp_path)
    monkeypatch.setattr(stopping.Stopper, "exit_code", lambda self: 130)
    looks = []  # the loop looks before each of its 3 steps; the signal comes after the third
    monkeypatch.setattr(stopping.Stopper, "requested",
                        lambda self: looks.append(1) or len(looks) > 3)  # fmt: skip
    monkeypatch.setattr(stopping.Stopper, "signalled", lambda self: len(looks) >= 3)
    r = runner.invoke(app, ["train", str(pics), *TRAIN, "--steps", "3", "--out",
                            str(tmp_path / "run")])  # fmt: skip
    assert r.exit_code == 130, r.output
    assert r.stderr.strip().splitlines()[-1] == f"finished at step 3: {tmp_path / 'run'}"
    assert load_checkpoint(tmp_path / "run" / "model.safetensors").step == 3


def _wait_for_torch(pid: int, seconds: float = 60) -> None:
    """Until the process has mapped torch's library (where /proc shows it; elsewhere 0.2 s):
    a signal sent earlier could land in the interpreter's own start-up."""
    maps = Path(f"/proc/{pid}/maps")
    if not maps.exists():
        time.sleep(0.2)
        return
    deadline = time.time() + seconds
    while "libtorch" not in maps.read_text(errors="replace") and time.time() < deadline:
        time.sleep(0.01)


def test_ctrl_c_while_the_command_loads_is_quiet_exit_130(tmp_path):
    """Importing torch takes seconds: a Ctrl-C then ended with a traceback from inside an
    import (and the signal's status); now as a Ctrl-C later does, with nothing left behind."""
    cmd = [ddpm_executable(), "train", str(_pics(tmp_path)), *TRAIN, "--steps", "2", "--out",
           str(tmp_path / "run")]  # the installed script: its entry point is the one that counts
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_torch(job.pid)  # then inside `import torch`, a second or more on any machine
        job.send_signal(signal.SIGINT)
        out, err = job.communicate(timeout=120)
    finally:
        job.kill()
        job.wait()
    assert (job.returncode, out, err) == (130, "", "")  # not even a pre-flight table: early
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(sys.platform == "win32", reason="SIGHUP")
def test_nohup_keeps_training_through_a_hang_up(tmp_path):
    """`nohup ddpm train` ignores SIGHUP on purpose: the run must not stop on it."""
    pics, out = _pics(tmp_path), tmp_path / "run"
    cmd = [sys.executable, "-m", "ddpm_cli", "train", str(pics), *TRAIN, "--steps", "12",
           "--out", str(out)]  # fmt: skip
    ignore = lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN)  # noqa: E731 (what nohup does)
    job = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           preexec_fn=ignore)  # fmt: skip
    try:
        _read_until(job, b"step 3")
        job.send_signal(signal.SIGHUP)
        job.stderr.read()
        assert job.wait(timeout=120) == 0
    finally:
        job.kill()
        job.wait()
    assert load_checkpoint(out / "train_state.safetensors").step == 12


@pytest.mark.skipif(sys.platform == "win32", reason="SIGHUP and pipes")
@pytest.mark.parametrize("how, code", [("sighup", 129), ("closed_stderr", 141)])
def test_a_closed_terminal_or_stderr_pipe_saves_a_checkpoint_and_resumes(
    runner, tmp_path, how, code
):
    (tmp_path / how).mkdir()
    exit_code, out = _stop_mid_run(tmp_path, how)
    assert exit_code == code
    state = load_checkpoint(out / "train_state.safetensors")
    assert state.step >= 3  # saved at the step it reached, not lost
    assert load_checkpoint(out / "model.safetensors").step == state.step
    r = runner.invoke(app, ["train", "--resume", str(out), "--steps", str(state.step + 2), "-q"])
    assert r.exit_code == 0, r.output
    assert load_checkpoint(out / "train_state.safetensors").step == state.step + 2


def _fail_after(monkeypatch, module, name: str, calls: int, error) -> None:
    """Make module.name raise error() on every call after the first `calls`."""
    real, seen = getattr(module, name), {"n": 0}

    def failing(*args, **kwargs):
        seen["n"] += 1
        if seen["n"] > calls:
            raise error()
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, failing)


@pytest.mark.parametrize("error, words", [
    (lambda: RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate "
                          "8589934592 bytes"), "out of memory"),
    (lambda: torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
     "out of memory"),
    (lambda: OSError(errno.ENOSPC, "No space left on device"), "out of disk space"),
])  # fmt: skip
def test_running_out_of_memory_or_disk_mid_run_says_what_was_saved(
    runner, tmp_path, monkeypatch, error, words
):
    """The machine running out is the user's situation, not a bug: one line saying what ran
    out, which checkpoint is intact and what to try; exit 1; the run resumes (issue 27)."""
    from ddpm_cli.training import loop as loop_mod
    from ddpm_cli.training import train as train_mod

    pics, out = _pics(tmp_path), tmp_path / "run"
    if isinstance(error(), OSError):  # the metrics log, written outside the atomic writes
        _fail_after(monkeypatch, loop_mod, "append_line", 4, error)
    else:  # the training step's forward pass
        _fail_after(monkeypatch, train_mod, "training_losses", 4, error)
    r = runner.invoke(app, ["train", str(pics), *TRAIN, "--steps", "20", "--checkpoint-every",
                            "2", "--out", str(out)])  # fmt: skip
    assert r.exit_code == 1, r.output
    (line,) = r.stderr.strip().splitlines()[-1:]
    step = load_checkpoint(out / "train_state.safetensors").step
    assert line.startswith(f"error: {words}: the checkpoint of step {step} in {out} is intact")
    assert "--grad-accum 2" in line if "memory" in words else "free some space" in line
    assert "internal error" not in r.output and "Traceback" not in r.output
    monkeypatch.undo()
    r = runner.invoke(app, ["train", "--resume", str(out), "--steps", str(step + 2), "-q"])
    assert r.exit_code == 0, r.output


def test_out_of_memory_outside_training_is_one_line_too(runner, tmp_path, monkeypatch):
    from conftest import train_tiny
    from ddpm_cli.generation import job as job_mod

    run = train_tiny(tmp_path, 4)

    def no_memory(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(job_mod, "generate", no_memory)
    r = runner.invoke(app, ["sample", str(run), "-n", "2", "-o", str(tmp_path / "o")])
    assert r.exit_code == 1, r.output
    assert r.stderr.strip().splitlines()[-1] == (
        "error: out of memory: try a smaller --batch-size, or close other programs"
    )


def test_a_resume_takes_the_run_lock_before_it_reads_the_state(runner, tmp_path, monkeypatch):
    """Two --resumes of one run must not both read its state and then race for the lock."""
    from ddpm_cli.errors import UsageError
    from ddpm_cli.training import run as run_mod

    pics, out = _pics(tmp_path), tmp_path / "run"
    r = runner.invoke(app, ["train", str(pics), *TRAIN, "--steps", "2", "--out", str(out), "-q"])
    assert r.exit_code == 0, r.output
    real, seen = run_mod.open_resume, []

    def reading(*a, **k):  # while the state is read, a second trainer finds the run locked
        with pytest.raises(UsageError, match="another ddpm train"):
            RunLock(out).acquire()
        seen.append(True)
        return real(*a, **k)

    monkeypatch.setattr(run_mod, "open_resume", reading)
    r = runner.invoke(app, ["train", "--resume", str(out), "--steps", "3", "-q"])
    assert r.exit_code == 0 and seen, r.output


def test_a_run_directory_it_cannot_write_in_is_one_line_and_left_as_it_was(runner, tmp_path,
                                                                            monkeypatch):
    """A resume in a read-only copy of a run (another user's, a mounted archive) says so, as a
    new run's --out does: no internal error from the lock file (tests run as root, where
    permissions do not bite: the lock's open is refused instead)."""
    from ddpm_cli.store import files

    pics, out = _pics(tmp_path), tmp_path / "run"
    r = runner.invoke(app, ["train", str(pics), *TRAIN, "--steps", "2", "--out", str(out), "-q"])
    assert r.exit_code == 0, r.output
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    real = os.open

    def read_only(path, flags, *a, **k):
        if str(path).endswith(RunLock.NAME):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, flags, *a, **k)

    monkeypatch.setattr(files.os, "open", read_only)
    r = runner.invoke(app, ["train", "--resume", str(out), "--steps", "3"])
    assert r.exit_code == 1 and r.stderr.strip().splitlines()[-1] == (
        f"error: {out}: cannot write in this run directory (Permission denied); copy it "
        "somewhere writable and resume the copy"), r.output
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_links_planted_in_a_run_directory_are_never_followed(runner, tmp_path):
    """A run's bookkeeping files are replaced, never written through a symlink: the file a
    link points to is left as it was (before, a `.lock` link truncated its target)."""
    pics, out = _pics(tmp_path), tmp_path / "run"
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out.mkdir()
    (out / ".lock").symlink_to(victim)
    args = ["train", str(pics), *TRAIN, "--steps", "2", "--out", str(out), "-q"]
    r = runner.invoke(app, args)
    assert r.exit_code == 2 and "symbolic link" in r.stderr, r.output
    assert victim.read_text() == "precious"

    (out / ".lock").unlink()
    assert runner.invoke(app, args).exit_code == 0
    for name in ("metrics.jsonl", "model.safetensors", "train_state.safetensors"):
        target = tmp_path / f"victim-{name}"
        target.write_bytes((out / name).read_bytes())  # the link reads the same as the file
        (out / name).unlink()
        (out / name).symlink_to(target)
    before = {p.name: p.read_bytes() for p in tmp_path.glob("victim-*")}
    r = runner.invoke(app, ["train", "--resume", str(out), "--steps", "4", "-q"])
    assert r.exit_code == 0, r.output
    assert {p.name: p.read_bytes() for p in tmp_path.glob("victim-*")} == before
    for name in ("metrics.jsonl", "model.safetensors", "train_state.safetensors"):
        assert not (out / name).is_symlink()
    assert load_checkpoint(out / "train_state.safetensors").step == 4


def test_an_atomic_write_syncs_the_directory_after_the_rename(tmp_path, monkeypatch):
    """A rename is only durable once its directory is synced: a power cut must not bring back
    the old checkpoint, or none."""
    import stat

    from ddpm_cli.store.files import write_atomic

    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        events.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    def replace(*a, **k):
        events.append("rename")
        real_replace(*a, **k)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    write_atomic(tmp_path / "x.bin", b"data")
    assert events == ["file", "rename", "dir"]
    assert (tmp_path / "x.bin").read_bytes() == b"data"


def test_non_finite_weights_never_replace_a_good_checkpoint(runner, tmp_path, monkeypatch):
    """An update can break the weights after its own loss was finite: the checkpoint that
    follows must not save them (before, only the loss and gradient norm were checked)."""
    from ddpm_cli.training import loop as loop_mod

    real, calls = loop_mod.train_step, {"n": 0}

    def breaking(state, *a, **k):
        out = real(state, *a, **k)
        calls["n"] += 1
        if calls["n"] == 4:  # the update of step 4 leaves a NaN behind, its loss was finite
            with torch.no_grad():
                next(state.model.parameters()).view(-1)[0] = float("nan")
        return out

    monkeypatch.setattr(loop_mod, "train_step", breaking)
    pics, out = _pics(tmp_path), tmp_path / "run"
    r = runner.invoke(app, ["train", str(pics), *TRAIN, "--steps", "8", "--checkpoint-every",
                            "2", "--out", str(out)])  # fmt: skip
    assert r.exit_code == 1, r.output
    assert "weights became non-finite" in r.stderr.strip().splitlines()[-1]
    for name in ("train_state.safetensors", "model.safetensors"):
        ckpt = load_checkpoint(out / name)
        assert ckpt.step == 2  # the last good one, kept
        assert all(torch.isfinite(t).all() for t in ckpt.tensors.values() if t.is_floating_point())


def _edit_state(path: Path, drop: tuple[str, ...] = (), **meta) -> None:
    """Rewrite a train state without some tensors or with some metadata changed, its content
    hash recomputed (a state written by another version, or edited by hand)."""
    from safetensors.torch import load_file, save_file

    from ddpm_cli.store.checkpoint import content_hash, read_header

    header = read_header(path)["__metadata__"]
    tensors = {k: v for k, v in load_file(path).items() if k not in drop}
    header.update({"content_hash": content_hash(tensors), **meta})
    save_file(tensors, path, metadata=header)


def test_resume_from_another_working_directory_finds_a_relative_data_folder(
    runner, tmp_path, monkeypatch
):
    _pics(tmp_path)
    monkeypatch.chdir(tmp_path)
    args = ["train", "pics", *TRAIN, "--steps", "2", "--no-data-cache", "--out", "run", "-q"]
    assert runner.invoke(app, args).exit_code == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # "pics" does not exist here
    r = runner.invoke(app, ["train", "--resume", str(tmp_path / "run"), "--steps", "3", "-q"])
    assert r.exit_code == 0, r.output
    assert load_checkpoint(tmp_path / "run" / "train_state.safetensors").step == 3
    # the absolute path is in the train state (for resume), not in the model file people share
    run = tmp_path / "run"
    assert "source_path" in load_checkpoint(run / "train_state.safetensors").config["data"]
    assert "source_path" not in load_checkpoint(run / "model.safetensors").config["data"]


def test_a_missing_random_state_is_a_stated_fallback(runner, tmp_path):
    pics, out = _pics(tmp_path), tmp_path / "run"
    assert runner.invoke(app, ["train", str(pics), *TRAIN, "--steps", "2", "--out", str(out),
                               "-q"]).exit_code == 0  # fmt: skip
    _edit_state(out / "train_state.safetensors", drop=("rng.torch", "rng.noise"))
    r = runner.invoke(app, ["train", "--resume", str(out), "--steps", "3"])
    assert r.exit_code == 0, r.output
    assert "random state" in r.stderr and "bit for bit" in r.stderr, r.stderr
    assert load_checkpoint(out / "train_state.safetensors").step == 3


@pytest.mark.parametrize("key, value", [("epoch", '"x"'), ("batch_in_epoch", "-1"),
                                        ("elapsed", "NaN"), ("world_size", "1.5")])  # fmt: skip
def test_bad_train_state_fields_are_one_clear_error(runner, tmp_path, key, value):
    pics, out = _pics(tmp_path), tmp_path / "run"
    assert runner.invoke(app, ["train", str(pics), *TRAIN, "--steps", "2", "--out", str(out),
                               "-q"]).exit_code == 0  # fmt: skip
    _edit_state(out / "train_state.safetensors", **{key: value})
    r = runner.invoke(app, ["train", "--resume", str(out), "--steps", "3"])
    assert r.exit_code == 2, r.output
    assert f"metadata '{key}' is not" in r.stderr.strip().splitlines()[-1], r.stderr


def test_remove_made_takes_only_the_empty_folders_it_made(tmp_path):
    """From the innermost up to the one new_folder said was made; a folder with something in
    it stops it, and a `created` that is not above the folder removes nothing."""
    from ddpm_cli.store.files import new_folder, remove_made

    deep = tmp_path / "a" / "b" / "c"
    created = new_folder(deep)
    deep.mkdir(parents=True)
    remove_made(deep, created)
    assert created == tmp_path / "a" and not created.exists() and tmp_path.is_dir()
    deep.mkdir(parents=True)
    (tmp_path / "a" / "kept.txt").write_text("another process's")
    remove_made(deep, tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["kept.txt"]
    (tmp_path / "empty").mkdir()
    remove_made(tmp_path / "empty", tmp_path / "elsewhere")
    assert (tmp_path / "empty").is_dir()
