"""Training data: in memory or streamed from disk, the same batches either way; data caches."""

from __future__ import annotations

import pytest
import torch

import ddpm_cli.data.folders as data
import ddpm_cli.data.sources as sources
from conftest import draw_shapes
from ddpm_cli.cli import app
from ddpm_cli.config import DiffusionConfig, TrainConfig
from ddpm_cli.data.batches import Batches, reflected
from ddpm_cli.errors import DataError, UsageError
from ddpm_cli.store.checkpoint import load_checkpoint
from ddpm_cli.training.run import train

FAST = dict(preset="tiny", image_size=8, batch_size=4, sample_every=0, device="cpu", seed=5)


@pytest.fixture
def pictures(tmp_path):
    """Eleven different pictures of different sizes and modes, in nested folders."""
    folder = tmp_path / "pictures"
    (folder / "sub").mkdir(parents=True)
    for i in range(11):
        img = draw_shapes((20 + 3 * i, 16 + 2 * i)).rotate(30 * i)
        where = folder / "sub" if i % 3 else folder
        img.convert("L" if i == 4 else "RGB").save(where / f"{i:02d}.{'jpg' if i == 7 else 'png'}")
    return folder


def all_batches(images, workers=0, epochs=3, batch_size=4, start=(0, 0)):
    batches = Batches(images, batch_size, seed=9, flip=True, workers=workers)
    feed = batches.iterate(*start)
    out = [next(feed)[0] for _ in range(epochs * batches.per_epoch)]
    feed.close()
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_streamed_batches_are_the_in_memory_batches(pictures, workers):
    memory, report_m = data.load_folder(pictures, (8, 8), stream=False)
    disk, report_d = data.load_folder(pictures, (8, 8), stream=True)
    assert isinstance(memory, data.InMemory) and isinstance(disk, data.OnDisk)
    assert report_d.streamed and not report_m.streamed
    assert report_d.used == report_m.used == 11 and report_d.channels == report_m.channels == 3
    assert report_d.fingerprint == report_m.fingerprint
    a, b = all_batches(memory), all_batches(disk, workers)
    assert len(a) == len(b) == 9
    for x, y in zip(a, b, strict=True):
        assert x.dtype == y.dtype == torch.uint8 and torch.equal(x, y)
    # flips happen, and differ between epochs: the batches are not one fixed order
    assert not torch.equal(a[0], a[3])
    # starting mid-run gives the same batches as reaching that point
    later = all_batches(disk, workers, epochs=2, start=(1, 1))[:5]
    assert all(torch.equal(x, y) for x, y in zip(a[4:], later, strict=True))


def test_data_that_would_not_fit_in_memory_is_streamed(pictures, monkeypatch):
    monkeypatch.setattr(data, "available_memory", lambda: 1000)
    images, report = data.load_folder(pictures, (8, 8))
    assert isinstance(images, data.OnDisk) and report.streamed
    assert report.bytes == 11 * 3 * 8 * 8
    monkeypatch.setattr(data, "available_memory", lambda: 10**9)
    assert isinstance(data.load_folder(pictures, (8, 8))[0], data.InMemory)


def test_streaming_reads_channels_and_unreadable_files_from_headers(tmp_path):
    gray = tmp_path / "gray"
    gray.mkdir()
    for i in range(3):
        draw_shapes((12, 12), "L").save(gray / f"{i}.png")
    (gray / "junk.png").write_bytes(b"not an image")
    images, report = data.load_folder(gray, (8, 8), stream=True)
    assert report.channels == 1 and report.used == 3 and len(report.skipped) == 1
    assert images[0][0].shape == (1, 8, 8)


def test_an_image_that_breaks_mid_run_is_replaced_and_reported(pictures):
    images, _ = data.load_folder(pictures, (8, 8), stream=True)
    broken = images.paths[2]
    head = broken.read_bytes()[:60]  # a valid header, then nothing: decoding fails later
    broken.write_bytes(head)
    x, failed, used = images[2]
    assert failed and failed[0][0] == str(broken) and used == 3
    assert torch.equal(x, images[3][0])  # the next image stands in, the same one every time
    # an image set aside (for the run's quality figure) never stands in: the next trained one
    batches = Batches(images, 11, seed=1, flip=False, use=torch.tensor([0, 1, 2, 4, 5, 6]))
    assert batches.images[2][2] == 4 and torch.equal(batches.images[2][0], images[4][0])
    assert batches.images[6][2] == 6 and images.pool is None  # the run's copy is limited
    seen = []
    batches = Batches(images, 11, seed=1, flip=False, on_skip=seen.extend)
    next(batches.iterate(0, 0))
    assert [p for p, _ in seen] == [str(broken)]
    # a run lists it once in skipped.txt, however many epochs meet it
    cfg = TrainConfig(**FAST, stream=True, workers=0, steps=9)
    run = train(str(pictures), cfg, DiffusionConfig(), out=pictures.parent / "run")
    lines = (run.out / "skipped.txt").read_text().splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(broken)]


