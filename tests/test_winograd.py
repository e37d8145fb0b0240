"""Winograd 3x3 convolutions: the same function as F.conv2d, forward and backward, used only
where the CPU gains from it."""

from __future__ import annotations

import copy
import statistics

import pytest
import torch
import torch.nn.functional as F

from ddpm_cli.config import ModelConfig
from ddpm_cli.model.kernels import winograd
from ddpm_cli.model.kernels.policy import FAST
from ddpm_cli.model.kernels.winograd import Conv3x3
from ddpm_cli.model.unet import UNet
from ddpm_cli.training.adam import Adam


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize(
    "b, ci, co, h, w", [(2, 8, 12, 8, 8), (3, 16, 16, 7, 10), (1, 5, 6, 9, 13), (2, 4, 4, 3, 3)]
)
def test_float32_matches_a_float64_direct_convolution_with_its_gradients(b, ci, co, h, w):
    g = torch.Generator().manual_seed(b * 100 + h)
    x = torch.randn(b, ci, h, w, generator=g).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(co, ci, 3, 3, generator=g).contiguous(memory_format=torch.channels_last)
    bias = torch.randn(co, generator=g)
    grad = torch.randn(b, co, h, w, generator=g)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    out = winograd.conv3x3(*leaves)
    out.backward(grad)
    ref_leaves = [t.double().requires_grad_() for t in (x, weight, bias)]
    ref = F.conv2d(*ref_leaves, padding=1)
    ref.backward(grad.double())
    assert out.shape == ref.shape and out.is_contiguous(memory_format=torch.channels_last)
    assert rel(out, ref) < 1e-5
    for mine, theirs in zip(leaves, ref_leaves, strict=True):
        assert rel(mine.grad, theirs.grad) < 1e-5
    assert leaves[1].grad.stride() == leaves[1].stride() != weight.contiguous().stride()


def test_gradients_pass_gradcheck_in_float64():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64, generator=g).requires_grad_()
    weight = torch.randn(4, 3, 3, 3, dtype=torch.float64, generator=g).requires_grad_()
    bias = torch.randn(4, dtype=torch.float64, generator=g).requires_grad_()
    assert torch.autograd.gradcheck(winograd.conv3x3, (x, weight, bias))
    assert torch.autograd.gradcheck(lambda a, b: winograd.conv3x3(a, b, None), (x, weight))


def bf16_errors(conv, x, weight, bias, grad) -> list[float]:
    """Largest errors of output and the three gradients under CPU bf16 autocast, against
    float64 on the same inputs."""
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(*leaves)
    out.backward(grad.to(out.dtype))
    assert out.dtype == torch.bfloat16 and [t.grad.dtype for t in leaves] == [x.dtype] * 3
    for t in leaves:  # computed in bf16, or rounded to it, as autocast's casts round them
        assert torch.equal(t.grad, t.grad.bfloat16().to(t.grad.dtype))
    ref_leaves = [t.double().requires_grad_() for t in (x, weight, bias)]
    ref = F.conv2d(*ref_leaves, padding=1)
    ref.backward(grad.double())
    return [rel(out, ref)] + [rel(a.grad, b.grad) for a, b in zip(leaves, ref_leaves, strict=True)]


@pytest.mark.parametrize("direct", [False, True], ids=["winograd", "direct"])
def test_bfloat16_is_rounded_like_torch_bf16_convolution(direct):
    # bf16 inputs, float32 arithmetic, bf16 output: nearly every output is the float64 result
    # rounded to bf16, and the gradients are as close as torch's bf16 convolution's; the
    # arithmetic by Winograd's algorithm or by torch's float32 direct convolution
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 64, 10, 7, generator=g).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(32, 64, 3, 3, generator=g) / 24
    bias, grad = torch.randn(32, generator=g), torch.randn(3, 32, 10, 7, generator=g)
    xb, wb, bb = x.bfloat16(), weight.bfloat16(), bias.bfloat16()

    def conv(*args):
        return winograd.conv3x3(*args, direct=direct)

    with torch.no_grad():
        out = conv(xb, wb, bb)
    exact = F.conv2d(xb.double(), wb.double(), bb.double(), padding=1)
    assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=torch.channels_last)
    assert (out == exact.bfloat16()).float().mean() > 0.99
    assert rel(out, exact) < 2**-8  # at most half a bf16 step from the exact result, at scale
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # rounds as conv2d does
        assert torch.equal(conv(x, weight, bias), out)
    # under autocast from float32 leaves, whose gradients come back in float32
    x, weight, bias = (t.bfloat16().float() for t in (x, weight, bias))  # rounding common to both
    torchs = bf16_errors(lambda *a: F.conv2d(*a, padding=1), x, weight, bias, grad)
    mine = bf16_errors(conv, x, weight, bias, grad)
    assert max(torchs) < 1e-2
    for ours, theirs in zip(mine, torchs, strict=True):
        assert ours < 1.5 * theirs


