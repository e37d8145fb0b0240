"""FID and KID: the arithmetic against scipy/numpy, behaviour with a tiny random feature
network, the Inception weights through torch-fidelity, the reference cache, and `ddpm eval`."""

from __future__ import annotations

import json
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import scipy.linalg
import torch
from safetensors.torch import save_file

from conftest import draw_shapes, train_tiny
from ddpm_cli.cli import app
from ddpm_cli.config import INCEPTION_WEIGHTS, DiffusionConfig
from ddpm_cli.errors import DataError
from ddpm_cli.evaluation.evaluate import sample_quality
from ddpm_cli.evaluation.fid import (
    default_weights_path,
    fid,
    frechet_distance,
    kid,
    load_inception,
    mean_cov,
)
from ddpm_cli.generation.sampling import load_for_sampling
from ddpm_cli.sampler_config import SamplerConfig


def scipy_fid(a: torch.Tensor, b: torch.Tensor) -> float:
    """The usual formula, as pytorch-fid computes it: numpy covariances and scipy's sqrtm."""
    a, b = a.numpy(), b.numpy()
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(s1 @ s2)
    diff = a.mean(0) - b.mean(0)
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(root.real))


def numpy_kid(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with the cubic polynomial kernel, written out term by term."""
    d, m = x.shape[1], x.shape[0]
    k = lambda p, q: (p @ q.T / d + 1) ** 3  # noqa: E731
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(within - 2 * kxy.sum() / (m * m))


class TinyFeatures(torch.nn.Module):
    """A random two-layer conv net: cheap stand-in features for behavioural tests."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(16, 24, 3, stride=2, padding=1), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        )  # fmt: skip

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images.float() / 127.5 - 1).double()


def shapes_batch(n: int, seed: int, shift: int = 0) -> torch.Tensor:
    """n varied 16x16 pictures (random crops of drawn shapes plus noise), brightened by `shift`."""
    g = torch.Generator().manual_seed(seed)
    base = torch.from_numpy(np.array(draw_shapes((40, 40)))).permute(2, 0, 1).float()
    out = []
    for _ in range(n):
        y, x = torch.randint(0, 24, (2,), generator=g).tolist()
        crop = base[:, y : y + 16, x : x + 16] + 20 * torch.randn(3, 16, 16, generator=g)
        out.append((crop + shift).clamp(0, 255))
    return torch.stack(out).round().to(torch.uint8)


def test_frechet_distance_matches_scipy():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 64, generator=g, dtype=torch.float64)
    b = (
        1.3
        * torch.randn(200, 64, generator=g, dtype=torch.float64)
        @ torch.randn(64, 64, generator=g, dtype=torch.float64)
        / 8
        + 0.2
    )
    assert fid(a, b) == pytest.approx(scipy_fid(a, b), rel=1e-9)
    assert fid(a, a) == pytest.approx(0.0, abs=1e-9)
    # two Gaussians in closed form: |mu1 - mu2|^2 + sum (s1 - s2)^2 for diagonal covariances
    s1, s2 = torch.tensor([1.0, 4.0]).diag(), torch.tensor([9.0, 1.0]).diag()
    mu1, mu2 = torch.zeros(2), torch.tensor([3.0, 4.0])
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(25 + (1 - 3) ** 2 + (2 - 1) ** 2)


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_a_shift():
    net = TinyFeatures()
    base = net(shapes_batch(200, seed=1))
    assert fid(base, base) == pytest.approx(0.0, abs=1e-9)
    values = [fid(base, net(shapes_batch(200, seed=2, shift=s))) for s in (0, 10, 30, 60)]
    assert values == sorted(values) and values[-1] > 20 * values[0]
    other = net(shapes_batch(200, seed=2, shift=30))
    assert values[2] == pytest.approx(scipy_fid(base, other), rel=1e-7)
    mu, cov = mean_cov(base)
    assert torch.allclose(cov, torch.from_numpy(np.cov(base.numpy(), rowvar=False)))


def test_kid_matches_a_numpy_computation_and_is_unbiased():
    net = TinyFeatures()
    a, b = net(shapes_batch(120, seed=3)), net(shapes_batch(120, seed=4, shift=40))
    # one subset of every feature: no sampling, so the value is the plain formula
    mean, _ = kid(a, b, subsets=1, subset_size=1000)
    assert mean == pytest.approx(numpy_kid(a.numpy(), b.numpy()), rel=1e-9)
    same_mean, same_std = kid(a, net(shapes_batch(120, seed=5)), 50, 60, torch.Generator())
    shifted, _ = kid(a, b, 50, 60, torch.Generator())
    assert abs(same_mean) < 3 * same_std + 1e-4 and shifted > 10 * abs(same_mean)


def random_inception(path: Path) -> dict:
    """torch-fidelity's FID Inception with He-initialised random weights (the real weights
    cannot be downloaded in tests), saved as safetensors."""
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    with (
        mock.patch.object(tfi, "load_state_dict_from_url", lambda *a, **k: None),
        mock.patch.object(tfi.FeatureExtractorInceptionV3, "load_state_dict", lambda s, d: None),
    ):
        torch.manual_seed(0)
        net = tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(path))
    return net


