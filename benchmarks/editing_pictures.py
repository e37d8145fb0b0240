"""The pictures of docs/editing.md, made by running the commands the page shows on held-out
images of a real-data set (realsets.py), with a run trained on its training folder.

    python benchmarks/editing_pictures.py --run RUN --dataset photos -o docs/images

Writes editing-inpaint.png, editing-outpaint.png, editing-sdedit.png (a strip over the
strength), editing-upscale.png and editing-guide.png, and prints each command it ran.
"""

from __future__ import annotations

import argparse
import io
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch.nn.functional as F
from PIL import Image, ImageDraw
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import realsets  # noqa: E402

HERE = Path(__file__).resolve().parent
STRENGTHS = (0.1, 0.3, 0.5, 0.7, 0.9, 1.0)


def ddpm(*args: str) -> bytes:
    print("ddpm " + " ".join(shlex.quote(a) for a in args), file=sys.stderr)
    return subprocess.run(["ddpm", *args], check=True, capture_output=True).stdout


def enlarge(path: Path, scale: int) -> None:
    """Grids of 32-pixel images are small on a page: enlarge them, each pixel a block."""
    img = Image.open(path)
    img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST).save(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--dataset", default="photos")
    ap.add_argument("--work", type=Path, default=HERE / ".realdata")
    ap.add_argument("--picks", default="3,40,77,150", help="held-out images to edit")
    ap.add_argument("--seed", default="1")
    ap.add_argument("--scale", type=int, default=3)
    ap.add_argument("-o", "--out", type=Path, default=Path("docs/images"))
    args = ap.parse_args()
    held = load_file(args.work / "data" / args.dataset / "sets.safetensors")["held_out"]
    picks = [int(v) for v in args.picks.split(",")]
    run, seed, out = str(args.run), args.seed, args.out
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for folder in ("in", "narrow", "small"):
            (tmp / folder).mkdir()
        for i in picks:
            img = held[i]
            realsets.to_pil(img).save(tmp / "in" / f"{i:03d}.png")
            realsets.to_pil(img[:, :, 8:24].contiguous()).save(tmp / "narrow" / f"{i:03d}.png")
            small = F.avg_pool2d(img[None].float(), 4)[0].round().byte()
            realsets.to_pil(small).save(tmp / "small" / f"{i:03d}.png")
        h = held.shape[-1]
        mask = np.zeros((h, h), np.uint8)
        mask[h // 4 : 3 * h // 4, h // 4 : 3 * h // 4] = 255
        Image.fromarray(mask, "L").save(tmp / "mask.png")
        common = ["--seed", seed, "-q", "--overwrite"]
        jobs = {
            "editing-inpaint.png": ["inpaint", run, str(tmp / "in"), "--mask",
                                    str(tmp / "mask.png"), "-n", "4"],
            "editing-outpaint.png": ["inpaint", run, str(tmp / "narrow"), "--outpaint",
                                     "8,0,8,0", "-n", "4"],
            "editing-upscale.png": ["upscale", run, str(tmp / "small"), "-n", "4"],
            "editing-guide.png": ["sample", run, "--guide", str(tmp / "in"), "--factor", "8",
                                  "-n", "4"],
        }  # fmt: skip
        for name, job in jobs.items():
            ddpm(*job, "--grid", str(out / name), *common)
            enlarge(out / name, args.scale)
        # the SDEdit strip: the input, then one image per strength, a row per input
        rows = []
        for i in picks[:2]:
            cells = [Image.open(tmp / "in" / f"{i:03d}.png").convert("RGB")]
            for s in STRENGTHS:
                png = ddpm("sample", run, "--init", str(tmp / "in" / f"{i:03d}.png"),
                           "--strength", f"{s:g}", "-n", "1", "-o", "-", *common)  # fmt: skip
                cells.append(Image.open(io.BytesIO(png)).convert("RGB"))
            rows.append(cells)
        w = h + 2
        strip = Image.new("RGB", (2 + w * len(rows[0]), 2 + w * len(rows) + 12), "white")
        draw = ImageDraw.Draw(strip)
        for r, cells in enumerate(rows):
            for c, cell in enumerate(cells):
                strip.paste(cell, (2 + c * w, 14 + r * w))
        for c, label in enumerate(["input", *(f"S={s:g}" for s in STRENGTHS)]):
            draw.text((2 + c * w, 1), label, fill="black")
        strip.save(out / "editing-sdedit.png")
        enlarge(out / "editing-sdedit.png", args.scale)


if __name__ == "__main__":
    main()
