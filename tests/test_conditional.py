"""Class-conditional models and classifier-free guidance (issue 10)."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import draw_shapes, pixels
from ddpm_cli.cli import app
from ddpm_cli.config import DiffusionConfig, ModelConfig, TrainConfig
from ddpm_cli.data.batches import Batches
from ddpm_cli.data.folders import folder_report, load_folder
from ddpm_cli.data.search import class_labels, scan
from ddpm_cli.data.sources import load_source
from ddpm_cli.errors import DataError
from ddpm_cli.generation.sampling import generate, load_for_sampling
from ddpm_cli.model.forward import guided
from ddpm_cli.model.presets import build_model_config
from ddpm_cli.model.unet import UNet
from ddpm_cli.sampler_config import DEFAULT_GUIDANCE, DEFAULT_GUIDANCE_INTERVAL, SamplerConfig
from ddpm_cli.training.run import train

RED, BLUE, MAGENTA = (255, 0, 0), (0, 0, 255), (255, 0, 255)
COLOURS = {"red": torch.tensor([1.0, -1, -1]), "blue": torch.tensor([-1.0, -1, 1])}
MAGENTA_T = torch.tensor([1.0, -1, 1])
CPU = torch.device("cpu")


def solid_folder(root, counts: dict[str, list[tuple[tuple[int, int, int], int]]]):
    """root/CLASS/i.png: solid 8x8 images, `n` of each colour per class."""
    for name, parts in counts.items():
        (root / name).mkdir(parents=True)
        i = 0
        for colour, n in parts:
            for _ in range(n):
                Image.new("RGB", (8, 8), colour).save(root / name / f"{i:03d}.png")
                i += 1
    return root


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny conditional model on two classes: "red" is 3/4 red and 1/4 magenta, "blue" 3/4
    blue and 1/4 magenta. Magenta is ambiguous (as likely under either class), so guidance
    should sample it less: that is how it trades variety for class fidelity."""
    root = tmp_path_factory.mktemp("cond")
    data = solid_folder(
        root / "data", {"red": [(RED, 48), (MAGENTA, 16)], "blue": [(BLUE, 48), (MAGENTA, 16)]}
    )
    config = TrainConfig(preset="tiny", image_size=8, batch_size=32, device="cpu", seed=5,
                         steps=600, lr=1e-3, objective="v", cond_drop=0.2, sample_every=0,
                         log_every=100, checkpoint_every=600)  # fmt: skip
    return train(str(data), config, DiffusionConfig(), out=root / "run").out


def sample_means(run, label: int, guidance: float, n: int = 48, interval=None) -> torch.Tensor:
    """Mean colours of n samples of class `label`, guided at every step (the classic
    classifier-free guidance: these solid colours are chosen at the highest noise levels,
    above the default interval) or in `interval`."""
    sm = load_for_sampling(run)
    sampler = SamplerConfig(sampler="dpm++", steps=20)
    x = torch.cat([x for _, x in generate(sm, sampler, list(range(n)), 0, n, torch.device("cpu"),
                                          labels=[label] * n, guidance=guidance,
                                          guidance_interval=interval)])  # fmt: skip
    assert x.std(dim=(2, 3)).mean() < 0.15  # solid images, not noise
    return x.mean(dim=(2, 3))


def nearest(means: torch.Tensor) -> list[str]:
    refs = {**COLOURS, "magenta": MAGENTA_T}
    names = list(refs)
    dist = torch.stack([(means - refs[k]).norm(dim=1) for k in names], dim=1)
    return [names[i] for i in dist.argmin(dim=1)]


