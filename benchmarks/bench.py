"""Training, forward and sampling throughput of ddpm's presets, and of the peers side by side.

    python benchmarks/bench.py                          # small and cifar10 presets, auto device
    python benchmarks/bench.py --preset cifar10 --peers # + diffusers, denoising-diffusion-pytorch
    python benchmarks/bench.py --preset tiny --steps 20 --json
    python benchmarks/bench.py --preset small --stream  # decode from disk per batch

Workloads, per preset and implementation:
  train                 forward, backward, optimizer and EMA on batches from a folder of PNGs
                        (ddpm: its loader, seeded batches with flips; the peers get the same
                        batches), with the share of step time spent waiting for data
  forward               one network evaluation at the batch size, no gradients
  sample:NAME:STEPS     img/s of whole samples; every step is one network evaluation, so a few
                        are timed and scaled to the step count

Each implementation runs in its own process, so that peak memory (allocated on CUDA, resident
set on the CPU) is its own, and nothing one warms up helps another. --peers needs the `bench`
extra (diffusers, denoising-diffusion-pytorch); benchmarks/peers.py builds the peers at ddpm's
configuration. ddpm's process tunes the C allocator as the `ddpm` command does
(host.tune_allocator); --tune-malloc-peers tunes the peers' processes too. Numbers print to
stdout; nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from ddpm_cli.config import DiffusionConfig, Precision, TrainConfig
from ddpm_cli.data.batches import Batches
from ddpm_cli.data.folders import load_folder
from ddpm_cli.device import resolve_device, to_device
from ddpm_cli.diffusion.samplers import from_config
from ddpm_cli.diffusion.schedules import DiffusionTables
from ddpm_cli.host import tune_allocator
from ddpm_cli.model.forward import network
from ddpm_cli.model.presets import PRESETS, build_model_config
from ddpm_cli.sampler_config import SamplerConfig
from ddpm_cli.training.loop import SYNC_EVERY
from ddpm_cli.training.train import check_finite, compiled, new_state, resolve, to_host, train_step

PEERS = ("diffusers", "denoising-diffusion-pytorch")


def make_folder(root: Path, n: int, size: int) -> Path:
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        arr = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(root / f"{i:04d}.png")
    return root


def peak_memory(device: torch.device) -> float:
    """Peak memory in MB: allocated on CUDA, resident set of the process otherwise."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, n: int, warmup: int, device: torch.device) -> tuple[float, float, float]:
    """Seconds for n calls of fn() after `warmup` untimed ones, the time fn() reported waiting,
    and the seconds the warm-up took (compilation, kernel choice)."""
    start = time.perf_counter()
    for _ in range(warmup):
        fn()
    sync(device)
    warm = time.perf_counter() - start
    wait, start = 0.0, time.perf_counter()
    for _ in range(n):
        wait += fn() or 0.0
    sync(device)
    return time.perf_counter() - start, wait, warm


