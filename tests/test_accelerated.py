"""The accelerator paths: steps that never wait for the device, images resident on the GPU,
CUDA graphs for sampling, the noise generator on the GPU. The CUDA tests run where CUDA exists
(CI has none; they ran on an H100, docs/benchmarks.md); the logic under them is also checked on
the CPU here."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from conftest import draw_shapes, poison_losses
from ddpm_cli.config import DiffusionConfig, Precision, TrainConfig
from ddpm_cli.data.batches import Batches
from ddpm_cli.data.folders import InMemory
from ddpm_cli.training.run import train
from ddpm_cli.training.train import StepResult, TrainingDiverged, check_finite, to_host

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def result(step: int, losses: list[float], norm: float) -> StepResult:
    n = len(losses)
    return StepResult(step, torch.tensor(losses), torch.arange(n), torch.tensor(norm))


def test_to_host_keeps_every_step_apart():
    results = [result(1, [0.5, 0.25], 1.0), result(2, [2.0, 4.0, 8.0], 3.0)]
    host = to_host(results)
    assert [r.step for r in host] == [1, 2]
    assert host[1].losses.tolist() == [2.0, 4.0, 8.0] and host[1].t.tolist() == [0, 1, 2]
    assert float(host[0].grad_norm) == 1.0 and host[1].loss == pytest.approx(14 / 3)


def test_check_finite_names_the_first_bad_step():
    config = TrainConfig(lr=1e-3)
    good, nan_loss = result(1, [0.1], 1.0), result(2, [float("nan")], 1.0)
    inf_norm = result(3, [0.1], float("inf"))
    check_finite([good], config)
    with pytest.raises(TrainingDiverged, match="loss became non-finite at step 2"):
        check_finite([good, nan_loss, inf_norm], config)
    with pytest.raises(TrainingDiverged, match="gradient norm became non-finite at step 3"):
        check_finite([good, inf_norm], config)
    # under fp16 the grad scaler skips steps whose gradients overflowed: not a divergence
    check_finite([good, inf_norm], TrainConfig(precision=Precision.fp16))


def tiny_run(tmp_path):
    """A 2-step CPU run of the tiny preset on 8 drawn images: (its TrainConfig, its directory)."""
    (tmp_path / "pics").mkdir()
    for i in range(8):
        draw_shapes((12 + i, 12)).save(tmp_path / "pics" / f"{i}.png")
    cfg = TrainConfig(preset="tiny", image_size=8, batch_size=4, device="cpu", seed=1, steps=2,
                      sample_every=0, log_every=1)  # fmt: skip
    return cfg, train(str(tmp_path / "pics"), cfg, DiffusionConfig(), tmp_path / "run").out


def test_a_run_resumed_on_another_kind_of_device_reseeds_its_noise(tmp_path):
    """A train state whose noise generator came from the other kind of device (CUDA's is 16
    bytes, the CPU's 5056) continues with fresh, seeded draws instead of failing."""
    from ddpm_cli.store.checkpoint import load_checkpoint, save_checkpoint

    cfg, out = tiny_run(tmp_path)
    state = out / "train_state.safetensors"
    ckpt = load_checkpoint(state)
    tensors = dict(ckpt.tensors)
    tensors["rng.noise"] = torch.zeros(16, dtype=torch.uint8)  # a CUDA generator's state
    meta = {k: v for k, v in ckpt.meta.items() if k != "content_hash"}
    save_checkpoint(state, tensors, "train_state", meta)
    done = train(None, TrainConfig(), DiffusionConfig(), resume=out, given={"steps": 4})
    assert done.step == 4 and done.loss is not None and done.loss == done.loss


def images(n: int = 10, size: int = 6) -> InMemory:
    g = torch.Generator().manual_seed(0)
    return InMemory(torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8))


def test_flips_are_a_selection_equal_to_masked_mirroring():
    b = Batches(images(), 4, seed=5, flip=True)
    for epoch in range(3):
        idx, fl, _ = b.indices(epoch, 0)
        expected = b.images.data[idx].clone()
        expected[fl] = expected[fl].flip(-1)
        assert torch.equal(b.batch(epoch, 0), expected)


@cuda
def test_resident_batches_equal_the_host_batches_byte_for_byte():
    host = Batches(images(), 4, seed=5, flip=True)
    gpu = Batches(images(), 4, seed=5, flip=True, device=torch.device("cuda"))
    assert gpu.resident is not None and gpu.resident.is_cuda
    a, b = host.iterate(0, 0), gpu.iterate(0, 0)
    for _ in range(7):  # past an epoch's end
        x, y = next(a)[0], next(b)[0]
        assert y.is_cuda and torch.equal(x, y.cpu())


