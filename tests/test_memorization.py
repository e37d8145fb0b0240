"""The memorisation check (`ddpm eval --memorization`): copies of training images are found,
new images from the same distribution are counted about as often as the threshold says."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import train_tiny
from ddpm_cli.cli import app
from ddpm_cli.errors import DataError
from ddpm_cli.evaluation.memorization import QUANTILE, copied_share, nearest


def images(n: int, seed: int) -> torch.Tensor:
    """Smooth random 8x8 RGB images: a few blobs of colour, so that neighbours are meaningful."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 2, 2, generator=g)
    x = torch.nn.functional.interpolate(low, size=(8, 8), mode="bilinear", align_corners=False)
    return (x * 255).round().to(torch.uint8)


def test_nearest_against_a_brute_force_search():
    g = torch.Generator().manual_seed(0)
    q, d = (
        torch.rand(300, 12, generator=g, dtype=torch.float64),
        torch.rand(5000, 12, generator=g, dtype=torch.float64),
    )
    dist, index = nearest(q, d)
    full = torch.cdist(q, d)
    assert torch.equal(index, full.argmin(1))
    assert torch.allclose(dist, full.min(1).values / 12**0.5)
    own, own_index = nearest(d[:300], d, exclude_self=True)
    full = torch.cdist(d[:300], d)
    full[torch.arange(300), torch.arange(300)] = float("inf")
    assert torch.equal(own_index, full.argmin(1))


def test_copies_are_found_and_new_images_are_not():
    train = images(1500, 0)
    copies = train[:400].clone()
    copies[:, 0, 0, 0] ^= 1  # a copy, one level off in one pixel
    assert copied_share(copies, train)["copied_share"] == 1.0
    fresh = copied_share(images(400, 1), train)
    # new images land under the threshold about QUANTILE of the time
    assert abs(fresh["copied_share"] - QUANTILE) < 0.05, fresh
    assert fresh["sample_distance_median"] > fresh["threshold"]


def test_eval_reports_the_share_and_refuses_bad_input(runner, tmp_path):
    run = train_tiny(tmp_path, 6, steps=2)
    r = runner.invoke(app, ["eval", str(run), "--memorization", str(tmp_path / "pics"), "-n", "8",
                            "--steps", "3", "--json", "-q"])  # fmt: skip
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)["memorization"]
    assert 0 <= m["copied_share"] <= 1 and m["samples"] == 8 and m["training_images"] == 6
    text = runner.invoke(app, ["eval", str(run), "--memorization", str(tmp_path / "pics"),
                               "-n", "8", "--steps", "3", "-q"])  # fmt: skip
    assert text.stdout.startswith("copied ")
    bad = runner.invoke(app, ["eval", str(run), "--memorization", str(tmp_path / "nope")])
    assert bad.exit_code == 2 and len(bad.stderr.strip().splitlines()) == 1


def test_one_training_image_is_refused():
    with pytest.raises(DataError, match="at least 2 training images"):
        copied_share(images(3, 0), images(1, 1))