def worker(impl: str, preset: str, args, device: torch.device, folder: Path) -> list[dict]:
    """Every workload of one implementation at one preset."""
    size = PRESETS[preset].image_size[0] if args.image_size is None else args.image_size
    data, report = load_folder(folder, (size, size), stream=args.stream)
    config = TrainConfig(
        preset=preset, image_size=size, batch_size=args.batch_size, precision=args.precision,
        seed=0, device=str(device), steps=10**9, workers=args.workers, compile=args.compile,
    )  # fmt: skip
    config = resolve(config, device, report.used, report.channels)
    model_config = build_model_config(preset, (size, size), report.channels)
    tables = DiffusionTables.from_config(DiffusionConfig()).to(device, torch.float32)
    batches = Batches(
        data, config.batch_size, config.seed, config.flip, config.workers, device=device
    )
    feed = batches.iterate(0, 0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    n, prec = config.batch_size, config.precision.value
    common = {
        "impl": impl, "preset": preset, "device": str(device), "precision": prec, "batch": n,
        "image_size": size, "data": f"stream x{config.workers}" if report.streamed else "memory",
    }  # fmt: skip

    if impl == "ddpm":
        state = new_state(model_config, config, device)
        net = state.model
        if args.compile:
            net = compiled(net, device, False, args.compile_mode)
        if device.type == "cuda":  # as run.py sets them
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True
        pending = []
        every = 1 if device.type == "cpu" else SYNC_EVERY

        def train_once() -> float:
            t0 = time.perf_counter()
            micro = [next(feed)[0]]
            wait = time.perf_counter() - t0
            pending.append(train_step(state, micro, tables, config, device, net))
            if len(pending) >= every:  # the host reads the losses as often as run.py does
                check_finite(to_host(pending), config)
                pending.clear()
            return wait

        model = state.ema.eval()
        params = sum(p.numel() for p in state.model.parameters())
    else:
        from peers import PeerTrainer, copy_model, parameters

        trainer = PeerTrainer(impl, model_config, device, prec)

        def train_once() -> float:
            t0 = time.perf_counter()
            batch = next(feed)[0]
            wait = time.perf_counter() - t0
            trainer.step(batch)
            return wait

        peer = copy_model(trainer.model)
        params = parameters(peer)
        pure = args.peers_bf16_weights and prec == "bf16"  # as ddpm's forward.network runs
        peer = peer.to(torch.bfloat16) if pure else peer

        def model(x, t):
            x = x.to(torch.bfloat16) if pure else x
            out = peer(x, t).sample if impl == "diffusers" else peer(x, t)
            return out.float() if pure else out

    seconds, wait, warm = timed(train_once, args.steps, args.warmup, device)
    feed.close()
    common["parameters"] = params
    rows = [{**common, "workload": "train", "img_per_s": args.steps * n / seconds,
             "steps_per_s": args.steps / seconds, "data_wait_share": wait / seconds,
             "warmup_s": warm, "peak_mem_mb": peak_memory(device)}]  # fmt: skip

    g = torch.Generator().manual_seed(0)
    pure = impl != "ddpm" and args.peers_bf16_weights  # no autocast over bf16 weights
    autocast = torch.autocast(
        device.type, dtype=torch.bfloat16, enabled=prec == "bf16" and not pure
    )
    ns = args.sample_batch or n
    x = torch.randn(ns, report.channels, size, size, generator=g).to(device)
    t = torch.randint(0, 1000, (ns,), generator=g).to(device)
    if impl == "ddpm":  # the network as `ddpm sample` runs it (CUDA graphs on CUDA)
        fwd = network(model, device, Precision(prec), args.compile)
    else:

        def fwd(x, t):
            with autocast:
                return model(x, t)

    def forward_once() -> None:
        with torch.no_grad():
            fwd(x, t)

    seconds, _, warm = timed(forward_once, args.sample_evals, 2, device)
    common["batch"] = ns
    rows.append({**common, "workload": "forward", "img_per_s": args.sample_evals * ns / seconds,
                 "warmup_s": warm, "peak_mem_mb": peak_memory(device)})  # fmt: skip

    for spec in args.samplers.split(","):
        name, _, steps = spec.partition(":")
        resolved = SamplerConfig(sampler=name, steps=int(steps) if steps else None).resolved(
            tables.timesteps, config.objective.value
        )
        if impl == "ddpm":
            seconds, evals = time_ours(fwd, resolved, tables, x, g, config, args, device)
        elif impl == "diffusers":
            from peers import peer_sampler, time_peer_sampling

            scheduler = peer_sampler(impl, resolved.sampler.value, resolved.steps)
            with autocast:
                limit = 10**9 if args.full_samples else args.sample_evals
                seconds, evals = time_peer_sampling(
                    model, scheduler, x, limit, lambda: sync(device)
                )
        else:
            continue  # its samplers run whole loops only; train and forward compare the network
        rows.append({
            **common, "workload": f"sample:{resolved.sampler.value}:{resolved.steps}",
            "img_per_s": ns / (seconds / evals * resolved.steps),
            "batch_seconds": seconds / evals * resolved.steps,
            "evals_img_per_s": evals * ns / seconds, "peak_mem_mb": peak_memory(device),
        })  # fmt: skip
    return rows


def time_ours(fwd, resolved, tables, x, g, config, args, device):
    steps = from_config(
        resolved, fwd, tables, x, lambda s: to_device(torch.randn(s, generator=g), device),
        config.objective.value,
    )  # fmt: skip
    with torch.no_grad():
        next(steps)  # warm-up evaluation
        sync(device)
        t0, evals = time.perf_counter(), 0
        for _ in steps:
            evals += 1
            if evals >= args.sample_evals and not args.full_samples:
                break
        sync(device)
    return time.perf_counter() - t0, max(evals, 1)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", action="append", choices=sorted(PRESETS),
                   help="preset(s) to measure (repeatable); default small, cifar10")  # fmt: skip
    p.add_argument("--peers", action="store_true", help="also run diffusers and d-d-pytorch")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--sample-batch", type=int, default=None,
                   help="batch for forward and sampling (default: --batch-size)")  # fmt: skip
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--steps", type=int, default=10, help="timed training steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--samplers", default="dpm++:20,ddim:50,ddpm:100,ddpm:1000",
                   help="sampler:steps list, timed over --sample-evals evaluations")  # fmt: skip
    p.add_argument("--sample-evals", type=int, default=10)
    p.add_argument("--full-samples", action="store_true",
                   help="time every step of each sampler, not --sample-evals of them")  # fmt: skip
    p.add_argument("--images", type=int, default=256, help="PNG files in the data folder")
    p.add_argument("--compile", action="store_true", help="torch.compile ddpm's network")
    p.add_argument("--compile-mode", default=None,
                   help="torch.compile mode for training (default: as ddpm train)")  # fmt: skip
    p.add_argument("--cudnn-benchmark", action="store_true",
                   help="cuDNN times its kernels per shape, for the peers too")  # fmt: skip
    p.add_argument("--peers-bf16-weights", action="store_true",
                   help="bf16: peers sample on bf16 weights, as ddpm (else autocast)")  # fmt: skip
    p.add_argument("--tune-malloc-peers", action="store_true",
                   help="the peers' processes keep large blocks mapped, as ddpm's do")  # fmt: skip
    p.add_argument("--stream", action="store_true", help="decode batches from disk (workers)")
    p.add_argument("--workers", type=int, default=None, help="decoding processes with --stream")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # JSON: impl, preset, folder, options
    return p.parse_args(argv)


