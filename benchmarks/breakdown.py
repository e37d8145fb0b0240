"""Where ddpm's training step spends its time, on this device: what is left to gain, and where.

    python benchmarks/breakdown.py
    python benchmarks/breakdown.py --preset cifar10 --precision bf16 --rounds 5

Two measurements, in one process, taking turns within each round:

- phases: one training step as train.train_step runs it (a random batch in the model's range),
  timed piece by piece: forward pass and loss, backward pass, gradient clipping, Adam, EMA.
- variants: the forward and backward pass as it is ("as is"), and with GroupNorm, or SiLU,
  knocked out: replaced by a multiplication by one (the cheapest elementwise pass that keeps
  the gradient flowing). The time saved bounds what any faster GroupNorm or SiLU could gain: a
  fused or hand-written one still reads and writes its tensors. In bf16, also "GroupNorm in
  bf16": under autocast GroupNorm runs in float32 on a float32 copy of its bf16 input; this
  runs it on the bf16 input (affine weights cast to bf16), and SiLU after it in bf16 too.

Prints one JSON line per phase and per variant: median milliseconds over the rounds, and the
share of the step (phases) or the speedup over "as is" (variants). The step is not the
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
from workload import workload  # benchmarks/workload.py

from ddpm_cli.device import resolve_device
from ddpm_cli.diffusion.process import training_losses
from ddpm_cli.host import tune_allocator
from ddpm_cli.model.kernels import groupnorm
from ddpm_cli.training.train import ema_decay_at, update_ema

PHASES = ("forward", "backward", "clip", "adam", "ema")


def _times_one(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return x * 1.0


_GROUPNORM = groupnorm.GroupNorm.forward


def _bf16_groupnorm(self: groupnorm.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """groupnorm.GroupNorm on bf16 input, in bf16, where autocast would have run it in float32."""
    if x.dtype != torch.bfloat16:
        return _GROUPNORM(self, x)
    with torch.autocast(x.device.type, enabled=False):
        weight, bias = self.weight.to(x.dtype), self.bias.to(x.dtype)
        if not groupnorm.nchw_is_faster(x, self.num_groups):
            return F.group_norm(x, self.num_groups, weight, bias, self.eps)
        y = F.group_norm(groupnorm.ToNCHW.apply(x), self.num_groups, weight, bias, self.eps)
        return y.contiguous(memory_format=torch.channels_last)


@contextlib.contextmanager
def variant(name: str):
    """Within the block, GroupNorm ("no GroupNorm") or SiLU ("no SiLU") replaced by x * 1.0, or
    GroupNorm run in bf16 ("GroupNorm in bf16"); "as is" changes nothing."""
    saved = groupnorm.GroupNorm.forward, F.silu
    if name == "no GroupNorm":
        groupnorm.GroupNorm.forward = lambda self, x: _times_one(x)
    elif name == "no SiLU":
        F.silu = _times_one  # the network and nn.SiLU call it through torch.nn.functional
    elif name == "GroupNorm in bf16":
        groupnorm.GroupNorm.forward = _bf16_groupnorm
    try:
        yield
    finally:
        groupnorm.GroupNorm.forward, F.silu = saved


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
    work = workload(args.preset, n, args.precision, device)
    config, tables, state = work.config, work.tables, work.state
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

    def passes(name: str) -> float:
        with variant(name):
            start = now()
            with amp:
                loss = training_losses(state.model, tables, x0, t, eps).mean()
            loss.backward()
            state.optimizer.zero_grad(set_to_none=True)
            return now() - start

    variants = ["as is", "no GroupNorm", "no SiLU"]
    if args.precision == "bf16":
        variants.append("GroupNorm in bf16")
    for _ in range(2):  # warm-up: allocator, oneDNN primitives, cuDNN plans
        step()
        for name in variants:
            passes(name)
    # a variant that missed the network would time nothing; checked after the warm-up steps,
    # which make the zero-initialised last layers nonzero
    with torch.no_grad(), amp:
        outputs = {}
        for name in variants:
            with variant(name):
                outputs[name] = state.model(x0, t)
        for name in variants[1:]:
            if torch.equal(outputs[name], outputs["as is"]):
                raise SystemExit(f"variant {name!r} did not change the network's output")
    phase_times: list[list[float]] = []
    variant_times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.rounds):
        phase_times.append(step())
        for name in variants:
            variant_times[name].append(passes(name))
    common = {"preset": args.preset, "device": device.type, "precision": args.precision,
              "batch": n, "rounds": args.rounds}  # fmt: skip
    medians = [statistics.median(column) for column in zip(*phase_times, strict=True)]
    for name, m in zip(PHASES, medians, strict=True):
        print(json.dumps({**common, "phase": name, "ms": round(m * 1e3, 2),
                          "share": round(m / sum(medians), 3)}))  # fmt: skip
    base = statistics.median(variant_times["as is"])
    for name, times in variant_times.items():
        m = statistics.median(times)
        print(json.dumps({**common, "variant": name, "ms": round(m * 1e3, 2),
                          "speedup": round(base / m, 3)}))  # fmt: skip


if __name__ == "__main__":
    main()