def test_a_streamed_run_resumes_exactly_and_refuses_a_changed_folder(pictures, tmp_path):
    cfg = dict(FAST, stream=True, workers=1, data_cache=False, checkpoint_every=2)
    whole = train(str(pictures), TrainConfig(**cfg, steps=4), DiffusionConfig(), out=tmp_path / "w")
    part = train(str(pictures), TrainConfig(**cfg, steps=2), DiffusionConfig(), out=tmp_path / "p")
    assert not (part.out / "data_cache.safetensors").exists()
    summary = load_checkpoint(part.out / "model.safetensors").config["data"]
    assert summary["streamed"] and summary["fingerprint"]
    draw_shapes((30, 30)).save(pictures / "new.png")
    with pytest.raises(UsageError, match="has changed since the run started"):
        train(None, TrainConfig(), DiffusionConfig(), resume=part.out, given={"steps": 4})
    (pictures / "new.png").unlink()
    train(None, TrainConfig(), DiffusionConfig(), resume=part.out, given={"steps": 4})
    a = load_checkpoint(whole.out / "train_state.safetensors").tensors
    b = load_checkpoint(part.out / "train_state.safetensors").tensors
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_data_cache_feeds_a_new_run(pictures, tmp_path, runner):
    first = train(
        str(pictures), TrainConfig(**FAST, steps=1), DiffusionConfig(), out=tmp_path / "a"
    )
    cache = first.out / "data_cache.safetensors"
    images, report = sources.load_source(str(cache), (8, 8), None)
    direct, _ = data.load_folder(pictures, (8, 8))
    assert torch.equal(images.data, direct.data)
    assert report.source == str(pictures) and report.summary()["found"] == 11
    second = train(str(cache), TrainConfig(**FAST, steps=1), DiffusionConfig(), out=tmp_path / "b")
    assert load_checkpoint(second.out / "model.safetensors").config["data"]["source"] == str(
        pictures
    )
    with pytest.raises(DataError, match="holds 8 images; .* --image-size 8"):
        sources.load_source(str(cache), (16, 16), None)
    with pytest.raises(DataError, match="holds 3-channel images"):
        sources.load_source(str(cache), (8, 8), 1)
    result = runner.invoke(app, ["train", str(cache), "--image-size", "16", "--out", "x"])
    assert result.exit_code == 2 and "--image-size 8" in result.output


def test_resume_refuses_a_new_schedule_or_length_of_chain(pictures, tmp_path):
    run = train(str(pictures), TrainConfig(**FAST, steps=1), DiffusionConfig(), out=tmp_path / "r")
    refused = (
        ({"schedule": "cosine"}, r"--schedule cosine \(the run has linear\)"),
        ({"timesteps": 10}, r"--timesteps 10 \(the run has 1000\)"),
        # as the option is typed (WIDTHxHEIGHT), not as a Python list
        ({"image_size": "16x8"}, r"--image-size 16x8 \(the run has 8x8\)"),
        ({"image_size": (8, 16)}, r"--image-size 16x8 \(the run has 8x8\)"),
        ({"flip": False}, r"--no-flip \(the run has it on\)"),
    )
    for given, text in refused:
        with pytest.raises(UsageError, match=f"cannot change on resume: {text}"):
            train(None, TrainConfig(), DiffusionConfig(), resume=run.out, given=given)
    # the stored values themselves are fine (and one more step, for the run to have work)
    again = train(None, TrainConfig(), DiffusionConfig(), resume=run.out,
                  given={"timesteps": 1000, "steps": 2})  # fmt: skip
    assert again.step == 2


