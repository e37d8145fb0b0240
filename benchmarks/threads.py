"""CPU thread settings against torch's defaults: the measurements behind ddpm leaving them alone.

    python benchmarks/threads.py
    python benchmarks/threads.py --preset cifar10 --precision bf16 --rounds 2

Each setting (intra-op threads, OMP_WAIT_POLICY) runs in its own process, since OpenMP reads its
environment once; the settings take turns round after round, so a machine whose speed drifts
moves them alike. A process times a training step (train.train_step) and a forward pass without
gradients at the batch size for --seconds each. One JSON line per setting: the median img/s over
the rounds, and each as a ratio to torch's default setting ("default": as many threads as torch
picks, usually the physical cores, and OpenMP's own wait policy). Where the machine has more
logical CPUs than that (SMT), one thread per logical CPU is tried too.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SETTINGS = {  # name: (threads, OMP_WAIT_POLICY); threads 0 keeps torch's choice
    "default": (0, None),
    "1 thread": (1, None),
    "OMP_WAIT_POLICY=PASSIVE": (0, "PASSIVE"),
    "OMP_WAIT_POLICY=ACTIVE": (0, "ACTIVE"),
}


def measure(args: argparse.Namespace, threads: int) -> dict:
    """img/s of a training step and of a forward pass in this process."""
    import torch
    from workload import workload  # benchmarks/workload.py

    from ddpm_cli.config import Precision
    from ddpm_cli.device import resolve_device
    from ddpm_cli.host import tune_allocator
    from ddpm_cli.model.forward import network
    from ddpm_cli.model.kernels.winograd import keep_filters
    from ddpm_cli.training.train import to_host, train_step

    if threads:
        torch.set_num_threads(threads)
    tune_allocator()  # as the ddpm command does
    device, n = resolve_device("cpu"), args.batch_size
    work = workload(args.preset, n, args.precision, device)
    config, tables, state = work.config, work.tables, work.state
    batch = (torch.rand(n, 3, 32, 32) * 255).to(torch.uint8)
    net = network(state.ema, device, Precision(args.precision), False)
    x, t = torch.randn(n, 3, 32, 32), torch.randint(0, 1000, (n,))

    def train() -> None:
        to_host([train_step(state, [batch], tables, config, device, state.model)])

    def forward() -> None:
        with torch.no_grad(), keep_filters():
            net(x, t)

    row = {"threads": torch.get_num_threads()}
    for name, fn in (("train", train), ("forward", forward)):
        for _ in range(2):
            fn()
        times, end = [], time.perf_counter() + args.seconds
        while time.perf_counter() < end:
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        row[f"{name}_img_per_s"] = n / statistics.median(times)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=10.0, help="timed per workload per process")
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)  # threads
    args = p.parse_args()
    if args.worker is not None:
        print(json.dumps(measure(args, args.worker)))
        return
    import torch

    settings = dict(SETTINGS)
    logical = os.cpu_count() or 1
    if logical != torch.get_num_threads():  # SMT: one thread per logical CPU too
        settings[f"{logical} threads"] = (logical, None)
    runs: dict[str, list[dict]] = {name: [] for name in settings}
    for _ in range(args.rounds):
        for name, (threads, policy) in settings.items():
            env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
            if policy:
                env["OMP_WAIT_POLICY"] = policy
            argv = [sys.argv[0], "--preset", args.preset, "--precision", args.precision,
                    "--batch-size", str(args.batch_size), "--seconds", str(args.seconds),
                    "--worker", str(threads)]  # fmt: skip
            done = subprocess.run([sys.executable, *argv], env=env, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"the {name!r} process failed:\n{done.stderr}")
            runs[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
    base = {}
    for name, rows in runs.items():
        row = {"setting": name, "threads": rows[0]["threads"], "preset": args.preset,
               "precision": args.precision, "batch": args.batch_size,
               "rounds": args.rounds}  # fmt: skip
        for work in ("train", "forward"):
            median = statistics.median(r[f"{work}_img_per_s"] for r in rows)
            base.setdefault(work, median)  # the first setting is torch's default
            row[f"{work}_img_per_s"] = round(median, 2)
            row[f"{work}_vs_default"] = round(median / base[work], 3)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
