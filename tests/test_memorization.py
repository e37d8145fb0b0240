"""The memorisation check (`ddpm eval --memorization`): copies of training images are found,
new images from the same distribution are counted about as often as the threshold says."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from conftest import draw_shapes, train_tiny
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


def test_with_many_exact_duplicates_exact_copies_still_count():
    """Half the training images twice over: the threshold is 0 (over 5% have a twin), exact
    copies count and all else does not. 600 rows take torch.cdist's matrix-product path, whose
    rounding leaves identical images about 1e-8 apart, not 0."""
    distinct = images(300, 0)
    train = torch.cat([distinct, distinct[:150]])
    samples = torch.cat([distinct[:20], images(20, 1)])
    samples[20:25] = distinct[30:35]
    samples[25, 0, 0, 0] ^= 1  # one level off: no exact copy
    share = copied_share(samples, train)
    assert share["threshold"] == 0.0 and share["copied_share"] == 25 / 40


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
    assert "warning" not in text.stderr
    # a folder of exact duplicates (over 25 images: the fast distance path): the threshold is 0,
    # only exact copies count, and the user is told
    (tmp_path / "twins").mkdir()
    for i in range(20):
        for k in range(2):
            draw_shapes((12 + i, 12)).save(tmp_path / "twins" / f"{i}-{k}.png")
    r = runner.invoke(app, ["eval", str(run), "--memorization", str(tmp_path / "twins"), "-n",
                            "4", "--steps", "2"])  # fmt: skip
    assert r.exit_code == 0 and "copied    0.000" in r.stdout
    assert "warning: over 5% of the training images have an exact duplicate" in r.stderr


def test_one_training_image_is_refused():
    with pytest.raises(DataError, match="at least 2 training images"):
        copied_share(images(3, 0), images(1, 1))


def test_the_images_a_run_set_aside_are_not_counted_as_training_images(tmp_path, monkeypatch):
    """On the model's own data (its folder, or its data cache), the images its run set aside for
    the quality figure, never trained on, are left out: a sample equal to one of them is not a
    copy, a sample equal to a training image is, and the nearest indices are in the data's own
    order. The samples are stood in for by those images themselves."""
    from ddpm_cli.data.batches import split
    from ddpm_cli.data.folders import to_model_range
    from ddpm_cli.data.sources import load_source
    from ddpm_cli.evaluation import memorization as mem
    from ddpm_cli.generation.sampling import load_for_sampling
    from ddpm_cli.sampler_config import SamplerConfig

    run = train_tiny(tmp_path, 40, steps=2, holdout=6)
    sm = load_for_sampling(run)
    ds, _ = load_source(str(tmp_path / "pics"), (8, 8), 3)
    data = ds.data  # uint8 (N, C, H, W), in the order the run read them
    use, aside = split(40, 6, seed=1)
    drawn = {}
    monkeypatch.setattr(mem, "generate", lambda sm, sampler, seeds, *a: iter(
        [(seeds, to_model_range(drawn["images"]))]))  # fmt: skip

    def check(source: str, images: torch.Tensor) -> dict:
        drawn["images"] = images
        return mem.memorization(sm, source, n=len(images), sampler=SamplerConfig(), seed=0,
                                batch_size=None, device=torch.device("cpu"))  # fmt: skip

    for source in (str(tmp_path / "pics"), str(run / "data_cache.safetensors")):
        copies = check(source, data[use[:6]])
        assert copies["training_images"] == 34 and copies["set_aside"] == 6
        assert copies["copied_share"] == 1.0 and copies["nearest"] == use[:6].tolist()
        held = check(source, data[aside])
        assert held["copied_share"] < 1.0 and not set(held["nearest"]) & set(aside.tolist())
    # data that is not the model's own keeps every image
    other = tmp_path / "other"
    other.mkdir()
    for p in sorted((tmp_path / "pics").iterdir())[:20]:
        (other / p.name).write_bytes(p.read_bytes())
    assert check(str(other), data[:4])["set_aside"] == 0
    # nor does the model's own folder once an image no longer decodes (the same names and
    # sizes, one image fewer: the run's split cannot be redone on it)
    broken = sorted((tmp_path / "pics").iterdir())[0]
    broken.write_bytes(b"\0" * broken.stat().st_size)
    assert check(str(tmp_path / "pics"), data[:4])["set_aside"] == 0
    # a fine-tuned model: its parent may have trained on them
    assert replace(sm, fine_tuned=True).held_out_split(40, load_source(
        str(run / "data_cache.safetensors"), (8, 8), 3)[1], None) is None  # fmt: skip


def test_a_builtin_set_is_the_models_own_data_when_it_trained_on_it(tmp_path):
    """Built-in sets have no fingerprint, but are drawn from a fixed seed: the same name and
    count are the model's data, and its held-out images are known."""
    from ddpm_cli.config import DiffusionConfig, TrainConfig
    from ddpm_cli.data.batches import split
    from ddpm_cli.data.sources import load_source
    from ddpm_cli.generation.sampling import load_for_sampling
    from ddpm_cli.training.run import train

    config = TrainConfig(preset="tiny", image_size=8, batch_size=4, device="cpu", seed=5,
                         steps=1, sample_every=0, data_cache=False)  # fmt: skip
    run = train("builtin:shapes", config, DiffusionConfig(), tmp_path / "run").out
    sm = load_for_sampling(run)
    ds, report = load_source("builtin:shapes", (8, 8), 3)
    assert sm.trained_on(report) and sm.training["holdout"] == 204
    expected = split(len(ds), 204, 5, ds.labels)[1]  # a conditional model: by class
    use, aside = sm.held_out_split(len(ds), report, ds.labels)
    assert torch.equal(aside, expected) and len(use) + len(aside) == len(ds)
