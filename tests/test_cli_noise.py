"""`ddpm noise` end to end: what the user sees, reproducibility, pipes, and bad input."""

from __future__ import annotations

import io
import json
import math
import os
import pty
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ddpm_executable, draw_shapes, png_bytes
from ddpm_cli.cli import app
from ddpm_cli.config import DiffusionConfig, Schedule
from ddpm_cli.diffusion.schedules import DiffusionTables


def run(runner, *args, input=None):
    return runner.invoke(app, [str(a) for a in args], input=input)


def pixels(path_or_bytes) -> np.ndarray:
    src = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
    return np.asarray(Image.open(src)).astype(np.float64)


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
    mse = ((a - b) ** 2).mean()
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)


@pytest.fixture
def big_png(tmp_path):
    path = tmp_path / "big.png"
    draw_shapes((96, 80)).save(path)
    return path


def test_t0_is_nearly_identical_and_t999_is_uncorrelated(runner, big_png, tmp_path):
    original = pixels(big_png)
    r = run(runner, "noise", big_png, "--t", 0, "--seed", 3, "-o", tmp_path / "t0.png")
    assert r.exit_code == 0, r.output
    assert psnr(pixels(tmp_path / "t0.png"), original) > 35
    r = run(runner, "noise", big_png, "--t", 999, "--seed", 3, "-o", tmp_path / "t999.png")
    assert r.exit_code == 0, r.output
    noisy = pixels(tmp_path / "t999.png")
    assert noisy.shape == original.shape
    assert abs(np.corrcoef(noisy.ravel(), original.ravel())[0, 1]) < 0.05
    # and the noise is there: x_999 is mostly the standard normal draw, clipped to [-1, 1]
    assert psnr(noisy, original) < 10


def test_correlation_with_the_input_falls_as_t_grows(runner, big_png, tmp_path):
    original = pixels(big_png).ravel()
    corr = []
    for t in (50, 250, 500, 999):
        out = tmp_path / f"t{t}.png"
        assert run(runner, "noise", big_png, "--t", t, "--seed", 1, "-o", out).exit_code == 0
        corr.append(np.corrcoef(pixels(out).ravel(), original)[0, 1])
    assert corr[0] > 0.9 and corr == sorted(corr, reverse=True)


def test_same_seed_same_bytes_and_the_seed_is_reported(runner, shapes_png, tmp_path):
    outs = []
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        out = tmp_path / f"{name}.png"
        r = run(runner, "noise", shapes_png, "--t", "0,500", "--seed", seed, "-o", out)
        assert r.exit_code == 0, r.output
        outs.append(out.read_bytes())
    assert outs[0] == outs[1] and outs[0] != outs[2]
    r = run(runner, "noise", shapes_png, "--t", 10, "-o", tmp_path / "r.png", "--json")
    seed = json.loads(r.stdout)["seed"]
    r2 = run(runner, "noise", shapes_png, "--t", 10, "-o", tmp_path / "r2.png", "--seed", seed)
    assert r2.exit_code == 0
    assert (tmp_path / "r.png").read_bytes() == (tmp_path / "r2.png").read_bytes()


