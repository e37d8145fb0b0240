"""Classifier-free guidance in a limited interval of noise levels (Kynkaenniemi et al. 2024),
the experiment behind `ddpm sample --guidance-interval`'s default: train a labelled set of
realdata.py once, for a step count (so that other work on the machine changes nothing), then
sample it with guidance at every step, or only where sigma = sqrt((1 - alpha_bar) /
alpha_bar) lies in (lo, hi], plain conditional sampling (one network pass) elsewhere.

    python benchmarks/guidance_interval.py --dataset sources10 --steps 300 \\
        --scheme 2 --scheme 2:0.28:2.9 --scheme 0

A scheme is W (guidance weight W everywhere) or W:LO:HI. Prints a JSON object a line: the
Frechet distance to held-out images and the share of class-k samples read as k (realdata.py's
classifier) and the sampling seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sweep  # noqa: E402
from realdata import Dataset  # noqa: E402


def parse_scheme(text: str) -> tuple[float, float | None, float | None]:
    parts = [float(p) for p in text.split(":")]
    if len(parts) not in (1, 3):
        raise SystemExit(f"scheme {text!r}: use W or W:LO:HI")
    return (parts[0], None, None) if len(parts) == 1 else (parts[0], parts[1], parts[2])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dataset", default="sources10")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--scheme", action="append", required=True)
    p.add_argument("--sampler", default="dpm++:20")
    p.add_argument("-n", type=int, default=250)
    args = p.parse_args()
    ds = Dataset(args.dataset, sweep.HERE / ".realdata")
    models, mc, diffusion, config, steps, _, _ = sweep.train_run(
        ds, {}, 0, 0, ["default"], args.steps
    )
    for w, lo, hi in map(parse_scheme, args.scheme):
        interval = None if lo is None else (lo, hi)
        distance, _, share, seconds, _ = sweep.evaluate(
            ds, models["default"], mc, diffusion, config.objective.value, args.sampler, w, args.n,
            interval,
        )
        row = {"dataset": args.dataset, "steps": steps, "w": w, "lo": lo, "hi": hi,
               "distance": round(distance, 3), "class_share": share,
               "sample_s": round(seconds, 1)}  # fmt: skip
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