@cuda
@pytest.mark.parametrize("precision", [Precision.fp32, Precision.bf16, Precision.fp16])
@pytest.mark.parametrize("classes", [(), ("a", "b")])
def test_cuda_graphs_replay_the_eager_network(precision, classes):
    from ddpm_cli.device import place
    from ddpm_cli.model.forward import GraphedForward, guided, network
    from ddpm_cli.model.presets import build_model_config
    from ddpm_cli.model.unet import UNet

    torch.manual_seed(0)
    model = UNet(build_model_config("tiny", (16, 16), 3, classes=classes))
    model = place(model, torch.device("cuda")).eval()  # channels_last weights, as sampling has
    for p in model.parameters():  # the zero-initialised layers would hide a wrong replay
        p.data.normal_(0, 0.05)
    graphed = network(model, torch.device("cuda"), precision, compile=False)
    assert isinstance(graphed, GraphedForward)
    net, eager = graphed, graphed.forward
    if classes:  # guided: three inputs to the graph, a batch of two halves
        y = torch.tensor([0, 1, 1, 0, 1], device="cuda")
        net, eager = guided(graphed, y, 2.0, 2), guided(graphed.forward, y, 2.0, 2)
    with torch.no_grad():
        for _ in range(3):  # fresh inputs each time: the graph reads them, not stale copies
            x = torch.randn(5, 3, 16, 16, device="cuda")
            t = torch.randint(0, 1000, (5,), device="cuda")
            out = net(x, t)
            again = net(torch.randn_like(x), t)
            ref = eager(x, t)
            assert not torch.equal(out, again)  # each call's own result, not a shared buffer
            assert (out - ref).norm() / ref.norm() < 1e-5
    assert len(graphed.graphs) == 1


@cuda
def test_a_cuda_run_logs_resumes_and_stops_on_nan(tmp_path, monkeypatch):
    """On CUDA: a run that waits for the device only every few steps still logs every step's
    loss; resumed from its checkpoint it draws the same t and eps as an uninterrupted run (the
    losses agree step by step, to the few percent by which Adam's first steps amplify the
    rounding of cuDNN's kernels, which are not bitwise deterministic; another seed is far off);
    and a NaN is caught before the next checkpoint."""
    from ddpm_cli.store.checkpoint import load_checkpoint

    (tmp_path / "pics").mkdir()
    for i in range(16):
        draw_shapes((16 + i, 16)).save(tmp_path / "pics" / f"{i}.png")
    cfg = dict(preset="tiny", image_size=16, batch_size=8, device="cuda", seed=2,
               sample_every=0, log_every=1, checkpoint_every=30, shift=0)  # fmt: skip
    runs = {}
    for name, seed in (("whole", 2), ("other", 3)):
        runs[name] = train(str(tmp_path / "pics"), TrainConfig(**{**cfg, "seed": seed}, steps=60),
                           DiffusionConfig(), tmp_path / name).out  # fmt: skip
    part = train(str(tmp_path / "pics"), TrainConfig(**cfg, steps=30), DiffusionConfig(),
                 tmp_path / "part").out  # fmt: skip
    train(None, TrainConfig(), DiffusionConfig(), resume=part, given={"steps": 60})

    def losses(run):
        return torch.tensor([json.loads(x)["loss"] for x in (run / "metrics.jsonl").open()])

    whole, resumed, other = losses(runs["whole"]), losses(part), losses(runs["other"])
    assert len(whole) == len(resumed) == 60
    assert torch.allclose(whole, resumed, rtol=5e-2)
    assert not torch.allclose(whole[30:], other[30:], rtol=1e-1)  # another draw is far off

    def distance(a, b):  # over all weights at once: zero-initialised layers are tiny and
        # carry most of Adam's amplified rounding, so they are not compared one by one
        a = load_checkpoint(a / "model.safetensors").tensors
        b = load_checkpoint(b / "model.safetensors").tensors
        a, b = torch.cat([a[k].flatten() for k in a]), torch.cat([b[k].flatten() for k in a])
        return float((a - b).norm() / a.norm())

    assert distance(runs["whole"], part) < 0.1 * distance(runs["whole"], runs["other"])

    poison_losses(monkeypatch, 37)
    with pytest.raises(TrainingDiverged, match="non-finite at step 37"):
        train(str(tmp_path / "pics"), TrainConfig(**{**cfg, "log_every": 20}, steps=60),
              DiffusionConfig(), tmp_path / "nan")  # fmt: skip
    ckpt = load_checkpoint(tmp_path / "nan" / "model.safetensors")
    assert ckpt.step == 30 and all(torch.isfinite(v).all() for v in ckpt.tensors.values())


