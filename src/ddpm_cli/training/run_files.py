"""The files of a run directory: its preparation, metrics, sample grids and data cache.

Written by rank 0 of a training run (run.py); nothing here prints.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import torch

from ddpm_cli.config import TrainConfig
from ddpm_cli.data.folders import BUILTIN_PREFIX, DataReport, InMemory
from ddpm_cli.data.images import encode_png
from ddpm_cli.errors import OutputError, UsageError
from ddpm_cli.generation.output import grid_image, grid_image_rows
from ddpm_cli.generation.sampling import SamplingModel, generate
from ddpm_cli.sampler_config import DEFAULT_GUIDANCE, SamplerConfig
from ddpm_cli.store.checkpoint import header_value, save_checkpoint
from ddpm_cli.store.files import (
    BEST,
    FIGURE,
    MODEL,
    SNAPSHOT,
    STATE,
    RunLock,
    make_folder,
    remove_made,
    snapshots,
    write_atomic,
)
from ddpm_cli.text import parse_json
from ddpm_cli.training.loggers import TENSORBOARD_DIR, WANDB_DIR
from ddpm_cli.training.train import ema_decay_at

METRICS, CACHE, SKIPPED = "metrics.jsonl", "data_cache.safetensors", "skipped.txt"
SAMPLES = "samples"
# what a fresh run replaces: the files of an earlier attempt that never checkpointed
LEFTOVERS = (CACHE, METRICS, SKIPPED, TENSORBOARD_DIR)
RUN_NAMES = {*LEFTOVERS, MODEL, STATE, BEST, SAMPLES, WANDB_DIR, RunLock.NAME}
LITTER = (".DS_Store", "Thumbs.db", "desktop.ini")  # what file managers leave in any folder


def sample_grid(ema, diffusion, config: TrainConfig, model_config, device, seed: int) -> bytes:
    """A grid of the EMA model's samples as PNG bytes: the images `ddpm sample` draws by
    default with this seed (its default sampler, image k from its own noise); for a
    class-conditional model a row per class, as `--class all -n K` draws them (with its
    default guidance)."""
    sm = SamplingModel(
        model=ema,
        model_config=model_config,
        diffusion=diffusion,
        objective=config.objective.value,
        path=Path(MODEL),
        content_hash="",
        weights="ema",
        step=0,
    )
    n, classes = config.num_samples, model_config.num_classes
    if not classes:
        batches = generate(sm, SamplerConfig(), list(range(n)), seed, n, device)
        return encode_png(grid_image(torch.cat([x for _, x in batches])))
    per = max(1, n // classes)
    labels = [c for c in range(classes) for _ in range(per)]
    indices = list(range(per)) * classes
    batches = generate(sm, SamplerConfig(), indices, seed, len(indices), device, labels=labels,
                       guidance=DEFAULT_GUIDANCE)  # fmt: skip
    return encode_png(grid_image_rows(torch.cat([x for _, x in batches]), per))


def prepare_directory(out, resumed: bool, config, images, report, ckpt) -> list[str]:
    """Make `out` ready for a new or resumed run; returns warnings for the user."""
    warnings = []
    make_folder(out)
    for stale in out.glob(".*.tmp"):  # temporary files of an interrupted write
        stale.unlink(missing_ok=True)
    if not resumed:  # the leftovers of an attempt that never checkpointed (check_fresh_folder
        (out / CACHE).unlink(missing_ok=True)  # refuses checkpoints, and such names beside
        shutil.rmtree(out / TENSORBOARD_DIR, ignore_errors=True)  # other files)
        if config.data_cache and isinstance(images, InMemory):
            write_cache(out, images, report)
        (out / METRICS).unlink(missing_ok=True)
        (out / SKIPPED).unlink(missing_ok=True)
    else:
        torn = truncate_metrics(out / METRICS, ckpt.step)
        if torn:
            warnings.append(
                f"{out / METRICS}: dropped {torn} torn line{'s' if torn > 1 else ''} (a write cut "
                "short by a kill or a full disk); the records before and after are kept"
            )
        for step, later in snapshots(out):  # written after the checkpoint resumed from
            if step > ckpt.step:
                later.unlink()
        best = _step_of(out / BEST) if (out / BEST).exists() else None
        if best is not None and best > ckpt.step:  # from training this resume goes back over
            warnings.append(f"{out / BEST} is from step {best}, after the checkpoint this "
                            f"resume continues from (step {ckpt.step}), whose metrics are "
                            "dropped: kept, as a model that was measured; only a lower figure "
                            "replaces it")  # fmt: skip
        if (
            config.keep
            and ckpt.step not in dict(snapshots(out))
            and _step_of(out / MODEL) == ckpt.step
        ):
            save_snapshot(out, ckpt.step, config.keep)  # a stop between the model and its copy
    return warnings


def check_fresh_folder(out: Path) -> None:
    """Refuse a new run's existing folder when the run would replace what it may not: a run,
    checkpoints of one (best, snapshots), or run-named files beside other files (a folder of
    the user's, not the leftovers of an attempt that never checkpointed, which it replaces)."""
    if (out / STATE).exists() or (out / MODEL).exists():
        raise UsageError(
            f"{out} already holds a run; continue it with --resume {out} or choose another --out"
        )
    def listed(names: list[str]) -> str:
        return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")

    kept = [p.name for p in (out / BEST, *(p for _, p in snapshots(out))) if p.exists()]
    if kept:
        raise UsageError(f"{out} holds checkpoints of an earlier run ({listed(kept)}); move them "
                         "elsewhere, or choose another --out")  # fmt: skip
    if not out.is_dir():
        return
    names = {p.name for p in out.iterdir()}
    replaced = sorted(names & set(LEFTOVERS))
    others = sorted(n for n in names - RUN_NAMES - set(LITTER)
                    if not n.startswith("._") and not (n.startswith(".") and n.endswith(".tmp")))
    if replaced and others:
        them = "them" if len(replaced) > 1 else "it"
        raise UsageError(
            f"{out} holds {', '.join(replaced)} beside other files ({listed(others)}), and a new "
            f"run would replace {them}; move {them} elsewhere, or give the run a folder of its "
            "own with --out"
        )


def check_run_directory(out: Path, source: str | None) -> None:
    """Refuse, before any work, a new run's directory that cannot hold a run: an existing file,
    a place this process cannot write to, or a folder inside the training data (the run's own
    sample grids would become training images when the folder is read again)."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: is a file; give a directory for the run")
    existing = next(p for p in (out, *out.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise UsageError(f"--out {out}: cannot create it, {existing} is a file; choose another "
                         "--out")  # fmt: skip
    if not os.access(existing, os.W_OK | os.X_OK):  # as every command's output: exit 1
        raise OutputError(f"--out {out}: cannot write in {existing}: permission denied; choose "
                          "another --out")  # fmt: skip
    if source is None or source.startswith(BUILTIN_PREFIX) or not Path(source).is_dir():
        return
    data, run = Path(source).resolve(), out.resolve()
    if run == data or data in run.parents:
        raise UsageError(
            f"the run directory {out} is inside the training data {source}: its sample grids "
            "would become training images; give an --out outside the data folder"
        )


def discard_new_run(out: Path, created: Path | None) -> None:
    """Undo a new run that failed before its first step. When the run made its directory
    (`created`: new_folder's answer), the directory goes, with the parents made for it while
    they are empty (another run may have started in runs/ meanwhile); else what the run wrote
    there (the data cache, a fresh TensorBoard folder)."""
    if created is not None:
        out = Path(os.path.abspath(out))  # as new_folder saw it
        shutil.rmtree(out, ignore_errors=True)
        remove_made(out, created)
        return
    (out / CACHE).unlink(missing_ok=True)
    shutil.rmtree(out / TENSORBOARD_DIR, ignore_errors=True)


def _step_of(path: Path) -> int | None:
    """The step a model file was saved at, from its header; None when unreadable."""
    step = header_value(path, "step")
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def best_figure(out: Path) -> float | None:
    """The quality figure of the run's best.safetensors (what a new figure must beat); None
    when there is none, or it cannot be read (the next figure then replaces it)."""
    value = header_value(out / BEST, FIGURE)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def save_snapshot(out: Path, step: int, keep: int) -> tuple[Path, list[Path]]:
    """Copy the run's model.safetensors (just written, at `step`) to its step-numbered
    snapshot, then prune the oldest snapshots beyond `keep`; the newest is never pruned.
    Returns the snapshot and the pruned files."""
    path = out / SNAPSHOT.format(step=step)
    write_atomic(path, (out / MODEL).read_bytes(), follow=False)
    pruned = [p for _, p in snapshots(out)[: -max(keep, 1)]]
    for old in pruned:
        old.unlink(missing_ok=True)
    return path, pruned


def write_grid(out, state, diffusion, config, model_config, device, on_event):
    png = sample_grid(state.ema, diffusion, config, model_config, device, config.seed)
    path = out / "samples" / f"step-{state.step:07d}.png"
    path.parent.mkdir(exist_ok=True)
    write_atomic(path, png, follow=False)
    on_event("sample", {"step": state.step, "path": path})
    return path


def metrics_record(window, state, config, T: int, seconds: float, elapsed: float,
                   trained: float) -> dict:
    """A metrics.jsonl line: `seconds` the window's, `elapsed` the run's so far (start-ups
    included), `trained` of them in the training loop (what --time counts)."""
    losses = torch.cat([r.losses for r in window])
    ts = torch.cat([r.t for r in window])
    quarters = []
    for q in range(4):
        mask = (ts >= q * T / 4) & (ts < (q + 1) * T / 4)
        quarters.append(losses[mask].mean().item() if mask.any() else None)
    return {
        "step": state.step,
        "epoch": state.epoch,
        "loss": losses.mean().item(),
        "loss_quarters": quarters,
        "lr": state.optimizer.param_groups[0]["lr"],
        "grad_norm": sum(float(r.grad_norm) for r in window) / len(window),
        "img_per_s": losses.numel() / seconds if seconds > 0 else None,
        "ema_decay": ema_decay_at(state.step, config.ema_decay),
        "elapsed": elapsed,
        "trained": trained,
    }


def truncate_metrics(path: Path, step: int) -> int:
    """Drop metrics lines past `step` (a run resumed from an older checkpoint logs them again)
    and lines that are not a whole record (a kill or a full disk in the middle of a write left a
    torn line); returns how many of those torn lines were dropped."""
    if not path.exists():
        return 0
    keep, torn = [], 0
    data = path.read_bytes()
    for line in data.decode("utf-8", "replace").splitlines():
        if not line.strip():
            continue
        try:
            record = parse_json(line)
        except ValueError:
            record = None
        at = record.get("step", 0) if isinstance(record, dict) else None
        if not isinstance(at, int) or isinstance(at, bool):
            torn += 1
        elif at <= step:
            keep.append(line + "\n")
    kept = "".join(keep).encode()
    if kept != data or path.is_symlink():  # a link is replaced by a file of the run's own
        write_atomic(path, kept, follow=False)
    return torn


def write_cache(out: Path, images: InMemory, report: DataReport) -> None:
    tensors = {"images": images.data}
    if images.labels is not None:
        tensors["labels"] = images.labels
    save_checkpoint(
        out / CACHE,
        tensors,
        "data_cache",
        {"config": {"data": report.summary()}, "step": 0},
        follow=False,
    )
