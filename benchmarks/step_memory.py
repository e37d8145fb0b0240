"""How well the pre-flight memory figure (training/memory.py) predicts what a training step takes.

For each case, in a fresh process: build the run's state, measure the step's memory with the
probe pass, then run real training steps at the full batch and take their peak (the CUDA
allocator's, or on the CPU the peak resident memory, VmHWM), both above what the process held
before the probes. Prints predicted and actual MiB and their ratio.

    python benchmarks/step_memory.py                       # the CPU cases below
    python benchmarks/step_memory.py --device cuda --cases cifar10:32:128,celebahq256:256:16
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
CPU_CASES = ",".join(f"{case}{flag}" for flag in ("", ":ckpt") for case in (
    "small:32:32", "small:32:128", "medium:64:8", "medium:64:32", "cifar10:32:16", "cifar10:32:32",
) if not (flag and case.startswith("cifar10")))  # fmt: skip


def one(preset: str, size: int, batch: int, device_name: str, ckpt: bool) -> dict:
    sys.path.insert(0, str(SRC))
    import torch

    from ddpm_cli.config import DiffusionConfig, TrainConfig
    from ddpm_cli.device import resolve_device
    from ddpm_cli.diffusion.schedules import DiffusionTables
    from ddpm_cli.model.presets import build_model_config
    from ddpm_cli.training import memory
    from ddpm_cli.training.train import new_state, train_step

    device = resolve_device(device_name)
    model_config = build_model_config(preset, (size, size), 3)
    config = TrainConfig(preset=preset, batch_size=batch, seed=0, lr=1e-4, warmup_steps=1,
                         precision="fp32", grad_checkpoint=ckpt)  # fmt: skip
    state = new_state(model_config, config, device)
    tables = DiffusionTables.from_config(DiffusionConfig()).to(device, torch.float32)
    base = memory._in_use(device)
    predicted = memory.measure(state.model, state.optimizer, tables, config, device, 0,
                               (3, size, size))  # fmt: skip
    images = [torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)]
    memory._reset_peak(device)
    for _ in range(2):
        result = train_step(state, images, tables, config, device, state.model)
    float(result.losses.sum())
    actual = memory._peak(device) - base
    need = predicted.need(batch)
    weights = sum(p.numel() * 4 for p in state.model.parameters())
    return {"case": f"{preset} {size}px batch {batch}" + (" --grad-checkpoint" if ckpt else ""),
            "device": str(device), "predicted_mib": need / 2**20, "actual_mib": actual / 2**20,
            "ratio": need / actual, "fixed_mib": predicted.fixed / 2**20,
            "per_image_mib": predicted.per_image / 2**20,
            "weights_mib": weights / 2**20}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--cases", default=CPU_CASES, help="preset:size:batch[:ckpt],...")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        preset, size, batch, *flag = args.one.split(":")
        print(json.dumps(one(preset, int(size), int(batch), args.device, bool(flag))))
        return
    for case in args.cases.split(","):
        out = subprocess.run([sys.executable, __file__, "--one", case, "--device", args.device],
                             capture_output=True, text=True)  # fmt: skip
        if out.returncode:
            print(f"{case}: failed: {out.stderr.strip().splitlines()[-1]}")
            continue
        r = json.loads(out.stdout)
        print(f"{r['case']:40s} predicted {r['predicted_mib']:8.0f} MiB  actual "
              f"{r['actual_mib']:8.0f} MiB  ratio {r['ratio']:.2f}  (fixed "
              f"{r['fixed_mib']:.0f}, per image {r['per_image_mib']:.1f}, weights "
              f"{r['weights_mib']:.0f})", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