def print_row(row: dict, base: dict[tuple, float], as_json: bool) -> None:
    key = (row["preset"], row["workload"])
    if row["impl"] == "ddpm":
        base[key] = row["img_per_s"]
    elif key in base:
        row["ddpm_speedup"] = base[key] / row["img_per_s"]
    if as_json:
        print(json.dumps(row), flush=True)
        return
    share = row.get("data_wait_share")
    wait = f"{100 * share:.1f}%" if share is not None else ""
    ratio = f"x{row['ddpm_speedup']:.2f}" if "ddpm_speedup" in row else ""
    print(f"{row['impl']:<28} {row['preset']:<8} {row['workload']:<18} {row['batch']:>5} "
          f"{row['precision']:>5} {row['img_per_s']:>9.2f} {wait:>9} {row['peak_mem_mb']:>9.0f} "
          f"{ratio:>8}", flush=True)  # fmt: skip


def main() -> None:
    args = parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        options = argparse.Namespace(**spec["options"])
        device = resolve_device(options.device)
        torch.backends.cudnn.benchmark = bool(options.cudnn_benchmark)
        tuned = spec["impl"] == "ddpm" or options.tune_malloc_peers  # as the `ddpm` command
        tuned = tune_allocator() if tuned else False
        for row in worker(spec["impl"], spec["preset"], options, device, Path(spec["folder"])):
            print(json.dumps({**row, "malloc_tuned": tuned}), flush=True)
        return
    device = resolve_device(args.device)
    impls = ["ddpm"]
    if args.peers:
        for name, module in zip(PEERS, ("diffusers", "denoising_diffusion_pytorch"), strict=True):
            try:
                __import__(module)
                impls.append(name)
            except ImportError:
                print(f"# {name} is not installed: pip install -e '.[bench]'", file=sys.stderr)
    presets = args.preset or ["small", "cifar10"]
    if not args.json:
        print(
            f"# {time.strftime('%Y-%m-%d')} {platform.machine()} {platform.processor() or ''} "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}"
        )
        print(f"{'impl':<28} {'preset':<8} {'workload':<18} {'batch':>5} {'prec':>5} "
              f"{'img/s':>9} {'data wait':>9} {'peak MB':>9} {'ddpm is':>8}")  # fmt: skip
    base: dict[tuple, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folders: dict[int, Path] = {}
        for preset in presets:
            size = PRESETS[preset].image_size[0] if args.image_size is None else args.image_size
            if size not in folders:
                (Path(tmp) / str(size)).mkdir()
                folders[size] = make_folder(Path(tmp) / str(size), args.images, size)
            for impl in impls:
                spec = {"impl": impl, "preset": preset, "folder": str(folders[size]),
                        "options": vars(args)}  # fmt: skip
                cmd = [sys.executable, __file__, "--worker", json.dumps(spec)]
                out = subprocess.run(cmd, capture_output=True, text=True)
                if out.returncode != 0:
                    print(f"# {impl} {preset} failed: {out.stderr.strip()[-500:]}", file=sys.stderr)
                    continue
                for line in out.stdout.splitlines():
                    if line.startswith("{"):  # a peer may print notes of its own
                        print_row(json.loads(line), base, args.json)


if __name__ == "__main__":
    main()
