"""Device selection with the machine's devices faked, and seeded noise."""

from __future__ import annotations

import pytest
import torch

from ddpm_cli import device as dev
from ddpm_cli.errors import DeviceError


@pytest.fixture
def machine(monkeypatch):
    """Pretend this machine has `cuda` CUDA devices and MPS or not."""

    def fake(cuda: int = 0, mps: bool = False) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda)
        monkeypatch.setattr(dev, "_mps_available", lambda: mps)

    return fake


def test_auto_prefers_cuda_then_mps_then_cpu(machine):
    machine(cuda=2, mps=True)
    assert dev.resolve_device("auto") == torch.device("cuda", 0)
    machine(cuda=0, mps=True)
    assert dev.resolve_device("auto") == torch.device("mps")
    machine(cuda=0, mps=False)
    assert dev.resolve_device("auto") == torch.device("cpu")
    assert dev.resolve_device(" AUTO ") == torch.device("cpu")


def test_explicit_devices_that_exist(machine):
    machine(cuda=2, mps=True)
    assert dev.resolve_device("cpu") == torch.device("cpu")
    assert dev.resolve_device("cuda") == torch.device("cuda", 0)
    assert dev.resolve_device("cuda:1") == torch.device("cuda", 1)
    assert dev.resolve_device("mps") == torch.device("mps")
    assert dev.available_devices() == ["cuda:0", "cuda:1", "mps", "cpu"]


def test_absent_devices_name_what_is_available(machine):
    machine(cuda=0, mps=False)
    with pytest.raises(DeviceError, match=r"CUDA is not available \(available: cpu\)"):
        dev.resolve_device("cuda")
    with pytest.raises(DeviceError, match=r"'mps' is not available.*available: cpu"):
        dev.resolve_device("mps")
    machine(cuda=2, mps=False)
    with pytest.raises(
        DeviceError, match=r"has 2 CUDA device\(s\) \(available: cuda:0, cuda:1, cpu"
    ):
        dev.resolve_device("cuda:2")


@pytest.mark.parametrize("spec", ["gpu", "cuda:x", "cuda:-1", "tpu", ""])
def test_malformed_devices_are_usage_errors(machine, spec):
    machine()
    with pytest.raises(DeviceError, match="unknown device") as err:
        dev.resolve_device(spec)
    assert err.value.exit_code == 2


def test_seeded_noise_is_reproducible_and_drawn_on_the_cpu():
    a = dev.randn((3, 4), dev.make_generator(7))
    b = dev.randn((3, 4), dev.make_generator(7))
    c = dev.randn((3, 4), dev.make_generator(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # the same numbers as drawing on the CPU directly: the device only receives them
    assert torch.equal(a, torch.randn(3, 4, generator=torch.Generator().manual_seed(7)))
    assert 0 <= dev.new_seed() < 2**32


def test_cpu_has_amx_asks_torch_on_x86_only(monkeypatch, switches):
    """AMX decides the CPU default precision (forward.default_precision) and the bf16 Winograd
    rule; torch answers on x86, and elsewhere or before torch 2.3 the answer is unknown."""
    import platform

    from ddpm_cli import runtime

    switches(cpu_isa="")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    assert dev.cpu_has_amx() is True
    # oneDNN kept below AMX (how benchmarks stand in for an older CPU): no AMX for ddpm either
    for name, cap, amx in (("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16", False),
                           ("ONEDNN_MAX_CPU_ISA", " avx2", False),
                           ("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX", True),
                           ("ONEDNN_MAX_CPU_ISA", "DEFAULT", True),
                           ("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16_TYPO", True),  # unknown: no cap
                           ("DNNL_MAX_CPU_ISA", "AVX512_CORE", False)):  # fmt: skip
        with runtime.use(runtime.from_env({name: cap})):
            assert dev.cpu_has_amx() is amx, cap
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert dev.cpu_has_amx() is False
    monkeypatch.setattr(platform, "machine", lambda: "arm64")  # Apple silicon, Graviton
    assert dev.cpu_has_amx() is None
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")  # torch before 2.3
    assert dev.cpu_has_amx() is None


def test_cpu_has_amx_gets_an_answer_from_this_torch_on_x86(switches):
    import platform

    switches(cpu_isa="")

    if platform.machine().lower() not in ("x86_64", "amd64"):
        assert dev.cpu_has_amx() is None
        return
    test = getattr(torch.cpu, "_is_amx_tile_supported", None)
    if tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 3):
        assert test is not None  # a renamed query would silently change defaults and kernels
    assert dev.cpu_has_amx() == (None if test is None else test())