def test_default_output_names_path_on_stdout_and_table_on_stderr(
    runner, shapes_png, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    r = run(runner, "noise", shapes_png, "--t", 500, "--seed", 0)
    assert r.exit_code == 0
    assert r.stdout == "shapes-noise-t500.png\n"
    assert Image.open(tmp_path / "shapes-noise-t500.png").size == (64, 48)
    assert "alpha_bar_t" in r.stderr and "0.0778" in r.stderr  # alpha_bar_500, linear
    r = run(runner, "noise", shapes_png, "--seed", 0)
    assert r.stdout == "shapes-noise-strip.png\n"
    for t in ("0", "100", "250", "500", "750", "999"):
        assert f"│ {t:>3} │" in r.stderr
    before = (tmp_path / "shapes-noise-strip.png").read_bytes()
    r = run(runner, "noise", shapes_png, "--seed", 1, "--quiet")  # never replaced unasked
    assert (r.exit_code, r.stdout) == (2, "")
    assert r.stderr == (
        "error: shapes-noise-strip.png: already exists; pass --overwrite to replace it\n"
    )
    assert (tmp_path / "shapes-noise-strip.png").read_bytes() == before
    r = run(runner, "noise", shapes_png, "--seed", 1, "--quiet", "--overwrite")
    assert r.stderr == "" and r.stdout == "shapes-noise-strip.png\n"
    assert (tmp_path / "shapes-noise-strip.png").read_bytes() != before


def test_strip_is_labelled_and_cells_follow_the_timesteps(runner, shapes_png, tmp_path):
    out = tmp_path / "strip.png"
    r = run(runner, "noise", shapes_png, "--t", "0,100,250,500,999", "--seed", 2, "-o", out)
    assert r.exit_code == 0, r.output
    strip = Image.open(out)
    assert strip.mode == "RGB"
    assert strip.width == 5 * 64 + 4 * 2 and strip.height > 48
    arr = np.asarray(strip).astype(np.float64)
    first, last = arr[:48, :64], arr[:48, -64:]
    original = pixels(shapes_png)
    assert (
        psnr(first, original) > 35 and abs(np.corrcoef(last.ravel(), original.ravel())[0, 1]) < 0.1
    )
    band = arr[48:, :64]
    assert band.min() < 100 and band.max() == 255  # a label drawn on a white band


def test_gif_animates_the_chain(runner, shapes_png, tmp_path):
    out = tmp_path / "chain.gif"
    r = run(runner, "noise", shapes_png, "--gif", "--frames", 12, "--seed", 4, "-o", out)
    assert r.exit_code == 0, r.output
    gif = Image.open(out)
    assert gif.n_frames == 12 and gif.info["loop"] == 0
    original = pixels(shapes_png)
    gif.seek(0)
    first = np.asarray(gif.convert("RGB"))[:48].astype(np.float64)
    gif.seek(11)
    last = np.asarray(gif.convert("RGB"))[:48].astype(np.float64)
    assert np.corrcoef(first.ravel(), original.ravel())[0, 1] > 0.9
    assert abs(np.corrcoef(last.ravel(), original.ravel())[0, 1]) < 0.1
    r = run(
        runner,
        "noise",
        shapes_png,
        "--gif",
        "--seed",
        4,
        "-o",
        tmp_path / "again.gif",
        "--frames",
        12,
    )
    assert (tmp_path / "again.gif").read_bytes() == out.read_bytes()


def test_pipes_stdin_to_stdout(runner, shapes_png, tmp_path):
    data = shapes_png.read_bytes()
    r = runner.invoke(app, ["noise", "-", "--t", "250", "--seed", 9, "-o", "-"], input=data)
    assert r.exit_code == 0, r.stderr
    assert r.stdout_bytes.startswith(b"\x89PNG")
    assert Image.open(io.BytesIO(r.stdout_bytes)).size == (64, 48)
    ref = tmp_path / "ref.png"
    run(runner, "noise", shapes_png, "--t", 250, "--seed", 9, "-o", ref)
    assert r.stdout_bytes == ref.read_bytes()


def test_json_report_matches_the_tables(runner, shapes_png, tmp_path):
    out = tmp_path / "x.png"
    r = run(
        runner,
        "noise",
        shapes_png,
        "--t",
        "0,250,499",
        "--schedule",
        "cosine",
        "-T",
        500,
        "--seed",
        1,
        "-o",
        out,
        "--json",
    )
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    tables = DiffusionTables.from_config(DiffusionConfig(Schedule.cosine, 500))
    assert report["schedule"] == "cosine" and report["timesteps"] == 500
    assert report["output"] == str(out) and report["kind"] == "strip" and report["seed"] == 1
    assert report["size"] == [64, 48] and report["mode"] == "RGB"
    assert [s["t"] for s in report["steps"]] == [0, 250, 499]
    for s in report["steps"]:
        t = s["t"]
        assert s["alpha_bar"] == pytest.approx(tables.alpha_bar[t].item(), rel=1e-12)
        assert s["snr_db"] == pytest.approx(10 * math.log10(tables.snr[t].item()))
        assert s["signal_weight"] ** 2 + s["noise_weight"] ** 2 == pytest.approx(1)


@pytest.mark.parametrize(
    ("mode", "expected"),
    [("L", "L"), ("RGBA", "RGBA"), ("LA", "LA"), ("P", "RGB"), ("I;16", "I;16"), ("1", "L")],
)
def test_output_keeps_size_and_mode_family(runner, tmp_path, mode, expected):
    img = draw_shapes((30, 20))
    if mode == "I;16":
        img = Image.fromarray(np.asarray(img.convert("L"), dtype=np.uint16) * 257)
    elif mode == "P":
        img = img.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    else:
        img = img.convert(mode)
    src = tmp_path / "in.png"
    img.save(src)
    out = tmp_path / "out.png"
    r = run(runner, "noise", src, "--t", 3, "--seed", 0, "-o", out)
    assert r.exit_code == 0, r.output
    got = Image.open(out)
    assert got.size == (30, 20) and got.mode == expected
    if expected in ("RGBA", "LA"):
        assert np.array_equal(np.asarray(got.getchannel("A")), np.asarray(img.getchannel("A")))
        assert "alpha channel kept unchanged" in r.stderr
    if mode == "I;16":  # 16-bit values survive, not rounded to 8 bits, at the 16-bit scale
        diff = np.abs(np.asarray(got, dtype=np.float64) - np.asarray(img, dtype=np.float64))
        tables = DiffusionTables.from_config(DiffusionConfig())
        # |x_t - x_0| is about |N(0, 1 - alpha_bar)| in [-1, 1] units, 32767.5 per unit
        expected = math.sqrt(2 / math.pi * (1 - tables.alpha_bar[3].item())) * 32767.5
        assert 0.8 < diff.mean() / expected < 1.2
        assert (np.asarray(got) % 257 != 0).mean() > 0.9


def test_size_option_resizes_and_center_crops_first(runner, tmp_path):
    img = Image.new("RGB", (120, 40), (0, 0, 255))  # blue, with red bars at both ends
    img.paste((255, 0, 0), (0, 0, 30, 40))
    img.paste((255, 0, 0), (90, 0, 120, 40))
    img.save(tmp_path / "wide.png")
    out = tmp_path / "c.png"
    r = run(runner, "noise", tmp_path / "wide.png", "--t", 0, "--size", 20, "-o", out)
    assert r.exit_code == 0 and Image.open(out).size == (20, 20)
    px = pixels(out)  # 120x40 -> 60x20, center 20 columns: all blue, the red bars cropped
    assert px[..., 2].min() > 200 and px[..., 0].max() < 60


def listing(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["missing.png"], 2, "missing.png: no such file"),
        (["{dir}"], 2, "is a directory"),
        (["{text}"], 2, "not an image"),
        (["{trunc}"], 2, "corrupt or truncated"),
        (["{img}", "--t", "1000"], 2, "t=1000 is outside [0, 999]"),
        (["{img}", "--t", "-1"], 2, "t=-1 is outside"),
        (["{img}", "--t", "5", "-T", "5"], 2, "t=5 is outside [0, 4] for T=5"),
        (["{img}", "--t", "1,x"], 2, "--t expects integers"),
        (["{img}", "--schedule", "foo"], 2, "'foo' is not one of"),
        (["{img}", "-o", "{dir}/nope/out.png"], 2, "does not exist"),
        (["{img}", "-o", "{dir}/out.jpg"], 2, "must end in .png"),
        (["{img}", "--gif", "-o", "{dir}/out.png"], 2, "must end in .gif"),
        (["{img}", "--gif", "--t", "5"], 2, "drop --t"),
        (["{img}", "-o", "-", "--json"], 2, "both write to stdout"),
        (["{img}", "--device", "gpu"], 2, "unknown device 'gpu'"),
        (["{img}", "--frames", "1"], 2, "--frames"),
        (["{img}", "--bogus"], 2, "No such option: --bogus"),
        (["-"], 2, "no data on stdin for the image; pipe an image file in"),
        (["{img}", "-o", "{img}"], 2, "is the input image"),
        (["{img}", "--t", ",".join(map(str, range(65)))], 2, "at most 64 timesteps"),
        (["{img}", "--size", "100000"], 2, "--size"),
        (["{img}", "--seed", str(2**64)], 2, "--seed"),
        (["{img}", "-o", "/proc/x.png"], 1, "/proc/x.png: cannot write"),
    ],
)
def test_bad_input_gives_one_line_and_leaves_nothing(
    runner, tmp_path, monkeypatch, args, code, message
):
    work = tmp_path / "work"
    work.mkdir()
    (work / "sub").mkdir()
    draw_shapes((16, 16)).save(work / "img.png")
    (work / "text.png").write_text("not an image")
    (work / "trunc.png").write_bytes(png_bytes(draw_shapes((64, 64)))[:300])
    names = {
        "dir": work / "sub",
        "text": work / "text.png",
        "trunc": work / "trunc.png",
        "img": work / "img.png",
    }
    before = listing(work), listing(work / "sub")
    monkeypatch.chdir(work)
    r = runner.invoke(app, ["noise", *[a.format(**names) for a in args]], input=b"")
    assert r.exit_code == code, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert message in lines[0]
    assert "Traceback" not in r.output and r.stdout == ""
    assert (listing(work), listing(work / "sub")) == before


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(
    runner, shapes_png, tmp_path, monkeypatch
):
    out = tmp_path / "out.png"
    out.write_bytes(b"previous contents")
    import ddpm_cli.store.files as files

    def full_disk(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "replace", full_disk)
    r = run(runner, "noise", shapes_png, "--t", 5, "-o", out, "--overwrite")
    assert r.exit_code == 1
    assert r.stderr.strip() == f"error: {out}: cannot write: disk full"
    assert out.read_bytes() == b"previous contents"
    assert listing(tmp_path) == ["out.png", "shapes.png"]


