"""The network as sampling runs it: autocast precision, torch.compile, CUDA graphs, and
classifier-free guidance.

On CUDA the network runs from CUDA graphs (`GraphedForward`): its ~600 kernels are queued by one
call instead of one Python dispatch each, which is what bounds small batches
(docs/benchmarks.md). DDPM_CUDA_GRAPHS=0 turns them off.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

import torch

from ddpm_cli import runtime
from ddpm_cli.config import Precision
from ddpm_cli.device import cpu_has_amx
from ddpm_cli.errors import ConfigError
from ddpm_cli.model.unet import UNet


def default_precision(device: torch.device) -> Precision:
    """bf16 where the hardware computes in it: a CUDA device of compute capability 8.0
    (Ampere) or later, or an x86 CPU with AMX; fp32 elsewhere. Older GPUs only emulate bf16
    (cuDNN has no bf16 convolutions there), and on CPUs without AMX bf16 was slower than fp32.
    On a 2-core AMX CPU bf16 trained the small preset 1.7x faster to the same loss and sample
    quality, and sampled 3x faster (docs/benchmarks.md). Sampling in bf16 drew images 0.2-0.3
    of an 8-bit level from fp32's, at the same distance from the data (docs/sampling.md).
    DDPM_AMX_BF16=0 keeps fp32 as the default on AMX CPUs (the same default on every CPU)."""
    if device.type == "cuda":
        native = torch.cuda.get_device_capability(device)[0] >= 8
    elif device.type == "cpu":
        native = cpu_has_amx() is True and runtime.current().amx_bf16
    else:
        native = False
    return Precision.bf16 if native else Precision.fp32


def check_precision(precision: Precision, device: torch.device) -> None:
    if precision is Precision.fp16 and device.type != "cuda":
        raise ConfigError("--precision fp16 needs a CUDA device; use bf16 or fp32 here")


def resolve_precision(precision: Precision | None, device: torch.device) -> Precision:
    """The user's precision, or the device's default for None; refused where it cannot run."""
    precision = default_precision(device) if precision is None else precision
    check_precision(precision, device)
    return precision


_DTYPE = {Precision.fp32: torch.float32, Precision.bf16: torch.bfloat16}


class _NoCudaRuntime(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No CUDA runtime is found")


def compile_for(fn, device: torch.device, mode: str | None = None):
    """torch.compile(fn). For the CPU on a machine with a CUDA toolkit but no GPU, torch's C++
    builder logs "No CUDA runtime is found, using CUDA_HOME=..." as it loads: true, and of no
    use to a run that never asked for CUDA; that one line is dropped."""
    if device.type != "cuda":
        logger = logging.getLogger("torch.utils.cpp_extension")
        if not any(isinstance(f, _NoCudaRuntime) for f in logger.filters):
            logger.addFilter(_NoCudaRuntime())
    return torch.compile(fn, mode=mode)


def network(model: UNet, device: torch.device, precision: Precision, compile: bool):
    """model(x, t[, y]) as sampling runs it, returning float32: compiled or not, from CUDA
    graphs on CUDA. bf16 runs a bf16 copy of the weights on bf16 inputs; fp16 runs under
    autocast.

    bf16 weights instead of bf16 autocast: autocast casts every weight at every call and keeps
    GroupNorm and SiLU in float32 (twice the memory traffic) before the next convolution casts
    their output to bf16 anyway. On an H100 the network ran 26% faster (docs/benchmarks.md) at
    the same distance from the float32 output. fp16 keeps autocast: its narrow range needs the
    float32 normalisation."""
    check_precision(precision, device)
    if precision is Precision.bf16:
        model = copy.deepcopy(model).to(torch.bfloat16)
    net = compile_for(model, device) if compile else model

    def forward(x, *inputs):
        if precision is Precision.fp16:
            with torch.autocast(device.type, dtype=torch.float16):
                return net(x, *inputs).float()
        return net(x.to(_DTYPE[precision]), *inputs).float()

    if device.type == "cuda" and runtime.current().cuda_graphs:
        return GraphedForward(forward)
    return forward


class GraphedForward:
    """`forward(x, t[, y])` (no gradients, no randomness) replayed from a CUDA graph captured
    once per input shape, on the inputs' own GPU; a shape whose capture fails, or whose first
    replay differs from the eager result, runs eagerly. The result is a copy, so that it
    outlives the next replay."""

    def __init__(self, forward: Callable):
        self.forward = forward
        self.graphs: dict[tuple, tuple | None] = {}

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        key = tuple((tuple(a.shape), a.dtype, a.device) for a in inputs)
        if key not in self.graphs:
            self.graphs[key] = self._capture(inputs)
        captured = self.graphs[key]
        if captured is None:
            return self.forward(*inputs)
        return self._replay(captured, inputs)

    @staticmethod
    def _replay(captured, inputs) -> torch.Tensor:
        graph, static, out = captured
        with torch.cuda.device(inputs[0].device):  # graphs capture and replay on the current GPU
            for buffer, a in zip(static, inputs, strict=True):
                buffer.copy_(a)
            graph.replay()
            return out.clone()

    def _capture(self, inputs: tuple[torch.Tensor, ...]):
        static = [a.clone() for a in inputs]
        device = inputs[0].device
        try:
            with torch.cuda.device(device), torch.no_grad():
                side = torch.cuda.Stream(device)
                side.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(side):
                    for _ in range(2):  # cuDNN and cuBLAS choose their kernels outside a graph
                        eager = self.forward(*static)
                torch.cuda.current_stream(device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    out = self.forward(*static)
            captured = (graph, static, out)
            replayed = self._replay(captured, static)
        except RuntimeError:
            return None
        # an empty or wrong graph would repeat one output for ever: check it once
        return captured if torch.allclose(replayed, eager, rtol=1e-3, atol=1e-4) else None


# where the steps outside the guidance interval take one pass: the host knows t at no cost
# there; elsewhere reading it would make the host wait for the device at every step
ONE_PASS_DEVICES = ("cpu",)


def guided(
    net: Callable, labels: torch.Tensor, guidance: float, null: int,
    where: torch.Tensor | None = None,
) -> Callable:  # fmt: skip
    """The network for sampling images of classes `labels` (B,), with classifier-free guidance
    of weight w = `guidance` (Ho & Salimans 2022): out = (1 + w) out(y) - w out(no class), both
    in one batched forward pass. Combining the raw outputs is combining the eps predictions,
    for eps, x0 and v models alike: each is affine in eps at a fixed x_t, and the weights sum
    to 1. w = 0 is plain conditional sampling (one pass).

    `where` (T,) bool: the timesteps that are guided, an interval of noise levels (Kynkaanniemi
    et al. 2024); elsewhere the class alone. On the CPU those steps take one pass; elsewhere
    both passes run and the weight is looked up on the device, so the host never waits for it
    (the same images either way, to rounding). None: every timestep is guided."""
    if guidance == 0:
        return lambda x, t: net(x, t, labels)
    both = torch.cat([labels, torch.full_like(labels, null)])
    weights = None if where is None else where.to(labels.device) * float(guidance)

    def forward(x, t):
        if (weights is not None and x.device.type in ONE_PASS_DEVICES
                and not where[int(t.reshape(-1)[0])]):  # fmt: skip
            return net(x, t, labels)
        cond, uncond = net(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
        w = guidance if weights is None else weights[t].to(cond.dtype).view(-1, 1, 1, 1)
        return cond + w * (cond - uncond)

    return forward
