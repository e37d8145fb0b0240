"""Editing real images (issue 25): fill the lower half of held-out images of a labelled
real-data set (realsets.py) with `ddpm inpaint`, or upscale their block means with
`ddpm upscale`, run as a user runs them, and ask the dataset's classifier (realfeatures.py)
which class each result shows.

Inpainting: a fill that agrees with the kept upper half keeps the image's class; filling the
half with the training set's mean image or with grey shows how much the upper half alone gives
away. Upscaling: the baselines are the small image's blocks (nearest) and bicubic upsampling.
Also reported: the seam, the mean absolute step between the last kept row and the first filled
one (the originals' own step is the target), the Frechet distance of the results to the
held-out images, and the wall-clock seconds of the command.

    python benchmarks/inpaint_realdata.py --run RUN                    # sources, R 1,3,10
    python benchmarks/inpaint_realdata.py --run RUN --resample 1,2,5,10 --jump 1 --n 100
    python benchmarks/inpaint_realdata.py --run RUN --flags "--sampler ddpm --steps 100"
    python benchmarks/inpaint_realdata.py --run RUN --upscale 4 --flags "--sampler ddpm"

RUN is a run trained on the dataset's training folder (benchmarks/realdata.py writes it, or
`ddpm train benchmarks/.realdata/data/sources/train --time 10m -o RUN`).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import realdata  # noqa: E402
import realfeatures  # noqa: E402
import realsets  # noqa: E402

HERE = Path(__file__).resolve().parent


def balanced(labels: torch.Tensor, n: int) -> list[int]:
    """n indices, as evenly spread over the classes as the set allows, in a fixed order."""
    per = {int(c): (labels == c).nonzero().flatten().tolist() for c in labels.unique()}
    picks, i = [], 0
    while len(picks) < n and any(i < len(v) for v in per.values()):
        picks += [v[i] for v in per.values() if i < len(v)]
        i += 1
    return picks[:n]


def read(folder: Path, names: list[str]) -> torch.Tensor:
    """The PNGs as uint8 (N, C, H, W), as the realsets keep images."""
    x = torch.from_numpy(np.stack([np.asarray(Image.open(folder / n)) for n in names]))
    return x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2)


def seam(x: torch.Tensor, row: int) -> float:
    """The mean absolute step between rows row - 1 and row, in [0, 1] units."""
    return float((x[:, :, row].float() - x[:, :, row - 1].float()).abs().mean() / 255)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--dataset", default="sources")
    ap.add_argument("--work", type=Path, default=HERE / ".realdata")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--resample", default="1,3,10")
    ap.add_argument("--jump", type=int, default=1)
    ap.add_argument("--flags", default="", help="more ddpm inpaint flags, e.g. a sampler")
    ap.add_argument("--upscale", type=int, default=0, help="upscale by this factor instead")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    ds = realdata.Dataset(args.dataset, args.work)
    s = ds.set
    if s.held_out_labels is None:
        raise SystemExit(f"{args.dataset} has no labels; use a labelled set (sources)")
    picks = balanced(s.held_out_labels, args.n)
    images, labels = s.held_out[picks], s.held_out_labels[picks]
    h = images.shape[-2]
    half = h // 2

    def accuracy(x: torch.Tensor) -> float:
        return float((realfeatures.predict(ds.net, x) == labels).float().mean())

    rows = []
    mean_image = s.train.float().mean(0, keepdim=True).round().to(torch.uint8)
    upper, lower = images[:, :, :half], images[:, :, half:]
    baselines = [
        ("mean fill", torch.cat([upper, mean_image[:, :, half:].expand_as(lower)], 2)),
        ("grey fill", torch.cat([upper, torch.full_like(lower, 128)], 2)),
    ]
    n = args.upscale
    if n:
        small = F.avg_pool2d(images.float(), n).round().to(torch.uint8)
        bicubic = F.interpolate(small.float(), scale_factor=n, mode="bicubic", align_corners=False)
        baselines = [
            ("blocks (nearest)", F.interpolate(small, scale_factor=n, mode="nearest")),
            ("bicubic", bicubic.round().clamp(0, 255).to(torch.uint8)),
        ]
    for name, x in [("original", images), *baselines]:
        rows.append({"fill": name, "class_share": accuracy(x), "seam": seam(x, half),
                     "distance": ds.distance(x), "seconds": 0.0})  # fmt: skip

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "in").mkdir()
        names = []
        for i, img in enumerate(small if n else images):
            names.append(f"{i:04d}.png")
            realsets.to_pil(img).save(tmp / "in" / names[-1])
        mask = np.zeros((h, images.shape[-1]), np.uint8)
        mask[half:] = 255
        Image.fromarray(mask, "L").save(tmp / "mask.png")
        for r in (int(v) for v in args.resample.split(",")) if not n else [0]:
            out = tmp / f"out-{r}"
            edit = ["inpaint", str(args.run), str(tmp / "in"), "--mask", str(tmp / "mask.png"),
                    "--resample", str(r), "--jump", str(args.jump)]  # fmt: skip
            if n:
                edit = ["upscale", str(args.run), str(tmp / "in"), "--factor", str(n)]
            cmd = ["ddpm", *edit, "-o", str(out), "--seed", str(args.seed), "-q",
                   *shlex.split(args.flags)]  # fmt: skip
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            seconds = time.perf_counter() - t0
            x = read(out, [f"{Path(n).stem}-000000.png" for n in names])
            what = f"ddpm upscale --factor {n}" if n else f"ddpm inpaint -r {r} --jump {args.jump}"
            rows.append({"fill": f"{what} {args.flags}".strip(),
                         "class_share": accuracy(x), "seam": seam(x, half),
                         "distance": ds.distance(x), "seconds": seconds})  # fmt: skip
            if not args.json:
                print(f"  {rows[-1]['fill']}: {seconds:.0f} s", file=sys.stderr, flush=True)

    task = f"upscaled from {h // n}x{h // n}" if n else f"lower {h - half} rows filled"
    print(
        f"{args.dataset}: {len(picks)} held-out images, {task}; "
        f"{len(s.pool_classes)} classes, chance {1 / len(s.pool_classes):.2f}"
    )
    for row in rows:
        if args.json:
            print(json.dumps({"dataset": args.dataset, **row}))
        else:
            print(
                f"{row['fill']:48s} class {row['class_share']:.2f}  seam {row['seam']:.3f}  "
                f"FD {row['distance']:8.2f}  {row['seconds']:6.1f} s"
            )


if __name__ == "__main__":
    main()
