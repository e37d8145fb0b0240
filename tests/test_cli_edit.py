"""`ddpm inpaint`, `ddpm upscale` and `ddpm sample --init/--guide`: pixels kept bit for bit,
equality with plain sampling where an edit keeps nothing, ILVR's block means, outputs written
like `ddpm sample`'s, and bad input refused before any work."""

from __future__ import annotations

import io
import json
import shlex

import numpy as np
import pytest
from PIL import Image

from conftest import draw_shapes
from ddpm_cli.cli import app
from ddpm_cli.config import DiffusionConfig, TrainConfig
from ddpm_cli.training.run import train

TINY = dict(preset="tiny", image_size=8, batch_size=8, sample_every=0, device="cpu", seed=1)
FAST = ["--steps", "6", "-q"]  # a few network evaluations: the tests check bits, not beauty


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny trained runs on 8x8 pictures: a v model (RGB) and an eps model (grayscale)."""
    root = tmp_path_factory.mktemp("edit-runs")
    (root / "colour").mkdir()
    (root / "gray").mkdir()
    for i in range(8):
        draw_shapes((16 + i, 16)).save(root / "colour" / f"{i}.png")
        draw_shapes((16 + i, 16), "L").save(root / "gray" / f"{i}.png")
    v = train(str(root / "colour"), TrainConfig(**TINY, steps=3), DiffusionConfig(), root / "v")
    eps_cfg = TrainConfig(**TINY, steps=3, objective="eps")
    eps = train(str(root / "gray"), eps_cfg, DiffusionConfig(timesteps=200), root / "e")
    return {"v": v.out, "eps": eps.out}


def rgb(path, size=(8, 8), seed=0):
    """A random RGB image (every pixel value occurs), saved as PNG."""
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return arr


def mask_png(path, regenerate: np.ndarray, grey=(255, 0)):
    """A mask: `regenerate` pixels at grey[0], the rest at grey[1]."""
    Image.fromarray(np.where(regenerate, *grey).astype(np.uint8), "L").save(path)


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def invoke(runner, *args):
    return runner.invoke(app, [*map(str, args)])


def ddpm(runner, runs, tmp, line: str, input: bytes | None = None):
    """Run a command line ("inpaint {v} {tmp}/a.png ..."): {v} and {eps} are the runs, {tmp}
    the test's folder; the fast sampling options are added."""
    args = line.format(v=runs["v"], eps=runs["eps"], tmp=tmp).split()
    return runner.invoke(app, [*args, *FAST], input=input)


