"""What is inside a checkpoint or a run directory, as plain dicts (the CLI renders them).

Nothing here builds a network: parameter counts come from the stored tensors, so inspecting a
256x256 checkpoint costs reading its header and tensors, not a forward pass.
"""

from __future__ import annotations

import math
from pathlib import Path

from ddpm_cli.config import DiffusionConfig, ModelConfig, TrainConfig
from ddpm_cli.errors import DataError
from ddpm_cli.sampler_config import SamplerConfig
from ddpm_cli.store.checkpoint import (
    CheckpointError,
    config_section,
    header_value,
    load_checkpoint,
)
from ddpm_cli.store.files import BEST, FIGURE, MODEL, STATE, snapshots
from ddpm_cli.store.models import check_weights, is_run_directory, network_weights
from ddpm_cli.text import parse_json

METRICS = "metrics.jsonl"


def _block(name: str) -> str:
    """The block a tensor belongs to: "down.0" for "down.0.res.1.conv1.weight", "temb" ..."""
    parts = name.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 and parts[1].isdigit() else parts[0]


def checkpoint_info(path: Path) -> dict:
    """Everything a checkpoint says about itself: file, format, model, diffusion, training, data,
    parameters per block, and its tensors."""
    path = Path(path)
    ckpt = load_checkpoint(path)
    meta = ckpt.meta
    config = ckpt.config
    tensors = ckpt.tensors
    weights = network_weights(ckpt)
    blocks: dict[str, int] = {}
    for name, t in weights.items():
        blocks[_block(name)] = blocks.get(_block(name), 0) + t.numel()
    # the sections must be what their dataclasses accept, as for sampling (one clear error)
    sections = {name: config_section(ckpt, name, cls) for name, cls in (
        ("model", ModelConfig), ("diffusion", DiffusionConfig), ("training", TrainConfig),
    ) if name in config}  # fmt: skip
    warnings = []
    if "model" in sections:  # what sampling would refuse, shown beside everything else
        try:
            check_weights(sections["model"], weights, path)
        except CheckpointError as e:
            warnings.append(f"{str(e).removeprefix(f'{path}: ')}; it cannot be sampled or resumed")
    training = config.get("training", {})
    diffusion = dict(config.get("diffusion", {}))
    data = config.get("data", {})
    data = (
        {k: v for k, v in data.items() if k != "modes" or isinstance(v, dict)}
        if isinstance(data, dict)
        else {}
    )
    if "timesteps" in diffusion:
        sampler = SamplerConfig().resolved(diffusion["timesteps"], training.get("objective", "eps"))
        diffusion["objective"] = training.get("objective")
        diffusion["default_sampler"] = f"{sampler.sampler.value}, {sampler.steps} steps"
    numbers = {k: _number(meta[k]) for k in ("ema_decay", "elapsed") if k in meta}
    strings = ("created", "weights", "torch_version", "safetensors_version")  # "2.10" is text
    return {
        "path": str(path),
        "file_bytes": path.stat().st_size,
        "kind": meta["kind"],
        "format": f"{meta['format']} v{meta['format_version']}",
        "ddpm_version": meta["ddpm_version"],
        "content_hash": meta["content_hash"],
        "step": ckpt.step,
        # a damaged file may hold anything here: keep only what is the type it should be
        **{k: v for k, v in numbers.items() if _finite(v)},
        **{k: meta[k] for k in strings if k in meta},
        **({} if meta["kind"] == "data_cache" else {  # images, no network
            "model": {
                **config.get("model", {}),
                "preset": training.get("preset"),
                "parameters": sum(blocks.values()),
                "blocks": blocks,
            },
            "diffusion": diffusion,
            "training": training,
            "parent": _parent(config.get("parent")),
        }),
        "data": data,
        "tensors": [
            {"name": k, "shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
            for k, v in tensors.items()
        ],
        "warnings": warnings,
    }


def _parent(parent) -> dict | None:
    """The model a fine-tuned one started from (ddpm train --init), as far as it is well formed."""
    if not isinstance(parent, dict):
        return None
    return {k: parent[k] for k in ("file", "content_hash", "step") if k in parent}


def run_info(folder: Path) -> dict:
    """A run directory: its model's info, what files it has, whether it can resume, and its
    training progress from metrics.jsonl."""
    folder = Path(folder)
    if not is_run_directory(folder):
        raise DataError(f"{folder}: no {MODEL} or {STATE}; is this a run directory?")
    info = checkpoint_info(folder / MODEL if (folder / MODEL).exists() else folder / STATE)
    resumable, why, world = False, f"no {STATE}", None
    if (folder / STATE).exists():
        try:
            state = load_checkpoint(folder / STATE, kind="train_state")
            world = state.world  # the processes that last trained it (torchrun)
            resumable, why = True, f"at step {state.step}"
        except CheckpointError as e:
            why = str(e)
    grids = sorted((folder / "samples").glob("step-*.png")) if (folder / "samples").is_dir() else []
    metrics = read_metrics(folder / METRICS)
    logged = [m for m in metrics if "loss" in m]
    figures = [m for m in metrics if FIGURE in m]
    info["run"] = {
        "folder": str(folder),
        "files": sorted(p.name for p in folder.iterdir() if p.is_file() and p.name[0] != "."),
        "folders": sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name[0] != "."),
        "resumable": resumable,
        "resume": why,
        "processes": world,
        "newest_grid": str(grids[-1]) if grids else None,
        "grids": len(grids),
        "snapshots": [step for step, _ in snapshots(folder)],
        "logged_steps": len(logged),
        "last": logged[-1] if logged else None,
        "figures": len(figures),
        "last_figure": figures[-1] if figures else None,
        "best": _best(folder / BEST),
    }
    info["metrics"] = metrics
    return info


