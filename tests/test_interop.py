"""diffusers interop: import and export against diffusers itself (a test-only dependency)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel
from safetensors.torch import load_file

from ddpm_cli.cli import app
from ddpm_cli.config import ModelConfig
from ddpm_cli.diffusion.samplers import from_config
from ddpm_cli.diffusion.schedules import DiffusionTables
from ddpm_cli.generation.sampling import load_for_sampling
from ddpm_cli.sampler_config import SamplerConfig
from ddpm_cli.store.interop import import_folder

# google/ddpm-cifar10-32's UNet2DModel configuration (its config.json), and a small one
CIFAR10 = {
    "sample_size": 32, "in_channels": 3, "out_channels": 3, "layers_per_block": 2,
    "block_out_channels": [128, 256, 256, 256],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "act_fn": "silu", "attention_head_dim": None, "center_input_sample": False,
    "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1,
    "mid_block_scale_factor": 1, "norm_eps": 1e-06, "norm_num_groups": 32,
    "time_embedding_type": "positional",
}  # fmt: skip
SMALL = {**CIFAR10, "sample_size": 16, "layers_per_block": 1, "block_out_channels": [32, 64],
         "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
         "up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "downsample_padding": 1}  # fmt: skip
# diffusers' adaptive group norm (ddpm's ModelConfig.scale_shift), the middle attention normed
SHIFTED = {**SMALL, "resnet_time_scale_shift": "scale_shift", "attn_norm_num_groups": 32}
SCHEDULER = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 0.0001,
             "beta_end": 0.02, "variance_type": "fixed_small", "clip_sample": True}  # fmt: skip


def diffusers_folder(path, unet_config, scheduler=SCHEDULER, seed=0):
    torch.manual_seed(seed)
    unet = UNet2DModel(**unet_config)
    with torch.no_grad():  # random weights everywhere (diffusers zero-inits nothing we'd miss)
        for p in unet.parameters():
            p.normal_(0, 0.05)
    unet.save_pretrained(path / "unet", safe_serialization=True)
    DDPMScheduler(**scheduler).save_pretrained(path / "scheduler")
    (path / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline"}))
    return unet.eval()


# the additive block with its attention groups named: diffusers computes the same as unnamed
NAMED = {**SMALL, "attn_norm_num_groups": 32}


@pytest.mark.parametrize("config", [CIFAR10, SMALL, SHIFTED, NAMED],
                         ids=["cifar10", "small", "shift", "named"])  # fmt: skip
def test_an_imported_unet_computes_what_diffusers_computes(tmp_path, config):
    theirs = diffusers_folder(tmp_path / "d", config)
    info = import_folder(tmp_path / "d", tmp_path / "m.safetensors")
    assert info["objective"] == "eps" and info["sampler"] == {"variance": "small", "clip": True}
    ours = load_for_sampling(tmp_path / "m.safetensors").model
    assert ours.config.scale_shift == (config is SHIFTED)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    if config is CIFAR10:
        assert sum(p.numel() for p in ours.parameters()) == 35_746_307
    g = torch.Generator().manual_seed(1)
    size = config["sample_size"]
    x, t = torch.randn(2, 3, size, size, generator=g), torch.tensor([3, 700])
    with torch.no_grad():
        assert torch.allclose(ours(x, t), theirs(x, t).sample, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("interop")
    unet = diffusers_folder(root / "d", SMALL)
    import_folder(root / "d", root / "m.safetensors")
    return root, unet


def ours_sample(path, sampler: SamplerConfig, seed: int) -> torch.Tensor:
    """Our sampler from the pipeline's noise: x_T first, then each step's, from one generator."""
    sm = load_for_sampling(path)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 16, 16, generator=g)
    tables = DiffusionTables.from_config(sm.diffusion).to("cpu", torch.float32)
    for step in from_config(sampler, sm.model, tables, x, lambda s: torch.randn(s, generator=g)):
        x = step.x
    return (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)


def test_ten_steps_give_the_images_of_ddpmpipeline_and_ddimpipeline(small):
    root, unet = small
    scheduler = DDPMScheduler(**SCHEDULER)
    want = DDPMPipeline(unet, scheduler)(
        batch_size=2, generator=torch.Generator().manual_seed(5), num_inference_steps=10,
        output_type="np",
    ).images  # fmt: skip
    got = ours_sample(root / "m.safetensors",
                      SamplerConfig(sampler="ddpm", steps=10, spacing="leading", variance="small"),
                      5)  # fmt: skip
    assert torch.allclose(got, torch.from_numpy(want), atol=1e-4)
    # ddpm's DDIM re-derives eps from the clipped x_0, as diffusers does when asked to
    want = DDIMPipeline(unet, DDIMScheduler.from_config(scheduler.config))(
        batch_size=2, generator=torch.Generator().manual_seed(6), num_inference_steps=10,
        eta=0.0, use_clipped_model_output=True, output_type="np",
    ).images  # fmt: skip
    got = ours_sample(root / "m.safetensors",
                      SamplerConfig(sampler="ddim", steps=10, spacing="leading"), 6)  # fmt: skip
    assert torch.allclose(got, torch.from_numpy(want), atol=1e-4)


def test_export_loads_in_diffusers_and_round_trips(small, runner, tmp_path):
    root, _ = small
    out = tmp_path / "exported"
    r = runner.invoke(app, ["export", str(root / "m.safetensors"), "--diffusers", str(out)])
    assert r.exit_code == 0, r.output
    pipe = DDPMPipeline.from_pretrained(out)
    assert pipe.scheduler.config.variance_type == "fixed_small"
    ours = load_for_sampling(root / "m.safetensors").model
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([0, 999])
    with torch.no_grad():
        assert torch.allclose(ours(x, t), pipe.unet(x, t).sample, atol=1e-5, rtol=1e-5)
    back = tmp_path / "back.safetensors"
    r = runner.invoke(app, ["import", str(out), "-o", str(back)])
    assert r.exit_code == 0, r.output
    # the scheduler's settings as the options of ddpm sample they become
    assert "sampler defaults --variance small --clip\n" in r.stderr, r.stderr
    shown = runner.invoke(app, ["inspect", str(back)]).stdout  # never trained by ddpm: no length
    assert "none: imported weights, not a ddpm run" in shown and "None" not in shown
    assert "│ epochs" not in shown and "│ batch" not in shown
    a, b = load_file(str(root / "m.safetensors")), load_file(str(back))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_model_trained_by_ddpm_exports_with_its_schedule(tmp_path, runner):
    from conftest import train_tiny
    from ddpm_cli.config import DiffusionConfig

    run = train_tiny(tmp_path, 4, DiffusionConfig(schedule="cosine", timesteps=200))
    out = tmp_path / "exp"
    assert runner.invoke(app, ["export", str(run), "--diffusers", str(out)]).exit_code == 0
    pipe = DDPMPipeline.from_pretrained(out)
    ours = load_for_sampling(run).model
    # the same betas in diffusers' scheduler and ours
    tables = DiffusionTables.from_config(DiffusionConfig(schedule="cosine", timesteps=200))
    assert torch.allclose(pipe.scheduler.betas.double(), tables.betas, atol=1e-6)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([5, 150])
    with torch.no_grad():
        assert torch.allclose(ours(x, t), pipe.unet(x, t).sample, atol=1e-5, rtol=1e-5)
    again = runner.invoke(app, ["export", str(run), "--diffusers", str(out)])
    assert again.exit_code == 2 and "--overwrite" in again.stderr
    dash = runner.invoke(app, ["export", str(run), "--diffusers", "-"])  # not stdout here
    assert dash.exit_code == 2 and "a folder of files, not a stream" in dash.stderr
    assert not os.path.exists("-")
    # the pipeline's unet/ folder alone: the scheduler beside it still gives the schedule
    r = runner.invoke(app, ["import", str(out / "unet"), "-o", str(tmp_path / "u.safetensors"),
                            "--json"])  # fmt: skip
    info = json.loads(r.stdout)
    assert (info["diffusion"]["schedule"], info["objective"], info["assumed"]) == (
        "cosine", "v", False)  # fmt: skip
    assert r.stderr == ""
    bare = tmp_path / "bare"  # a UNet with no scheduler anywhere: assumed, and said
    bare.mkdir()
    for f in (out / "unet").iterdir():
        (bare / f.name).write_bytes(f.read_bytes())
    r = runner.invoke(app, ["import", str(bare), "-o", str(tmp_path / "b.safetensors")])
    assert r.exit_code == 0, r.output
    assert "warning: " in r.stderr and "assumed the paper's linear schedule" in r.stderr
    for folder in (out, out / "unet", bare):  # inspect points to the import
        r = runner.invoke(app, ["inspect", str(folder)])
        assert r.exit_code == 2 and r.stderr == (
            f"error: {folder}: is a diffusers model folder; convert it with ddpm import {folder} "
            "-o MODEL.safetensors, then inspect that\n")  # fmt: skip


def test_a_model_trained_with_shift_exports_without_its_map_and_computes_the_same(
    tmp_path, runner
):
    """The convolution of the shift map adds nothing at the empty map sampling gives, so the
    exported UNet2DModel, which has no place for it, is the same function."""
    from conftest import train_tiny

    run = train_tiny(tmp_path, 4, shift=1, steps=3)
    ours = load_for_sampling(run).model
    assert ours.config.augment == 1 and ours.augment_in.weight.abs().max() > 0
    out = tmp_path / "exp"
    said = runner.invoke(app, ["export", str(run), "--diffusers", str(out)])
    assert said.exit_code == 0 and "left out augment_in.weight: the --shift map's" in said.stderr
    info = json.loads(runner.invoke(app, ["export", str(run), "--diffusers", str(out),
                                          "--overwrite", "--json"]).stdout)  # fmt: skip
    assert list(info["left_out"]) == ["augment_in.weight"]
    pipe = DDPMPipeline.from_pretrained(out)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([5, 900])
    with torch.no_grad():
        assert torch.allclose(ours(x, t), pipe.unet(x, t).sample, atol=1e-5, rtol=1e-5)


def test_export_says_what_it_wrote_on_stderr_and_quiet_silences_it(tmp_path, runner):
    from conftest import train_tiny
    from ddpm_cli.config import DiffusionConfig

    run = train_tiny(tmp_path, 4, DiffusionConfig(schedule="cosine", timesteps=200), shift=0)
    said = runner.invoke(app, ["export", str(run), "--diffusers", str(tmp_path / "a")])
    assert said.exit_code == 0 and said.stdout == f"{tmp_path / 'a'}\n"
    assert "DDPMScheduler squaredcos_cap_v2 T=200, predicting v_prediction" in said.stderr
    assert "at 8x8" in said.stderr
    odd = tmp_path / "[v2]" / "[/old]"  # Rich markup in a path is shown as it is
    odd.mkdir(parents=True)
    (run / "model.safetensors").rename(odd / "m.safetensors")
    run = odd / "m.safetensors"
    said = runner.invoke(app, ["export", str(run), "--diffusers", str(tmp_path / "c")])
    assert said.exit_code == 0 and f"exported {run}: UNet2DModel" in said.stderr
    quiet = runner.invoke(app, ["export", str(run), "--diffusers", str(tmp_path / "b"), "-q"])
    assert quiet.exit_code == 0 and quiet.stdout == f"{tmp_path / 'b'}\n"
    assert quiet.stderr == "" and "left out" not in said.stderr  # nothing left out here
    assert "class-conditional" not in said.stderr


def test_what_does_not_map_is_refused_by_name(tmp_path, runner):
    cases = {
        "multihead": ({**SMALL, "attention_head_dim": 8}, SCHEDULER,
                      "attention_head_dim=8: level 1's 64 channels would be 8 heads"),
        # one head at the attention level, two in a wider middle block
        "midwider": ({**SMALL, "block_out_channels": [32, 64, 128], "attention_head_dim": 64,
                      "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
                      "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D"]}, SCHEDULER,
                     "the middle block's 128 channels would be 2 heads"),
        # no attention level, yet the middle block's attention has 8 heads (imported as one
        # before, silently computing something else)
        "midheads": ({**SMALL, "down_block_types": ["DownBlock2D"] * 2,
                      "up_block_types": ["UpBlock2D"] * 2, "attention_head_dim": 8}, SCHEDULER,
                     "attention_head_dim=8: the middle block's 64 channels would be 8 heads"),
        # diffusers then builds the middle attention without its group norm
        "shift": ({**SMALL, "resnet_time_scale_shift": "scale_shift"}, SCHEDULER,
                  "attn_norm_num_groups=None with resnet_time_scale_shift='scale_shift': "
                  "diffusers then builds the middle block's attention without the group norm"),
        "learned": (SMALL, {**SCHEDULER, "variance_type": "learned_range"},
                    "unsupported scheduler option variance_type='learned_range' (known: "),
        "betas": (SMALL, {**SCHEDULER, "beta_end": 0.03}, "match none of ddpm's schedules"),
        "classes": ({**SMALL, "num_class_embeds": 10}, SCHEDULER,
                    "num_class_embeds=10 without ddpm's class names"),
    }  # fmt: skip
    for name, (unet, scheduler, message) in cases.items():
        diffusers_folder(tmp_path / name, unet, scheduler)
        r = runner.invoke(
            app, ["import", str(tmp_path / name), "-o", str(tmp_path / "x.safetensors")]
        )
        assert r.exit_code == 2, (name, r.output)
        (line,) = r.stderr.strip().splitlines()
        assert message in line, (name, line)
        assert not (tmp_path / "x.safetensors").exists()
    # a config without attention_head_dim (diffusers then uses 8-channel heads), and nonsense
    for name, unet in (("nokey", {k: v for k, v in SMALL.items() if k != "attention_head_dim"}),
                       ("zero", {**SMALL, "block_out_channels": [0, 64]}),
                       ("headslist", {**SMALL, "attention_head_dim": [32, 64]}),
                       ("headszero", {**SMALL, "attention_head_dim": 0}),
                       ("spatial", {**SMALL, "resnet_time_scale_shift": "spatial"}),
                       ("shiftlist", {**SMALL, "resnet_time_scale_shift": ["scale_shift"]}),
                       ("groups16", {**SHIFTED, "attn_norm_num_groups": 16})):  # fmt: skip
        folder = tmp_path / name / "unet"
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps(unet))
        (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"")
        r = runner.invoke(app, ["import", str(folder), "-o", str(tmp_path / "x.safetensors")])
        assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1, r.output
        assert "internal error" not in r.stderr
        if name != "zero":  # refused by name, not by the arithmetic it breaks; absent, as
            # diffusers reads it: heads of 8 channels
            said = {"nokey": "attention_head_dim=8: level 1's 64 channels would be 8 heads",
                    "headslist": "attention_head_dim=[32, 64] (ddpm's attention has one head",
                    "headszero": "attention_head_dim=0 (ddpm's attention has one head",
                    "spatial": "resnet_time_scale_shift='spatial' (not 'default' or "
                               "'scale_shift')",
                    "shiftlist": "resnet_time_scale_shift=['scale_shift'] (not 'default'",
                    "groups16": "attn_norm_num_groups=16 with resnet_time_scale_shift="
                                "'scale_shift': ddpm's attention norms have 32 groups",
                    }[name]  # fmt: skip
            assert said in " ".join(r.stderr.split()), r.stderr
    # values of the wrong kind are refused by the option's name and the value given (these
    # were internal errors, Python's own words, or a check naming another number)
    unet_values = {"sample_size": ("abc", "sample_size='abc': expected a whole number"),
                   "layers_per_block": (None, "layers_per_block=None: expected a whole number"),
                   "in_channels": ("3", "in_channels='3': expected a whole number"),
                   "block_out_channels": ([0, 64], "block_out_channels=[0, 64]: expected a "),
                   "dropout": ("x", "dropout='x': expected a number")}  # fmt: skip
    scheduler_values = {"num_train_timesteps": [(0, "=0: expected a whole number, 1 to 100,000"),
                                                (2.5, "=2.5: expected"), ("x", "='x': expected"),
                                                (-5, "=-5: expected")],
                        "beta_start": [("0.1", "beta_start='0.1': expected a number"),
                                       (-1e-4, "=-0.0001: expected a number from 0")],
                        "prediction_type": [(["epsilon"], "=['epsilon'] (known: epsilon, ")],
                        "variance_type": [({}, "variance_type={} (known: fixed_small, ")],
                        "beta_schedule": [(1, "beta_schedule=1 (known: linear, ")]}  # fmt: skip
    cases = [(k, v, said, {**SMALL, k: v}, SCHEDULER) for k, (v, said) in unet_values.items()]
    cases += [(k, v, said, SMALL, {**SCHEDULER, k: v})
              for k, values in scheduler_values.items() for v, said in values]  # fmt: skip
    for i, (key, value, said, unet, scheduler) in enumerate(cases):
        folder = tmp_path / f"values{i}"
        (folder / "unet").mkdir(parents=True)
        (folder / "scheduler").mkdir()
        (folder / "model_index.json").write_text("{}")
        (folder / "unet" / "config.json").write_text(json.dumps(unet))
        (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
        (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
        r = runner.invoke(app, ["import", str(folder), "-o", str(tmp_path / "x.safetensors")])
        assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1, (key, r.output)
        assert f"option {key}" in r.stderr and said in r.stderr, (key, value, r.stderr)
    # a folder with only a pickle
    pickled = tmp_path / "pickled" / "unet"
    pickled.mkdir(parents=True)
    (pickled / "config.json").write_text(json.dumps(SMALL))
    (pickled / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x02pickle")
    r = runner.invoke(app, ["import", str(pickled), "-o", str(tmp_path / "x.safetensors")])
    assert r.exit_code == 2 and "a pickle file" in r.stderr
    r = runner.invoke(
        app, ["import", str(tmp_path / "nothing"), "-o", str(tmp_path / "x.safetensors")]
    )
    assert r.exit_code == 2 and "nothing: no such directory" in r.stderr
    (tmp_path / "afile").write_text("x")
    out = str(tmp_path / "y.safetensors")
    r = runner.invoke(app, ["import", str(tmp_path / "afile"), "-o", out])
    assert r.exit_code == 2 and "afile: not a directory" in r.stderr
    r = runner.invoke(app, ["import", str(tmp_path / "afile"), "-o", str(tmp_path / "m")])
    assert r.exit_code == 2 and "import writes one .safetensors file; name it m.safetensors" in (
        r.stderr)  # fmt: skip
    for out in (".", "-", ".."):  # no file name to build on (this was an internal error)
        r = runner.invoke(app, ["import", str(tmp_path / "afile"), "-o", out])
        assert r.exit_code == 2 and "name it model.safetensors" in r.stderr, r.stderr


def test_model_config_round_trip_keeps_the_padding():
    from ddpm_cli.store.interop import model_config

    assert model_config(CIFAR10).downsample_padding == "bottom_right"
    assert model_config(SMALL) == ModelConfig(
        image_size=(16, 16), channels=32, channel_mult=(1, 2), num_res_blocks=1,
        attention_resolutions=(8,), dropout=0.0,
    )  # fmt: skip


@pytest.mark.parametrize("preset", ["small", "tiny"])
def test_a_class_conditional_model_exports_with_diffusers_class_embeddings(
    tmp_path, runner, preset
):
    """UNet2DModel's num_class_embeds is ddpm's class embedding (one more row: no class), with
    the class added to the time embedding that scales and shifts the norms (small) or is added
    to the activations (tiny)."""
    from ddpm_cli.config import DiffusionConfig, TrainConfig
    from ddpm_cli.model.presets import build_model_config
    from ddpm_cli.model.unet import UNet
    from ddpm_cli.store.checkpoint import save_checkpoint

    config = build_model_config(preset, (16, 16), 3, classes=("cat", "dog", "owl"))
    assert config.scale_shift == (preset == "small")
    torch.manual_seed(0)
    model = UNet(config)
    for p in model.parameters():  # the zero-initialised layers would hide a wrong mapping
        p.data.normal_(0, 0.05)
    configs = {"model": config.to_dict(), "diffusion": DiffusionConfig().to_dict(),
               "training": TrainConfig().to_dict()}  # fmt: skip
    save_checkpoint(tmp_path / "c.safetensors", model.state_dict(), "model",
                    {"config": configs, "step": 1})  # fmt: skip
    out = tmp_path / "exported"
    r = runner.invoke(app, ["export", str(tmp_path / "c.safetensors"), "--diffusers", str(out)])
    assert r.exit_code == 0, r.output
    # DDPMPipeline passes no class_labels: the user is told what to pass instead
    assert ("class-conditional: call the UNet with class_labels, 0 to 2 for cat, dog, owl "
            "(ddpm_classes in unet/config.json) and 3 for no class") in r.stderr  # fmt: skip
    theirs = UNet2DModel.from_pretrained(out / "unet").eval()
    assert theirs.config.num_class_embeds == 4
    shift = theirs.config.resnet_time_scale_shift
    assert shift == ("scale_shift" if config.scale_shift else "default")
    x, t, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 300, 600, 999]), torch.arange(4)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y), theirs(x, t, class_labels=y).sample,
                                   atol=1e-5, rtol=1e-5)  # fmt: skip
    back = tmp_path / "back.safetensors"
    r = runner.invoke(app, ["import", str(out), "-o", str(back)])
    assert r.exit_code == 0, r.output
    sm = load_for_sampling(back)
    assert sm.model_config.classes == ("cat", "dog", "owl")
    a, b = model.state_dict(), load_file(str(back))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_an_imported_model_fine_tunes_from_its_own_function(small, tmp_path):
    """ddpm train --init on a model ddpm import made: its architecture and schedule kept, its
    hash recorded, the data converted to its size."""
    from conftest import draw_shapes
    from ddpm_cli.config import DiffusionConfig, TrainConfig
    from ddpm_cli.store.checkpoint import load_checkpoint
    from ddpm_cli.training.run import train

    root, _ = small
    (tmp_path / "pics").mkdir()
    for i in range(4):
        draw_shapes((30 + i, 30)).save(tmp_path / "pics" / f"{i}.png")
    config = TrainConfig(device="cpu", steps=1, batch_size=2, sample_every=0,
                         init=str(root / "m.safetensors"))  # fmt: skip
    run = train(str(tmp_path / "pics"), config, DiffusionConfig(), tmp_path / "ft").out
    ours, parent = (
        load_checkpoint(run / "model.safetensors"),
        load_checkpoint(root / "m.safetensors"),
    )
    assert ours.config["model"] == parent.config["model"]
    assert ours.config["diffusion"] == parent.config["diffusion"]
    assert ours.config["parent"]["content_hash"] == parent.meta["content_hash"]