def test_the_default_training_size_is_the_datas_own(tmp_path, pictures):
    """Without --image-size a run trains at its images' median shorter side, rounded down to a
    multiple of 4, between 8 and 32: 8x8 images are not blown up to 32x32 (16x the work)."""
    assert sources.auto_image_size([(8, 8)] * 3) == (8, 8)
    assert sources.auto_image_size([(25, 25), (25, 30), (40, 25)]) == (24, 24)
    assert sources.auto_image_size([(28, 28)]) == (28, 28)
    assert sources.auto_image_size([(640, 480), (10, 10), (800, 600)]) == (32, 32)
    assert sources.auto_image_size([(5, 5)]) == (8, 8)
    # pictures: shorter sides 16, 18, ..., 36: median 26 -> 24
    assert sources.data_image_size(str(pictures)) == (24, 24)
    assert sources.data_image_size(None) == sources.data_image_size("builtin:shapes") == (32, 32)
    small = tmp_path / "small"
    small.mkdir()
    for i in range(6):
        draw_shapes((12, 12)).convert("L").save(small / f"{i}.png")
    (small / "broken.png").write_bytes(b"not an image")
    run = train(str(small), TrainConfig(**{**FAST, "image_size": None}, steps=1),
                DiffusionConfig(), out=tmp_path / "run")  # fmt: skip
    ckpt = load_checkpoint(run.out / "model.safetensors")
    assert ckpt.config["model"]["image_size"] == [12, 12]
    assert ckpt.config["training"]["image_size"] == [12, 12]
    cache = run.out / "data_cache.safetensors"
    assert sources.data_image_size(str(cache)) == (12, 12)


def test_shift_translates_each_image_with_a_reflected_border_as_numpy_pads_it():
    """--shift N: each image moved by its own (dy, dx) in [-N, N], checked against numpy's
    reflect padding; the shifts follow the seed and epoch (a resumed run sees the same)."""
    import numpy as np

    from ddpm_cli.data.folders import InMemory

    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 256, (12, 3, 7, 9), generator=g, dtype=torch.uint8)
    batches = Batches(InMemory(data), 12, seed=4, flip=True, shift=3)
    seen = set()
    for epoch in range(3):
        idx, fl, sh = batches.indices(epoch, 0)
        got, _, shifts = next(batches.iterate(epoch, 0))
        assert torch.equal(shifts, sh)  # what the network is told (non-leaking augmentation)
        for k in range(12):
            img = data[idx[k]].numpy()
            if fl[k]:
                img = img[:, :, ::-1]
            dy, dx = sh[k].tolist()
            assert abs(dy) <= 3 and abs(dx) <= 3
            padded = np.pad(img, ((0, 0), (3, 3), (3, 3)), mode="reflect")
            expected = padded[:, 3 - dy : 3 - dy + 7, 3 - dx : 3 - dx + 9]
            assert np.array_equal(got[k].numpy(), expected)
            seen.add((dy, dx))
    assert len(seen) > 10  # many different shifts, zero among the possible ones
    again = Batches(InMemory(data), 12, seed=4, flip=True, shift=3)
    assert torch.equal(again.batch(2, 0), batches.batch(2, 0))
    plain = Batches(InMemory(data), 12, seed=4, flip=True)  # shift 0: flips as before
    assert torch.equal(plain.indices(1, 0)[1], batches.indices(1, 0)[1])
    assert next(plain.iterate(0, 0)).shifts is None


def test_the_shift_map_marks_the_pixels_the_reflection_filled():
    """reflected(): what a network trained with --shift is told. Checked against numpy: an
    image of ones padded with zeros instead of reflected, then cut as the shift cuts it, is 0
    exactly where the reflection filled."""
    import numpy as np

    shifts = torch.tensor([[0, 0], [2, 0], [0, -3], [-1, 2], [3, 3], [-3, -1]])
    got = reflected(shifts, 7, 9)
    assert got.shape == (6, 1, 7, 9) and got.dtype == torch.float32
    for k, (dy, dx) in enumerate(shifts.tolist()):
        padded = np.pad(np.ones((7, 9)), 3)
        kept = padded[3 - dy : 3 - dy + 7, 3 - dx : 3 - dx + 9]
        assert np.array_equal(got[k, 0].numpy(), 1 - kept)
    assert got[0].sum() == 0  # no shift: an empty map, as sampling gives


