"""What --grad-checkpoint costs and saves on whole training steps: seconds per step with and
without it, interleaved in rounds, and the bytes autograd keeps for the backward pass
(counted by its saved-tensor hooks); on CUDA also the allocator's peak.

    python benchmarks/grad_checkpoint.py --preset small --size 32 --batch 32 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from ddpm_cli.config import DiffusionConfig, TrainConfig  # noqa: E402
from ddpm_cli.device import resolve_device  # noqa: E402
from ddpm_cli.diffusion.schedules import DiffusionTables  # noqa: E402
from ddpm_cli.model.presets import build_model_config  # noqa: E402
from ddpm_cli.training.train import new_state, train_step  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per round")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    device = resolve_device(args.device)
    model_config = build_model_config(args.preset, (args.size, args.size), 3)
    tables = DiffusionTables.from_config(DiffusionConfig()).to(device, torch.float32)
    batch = [torch.randint(0, 256, (args.batch, 3, args.size, args.size), dtype=torch.uint8)]
    states, seconds, saved, peak = {}, {False: [], True: []}, {}, {}
    for on in (False, True):
        config = TrainConfig(preset=args.preset, batch_size=args.batch, seed=0, lr=1e-4,
                             warmup_steps=1, precision="fp32", grad_checkpoint=on)  # fmt: skip
        states[on] = (new_state(model_config, config, device), config)
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(
            lambda t, sizes=sizes: sizes.append(t.numel() * t.element_size()) or t, lambda t: t
        ):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            state, config = states[on]
            train_step(state, batch, tables, config, device, state.model)  # warm-up
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                peak[on] = torch.cuda.max_memory_allocated(device)
        saved[on] = sum(sizes)
    for _ in range(args.rounds):
        for on in (False, True):
            state, config = states[on]
            t0 = time.perf_counter()
            for _ in range(args.steps):
                result = train_step(state, batch, tables, config, device, state.model)
            float(result.losses.sum())  # wait for the device
            seconds[on].append((time.perf_counter() - t0) / args.steps)
    off, on = statistics.median(seconds[False]), statistics.median(seconds[True])
    print(f"{args.preset} {args.size}px batch {args.batch} on {device}, {args.rounds} rounds")
    print(f"seconds per step: {off:.3f} without, {on:.3f} with --grad-checkpoint ({on / off:.2f}x)")
    print(f"saved for backward: {saved[False] / 2**20:.0f} MiB without, "
          f"{saved[True] / 2**20:.0f} MiB with ({saved[True] / saved[False]:.2f}x)")  # fmt: skip
    if peak:
        print(
            f"CUDA peak: {peak[False] / 2**20:.0f} MiB without, {peak[True] / 2**20:.0f} MiB with"
        )


if __name__ == "__main__":
    main()
