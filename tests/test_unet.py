"""The U-Net: the paper's parameter counts, shapes, and what each part of the config does."""

from __future__ import annotations

import copy

import pytest
import torch

from ddpm_cli.config import ModelConfig
from ddpm_cli.errors import ConfigError
from ddpm_cli.model.kernels.groupnorm import GroupNorm, nchw_is_faster
from ddpm_cli.model.presets import PRESETS, build_model_config, preset_for
from ddpm_cli.model.unet import AttnBlock, UNet, count_parameters, timestep_embedding

TINY = ModelConfig(
    image_size=(8, 8),
    channels=32,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(4,),
    dropout=0.0,
)


def norm(channels: int) -> GroupNorm:
    """A GroupNorm as the network's, with its fast path installed (kernels/policy.py)."""
    return GroupNorm(min(32, channels), channels, eps=1e-6)


def test_cifar10_preset_has_the_official_parameter_count():
    # the count of the authors' CIFAR-10 model (and of diffusers' google/ddpm-cifar10-32)
    assert count_parameters(UNet(PRESETS["cifar10"])) == 35_746_307


def test_256_presets_are_about_114m():
    n = count_parameters(UNet(PRESETS["celebahq256"]))
    assert 113e6 < n < 115e6
    assert PRESETS["lsun256"] == PRESETS["celebahq256"]


