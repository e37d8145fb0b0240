"""The latest side-by-side ratios against diffusers, as a chart: the plot at the top of
docs/benchmarks.md.

    python benchmarks/summary.py docs/images/benchmarks-vs-diffusers.png

The figures are copied from the dated sections of docs/benchmarks.md (named in each row), not
measured here: each is ddpm's img/s over diffusers' at the identical network, the median over
rounds in one process (interleaved.py) on the CPUs and over four bench.py --peers runs on the
H100, with the range over rounds or runs. Needs matplotlib (the `plot` extra).
"""

from __future__ import annotations

import sys
from pathlib import Path

# machine, preset and precision, workload, ratio, lowest, highest, docs/benchmarks.md section
ROWS = [
    ("CPU with AMX", "small fp32", "train", 1.12, 0.88, 1.37, "2026-11-23 (evening)"),
    ("CPU with AMX", "small fp32", "forward", 1.11, 1.06, 1.16, "2026-11-23 (evening)"),
    ("CPU with AMX", "small bf16", "train", 1.20, 1.09, 1.53, "2026-11-23 (evening)"),
    ("CPU with AMX", "small bf16", "forward", 1.56, 1.47, 2.75, "2026-11-23 (evening)"),
    ("CPU with AMX", "cifar10 fp32", "train", 1.29, 0.87, 1.38, "2026-11-23 (evening)"),
    ("CPU with AMX", "cifar10 fp32", "forward", 1.29, 1.21, 1.47, "2026-11-23 (evening)"),
    ("CPU with AMX", "cifar10 bf16", "train", 1.15, 0.75, 1.28, "2026-11-23 (evening)"),
    ("CPU with AMX", "cifar10 bf16", "forward", 1.48, 1.28, 1.62, "2026-11-23 (evening)"),
    ("CPU without AMX", "small fp32", "train", 1.05, 0.99, 1.17, "The CPU after these changes"),
    ("CPU without AMX", "small fp32", "forward", 1.19, 1.10, 1.39, "The CPU after these changes"),
    ("CPU without AMX*", "small bf16", "train", 1.24, 0.87, 1.32, "2026-11-23 (night)"),
    ("CPU without AMX*", "small bf16", "forward", 1.29, 0.87, 1.36, "2026-11-23 (night)"),
    ("CPU without AMX", "cifar10 fp32", "train", 1.40, 0.79, 1.52, "Winograd convolutions"),
    ("CPU without AMX", "cifar10 fp32", "forward", 1.45, 1.37, 1.49, "Winograd convolutions"),
    ("CPU without AMX", "cifar10 bf16", "train", 1.74, 1.02, 1.86, "bf16 on the CPU"),
    ("CPU without AMX", "cifar10 bf16", "forward", 2.04, 1.98, 2.13, "bf16 on the CPU"),
    ("CPU, AVX2 only*", "small fp32", "train", 1.03, 0.91, 1.21, "A CPU with AVX2 only"),
    ("CPU, AVX2 only*", "small fp32", "forward", 1.09, 0.87, 1.18, "A CPU with AVX2 only"),
    ("CPU, AVX2 only*", "cifar10 fp32", "train", 1.44, 1.01, 1.47, "A CPU with AVX2 only"),
    ("CPU, AVX2 only*", "cifar10 fp32", "forward", 1.49, 1.47, 1.51, "A CPU with AVX2 only"),
    ("H100", "cifar10 bf16", "train", 1.10, 0.98, 1.24, "2026-11-23 (later), the H100"),
    ("H100", "cifar10 bf16", "forward", 1.15, 1.13, 1.60, "2026-11-23 (later), the H100"),
]
GOALS = {"CPU": 1.1, "H100": 1.5}  # issue 6


def chart(path: Path) -> None:
    from matplotlib.figure import Figure

    labels = list(dict.fromkeys((m, p) for m, p, *_ in ROWS))  # in ROWS' order
    fig = Figure(figsize=(7.5, 0.42 * len(labels) + 1.2), layout="constrained")
    ax = fig.add_subplot()
    for offset, work, color in ((-0.18, "train", "#1f6fb4"), (0.18, "forward", "#e0802a")):
        rows = {(m, p): (r, lo, hi) for m, p, w, r, lo, hi, _ in ROWS if w == work}
        ys = [i + offset for i, k in enumerate(labels)]
        ratios = [rows[k][0] for k in labels]
        below = [rows[k][0] - rows[k][1] for k in labels]
        errs = [below, [rows[k][2] - rows[k][0] for k in labels]]
        ax.barh(ys, ratios, height=0.34, color=color, label=work)
        ax.errorbar(ratios, ys, xerr=errs, fmt="none", ecolor="#333333", elinewidth=0.8, capsize=2)
    for i, (machine, _) in enumerate(labels):
        goal = GOALS["H100" if machine == "H100" else "CPU"]
        ax.plot([goal, goal], [i - 0.45, i + 0.45], color="crimson", lw=1.4)
    ax.axvline(1.0, color="black", lw=0.8)
    ax.set_yticks(range(len(labels)), [f"{m}: {p}" for m, p in labels], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("ddpm img/s over diffusers' (median; whiskers: range over rounds or runs)")
    ax.set_title("ddpm against diffusers, identical networks; red: the issue's goal (1.1x CPU, "
                 "1.5x GPU)\n* a CPU with AMX standing in: its libraries kept below AMX, "
                 "or to AVX2", fontsize=8)  # fmt: skip
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(True, axis="x", alpha=0.3)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    chart(Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks-vs-diffusers.png"))