def test_applies_only_to_large_float32_and_bfloat16_cpu_convolutions(monkeypatch, switches):
    big, w = torch.zeros(4, 128, 16, 16), torch.zeros(128, 128, 3, 3)
    assert winograd.applies(big, w)
    assert not winograd.applies(torch.zeros(4, 64, 16, 16), torch.zeros(128, 64, 3, 3))
    assert not winograd.applies(torch.zeros(4, 128, 4, 4), w)  # single padded tiles
    assert winograd.applies(torch.zeros(1, 128, 8, 9), w)  # inference: whatever the batch
    assert not winograd.applies(torch.zeros(3, 128, 16, 16), w, grad=True)  # 48 tiles
    assert winograd.applies(torch.zeros(1, 128, 32, 29), w, grad=True)  # 64 tiles
    assert not winograd.applies(big.double(), w.double())
    assert not winograd.applies(big.half(), w.half())
    assert not winograd.applies(big.bfloat16(), w)
    for no_amx in (True, False):  # bf16 only where its arithmetic is slow: no AMX
        monkeypatch.setattr(winograd, "_no_amx", lambda no_amx=no_amx: no_amx)
        assert winograd.applies(big.bfloat16(), w.bfloat16()) == no_amx
        with torch.autocast("cpu", dtype=torch.bfloat16):  # conv2d runs in bf16 there
            assert winograd.applies(big, w) == no_amx
            assert not winograd.applies(torch.zeros(3, 128, 16, 16), w, grad=True)
        with torch.autocast("cpu", dtype=torch.float16):
            assert not winograd.applies(big, w)
    switches(winograd=False)
    assert not winograd.applies(big, w)


def test_narrower_bfloat16_layers_round_only_without_amx(monkeypatch, switches):
    # 32+ input channels, 8x8 and larger: where Winograd declines, float32 arithmetic still wins
    monkeypatch.setattr(winograd, "_no_amx", lambda: True)
    w = torch.zeros(64, 64, 3, 3).bfloat16()
    for x in (torch.zeros(16, 64, 16, 16), torch.zeros(1, 64, 8, 9)):  # any batch
        assert winograd.rounds_in_float32(x.bfloat16(), w)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts float32 to bf16
            assert winograd.rounds_in_float32(x, w.float())
    assert winograd.rounds_in_float32(torch.zeros(2, 32, 8, 8).bfloat16(), w[:, :32])
    assert winograd.rounds_in_float32(torch.zeros(2, 64, 8, 8).bfloat16(), w[:3])  # to 3 ch
    assert not winograd.rounds_in_float32(torch.zeros(2, 16, 8, 8).bfloat16(), w[:, :16])
    assert not winograd.rounds_in_float32(torch.zeros(2, 3, 8, 8).bfloat16(), w[:, :3])
    assert not winograd.rounds_in_float32(torch.zeros(2, 64, 4, 4).bfloat16(), w)
    assert not winograd.rounds_in_float32(torch.zeros(2, 64, 8, 8), w.float())  # float32
    assert not winograd.rounds_in_float32(torch.zeros(2, 64, 8, 8).half(), w.half())
    with torch.autocast("cpu", dtype=torch.float16):
        assert not winograd.rounds_in_float32(torch.zeros(2, 64, 8, 8), w.float())
    monkeypatch.setattr(winograd, "compiling", lambda: True)
    assert not winograd.rounds_in_float32(torch.zeros(2, 64, 8, 8).bfloat16(), w)
    monkeypatch.setattr(winograd, "compiling", lambda: False)
    switches(winograd=False)
    assert not winograd.rounds_in_float32(torch.zeros(2, 64, 8, 8).bfloat16(), w)
    switches(winograd=True)
    monkeypatch.setattr(winograd, "_no_amx", lambda: False)  # AMX: torch's bf16 kernel is faster
    assert not winograd.rounds_in_float32(torch.zeros(2, 64, 8, 8).bfloat16(), w)


