"""Which cheap figure, computable during training without downloaded weights, tracks sample
quality? (issue 26: a quality figure every --eval-every steps, and best.safetensors by it.)

For each snapshot of a run (`ddpm train ... --keep N`), on a real-data set (realsets.py):

  FD          the benchmark's own judge: Frechet distance of 500 samples to the held-out
              images in its trained classifier's features (realdata.py); what a figure must track
  rand-FD     Frechet distance of 128 samples to 512 training images in the features of a fixed,
              randomly initialised convolutional network (no training, no download)
  SWD         sliced Wasserstein distance of the pixels of 128 samples to 512 training images
  val-loss    the EMA model's loss on 256 held-out images at fixed t and noise (needs images
              the run did not train on)

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
from ddpm_cli.diffusion.process import training_losses  # noqa: E402
from ddpm_cli.diffusion.schedules import DiffusionTables  # noqa: E402
from ddpm_cli.generation.sampling import generate, load_for_sampling  # noqa: E402
from ddpm_cli.sampler_config import SamplerConfig  # noqa: E402
from ddpm_cli.store.files import snapshots  # noqa: E402

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
        g = torch.Generator().manual_seed(5)
        t = torch.randint(0, sm.diffusion.timesteps, (len(held),), generator=g)
        eps = torch.randn(held.shape, generator=g)
        with torch.no_grad():
            y = None
            if sm.model_config.num_classes:
                y = torch.full((len(held),), sm.model_config.num_classes)
            val = training_losses(sm.model, tables, realfeatures.to_unit(held), t, eps,
                                  sm.objective, None, y).mean()  # fmt: skip
        rows.append({
            "step": step,
            "FD": ds.distance(judge),
            "rand-FD": realfeatures.frechet(feats(realfeatures.to_unit(few)).double(), ref_feats),
            "SWD": realfeatures.swd(few, train_ref),
            "val-loss": float(val),
        })  # fmt: skip
        print("  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                        for k, v in rows[-1].items()), flush=True)  # fmt: skip
    fd = [r["FD"] for r in rows]
    for key in ("rand-FD", "SWD", "val-loss"):
        print(f"rank correlation with FD over {len(rows)} snapshots: {key} "
              f"{spearman([r[key] for r in rows], fd):+.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
