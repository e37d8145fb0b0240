"""FID and KID between generated images and a reference set: the core of `ddpm eval --fid-ref`.

The features are those of the Inception-v3 network that FID is defined with (TensorFlow's
2015-12-05 graph), computed by torch-fidelity's faithful PyTorch port (the optional `fid`
extra), not by a rewrite of ours. Its weights are read only from a safetensors file; torch-
fidelity itself would download a pickle, which ddpm never opens. The statistics on top are
short closed forms, computed here in float64:

    FID = |mu_1 - mu_2|^2 + tr(S_1) + tr(S_2) - 2 tr((S_1^1/2 S_2 S_1^1/2)^1/2)
    KID = unbiased MMD^2 with the kernel k(x, y) = (x.y / d + 1)^3, averaged over subsets
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from unittest import mock

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from ddpm_cli.config import INCEPTION_WEIGHTS
from ddpm_cli.errors import ConfigError, DataError, MissingExtra
from ddpm_cli.store.files import write_atomic

FEATURES = 2048
STANDARD_N = 50_000  # the sample count FID is usually reported at; fewer images bias it upward
DOCS = "docs/evaluation.md#inception-weights"

Features = Callable[[torch.Tensor], torch.Tensor]  # uint8 (B, 3, H, W) -> float64 (B, D)


def cache_dir() -> Path:
    import platformdirs

    return Path(platformdirs.user_cache_dir("ddpm"))


def default_weights_path() -> Path:
    return cache_dir() / INCEPTION_WEIGHTS


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_weights(path: Path | None) -> Path:
    """The Inception weights file to use, checked before any work: present, safetensors, and
    torch-fidelity installed."""
    path = Path(path) if path is not None else default_weights_path()
    if not path.is_file():
        raise DataError(
            f"Inception weights not found: put {INCEPTION_WEIGHTS} (the FID Inception-v3 weights "
            f"as safetensors) at {path}, or pass --inception-weights FILE; {DOCS} says how to "
            "make it"
        )
    if path.suffix != ".safetensors":
        raise DataError(
            f"{path}: ddpm reads weights only as .safetensors (a pickle file such as .pth can "
            f"run code when loaded); convert it once as {DOCS} shows"
        )
    try:
        import torch_fidelity.feature_extractor_inceptionv3  # noqa: F401
    except ImportError:
        raise MissingExtra(
            "FID needs torch-fidelity, which is not installed; run: pip install 'ddpm-cli[fid]'"
        ) from None
    return path


def load_inception(path: Path | None, device: torch.device) -> tuple[Features, str]:
    """The FID Inception network as a feature function, and a digest of its weights file."""
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    path = check_weights(path)
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable safetensors file ({e})") from None
    # torch-fidelity's constructor fetches its weights by URL; hand it ours instead, so that
    # nothing is downloaded and no pickle is read.
    with mock.patch.object(tf_inception, "load_state_dict_from_url", lambda *a, **k: state):
        try:
            net = tf_inception.FeatureExtractorInceptionV3(
                "inception-v3-compat", [str(FEATURES)], feature_extractor_weights_path=None
            )
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0]
            raise DataError(f"{path}: not the FID Inception-v3 weights ({first})") from None
    net = net.to(device).eval()

    def features(images: torch.Tensor) -> torch.Tensor:
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        with torch.no_grad():
            return net(images.to(device).contiguous())[0].double().cpu()

    return features, file_digest(path)


def extract(
    features: Features, batches: Iterable[torch.Tensor], on_images: Callable[[int], None]
) -> torch.Tensor:
    """Features (N, D) float64 of uint8 image batches."""
    out = []
    for batch in batches:
        out.append(features(batch))
        on_images(batch.shape[0])
    return torch.cat(out)


def mean_cov(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased covariance (N - 1) of features (N, D), float64."""
    x = x.double()
    mu = x.mean(0)
    d = x - mu
    return mu, d.T @ d / (x.shape[0] - 1)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """The Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    tr((S1 S2)^1/2) is taken as the sum of the square roots of the eigenvalues of the symmetric
    S1^1/2 S2 S1^1/2, which has the same spectrum and needs no general matrix square root.
    """
    mu1, mu2, sigma1, sigma2 = (t.double() for t in (mu1, mu2, sigma1, sigma2))
    w, v = torch.linalg.eigh(sigma1)
    root1 = (v * w.clamp(min=0).sqrt()) @ v.T
    middle = root1 @ sigma2 @ root1
    eig = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0)
    value = (mu1 - mu2).pow(2).sum() + sigma1.trace() + sigma2.trace() - 2 * eig.sqrt().sum()
    return float(value.clamp(min=0))


def fid(a: torch.Tensor, b: torch.Tensor) -> float:
    """FID between two feature sets (N, D) and (M, D)."""
    return frechet_distance(*mean_cov(a), *mean_cov(b))


def kid(
    a: torch.Tensor,
    b: torch.Tensor,
    subsets: int = 100,
    subset_size: int = 1000,
    generator: torch.Generator | None = None,
) -> tuple[float, float]:
    """Kernel Inception Distance (Binkowski et al. 2018): mean and standard deviation over
    `subsets` random subsets of min(subset_size, N, M) features from each set."""
    m = min(subset_size, a.shape[0], b.shape[0])
    if m < 2:
        raise ConfigError("KID needs at least 2 images in each set")
    d = a.shape[1]
    values = []
    for _ in range(subsets):
        x = a[torch.randperm(a.shape[0], generator=generator)[:m]].double()
        y = b[torch.randperm(b.shape[0], generator=generator)[:m]].double()
        kxx, kyy, kxy = ((p @ q.T / d + 1) ** 3 for p, q in ((x, x), (y, y), (x, y)))
        off = m * (m - 1)
        mmd = (kxx.sum() - kxx.trace()) / off + (kyy.sum() - kyy.trace()) / off
        values.append(float(mmd - 2 * kxy.mean()))
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.std()) if subsets > 1 else 0.0


def stats_key(source_id: str, image_size: tuple[int, int], weights_digest: str) -> str:
    text = json.dumps([source_id, list(image_size), weights_digest, "ddpm-fid-1"])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def cached_features(key: str, folder: Path | None = None) -> tuple[torch.Tensor, dict] | None:
    """(reference features stored under `key`, the notes stored with them), or None (absent
    or unreadable: recompute)."""
    path = (folder or cache_dir() / "fid-stats") / f"{key}.safetensors"
    try:
        with safe_open(str(path), "pt") as f:
            notes = json.loads((f.metadata() or {}).get("notes", "{}"))
            return f.get_tensor("features"), notes if isinstance(notes, dict) else {}
    except (SafetensorError, OSError, KeyError, ValueError):
        return None


def store_features(key: str, features: torch.Tensor, notes: dict | None = None,
                   folder: Path | None = None) -> Path:  # fmt: skip
    """Keep reference features under `key`, with `notes` (JSON: what reading them skipped)."""
    folder = folder or cache_dir() / "fid-stats"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{key}.safetensors"
    write_atomic(path, save({"features": features.contiguous()},
                            metadata={"notes": json.dumps(notes or {})}))  # fmt: skip
    return path