def random_unet(channels: int, channel_mult: tuple[int, ...]) -> UNet:
    config = ModelConfig(image_size=(16, 16), channels=channels, channel_mult=channel_mult,
                         num_res_blocks=1, attention_resolutions=(), dropout=0.0)  # fmt: skip
    torch.manual_seed(0)
    model = UNet(config, kernels=FAST)  # the path, on any CPU (policy.default_policy)
    for p in model.parameters():  # zero-initialised layers would hide a wrong convolution
        torch.nn.init.normal_(p, std=0.05)
    return model


def wide_unet() -> UNet:
    return random_unet(128, (1,))


def bf16_training_errors(monkeypatch, switches, model: UNet) -> tuple[list, list, list]:
    """A training step under CPU bf16 autocast on a CPU without AMX (forced, so that any CPU
    runs it): the errors against float64 of the output and of every parameter's gradient, with
    torch's kernels (the winograd switch off) and with ddpm's, and the keyword arguments of each
    conv3x3 call ddpm's made. Parameters whose exact gradient is zero are left out (with one
    channel per group, GroupNorm cancels conv1's bias and the time embedding's shift)."""
    monkeypatch.setattr(winograd, "_no_amx", lambda: True)
    x, t = torch.randn(4, 3, 16, 16), torch.tensor([3, 700, 20, 999])  # 64 tiles: trains
    calls = []
    real = winograd.conv3x3
    monkeypatch.setattr(winograd, "conv3x3", lambda *a, **k: calls.append(k) or real(*a, **k))
    ref_model = copy.deepcopy(model).double()
    ref = ref_model(x.double(), t)
    ref.square().mean().backward()
    ref_grads = [p.grad for p in ref_model.parameters()]
    nonzero = [g.abs().max() > 1e-12 for g in ref_grads]
    assert sum(nonzero) > len(ref_grads) // 2

    def errors(on: bool) -> list[float]:
        switches(winograd=on)
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, t)
        out.float().square().mean().backward()
        grads = [p.grad for p in model.parameters()]
        pairs = zip(grads, ref_grads, nonzero, strict=True)
        return [rel(out, ref)] + [rel(a, b) for a, b, keep in pairs if keep]

    torchs = errors(False)
    assert not calls
    return torchs, errors(True), calls


def test_narrow_bf16_autocast_training_rounds_as_close_as_torch_bf16(monkeypatch, switches):
    # the small preset's layers (32-64 channels) under --precision bf16, without AMX (forced)
    model = random_unet(32, (1, 2))
    torchs, mine, calls = bf16_training_errors(monkeypatch, switches, model)
    # every 3x3 convolution but conv_in (3 input channels) and those at 4x4 (none here)
    narrow = [m for m in model.modules() if isinstance(m, Conv3x3) and m.in_channels >= 32]
    assert calls == [{"direct": True}] * len(narrow) and len(narrow) == 18
    assert max(torchs) < 0.1
    assert max(mine) < 1.5 * max(torchs)
    assert statistics.median(mine) < 1.5 * statistics.median(torchs)


def test_unet_uses_it_and_keeps_the_network_function(monkeypatch):
    model = wide_unet()
    x, t = torch.randn(4, 3, 16, 16), torch.tensor([3, 700, 20, 999])  # 64 tiles: trains
    calls = []
    real = winograd.conv3x3
    monkeypatch.setattr(winograd, "conv3x3", lambda *a: calls.append(1) or real(*a))

    def run(model, x):
        model.zero_grad()
        out = model(x, t)
        out.square().mean().backward()
        return out, [p.grad for p in model.parameters()]

    out, grads = run(model, x)
    # every 3x3 convolution in the residual blocks; conv_in and conv_out have 3 channels
    big = [
        m
        for m in model.modules()
        if isinstance(m, Conv3x3) and min(m.in_channels, m.out_channels) >= 128
    ]
    assert len(calls) == len(big) == 10
    ref, ref_grads = run(model.double(), x.double())
    assert rel(out, ref) < 1e-5
    for mine, theirs in zip(grads, ref_grads, strict=True):
        assert rel(mine, theirs) < 1e-4


def test_bf16_autocast_training_uses_it_as_close_as_torch_bf16(monkeypatch, switches):
    # ddpm train --precision bf16 on a CPU without AMX
    direct, mine, calls = bf16_training_errors(monkeypatch, switches, wide_unet())
    assert calls == [{}] * 10 + [{"direct": True}]  # conv_out, 128 -> 3 channels, rounds
    assert max(direct) < 0.1
    assert max(mine) < 1.5 * max(direct)
    assert statistics.median(mine) < 1.5 * statistics.median(direct)