@pytest.fixture(scope="module")
def inception(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / INCEPTION_WEIGHTS
    return path, random_inception(path)


def test_the_inception_features_are_torch_fidelitys_with_our_weights(inception):
    path, reference = inception
    features, digest = load_inception(path, torch.device("cpu"))
    images = shapes_batch(3, seed=6)
    with torch.no_grad():
        want = reference(images)[0].double()
    got = features(images)
    assert got.shape == (3, 2048) and got.std(0).mean() > 1e-4  # features that vary
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    gray = features(images[:, :1])  # one channel is repeated to three
    assert torch.allclose(gray, features(images[:, :1].expand(-1, 3, -1, -1)))
    assert len(digest) == 64


def test_bad_inception_weights_are_refused_clearly(tmp_path):
    missing = f"put {INCEPTION_WEIGHTS} .* at .*{default_weights_path()}"
    with pytest.raises(DataError, match=missing):
        load_inception(None, torch.device("cpu"))
    pth = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    pth.write_bytes(b"\x80\x02 a pickle")
    with pytest.raises(DataError, match="only as .safetensors"):
        load_inception(pth, torch.device("cpu"))
    wrong = tmp_path / "wrong.safetensors"
    save_file({"conv.weight": torch.zeros(2, 2)}, str(wrong))
    with pytest.raises(DataError, match="not the FID Inception-v3 weights"):
        load_inception(wrong, torch.device("cpu"))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(wrong.read_bytes()[:40])
    with pytest.raises(DataError, match="not a readable safetensors file"):
        load_inception(truncated, torch.device("cpu"))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("fidrun")
    train_tiny(root, 8, DiffusionConfig(timesteps=50))
    return root


def test_reference_features_are_cached_and_refreshed_when_the_folder_changes(
    tiny_run, tmp_path, monkeypatch
):
    net = TinyFeatures()
    monkeypatch.setattr("ddpm_cli.evaluation.evaluate.load_inception", lambda w, d: (net, "tiny"))
    ref = tmp_path / "ref"
    ref.mkdir()
    for i in range(6):
        draw_shapes((16, 16 + i)).save(ref / f"{i}.png")
    sm = load_for_sampling(tiny_run / "run")
    events = []

    def measure(n=4):
        events.clear()
        return sample_quality(
            sm, str(ref), n=n, sampler=SamplerConfig(steps=5), seed=0, batch_size=None,
            device=torch.device("cpu"), progress=lambda task, d, t: events.append(task),
        )  # fmt: skip

    first = measure()
    assert not first["reference_cached"] and "reference" in events
    second = measure()
    assert second["reference_cached"] and "reference" not in events
    assert second["fid"] == first["fid"] and second["kid"] == first["kid"]
    assert first["estimate"] and first["reference_images"] == 6 and first["samples"] == 4
    draw_shapes((20, 20)).save(ref / "new.png")
    (ref / "notes.png").write_text("not an image")  # left out, and said, cached or not
    third = measure()
    assert not third["reference_cached"] and third["reference_images"] == 7
    again = measure()
    assert again["reference_cached"]
    for r in (third, again):
        assert [f["path"] for f in r["skipped_files"]] == [str(ref / "notes.png")]
    with pytest.raises(DataError, match="7 reference images, fewer than the 8 samples"):
        measure(8)
    assert "samples" not in events  # refused before drawing anything


def test_ddpm_eval_end_to_end(runner, tiny_run, inception, tmp_path):
    weights, _ = inception
    run = tiny_run / "run"
    args = ["eval", str(run), "--fid-ref", str(tiny_run / "pics"), "-n", "4", "--steps", "4",
            "--inception-weights", str(weights), "--data", str(tiny_run / "pics"),
            "--t-samples", "5", "--json"]  # fmt: skip
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    lik, q = report["likelihood"], report["fid"]
    assert lik["images"] == 8 and lik["training_images"] and lik["t_samples"] == 5
    assert lik["bits_per_dim"] == pytest.approx(sum(lik["terms"].values()))
    assert 0 < lik["bits_per_dim"] < 16 and q["fid"] > 0 and q["estimate"]
    again = json.loads(runner.invoke(app, args).stdout)  # fixed seed: the same numbers
    assert again["likelihood"]["bits_per_dim"] == lik["bits_per_dim"]
    assert again["fid"]["fid"] == pytest.approx(q["fid"]) and again["fid"]["reference_cached"]
    text = runner.invoke(app, args[:-1])
    assert "bits/dim" in text.stdout and "estimate from 4 samples" in text.stdout


def test_ddpm_eval_bad_input(runner, tiny_run, tmp_path):
    run = str(tiny_run / "run")
    (tmp_path / "empty").mkdir()
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint at all")
    cases = (
        ([run], "say what to measure"),
        ([run, "--fid-ref", str(tiny_run / "pics")], "Inception weights not found"),
        ([run, "--data", str(tmp_path / "empty")], "no readable images"),
        ([run, "--data", str(tmp_path / "missing")], "no such directory"),
        ([run, "--data", str(tiny_run / "pics"), "--t-samples", "50"], "at most T - 1 = 49"),
        ([run, "--data", str(tiny_run / "pics"), "--variance", "huge"], "'huge' is not one of"),
        ([str(junk), "--data", str(tiny_run / "pics")], "not a safetensors file"),
    )
    for args, message in cases:
        r = runner.invoke(app, ["eval", *args])
        assert r.exit_code == 2, (args, r.output)
        (line,) = r.stderr.strip().splitlines()
        assert message in line and "Traceback" not in r.output and r.stdout == "", r.output
