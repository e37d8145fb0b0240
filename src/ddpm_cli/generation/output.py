"""Images out of a sampling job: tensors to PIL images, file names, grids, trajectory strips,
and the provenance each PNG carries, with the command that draws it again."""

from __future__ import annotations

import json
import shlex

import torch
from PIL import Image

from ddpm_cli import __version__, runtime
from ddpm_cli.config import Precision
from ddpm_cli.data.images import encode_gif, encode_png, hstack, labelled, to_pil
from ddpm_cli.generation.sampling import SamplingModel, Trajectory
from ddpm_cli.sampler_config import SamplerConfig, interval_text
from ddpm_cli.text import parse_json


def to_image(x: torch.Tensor) -> Image.Image:
    """(C, H, W) in [-1, 1] -> a Pillow image: gray for 1 channel, RGB for 3, RGBA for 4."""
    if x.shape[0] == 1:
        return to_pil(x, "L")
    if x.shape[0] == 4:
        alpha = ((x[3].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return to_pil(x[:3], "RGB", alpha)
    return to_pil(x[:3], "RGB")


def image_name(
    index: int, label: int | None, names: tuple[str, ...], stem: str | None = None
) -> str:
    """The file of image `index`: 000037.png, cat-000037.png for class cat; an edit's output
    starts with its input's stem: photo-000037.png, photo-cat-000037.png."""
    parts = [p for p in (stem, None if label is None else names[label]) if p is not None]
    return "-".join([*parts, f"{index:06d}.png"])


def provenance(
    sm: SamplingModel, sampler: SamplerConfig, seed: int, precision: Precision,
    guidance: float = 0.0, guidance_interval: tuple[float, float] | None = None,
) -> dict:  # fmt: skip
    """What regenerates an image: the PNG text chunks (per image, "ddpm:index" is added, and
    "ddpm:class" for a class-conditional sample)."""
    s = sampler.resolved(sm.diffusion.timesteps, sm.objective)
    steered = {"ddpm:guidance_interval": interval_text(guidance_interval)} if guidance else {}
    return steered | {
        "ddpm:checkpoint": sm.path.name,
        "ddpm:checkpoint_hash": sm.content_hash,
        "ddpm:weights": sm.weights,
        "ddpm:sampler": s.sampler.value,
        "ddpm:steps": str(s.steps),
        "ddpm:eta": str(s.eta),
        "ddpm:variance": s.variance,
        "ddpm:spacing": s.spacing,
        "ddpm:clip": json.dumps(s.clip),
        "ddpm:seed": str(seed),
        "ddpm:precision": precision.value,
        "ddpm:guidance": str(guidance),
        "ddpm:version": __version__,
        "ddpm:runtime": json.dumps(runtime.current().recorded()),  # switches that change bits
        "Software": f"ddpm {__version__}",
    }


def regenerate_command(text: dict[str, str], index: int) -> str:
    """The `ddpm sample` command (or an edit's: `ddpm inpaint`, `ddpm upscale`) that draws
    image `index` again."""
    head = f"ddpm sample {text['ddpm:checkpoint']}"
    if "ddpm:edit" in text:
        edit = parse_json(text["ddpm:edit"])
        head = " ".join(
            [f"ddpm {edit['command']}", text["ddpm:checkpoint"], *map(shlex.quote, edit["args"])]
        )
    parts = [
        f"{head} -n 1 --start {index}",
        f"--seed {text['ddpm:seed']} --sampler {text['ddpm:sampler']}",
        f"--steps {text['ddpm:steps']} --spacing {text['ddpm:spacing']}",
    ]
    if text["ddpm:sampler"] == "ddim":
        parts.append(f"--eta {text['ddpm:eta']}")
    if text["ddpm:sampler"] == "ddpm":
        parts.append(f"--variance {text['ddpm:variance']}")
    if text["ddpm:clip"] == "false":
        parts.append("--no-clip")
    if text["ddpm:weights"] == "raw":
        parts.append("--raw")
    # always named: the default depends on the device (forward.default_precision)
    parts.append(f"--precision {text['ddpm:precision']}")
    if "ddpm:class" in text:
        parts.append(f"--class {shlex.quote(text['ddpm:class'])}")
        # always named: the default may change between versions (sampler_config.DEFAULT_GUIDANCE)
        parts.append(f"--guidance {text.get('ddpm:guidance', '0')}")
        if "ddpm:guidance_interval" in text:
            parts.append(f"--guidance-interval {text['ddpm:guidance_interval']}")
    return _switches(text.get("ddpm:runtime")) + " ".join(parts)


def _switches(recorded: str | None) -> str:
    """The environment switches to set before the command (runtime.Runtime.command_prefix)."""
    try:
        values = parse_json(recorded) if recorded else {}
        return runtime.Runtime(**values).command_prefix()
    except (ValueError, TypeError):  # a PNG from another version, or edited
        return ""


def grid_image(images: torch.Tensor) -> Image.Image:
    """(N, C, H, W) in [-1, 1] as one grid, about square."""
    return grid_image_rows(images, nrow=max(1, round(images.shape[0] ** 0.5)))


STRIP_COLUMNS = 8


def render_trajectory(trajectory: Trajectory, gif: bool) -> bytes:
    """Each recorded step as a labelled cell: x_t above, the network's prediction of x_0 from
    it below, one column per image; the last cell is the sample. A GIF shows every recorded
    step; a PNG strip shows up to STRIP_COLUMNS of them, evenly spread, the last included."""
    if not trajectory.steps:
        raise ValueError("empty trajectory")
    picks = range(len(trajectory.steps))
    if not gif:
        n = min(STRIP_COLUMNS, len(trajectory.steps))
        last = len(trajectory.steps) - 1
        picks = sorted({round(i * last / max(n - 1, 1)) for i in range(n)})
    cells = []
    for i in picks:
        (_, t), x, x0 = trajectory.steps[i], trajectory.x[i], trajectory.x0[i]
        k = x.shape[0]
        cell = grid_image_rows(torch.cat([x, x0]), nrow=k)
        cells.append(labelled(cell.convert("RGB"), f"t={t}" if t >= 0 else "sample"))
    if gif:
        return encode_gif(cells, frame_ms=100, hold_ms=1500)
    return encode_png(hstack(cells), {"Software": f"ddpm {__version__}"})


def grid_image_rows(images: torch.Tensor, nrow: int) -> Image.Image:
    """(N, C, H, W) in [-1, 1] in rows of `nrow`, 2 white pixels around each image."""
    return to_image(tile(images.clamp(-1, 1), nrow, padding=2, pad_value=1.0))


def tile(images: torch.Tensor, nrow: int, padding: int, pad_value: float) -> torch.Tensor:
    """(N, C, H, W) -> one (C, H', W') image: rows of `nrow` images, each with `padding`
    pixels of `pad_value` on every side, shared between neighbours (torchvision's make_grid
    layout, written here because importing torchvision imports torch's compiler: 2-3 s).
    One image is its own grid, unpadded, as there."""
    n, c, h, w = images.shape
    if n == 1:
        return images[0]
    cols = max(1, min(nrow, n))
    rows = -(-n // cols)
    cell_h, cell_w = h + padding, w + padding
    grid = images.new_full((c, rows * cell_h + padding, cols * cell_w + padding), pad_value)
    for i, image in enumerate(images):
        top, left = (i // cols) * cell_h + padding, (i % cols) * cell_w + padding
        grid[:, top : top + h, left : left + w] = image
    return grid
