"""Which cheap figure, computable during training without downloaded weights, tracks sample
quality? (issue 26: a quality figure every --eval-every steps, and best.safetensors by it.)

For each snapshot of a run (`ddpm train ... --keep N`), on a real-data set (realsets.py):

  FD          the benchmark's own judge: Frechet distance of 500 samples to the held-out
              images in its trained classifier's features (realdata.py); what a figure must track
  rand-FD     Frechet distance of 128 samples to 512 training images in the features of a fixed,
              randomly initialised convolutional network (no training, no download)
  SWD         sliced Wasserstein distance of the pixels of 128 samples to 512 training images
  val-loss    the figure `ddpm train --eval-every` logs (training/quality.py): the EMA model's
              loss on 256 held-out images at fixed, stratified t and fixed noise
  copied      the share of the judge's samples closer to a training image than the training
              images' own 5th-percentile nearest-neighbour distance (ddpm eval --memorization)

and the rank correlation of each figure with FD over the snapshots.

    python benchmarks/quality_figures.py --run RUN --dataset sources
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
import realdata  # noqa: E402
import realfeatures  # noqa: E402

from ddpm_cli.data.folders import to_uint8  # noqa: E402
from ddpm_cli.diffusion.schedules import DiffusionTables  # noqa: E402
from ddpm_cli.evaluation.memorization import copied_share  # noqa: E402
from ddpm_cli.generation.sampling import generate, load_for_sampling  # noqa: E402
from ddpm_cli.sampler_config import SamplerConfig  # noqa: E402
from ddpm_cli.store.files import snapshots  # noqa: E402
from ddpm_cli.training import quality  # noqa: E402

HERE = Path(__file__).resolve().parent
CPU = torch.device("cpu")


def random_features(channels: int) -> nn.Module:
    """A fixed random conv net: 3 stride-2 convolutions with ReLU, pooled to 64 features."""
    torch.manual_seed(1234)
    net = nn.Sequential(
        nn.Conv2d(channels, 32, 3, 2, 1), nn.ReLU(), nn.Conv2d(32, 64, 3, 2, 1), nn.ReLU(),
        nn.Conv2d(64, 64, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    )  # fmt: skip
    return net.eval().requires_grad_(False)


def spearman(a: list[float], b: list[float]) -> float:
    ra = torch.tensor(a).argsort().argsort().double()
    rb = torch.tensor(b).argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--dataset", default="sources")
    ap.add_argument("--work", type=Path, default=HERE / ".realdata")
    ap.add_argument("--plot", type=Path, help="also draw FD and the held-out loss against step")
    args = ap.parse_args()
    ds = realdata.Dataset(args.dataset, args.work)
    s = ds.set
    train_ref = s.train[
        torch.randperm(len(s.train), generator=torch.Generator().manual_seed(0))[:512]
    ]
    held = s.held_out[:256]
    feats = random_features(s.train.shape[1])
    ref_feats = feats(realfeatures.to_unit(train_ref)).double()
    rows = []
    for step, path in snapshots(args.run):
        sm = load_for_sampling(path)
        batches = generate(sm, SamplerConfig(), list(range(500)), 0, 250, CPU)
        judge = torch.cat([to_uint8(x) for _, x in batches])
        few = judge[:128]
        tables = DiffusionTables.from_config(sm.diffusion).to(CPU, torch.float32)
        labels = s.held_out_labels[:256] if sm.model_config.num_classes else None
        figure = quality.heldout_loss(  # the figure `ddpm train --eval-every` logs
            sm.model, tables, quality.HeldOut(held, labels, 5), sm.objective, CPU, 64
        )
        rows.append({
            "step": step,
            "FD": ds.distance(judge),
            "rand-FD": realfeatures.frechet(feats(realfeatures.to_unit(few)).double(), ref_feats),
            "SWD": realfeatures.swd(few, train_ref),
            "val-loss": figure,
            "copied": copied_share(judge, s.train)["copied_share"],
        })  # fmt: skip
        print("  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                        for k, v in rows[-1].items()), flush=True)  # fmt: skip
    fd = [r["FD"] for r in rows]
    for key in ("rand-FD", "SWD", "val-loss"):
        print(f"rank correlation with FD over {len(rows)} snapshots: {key} "
              f"{spearman([r[key] for r in rows], fd):+.2f}")  # fmt: skip
    if args.plot:
        plot(rows, args.plot, f"{args.dataset}: {Path(args.run).name}, {len(rows)} snapshots")


def plot(rows: list[dict], path: Path, title: str) -> None:
    """The judge's FD and the held-out loss against step, one panel each, the best of each
    marked."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.2), layout="constrained")
    axes = fig.subplots(2, 1, sharex=True)
    steps = [r["step"] for r in rows]
    for ax, key, label in zip(axes, ("FD", "val-loss"), (
        "Frechet distance to held-out images\n(the benchmark's judge)",
        "held-out loss\n(ddpm train's quality figure)",
    ), strict=True):  # fmt: skip
        values = [r[key] for r in rows]
        ax.plot(steps, values, marker="o", color="black")
        best = min(range(len(values)), key=values.__getitem__)
        ax.plot([steps[best]], [values[best]], marker="o", ms=10, mfc="none", color="tab:red")
        ax.set_ylabel(label, fontsize=8)
        ax.grid(True, alpha=0.3)
    axes[0].set_title(title, fontsize=9)
    axes[1].set_xlabel("training step")
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