def test_bf16_rule_follows_the_cpus_amx(monkeypatch):
    # device.cpu_has_amx asks torch (tests/test_device.py); unknown (ARM, old torch) is not "no"
    for amx, no_amx in ((True, False), (False, True), (None, False)):
        monkeypatch.setattr(winograd, "cpu_has_amx", lambda amx=amx: amx)
        assert winograd._no_amx() is no_amx


@pytest.mark.parametrize("how", ["bf16 weights", "autocast"])
def test_bf16_inference_keeps_float32_filters_of_the_rounded_weights(monkeypatch, how):
    # bf16 weights: ddpm sample --precision bf16; autocast: a library caller's bf16 inference
    monkeypatch.setattr(winograd, "_no_amx", lambda: True)
    model = wide_unet().eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([5, 600])
    if how == "bf16 weights":
        model, x = model.to(torch.bfloat16), x.bfloat16()
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=how == "autocast")
    with torch.no_grad(), amp:
        every_call = model(x, t)
        with winograd.keep_filters():
            assert torch.equal(model(x, t), every_call)
            kept = [u for _, u in winograd._kept.values()]
    assert len(kept) == 10 and {u.dtype for u in kept} == {torch.float32}
    assert every_call.dtype == torch.bfloat16


def test_float64_under_autocast_stays_float64():
    # autocast does not cast float64, so neither does conv3x3
    x, w = torch.randn(1, 4, 6, 6, dtype=torch.float64), torch.randn(2, 4, 3, 3).double()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = winograd.conv3x3(x, w, None)
    assert out.dtype == torch.float64
    assert rel(out, F.conv2d(x, w, None, padding=1)) < 1e-12


def test_an_image_does_not_depend_on_its_batch():
    # ddpm sample's promise (docs/sampling.md): image k is the same bytes at any -n/--batch-size
    x = torch.randn(5, 128, 16, 12).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(128, 128, 3, 3) * 0.05, torch.randn(128)
    filters = winograd.filters(weight)
    with torch.no_grad():
        together = winograd.conv3x3(x, weight, bias, filters)
        for k in range(5):
            alone = winograd.conv3x3(x[k : k + 1], weight, bias, filters)[0]
            assert torch.equal(alone, together[k])
            assert torch.equal(winograd.conv3x3(x[k : k + 1], weight, bias)[0], alone)


def test_sampling_keeps_filters_only_inside_keep_filters(monkeypatch):
    model = wide_unet().eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([5, 600])
    made = []
    real = winograd.filters
    monkeypatch.setattr(winograd, "filters", lambda *a, **k: made.append(1) or real(*a, **k))
    with torch.no_grad():
        with winograd.keep_filters():
            first = model(x, t)
            assert torch.equal(model(x, t), first)
        assert len(made) == 10  # once per wide layer, not per call
        model(x, t)
        assert len(made) == 20  # outside, at every call


def agrees(model: UNet, x: torch.Tensor, t: torch.Tensor) -> bool:
    with torch.no_grad():
        inference = model(x, t)
    # with gradients, at 32 tiles, every layer runs torch's direct convolution on today's weights.
    # Winograd's float32 rounding differs from it by about 1e-6 (it varies with the CPU's
    # kernels); stale filters of the one layer changed below would show as 6e-3, of all as 1.
    return rel(inference, model(x, t).detach().double()) < 2e-5


def test_inference_sees_every_change_of_the_weights():
    # fused Adam on the CPU and writes through .data do not bump the version counter
    model = wide_unet().eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([5, 600])
    with winograd.keep_filters(), torch.no_grad():
        model(x, t)
    opt = Adam(model.parameters(), 0.1)  # fused on the CPU
    model(x, t).square().mean().backward()
    opt.step()
    assert agrees(model, x, t)
    model.mid_res1.conv1.weight.data.mul_(3.0)
    assert agrees(model, x, t)
    with torch.inference_mode(), winograd.keep_filters():  # the weights as inference tensors
        out = model(x, t)
    assert rel(out, model(x, t).detach().double()) < 2e-5


def test_compiled_networks_keep_torch_convolution():
    conv = Conv3x3(128, 128)
    x = torch.randn(2, 128, 8, 8)
    compiled = torch.compile(conv, backend="aot_eager")
    with torch.no_grad():
        assert (
            rel(
                compiled(x),
                F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1),
            )
            < 1e-5
        )
    x = torch.randn(4, 128, 16, 16)
    compiled(x).sum().backward()
    w64 = conv.weight.detach().double().requires_grad_()
    F.conv2d(x.double(), w64, conv.bias.detach().double(), padding=1).sum().backward()
    assert rel(conv.weight.grad, w64.grad) < 1e-5
