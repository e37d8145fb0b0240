"""Does a model copy its training images? (`ddpm eval CKPT --memorization DATA`)

For each sample, the distance to its nearest training image (L2 in pixels, in [0, 1] units per
pixel, as RMS); for the data itself, each of up to REFERENCE training images' distance to its
nearest other training image. A sample is counted as copied when it is closer to a training
image than all but QUANTILE of the training images are to their own nearest neighbour: new
images from the data's distribution land there about QUANTILE of the time, a model that
reproduces its training set nearly always.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import torch

from ddpm_cli.config import Precision
from ddpm_cli.data.folders import to_uint8
from ddpm_cli.data.sources import load_source
from ddpm_cli.errors import DataError
from ddpm_cli.evaluation.likelihood import image_batches
from ddpm_cli.generation.sampling import SamplingModel, default_batch_size, generate
from ddpm_cli.model.forward import resolve_precision
from ddpm_cli.sampler_config import SamplerConfig

QUANTILE = 0.05  # of the data's own nearest-neighbour distances
REFERENCE = 2000  # training images whose nearest-neighbour distance sets the threshold
CHUNK = 256  # rows of a distance block


def nearest(queries: torch.Tensor, data: torch.Tensor, exclude_self: bool = False):
    """Each query's RMS pixel distance to its nearest row of `data` (both (N, D) float64 in
    [0, 1]) and that row's index; with `exclude_self`, queries are data[:len(queries)] and a
    row does not count as its own neighbour."""
    best = torch.full((queries.shape[0],), float("inf"), dtype=torch.float64)
    index = torch.zeros(queries.shape[0], dtype=torch.long)
    for a in range(0, queries.shape[0], CHUNK):
        q = queries[a : a + CHUNK]
        for b in range(0, data.shape[0], 4096):
            d = torch.cdist(q, data[b : b + 4096])
            if exclude_self:
                rows = torch.arange(q.shape[0])
                cols = rows + a - b
                ok = (cols >= 0) & (cols < d.shape[1])
                d[rows[ok], cols[ok]] = float("inf")
            m, i = d.min(1)
            better = m < best[a : a + CHUNK]
            best[a : a + CHUNK] = torch.where(better, m, best[a : a + CHUNK])
            index[a : a + CHUNK] = torch.where(better, i + b, index[a : a + CHUNK])
    return best / queries.shape[1] ** 0.5, index


def copied_share(samples: torch.Tensor, train: torch.Tensor, seed: int = 0) -> dict:
    """The memorisation figures for uint8 (n, C, H, W) samples against uint8 training images."""
    if train.shape[0] < 2:
        raise DataError("the memorisation check needs at least 2 training images")
    data = train.flatten(1).double() / 255
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(data.shape[0], generator=g)
    data = data[order]  # the reference rows first, a random subset
    # distinct uint8 images are at least one level in one pixel apart: nearer is the same image
    # (the distance sums leave rounding noise of about 1e-8 there, not 0)
    same = 0.5 / (255 * data.shape[1] ** 0.5)
    own, _ = nearest(data[:REFERENCE], data, exclude_self=True)
    own = torch.where(own < same, 0.0, own)
    threshold = float(torch.quantile(own, QUANTILE))  # 0 when over 5% have an exact duplicate
    dist, index = nearest(samples.flatten(1).double() / 255, data)
    dist = torch.where(dist < same, 0.0, dist)
    return {
        # an exact copy counts even at a threshold of 0
        "copied_share": float(((dist < threshold) | (dist == 0)).double().mean()),
        "expected_share": QUANTILE,
        "threshold": threshold,
        "sample_distance_median": float(dist.median()),
        "data_distance_median": float(own.median()),
        "nearest": [int(order[i]) for i in index[:8]],  # of the first samples, in data order
    }


def memorization(
    sm: SamplingModel, data: str, *, n: int, sampler: SamplerConfig, seed: int,
    batch_size: int | None, device: torch.device, precision: Precision | None = None,
    progress: Callable[[str, int, int], None] = lambda task, done, total: None,
) -> dict:  # fmt: skip
    """Draw n samples (image k as `ddpm sample --seed SEED` draws it) and compare them with the
    training images `data` (a folder, builtin:NAME or a run's data cache) at the model's size."""
    start = time.perf_counter()
    ds, report = load_source(
        data, sm.model_config.image_size, sm.model_config.in_channels, for_training=False
    )
    # the model's own data: the images its run set aside (never trained on) are not compared
    parts = sm.held_out_split(len(ds), report, ds.labels)
    kept = parts[0] if parts is not None else torch.arange(len(ds))
    train = torch.cat(list(image_batches(ds, len(kept), 256, kept)))
    precision = resolve_precision(precision, device)
    batch = batch_size or default_batch_size(sm.model_config, device, n)

    def drawn() -> Iterator[torch.Tensor]:
        done = 0
        for chunk, x in generate(sm, sampler, list(range(n)), seed, batch, device, precision):
            done += len(chunk)
            progress("samples", done, n)
            yield to_uint8(x)

    samples = torch.cat(list(drawn()))
    share = copied_share(samples, train, seed)
    share["nearest"] = [int(kept[i]) for i in share["nearest"]]  # in the data's own order
    return {
        **share,
        "samples": n,
        "data": report.source,
        **report.left_out(),
        "training_images": int(train.shape[0]),
        "set_aside": 0 if parts is None else len(parts[1]),
        "seed": seed,
        "seconds": time.perf_counter() - start,
    }
