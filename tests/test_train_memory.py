"""What trades memory for compute in a training step: --grad-accum (the same update as one
full batch) and --grad-checkpoint (the same gradients, fewer activations kept)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from ddpm_cli.config import DiffusionConfig, TrainConfig
from ddpm_cli.diffusion.schedules import DiffusionTables
from ddpm_cli.model.presets import build_model_config
from ddpm_cli.training import train as train_mod
from ddpm_cli.training.train import checkpoint_blocks, new_state, train_step

CPU = torch.device("cpu")
T = 1000


def fixed_noise(monkeypatch):
    """t and eps as functions of each image alone (not of its place in a micro-batch), in
    float64, so that any split of a batch sees the same per-image terms."""
    real = train_mod.training_losses

    def losses(model, tables, x0, t, eps, objective, gamma, y=None, augment=None):
        x0 = x0.double()
        key = (x0.flatten(1) * torch.arange(1, x0[0].numel() + 1, dtype=torch.float64)).sum(1)
        t = (key.abs() * 1e3).long() % T
        eps = torch.sin(x0 * 7.3 + key.view(-1, 1, 1, 1))
        return real(model, tables, x0, t, eps, objective, gamma, y, augment)

    monkeypatch.setattr(train_mod, "training_losses", losses)


def float64_state(config: TrainConfig, augment: int = 0):
    """A float64 tiny model whose optimizer is plain SGD: the step is lr times the gradient
    (Adam's first step is about lr times its sign, blind to the gradient's scale)."""
    model_config = replace(build_model_config("tiny", (8, 8), 3), augment=augment)
    state = new_state(model_config, config, CPU)
    state.model.double()
    state.ema.double()
    if augment:  # not zero, so that the maps change every gradient, not only the conv's own
        torch.nn.init.normal_(state.model.augment_in.weight, std=0.3)
    state.optimizer = torch.optim.SGD(state.model.parameters(), lr=config.lr)
    return state


@pytest.mark.parametrize("shift", [False, True])
def test_grad_accum_gives_the_update_of_one_full_batch(monkeypatch, shift):
    """With --shift, each micro-batch is told its own images' shifts."""
    fixed_noise(monkeypatch)
    tables = DiffusionTables.from_config(DiffusionConfig(timesteps=T))  # float64
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (8, 3, 8, 8), generator=g, dtype=torch.uint8)
    shifts = torch.randint(-2, 3, (8, 2), generator=g) if shift else None
    base = dict(preset="tiny", image_size=8, batch_size=8, device="cpu", seed=4, lr=0.1,
                warmup_steps=1, precision="fp32", grad_clip=1e9)  # fmt: skip

    def flat(model):
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    def step(accum, maps):
        config = TrainConfig(**base, grad_accum=accum)
        state = float64_state(config, augment=int(shift))
        before = flat(state.model)
        micro = list(images.tensor_split(accum))
        train_step(state, micro, tables, config, CPU, state.model, shifts=maps)
        assert (flat(state.model) - before).abs().max() > 1e-4  # the step moved the weights
        return flat(state.model)

    split = (lambda k, s: list(s.tensor_split(k))) if shift else (lambda k, s: None)
    full = step(1, split(1, shifts))
    for accum in (2, 3):  # uneven micro-batches (3, 3, 2) too
        assert (step(accum, split(accum, shifts)) - full).abs().max() < 1e-9
    if shift:  # the maps count: the first micro-batch's shifts for all of them differ
        wrong = [shifts[: len(m)] for m in shifts.tensor_split(2)]
        assert (step(2, wrong) - full).abs().max() > 1e-6


def test_grad_checkpoint_gives_the_same_gradients_and_keeps_fewer_activations():
    """The same loss and gradients (dropout included: the medium preset's 0.1), and far fewer
    bytes saved for the backward pass, counted by autograd's saved-tensor hooks."""
    config = TrainConfig(preset="medium", seed=2, lr=1e-3)
    model_config = build_model_config("medium", (16, 16), 3)
    tables = DiffusionTables.from_config(DiffusionConfig()).to(CPU, torch.float32)
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(4, 3, 16, 16, generator=g) * 2 - 1
    t = torch.randint(0, T, (4,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    results = {}
    for checkpointed in (False, True):
        state = new_state(model_config, config, CPU)
        if checkpointed:
            checkpoint_blocks(state.model)
        saved = []

        def pack(tensor, saved=saved):
            saved.append(tensor.numel() * tensor.element_size())
            return tensor

        torch.manual_seed(9)  # dropout
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = train_mod.training_losses(state.model, tables, x0, t, eps, "v").mean()
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in state.model.parameters()])
        results[checkpointed] = (loss.detach(), grads, sum(saved))
    (loss_a, grads_a, bytes_a), (loss_b, grads_b, bytes_b) = results[False], results[True]
    assert torch.equal(loss_a, loss_b)
    assert torch.allclose(grads_a, grads_b, rtol=1e-5, atol=1e-7)
    assert bytes_b < 0.5 * bytes_a, (bytes_a, bytes_b)


# ---- the pre-flight figure and the batch fitted to it (training/memory.py) --------------------


MEASURE = """
import json, torch
from ddpm_cli.config import DiffusionConfig, TrainConfig
from ddpm_cli.diffusion.schedules import DiffusionTables
from ddpm_cli.model.presets import build_model_config
from ddpm_cli.training import memory
from ddpm_cli.training.train import new_state, train_step
cpu = torch.device("cpu")
config = TrainConfig(preset="small", batch_size=32, seed=0, lr=1e-4, warmup_steps=1,
                     precision="fp32")
state = new_state(build_model_config("small", (32, 32), 3), config, cpu)
tables = DiffusionTables.from_config(DiffusionConfig()).to(cpu, torch.float32)
base = memory._in_use(cpu)
step = memory.measure(state.model, state.optimizer, tables, config, cpu, 0, (3, 32, 32))
memory._reset_peak(cpu)
train_step(state, [torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8)], tables, config,
           cpu, state.model)
print(json.dumps({"need": step.need(32), "actual": memory._peak(cpu) - base}))
"""


