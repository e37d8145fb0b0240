"""The feature space that benchmarks/realdata.py measures samples in: a small classifier trained
on each dataset's labelled pool of real images (realsets.py), so nothing is downloaded.

- Frechet distance: between Gaussians fitted to the classifier's penultimate features (64 per
  image) of two image sets, as FID does with Inception features; 0 for identical statistics.
  Computed in float64 through symmetric eigendecompositions.
- class share: the share of images of class k that the classifier reads as k (a labelled set).
- SWD: the sliced Wasserstein distance of the pixels (benchmarks/quality.py), at full size.

The classifier's weights are cached as safetensors beside the data (no pickle), keyed by the
dataset and this file's training recipe.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

FEATURES = 64
RECIPE = "v1"  # bump when the network or its training changes: the cache key


class Classifier(nn.Module):
    """Three stages of two 3x3 convolutions (GroupNorm, SiLU), halving the size between them,
    then global average pooling to FEATURES numbers and a linear read-out."""

    def __init__(self, channels: int, classes: int):
        super().__init__()
        widths, layers, c = (32, 48, FEATURES), [], channels
        for i, w in enumerate(widths):
            if i:
                layers.append(nn.AvgPool2d(2))
            for _ in range(2):
                layers += [nn.Conv2d(c, w, 3, padding=1), nn.GroupNorm(8, w), nn.SiLU()]
                c = w
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(FEATURES, classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float in [-1, 1]."""
    return images.float() / 127.5 - 1


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random flips and shifts of up to 1/8 of the size (reflect-padded)."""
    flip = torch.rand(x.shape[0], generator=g) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    pad = max(1, x.shape[-1] // 8)
    padded = F.pad(x, (pad,) * 4, mode="reflect")
    dy, dx = (int(v) for v in torch.randint(0, 2 * pad + 1, (2,), generator=g))
    return padded[..., dy : dy + x.shape[-2], dx : dx + x.shape[-1]]


def train_classifier(pool: torch.Tensor, labels: torch.Tensor, classes: int,
                     epochs: int = 12, seed: int = 0) -> Classifier:  # fmt: skip
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    net = Classifier(pool.shape[1], classes)
    x_all = to_unit(pool)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = epochs * (len(pool) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    net.train()
    for _ in range(epochs):
        order = torch.randperm(len(pool), generator=g)
        for i in range(len(pool) // 64):
            idx = order[i * 64 : (i + 1) * 64]
            loss = F.cross_entropy(net(_augment(x_all[idx], g)), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return net.eval()


def load_or_train(cache: Path, name: str, pool: torch.Tensor, labels: torch.Tensor,
                  classes: int) -> Classifier:  # fmt: skip
    file = cache / f"classifier-{name}-{RECIPE}.safetensors"
    net = Classifier(pool.shape[1], classes)
    if file.exists():
        net.load_state_dict(load_file(file))
        return net.eval()
    net = train_classifier(pool, labels, classes)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = file.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, tmp)
    tmp.replace(file)
    return net


@torch.no_grad()
def features(net: Classifier, images: torch.Tensor) -> torch.Tensor:
    return torch.cat([net.features(to_unit(b)) for b in images.split(256)]).double()


@torch.no_grad()
def predict(net: Classifier, images: torch.Tensor) -> torch.Tensor:
    return torch.cat([net(to_unit(b)).argmax(1) for b in images.split(256)])


def _sqrt_psd(m: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh(m)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to the rows of a and b (float64):
    |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^1/2 S_b S_a^1/2)^1/2)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = torch.cov(a.T), torch.cov(b.T)
    root = _sqrt_psd(s_a)
    cross = _sqrt_psd(root @ s_b @ root).trace()
    return float((mu_a - mu_b).square().sum() + s_a.trace() + s_b.trace() - 2 * cross)


def swd(a: torch.Tensor, b: torch.Tensor, directions: int = 256, seed: int = 0) -> float:
    """Sliced Wasserstein-1 distance between the pixels of two image sets (uint8), in [-1, 1]
    units; sets of different sizes are compared at matching quantiles."""
    g = torch.Generator().manual_seed(seed)
    x, y = to_unit(a).flatten(1).double(), to_unit(b).flatten(1).double()
    d = torch.randn(x.shape[1], directions, generator=g, dtype=torch.float64)
    d /= d.norm(dim=0, keepdim=True)
    px, py = (x @ d).sort(0).values, (y @ d).sort(0).values
    n = min(len(px), len(py))
    q = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    pick = lambda p: p[(q * len(p)).long().clamp(max=len(p) - 1)]  # noqa: E731
    return float((pick(px) - pick(py)).abs().mean())
