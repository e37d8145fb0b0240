"""`ddpm eval`: a checkpoint's bits/dim on held-out images, and the FID and KID of its samples.

Both report through `progress(task, done, total)`, with task "bound" (network evaluations),
"reference" (reference images embedded), "samples" (images drawn) or "features" (samples
embedded); neither prints.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ddpm_cli.config import Precision
from ddpm_cli.data.folders import BUILTIN_PREFIX, OnDisk, to_uint8
from ddpm_cli.data.search import scan
from ddpm_cli.data.sources import is_cache_file, load_source
from ddpm_cli.device import sync
from ddpm_cli.diffusion.schedules import DiffusionTables
from ddpm_cli.errors import DataError
from ddpm_cli.evaluation.fid import (
    STANDARD_N,
    cached_features,
    extract,
    fid,
    file_digest,
    kid,
    load_inception,
    stats_key,
    store_features,
)
from ddpm_cli.evaluation.likelihood import bound, evaluations, image_batches
from ddpm_cli.generation.sampling import (
    SamplingModel,
    default_batch_size,
    generate,
    with_model_defaults,
)
from ddpm_cli.model.forward import resolve_precision
from ddpm_cli.model.kernels import winograd
from ddpm_cli.sampler_config import SamplerConfig

Progress = Callable[[str, int, int], None]
FEATURE_BATCH = 50  # images per Inception forward pass (299x299 activations are large)
KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000  # as in Binkowski et al. 2018 and torch-fidelity


def _counter(progress: Progress, task: str, total: int) -> Callable[[int], None]:
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        progress(task, done, total)

    return advance


# `ddpm eval --data` without --t-samples or --full: a budget of the bound's time, in which it
# is estimated from as many timesteps per image as fit (at least MIN_T_SAMPLES; the full bound
# when all T fit), on as many images as fit at that (at least MIN_IMAGES)
BUDGET_SECONDS = 60.0
MIN_T_SAMPLES = 16
MIN_IMAGES = 64


def budget_plan(n: int, timesteps: int, seconds_per_eval: float,
                budget: float = BUDGET_SECONDS) -> tuple[int | None, int]:  # fmt: skip
    """(t_samples, images) that fit `budget` seconds at `seconds_per_eval` per image and
    timestep: t_samples None is the full bound."""
    evals = budget / max(seconds_per_eval, 1e-9)
    k = int(evals / n) - 1  # each image also costs its decoder term
    if k >= timesteps - 1:
        return None, n
    if k >= MIN_T_SAMPLES:
        return k, n
    if timesteps - 1 <= MIN_T_SAMPLES:  # a short chain: every timestep, on fewer images
        return None, min(n, max(MIN_IMAGES, int(evals / timesteps)))
    return MIN_T_SAMPLES, min(n, max(MIN_IMAGES, int(evals / (MIN_T_SAMPLES + 1))))


def seconds_per_evaluation(sm: SamplingModel, batch: int, device: torch.device) -> float:
    """The time per image and timestep of the bound's whole work at `batch` images a call: the
    network, and the float64 arithmetic of its terms (for a small model that costs about as
    much again as the network). Timed on the second of two passes over one batch at one
    timestep and the decoder term (the first pass pays for one-off set-up)."""
    h, w = sm.model_config.image_size
    images = torch.zeros(batch, sm.model_config.in_channels, h, w, dtype=torch.uint8)
    tables = DiffusionTables.from_config(sm.diffusion)
    k = 1 if tables.timesteps > 1 else None  # T = 1: the decoder term is the whole bound

    def once() -> float:
        start = time.perf_counter()
        bound(sm.model, sm.objective, tables, iter([images]), t_samples=k,
              generator=torch.Generator().manual_seed(0), device=device)  # fmt: skip
        sync(device)
        return time.perf_counter() - start

    with winograd.keep_filters():  # transformed once, as for the evaluation itself
        once()
        return once() / evaluations(batch, tables.timesteps, k)


def likelihood(
    sm: SamplingModel,
    data: str,
    *,
    limit: int | None,
    t_samples: int | None,
    variance: str,
    batch_size: int | None,
    seed: int,
    device: torch.device,
    progress: Progress = lambda task, done, total: None,
    budget: float | None = None,
    held_out: bool = False,
) -> dict:
    """The variational bound in bits/dim on the first `limit` images of `data` (a folder,
    builtin:NAME or a data cache), decoded at the model's size and channels. With `budget`
    (seconds) and no `t_samples`, the timesteps per image (and if need be the images) are
    chosen to fit it (budget_plan). With `held_out`, only the images the model's run set aside
    (never trained on) are measured, in their order in `data`: a test-set bound from the
    model's own training data (a DataError if `data` is not that, or nothing was set aside)."""
    ds, report = load_source(
        data, sm.model_config.image_size, sm.model_config.in_channels, for_training=False
    )
    parts = sm.held_out_split(len(ds), report, ds.labels)
    order = None
    if held_out:
        if parts is None:
            raise DataError(f"--held-out: {sm.held_out_reason(len(ds), report)}")
        order = parts[1].sort().values
        if isinstance(ds, OnDisk):  # a file that no longer decodes: another set-aside stands in
            ds = ds.limited_to(order.tolist())
    available = len(ds) if order is None else len(order)
    n = available if limit is None else min(limit, available)
    T = sm.diffusion.timesteps
    batch = batch_size or default_batch_size(sm.model_config, device, n)
    if t_samples is None and budget is not None:
        t_samples, n = budget_plan(n, T, seconds_per_evaluation(sm, batch, device), budget)
    result = bound(
        sm.model,
        sm.objective,
        DiffusionTables.from_config(sm.diffusion),
        image_batches(ds, n, batch, order),
        t_samples=t_samples,
        variance=variance,
        generator=torch.Generator().manual_seed(seed),
        device=device,
        on_evaluations=_counter(progress, "bound", evaluations(n, T, t_samples)),
    )
    return {
        **result.to_dict(),
        "data": report.source,
        "found": report.found,
        **report.left_out(),
        "training_images": sm.trained_on(report) and not held_out,
        "held_out": held_out,
        # how many images of `data` the run set aside (0: none, or not the model's own data)
        "set_aside": 0 if parts is None else len(parts[1]),
        "seed": seed,
    }