def _best(path: Path) -> dict | None:
    """best.safetensors' step and quality figure, from its header; None when it has none."""
    step, figure = header_value(path, "step"), header_value(path, FIGURE)
    if not _finite(step) or not _finite(figure):
        return None
    return {"file": str(path), "step": step, FIGURE: figure}


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl; a torn last line (a crash mid-write) is skipped."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(parse_json(line))
        except ValueError:
            continue
    return records


def _finite(v) -> bool:
    """A real number a float can hold (not a bool, NaN, infinity or a 400-digit integer)."""
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


def _number(text: str):
    try:
        return parse_json(text)
    except ValueError:
        return text


def folder_info(folder: Path, image_size: tuple[int, int]) -> dict:
    """A folder of training images: what `ddpm train` would find (every image decoded)."""
    from ddpm_cli.data.folders import folder_report

    report = folder_report(folder, image_size)
    return {
        **report.summary(),
        **report.left_out(),
        "warnings": report.warnings,
    }


KEY_FRACTIONS = (0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)


def key_timesteps(T: int) -> list[int]:
    """t = 0, T-1 and a few between (1%, 5%, 10%, 25%, 50%, 75%, 90% of the chain)."""
    return sorted({min(T - 1, round(f * (T - 1))) for f in KEY_FRACTIONS})


def schedule_info(schedules: list[str], timesteps: int) -> dict:
    """beta_t, alpha_bar_t and the signal-to-noise ratio at key t, for each schedule (float64)."""
    import math

    from ddpm_cli.config import DiffusionConfig
    from ddpm_cli.diffusion.schedules import DiffusionTables

    out = {}
    for name in schedules:
        tables = DiffusionTables.from_config(DiffusionConfig(schedule=name, timesteps=timesteps))
        rows = []
        for t in key_timesteps(timesteps):
            ab = float(tables.alpha_bar[t])
            snr = ab / (1 - ab)
            rows.append(
                {
                    "t": t,
                    "beta": float(tables.betas[t]),
                    "alpha_bar": ab,
                    "snr": snr,
                    "log_snr": math.log(snr),
                }
            )
        out[name] = rows
    return {"timesteps": timesteps, "schedules": out}


def schedule_curves(schedules: list[str], timesteps: int) -> dict[str, dict[str, list[float]]]:
    """alpha_bar_t and log-SNR for every t of each schedule (float64; log-SNR is NaN where
    alpha_bar_t is 0, so a plot leaves that point out)."""
    from ddpm_cli.config import DiffusionConfig
    from ddpm_cli.diffusion.schedules import DiffusionTables

    out = {}
    for name in schedules:
        ab = DiffusionTables.from_config(DiffusionConfig(schedule=name, timesteps=timesteps))
        ab = ab.alpha_bar.double()
        log_snr = (ab / (1 - ab)).log()
        out[name] = {
            "alpha_bar": ab.tolist(),
            "log_snr": log_snr.nan_to_num(nan=float("nan"), neginf=float("nan")).tolist(),
        }
    return out
