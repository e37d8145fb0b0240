"""Running as one process of a torchrun job: PyTorch's own distributed engine, nothing of ours.

torchrun (or SLURM/Kubernetes launchers through it) starts one process per GPU and sets RANK,
WORLD_SIZE, LOCAL_RANK and the rendezvous variables. `init()` joins the process group (NCCL on
CUDA, gloo on the CPU) with a timeout, so a collective that waits for a dead process fails
instead of hanging; torchrun itself stops the other processes when one exits with an error.
Without WORLD_SIZE > 1 everything here is a no-op for a single process.
"""

from __future__ import annotations

import atexit
import datetime
import hashlib
import json
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ddpm_cli import runtime
from ddpm_cli.errors import DdpmError


class DistributedError(DdpmError):
    """Another process of the job failed, or the group could not be formed."""


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


SINGLE = Dist()
_joined = False  # set once this process has joined a process group


def launched() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def local_processes() -> int:
    """The processes of this job on this machine (torchrun's LOCAL_WORLD_SIZE); 1 without."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def env_main() -> bool:
    """True unless this is a torchrun process other than rank 0 (known before init)."""
    return runtime.torchrun_rank() == 0


def init(device: torch.device) -> tuple[Dist, torch.device]:
    """Join the torchrun job this process belongs to (if any) and pick its device: on CUDA,
    the GPU numbered LOCAL_RANK. Returns (SINGLE, device) when not launched by torchrun."""
    if not launched():
        return SINGLE, device
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise DistributedError(
                f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPUs: start at most "
                "as many processes per node as there are GPUs (--nproc-per-node)"
            )
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    elif device.type == "mps":
        raise DistributedError("torchrun on MPS is not supported by PyTorch; use one process")
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=runtime.current().dist_timeout_s)
        try:
            dist.init_process_group(
                backend="nccl" if device.type == "cuda" else "gloo", timeout=timeout
            )
        except (RuntimeError, ValueError) as e:
            raise DistributedError(f"cannot join the torchrun job: {e}") from None
    global _joined
    _joined = True
    return Dist(rank, world, local), device


def leave_together(d: Dist) -> None:
    """Wait for every rank at the end of a job that went well, so that no process tears down
    its connections while another still finishes (rank 0 writes the last checkpoint). A rank
    that left early this way was seen to abort in gloo's teardown (exit -6), failing the job.
    Not called on errors: the others may never arrive."""
    if d.active:
        with collective("finishing the job"):
            dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def joined() -> bool:
    """True once this process has been part of a torchrun job."""
    return _joined


def exit_process(code: int) -> None:
    """End a process that was part of a torchrun job, skipping the interpreter's teardown.

    gloo's worker threads drop a finished collective (and the tensors it holds) a moment after
    the caller has seen it complete; a thread that needs the GIL for that once the interpreter
    has begun to finalize is made to exit, which aborts the whole process (exit -6, "terminate
    called without an active exception") after a job that went well: seen about once in 40
    CPU jobs on a loaded machine, on rank 0 as on rank 1. So the exit handlers run while the
    interpreter is whole (loggers, W&B), the streams are flushed, and the process ends here.
    Every file of ours is already closed, and written atomically."""
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing left to deliver
            pass
    os._exit(code)


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """A seed for one process's own randomness (dropout) from the run seed, its rank and the
    step it starts at: different on every rank, the same on every rerun."""
    digest = hashlib.sha256(f"ddpm-rank:{seed}:{rank}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def collective(what: str):
    """A context that turns a failed collective (a process died, a timeout) into one line."""
    return _Collective(what)


class _Collective:
    def __init__(self, what: str):
        self.what = what

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        if error is not None and dist.is_initialized() and _is_collective_failure(error):
            raise DistributedError(
                f"{self.what} failed: another process of the torchrun job stopped or timed out "
                f"({str(error).strip().splitlines()[0][:200]})"
            ) from None
        return False


FAILURE_WORDS = ("gloo", "nccl", "connection", "timed out", "timeout", "peer", "broken pipe")


def _is_collective_failure(error: BaseException) -> bool:
    """A distributed error, or a RuntimeError from a backend about a lost peer or a timeout
    (not, say, an out-of-memory error raised inside the same step)."""
    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(w in text for w in FAILURE_WORDS)


def _wire_device() -> torch.device:
    """Where the bytes travel: NCCL moves CUDA tensors only, gloo CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _encode(value, device: torch.device) -> torch.Tensor:
    data = bytearray(json.dumps(value).encode())
    return torch.frombuffer(data, dtype=torch.uint8).to(device)


def _decode(t: torch.Tensor):
    return json.loads(t.cpu().numpy().tobytes())


def broadcast(d: Dist, value):
    """Rank 0's `value` on every rank. Values travel as JSON (numbers, strings, lists, dicts),
    in uint8 tensors: nothing one process receives from another is ever unpickled, unlike
    torch's *_object collectives."""
    if not d.active:
        return value
    device = _wire_device()
    data = _encode(value, device) if d.main else None
    with collective("sharing the run's settings"):
        n = torch.tensor([0 if data is None else len(data)], dtype=torch.int64, device=device)
        dist.broadcast(n, src=0)
        if data is None:
            data = torch.empty(int(n.item()), dtype=torch.uint8, device=device)
        dist.broadcast(data, src=0)
    return _decode(data)


def any_rank(d: Dist, flag: bool, device: torch.device) -> bool:
    """True on every rank if `flag` is True on any."""
    return bool(most(d, 1.0 if flag else 0.0, device))


def most(d: Dist, value: float, device: torch.device) -> float:
    """The largest of the ranks' `value`s, on every rank (ranks' clocks differ: this is how they
    agree on how much of a --time limit is spent)."""
    if not d.active:
        return value
    t = torch.tensor([float(value)], device=device, dtype=torch.float64)
    with collective("agreeing on a stop"):
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def gather(d: Dist, value) -> list:
    """Every rank's `value` (JSON, as in broadcast), in rank order, on every rank."""
    if not d.active:
        return [value]
    device = _wire_device()
    data = _encode(value, device)
    with collective("gathering results"):
        n = torch.tensor([len(data)], dtype=torch.int64, device=device)
        sizes = [torch.zeros_like(n) for _ in range(d.world)]
        dist.all_gather(sizes, n)
        longest = int(max(s.item() for s in sizes))
        padded = torch.zeros(longest, dtype=torch.uint8, device=device)
        padded[: len(data)] = data
        parts = [torch.empty_like(padded) for _ in range(d.world)]
        dist.all_gather(parts, padded)
    return [_decode(p[: int(s.item())]) for p, s in zip(parts, sizes, strict=True)]