def test_conditioning_is_learned_and_guidance_trades_variety_for_the_class(model_dir):
    sm = load_for_sampling(model_dir)
    assert sm.model_config.classes == ("blue", "red")  # sorted subfolder names
    for label, name, other in ((0, "blue", "red"), (1, "red", "blue")):
        plain = sample_means(model_dir, label, 0.0)
        kinds = nearest(plain)
        # every sample is of its class or the ambiguous colour; the other class never appears
        assert kinds.count(other) == 0
        assert kinds.count(name) >= 24  # 3/4 expected: 36 of 48
        assert (plain - COLOURS[name]).norm(dim=1).min() < 0.3  # and close to the colour
        strong = sample_means(model_dir, label, 4.0)  # at every step
        # guidance moves the ambiguous samples into the class: less within-class variance
        assert nearest(strong).count(name) > kinds.count(name)
        assert strong.var(dim=0).sum() < 0.5 * plain.var(dim=0).sum()


def test_unconditional_sampling_of_a_conditional_model_draws_both_classes(model_dir):
    sm = load_for_sampling(model_dir)
    sampler = SamplerConfig(sampler="dpm++", steps=20)
    x = torch.cat([x for _, x in generate(sm, sampler, list(range(48)), 1, 48, CPU)])
    kinds = nearest(x.mean(dim=(2, 3)))
    assert kinds.count("red") >= 6 and kinds.count("blue") >= 6


def test_guided_network_is_the_papers_combination():
    """(1 + w) out(y) - w out(no class), from one batched pass, and one pass at w = 0."""
    calls = []

    def net(x, t, y):
        calls.append(x.shape[0])
        return x * (y[:, None] + 1).float() + t[:, None].float()

    x, t, y = torch.randn(3, 1), torch.tensor([5, 6, 7]), torch.tensor([0, 1, 0])
    null = 2
    out = guided(net, y, 1.5, null)(x, t)
    cond = x * (y[:, None] + 1).float() + t[:, None].float()
    uncond = x * (null + 1) + t[:, None].float()
    torch.testing.assert_close(out, 2.5 * cond - 1.5 * uncond)
    assert calls == [6]
    torch.testing.assert_close(guided(net, y, 0.0, null)(x, t), cond)
    assert calls == [6, 3]


def test_the_network_embeds_classes_and_no_class():
    config = build_model_config("tiny", (8, 8), 3, classes=("a", "b", "c"))
    torch.manual_seed(0)
    net = UNet(config).eval()
    assert net.class_emb.weight.shape == (4, net.temb[2].out_features)  # 3 classes + none
    for p in net.parameters():  # wake the zero-initialised output layers
        p.data.normal_(0, 0.1)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 900])
    with torch.no_grad():
        none = net(x, t)
        assert torch.equal(none, net(x, t, torch.tensor([3, 3])))
        assert not torch.allclose(net(x, t, torch.tensor([0, 0])), net(x, t, torch.tensor([1, 1])))
    plain = UNet(build_model_config("tiny", (8, 8), 3))
    assert plain.class_emb is None
    with pytest.raises(ValueError, match="without classes"):
        plain(x, t, torch.tensor([0, 0]))


def test_class_folders_are_labelled_and_flat_or_mixed_folders_are_not(tmp_path):
    data = solid_folder(tmp_path / "d", {"cat": [(RED, 3)], "dog": [(BLUE, 5)]})
    labels, names = class_labels(data, scan(data))
    assert names == ["cat", "dog"] and labels == [0, 0, 0, 1, 1, 1, 1, 1]
    images, report = load_folder(data, (8, 8))
    assert report.classes == ["cat", "dog"] and report.class_counts == [3, 5]
    assert images.labels.tolist() == labels
    assert torch.equal(images.data[images.labels == 1][:, 2], torch.full((5, 8, 8), 255))
    streamed, _ = load_folder(data, (8, 8), stream=True)
    assert streamed.labels.tolist() == labels
    assert load_folder(data, (8, 8), classes=False)[0].labels is None
    assert folder_report(data, (8, 8)).summary()["class_counts"] == [3, 5]
    Image.new("RGB", (8, 8)).save(data / "loose.png")  # an image outside the class folders
    assert class_labels(data, scan(data)) is None
    assert load_folder(data, (8, 8))[1].warnings[-1] == (  # said, not silent
        "1 image beside the class subfolders (loose.png): trained without classes; move it "
        "into a subfolder for a class-conditional model")
    assert not load_folder(data, (8, 8), classes=False)[1].loose
    single = solid_folder(tmp_path / "s", {"only": [(RED, 2)]})
    assert class_labels(single, scan(single)) is None


