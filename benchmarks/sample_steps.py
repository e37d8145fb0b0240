"""How many sampler steps a model trained for minutes on real images needs: train once per
dataset and budget with the defaults (as benchmarks/realdata.py does), then sample the same
seeds at each step count and measure the samples as realdata.py does.

    python benchmarks/sample_steps.py --datasets faces,photos,sources --budgets 1m,5m \\
        --steps 10,12,15,20,30

Prints one JSON object a line: dataset, budget, seed, steps, sampler_flags, distance (Frechet
distance in the classifier's feature space), class_share (labelled sets), sample_s (the
sampling command's wall-clock seconds, process start included). Finished runs are kept under
--work/steps, one per dataset, budget and seed, so a second call with other --steps samples
the same models again; --sampler-flags adds flags to every `ddpm sample`
(`--sampler-flags="--sampler ddim"`). Needs the `bench` extra.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from realdata import DDPM, HERE, Dataset, _run, sample_ddpm  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--datasets", default="faces,photos,sources")
    p.add_argument("--budgets", default="1m,5m", help="training budgets, as ddpm train --time")
    p.add_argument("--steps", default="10,12,15,20")
    p.add_argument("--sampler-flags", default="", help="more flags for every ddpm sample")
    p.add_argument("-n", type=int, default=500, help="samples per step count")
    p.add_argument("--seed", type=int, default=0, help="the training seed (samples: seed 1)")
    p.add_argument("--work", type=Path, default=HERE / ".realdata")
    args = p.parse_args()
    runs = args.work / "steps"
    runs.mkdir(parents=True, exist_ok=True)
    for name in args.datasets.split(","):
        ds = Dataset(name, args.work)
        for budget in args.budgets.split(","):
            run = runs / f"{name}-{budget}-seed{args.seed}"
            log, done = runs / f"{run.name}.log", runs / f"{run.name}.done"
            if not done.exists():  # (a run that was cut short is trained again)
                shutil.rmtree(run, ignore_errors=True)
                _run([*DDPM, "train", str(ds.folder), "--out", str(run), "--seed", str(args.seed),
                      "--time", budget], log)  # fmt: skip
                done.touch()
            for steps in (int(s) for s in args.steps.split(",")):
                out = run / f"out-{steps}"
                shutil.rmtree(out, ignore_errors=True)
                flags = ["--steps", str(steps), *shlex.split(args.sampler_flags)]
                seconds, images, labels = sample_ddpm(ds, run, out, args.n, flags, log)
                share = ds.class_share(images, labels)
                print(json.dumps({
                    "dataset": name, "budget": budget, "seed": args.seed, "steps": steps,
                    "sampler_flags": args.sampler_flags,
                    "distance": round(ds.distance(images), 4),
                    "class_share": None if share is None else round(share, 4),
                    "sample_s": round(seconds, 1),
                }), flush=True)  # fmt: skip
                shutil.rmtree(out)


if __name__ == "__main__":
    main()