def reference_id(source: str) -> str:
    """What identifies a reference set for the statistics cache: a folder's file names, sizes
    and modification times; a data cache's content; a built-in dataset's name."""
    if source.startswith(BUILTIN_PREFIX):
        return source
    if is_cache_file(source):
        path = Path(source)
        if not path.is_file():
            raise DataError(f"{path}: no such data cache file")
        return f"cache:{file_digest(path)}"
    folder = Path(source)
    h = hashlib.sha256(os.fsencode(folder.resolve()))
    for p in scan(folder):
        st = p.stat()
        line = f"{p.relative_to(folder).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n"
        h.update(os.fsencode(line))
    return f"folder:{h.hexdigest()}"


def as_rgb(batch: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) with C = 1, 3 or 4 -> 3 channels (gray repeated, alpha dropped)."""
    return batch.expand(-1, 3, -1, -1) if batch.shape[1] == 1 else batch[:, :3]


def sample_quality(
    sm: SamplingModel,
    reference: str,
    *,
    n: int,
    sampler: SamplerConfig,
    seed: int,
    batch_size: int | None,
    device: torch.device,
    precision: Precision | None = None,
    weights: Path | None = None,
    use_cache: bool = True,
    progress: Progress = lambda task, done, total: None,
) -> dict:
    """FID and KID between n samples (image k as `ddpm sample --seed SEED` draws it) and every
    image of `reference`, decoded at the model's size and channels. The reference features are
    cached under the user cache directory, keyed by the reference's files and the weights."""
    precision = resolve_precision(precision, device)
    start = time.perf_counter()
    features, digest = load_inception(weights, device)
    size, channels = sm.model_config.image_size, sm.model_config.in_channels
    key = stats_key(f"{reference_id(reference)}:{channels}", size, digest)
    found = cached_features(key) if use_cache else None
    cached = found is not None
    ref, notes = found if cached else (None, {})  # notes: what reading the reference skipped
    if ref is None:
        ds, report = load_source(reference, size, channels, for_training=False)
        notes = report.left_out()
        _check_reference(reference, len(ds), n)
        ref = extract(
            lambda b: features(as_rgb(b)),
            image_batches(ds, len(ds), FEATURE_BATCH),
            _counter(progress, "reference", len(ds)),
        )
        if use_cache:
            store_features(key, ref, notes)
    _check_reference(reference, ref.shape[0], n)
    sampler = with_model_defaults(sampler, sm, clip_given=False)
    resolved = sampler.resolved(sm.diffusion.timesteps, sm.objective)
    batch = batch_size or default_batch_size(sm.model_config, device, n)
    drawn = _counter(progress, "samples", n)

    def sample_batches():
        for chunk, x in generate(sm, sampler, list(range(n)), seed, batch, device, precision):
            drawn(len(chunk))
            yield as_rgb(to_uint8(x))

    ours = extract(features, sample_batches(), _counter(progress, "features", n))
    kid_mean, kid_std = kid(
        ours, ref, KID_SUBSETS, KID_SUBSET_SIZE, torch.Generator().manual_seed(seed)
    )
    return {
        "fid": fid(ours, ref),
        "kid": kid_mean,
        "kid_std": kid_std,
        "samples": n,
        "estimate": n < STANDARD_N,
        "reference": reference,
        "reference_images": ref.shape[0],
        "reference_cached": cached,
        "skipped_files": notes.get("skipped_files", []),
        "unsearched": notes.get("unsearched", []),
        "sampler": resolved.to_dict(),
        "seed": seed,
        "precision": precision.value,
        "seconds": time.perf_counter() - start,
    }


def _check_reference(reference: str, have: int, n: int) -> None:
    if have < n:
        raise DataError(
            f"{reference}: {have} reference images, fewer than the {n} samples asked for; "
            f"lower -n to {have} or add reference images"
        )