def test_batches_carry_each_images_label_through_shuffles_and_flips(tmp_path):
    data = solid_folder(tmp_path / "d", {"a": [(RED, 5)], "b": [(BLUE, 6)], "c": [(MAGENTA, 3)]})
    for stream in (False, True):
        images, _ = load_folder(data, (8, 8), stream=stream)
        feed = Batches(images, 4, seed=3, flip=True, workers=0).iterate(0, 0)
        for _ in range(8):
            x, y, _ = next(feed)
            blue = x[:, 2, 0, 0] == 255
            red = x[:, 0, 0, 0] == 255
            assert torch.equal(y == 0, red & ~blue) and torch.equal(y == 1, blue & ~red)
            assert torch.equal(y == 2, red & blue)


def test_preflight_warns_on_imbalanced_classes(tmp_path):
    data = solid_folder(tmp_path / "d", {"big": [(RED, 30)], "small": [(BLUE, 2)]})
    report = folder_report(data, (8, 8))
    assert any("imbalanced: big has 30 images, small 2" in w for w in report.warnings)
    even = folder_report(solid_folder(tmp_path / "e", {"a": [(RED, 3)], "b": [(BLUE, 3)]}), (8, 8))
    assert not any("imbalanced" in w for w in even.warnings)


def test_the_builtin_shapes_are_labelled_by_shape():
    images, report = load_source("builtin:shapes", (16, 16), None)
    assert report.classes == ["circle", "square", "triangle"]
    assert images.labels.shape == (images.data.shape[0],)
    assert all(abs(n / images.data.shape[0] - 1 / 3) < 0.05 for n in report.class_counts)
    # a square fills its bounding box, a circle pi/4 of it, a triangle half: how much of its
    # bounding box each image's shape fills says the labels follow the shapes
    x = images.data.float()
    fg = (x - x[:, :, :1, :1]).abs().sum(1) > 60  # (N, H, W): differs from the corner
    rows, cols = fg.any(2).sum(1), fg.any(1).sum(1)
    fill = fg.sum(dim=(1, 2)) / (rows * cols).clamp(min=1)
    share = [float(fill[images.labels == k].mean()) for k in range(3)]
    assert share[1] > share[0] + 0.1 and share[0] > share[2] + 0.1, share


def test_a_conditional_run_resumes_bit_for_bit(tmp_path):
    data = solid_folder(tmp_path / "d", {"a": [(RED, 8)], "b": [(BLUE, 8)]})
    base = dict(preset="tiny", image_size=8, batch_size=8, device="cpu", seed=1,
                sample_every=0, log_every=1)  # fmt: skip
    whole = train(str(data), TrainConfig(**base, steps=6), DiffusionConfig(), tmp_path / "w").out
    part = train(str(data), TrainConfig(**base, steps=3), DiffusionConfig(), tmp_path / "p").out
    train(None, TrainConfig(), DiffusionConfig(), resume=part, given={"steps": 6})
    from ddpm_cli.store.checkpoint import load_checkpoint

    a = load_checkpoint(whole / "train_state.safetensors").tensors
    b = load_checkpoint(part / "train_state.safetensors").tensors
    assert all(torch.equal(a[k], b[k]) for k in a if not k.startswith("rng."))
    assert "class_emb.weight" in load_checkpoint(whole / "model.safetensors").tensors
    flat = train(str(data), TrainConfig(**base, steps=1, unconditional=True), DiffusionConfig(),
                 tmp_path / "u").out  # fmt: skip
    assert load_for_sampling(flat).model_config.classes == ()


