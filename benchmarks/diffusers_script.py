"""The peer that benchmarks/realdata.py runs beside ddpm: the short training script a capable user
writes in an afternoon from diffusers' parts (issue 23 describes it).

    python benchmarks/diffusers_script.py DATA OUT --time 60 [-n 500] [--seed 0]
    python benchmarks/diffusers_script.py DATA OUT --steps 5000

- data: every PNG under DATA, grayscale when all are; one subfolder per class makes a
  class-conditional UNet2DModel (num_class_embeds), sampled per class without guidance;
- 8x8 and 16x16: UNet2DModel with 64/128 channels, attention at the lower level, batch 128;
  32x32 and up: 32/64/128 channels, attention at 8x8, batch 32; two layers per block;
- AdamW at lr 1e-3 (torch's weight decay 0.01), 200 warm-up steps, then constant; gradient
  clipping at 1; random horizontal flips;
- EMA: diffusers' EMAModel with its warm-up (inv_gamma 1, power 3/4, max decay 0.9999), as in
  diffusers' train_unconditional.py;
- DDPMScheduler: linear betas, T = 1000, eps objective, mean squared error;
- sampling: DPMSolverMultistepScheduler, 20 steps, from the EMA weights.

Training stops at --steps or when --time seconds of training have passed (checked after every
step), as `ddpm train --time` does. OUT receives samples.safetensors (uint8 images, labels) and
result.json (steps, train_s, sample_s). Needs the `bench` extra (diffusers).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file


def load_folder(root: Path) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    files = sorted(p for p in root.rglob("*.png"))
    classes = sorted({p.parent.name for p in files}) if files[0].parent != root else []
    images = [Image.open(p) for p in files]
    mode = "L" if all(im.mode == "L" for im in images) else "RGB"
    arr = np.stack([np.asarray(im.convert(mode)) for im in images])
    x = torch.from_numpy(arr)
    x = x[:, None] if mode == "L" else x.permute(0, 3, 1, 2)
    labels = torch.tensor([classes.index(p.parent.name) for p in files]) if classes else None
    return x.float() / 127.5 - 1, labels, classes


def build_model(size: int, channels: int, num_classes: int):
    from diffusers import UNet2DModel

    if size <= 16:
        widths, down = (64, 128), ("DownBlock2D", "AttnDownBlock2D")
    else:
        widths, down = (32, 64, 128), ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D")
    up = tuple(b.replace("Down", "Up") for b in reversed(down))
    return UNet2DModel(
        sample_size=size, in_channels=channels, out_channels=channels, layers_per_block=2,
        block_out_channels=widths, down_block_types=down, up_block_types=up,
        num_class_embeds=num_classes or None,
    )  # fmt: skip


def main() -> None:
    from diffusers import DDPMScheduler, DPMSolverMultistepScheduler
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("data", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--time", type=float, help="seconds of training")
    p.add_argument("--steps", type=int)
    p.add_argument("-n", type=int, default=500, help="samples (divided among the classes)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    x, labels, classes = load_folder(args.data)
    size, channels = x.shape[-1], x.shape[1]
    batch = 128 if size <= 16 else 32
    model = build_model(size, channels, len(classes))
    ema = EMAModel(model.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0,
                   power=3 / 4)  # fmt: skip
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    lr_sched = get_scheduler("constant_with_warmup", opt, num_warmup_steps=200)
    noise_sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")

    step, start = 0, time.perf_counter()
    model.train()
    while True:
        order = torch.randperm(len(x))
        for i in range(0, len(x) - batch + 1, batch):
            idx = order[i : i + batch]
            x0 = x[idx]
            x0 = torch.where(torch.rand(len(idx), 1, 1, 1) < 0.5, x0.flip(3), x0)
            noise = torch.randn_like(x0)
            t = torch.randint(0, 1000, (len(idx),))
            xt = noise_sched.add_noise(x0, noise, t)
            y = labels[idx] if labels is not None else None
            loss = F.mse_loss(model(xt, t, class_labels=y).sample, noise)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            lr_sched.step()
            opt.zero_grad(set_to_none=True)
            ema.step(model.parameters())
            step += 1
            elapsed = time.perf_counter() - start
            if (args.steps and step >= args.steps) or (args.time and elapsed >= args.time):
                break
        else:
            continue
        break
    train_s = time.perf_counter() - start

    ema.copy_to(model.parameters())
    model.eval()
    sampler = DPMSolverMultistepScheduler.from_config(noise_sched.config)
    k = max(1, len(classes))
    per_class = args.n // k
    g = torch.Generator().manual_seed(args.seed)
    images, ys = [], []
    t0 = time.perf_counter()
    with torch.no_grad():
        for c in range(k):
            for j in range(0, per_class, 100):
                b = min(100, per_class - j)
                sample = torch.randn(b, channels, size, size, generator=g)
                y = torch.full((b,), c) if classes else None
                sampler.set_timesteps(20)
                for t in sampler.timesteps:
                    eps = model(sample, t, class_labels=y).sample
                    sample = sampler.step(eps, t, sample).prev_sample
                images.append(((sample.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8))
                ys.append(torch.full((b,), c))
    sample_s = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    save_file({"images": torch.cat(images), "labels": torch.cat(ys)},
              args.out / "samples.safetensors")  # fmt: skip
    result = {"steps": step, "train_s": train_s, "sample_s": sample_s}
    (args.out / "result.json").write_text(json.dumps(result))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
