"""Whether each CPU fast path (model/kernels/policy.py) still earns its place: a whole training
step and a whole sampling forward pass with every path on, and with each one off, taking turns
within each round in one process (docs/benchmarks.md).

    python benchmarks/kernels.py --presets small,medium,cifar10 --precisions fp32,bf16

Each (preset, precision, workload) prints one JSON line: the median seconds per call with
every path on ("all"), and for each path the ratio of the median time without it to the
median with everything (above 1: the path saves time; the issue's bar is 1.05), with its
range over the rounds. Training is train.train_step at --batch-size on 32x32 RGB; sampling
is the EMA network as `ddpm sample` runs it (bf16 weights for bf16, as forward.network does;
the filters kept over the rounds as a batch keeps them over its steps) at --sample-batch.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import time

import torch
from workload import workload  # benchmarks/workload.py

from ddpm_cli.device import resolve_device
from ddpm_cli.host import tune_allocator
from ddpm_cli.model.kernels import winograd
from ddpm_cli.model.kernels.policy import FAST, install
from ddpm_cli.training.train import to_host, train_step

PATHS = [f.name for f in dataclasses.fields(FAST)]


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(preset: str, precision: str, args, device) -> list[dict]:
    work = workload(preset, args.batch_size, precision, device)
    state, config, tables = work.state, work.config, work.tables
    g = torch.Generator().manual_seed(0)
    batch = (torch.rand(args.batch_size, 3, 32, 32, generator=g) * 255).to(torch.uint8)
    policies = {"all": FAST} | {p: dataclasses.replace(FAST, **{p: False}) for p in PATHS}
    x = torch.randn(args.sample_batch, 3, 32, 32, generator=g)
    t = torch.randint(0, 1000, (args.sample_batch,), generator=g)
    # the network as forward.network runs it for sampling: bf16 weights on bf16 inputs
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    sampler_net = copy.deepcopy(state.ema).eval().to(dtype)

    def train():
        to_host([train_step(state, [batch], tables, config, device, state.model)])

    def sample():
        with torch.no_grad():
            sampler_net(x.to(dtype), t).float()

    lines = []
    for name, fn in (("train", train), ("sample", sample)):
        if name not in args.workloads:
            continue
        times: dict[str, list[float]] = {k: [] for k in policies}
        with winograd.keep_filters():
            for r in range(args.rounds + 1):  # round 0 warms up every variant
                for key, policy in policies.items():
                    install(state.model, policy), install(sampler_net, policy)
                    seconds = timed(fn)
                    if r:
                        times[key].append(seconds)
        install(state.model, FAST), install(sampler_net, FAST)
        base = statistics.median(times["all"])
        line = {"preset": preset, "precision": precision, "workload": name,
                "batch": args.batch_size if name == "train" else args.sample_batch,
                "all_s": round(base, 4)}  # fmt: skip
        for p in PATHS:
            ratios = [a / b for a, b in zip(times[p], times["all"], strict=True)]
            line[f"without_{p}"] = round(statistics.median(times[p]) / base, 3)
            line[f"without_{p}_range"] = [round(min(ratios), 3), round(max(ratios), 3)]
        print(json.dumps(line), flush=True)
        lines.append(line)
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--presets", default="small,medium,cifar10")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--workloads", default="train,sample")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--sample-batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    tune_allocator()
    device = resolve_device(args.device)
    torch.manual_seed(0)
    for preset in args.presets.split(","):
        for precision in args.precisions.split(","):
            measure(preset, precision, args, device)


if __name__ == "__main__":
    main()
