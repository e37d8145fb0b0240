"""Recipe sweeps on the real-image datasets of realdata.py, in one process: the experiments
behind ddpm's defaults (docs/training.md). realdata.py runs the commands as a user does; this
trains with ddpm's own training step under a wall-clock budget, with any model shape, learning
rate schedule, several EMA lengths at once (kept side by side in one run), and samples each
with several samplers and guidance weights.

    python benchmarks/sweep.py --dataset photos --budget 60 \\
        --run base='{}' --run lr1e-3='{"lr": 1e-3}' \\
        --run wide='{"model": {"channels": 64}}' --emas 4,8,16 --samplers dpm++:20,dpm++:40

A run is NAME=JSON: TrainConfig fields ("lr", "warmup_steps", "batch_size", "preset",
"objective", "min_snr_gamma", "cond_drop", ...), "model" (ModelConfig overrides of the
preset: "channels", "channel_mult", "num_res_blocks", "attention_resolutions", "dropout"),
"schedule" (a named beta schedule; the preset's by default); "cooldown" is the share of the
budget at its end over which the learning rate falls linearly to 0 (train.lr_at), as `ddpm
train --time` plans it.

EMA "default" is the one ddpm keeps (train.ema_decay_at), "raw" the weights; a number g in
--emas is the power-function EMA of Karras et al. 2024 with exponent g: decay (1 - 1/n)^(g + 1)
after n steps, an average over about the last 1/(g + 1) of the run. Prints a JSON object a line.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import realfeatures  # noqa: E402
from realdata import Dataset  # noqa: E402

from ddpm_cli.config import DiffusionConfig, Precision, TrainConfig  # noqa: E402
from ddpm_cli.data.batches import Batches  # noqa: E402
from ddpm_cli.data.sources import load_source  # noqa: E402
from ddpm_cli.diffusion.schedules import DiffusionTables  # noqa: E402
from ddpm_cli.generation.output import grid_image_rows  # noqa: E402
from ddpm_cli.generation.sampling import SamplingModel, generate  # noqa: E402
from ddpm_cli.model.presets import build_model_config, recipe_for  # noqa: E402
from ddpm_cli.sampler_config import DEFAULT_GUIDANCE_INTERVAL, SamplerConfig  # noqa: E402
from ddpm_cli.training import train as train_mod  # noqa: E402

HERE = Path(__file__).resolve().parent
CPU = torch.device("cpu")


def power_decay(step: int, gamma: float) -> float:
    return (1 - 1 / step) ** (gamma + 1) if step > 1 else 0.0


def train_run(ds: Dataset, spec: dict, budget: float, seed: int, emas: list[str],
              steps: int | None = None):
    """Train under `budget` seconds, or for `steps` steps when given (a budget that other work
    on the machine cannot shorten), the learning rate planned for that length."""
    spec = dict(spec)
    model_over = spec.pop("model", {})
    schedule = spec.pop("schedule", None)  # None: the preset's (presets.Recipe)
    s = ds.set
    labelled = bool(s.classes)
    images, report = load_source(str(ds.folder), (s.image_size, s.image_size), s.channels,
                                 False, classes=labelled)  # fmt: skip
    limit = {"steps": steps} if steps else {"time_limit": budget}
    config = TrainConfig(image_size=s.image_size, seed=seed, device="cpu", sample_every=0,
                         precision="fp32", **limit, **spec)  # fmt: skip
    config = train_mod.resolve(config, CPU, report.used, report.channels)
    model_over = {k: tuple(v) if isinstance(v, list) else v for k, v in model_over.items()}
    mc = build_model_config(config.preset, config.image_size, report.channels,
                            classes=tuple(report.classes), **model_over)  # fmt: skip
    diffusion = DiffusionConfig(schedule=schedule or recipe_for(config.preset).schedule)
    tables = DiffusionTables.from_config(diffusion).to(CPU, torch.float32)
    state = train_mod.new_state(mc, config, CPU)
    extra = {g: copy.deepcopy(state.ema) for g in emas if g not in ("default", "raw")}
    batches = Batches(images, config.batch_size, config.seed, config.flip, 0)
    feed = batches.iterate(0, 0)
    start = time.perf_counter()
    losses = []

    def done() -> float:
        return state.step / steps if steps else (time.perf_counter() - start) / budget

    try:
        while (progress := done()) < 1:
            x, y, _ = next(feed)
            r = train_mod.train_step(state, [x], tables, config, CPU, state.model,
                                     labels=[y] if mc.num_classes else None,
                                     num_classes=mc.num_classes, progress=progress)  # fmt: skip
            losses.append(float(r.losses.mean()))
            for g, ema in extra.items():
                train_mod.update_ema(ema, state.model, power_decay(state.step, float(g)))
    finally:
        feed.close()
    models = {"default": state.ema, **extra}
    if "raw" in emas:
        models["raw"] = state.model
    params = sum(p.numel() for p in state.model.parameters())
    tail = sum(losses[-50:]) / max(1, len(losses[-50:]))
    return models, mc, diffusion, config, state.step, params, tail


def evaluate(ds, model, mc, diffusion, objective, sampler: str, guidance: float, n: int,
             interval: tuple[float, float] | None = DEFAULT_GUIDANCE_INTERVAL):
    """(FD, SWD, class share, seconds, images) of n samples, guided at the noise levels
    `interval` (None: every step)."""
    name, _, steps = sampler.partition(":")
    sc = SamplerConfig(sampler=name, steps=int(steps) if steps else None)
    sm = SamplingModel(model.eval(), mc, diffusion, objective, Path("."), "", "ema", 0)
    k = len(ds.set.classes)
    labels = [c for c in range(k) for _ in range(n // k)] if k else None
    count = len(labels) if labels else n
    # the network numbers its classes by sorted folder name, the dataset in its own order
    wanted = [mc.classes.index(ds.set.classes[c]) for c in labels] if labels else None
    t0 = time.perf_counter()
    batches = generate(sm, sc, list(range(count)), 1, 250, CPU, Precision.fp32,
                       labels=wanted, guidance=guidance, guidance_interval=interval)  # fmt: skip
    out = torch.cat([x for _, x in batches])
    seconds = time.perf_counter() - t0
    images = ((out + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    share = ds.class_share(images, torch.tensor(labels)) if labels else None
    return ds.distance(images), realfeatures.swd(images, ds.set.held_out), share, seconds, images


def save_grid(images: torch.Tensor, path: Path, count: int = 64) -> None:
    """The first `count` images (uint8, NCHW) as ddpm's 8-column grid, enlarged 2x."""
    grid = grid_image_rows(images[:count].float() / 127.5 - 1, nrow=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.resize((grid.width * 2, grid.height * 2), Image.NEAREST).save(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dataset", default="photos")
    p.add_argument("--budget", type=float, default=60, help="seconds of training per run")
    p.add_argument("--steps", type=int, help="train this many steps instead of --budget")
    p.add_argument("--run", action="append", required=True, metavar="NAME=JSON")
    p.add_argument("--emas", default="default", help="comma-separated: default, raw, gammas")
    p.add_argument("--samplers", default="dpm++:20")
    p.add_argument("--guidance", default="0")
    p.add_argument("--seeds", default="0")
    p.add_argument("-n", type=int, default=250)
    p.add_argument("--work", type=Path, default=HERE / ".realdata")
    p.add_argument("--grids", type=Path, help="write a grid of 64 samples per row here")
    args = p.parse_args()
    if args.steps is not None and args.steps < 1:
        p.error("--steps must be at least 1")
    torch.set_num_threads(torch.get_num_threads())
    ds = Dataset(args.dataset, args.work)
    if args.grids:
        save_grid(ds.set.held_out, args.grids / f"{args.dataset}-real.png")
    for seed in (int(s) for s in args.seeds.split(",")):
        for spec_text in args.run:
            name, _, js = spec_text.partition("=")
            spec = json.loads(js or "{}")
            emas = args.emas.split(",")
            models, mc, diffusion, config, steps, params, loss = train_run(
                ds, spec, args.budget, seed, emas, args.steps
            )
            for ema_name, model in models.items():
                for sampler in args.samplers.split(","):
                    for g in (float(v) for v in args.guidance.split(",")):
                        d, swd, share, secs, images = evaluate(
                            ds, model, mc, diffusion, config.objective.value, sampler, g, args.n
                        )
                        if args.grids:
                            tag = f"{args.dataset}-{name}-s{seed}-{ema_name}-{sampler}-g{g:g}"
                            save_grid(images, args.grids / f"{tag.replace(':', '')}.png")
                        budget = f"{args.steps}steps" if args.steps else args.budget
                        row = {"run": name, "dataset": args.dataset, "budget": budget,
                               "seed": seed, "steps": steps, "params": params,
                               "loss": round(loss, 4),
                               "ema": ema_name, "sampler": sampler, "guidance": g,
                               "distance": round(d, 3), "swd": round(swd, 4),
                               "class_share": share, "sample_s": round(secs, 1)}  # fmt: skip
                        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