def test_a_network_told_of_the_shifts_draws_unshifted_images(tmp_path, runner):
    """The point of telling it, learned: every training image holds a 2x2 square at the
    centre, which --shift 2 moves up to 2 pixels each way. Told where each image was filled by
    reflection, the network draws the square at the centre; not told (the map's convolution
    left out), it drew the square wherever the shifts had put it, 5% of samples centred."""
    import numpy as np
    from PIL import Image

    pics = tmp_path / "pics"
    pics.mkdir()
    for i in range(24):
        img = torch.zeros(8, 8, dtype=torch.uint8)
        img[3:5, 3:5] = 140 + 5 * i
        Image.fromarray(img.numpy(), "L").save(pics / f"{i}.png")
    cfg = TrainConfig(preset="tiny", batch_size=16, device="cpu", seed=1, steps=600, shift=2,
                      holdout=0, sample_every=0, log_every=100)  # fmt: skip
    run = train(str(pics), cfg, DiffusionConfig(schedule=None), tmp_path / "run").out
    r = runner.invoke(app, ["sample", str(run), "-n", "48", "--seed", "0", "-o",
                            str(tmp_path / "s"), "-q"])  # fmt: skip
    assert r.exit_code == 0, r.output
    rows, cols = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    centred = 0
    for p in sorted((tmp_path / "s").glob("*.png")):
        x = torch.from_numpy(np.asarray(Image.open(p), dtype=np.float64))
        w = (x - x.mean()).clamp(min=0)  # where the square is drawn
        cy, cx = float((w * rows).sum() / w.sum()), float((w * cols).sum() / w.sum())
        centred += abs(cy - 3.5) < 0.75 and abs(cx - 3.5) < 0.75
    # told, with 64 samples: 24 centred after 300 steps, all 64 after 600 and 1000; not told,
    # 3 of 64 after 600 and 1 of 64 after 1000 (the square where the shifts had put it)
    assert centred >= 0.75 * 48, centred


def test_a_shift_as_large_as_the_image_is_one_line_exit_2(runner, tmp_path):
    r = runner.invoke(app, ["train", "--image-size", "16", "--shift", "16", "--steps", "1",
                            "-o", str(tmp_path / "run")])  # fmt: skip
    assert r.exit_code == 2 and "shift 16 must be less than the image size 16" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_a_small_folder_warns_and_is_shifted_by_default(tmp_path):
    """Below TINY_DATASET images the report warns that the model will memorise them. Below
    SHIFT_BELOW images a run shifts them by 1/16 of the shorter side (none below 16 pixels),
    the network told (the default measured on real images, docs/training.md#small-datasets);
    a given --shift, 0 included, is kept."""
    from ddpm_cli.data.folders import TINY_DATASET
    from ddpm_cli.data.sources import load_source
    from ddpm_cli.training.train import SHIFT_BELOW, resolve

    for i in range(5):
        draw_shapes((12 + i, 12)).save(tmp_path / f"{i}.png")
    _, report = load_source(str(tmp_path), (8, 8), 3)
    (warning,) = [w for w in report.warnings if "memorise" in w]
    assert warning.startswith("only 5 images") and TINY_DATASET == 100
    assert SHIFT_BELOW == 2000
    cpu = torch.device("cpu")
    for n, size, shift, want in [(5, 8, None, 0), (5, 16, None, 1), (1999, 32, None, 2),
                                 (2000, 32, None, 0), (10, (64, 48), None, 3), (10, 32, 0, 0),
                                 (5000, 32, 3, 3), (5, 8, 2, 2)]:  # fmt: skip
        config = resolve(TrainConfig(image_size=size, shift=shift), cpu, n, 3)
        assert config.shift == want, (n, size, shift)


def test_images_below_the_training_size_on_either_side_are_counted_as_upscaled(tmp_path):
    """A 2000x2 strip is upscaled for an 8x8 run (its height is below 8): the warning says it is
    narrow or short, not 'smaller than 8x8'; an image at the size or above on both sides is not
    counted."""
    from PIL import Image

    from ddpm_cli.data.sources import load_source

    for i, size in enumerate([(2000, 2), (8, 8), (30, 9), (4, 20)]):
        Image.new("RGB", size, (200, 40, 40)).save(tmp_path / f"{i}.png")
    _, report = load_source(str(tmp_path), (8, 8), 3)
    (warning,) = [w for w in report.warnings if "upscaled" in w]
    assert warning == "2 images narrower than 8 or shorter than 8 pixels were upscaled"
    (tmp_path / "one").mkdir()
    for i, size in enumerate([(20, 30), (40, 16)]):
        Image.new("RGB", size, (40, 200, 40)).save(tmp_path / "one" / f"{i}.png")
    _, report = load_source(str(tmp_path / "one"), (16, 40), 3)  # (height, width)
    (warning,) = [w for w in report.warnings if "upscaled" in w]
    assert warning == "1 image narrower than 40 or shorter than 16 pixels was upscaled"


