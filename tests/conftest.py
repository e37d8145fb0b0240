"""Shared test fixtures: small Pillow-drawn images, a CLI runner."""

from __future__ import annotations

import dataclasses
import io
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from ddpm_cli import runtime


@pytest.fixture(autouse=True, scope="session")
def fp32_by_default():
    """On x86 CPUs with AMX the default precision is bf16 (forward.default_precision). The
    suite's expectations (bytes, batch invariance, tolerances) are fp32's, on whatever CPU CI
    has: keep fp32 the default here (runtime.Runtime.amx_bf16) and in the processes tests start
    (DDPM_AMX_BF16=0 in their environment). Tests of the rule set it themselves."""
    saved = os.environ.get("DDPM_AMX_BF16")
    os.environ["DDPM_AMX_BF16"] = "0"
    with runtime.use(dataclasses.replace(runtime.from_env(), amx_bf16=False)):
        yield
    if saved is None:
        del os.environ["DDPM_AMX_BF16"]
    else:
        os.environ["DDPM_AMX_BF16"] = saved


@pytest.fixture
def switches(monkeypatch):
    """switches(winograd=False): change environment switches (runtime.Runtime) for a test."""

    def set_(**changes):
        monkeypatch.setattr(runtime, "_current", dataclasses.replace(runtime.current(), **changes))

    return set_


def draw_shapes(size: tuple[int, int] = (48, 40), mode: str = "RGB") -> Image.Image:
    """A deterministic picture with structure: a gradient background and three shapes."""
    w, h = size
    img = Image.new("RGB", size)
    px = img.load()
    for y in range(h):
        for x in range(w):
            px[x, y] = (int(255 * x / max(w - 1, 1)), int(255 * y / max(h - 1, 1)), 96)
    d = ImageDraw.Draw(img)
    d.ellipse((w // 8, h // 8, w // 2, h // 2), fill=(240, 200, 40))
    d.rectangle((w // 2, h // 2, w - 3, h - 3), fill=(200, 40, 60))
    d.polygon([(2, h - 2), (w // 4, h // 2), (w // 2, h - 2)], fill=(30, 160, 90))
    return img.convert(mode) if mode != "RGB" else img


def png_bytes(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def train_tiny(root: Path, images: int, diffusion=None, **config) -> Path:
    """Train the tiny preset on `images` drawn pictures in root/pics for a few steps; returns
    the run directory, root/run."""
    from ddpm_cli.config import DiffusionConfig, TrainConfig
    from ddpm_cli.training.run import train

    (root / "pics").mkdir()
    for i in range(images):
        draw_shapes((12 + i, 12)).save(root / "pics" / f"{i}.png")
    base = dict(preset="tiny", image_size=8, batch_size=4, device="cpu", seed=1, steps=2,
                sample_every=0, log_every=1)  # fmt: skip
    cfg = TrainConfig(**{**base, **config})
    return train(str(root / "pics"), cfg, diffusion or DiffusionConfig(), root / "run").out


def poison_losses(monkeypatch, call: int) -> None:
    """Make the losses of the `call`-th training micro-batch NaN (1-based)."""
    from ddpm_cli.training import train as train_mod

    real, calls = train_mod.training_losses, {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        out = real(*args, **kwargs)
        return out * float("nan") if calls["n"] == call else out

    monkeypatch.setattr(train_mod, "training_losses", poisoned)


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def shapes_png(tmp_path):
    """Path to a 64x48 RGB PNG with structure."""
    path = tmp_path / "shapes.png"
    draw_shapes((64, 48)).save(path)
    return path


def ddpm_executable() -> str:
    """The installed `ddpm` console script of this Python environment."""
    exe = shutil.which("ddpm", path=str(Path(sys.executable).parent)) or shutil.which("ddpm")
    assert exe, "the ddpm console script is not installed (pip install -e .)"
    return exe


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own user cache directory (FID statistics, Inception weights), so no
    test reads or writes the real one."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture
def compiles_for_real():
    """For tests of torch.compile: fails when nothing was compiled or a compile fell back to
    eager. train.compiled lets a failed compile go on eagerly (as a user wants), which would
    otherwise let "compiled matches eager" pass without compiling anything."""
    from torch._dynamo.utils import counters

    counters.clear()
    yield
    assert counters["stats"]["unique_graphs"] >= 1, "torch.compile compiled no graph"
    frames = counters["frames"]
    assert frames["ok"] == frames["total"], f"a compile fell back to eager: {dict(frames)}"


def pixels(image) -> torch.Tensor:
    """An image (or the path of one) as an int32 tensor of its pixel values, height x width
    (x channels), for comparing images: Pillow's getdata() is going away (Pillow 14)."""
    if not isinstance(image, Image.Image):
        image = Image.open(image)
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).to(torch.int32)
    bands = len(image.getbands())
    shape = (image.height, image.width, bands) if bands > 1 else (image.height, image.width)
    return data.view(shape)
