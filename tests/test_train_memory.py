"""What trades memory for compute in a training step: --grad-accum (the same update as one
full batch) and --grad-checkpoint (the same gradients, fewer activations kept)."""

from __future__ import annotations

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

    def losses(model, tables, x0, t, eps, objective, gamma, y=None):
        x0 = x0.double()
        key = (x0.flatten(1) * torch.arange(1, x0[0].numel() + 1, dtype=torch.float64)).sum(1)
        t = (key.abs() * 1e3).long() % T
        eps = torch.sin(x0 * 7.3 + key.view(-1, 1, 1, 1))
        return real(model, tables, x0, t, eps, objective, gamma, y)

    monkeypatch.setattr(train_mod, "training_losses", losses)


def float64_state(config: TrainConfig, preset="tiny", size=(8, 8)):
    state = new_state(build_model_config(preset, size, 3), config, CPU)
    state.model.double()
    state.ema.double()
    state.optimizer = torch.optim.Adam(state.model.parameters(), lr=config.lr, foreach=True)
    return state


def test_grad_accum_gives_the_update_of_one_full_batch(monkeypatch):
    fixed_noise(monkeypatch)
    tables = DiffusionTables.from_config(DiffusionConfig(timesteps=T))  # float64
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (8, 3, 8, 8), generator=g, dtype=torch.uint8)
    base = dict(preset="tiny", image_size=8, batch_size=8, device="cpu", seed=4, lr=1e-3,
                warmup_steps=1, precision="fp32", grad_clip=1e9)  # fmt: skip

    def flat(model):
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    params = {}
    for accum, micro in ((1, [images]), (2, list(images.split(4))), (3, list(images.split(3)))):
        state = float64_state(TrainConfig(**base, grad_accum=accum))
        before = flat(state.model)
        train_step(state, micro, tables, TrainConfig(**base, grad_accum=accum), CPU, state.model)
        params[accum] = flat(state.model)
        assert (params[accum] - before).abs().max() > 1e-4  # the step moved the weights
    for accum in (2, 3):  # uneven micro-batches (3, 3, 2) too
        assert (params[accum] - params[1]).abs().max() < 1e-5


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
