"""Quality per minute of training on real images: ddpm's defaults, side by side with a diffusers
script (issue 23), on datasets made from scikit-image's bundled photographs (realsets.py).

    python benchmarks/realdata.py                                  # every dataset, 1, 5, 20 min
    python benchmarks/realdata.py --datasets faces --budgets 20s --json     # a one-minute smoke run
    python benchmarks/realdata.py --budgets 1m,5m --peers          # + the diffusers script
    python benchmarks/realdata.py --budgets 2000steps              # a step count (GPUs)
    python benchmarks/realdata.py --datasets photos --budgets 1m \\
        --variant lr3e-4="--lr 3e-4" --variant base=""             # ddpm with other flags
    python benchmarks/realdata.py --plot results.jsonl -o realdata.png   # distance over time

For each dataset and budget: `ddpm train FOLDER --time BUDGET` with the defaults (plus a
variant's flags), then `ddpm sample RUN -n N` (`--class all` for a labelled set), both as a
user runs them; with --peers the same for benchmarks/diffusers_script.py, in the same run, one
process at a time. `--stop signal` interrupts the default-length training with Ctrl-C (SIGINT)
at the budget instead, as a user without --time does. Reported per run:

  steps      optimizer steps trained in the budget
  FD         Frechet distance to the held-out real images in the feature space of a small
             classifier trained on real images of the dataset (realfeatures.py); the header
             gives two real sets' distance (the floor) and uniform noise's (the ceiling)
  SWD        sliced Wasserstein distance of the pixels to the held-out images
  class      a labelled set: the share of class-k samples the classifier reads as k
  sample_s   wall-clock seconds of the sampling command (process start included)

--json prints one JSON object a line: impl, dataset, image_size, budget_s, steps, distance,
swd, sample_s, class_share, train_s. Everything is written under --work (default
benchmarks/.realdata): data, classifiers, runs and samples; runs are deleted unless --keep.
Needs the `bench` extra (scikit-image; diffusers for --peers); --plot needs matplotlib.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import realfeatures  # noqa: E402
import realsets  # noqa: E402

HERE = Path(__file__).resolve().parent
PEER = HERE / "diffusers_script.py"
UNITS = {"s": 1, "m": 60, "h": 3600}
DDPM = [sys.executable, "-m", "ddpm_cli"]


def parse_budget(text: str) -> tuple[str, float]:
    """'20s', '5m', '1h' -> ('time', seconds); '2000steps' -> ('steps', 2000)."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(s|m|h|steps)", text.strip())
    if not m:
        raise SystemExit(f"budget {text!r}: use e.g. 20s, 5m, 1h or 2000steps")
    value, unit = float(m.group(1)), m.group(2)
    return ("steps", int(value)) if unit == "steps" else ("time", value * UNITS[unit])


def budget_name(kind: str, value: float) -> str:
    if kind == "steps":
        return f"{int(value)}steps"
    return f"{value / 60:g}m" if value >= 60 else f"{value:g}s"