def test_installed_command_and_module_pipe_the_same_bytes(runner, shapes_png, tmp_path):
    data = shapes_png.read_bytes()
    args = ["noise", "-", "--t", "100", "--seed", "11", "-o", "-"]
    script = subprocess.run(
        [ddpm_executable(), *args], input=data, capture_output=True, timeout=120
    )
    module = subprocess.run(
        [sys.executable, "-m", "ddpm_cli", *args], input=data, capture_output=True, timeout=120
    )
    assert script.returncode == 0 and module.returncode == 0, script.stderr
    assert script.stdout == module.stdout
    assert script.stdout == runner.invoke(app, args, input=data).stdout_bytes
    assert b"alpha_bar_t" in script.stderr
    bad = subprocess.run(
        [ddpm_executable(), "noise", str(tmp_path / "none.png")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip().splitlines() == [f"error: {tmp_path / 'none.png'}: no such file"]


def png16(path: Path, rgb: bool, size=(20, 10)) -> np.ndarray:
    """Write a 16-bit RGB (or gray+alpha) PNG by hand: Pillow cannot save these."""
    w, h = size
    ch = 3 if rgb else 2
    arr = (np.random.default_rng(0).random((h, w, ch)) * 65535).astype(">u2")
    raw = b"".join(b"\x00" + arr[y].tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2 if rgb else 4, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )
    return arr


def test_16_bit_colour_and_gray_alpha_keep_their_family_and_say_so(runner, tmp_path):
    png16(tmp_path / "rgb16.png", rgb=True)
    r = run(runner, "noise", tmp_path / "rgb16.png", "--t", 1, "-o", tmp_path / "a.png")
    assert r.exit_code == 0 and Image.open(tmp_path / "a.png").mode == "RGB"
    assert "16-bit colour: read at 8 bits" in r.stderr
    arr = png16(tmp_path / "la16.png", rgb=False)
    r = run(runner, "noise", tmp_path / "la16.png", "--t", 1, "-o", tmp_path / "b.png")
    out = Image.open(tmp_path / "b.png")
    assert r.exit_code == 0 and out.mode == "LA"  # gray stays gray, alpha kept
    assert np.abs(np.asarray(out.getchannel("A"), dtype=float) - arr[..., 1] / 257).max() <= 1


def test_animated_input_uses_the_first_frame_and_says_so(runner, tmp_path):
    red, blue = Image.new("RGB", (16, 16), (255, 0, 0)), Image.new("RGB", (16, 16), (0, 0, 255))
    red.save(tmp_path / "anim.webp", save_all=True, append_images=[blue], lossless=True)
    r = run(runner, "noise", tmp_path / "anim.webp", "--t", 0, "-o", tmp_path / "f.png")
    assert r.exit_code == 0 and "2 frames: using the first" in r.stderr
    assert pixels(tmp_path / "f.png")[..., 0].mean() > 240


def test_symlinked_output_replaces_the_target_and_keeps_the_link(runner, shapes_png, tmp_path):
    target = tmp_path / "target.png"
    target.write_bytes(b"old")
    (tmp_path / "link.png").symlink_to(target)
    r = run(runner, "noise", shapes_png, "--t", 3, "-o", tmp_path / "link.png", "--overwrite")
    assert r.exit_code == 0
    assert (tmp_path / "link.png").is_symlink() and target.read_bytes().startswith(b"\x89PNG")


def test_thin_images_make_bounded_strips(runner, tmp_path):
    Image.new("L", (1, 3000), 128).save(tmp_path / "thin.png")
    r = run(runner, "noise", tmp_path / "thin.png", "--t", "0,999", "-o", tmp_path / "s.png")
    assert r.exit_code == 0
    assert Image.open(tmp_path / "s.png").height < 3 * 3000


def test_refuses_to_write_image_bytes_to_a_terminal(shapes_png):
    leader, follower = pty.openpty()
    try:
        p = subprocess.run(
            [ddpm_executable(), "noise", str(shapes_png), "-o", "-"],
            stdout=follower,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(follower)
        os.close(leader)
    assert p.returncode == 2
    assert "refusing to write image bytes to a terminal" in p.stderr
    assert p.stderr.strip().endswith("or use -o FILE")  # noise's -o names a file


def test_an_image_too_large_to_preview_is_refused_before_decoding(runner, tmp_path, monkeypatch):
    """Pillow decodes up to 179 million pixels; previewing that at full size takes tens of GiB.
    Refused from the header alone, with --size as the way out (issue 27)."""
    from ddpm_cli.generation import noising

    big = tmp_path / "big.png"
    Image.new("RGB", (6000, 5000), (40, 90, 200)).save(big)  # 30 MP, a few KiB on disk
    monkeypatch.setattr(noising, "available_memory", lambda: 2 * 2**30)  # a small machine
    decoded = []
    real = noising.decode_image
    monkeypatch.setattr(noising, "decode_image", lambda *a, **k: decoded.append(1) or real(*a, **k))
    r = runner.invoke(app, ["noise", str(big), "-o", str(tmp_path / "n.png")])
    assert r.exit_code == 2 and not decoded, r.output
    assert "big.png: a 6000x5000 image" in r.stderr and "--size" in r.stderr
    r = runner.invoke(app, ["noise", str(big), "--size", "64", "-o", str(tmp_path / "n.png")])
    assert r.exit_code == 0 and decoded, r.output
    assert Image.open(tmp_path / "n.png").height < 100  # 64 pixels and the labels
