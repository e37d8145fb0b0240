"""Adam (Kingma & Ba 2015), the training loop's optimizer, without torch.optim.

torch.optim builds every optimizer through functions that import torch._dynamo on first use:
2-3 s of each `ddpm train` start on a 2-core CPU, a quarter of it, for a compiler a default
run never uses (docs/benchmarks.md). This is the part of torch.optim.Adam the loop needs
(`param_groups`, `state`, `step`, `zero_grad`, `state_dict`, `load_state_dict`) with torch's
arithmetic: its fused kernel where this torch has one for the device (CUDA; the CPU from torch
2.4, 3x faster than the per-tensor loop for the cifar10 preset), else its multi-tensor ops in
torch's order. No weight decay, AMSGrad or maximising: the loop uses none.

The state_dict has torch.optim.Adam's layout, so a train state saved by either loads into the
other. torch.amp.GradScaler unscales through `param_groups`; with the fused kernel it passes the
overflow flag to the kernel (no wait for the device), otherwise it skips `step()` itself.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import torch

BETAS = (0.9, 0.999)
EPS = 1e-8
MOMENTS = ("exp_avg", "exp_avg_sq")
# torch.optim.Adam's group keys beside lr, betas and eps, with the values this class runs
FIXED = {"weight_decay": 0, "amsgrad": False, "maximize": False}


@functools.cache
def fused_available(device: torch.device) -> bool:
    """Whether this torch has the fused Adam kernel for the device (tried once, on that device
    itself: another GPU may be full or exclusive)."""
    if device.type not in ("cuda", "cpu"):
        return False
    try:
        p = torch.zeros(1, device=device)
        step = torch.ones((), device=device)
        torch._fused_adam_([p], [torch.ones_like(p)], [torch.zeros_like(p)],
                           [torch.zeros_like(p)], [], [step], lr=1e-3, beta1=BETAS[0],
                           beta2=BETAS[1], weight_decay=0.0, eps=EPS, amsgrad=False,
                           maximize=False)  # fmt: skip
    except torch.cuda.OutOfMemoryError:  # a full GPU is no answer: every rank of a job must
        raise  # run the same kernel, or their weights drift apart
    except (AttributeError, NotImplementedError, RuntimeError, TypeError):
        return False
    return True


class Adam:
    """Adam over one group of parameters; `fused`: None chooses by the parameters' device."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float, fused: bool | None = None):
        params = list(params)
        if not params:
            raise ValueError("Adam got no parameters")
        if fused is None:
            fused = fused_available(params[0].device)
        self.param_groups = [{
            "lr": lr, "betas": BETAS, "eps": EPS, **FIXED, "foreach": None if fused else True,
            "fused": True if fused else None, "capturable": False, "differentiable": False,
            "decoupled_weight_decay": False, "params": params,
        }]  # fmt: skip
        self.state: dict[torch.Tensor, dict[str, torch.Tensor]] = {}
        # the fused kernel unscales and skips overflowed steps itself: torch.amp.GradScaler then
        # hands it `grad_scale` and `found_inf` instead of reading found_inf on the host
        self._step_supports_amp_scaling = bool(fused)

    def _fresh(self, p: torch.Tensor, fused: bool) -> dict[str, torch.Tensor]:
        # the step count: on the parameter's device for the fused kernel, else on the CPU
        # (torch's foreach Adam reads it on the host for the bias corrections)
        step = torch.zeros((), dtype=torch.float32, device=p.device if fused else "cpu")
        return {"step": step, **{m: torch.zeros_like(p) for m in MOMENTS}}

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            kinds: dict[tuple, list[torch.Tensor]] = {}  # by device and dtype, as torch groups
            for p in group["params"]:
                if p.grad is not None:
                    kinds.setdefault((p.device, p.dtype), []).append(p)
            for params in kinds.values():
                for p in params:
                    if p not in self.state:
                        self.state[p] = self._fresh(p, bool(group["fused"]))
                states = [self.state[p] for p in params]
                if group["fused"]:
                    scaled = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
                    _fused(params, states, group, *scaled)
                else:
                    _foreach(params, states, group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.param_groups[0]["params"]:
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.detach_().zero_()

    def state_dict(self) -> dict:
        """torch.optim's layout: parameters by their index; the tensors themselves, not copies."""
        (group,) = self.param_groups
        index = {p: i for i, p in enumerate(group["params"])}
        saved = {k: v for k, v in group.items() if k != "params"}
        return {
            "state": {index[p]: dict(s) for p, s in self.state.items()},
            "param_groups": [{**saved, "params": list(range(len(index)))}],
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state_dict of this class or of torch.optim.Adam. The hyperparameters come
        from it; how the update runs (fused or not) stays this machine's choice. Each moment is
        copied into its parameter's device, dtype and memory layout (channels_last: the fused
        kernel needs a moment laid out as its weight). ValueError or KeyError when it does not
        fit the parameters."""
        (saved,), (group,) = state_dict["param_groups"], self.param_groups
        params = group["params"]
        if len(saved["params"]) != len(params):
            n = len(saved["params"])
            raise ValueError(f"{n} parameters saved, the model has {len(params)}")
        for key, value in FIXED.items():
            if saved.get(key, value) != value:
                raise ValueError(f"a saved Adam with {key}={saved[key]}, which ddpm does not run")
        by_id = dict(zip(saved["params"], params, strict=True))
        state = {}
        for i, moments in state_dict["state"].items():
            p = by_id[int(i)]
            loaded = self._fresh(p, bool(group["fused"]))
            loaded["step"].copy_(torch.as_tensor(moments["step"]).reshape(()))
            for name in MOMENTS:
                value = moments[name]
                if value.shape != p.shape:
                    raise ValueError(f"{name} of shape {tuple(value.shape)} for a parameter "
                                     f"of shape {tuple(p.shape)}")  # fmt: skip
                loaded[name].copy_(value)
            state[p] = loaded
        group.update(lr=float(saved["lr"]), betas=tuple(float(b) for b in saved["betas"]),
                     eps=float(saved["eps"]))  # fmt: skip
        self.state = state


def _fused(params: list[torch.Tensor], states: list[dict], group: dict,
           grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None) -> None:  # fmt: skip
    """torch's fused kernel; with a grad scaler's `found_inf` it leaves the weights and moments
    of an overflowed step as they were, and the step count too."""
    steps = [s["step"] for s in states]
    torch._foreach_add_(steps, 1)
    beta1, beta2 = group["betas"]
    device = params[0].device
    grad_scale = grad_scale.to(device) if grad_scale is not None else None
    found_inf = found_inf.to(device) if found_inf is not None else None
    torch._fused_adam_(params, [p.grad for p in params], [s["exp_avg"] for s in states],
                       [s["exp_avg_sq"] for s in states], [], steps, lr=group["lr"],
                       beta1=beta1, beta2=beta2, weight_decay=0.0, eps=group["eps"],
                       amsgrad=False, maximize=False, grad_scale=grad_scale,
                       found_inf=found_inf)  # fmt: skip
    if found_inf is not None:
        torch._foreach_sub_(steps, [found_inf] * len(steps))


def _foreach(params: list[torch.Tensor], states: list[dict], group: dict) -> None:
    """Algorithm 1 of Kingma & Ba with torch's multi-tensor ops, in torch's order (so the
    result is torch.optim.Adam(foreach=True)'s to the bit)."""
    grads = [p.grad for p in params]
    m, v = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
    steps = [s["step"] for s in states]
    beta1, beta2 = group["betas"]
    for s in steps:  # on the CPU
        s.add_(1)
    torch._foreach_lerp_(m, grads, 1 - beta1)  # m <- beta1 m + (1 - beta1) g
    torch._foreach_mul_(v, beta2)
    torch._foreach_addcmul_(v, grads, grads, 1 - beta2)  # v <- beta2 v + (1 - beta2) g^2
    counts = [s.item() for s in steps]
    step_size = [-group["lr"] / (1 - beta1**n) for n in counts]  # bias-corrected m
    denom = torch._foreach_sqrt(v)
    torch._foreach_div_(denom, [(1 - beta2**n) ** 0.5 for n in counts])  # bias-corrected v
    torch._foreach_add_(denom, group["eps"])
    torch._foreach_addcdiv_(params, m, denom, step_size)  # theta <- theta - lr m^ / (v^ + eps)