def test_the_step_figure_matches_the_peak_of_a_real_step():
    """In a fresh process, as a run starts: the figure against the process's peak resident
    memory during a real step, both above what it held before the probe."""
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", MEASURE], capture_output=True, text=True,
                         check=True)  # fmt: skip
    r = json.loads(out.stdout)
    assert 0.8 * r["actual"] < r["need"] < 1.6 * r["actual"], r


def test_the_probe_leaves_weights_gradients_and_random_state_as_they_were():
    from ddpm_cli.training import memory

    config = TrainConfig(preset="tiny", batch_size=8, seed=0, lr=1e-4, precision="fp32")
    state = new_state(build_model_config("tiny", (8, 8), 3), config, CPU)
    tables = DiffusionTables.from_config(DiffusionConfig()).to(CPU, torch.float32)
    weights = [p.detach().clone() for p in state.model.parameters()]
    rng = torch.get_rng_state()
    step = memory.measure(state.model, state.optimizer, tables, config, CPU, 0, (3, 8, 8))
    assert torch.equal(torch.get_rng_state(), rng)  # dropout's random numbers are untouched
    assert all(torch.equal(p, w) for p, w in zip(state.model.parameters(), weights, strict=True))
    assert all(p.grad is None for p in state.model.parameters())
    assert step.per_image > 0 and step.need(2) < step.need(8)


def test_fit_batch_splits_a_batch_that_does_not_fit_into_micro_batches():
    from ddpm_cli.training.memory import HEADROOM, StepMemory, fit_batch

    config = TrainConfig(batch_size=32)
    roomy = StepMemory(fixed=100, per_image=10, available=10**9)
    assert fit_batch(roomy, config, True) == (config, None, None)
    assert fit_batch(None, config, True) == (config, None, None)  # not measured: as given
    tight = StepMemory(fixed=100, per_image=10, available=int(200 / HEADROOM) + 1)  # 10 fit
    fitted, note, warning = fit_batch(tight, config, True)
    assert (fitted.batch_size, fitted.grad_accum) == (8, 4) and warning is None
    assert "4 micro-batches of 8 (--grad-accum 4), the same update" in note
    kept, note, warning = fit_batch(tight, config, False)  # --grad-accum given, or a resume
    assert kept == config and note is None and "may run out of memory" in warning
    hopeless = StepMemory(fixed=10**6, per_image=10, available=1000)
    assert fit_batch(hopeless, config, True)[0] == config
    three = StepMemory(fixed=100, per_image=10, available=int(130 / HEADROOM) + 1)
    odd = fit_batch(three, TrainConfig(batch_size=7), True)[0]  # 7 is prime: 7 of 1
    assert (odd.batch_size, odd.grad_accum) == (1, 7)


def test_a_run_chooses_grad_accum_itself_when_the_batch_does_not_fit(tmp_path, monkeypatch):
    from conftest import train_tiny
    from ddpm_cli.store.checkpoint import load_checkpoint
    from ddpm_cli.training import memory

    real = memory.measure
    monkeypatch.setattr(memory, "measure", lambda *a: memory.StepMemory(100, 10, 10**9))
    roomy = train_tiny(tmp_path, 8, steps=2, batch_size=8)
    monkeypatch.setattr(memory, "measure", lambda *a: memory.StepMemory(100, 10, 160))
    (tmp_path / "b").mkdir()
    tight = train_tiny(tmp_path / "b", 8, steps=2, batch_size=8)
    stored = load_checkpoint(tight / "model.safetensors").config["training"]
    assert (stored["batch_size"], stored["grad_accum"]) == (2, 4)
    # the same images per step (the update of one full batch: test above), so the same epochs
    states = [load_checkpoint(r / "train_state.safetensors") for r in (roomy, tight)]
    assert [s.json("epoch") for s in states] == [2, 2]
    a = load_checkpoint(roomy / "model.safetensors").tensors
    monkeypatch.setattr(memory, "measure", real)
    # the probe leaves no trace: a run with it trains as one without it
    (tmp_path / "c").mkdir()
    probed = load_checkpoint(train_tiny(tmp_path / "c", 8, steps=2, batch_size=8)
                             / "model.safetensors").tensors  # fmt: skip
    assert all(torch.equal(a[k], probed[k]) for k in a)


def test_available_memory_honours_a_cgroup_limit(tmp_path, monkeypatch):
    from ddpm_cli import device, host

    files = {n: tmp_path / n for n in ("max", "current", "stat")}
    monkeypatch.setattr(host, "CGROUP_FILES", (
        (str(files["max"]), str(files["current"]), str(files["stat"]), "inactive_file"),
    ))  # fmt: skip
    files["max"].write_text("1000000000\n")
    files["current"].write_text("600000000\n")
    files["stat"].write_text("anon 500000000\ninactive_file 100000000\n")
    assert host._cgroup_available() == 500_000_000  # the file cache counts as free
    monkeypatch.setattr(host, "_meminfo_available", lambda: 10**12)
    assert device.available_memory() == 500_000_000
    files["max"].write_text("max\n")
    assert host._cgroup_available() is None and device.available_memory() == 10**12
    # a torchrun job's processes on one machine share it (each holds its data and its step)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert device.available_memory() == 10**12 // 4
    files["max"].write_text("1000000000\n")
    assert device.available_memory() == 500_000_000 // 4