def block_means(image: np.ndarray, factor: int) -> np.ndarray:
    """The means of an (H, W, C) image over factor x factor blocks."""
    h, w, c = image.shape
    return image.astype(float).reshape(h // factor, factor, w // factor, factor, c).mean((1, 3))


LOWER = np.zeros((8, 8), bool)
LOWER[4:] = True


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++"])
def test_known_pixels_are_kept_bit_for_bit(runner, runs, tmp_path, sampler):
    original = rgb(tmp_path / "photo.png")
    regenerate = LOWER.copy()
    regenerate[0, 0] = True
    # grey above 50% counts as white (regenerate), below as black (keep)
    mask_png(tmp_path / "mask.png", regenerate, grey=(129, 126))
    r = ddpm(runner, runs, tmp_path, "inpaint {v} {tmp}/photo.png --mask {tmp}/mask.png -n 2 "
             f"-o {{tmp}}/out --sampler {sampler} --resample 2 --jump 2")  # fmt: skip
    assert r.exit_code == 0, r.output
    files = r.stdout.split()
    assert [f.rsplit("/", 1)[1] for f in files] == ["photo-000000.png", "photo-000001.png"]
    for f in files:
        out = pixels(f)
        assert np.array_equal(out[~regenerate], original[~regenerate])
        assert not np.array_equal(out[regenerate], original[regenerate])
    assert not np.array_equal(pixels(files[0]), pixels(files[1]))


def test_an_all_white_mask_is_plain_sampling_and_the_box_and_the_redraw_command(
    runner, runs, tmp_path, monkeypatch
):
    rgb(tmp_path / "photo.png")
    mask_png(tmp_path / "white.png", np.ones((8, 8), bool))
    a = ddpm(
        runner,
        runs,
        tmp_path,
        "inpaint {v} {tmp}/photo.png --mask {tmp}/white.png --seed 4 -n 2 -o {tmp}/a -r 1",
    )
    # inpainting's default sampler, named
    b = ddpm(
        runner,
        runs,
        tmp_path,
        "sample {v} --seed 4 -n 2 -o {tmp}/b --sampler ddpm --variance small",
    )
    assert a.exit_code == 0 and b.exit_code == 0, a.output + b.output
    for x, y in zip(a.stdout.split(), b.stdout.split(), strict=True):
        assert np.array_equal(pixels(x), pixels(y))
    # a box; the recorded command redraws image 1 bit for bit
    r = ddpm(
        runner, runs, tmp_path, "inpaint {v} {tmp}/photo.png --box 2,2,6,8 --seed 9 -n 2 -o {tmp}/c"
    )
    assert r.exit_code == 0, r.output
    second = tmp_path / "c" / "photo-000001.png"
    text = Image.open(second).text
    assert json.loads(text["ddpm:edit"])["command"] == "inpaint"
    assert len(text["ddpm:input_hash"]) == 64
    command = shlex.split(text["ddpm:command"])
    assert command[:2] == ["ddpm", "inpaint"] and "--box" in command
    monkeypatch.chdir(runs["v"])
    command[3] = str(tmp_path / "photo.png")
    redo = invoke(runner, *command[1:], "-o", tmp_path / "redo", "-q")
    assert redo.exit_code == 0, redo.output
    assert np.array_equal(pixels(tmp_path / "redo" / "photo-000001.png"), pixels(second))


def test_folders_pair_by_name_grid_stdout_and_json(runner, runs, tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "masks").mkdir()
    originals = {n: rgb(tmp_path / "imgs" / f"{n}.png", seed=i) for i, n in enumerate("ab")}
    mask_png(tmp_path / "masks" / "a.png", LOWER)
    mask_png(tmp_path / "masks" / "b.png", ~LOWER)
    for folder in ("imgs", "masks"):  # what a Mac leaves beside each file: skipped, as in training
        (tmp_path / folder / "._a.png").write_bytes(b"Mac OS X")
    r = ddpm(runner, runs, tmp_path, "inpaint {v} {tmp}/imgs --mask {tmp}/masks -n 3 "
             "-o {tmp}/out --grid {tmp}/grid.png --json")  # fmt: skip
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["edit"]["inputs"] == ["a.png", "b.png"] and len(summary["files"]) == 6
    # each input's own arguments, as its PNGs record them (its mask here)
    edit = json.loads(Image.open(tmp_path / "out" / "b-000002.png").text["ddpm:edit"])
    assert edit["args"] == summary["edit"]["input_args"][1] + summary["edit"]["args"]
    assert summary["edit"]["input_args"][1] == [f"{tmp_path}/imgs/b.png", "--mask",
                                                f"{tmp_path}/masks/b.png"]  # fmt: skip
    assert np.array_equal(pixels(tmp_path / "out" / "b-000002.png")[LOWER], originals["b"][LOWER])
    grid = Image.open(tmp_path / "grid.png")
    assert grid.size == (2 + 4 * 10, 2 + 2 * 10)  # a row per input: the input, then 3 fills
    # one image to stdout, from stdin
    data = (tmp_path / "imgs" / "a.png").read_bytes()
    r = ddpm(runner, runs, tmp_path, "inpaint {v} - --mask {tmp}/masks/a.png -o -", data)
    assert r.exit_code == 0, r.output
    out = np.asarray(Image.open(io.BytesIO(r.stdout_bytes)))
    assert np.array_equal(out[~LOWER], originals["a"][~LOWER])
    # one mask from stdin for a folder of images: read once, used for each
    mask = (tmp_path / "masks" / "a.png").read_bytes()
    r = ddpm(runner, runs, tmp_path, "inpaint {v} {tmp}/imgs --mask - -o {tmp}/same", mask)
    assert r.exit_code == 0, r.output
    for n in "ab":
        out = pixels(tmp_path / "same" / f"{n}-000000.png")
        assert np.array_equal(out[~LOWER], originals[n][~LOWER])


def test_transparent_inputs_are_drawn_on_white_as_training_draws_them(runner, runs, tmp_path):
    """A model of 1 or 3 channels trained on transparent images drawn over white: an edit's
    input is drawn the same way, not with the colour hidden under its transparent pixels (black
    here). The kept pixels of an inpainting show it bit for bit: white, a half-transparent red
    blended half-way to white, the opaque ones unchanged."""
    arr = np.zeros((8, 8, 4), np.uint8)  # transparent black
    arr[:, 4:] = (200, 30, 30, 255)
    arr[0, 0:4] = (200, 0, 0, 128)
    Image.fromarray(arr, "RGBA").save(tmp_path / "logo.png")
    keep_all = np.zeros((8, 8), bool)
    keep_all[7, 7] = True  # one pixel drawn, the rest kept
    mask_png(tmp_path / "m.png", keep_all)
    r = ddpm(runner, runs, tmp_path, "inpaint {v} {tmp}/logo.png --mask {tmp}/m.png -o {tmp}/o")
    assert r.exit_code == 0, r.output
    out = pixels(r.stdout.strip())
    assert out.shape == (8, 8, 3)
    assert (out[1:, :4] == 255).all() and (out[:7, 4:] == (200, 30, 30)).all()
    assert (out[0, :4] == (227, 127, 127)).all(), out[0, :4]  # 200a + 255(1 - a), a = 128/255


def test_outpainting_keeps_the_image_inside_the_canvas(runner, runs, tmp_path):
    inner = rgb(tmp_path / "narrow.png", size=(4, 8))
    r = ddpm(runner, runs, tmp_path, "inpaint {v} {tmp}/narrow.png --outpaint 2,0,2,0 -o {tmp}/o")
    assert r.exit_code == 0, r.output
    assert np.array_equal(pixels(tmp_path / "o" / "narrow-000000.png")[:, 2:6], inner)
    rgb(tmp_path / "big.png", size=(20, 20))
    r = ddpm(
        runner, runs, tmp_path, "inpaint {v} {tmp}/big.png --outpaint 0,2,0,2 --resize -o {tmp}/o2"
    )
    assert r.exit_code == 0, r.output
    assert pixels(tmp_path / "o2" / "big-000000.png").shape == (8, 8, 3)


def test_sdedit_strength(runner, runs, tmp_path):
    """--strength near 0 gives the input back; the distance grows with it; 1 is `ddpm sample`."""
    gray = np.asarray(draw_shapes((8, 8), "L"))
    Image.fromarray(gray).save(tmp_path / "g.png")
    distances = []
    for s in ("0.005", "0.3", "0.7"):
        r = ddpm(runner, runs, tmp_path, f"sample {{eps}} --init {{tmp}}/g.png --strength {s} "
                 f"-n 4 --seed 2 -o {{tmp}}/{s} --sampler ddim")  # fmt: skip
        assert r.exit_code == 0, r.output
        outs = np.stack([pixels(f).astype(float) for f in r.stdout.split()])
        distances.append(float(np.abs(outs - gray).mean()))
    assert distances[0] < 3 and distances[0] < distances[1] < distances[2], distances
    one = ddpm(
        runner,
        runs,
        tmp_path,
        "sample {eps} --init {tmp}/g.png --strength 1 -n 1 --seed 2 -o {tmp}/one",
    )
    plain = ddpm(runner, runs, tmp_path, "sample {eps} -n 1 --seed 2 -o {tmp}/plain")
    assert np.array_equal(pixels(one.stdout.strip()), pixels(plain.stdout.strip()))


@pytest.mark.parametrize("factor", [2, 4, 8])
def test_upscaled_block_means_are_the_small_image(runner, runs, tmp_path, factor):
    """ILVR: the output's means over factor x factor blocks are the small image's pixels
    (within the 8-bit rounding); seeds differ inside."""
    small = rgb(tmp_path / "small.png", size=(8 // factor, 8 // factor), seed=factor)
    r = ddpm(runner, runs, tmp_path, "upscale {v} {tmp}/small.png -n 2 -o {tmp}/out --sampler ddpm")
    assert r.exit_code == 0, r.output
    outs = [pixels(f) for f in r.stdout.split()]
    for out in outs:
        assert out.shape == (8, 8, 3)
        assert np.abs(block_means(out, factor) - small).max() <= 0.5
    if factor < 8:
        assert np.abs(outs[0].astype(int) - outs[1]).max() > 2


def test_guided_variations_keep_the_references_block_means(runner, runs, tmp_path):
    ref = rgb(tmp_path / "ref.png")
    r = ddpm(runner, runs, tmp_path, "sample {v} --guide {tmp}/ref.png --factor 2 -n 2 -o {tmp}/o")
    assert r.exit_code == 0, r.output
    for f in r.stdout.split():
        assert np.abs(block_means(pixels(f), 2) - block_means(ref, 2)).max() <= 0.5


@pytest.mark.parametrize(
    "args, message",
    [
        (["inpaint", "{v}", "{img}", "--mask", "{black}"], "the mask {black} has no white"),
        (["inpaint", "{v}", "{img}", "--mask", "{big_mask}"], "{big_mask} is 9x9 and {img} is"),
        (["inpaint", "{v}", "{img}", "--box", "4,4,9,8"], "not inside"),
        (["inpaint", "{v}", "{img}", "--box", "4,4,4,8"], "not inside"),
        (["inpaint", "{v}", "{img}", "--box", "1,2,3"], "four non-negative integers"),
        (["inpaint", "{v}", "{img}"], "say what to regenerate"),
        (["inpaint", "{v}", "{img}", "--mask", "{black}", "--box", "0,0,1,1"], "got --mask and"),
        (["inpaint", "{v}", "{big}", "--box", "0,0,1,1"], "add --resize"),
        (["inpaint", "{v}", "{img}", "--outpaint", "2,0,2,0"], "canvas"),
        (["inpaint", "{v}", "{gray}", "--box", "0,0,1,1"], "is grayscale; the model draws RGB"),
        (["inpaint", "{v}", "{imgs}", "--mask", "{masks}"], "no mask for b.png"),
        (["sample", "{v}", "--init", "{img}", "--strength", "0"], "above 0 and at most 1"),
        (["sample", "{v}", "--init", "{img}", "--strength", "1.5"], "value for '--strength'"),
        (["sample", "{v}", "--strength", "0.5"], "add --init"),
        (["sample", "{v}", "--init", "{grays}"], "is grayscale; the model draws RGB"),
        (["sample", "{eps}", "--init", "{imgs}"], "is RGB; the model draws grayscale"),
        (["sample", "{v}", "--init", "{img}", "--guide", "{img}"], "use one"),
        (["sample", "{v}", "--guide", "{img}", "--factor", "3"], "--factor must be 2, 4 or 8"),
        (["upscale", "{v}", "{img}"], "img.png is 8x8 and the model draws 8x8: upscale needs"),
        (["inpaint", "{v}", "{imgs}", "--mask", "{dupmasks}"],
         "masks a.bmp and a.jpg both pair with a.png; keep one in the mask folder"),
        (["sample", "{v}", "--init", "{twins}", "-n", "1"],
         "would write the same output files (a-000000.png, ...); rename one, or edit them apart"),
        (["upscale", "{v}", "{small3}", "--factor", "2"], "add --resize"),
        (["upscale", "{v}", "{missing}"], "no such file"),
        (["upscale", "{v}", "{mixed}"], "one command upscales by one factor"),
        (["inpaint", "{v}", "{img}", "--mask", "{alpha_mask}"], "has transparent pixels"),
        (["inpaint", "{v}", "{img}", "--mask", "-"], "no data on stdin for the mask"),
        (["upscale", "{v}", "-"], "no data on stdin for the image"),
        (
            ["inpaint", "{v}", "{img}", "--box", "0,0,1,1", "--jump", "6", "--steps", "6"],
            "is not shorter than the sampler's 6 steps",
        ),
        (
            ["inpaint", "{v}", "{img}", "--box", "0,0,1,1", "--grid", "{img}", "--overwrite"],
            "is the input image",
        ),
        (
            [
                "inpaint",
                "{v}",
                "{imgs}",
                "--box",
                "0,0,1,1",
                "--grid",
                "{imgs}/a.png",
                "--overwrite",
            ],
            "is the input image",
        ),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(runner, runs, tmp_path, args, message):
    rgb(tmp_path / "img.png")
    rgb(tmp_path / "big.png", size=(9, 8))
    rgb(tmp_path / "small3.png", size=(3, 3))
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "gray.png")
    mask_png(tmp_path / "black.png", np.zeros((8, 8), bool))
    mask_png(tmp_path / "big_mask.png", np.ones((9, 9), bool))
    Image.new("RGBA", (8, 8), (255, 255, 255, 0)).save(tmp_path / "alpha_mask.png")
    for folder in ("imgs", "masks", "grays", "mixed", "dupmasks", "twins"):
        (tmp_path / folder).mkdir()
    for name in ("a.bmp", "a.jpg", "b.png"):
        Image.fromarray(np.where(LOWER, 255, 0).astype(np.uint8), "L").save(
            tmp_path / "dupmasks" / name)  # fmt: skip
    rgb(tmp_path / "twins" / "a.png")
    Image.open(tmp_path / "twins" / "a.png").save(tmp_path / "twins" / "a.bmp")
    rgb(tmp_path / "mixed" / "four.png", size=(4, 4))
    rgb(tmp_path / "mixed" / "two.png", size=(2, 2))
    rgb(tmp_path / "imgs" / "a.png")
    rgb(tmp_path / "imgs" / "b.png")
    mask_png(tmp_path / "masks" / "a.png", LOWER)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "grays" / "g.png")
    paths = {
        name: tmp_path / f"{name}.png"
        for name in ("img", "big", "small3", "gray", "black", "big_mask", "missing", "alpha_mask")
    }
    paths.update(
        {f: tmp_path / f for f in ("imgs", "masks", "grays", "mixed", "dupmasks", "twins")},
        v=runs["v"], eps=runs["eps"],
    )
    before = sorted(tmp_path.rglob("*"))
    r = invoke(runner, *[a.format(**paths) for a in args], "-o", tmp_path / "out", "-q")
    assert r.exit_code == 2, r.output
    # a file given by path is named as typed, its folder included
    assert message.format(**paths) in r.stderr and "Traceback" not in r.output, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert sorted(tmp_path.rglob("*")) == before


def test_inpainting_defaults_to_ddpm_over_100_steps_with_the_small_variance(runner, runs, tmp_path):
    """The measured default (docs/editing.md), also when only --sampler ddpm is named; what
    the user gives wins."""
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "g.png")
    for i, (extra, want) in enumerate(
        [
            ("", ("ddpm", 100, "small")),
            ("--sampler ddpm", ("ddpm", 100, "small")),
            ("--sampler ddpm --steps 7 --variance large", ("ddpm", 7, "large")),
            ("--variance large", ("ddpm", 100, "large")),
            ("--sampler dpm++ --steps 5", ("dpm++", 5, "large")),
        ]
    ):
        line = f"inpaint {runs['eps']} {tmp_path}/g.png --box 0,0,4,4 -r 1 --json -o {tmp_path}/{i}"
        r = runner.invoke(app, [*line.split(), *extra.split(), "-q"])
        assert r.exit_code == 0, r.output
        sampler = json.loads(r.stdout)["sampler"]
        assert (sampler["sampler"], sampler["steps"], sampler["variance"]) == want, extra
