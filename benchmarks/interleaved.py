"""ddpm against diffusers in one process, step for step: a steadier ratio on a noisy machine.

    python benchmarks/interleaved.py --preset cifar10 --batch-size 16 --rounds 7
    python benchmarks/interleaved.py --precision bf16 --workload forward

bench.py runs each implementation in its own process, one after the other, so a machine whose
speed drifts over minutes (a shared CPU) moves the ratio between runs. Here both networks, at
the identical configuration (benchmarks/peers.py), take turns within each round: a training
step (ddpm: train.train_step; diffusers: its example's step) or a forward pass of the same
batch (in bf16, ddpm runs bf16 weights as `ddpm sample` does, and diffusers autocast unless
--peer-bf16-weights; ddpm keeps its Winograd filters over the rounds, as a sampling batch does
over its steps). Each prints one JSON line per workload with the median seconds per call
of each, the ratio of the medians, and the ratio's range over the rounds. Both share this
process's memory allocator: --tune-malloc applies ddpm's setting (host.tune_allocator) to
both.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch
from workload import workload  # benchmarks/workload.py

from ddpm_cli.config import Precision
from ddpm_cli.device import resolve_device
from ddpm_cli.host import tune_allocator
from ddpm_cli.model.forward import network
from ddpm_cli.model.kernels import winograd
from ddpm_cli.training.train import to_host, train_step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="cifar10")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--workload", choices=["train", "forward", "both"], default="both")
    p.add_argument("--tune-malloc", action="store_true")
    p.add_argument("--peer-bf16-weights", action="store_true",
                   help="bf16 forward: diffusers on bf16 weights too (else autocast)")  # fmt: skip
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    from peers import PeerTrainer, copy_model

    tuned = tune_allocator() if args.tune_malloc else False
    device = resolve_device(args.device)
    n = args.batch_size
    work = workload(args.preset, n, args.precision, device)
    model_config, config, tables, state = work.model_config, work.config, work.tables, work.state
    peer = PeerTrainer("diffusers", model_config, device, args.precision)
    g = torch.Generator().manual_seed(0)
    batch = (torch.rand(n, 3, 32, 32, generator=g) * 255).to(torch.uint8)

    def ours_train():
        to_host([train_step(state, [batch], tables, config, device, state.model)])

    def theirs_train():
        peer.step(batch)

    ours_net = network(state.ema, device, Precision(args.precision), compile=False)
    theirs_net = copy_model(peer.model)
    pure = args.peer_bf16_weights and args.precision == "bf16"
    theirs_net = theirs_net.to(torch.bfloat16) if pure else theirs_net
    x = torch.randn(n, 3, 32, 32, generator=g).to(device)
    t = torch.randint(0, 1000, (n,), generator=g).to(device)

    def ours_forward():
        with torch.no_grad():
            ours_net(x, t)

    def theirs_forward():
        if pure:
            with torch.no_grad():
                return theirs_net(x.to(torch.bfloat16), t).sample.float()
        with torch.no_grad(), torch.autocast(device.type, torch.bfloat16,
                                             enabled=args.precision == "bf16"):  # fmt: skip
            theirs_net(x, t)

    workloads = {"train": (ours_train, theirs_train), "forward": (ours_forward, theirs_forward)}
    chosen = list(workloads) if args.workload == "both" else [args.workload]
    for name in chosen:
        ours, theirs = workloads[name]
        # a sampling batch transforms its Winograd filters once and keeps them for its steps
        kept = winograd.keep_filters() if name == "forward" else contextlib.nullcontext()
        with kept:
            ours(), theirs()  # warm-up
            times: dict[str, list[float]] = {"ddpm": [], "diffusers": []}
            for _ in range(args.rounds):
                for impl, fn in (("ddpm", ours), ("diffusers", theirs)):
                    start = time.perf_counter()
                    fn()
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    times[impl].append(time.perf_counter() - start)
        ratios = [d / o for o, d in zip(times["ddpm"], times["diffusers"], strict=True)]
        med = {k: statistics.median(v) for k, v in times.items()}
        print(json.dumps({
            "workload": name, "preset": args.preset, "precision": args.precision, "batch": n,
            "device": str(device), "malloc_tuned": tuned, "rounds": args.rounds,
            "peer_bf16_weights": pure,
            "ddpm_s": med["ddpm"], "diffusers_s": med["diffusers"],
            "ddpm_img_per_s": n / med["ddpm"], "diffusers_img_per_s": n / med["diffusers"],
            "ddpm_is": med["diffusers"] / med["ddpm"],
            "round_ratio_min": min(ratios), "round_ratio_max": max(ratios),
        }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
