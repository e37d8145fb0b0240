"""Training and sampling throughput of ddpm's presets on this machine.

    python benchmarks/bench.py                       # small and cifar10 presets, auto device
    python benchmarks/bench.py --preset tiny --steps 20 --json
    python benchmarks/bench.py --preset small --stream          # decode from disk per batch

For each preset: training img/s through the real pipeline (a folder of PNGs decoded by the
loader, seeded batches with flips, forward, backward, Adam, EMA), the share of step time spent
waiting for data, sampling img/s per sampler and step count (every step is one network
evaluation: a few are timed and scaled to the step count), and peak memory.
Numbers print to stdout; this is a benchmark, not a test, and nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from ddpm_cli.batches import Batches
from ddpm_cli.config import DiffusionConfig, SamplerConfig, TrainConfig
from ddpm_cli.data import load_folder
from ddpm_cli.device import resolve_device
from ddpm_cli.presets import PRESETS, build_model_config
from ddpm_cli.samplers import from_config
from ddpm_cli.schedules import DiffusionTables
from ddpm_cli.train import new_state, resolve, train_step


def make_folder(root: Path, n: int, size: int) -> Path:
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        arr = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(root / f"{i:04d}.png")
    return root


def peak_memory(device: torch.device) -> float:
    """Peak memory in MiB: allocated on CUDA, resident set of the process otherwise."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(preset: str, args, device: torch.device, folder: Path) -> list[dict]:
    size = PRESETS[preset].image_size[0] if args.image_size is None else args.image_size
    data, report = load_folder(folder, (size, size), stream=args.stream)
    config = TrainConfig(
        preset=preset,
        image_size=size,
        batch_size=args.batch_size,
        precision=args.precision,
        seed=0,
        device=str(device),
        steps=10**9,
        workers=args.workers,
    )
    config = resolve(config, device, report.used, report.channels)
    model_config = build_model_config(preset, (size, size), report.channels)
    state = new_state(model_config, config, device)
    tables = DiffusionTables.from_config(DiffusionConfig()).to(device, torch.float32)
    forward = torch.compile(state.model) if args.compile else state.model
    batches = Batches(data, config.batch_size, config.seed, config.flip, config.workers)
    feed = batches.iterate(0, 0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    wait = total = 0.0
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        micro = [next(feed)]
        t1 = time.perf_counter()
        train_step(state, micro, tables, config, device, forward)
        sync(device)
        t2 = time.perf_counter()
        if i >= args.warmup:
            wait += t1 - t0
            total += t2 - t0
    feed.close()
    images = args.steps * config.batch_size
    common = {
        "impl": "ddpm",
        "preset": preset,
        "device": str(device),
        "precision": config.precision.value,
        "batch": config.batch_size,
        "image_size": size,
        "data": f"stream x{config.workers}" if report.streamed else "memory",
    }
    rows = [
        {
            **common,
            "workload": "train",
            "img_per_s": images / total,
            "data_wait_share": wait / total,
            "peak_mib": peak_memory(device),
        }
    ]

    n = config.batch_size
    g = torch.Generator().manual_seed(0)
    model = state.ema.eval()
    for spec in args.samplers.split(","):
        name, _, steps = spec.partition(":")
        sampler_config = SamplerConfig(sampler=name, steps=int(steps) if steps else None)
        resolved = sampler_config.resolved(tables.timesteps, config.objective.value)
        x_T = torch.randn(n, report.channels, size, size, generator=g).to(device)
        steps_iter = from_config(
            sampler_config,
            model,
            tables,
            x_T,
            lambda s: torch.randn(s, generator=g).to(device),
            config.objective.value,
        )
        next(steps_iter)  # warm-up evaluation
        sync(device)
        t0 = time.perf_counter()
        evals = 0
        for _ in steps_iter:  # every step is one network evaluation: time a few, scale up
            evals += 1
            if evals >= args.sample_evals:
                break
        sync(device)
        seconds = time.perf_counter() - t0
        per_image = seconds / max(evals, 1) * resolved.steps / n
        rows.append(
            {
                **common,
                "workload": f"sample:{resolved.sampler.value}:{resolved.steps}",
                "img_per_s": 1 / per_image,
                "evals_img_per_s": evals * n / seconds,
                "peak_mib": peak_memory(device),
            }
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--preset",
        action="append",
        choices=sorted(PRESETS),
        help="preset(s) to measure (repeatable); default: small and cifar10",
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--steps", type=int, default=10, help="timed training steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument(
        "--samplers",
        default="dpm++:20,ddim:50,ddpm:100,ddpm:1000",
        help="sampler:steps list; img/s from --sample-evals timed network evaluations",
    )
    p.add_argument("--sample-evals", type=int, default=10)
    p.add_argument("--images", type=int, default=256, help="PNG files in the data folder")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--stream", action="store_true", help="decode batches from disk (workers)")
    p.add_argument("--workers", type=int, default=None, help="decoding processes with --stream")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    args = p.parse_args()
    device = resolve_device(args.device)
    presets = args.preset or ["small", "cifar10"]
    if not args.json:
        print(
            f"# {time.strftime('%Y-%m-%d')} {platform.machine()} {platform.processor() or ''} "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}"
        )
        print(
            f"{'preset':<12} {'workload':<18} {'data':<10} {'batch':>5} {'prec':>5} "
            f"{'img/s':>9} {'data wait':>9} {'peak MiB':>9}"
        )
    with tempfile.TemporaryDirectory() as tmp:
        folders: dict[int, Path] = {}
        for preset in presets:
            size = PRESETS[preset].image_size[0] if args.image_size is None else args.image_size
            if size not in folders:
                (Path(tmp) / str(size)).mkdir()
                folders[size] = make_folder(Path(tmp) / str(size), args.images, size)
            for row in bench(preset, args, device, folders[size]):
                if args.json:
                    print(json.dumps(row), flush=True)
                else:
                    share = row.get("data_wait_share")
                    wait = f"{100 * share:.1f}%" if share is not None else ""
                    print(
                        f"{row['preset']:<12} {row['workload']:<18} {row['data']:<10} "
                        f"{row['batch']:>5} "
                        f"{row['precision']:>5} {row['img_per_s']:>9.2f} {wait:>9} "
                        f"{row['peak_mib']:>9.0f}",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