def test_cifar10_matches_diffusers_unet2dmodel_parameter_for_parameter():
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.UNet2DModel(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(128, 256, 256, 256),
        layers_per_block=2,
        attention_head_dim=None,
        norm_num_groups=32,
        dropout=0.1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    )
    # diffusers keeps q, k and v as three layers where we have one fused qkv: split ours
    ours = []
    for name, p in UNet(PRESETS["cifar10"]).named_parameters():
        ours += [p.numel() // 3] * 3 if ".qkv." in name else [p.numel()]
    assert sorted(ours) == sorted(p.numel() for p in ref.parameters())


@pytest.mark.parametrize("size", [(8, 8), (16, 32), (32, 16)])
@pytest.mark.parametrize("channels", [1, 3, 4])
def test_output_has_the_input_shape(size, channels):
    config = ModelConfig(
        image_size=size,
        in_channels=channels,
        out_channels=channels,
        channels=32,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(min(size) // 2,),
        dropout=0.0,
    )
    model = UNet(config)
    x = torch.randn(2, channels, *size)
    assert model(x, torch.tensor([0, 999])).shape == x.shape


def test_zero_initialised_output_and_timestep_dependence():
    model = UNet(TINY)
    x = torch.randn(2, 3, 8, 8)
    assert model(x, torch.tensor([1, 2])).abs().max() == 0  # conv_out starts at zero (authors)
    with torch.no_grad():  # the zero-initialised layers hide t until training moves them
        for p in model.parameters():
            if p.abs().max() == 0 and p.ndim > 1:
                p.normal_(std=0.05)
    a, b = model(x[:1], torch.tensor([10])), model(x[:1], torch.tensor([900]))
    assert not torch.allclose(a, b)  # the timestep reaches the output


def test_the_shift_map_enters_through_a_convolution_beside_conv_in_and_empty_adds_nothing():
    """ModelConfig.augment (--shift): a bias-free 3x3 convolution of the map of reflected
    pixels is added to conv_in's output. An empty map, and none (sampling), give exactly the
    network without it, which the export and the unshifted samples rest on."""
    told = UNet(ModelConfig(**{**TINY.to_dict(), "augment": 1}))
    assert told.augment_in.weight.abs().max() == 0 and told.augment_in.bias is None
    with torch.no_grad():
        for p in told.parameters():
            p.normal_(std=0.05)
    own = told.state_dict()
    plain = UNet(TINY)
    plain.load_state_dict({k: v for k, v in own.items() if not k.startswith("augment_in")})
    x, t = torch.randn(3, 3, 8, 8), torch.tensor([5, 300, 900])
    maps = (torch.rand(3, 1, 8, 8) < 0.3).float()
    with torch.no_grad():
        assert torch.equal(told(x, t), plain(x, t))
        assert torch.equal(told(x, t, augment=torch.zeros(3, 1, 8, 8)), plain(x, t))
        # the same as adding the convolution of the map to conv_in's output by hand, in float64
        added = torch.nn.functional.conv2d(maps.double(), own["augment_in.weight"].double(),
                                           padding=1).float()  # fmt: skip
        plain.conv_in.register_forward_hook(lambda m, args, out: out + added)
        assert torch.allclose(told(x, t, augment=maps), plain(x, t), atol=1e-5)
        assert not torch.allclose(told(x, t, augment=maps), told(x, t), atol=1e-4)
    with pytest.raises(ValueError, match="trained without one"):
        UNet(TINY)(x, t, augment=maps)
    with pytest.raises(ConfigError, match="augment must be 0 or 1"):
        ModelConfig(augment=2)


def test_scale_shift_modulates_the_normalised_activations_and_old_configs_load_without_it():
    """ModelConfig.scale_shift: the timestep projection gives a scale s and a shift b for
    GN(h) * (1 + s) + b (diffusers computes the same: tests/test_interop.py). Checkpoints
    written before the field existed read as the paper's additive block."""
    import torch.nn.functional as F

    from ddpm_cli.config import from_dict
    from ddpm_cli.model.unet import ResBlock

    block = ResBlock(32, 32, 64, 0.0, scale_shift=True)
    assert block.temb_proj.out_features == 64
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(std=0.05)
    x, temb = torch.randn(2, 32, 4, 4), torch.randn(2, 64)
    with torch.no_grad():
        block.temb_proj.weight.zero_()
        block.temb_proj.bias.copy_(torch.cat([torch.full((32,), -1.0), torch.zeros(32)]))
        # scale -1, shift 0: the branch sees zeros, so only conv2's bias is added
        assert torch.allclose(block(x, temb), x + block.conv2.bias[:, None, None], atol=1e-6)
        shift = torch.randn(32)
        block.temb_proj.bias.copy_(torch.cat([torch.full((32,), 0.5), shift]))
        got = block(x, temb)
    d = {k: v.double() for k, v in block.state_dict().items()}
    h = F.conv2d(F.silu(F.group_norm(x.double(), 32, d["norm1.weight"], d["norm1.bias"], 1e-6)),
                 d["conv1.weight"], d["conv1.bias"], padding=1)  # fmt: skip
    h = F.group_norm(h, 32, d["norm2.weight"], d["norm2.bias"], 1e-6) * 1.5 + d["temb_proj.bias"][
        32:, None, None
    ]
    want = x.double() + F.conv2d(F.silu(h), d["conv2.weight"], d["conv2.bias"], padding=1)
    assert torch.allclose(got.double(), want, atol=1e-5)

    old = TINY.to_dict()
    del old["scale_shift"]
    assert from_dict(ModelConfig, old) == TINY and not TINY.scale_shift
    shifted = ModelConfig(**{**TINY.to_dict(), "scale_shift": True})
    extra = count_parameters(UNet(shifted)) - count_parameters(UNet(TINY))
    # each block's projection doubles: 128 inputs (4 x 32 channels) and a bias per channel
    widths = [32, 64, 64, 64, 64, 64, 32, 32]  # each block's output: down, middle, up
    assert extra == sum(129 * w for w in widths)


def test_attention_and_depth_follow_the_config():
    with_attn = UNet(TINY)
    without = UNet(ModelConfig(**{**TINY.to_dict(), "attention_resolutions": ()}))
    n_attn = sum(1 for m in with_attn.modules() if type(m).__name__ == "AttnBlock")
    assert n_attn == 1 + 1 + 2  # middle, one down block and two up blocks at 4x4
    assert sum(1 for m in without.modules() if type(m).__name__ == "AttnBlock") == 1  # middle


def test_timestep_embedding_is_sinusoidal():
    emb = timestep_embedding(torch.tensor([0, 3]), 8)
    assert emb.shape == (2, 8)
    assert torch.allclose(emb[0], torch.tensor([0.0] * 4 + [1.0] * 4))
    assert torch.isclose(emb[1, 0], torch.sin(torch.tensor(3.0)))


def test_bad_configs_are_refused():
    with pytest.raises(ConfigError, match="divisible by 4"):
        ModelConfig(image_size=(10, 10), channel_mult=(1, 2, 2))
    with pytest.raises(ConfigError, match="in_channels must be 1, 3 or 4"):
        ModelConfig(in_channels=2)
    with pytest.raises(ConfigError, match="norm groups"):
        ModelConfig(channels=48)
    # every level's width splits, but a skip connection's concatenation (16 + 32) does not
    with pytest.raises(ConfigError, match="48 channels cannot be split into 32 norm groups"):
        ModelConfig(channels=16, channel_mult=(1, 2), attention_resolutions=())


@pytest.mark.parametrize("channels, mult, n", [
    (32, (1, 2, 2, 2), 2), (8, (1, 2), 2), (32, (1, 1, 2, 2), 3), (4, (1, 3, 2), 2),
    (64, (1, 2, 3), 1), (32, (4, 1), 1),
])  # fmt: skip
def test_the_config_checks_every_width_the_network_normalizes(channels, mult, n):
    """ModelConfig.norm_widths mirrors the U-Net's skip stack: it must name exactly the channel
    counts of the GroupNorm layers the network builds, or a config it accepts could fail to
    build (an internal error instead of a clear refusal of a bad checkpoint)."""
    config = ModelConfig(image_size=(16, 16), channels=channels, channel_mult=mult,
                         num_res_blocks=n, attention_resolutions=())  # fmt: skip
    built = {m.num_channels for m in UNet(config).modules() if isinstance(m, torch.nn.GroupNorm)}
    assert config.norm_widths() == built


def test_a_config_refused_for_a_skip_width_would_not_build():
    config = ModelConfig(channels=32, channel_mult=(1, 2), attention_resolutions=())
    object.__setattr__(config, "channels", 16)  # past the check: 16 + 32 at a skip
    with pytest.raises(ValueError, match="divisible by num_groups"):
        UNet(config)


def test_presets_adapt_to_the_data_and_the_default_follows_size_and_device():
    cfg = build_model_config("cifar10", (8, 8), 1)
    assert cfg.in_channels == 1 and cfg.image_size == (8, 8) and len(cfg.channel_mult) == 3
    assert preset_for((32, 32), accelerated=True) == "cifar10"
    assert preset_for((128, 256), accelerated=True) == "celebahq256"
    assert preset_for((32, 32), accelerated=False) == "small"
    with pytest.raises(ConfigError, match="unknown preset"):
        build_model_config("huge", (32, 32), 3)


@pytest.mark.parametrize(
    ("preset", "size", "attention", "blocks"),
    [
        ("small", 32, (8,), 4),  # its own size: one down, one middle, two up
        ("small", 28, (7,), 4),  # levels 28, 14, 7: 8 names none of them
        ("small", 24, (6,), 4),  # 24, 12, 6: 6 is nearer 8 than 12 is
        ("small", 64, (), 1),  # 64, 32, 16: 16 is twice 8; the middle block alone
        ("cifar10", 32, (16,), 6),  # the paper's network, exactly: 2 down, 1 middle, 3 up
        ("cifar10", 28, (14,), 6),  # 28, 14, 7 (no 4th level: 28 is not a multiple of 8)
        ("cifar10", 8, (), 1),  # 8, 4, 2
        ("small", (28, 56), (7,), 4),  # the shorter side decides, as it does for the network
    ],
)
def test_a_presets_attention_lands_on_a_level_the_image_size_has(preset, size, attention, blocks):
    """A preset's attention resolutions are those of its own image size; at another size a
    resolution no level has (8 at 28 px) goes to the nearest level within a factor of 2, so a
    28x28 digit gets the attention a 32x32 image gets, and the config records where it is."""
    config = build_model_config(preset, size if isinstance(size, tuple) else (size, size), 1)
    assert config.attention_resolutions == attention
    assert set(attention) <= {config.resolution(i) for i in range(len(config.channel_mult))}
    model = UNet(config)
    assert sum(isinstance(m, AttnBlock) for m in model.modules()) == blocks
    for name, base in PRESETS.items():  # at its own size, every preset is as it was
        assert build_model_config(name, base.image_size, 3).attention_resolutions == (
            base.attention_resolutions
        )


def test_attention_follows_an_overridden_depth_and_old_configs_keep_theirs():
    """Levels come from the channel_mult the network gets; attention given is kept as given;
    a 28 px config saved before attention moved (8: no level) still builds as it was."""
    two_levels = build_model_config("small", (28, 28), 1, channel_mult=(1, 2))  # 28 and 14
    assert two_levels.attention_resolutions == (14,)
    assert build_model_config("small", (48, 48), 1, channel_mult=(1, 2, 2, 2)
                              ).attention_resolutions == (6,)  # fmt: skip
    given = build_model_config("small", (28, 28), 1, attention_resolutions=(14,))
    assert given.attention_resolutions == (14,)
    old = ModelConfig(**{**build_model_config("small", (28, 28), 1).to_dict(),
                         "attention_resolutions": (8,)})  # fmt: skip
    assert sum(isinstance(m, AttnBlock) for m in UNet(old).modules()) == 1  # the middle alone


def test_the_policy_gives_the_fast_paths_and_torch_keeps_the_same_function():
    """unet.py is built of torch's layers; kernels/policy.py installs the fast ones once. With
    the same weights, the network with and without them computes the same function (Winograd
    takes the 128-channel layers here: about 1e-5 relative, docs/benchmarks.md)."""
    from torch import nn

    from ddpm_cli.model.kernels.policy import FAST, TORCH, KernelPolicy, install
    from ddpm_cli.model.kernels.winograd import Conv3x3

    config = ModelConfig(image_size=(16, 16), channels=128, channel_mult=(1, 2), num_res_blocks=1,
                         attention_resolutions=(), dropout=0.1)  # fmt: skip
    torch.manual_seed(0)
    fast = UNet(config, kernels=FAST)
    plain = UNet(config, kernels=TORCH)
    kinds = {type(m) for m in fast.modules()}
    assert {Conv3x3, GroupNorm} <= kinds
    assert not {Conv3x3, GroupNorm} & {type(m) for m in plain.modules()}
    assert {nn.Conv2d, nn.GroupNorm, nn.Dropout} <= {type(m) for m in plain.modules()}
    assert nn.Conv2d in kinds  # the stride-2 and 1x1 convolutions have no fast path
    only_conv = {type(m) for m in UNet(config, KernelPolicy(groupnorm_nchw=False)).modules()}
    assert Conv3x3 in only_conv and GroupNorm not in only_conv
    assert not {Conv3x3, GroupNorm} & {type(m) for m in install(fast, TORCH).modules()}
    install(fast, FAST)  # and back: install sets every layer as the policy says
    assert kinds == {type(m) for m in fast.modules()}
    for p in fast.parameters():
        torch.nn.init.normal_(p, std=0.05)
    plain.load_state_dict(fast.state_dict())
    fast.eval(), plain.eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([5, 900])
    with torch.no_grad():
        a, b = fast(x, t), plain(x, t)
        ref = copy.deepcopy(plain).double()(x.double(), t)
    assert ((a - b).abs().max() / b.abs().max()).item() < 1e-4
    assert ((a.double() - ref).abs().max() / ref.abs().max()).item() < 1e-4


@pytest.mark.parametrize(
    "cpu, conv3x3",
    [(("AuthenticAMD", 26), False), (("AuthenticAMD", 27), False), (("AuthenticAMD", 25), True),
     (("GenuineIntel", 6), True), (None, True)],
)  # fmt: skip
def test_the_default_policy_keeps_torchs_convolutions_where_they_measured_faster(
    monkeypatch, cpu, conv3x3
):
    """AMD from Zen 5 (family 26): oneDNN's direct convolutions beat Winograd in every layer
    (docs/benchmarks.md); elsewhere Winograd measured faster, and an unknown CPU keeps it."""
    from ddpm_cli.model.kernels import policy
    from ddpm_cli.model.kernels.winograd import Conv3x3

    monkeypatch.setattr(policy, "cpu_id", lambda: cpu)
    assert policy.default_policy().conv3x3 is conv3x3
    assert policy.default_policy().groupnorm_nchw
    layers = {type(m) for m in UNet(TINY).modules()}
    assert (Conv3x3 in layers) is conv3x3 and GroupNorm in layers


def test_cpu_id_reads_this_linux_cpu():
    import platform

    from ddpm_cli.device import cpu_id

    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("reads /proc/cpuinfo of an x86 Linux machine")
    vendor, family = cpu_id()
    assert vendor in ("AuthenticAMD", "GenuineIntel", "HygonGenuine") and family > 0


CL = torch.channels_last


def _cl_bf16(shape, requires_grad=False):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 2 + 1).to(torch.bfloat16, memory_format=CL)
    return x.requires_grad_(requires_grad)


@pytest.fixture
def nchw_inputs(monkeypatch):
    """Records, for each F.group_norm call, whether its input was NCHW."""
    import torch.nn.functional as F

    seen, real = [], F.group_norm

    def spy(inp, *args, **kwargs):
        seen.append(inp.is_contiguous())
        return real(inp, *args, **kwargs)

    monkeypatch.setattr(F, "group_norm", spy)
    return seen


@pytest.mark.parametrize(
    "shape, training, copies",
    [
        ((16, 64, 16, 16), False, True),  # below 1024 positions torch's NHWC forward is slow
        ((4, 384, 8, 8), False, True),
        ((4, 512, 8, 8), False, False),  # 16 channels per group: torch's kernel is fast
        ((4, 128, 32, 32), False, False),  # 1024 positions: torch's other algorithm
        ((4, 128, 32, 32), True, True),  # but its backward is slow up to 64x64 at 4 per group
        ((2, 128, 64, 64), True, True),
        ((2, 256, 32, 32), True, False),
        ((1, 128, 128, 128), True, False),  # the copies cost more than they save
    ],
)
def test_cpu_bf16_groupnorm_takes_the_nchw_copy_where_measured_faster(
    nchw_inputs, shape, training, copies
):
    x = _cl_bf16(shape, requires_grad=training)
    y = norm(shape[1])(x)
    assert nchw_inputs == [copies]  # torch's kernel saw NCHW input exactly where ddpm copies
    assert y.is_contiguous(memory_format=CL)  # the next convolution gets NHWC either way
    if training:
        y.backward(torch.ones_like(y))
        assert x.grad.is_contiguous(memory_format=CL)  # and so do the layers before it


def test_groupnorm_keeps_torchs_kernels_for_float32_nchw_and_compiled_code(nchw_inputs):
    x = _cl_bf16((4, 64, 16, 16))
    layer = norm(64)
    layer(x.float()), layer(x.contiguous())
    assert nchw_inputs == [False, True]  # float32 NHWC and NCHW: as given, no copy
    assert not any(nchw_is_faster(v, 32) for v in (x.float(), x.contiguous()))
    graphs = []

    def backend(gm, example_inputs):
        graphs.append([str(node.target) for node in gm.graph.nodes])
        return gm.forward

    torch._dynamo.reset()
    torch.compile(layer, backend=backend)(x)
    torch._dynamo.reset()
    assert graphs and not any("contiguous" in op for op in graphs[0])  # inductor's own


@pytest.mark.parametrize("shape", [(4, 64, 16, 16), (2, 128, 32, 32)])
def test_cpu_bf16_groupnorm_copy_matches_float64(nchw_inputs, shape):
    """Output and gradients through the NCHW copy are as close to float64 as torch's own
    channels_last kernel: the same arithmetic, in another layout."""
    g = torch.Generator().manual_seed(1)
    layer = norm(shape[1])
    with torch.no_grad():
        layer.weight.copy_(1 + 0.2 * torch.randn(shape[1], generator=g))
        layer.bias.copy_(0.2 * torch.randn(shape[1], generator=g))
    x = _cl_bf16(shape)
    grad = torch.randn(shape, generator=g).to(torch.bfloat16, memory_format=CL)

    def run(fn, dtype):  # y and the gradients of x, weight, bias; x stays channels_last
        x_ = x.detach().to(dtype).requires_grad_()
        wdtype = torch.float64 if dtype is torch.float64 else torch.float32
        w, b = (p.detach().to(wdtype).requires_grad_() for p in (layer.weight, layer.bias))
        y = fn(x_, w, b)
        y.backward(grad.to(y.dtype))
        return [t.double() for t in (y.detach(), x_.grad, w.grad, b.grad)]

    def torch_gn(x, w, b):
        return torch.nn.functional.group_norm(x, 32, w, b, 1e-6)

    def ours_gn(x, w, b):
        return torch.func.functional_call(layer, {"weight": w, "bias": b}, (x,))

    ref = run(torch_gn, torch.float64)
    nchw_inputs.clear()
    ours = run(ours_gn, torch.bfloat16)
    assert nchw_inputs == [True]  # it took the copy
    torch_cl = run(torch_gn, torch.bfloat16)  # torch's channels_last kernel
    for name, o, t, r in zip(("y", "dx", "dw", "db"), ours, torch_cl, ref, strict=True):
        err = ((o - r).abs().max() / r.abs().max()).item()
        torch_err = ((t - r).abs().max() / r.abs().max()).item()
        assert err <= max(1.5 * torch_err, 1e-6), (name, err, torch_err)
        assert err < 1e-2, name  # bf16's own precision (3e-3 measured)


def test_cpu_bf16_autocast_training_through_the_copies_matches_float64(monkeypatch):
    """A UNet training step under CPU bf16 autocast, where every GroupNorm takes the copy, is as
    close to float64 (output and every gradient) as with torch's channels_last kernels."""
    from ddpm_cli.device import place
    from ddpm_cli.model.kernels import groupnorm

    torch.manual_seed(0)
    model = place(UNet(TINY), "cpu")
    for p in model.parameters():  # zero-initialised layers would hide their inputs' gradients
        if not p.any():
            torch.nn.init.normal_(p, std=0.05)
    x, t = torch.randn(4, 3, 8, 8), torch.tensor([1, 250, 500, 999])
    grad = torch.randn(4, 3, 8, 8)

    def step(dtype, copies=True):
        monkeypatch.setattr(groupnorm, "nchw_is_faster", real if copies else lambda *a: False)
        net = copy.deepcopy(model).to(dtype) if dtype is torch.float64 else model
        net.zero_grad()
        with torch.autocast("cpu", torch.bfloat16, enabled=dtype is torch.bfloat16):
            y = net(x.to(dtype), t)
        y.float().backward(grad.to(y.dtype).float())
        return [y.detach().double()] + [p.grad.double() for p in net.parameters()]

    real = groupnorm.nchw_is_faster
    assert real(_cl_bf16((4, 64, 4, 4), requires_grad=True), 32)
    ref = step(torch.float64)
    ours, torchs = step(torch.bfloat16), step(torch.bfloat16, copies=False)

    # a bias just before a GroupNorm of one channel per group has no gradient: leave those out
    kept = [i for i, r in enumerate(ref) if r.norm() > 1e-9]
    assert len(kept) > len(ref) // 2

    def errors(run):
        return [((run[i] - ref[i]).norm() / ref[i].norm()).item() for i in kept]

    ours_err, torch_err = errors(ours), errors(torchs)
    assert max(ours_err) < min(0.1, 1.5 * max(torch_err))  # bf16's scale (0.05), everywhere
    assert ours_err[0] <= 1.5 * torch_err[0] + 1e-4  # the output
    assert sorted(ours_err)[len(ours_err) // 2] <= 1.5 * sorted(torch_err)[len(torch_err) // 2]
