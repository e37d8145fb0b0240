"""Charts as image bytes, drawn by matplotlib (the optional `plot` extra).

Only matplotlib's object API is used (`Figure`, no pyplot), so nothing opens a window or keeps
global state. The format follows the file name: .png, .svg or .pdf.
"""

from __future__ import annotations

import io
from pathlib import Path

from ddpm_cli.errors import ConfigError, MissingExtra
from ddpm_cli.store.files import FIGURE

FORMATS = (".png", ".svg", ".pdf")
INSTALL_HINT = "pip install 'ddpm-cli[plot]'"


def plot_format(path: Path) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise ConfigError(f"{path}: a plot is written as {', '.join(FORMATS)}; change the suffix")
    return suffix[1:]


def _figure(rows: int):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingExtra(
            f"plots need matplotlib, which is not installed; run: {INSTALL_HINT}"
        ) from None
    return Figure(figsize=(7.5, 2.6 * rows), layout="constrained")


def _encode(fig, fmt: str) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=120)
    return buf.getvalue()


def loss_plot(metrics: list[dict], fmt: str = "png", title: str = "") -> bytes:
    """Training loss against step (log scale), with the loss of each quarter of the timesteps
    and the quality figure where the run logged one, and the learning rate below. `metrics`
    are metrics.jsonl records."""
    records = [m for m in metrics if "loss" in m and "step" in m]
    if not records:
        raise ConfigError("no loss was logged in this run yet; nothing to plot")
    fig = _figure(2)
    ax, ax_lr = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    steps = [m["step"] for m in records]
    few = {"marker": "o", "ms": 4} if len(records) < 3 else {}  # one or two: no line to see
    ax.plot(steps, [m["loss"] for m in records], color="black", lw=1.6, label="loss", **few)
    names = ("t < T/4 (least noise)", "T/4 - T/2", "T/2 - 3T/4", "t >= 3T/4 (most noise)")
    for q, name in enumerate(names):
        # a quarter that no item of the logged steps fell into is a gap in its line
        values = [_at(m.get("loss_quarters"), q) for m in records]
        if any(v == v for v in values):
            ax.plot(steps, values, lw=0.9, alpha=0.8, label=name, marker=".", ms=3)
    figures = [m for m in metrics if isinstance(m.get(FIGURE), (int, float)) and "step" in m]
    if figures:  # the quality figure (training/quality.py), on the same scale
        ax.plot([m["step"] for m in figures], [m[FIGURE] for m in figures], color="black", ls="--",
                lw=1.4, marker="o", ms=3, label="held-out loss (quality figure)")  # fmt: skip
    ax.set_yscale("log")
    ax.set_ylabel("loss")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncols=2)
    ax.set_title(title, fontsize=9)
    if all("lr" in m for m in records):
        ax_lr.plot(steps, [m["lr"] for m in records], color="tab:gray", **few)
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    ax_lr.grid(True, alpha=0.3)
    return _encode(fig, fmt)


def _at(row: list | None, i: int) -> float:
    value = row[i] if row and i < len(row) else None
    return float("nan") if value is None else value


def schedule_plot(schedules: dict[str, dict[str, list[float]]], fmt: str = "png") -> bytes:
    """alpha_bar_t and log-SNR against t, one line per schedule. `schedules` maps a name to its
    "alpha_bar" and "log_snr" lists (index = t)."""
    fig = _figure(2)
    ax_ab, ax_snr = fig.subplots(2, 1, sharex=True)
    for name, curves in schedules.items():
        ts = range(len(curves["alpha_bar"]))
        ax_ab.plot(ts, curves["alpha_bar"], label=name)
        ax_snr.plot(ts, curves["log_snr"], label=name)
    ax_ab.set_ylabel("alpha_bar_t")
    ax_snr.set_ylabel("log SNR_t")
    ax_snr.set_xlabel("t")
    ax_ab.set_title(f"T = {len(next(iter(schedules.values()))['alpha_bar'])}", fontsize=9)
    for ax in (ax_ab, ax_snr):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    return _encode(fig, fmt)