class Dataset:
    """A realsets.RealSet on disk (its training folder, cached tensors) with its classifier."""

    def __init__(self, name: str, work: Path, subset: int | None = None):
        """`subset`: train on that many of the training images (a seeded choice), for the
        few-image experiments; the held-out images and the classifier stay the set's."""
        self.name = name
        root = work / "data" / name
        cache = root / "sets.safetensors"
        if cache.exists():
            t = load_file(cache)
            meta = json.loads((root / "sets.json").read_text())
            self.set = realsets.RealSet(
                name, t["train"], t["held_out"], t["pool"], t["pool_labels"],
                tuple(meta["pool_classes"]), tuple(meta["classes"]), t.get("train_labels"),
                t.get("held_out_labels"),
            )  # fmt: skip
        else:
            s = realsets.DATASETS[name]()
            tensors = {k: getattr(s, k) for k in ("train", "held_out", "pool", "pool_labels",
                                                   "train_labels", "held_out_labels")}  # fmt: skip
            root.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in tensors.items() if v is not None}, cache)
            meta = {"pool_classes": s.pool_classes, "classes": s.classes}
            (root / "sets.json").write_text(json.dumps(meta))
            self.set = s
        folder = root / "train"
        if subset is not None and subset < len(self.set.train):
            pick = torch.randperm(len(self.set.train), generator=torch.Generator().manual_seed(0))
            pick = pick[:subset].sort().values
            labels = self.set.train_labels
            self.set = dataclasses.replace(self.set, train=self.set.train[pick],
                                           train_labels=None if labels is None else labels[pick])
            folder = root / f"train-{subset}"
        self.folder = self.set.write(folder)
        self.net = realfeatures.load_or_train(
            work / "classifiers", name, self.set.pool, self.set.pool_labels,
            len(self.set.pool_classes),
        )  # fmt: skip
        self.held = realfeatures.features(self.net, self.set.held_out)

    def distance(self, images: torch.Tensor) -> float:
        return realfeatures.frechet(realfeatures.features(self.net, images), self.held)

    def class_share(self, images: torch.Tensor, labels: torch.Tensor) -> float | None:
        """The share of images the classifier reads as their label (labelled sets only); the
        classifier's classes are the dataset's, in the same order."""
        if not self.set.classes:
            return None
        return float((realfeatures.predict(self.net, images) == labels).float().mean())

    def references(self) -> dict:
        s = self.set
        g = torch.Generator().manual_seed(0)
        noise = torch.randint(0, 256, s.held_out.shape, generator=g, dtype=torch.uint8)
        out = {
            "real": self.distance(s.train),
            "noise": self.distance(noise),
            "real_swd": realfeatures.swd(s.train, s.held_out),
        }
        if s.classes:
            out["real_class"] = self.class_share(s.held_out, s.held_out_labels)
        return out


def _run(cmd: list[str], log: Path, stop_after: float | None = None) -> float:
    """Run cmd with its output in `log`; with stop_after, send SIGINT after that many seconds
    (Ctrl-C). Returns the wall-clock seconds; raises on a failure exit."""
    t0 = time.perf_counter()
    with open(log, "ab") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        if stop_after is not None:
            try:
                proc.wait(timeout=stop_after)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGINT)
        rc = proc.wait()
    if rc not in (0, 130):
        tail = log.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{shlex.join(cmd)} exited with {rc}:\n{tail}")
    return time.perf_counter() - t0


def read_pngs(folder: Path, classes: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    files = sorted(folder.glob("*.png"))
    arr = np.stack([np.asarray(Image.open(p)) for p in files])
    x = torch.from_numpy(arr)
    x = x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2)
    if classes:
        labels = torch.tensor([classes.index(p.name.rsplit("-", 1)[0]) for p in files])
    else:
        labels = torch.zeros(len(files), dtype=torch.long)
    return x.contiguous(), labels


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    out = [np.asarray(realsets.to_pil(x).resize((size, size), Image.Resampling.LANCZOS))
           for x in images]  # fmt: skip
    x = torch.from_numpy(np.stack(out))
    return (x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2)).contiguous()


def run_ddpm(ds: Dataset, run: Path, budget: tuple[str, float], args, extra: list[str],
             sample_extra: list[str]) -> dict:  # fmt: skip
    kind, value = budget
    train = [*DDPM, "train", str(ds.folder), "--out", str(run), "--seed", str(args.seed)]
    stop_after = None
    if kind == "steps":
        train += ["--steps", str(int(value))]
    elif args.stop == "time":
        train += ["--time", f"{value:g}s"]
    else:
        stop_after = value
    train_s = _run(train + extra, run.parent / f"{run.name}.log", stop_after)
    sample_s, images, labels = sample_ddpm(ds, run, run / "out", args.n, sample_extra,
                                           run.parent / f"{run.name}.log")  # fmt: skip
    from ddpm_cli.store.checkpoint import read_header

    meta = read_header(run / "model.safetensors")["__metadata__"]
    return {"steps": int(json.loads(meta["step"])), "train_s": train_s, "sample_s": sample_s,
            "images": images, "labels": labels}  # fmt: skip