def test_transparency_is_drawn_on_white_unless_the_model_learns_it(tmp_path):
    """Sprites store arbitrary colour under transparent pixels (here black): training on it
    would teach the model a background nobody sees. Colour and gray+alpha files, and a
    palette with a transparent index, are drawn over white, at full size before the resize,
    alike in memory and streamed; --channels 4 keeps the alpha as the fourth channel."""
    from PIL import Image

    folder = tmp_path / "sprites"
    folder.mkdir()
    sprite = Image.new("RGBA", (16, 16), (0, 0, 0, 0))  # transparent black
    sprite.paste((255, 0, 0, 255), (4, 4, 12, 12))  # an opaque red square
    sprite.paste((0, 0, 255, 128), (0, 0, 4, 4))  # half-transparent blue
    sprite.save(folder / "rgba.png")
    sprite.convert("LA").save(folder / "la.png")
    palette = Image.new("P", (16, 16), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0])
    palette.paste(1, (4, 4, 12, 12))
    palette.save(folder / "p.png", transparency=0)
    Image.new("RGB", (16, 16), (0, 0, 0)).save(folder / "opaque.png")
    memory, report = data.load_folder(folder, (16, 16), stream=False)
    disk, streamed = data.load_folder(folder, (16, 16), stream=True)
    assert report.matted == streamed.matted == 3
    assert any("3 images have an alpha channel" in w for w in report.warnings)
    names = sorted(p.name for p in folder.iterdir())  # the loader's order
    x = {n: memory.data[i] for i, n in enumerate(names)}
    assert all(torch.equal(memory.data[i], disk[i][0]) for i in range(len(names)))
    white, red = torch.tensor([255, 255, 255]), torch.tensor([255, 0, 0])
    for name in ("rgba.png", "p.png"):
        assert torch.equal(x[name][:, 0, 15], white) and torch.equal(x[name][:, 8, 8], red)
    half = x["rgba.png"][:, 1, 1].float()  # 128/255 blue over white
    assert torch.allclose(half, torch.tensor([127.0, 127.0, 255.0]), atol=1.0)
    assert x["la.png"][:, 0, 15].tolist() == [255] * 3  # gray+alpha, as colour here
    assert torch.equal(x["opaque.png"][:, 0, 15], torch.zeros(3, dtype=torch.uint8))
    # --channels 4: the transparency is the model's to learn, the colour left as it was
    four, report4 = data.load_folder(folder, (16, 16), channels=4, stream=False)
    rgba = four.data[names.index("rgba.png")]
    assert report4.matted == 0 and not any("alpha" in w for w in report4.warnings)
    assert rgba[:, 0, 15].tolist() == [0, 0, 0, 0] and rgba[:, 8, 8].tolist() == [255, 0, 0, 255]


def test_every_skipped_file_is_named_in_its_reason(tmp_path, monkeypatch):
    """A skipped file's reason starts with its path, whatever went wrong: a float TIFF, a file
    that cannot be read (before, the bare "32-bit float ..." or Python's "[Errno 13] ...")."""
    from pathlib import Path

    from PIL import Image

    draw_shapes((8, 8)).save(tmp_path / "ok.png")
    Image.new("F", (8, 8)).save(tmp_path / "float.tif")
    draw_shapes((8, 8)).save(tmp_path / "locked.png")
    read = Path.read_bytes

    def refusing(path):
        if path.name == "locked.png":
            raise PermissionError(13, "Permission denied", str(path))
        return read(path)

    monkeypatch.setattr(Path, "read_bytes", refusing)
    report = data.folder_report(tmp_path, (8, 8))
    assert dict(report.skipped) == {
        str(tmp_path / "float.tif"): f"{tmp_path / 'float.tif'}: 32-bit float images are not "
                                     "supported; save it as 8- or 16-bit",
        str(tmp_path / "locked.png"): f"{tmp_path / 'locked.png'}: cannot read (Permission "
                                      "denied)",
    }


def test_the_size_rows_give_sizes_that_images_have_and_small_amounts_read_right(tmp_path):
    """min, median and max are images' own sizes, by area (before: the median width beside the
    median height, 30x30 for images of 30x10 and 10x30); a small decoded set is not 0.0 MiB."""
    from PIL import Image

    from ddpm_cli.text import bytes_text

    for i, size in enumerate([(30, 10), (10, 30), (20, 20), (40, 40), (12, 12)]):
        Image.new("RGB", size).save(tmp_path / f"{i}.png")
    summary = data.folder_report(tmp_path, (8, 8)).summary()
    assert (summary["min_size"], summary["median_size"], summary["max_size"]) == (
        [12, 12], [30, 10], [40, 40])
    amounts = (1, 5 * 3 * 8 * 8, 2**20 - 1, 3 * 2**20 // 2, 10 * 2**20 - 1, 300 * 2**20, 5 * 2**30)
    assert [bytes_text(n) for n in amounts] == [
        "1 byte", "960 bytes", "1.0 MiB", "1.5 MiB", "10 MiB", "300 MiB", "5.0 GiB"]