def test_cli_samples_classes_by_name_index_and_all(model_dir, runner, tmp_path):
    out = tmp_path / "out"
    r = runner.invoke(app, ["sample", str(model_dir), "-n", "2", "--class", "red", "--class",
                            "0", "--guidance", "1.5", "-o", str(out), "--sampler", "dpm++",
                            "--steps", "4", "--seed", "3", "--json"])  # fmt: skip
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["classes"] == ["red", "blue"] and summary["guidance"] == 1.5
    names = sorted(p.name for p in out.iterdir())
    assert names == ["blue-000000.png", "blue-000001.png", "red-000000.png", "red-000001.png"]
    text = Image.open(out / "red-000001.png").text
    assert text["ddpm:class"] == "red" and text["ddpm:guidance"] == "1.5"
    assert "--class red --guidance 1.5" in text["ddpm:command"]
    # the recorded command redraws the image exactly
    again = tmp_path / "again"
    cmd = text["ddpm:command"].split()[3:]  # drop "ddpm sample CKPT"
    r = runner.invoke(app, ["sample", str(model_dir), *cmd, "-o", str(again)])
    assert r.exit_code == 0, r.output
    assert (again / "red-000001.png").read_bytes() == (out / "red-000001.png").read_bytes()

    grid = tmp_path / "grid.png"
    r = runner.invoke(app, ["sample", str(model_dir), "-n", "3", "--class", "all", "--grid",
                            str(grid), "--sampler", "dpm++", "--steps", "4"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert Image.open(grid).size == (3 * 10 + 2, 2 * 10 + 2)  # a row per class (8 px + 2)


def test_class_samples_are_guided_by_default_and_their_command_says_so(model_dir, runner,
                                                                        tmp_path):  # fmt: skip
    """With --class and no --guidance, DEFAULT_GUIDANCE (1) applies: the images equal those of
    an explicit --guidance 1, differ from --guidance 0 and 2, and the recorded command names
    it."""
    def draw(out, *extra):
        r = runner.invoke(app, ["sample", str(model_dir), "-n", "2", "--class", "red", "-o",
                                str(out), "--seed", "3", "--json", *extra])  # fmt: skip
        assert r.exit_code == 0, r.output
        return json.loads(r.stdout), (out / "red-000001.png").read_bytes()

    summary, default = draw(tmp_path / "d")
    assert summary["guidance"] == DEFAULT_GUIDANCE == 1.0
    assert summary["guidance_interval"] == "0.28,2.9" and DEFAULT_GUIDANCE_INTERVAL == (0.28, 2.9)
    assert draw(tmp_path / "one", "--guidance", "1")[1] == default
    assert draw(tmp_path / "explicit", "--guidance-interval", "0.28,2.9")[1] == default
    zero = draw(tmp_path / "zero", "--guidance", "0")[0]
    assert zero["guidance_interval"] is None  # nothing is steered
    text = Image.open(tmp_path / "zero" / "red-000001.png").text
    assert text["ddpm:command"].endswith("--class red --guidance 0.0")
    text = Image.open(tmp_path / "d" / "red-000001.png").text
    assert "--class red --guidance 1.0 --guidance-interval 0.28,2.9" in text["ddpm:command"]
    def pixels(folder):  # the image alone (its text says how it was drawn)
        return np.asarray(Image.open(folder / "red-000001.png")).tobytes()

    draw(tmp_path / "two", "--guidance", "2")
    assert pixels(tmp_path / "two") != pixels(tmp_path / "d")  # not the default of before
    # an interval that holds no step is the class alone; "all" guides every step, recorded so
    draw(tmp_path / "none", "--guidance-interval", "1e6,1e7")
    assert pixels(tmp_path / "none") == pixels(tmp_path / "zero") != pixels(tmp_path / "d")
    everywhere = draw(tmp_path / "all", "--guidance-interval", "all")[1]
    assert pixels(tmp_path / "all") not in (pixels(tmp_path / "d"), pixels(tmp_path / "zero"))
    text = Image.open(tmp_path / "all" / "red-000001.png").text
    assert text["ddpm:guidance_interval"] == "all"
    again = tmp_path / "again"
    cmd = text["ddpm:command"].split()[3:]  # the recorded command redraws it exactly
    r = runner.invoke(app, ["sample", str(model_dir), *cmd, "-o", str(again)])
    assert r.exit_code == 0 and (again / "red-000001.png").read_bytes() == everywhere, r.output
    for bad in ("2,1", "a,b", "-1,2", "1", "nan,2"):
        r = runner.invoke(app, ["sample", str(model_dir), "--class", "red", "-o",
                                str(tmp_path / "bad"), "--guidance-interval", bad])  # fmt: skip
        assert r.exit_code == 2 and "give LO,HI with 0 <= LO < HI" in r.stderr, (bad, r.output)
    r = runner.invoke(app, ["sample", str(model_dir), "--guidance-interval", "all", "-o",
                            str(tmp_path / "bad")])  # fmt: skip
    assert r.exit_code == 2 and "add --class" in r.stderr


def test_guidance_in_an_interval_is_the_class_alone_outside_it(monkeypatch):
    """forward.guided with `where`: at a guided timestep, (1 + w) out(y) - w out(none); at any
    other, out(y) from one pass over the batch alone (half the work)."""
    from ddpm_cli.model import forward
    from ddpm_cli.model.forward import guided

    passes = []

    def net(x, t, y):  # an output that depends on x, t and the label
        passes.append(x.shape[0])
        return x + t.float().view(-1, 1, 1, 1) / 10 + y.float().view(-1, 1, 1, 1) ** 2

    labels, null, w = torch.tensor([0, 1, 1]), 2, 3.0
    where = torch.tensor([False, True, True, False])
    model = guided(net, labels, w, null, where)
    x = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    for t in range(4):
        tt = torch.full((3,), t)
        cond, uncond = net(x, tt, labels), net(x, tt, torch.full_like(labels, null))
        want = cond + w * (cond - uncond) if where[t] else cond
        passes.clear()
        assert torch.equal(model(x, tt), want), t
        assert passes == ([6] if where[t] else [3])
    # on a GPU both passes run at every step and the weight is looked up on the device
    # (no host wait): the same outputs, to rounding
    monkeypatch.setattr(forward, "ONE_PASS_DEVICES", ())
    model = guided(net, labels, w, null, where)
    for t in range(4):
        tt = torch.full((3,), t)
        cond, uncond = net(x, tt, labels), net(x, tt, torch.full_like(labels, null))
        want = cond + w * (cond - uncond) if where[t] else cond
        passes.clear()
        torch.testing.assert_close(model(x, tt), want)
        assert passes == [6]


def test_cli_refuses_classes_a_model_does_not_have(model_dir, runner, tmp_path):
    r = runner.invoke(app, ["sample", str(model_dir), "--class", "cat", "-o", str(tmp_path)])
    assert r.exit_code == 2 and "unknown class 'cat'; the model knows: blue, red" in r.stderr
    r = runner.invoke(app, ["sample", str(model_dir), "--class", "7", "-o", str(tmp_path)])
    assert r.exit_code == 2 and "unknown class '7'" in r.stderr
    r = runner.invoke(app, ["sample", str(model_dir), "--class", "all", "--class", "all", "-o",
                            str(tmp_path)])  # fmt: skip
    assert r.stderr == "error: --class all is given twice; give it once\n"
    for twice in (["red", "red"], ["red", "1"], ["all", "blue"]):  # blue, red: 0, 1
        args = [a for c in twice for a in ("--class", c)]
        r = runner.invoke(app, ["sample", str(model_dir), *args, "-o", str(tmp_path)])
        name = "red" if "red" in twice else "blue"
        assert r.exit_code == 2, r.output
        assert r.stderr == (
            "error: --class all includes blue; give all, or the classes one by one\n"
            if "all" in twice
            else f"error: --class {name} is asked for twice; give each class once\n"
        )
    r = runner.invoke(app, ["sample", str(model_dir), "--guidance", "2", "-o", str(tmp_path)])
    assert r.exit_code == 2 and "add --class" in r.stderr

    (tmp_path / "pics").mkdir()
    for i in range(4):
        draw_shapes((12, 12)).save(tmp_path / "pics" / f"{i}.png")
    cfg = TrainConfig(preset="tiny", image_size=8, batch_size=4, device="cpu", seed=1, steps=1,
                      sample_every=0)  # fmt: skip
    plain = train(str(tmp_path / "pics"), cfg, DiffusionConfig(), tmp_path / "plain").out
    r = runner.invoke(app, ["sample", str(plain), "--class", "0", "-o", str(tmp_path / "o")])
    assert r.exit_code == 2 and "trained without classes; drop --class" in r.stderr
    assert "Traceback" not in r.output and not (tmp_path / "o").exists()


def test_inspect_lists_the_classes(model_dir, runner):
    r = runner.invoke(app, ["inspect", str(model_dir / "model.safetensors"), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["model"]["classes"] == ["blue", "red"]


def test_model_config_refuses_repeated_class_names():
    with pytest.raises(Exception, match="distinct"):
        ModelConfig(classes=("a", "a"))


def test_a_streamed_image_that_stops_decoding_is_replaced_with_its_label(tmp_path):
    """The stand-in image (the next readable one) brings its own label."""
    data = solid_folder(tmp_path / "d", {"a": [(RED, 3)], "b": [(BLUE, 3)]})
    images, _ = load_folder(data, (8, 8), stream=True)
    (data / "a" / "002.png").write_bytes(b"not a png any more")  # after the header scan
    feed = Batches(images, 6, seed=0, flip=False, workers=0).iterate(0, 0)
    x, y, _ = next(feed)
    assert torch.equal(y == 1, x[:, 2, 0, 0] == 255)  # blue images are labelled b, and only they


def test_training_grids_show_a_row_per_class_as_sample_draws_them(tmp_path, runner):
    data = solid_folder(tmp_path / "d", {"a": [(RED, 4)], "b": [(BLUE, 4)]})
    config = TrainConfig(preset="tiny", image_size=8, batch_size=4, device="cpu", seed=4, steps=2,
                         sample_every=2, num_samples=5)  # fmt: skip
    run = train(str(data), config, DiffusionConfig(), tmp_path / "run").out
    grid = Image.open(run / "samples" / "step-0000002.png")
    assert grid.size == (2 * 10 + 2, 2 * 10 + 2)  # 5 samples, 2 classes: 2 rows of 2
    r = runner.invoke(app, ["sample", str(run), "--seed", "4", "--class", "all", "-n", "2",
                            "--grid", str(tmp_path / "g.png")])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert torch.equal(pixels(tmp_path / "g.png"), pixels(grid))
    # one class: the usual square grid, not a strip
    r = runner.invoke(app, ["sample", str(run), "--class", "a", "-n", "4", "--steps", "2",
                            "--grid", str(tmp_path / "one.png")])  # fmt: skip
    assert r.exit_code == 0 and Image.open(tmp_path / "one.png").size == (22, 22)


@pytest.mark.parametrize("name", ["", "..", "a/b", "c\\d"])
def test_class_names_that_cannot_name_a_file_are_refused(name):
    with pytest.raises(Exception, match="cannot name a file"):
        ModelConfig(classes=("ok", name))


@pytest.mark.parametrize("kept", ["magenta", "red"])
def test_class_conditional_inpainting_fills_to_agree_with_the_kept_half(
    model_dir, runner, tmp_path, kept
):
    """The model draws solid images: given a solid top half, the filled bottom half must be
    the same colour, with --class (and its default guidance) as without; the red class holds
    red and magenta images, so both halves are ones it can complete. 40 steps, not the default
    100: the filled half is within 6 of the colour either way (measured), the bound is 40."""
    colour = {"magenta": MAGENTA, "red": RED}[kept]
    img = Image.new("RGB", (8, 8), colour)
    img.paste((0, 255, 0), (0, 4, 8, 8))  # green below: to be replaced
    img.save(tmp_path / "half.png")
    for extra in ([], ["--class", "red"]):
        out = tmp_path / f"out{len(extra)}"
        r = runner.invoke(app, ["inpaint", str(model_dir), str(tmp_path / "half.png"), "--box",
                                "0,4,8,8", "-n", "8", "-o", str(out), "--seed", "3", "--steps",
                                "40", "-q", *extra])  # fmt: skip
        assert r.exit_code == 0, r.output
        for f in r.stdout.split():
            x = pixels(f).float()  # height x width x RGB, 0..255
            assert torch.equal(x[:4], pixels(img)[:4].float())
            bottom = x[4:].mean(dim=(0, 1))
            assert (bottom - torch.tensor(colour).float()).norm() < 40, (extra, bottom)


def test_the_search_follows_links_skips_hidden_files_and_says_what_it_left_out(tmp_path,
                                                                               monkeypatch):
    """A class folder that is a link counts (Path.rglob would not follow it, and the run would
    lose the class), each folder once, by its own name: a link to a folder already searched (a
    loop, another class, a second name for one) adds nothing, so no image is trained twice or
    under another class. Hidden files do not count. What the search could not enter is
    reported: a link to nothing (an unmounted drive), a folder it cannot list."""
    import os

    data = solid_folder(tmp_path / "d", {"cat": [(RED, 3)]})
    dog = solid_folder(tmp_path / "elsewhere", {"dog": [(BLUE, 2)]}) / "dog"
    (data / "dog").symlink_to(dog, target_is_directory=True)
    (data / "cat" / "dogs").symlink_to(data / "dog", target_is_directory=True)  # another class
    (data / "latest").symlink_to(data / "cat", target_is_directory=True)  # a second name
    Image.new("RGB", (8, 8)).save(data / "cat" / ".hidden.png")
    (data / ".git").mkdir()
    Image.new("RGB", (8, 8)).save(data / ".git" / "x.png")
    (data / "cat" / "loop").symlink_to(data, target_is_directory=True)
    (data / "cat" / "gone.png").symlink_to(tmp_path / "missing.png")
    (data / "bird").symlink_to(tmp_path / "unmounted" / "bird")
    solid_folder(data / "locked", {"inner": [(RED, 1)]})
    scandir = os.scandir

    def refusing(path="."):
        if os.fspath(path) == os.fspath(data / "locked"):
            raise PermissionError(13, "Permission denied")
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refusing)
    unsearched = []
    found = scan(data, unsearched)
    assert [p.relative_to(data).as_posix() for p in found] == [
        "cat/000.png", "cat/001.png", "cat/002.png", "dog/000.png", "dog/001.png"]
    reasons = dict(unsearched)
    assert reasons == {
        str(data / "cat" / "loop"): f"{data / 'cat' / 'loop'}: a link to {data}, searched "
                                    "once, under that name",
        str(data / "cat" / "dogs"): f"{data / 'cat' / 'dogs'}: a link to {data / 'dog'}, "
                                    "searched once, under that name",
        str(data / "latest"): f"{data / 'latest'}: a link to {data / 'cat'}, searched once, "
                              "under that name",
        str(data / "cat" / "gone.png"): f"{data / 'cat' / 'gone.png'}: a link to nothing (is a "
                                        "drive or a folder missing?)",
        str(data / "bird"): f"{data / 'bird'}: a link to nothing (is a drive or a folder "
                            "missing?)",
        str(data / "locked"): f"{data / 'locked'}: cannot list this folder (Permission "
                              "denied): any images in it are left out",
    }
    images, report = load_folder(data, (8, 8))
    assert report.classes == ["cat", "dog"] and images.labels.tolist() == [0, 0, 0, 1, 1]
    assert report.unsearched == sorted(reasons.items()) and report.found == 5
    assert report.summary()["unsearched"] == 6 and report.summary()["skipped"] == 0
    assert any(w.startswith("searching the folder: ")
               and w.endswith("(and 5 more)") for w in report.warnings)  # fmt: skip
    with pytest.raises(DataError, match="cannot list this folder"):
        monkeypatch.setattr(os, "scandir", lambda path=".": refusing(data / "locked"))
        scan(data)


def test_a_link_above_the_data_searches_the_data_folder_once(tmp_path):
    """data/up -> its parent: the parent's other folders are searched (the link asks for
    them), the data folder itself is not searched again through it, and that is said."""
    data = solid_folder(tmp_path / "data", {"cat": [(RED, 1)]})
    solid_folder(tmp_path / "other", {"b": [(BLUE, 1)]})
    (data / "up").symlink_to(tmp_path, target_is_directory=True)
    unsearched = []
    assert [p.relative_to(data).as_posix() for p in scan(data, unsearched)] == [
        "cat/000.png", "up/other/b/000.png"]
    assert unsearched == [(str(data / "up" / "data"), f"{data / 'up' / 'data'}: the same folder "
                           f"as {data} (reached again through a link or a mount), searched "
                           "once, under that name")]  # fmt: skip


def test_a_class_folder_with_no_readable_image_is_refused(tmp_path):
    """It could not be learned, yet `ddpm sample --class` would draw it: training refuses it,
    naming the folder and why its images failed; inspect warns."""
    data = solid_folder(tmp_path / "d", {"cat": [(RED, 3)], "dog": [(BLUE, 2)]})
    (data / "broken").mkdir()
    (data / "broken" / "a.png").write_text("not an image")
    for stream in (False, True):
        with pytest.raises(DataError, match=r"no readable images in class folder broken "
                           r"\(e\.g\. .*broken/a\.png: .*\); fix it, move it out, or train "
                           r"with --unconditional"):  # fmt: skip
            load_folder(data, (8, 8), stream=stream)
    warnings = folder_report(data, (8, 8)).warnings
    assert "no readable images in class broken: ddpm train refuses a class it cannot learn" in (
        warnings)
    assert not any("imbalanced" in w for w in warnings)
    assert load_folder(data, (8, 8), classes=False)[1].used == 5


def test_the_default_interval_guides_the_steps_whose_noise_level_lies_in_it(
    model_dir, monkeypatch
):
    """Which of the sampler's steps run guided (two passes): those whose sigma, recomputed here
    from the schedule's closed form, lies in (0.28, 2.9]; the rest one pass."""
    import math

    sm = load_for_sampling(model_dir)
    assert sm.diffusion.schedule.value == "linear" and sm.diffusion.timesteps == 1000
    seen, forward = [], sm.model.forward

    def spy(x, t, y=None, augment=None):
        seen.append((int(t[0]), x.shape[0]))
        return forward(x, t, y, augment)

    monkeypatch.setattr(sm.model, "forward", spy)
    sampler = SamplerConfig(sampler="dpm++", steps=20)
    list(generate(sm, sampler, [0, 1], 0, 2, CPU, labels=[0, 1], guidance=2.0))
    betas = [1e-4 + (0.02 - 1e-4) * i / 999 for i in range(1000)]  # the paper's linear betas
    ab = list(itertools.accumulate((1 - b for b in betas), lambda p, a: p * a))
    guided = {t for t, n in seen if n == 4}
    assert guided == {t for t, _ in seen if 0.28 < math.sqrt((1 - ab[t]) / ab[t]) <= 2.9}
    assert 0 < len(guided) < len(seen) and all(n in (2, 4) for _, n in seen)