def test_place_puts_weights_channels_last_and_training_keeps_them_so(tmp_path):
    """device.place lays 4-D weights out NHWC (the activations' layout), and a resumed run's
    Adam moments follow the weights (the fused kernel needs equal layouts; a saved moment is
    contiguous). Resuming bit for bit is test_train's; this checks the layouts themselves."""
    from ddpm_cli.config import ModelConfig
    from ddpm_cli.device import place
    from ddpm_cli.generation.sampling import load_for_sampling
    from ddpm_cli.model.unet import UNet
    from ddpm_cli.store.checkpoint import config_section, load_checkpoint
    from ddpm_cli.training.train import new_state, resolve
    from ddpm_cli.training.train_state import restore_state

    model = place(UNet(ModelConfig(channels=32, channel_mult=(1, 2))), "cpu")
    convs = [p for p in model.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert not all(p.is_contiguous() for p in convs)  # 3x3 kernels: the two layouts differ

    cfg, out = tiny_run(tmp_path)
    ckpt = load_checkpoint(out / "train_state.safetensors")
    config = resolve(cfg, torch.device("cpu"), 8, 3)
    state = new_state(config_section(ckpt, "model", ModelConfig), config, torch.device("cpu"))
    for model in (state.model, state.ema, load_for_sampling(out / "model.safetensors").model):
        convs = [p for p in model.parameters() if p.dim() == 4]
        assert all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    restore_state(state, ckpt, torch.device("cpu"))
    for p in state.model.parameters():
        for moment in ("exp_avg", "exp_avg_sq"):
            assert state.optimizer.state[p][moment].stride() == p.stride()


def test_bf16_sampling_runs_a_bf16_copy_close_to_float32():
    """forward.network at bf16 runs bf16 weights (not autocast) and leaves the model alone;
    its output is float32 and within bf16's rounding of the float32 network's."""
    from ddpm_cli.config import ModelConfig
    from ddpm_cli.device import place
    from ddpm_cli.model.forward import network
    from ddpm_cli.model.unet import UNet

    torch.manual_seed(0)
    model = place(UNet(ModelConfig(channels=32, channel_mult=(1, 2))), "cpu").eval()
    for p in model.parameters():  # the zero-initialised output layers would hide everything
        torch.nn.init.normal_(p, std=0.05)
    x, t = torch.randn(4, 3, 32, 32), torch.tensor([0, 10, 500, 999])
    with torch.no_grad():
        exact = model(x, t)
        seen = []  # the dtypes the first convolution computed with (the copy keeps the hook)
        model.conv_in.register_forward_hook(lambda m, i, o: seen.append((m.weight.dtype, o.dtype)))
        bf16 = network(model, torch.device("cpu"), Precision.bf16, compile=False)(x, t)
    assert seen == [(torch.bfloat16, torch.bfloat16)]
    assert bf16.dtype == torch.float32 and exact.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.parameters())
    error = float((bf16 - exact).norm() / exact.norm())
    assert 1e-4 < error < 2e-2  # bf16 arithmetic happened, and only bf16's rounding


def test_tune_allocator_stops_the_page_faults_of_large_tensors():
    """With glibc's defaults, every large tensor is mapped fresh from the kernel and its pages
    fault in again; host.tune_allocator keeps them (checked in fresh processes)."""
    import subprocess
    import sys

    if not sys.platform.startswith("linux"):
        pytest.skip("glibc's mallopt is Linux's")
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if thp.exists() and "[always]" in thp.read_text():
        pytest.skip("transparent huge pages fault 2 MiB at a time: too few faults to count")
    code = (
        "import resource, torch\n"
        "from ddpm_cli.host import tune_allocator\n"
        "print(tune_allocator())\n"
        "x = torch.randn(2**24)\n"  # 64 MiB: over glibc's largest automatic mmap threshold
        "for _ in range(3): y = x * 2; del y\n"  # warm up
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "for _ in range(20): y = x * 2; del y\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n"
    )
    faults = {}
    for tune in ("0", "1"):
        # THP_MEM_ALLOC_ENABLE=1 would have torch ask for huge pages (as above)
        env = {**os.environ, "DDPM_TUNE_MALLOC": tune, "THP_MEM_ALLOC_ENABLE": "0"}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, check=True).stdout.split()  # fmt: skip
        faults[tune] = (out[0], int(out[1]))
    assert faults["0"][0] == "False" and faults["1"][0] == "True"
    # 20 blocks of 64 MiB: 16,384 pages each when mapped fresh (fewer with huge pages). Kept,
    # none, except that now and then a small allocation lands in a freed block and the next
    # one comes from fresh pages (seen: 0 to 4 blocks of 20, in 12 runs)
    assert faults["0"][1] > 20 * 10_000 and faults["1"][1] < faults["0"][1] / 3, faults


def test_the_ddpm_process_tunes_the_allocator_before_running_a_command(monkeypatch, capsys):
    import ddpm_cli.cli as cli

    calls = []
    monkeypatch.setattr(cli, "tune_allocator", lambda: calls.append("tuned"))
    monkeypatch.setattr(cli, "app", lambda: calls.append("command"))
    cli.main()
    assert calls == ["tuned", "command"]
