"""Choosing `ddpm sample --init`'s strength and `--guide`'s factor on real images: roughened
held-out photographs redrawn by a run trained on the others, run as a user runs them.

The held-out crops are split in two: the first half is roughened and redrawn, the second is the
reference for realism (the Frechet distance in the dataset classifier's features, as in
realdata.py). Faithfulness is the RMSE (in [0, 1] units) of each result to the clean original
it was made from: a redraw that looks real but is another picture scores badly, and so does one
that keeps the damage. Two kinds of damage:

- noisy: the original plus Gaussian noise of standard deviation 0.15 (a grainy scan);
- strokes: a 5x5 median filter and a palette of 6 colours (the SDEdit paper's stand-in for a
  painted sketch: flat regions of colour, no texture).

`--guide` measures guided variations instead: `-n 4` per original at each factor, their FD, their
RMSE to the original, and their spread (the mean RMSE between two variations of one original).

    python benchmarks/sdedit_realdata.py --run RUN --strength 0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,1
    python benchmarks/sdedit_realdata.py --run RUN --guide 2,4,8
    python benchmarks/sdedit_realdata.py --run RUN --strength 0.3,0.5,0.7 --picture out.png

`--picture` draws six originals per kind of damage: the original, the damaged input, then the
redraw at each strength, in rows.

RUN: a run trained on the photographs set's training folder (benchmarks/realdata.py writes one,
or `ddpm train benchmarks/.realdata/data/photos/train --time 20m -o RUN`).
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
from PIL import Image, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parent))
import realdata  # noqa: E402
import realfeatures  # noqa: E402
import realsets  # noqa: E402
from inpaint_realdata import read  # noqa: E402

HERE = Path(__file__).resolve().parent
NOISE_STD = 0.15
PALETTE = 6
SHOWN = 6  # originals per kind in --picture


def picture(blocks: list[list[torch.Tensor]], path: Path, zoom: int = 2) -> None:
    """Side by side per kind: for each of SHOWN originals a row of its images (block k of a
    kind is (SHOWN, C, H, W)), 4-pixel gaps, a wider one between kinds."""
    h, w = blocks[0][0].shape[-2:]
    width = len(blocks[0]) * (w + 4)
    canvas = Image.new("RGB", (len(blocks) * (width + 8), SHOWN * (h + 4)), "white")
    for r, row in enumerate(blocks):
        for c, block in enumerate(row):
            for i in range(SHOWN):
                img = realsets.to_pil(block[i]).convert("RGB")
                canvas.paste(img, (r * (width + 8) + c * (w + 4), i * (h + 4)))
    canvas.resize((canvas.width * zoom, canvas.height * zoom), Image.NEAREST).save(path)


def roughen(images: torch.Tensor, kind: str, seed: int = 0) -> torch.Tensor:
    """uint8 (N, C, H, W) -> the same images damaged as `kind` says (module docstring)."""
    if kind == "noisy":
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn(images.shape, generator=g) * NOISE_STD * 255
        return (images.float() + noise).round().clamp(0, 255).to(torch.uint8)
    out = []
    for img in images:
        pil = realsets.to_pil(img).filter(ImageFilter.MedianFilter(5))
        pil = pil.quantize(PALETTE, method=0).convert(pil.mode)  # median cut
        out.append(torch.from_numpy(np.asarray(pil).copy()))
    x = torch.stack(out)
    return x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2)


def rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    """Root mean square difference in [0, 1] units, over every pixel of every image."""
    return float(((a.float() - b.float()) / 255).pow(2).mean().sqrt())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--dataset", default="photos")
    ap.add_argument("--work", type=Path, default=HERE / ".realdata")
    ap.add_argument("--n", type=int, default=250, help="originals redrawn (at most half the set)")
    ap.add_argument("--strength", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,1")
    ap.add_argument("--kinds", default="noisy,strokes")
    ap.add_argument("--guide", default="", help="factors: measure --guide variations instead")
    ap.add_argument("--flags", default="", help="more ddpm sample flags, e.g. a sampler")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--picture", type=Path, help="also draw the redraws (module docstring)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    ds = realdata.Dataset(args.dataset, args.work)
    held = ds.set.held_out
    half = len(held) // 2
    originals, reference = held[: min(args.n, half)], held[half:]
    ref = realfeatures.features(ds.net, reference)

    def fd(x: torch.Tensor) -> float:
        return realfeatures.frechet(realfeatures.features(ds.net, x), ref)

    rows = [{"what": "the originals", "distance": fd(originals), "rmse": 0.0}]
    kinds = {} if args.guide else {k: roughen(originals, k, args.seed)
                                   for k in args.kinds.split(",")}  # fmt: skip
    for kind, damaged in kinds.items():
        rows.append({"what": f"{kind}: the input", "distance": fd(damaged),
                     "rmse": rmse(damaged, originals)})  # fmt: skip

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        names = [f"{i:04d}.png" for i in range(len(originals))]

        def write(folder: Path, images: torch.Tensor) -> Path:
            folder.mkdir()
            for name, img in zip(names, images, strict=True):
                realsets.to_pil(img).save(folder / name)
            return folder

        def ddpm(*edit: str, n: int = 1) -> tuple[torch.Tensor, float]:
            """(n, N, C, H, W): variation k of every input; without inputs, N plain samples."""
            out = tmp / f"out-{time.monotonic_ns()}"
            count = n if edit else len(names)
            cmd = ["ddpm", "sample", str(args.run), *edit, "-n", str(count), "-o", str(out),
                   "--seed", str(args.seed), "-q", *shlex.split(args.flags)]  # fmt: skip
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            seconds = time.perf_counter() - t0
            if not edit:
                return read(out, sorted(p.name for p in out.glob("*.png")))[None], seconds
            x = torch.stack([read(out, [f"{Path(m).stem}-{k:06d}.png" for m in names])
                             for k in range(n)])  # fmt: skip
            return x, seconds

        shown = []
        for kind, damaged in kinds.items():
            folder = write(tmp / kind, damaged)
            shown.append([originals[:SHOWN], damaged[:SHOWN]])
            for s in args.strength.split(","):
                x, seconds = ddpm("--init", str(folder), "--strength", s)
                shown[-1].append(x[0, :SHOWN])
                rows.append({"what": f"{kind}: --strength {s}", "distance": fd(x[0]),
                             "rmse": rmse(x[0], originals), "seconds": seconds})  # fmt: skip
                if not args.json:
                    print(f"  {rows[-1]['what']}: {seconds:.0f} s", file=sys.stderr, flush=True)
        if args.picture and shown:
            picture(shown, args.picture)
        if args.guide:
            folder = write(tmp / "guides", originals)
            for factor in args.guide.split(","):
                x, seconds = ddpm("--guide", str(folder), "--factor", factor, n=4)
                spread = sum(rmse(x[i], x[j]) for i in range(4) for j in range(i + 1, 4)) / 6
                rows.append({"what": f"--guide --factor {factor}", "distance": fd(x.flatten(0, 1)),
                             "rmse": rmse(x, originals.expand_as(x)), "spread": spread,
                             "seconds": seconds})  # fmt: skip
        x, seconds = ddpm()  # plain samples: as real as the model gets, faithful to nothing
        rows.append({"what": "ddpm sample (no input)", "distance": fd(x[0]),
                     "rmse": rmse(x[0], originals), "seconds": seconds})  # fmt: skip

    print(f"{args.dataset}: {len(originals)} held-out originals, FD against the other "
          f"{len(reference)}; {args.flags or 'the default sampler'}")  # fmt: skip
    for row in rows:
        if args.json:
            print(json.dumps({"dataset": args.dataset, "flags": args.flags, **row}))
        else:
            extra = f"  spread {row['spread']:.3f}" if "spread" in row else ""
            print(f"{row['what']:34s} FD {row['distance']:7.2f}  RMSE {row['rmse']:.3f}{extra}"
                  f"  {row.get('seconds', 0):5.1f} s")  # fmt: skip


if __name__ == "__main__":
    main()