def sample_ddpm(ds: Dataset, run: Path, out: Path, n: int, extra: list[str],
                log: Path) -> tuple[float, torch.Tensor, torch.Tensor]:  # fmt: skip
    """`ddpm sample RUN` of n images (n / classes of each class of a labelled set) with seed 1
    into `out`: (seconds, the images at the data's size, their labels)."""
    classes = ds.set.classes
    cmd = [*DDPM, "sample", str(run), "-n", str(n // len(classes) if classes else n), "-o",
           str(out), "--seed", "1", *(["--class", "all"] if classes else []), *extra]  # fmt: skip
    seconds = _run(cmd, log)
    images, labels = read_pngs(out, classes)
    if images.shape[-1] != ds.set.image_size:  # trained at another size: measured at the data's
        images = resize(images, ds.set.image_size)
    return seconds, images, labels


def run_peer(ds: Dataset, run: Path, budget: tuple[str, float], args) -> dict:
    kind, value = budget
    limit = ["--steps" if kind == "steps" else "--time", f"{value:g}"]
    cmd = [sys.executable, str(PEER), str(ds.folder), str(run), "-n", str(args.n),
           "--seed", str(args.seed), *limit]  # fmt: skip
    run.mkdir(parents=True, exist_ok=True)
    wall = _run(cmd, run.parent / f"{run.name}.log")
    result = json.loads((run / "result.json").read_text())
    t = load_file(run / "samples.safetensors")
    labels = t.get("labels")
    if labels is not None and ds.set.classes:  # the script numbers them by folder name
        order = sorted(ds.set.classes)
        labels = torch.tensor([ds.set.classes.index(order[int(i)]) for i in labels])
    return {"steps": result["steps"], "train_s": wall - result["sample_s"],
            "sample_s": result["sample_s"], "images": t["images"],
            "labels": labels}  # fmt: skip


def parse_variants(specs: list[str]) -> list[tuple[str, list[str], list[str]]]:
    """NAME=TRAIN_FLAGS[|SAMPLE_FLAGS] -> (name, train flags, sample flags)."""
    out = []
    for spec in specs or ["ddpm="]:
        name, _, flags = spec.partition("=")
        train, _, sample = flags.partition("|")
        out.append((name or "ddpm", shlex.split(train), shlex.split(sample)))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--datasets", default="faces,faces8,photos,sources")
    p.add_argument("--subset", type=int, help="train on N of the training images (few-image "
                   "experiments); the row gains the share of samples copied from them")
    p.add_argument("--budgets", default="1m,5m,20m")
    p.add_argument("--peers", action="store_true", help="also run the diffusers script")
    p.add_argument("--variant", action="append", metavar="NAME=FLAGS[|SAMPLE_FLAGS]",
                   help="ddpm with these train (and sample) flags; repeatable")  # fmt: skip
    p.add_argument("--stop", choices=("time", "signal"), default="time")
    p.add_argument("-n", type=int, default=500, help="samples per run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=HERE / ".realdata")
    p.add_argument("--keep", action="store_true", help="keep the run directories")
    p.add_argument("--json", action="store_true")
    p.add_argument("--plot", type=Path, help="a file of --json lines to plot (no training)")
    p.add_argument("-o", "--output", type=Path, default=Path("realdata.png"))
    args = p.parse_args()
    if args.plot:
        return plot(args.plot, args.output)

    budgets = [parse_budget(b) for b in args.budgets.split(",")]
    variants = parse_variants(args.variant)
    for name in args.datasets.split(","):
        if name not in realsets.DATASETS:
            known = ", ".join(realsets.DATASETS)
            raise SystemExit(f"unknown dataset {name!r}; choose from {known}")
        ds = Dataset(name, args.work, args.subset)
        ref = ds.references()
        s = ds.set
        head = (f"# {name}: {len(s.train)} training images, {s.channels}x{s.image_size}x"
                f"{s.image_size}, {len(s.held_out)} held out; FD real {ref['real']:.1f}, noise "
                f"{ref['noise']:.1f}; SWD real {ref['real_swd']:.4f}")  # fmt: skip
        if s.classes:
            head += f"; classifier on held-out {ref['real_class']:.2f}"
        print(head, file=sys.stderr if args.json else sys.stdout, flush=True)
        for budget in budgets:
            impls = list(variants) + ([("diffusers", None, None)] if args.peers else [])
            for label, train_flags, sample_flags in impls:
                run = args.work / "runs" / f"{name}-{budget_name(*budget)}-{label}"
                shutil.rmtree(run, ignore_errors=True)
                run.parent.mkdir(parents=True, exist_ok=True)
                if train_flags is None:
                    r = run_peer(ds, run, budget, args)
                else:
                    r = run_ddpm(ds, run, budget, args, train_flags, sample_flags)
                row = {
                    "impl": label, "dataset": name, "image_size": s.image_size,
                    "budget": budget_name(*budget),
                    "budget_s": budget[1] if budget[0] == "time" else None,
                    "steps": r["steps"], "distance": round(ds.distance(r["images"]), 2),
                    "swd": round(realfeatures.swd(r["images"], s.held_out), 4),
                    "sample_s": round(r["sample_s"], 1),
                    "class_share": ds.class_share(r["images"], r["labels"]),
                    "train_s": round(r["train_s"], 1), "real": round(ref["real"], 2),
                    "noise": round(ref["noise"], 2),
                }  # fmt: skip
                if args.subset:
                    from ddpm_cli.evaluation.memorization import copied_share

                    row["train_images"] = len(s.train)
                    row["copied"] = round(copied_share(r["images"], s.train)["copied_share"], 3)
                if not args.keep:
                    shutil.rmtree(run, ignore_errors=True)
                print(json.dumps(row) if args.json else _fmt(row), flush=True)


def _fmt(row: dict) -> str:
    share = f"  class {row['class_share']:.2f}" if row["class_share"] is not None else ""
    return (f"{row['dataset']:<8} {row['budget']:>9} {row['impl']:<14} steps {row['steps']:>6}  "
            f"FD {row['distance']:>8.1f}  SWD {row['swd']:.4f}  sample {row['sample_s']:>5.1f} s"
            f"{share}")  # fmt: skip


def plot(results: Path, output: Path) -> None:
    """Distance against training time, a panel per dataset, a line per implementation."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("budget_s")]
    names = list(dict.fromkeys(r["dataset"] for r in rows))
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        mine = [r for r in rows if r["dataset"] == name]
        for impl in dict.fromkeys(r["impl"] for r in mine):
            pts = sorted((r["budget_s"] / 60, r["distance"]) for r in mine if r["impl"] == impl)
            ax.plot(*zip(*pts, strict=True), marker="o", label=impl)
        ax.axhline(mine[0]["real"], color="grey", ls=":", lw=1, label="real images")
        ax.axhline(mine[0]["noise"], color="grey", ls="--", lw=1, label="uniform noise")
        ax.set(xscale="log", yscale="log", title=f"{name} ({mine[0]['image_size']}px)",
               xlabel="training minutes (2-core CPU)",
               ylabel="Frechet distance (lower is better)")  # fmt: skip
        minutes = sorted({r["budget_s"] / 60 for r in mine})
        ax.set_xticks(minutes, [f"{m:g}" for m in minutes])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(output, dpi=110)
    print(output)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
