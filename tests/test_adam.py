"""ddpm's Adam: Kingma & Ba's algorithm in float64, torch.optim.Adam to the bit, its state_dict
both ways, the grad scaler, and a training start that never loads torch's compiler."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from PIL import Image

from ddpm_cli.training.adam import Adam, fused_available

LRS = [1e-3, 3e-3, 2e-2, 5e-3, 1e-4, 1e-3]  # changed every step, as warm-up and cooldown do
NO_FUSED = not fused_available(torch.device("cpu"))
KERNELS = [False, pytest.param(True, marks=pytest.mark.skipif(
    NO_FUSED, reason="this torch has no fused Adam for the CPU"))]  # fmt: skip


def net() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(8, 3, 3, padding=1)
    )
    return model.to(memory_format=torch.channels_last)  # moments must follow this layout


def grads(model: torch.nn.Module, i: int) -> None:
    g = torch.Generator().manual_seed(i)
    for p in model.parameters():  # in the weight's layout, as autograd makes gradients
        p.grad = torch.empty_like(p).copy_(torch.randn(p.shape, generator=g) * 10.0 ** (i % 3 - 1))


def train(model, optimizer, steps: range) -> None:
    for i in steps:
        grads(model, i)
        for group in optimizer.param_groups:
            group["lr"] = LRS[i % len(LRS)]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def flat(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("fused", KERNELS)
def test_steps_follow_kingma_and_ba_in_float64(fused):
    model = net()
    start = [p.detach().double().clone() for p in model.parameters()]
    train(model, Adam(model.parameters(), LRS[0], fused=fused), range(6))
    expected = reference(start, model)
    assert torch.allclose(flat(model).double(), expected, rtol=0, atol=1e-6)
    moved = (expected - torch.cat([t.flatten() for t in start])).abs()
    assert moved.max() > 1e-2  # the steps are large enough for a wrong update to show


def reference(start: list[torch.Tensor], model) -> torch.Tensor:
    """Algorithm 1 of Kingma & Ba (2015) in float64, fed the gradients that grads() draws."""
    b1, b2, eps = 0.9, 0.999, 1e-8
    theta = [t.clone() for t in start]
    m = [torch.zeros_like(t) for t in theta]
    v = [torch.zeros_like(t) for t in theta]
    for i in range(6):
        grads(model, i)  # the same float32 draws, in the same order
        for j, p in enumerate(model.parameters()):
            g = p.grad.double()
            m[j] = b1 * m[j] + (1 - b1) * g
            v[j] = b2 * v[j] + (1 - b2) * g * g
            m_hat, v_hat = m[j] / (1 - b1 ** (i + 1)), v[j] / (1 - b2 ** (i + 1))
            theta[j] = theta[j] - LRS[i] * m_hat / (v_hat.sqrt() + eps)
    model.zero_grad(set_to_none=True)
    return torch.cat([t.flatten() for t in theta])


@pytest.mark.parametrize("fused", KERNELS)
def test_the_same_bits_as_torch_optim_adam(fused):
    ours, theirs = net(), net()
    train(ours, Adam(ours.parameters(), LRS[0], fused=fused), range(6))
    kernel = {"fused": True} if fused else {"foreach": True}
    train(theirs, torch.optim.Adam(theirs.parameters(), LRS[0], **kernel), range(6))
    assert torch.equal(flat(ours), flat(theirs))


@pytest.mark.parametrize("fused", KERNELS)
def test_state_dicts_load_both_ways_with_torch_optim_adam(fused):
    """A train state saved before ddpm had its own Adam resumes here, and the other way."""
    kernel = {"fused": True} if fused else {"foreach": True}
    a, b = net(), net()
    theirs = torch.optim.Adam(a.parameters(), LRS[0], **kernel)
    ours = Adam(b.parameters(), LRS[0], fused=fused)
    train(a, theirs, range(3))
    train(b, ours, range(3))
    assert torch.equal(flat(a), flat(b))
    saved_theirs, saved_ours = theirs.state_dict(), ours.state_dict()
    shared = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "params")
    ours_g, theirs_g = saved_ours["param_groups"][0], saved_theirs["param_groups"][0]
    assert {k: ours_g[k] for k in shared} == {k: theirs_g[k] for k in shared}
    # cross over: ours continues from torch's state, torch's from ours
    ours2 = Adam(a.parameters(), 1.0, fused=fused)
    theirs2 = torch.optim.Adam(b.parameters(), 1.0, **kernel)
    ours2.load_state_dict(saved_theirs)
    theirs2.load_state_dict(saved_ours)
    train(a, ours2, range(3, 6))
    train(b, theirs2, range(3, 6))
    assert torch.equal(flat(a), flat(b))
    assert ours2.param_groups[0]["betas"] == (0.9, 0.999)


def test_loading_keeps_this_machines_kernel_and_the_weights_layout():
    model = net()
    saved = Adam(model.parameters(), 1e-3, fused=False)
    train(model, saved, range(2))
    sd = {"state": {i: {k: v.contiguous() for k, v in s.items()}  # as train_state saves them
                    for i, s in saved.state_dict()["state"].items()},
          "param_groups": saved.state_dict()["param_groups"]}  # fmt: skip
    loaded = Adam(model.parameters(), 1.0, fused=True)
    loaded.load_state_dict(sd)
    group = loaded.param_groups[0]
    assert group["fused"] and not group["foreach"] and group["lr"] == LRS[1]
    for p in model.parameters():
        for name in ("exp_avg", "exp_avg_sq"):
            assert loaded.state[p][name].stride() == p.stride()
            assert torch.equal(loaded.state[p][name], saved.state[p][name])
        assert loaded.state[p]["step"].item() == 2


def test_states_that_do_not_fit_are_refused():
    model = net()
    opt = Adam(model.parameters(), 1e-3)
    train(model, opt, range(1))
    good = opt.state_dict()
    fewer = {"state": {}, "param_groups": [{**good["param_groups"][0], "params": [0, 1]}]}
    with pytest.raises(ValueError, match="2 parameters saved, the model has 4"):
        Adam(model.parameters(), 1e-3).load_state_dict(fewer)
    shapes = {"state": {0: {**good["state"][0], "exp_avg": torch.zeros(3)}},
              "param_groups": good["param_groups"]}  # fmt: skip
    with pytest.raises(ValueError, match=r"exp_avg of shape \(3,\)"):
        Adam(model.parameters(), 1e-3).load_state_dict(shapes)
    amsgrad = {"state": {}, "param_groups": [{**good["param_groups"][0], "amsgrad": True}]}
    with pytest.raises(ValueError, match="amsgrad=True"):
        Adam(model.parameters(), 1e-3).load_state_dict(amsgrad)
    with pytest.raises(KeyError):
        no_moments = {"state": {0: {"step": 1}}, "param_groups": good["param_groups"]}
        Adam(model.parameters(), 1e-3).load_state_dict(no_moments)


@pytest.mark.parametrize("fused", KERNELS)
def test_the_grad_scaler_skips_overflowed_steps_and_unscales_the_rest(fused):
    """Unfused, the scaler skips step(); fused, it hands the kernel its overflow flag (no wait
    for the device), and the kernel leaves weights, moments and the step count as they were."""
    scaled, plain = net(), net()
    opt = Adam(scaled.parameters(), 1e-2, fused=fused)
    assert getattr(opt, "_step_supports_amp_scaling", False) == fused
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    before = flat(scaled).clone()
    scaler.scale(scaled(x).square().mean()).backward()
    next(scaled.parameters()).grad[0, 0, 0, 0] = float("inf")
    scaler.unscale_(opt)  # as the training step does, before clipping
    scaler.step(opt)
    scaler.update()
    assert torch.equal(flat(scaled), before)  # skipped; the scale halved
    assert all(s["step"].item() == 0 and not s["exp_avg"].any() for s in opt.state.values())
    assert scaler.get_scale() == 512.0
    opt.zero_grad()
    scaler.scale(scaled(x).square().mean()).backward()
    scaler.step(opt)  # unscales (by a power of 2: exactly), then steps
    scaler.update()
    reference_opt = Adam(plain.parameters(), 1e-2, fused=fused)
    plain(x).square().mean().backward()
    reference_opt.step()
    assert torch.equal(flat(scaled), flat(plain)) and not torch.equal(flat(plain), before)


def test_a_training_run_and_its_grid_never_load_torchs_compiler(tmp_path):
    """torch.optim and torchvision import torch._dynamo (2-3 s of every start on 2 cores)."""
    pics = tmp_path / "pics"
    pics.mkdir()
    for i in range(8):
        Image.new("RGB", (8, 8), (40 * i, 255 - 30 * i, 90)).save(pics / f"{i}.png")
    script = (
        "import sys\n"
        "from ddpm_cli.cli import main\n"
        "pics, run, grid = sys.argv[1:]\n"
        "for argv in (['train', pics, '--steps', '2', '--preset', 'tiny', '-o', run],\n"
        "             ['sample', run, '-n', '4', '--steps', '2', '--grid', grid]):\n"
        "    sys.argv = ['ddpm', *argv]\n"
        "    try:\n"
        "        main()\n"
        "    except SystemExit as e:\n"
        "        assert not e.code, e.code\n"
        "print(sorted(m for m in sys.modules if m.startswith(('torch._dynamo', 'torchvision'))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(pics), str(tmp_path / "run"), str(tmp_path / "g.png")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
    assert (tmp_path / "g.png").exists() and (tmp_path / "run" / "samples").is_dir()
