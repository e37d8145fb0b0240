"""Where ddpm's training step spends its time, on this device: what is left to gain, and where.

    python benchmarks/breakdown.py
    python benchmarks/breakdown.py --preset cifar10 --precision bf16 --rounds 5

Two measurements, in one process, taking turns within each round:

- phases: one training step as train.train_step runs it (a random batch in the model's range),
  timed piece by piece: forward pass and loss, backward pass, gradient clipping, Adam, EMA.
- knock-outs: the forward and backward pass as it is ("as is"), and with GroupNorm, or SiLU,
  replaced by a multiplication by one (the cheapest elementwise pass that keeps the gradient
  flowing). The time saved bounds what any faster GroupNorm or SiLU could gain: a fused or
  hand-written one still reads and writes its tensors.

Prints one JSON line per phase and per knock-out: median milliseconds over the rounds, and the
share of the step (phases) or the speedup over "as is" (knock-outs). The step is not the
loader's: data comes from memory, as it does in bench.py after decoding.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch
import torch.nn.functional as F

from ddpm_cli import unet
from ddpm_cli.config import DiffusionConfig, Precision, TrainConfig
from ddpm_cli.device import resolve_device, tune_allocator
from ddpm_cli.diffusion import training_losses
from ddpm_cli.presets import build_model_config
from ddpm_cli.schedules import DiffusionTables
from ddpm_cli.train import ema_decay_at, new_state, resolve, update_ema

PHASES = ("forward", "backward", "clip", "adam", "ema")


def _times_one(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return x * 1.0


@contextlib.contextmanager
def knocked_out(what: str):
    """GroupNorm ("groupnorm") or SiLU ("silu") replaced by x * 1.0 within the block."""
    saved = unet.GroupNorm.forward, F.silu
    if what == "groupnorm":
        unet.GroupNorm.forward = lambda self, x: _times_one(x)
    elif what == "silu":
        F.silu = _times_one  # unet and nn.SiLU call it through torch.nn.functional
    try:
        yield
    finally:
        unet.GroupNorm.forward, F.silu = saved


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    tune_allocator()
    device = resolve_device(args.device)
    n = args.batch_size
    model_config = build_model_config(args.preset, (32, 32), 3)
    config = TrainConfig(preset=args.preset, image_size=32, batch_size=n, seed=0, steps=10**6,
                         precision=Precision(args.precision), device=str(device))  # fmt: skip
    config = resolve(config, device, 1024, 3)
    tables = DiffusionTables.from_config(DiffusionConfig()).to(device, torch.float32)
    state = new_state(model_config, config, device)
    g = torch.Generator().manual_seed(0)
    x0 = (torch.rand(n, 3, 32, 32, generator=g) * 2 - 1).to(device)
    t = torch.randint(0, tables.timesteps, (n,), generator=g).to(device)
    eps = torch.randn(n, 3, 32, 32, generator=g).to(device)
    amp = torch.autocast(device.type, torch.bfloat16, enabled=args.precision == "bf16")

    def now() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def step() -> list[float]:
        stamps = [now()]
        state.model.train()
        with amp:
            loss = training_losses(state.model, tables, x0, t, eps).mean()
        stamps.append(now())
        loss.backward()
        stamps.append(now())
        torch.nn.utils.clip_grad_norm_(state.model.parameters(), config.grad_clip)
        stamps.append(now())
        state.optimizer.step()
        state.optimizer.zero_grad(set_to_none=True)
        state.step += 1
        stamps.append(now())
        update_ema(state.ema, state.model, ema_decay_at(state.step, config.ema_decay))
        stamps.append(now())
        return [b - a for a, b in zip(stamps, stamps[1:], strict=False)]

    def passes(what: str | None) -> float:
        with knocked_out(what) if what else contextlib.nullcontext():
            start = now()
            with amp:
                loss = training_losses(state.model, tables, x0, t, eps).mean()
            loss.backward()
            state.optimizer.zero_grad(set_to_none=True)
            return now() - start

    knockouts = {"as is": None, "no GroupNorm": "groupnorm", "no SiLU": "silu"}
    for _ in range(2):  # warm-up: allocator, oneDNN primitives, cuDNN plans
        step()
        for what in knockouts.values():
            passes(what)
    # a knock-out that missed the network would time nothing; checked after the warm-up steps,
    # which make the zero-initialised last layers nonzero
    with torch.no_grad(), amp:
        outputs = {}
        for label, what in knockouts.items():
            with knocked_out(what) if what else contextlib.nullcontext():
                outputs[label] = state.model(x0, t)
        for label in list(knockouts)[1:]:
            if torch.equal(outputs[label], outputs["as is"]):
                raise SystemExit(f"knock-out {label!r} did not change the network's output")
    phase_times: list[list[float]] = []
    knock_times: dict[str, list[float]] = {k: [] for k in knockouts}
    for _ in range(args.rounds):
        phase_times.append(step())
        for label, what in knockouts.items():
            knock_times[label].append(passes(what))
    common = {"preset": args.preset, "device": device.type, "precision": args.precision,
              "batch": n, "rounds": args.rounds}  # fmt: skip
    medians = [statistics.median(column) for column in zip(*phase_times, strict=True)]
    for name, m in zip(PHASES, medians, strict=True):
        print(json.dumps({**common, "phase": name, "ms": round(m * 1e3, 2),
                          "share": round(m / sum(medians), 3)}))  # fmt: skip
    base = statistics.median(knock_times["as is"])
    for label, times in knock_times.items():
        m = statistics.median(times)
        print(json.dumps({**common, "knockout": label, "ms": round(m * 1e3, 2),
                          "speedup": round(base / m, 3)}))  # fmt: skip


if __name__ == "__main__":
    main()
