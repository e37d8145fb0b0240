"""Generating images from a checkpoint: the core of `ddpm sample`.

Image k of seed s always starts from the same noise: each image index has its own generator,
seeded from (s, k), which draws that image's x_T and then its noise at every step. So an image
does not depend on how many images are drawn with it, on the batch size, or on its position
in a batch. Noise is drawn on the CPU and moved to the device without waiting for it. The
network runs as forward.py wraps it (precision, compilation, CUDA graphs, guidance).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ddpm_cli.config import DiffusionConfig, ModelConfig, Precision
from ddpm_cli.device import available_memory, to_device
from ddpm_cli.diffusion.samplers import Edit, NoiseFn, from_config
from ddpm_cli.diffusion.schedules import DiffusionTables
from ddpm_cli.errors import UsageError
from ddpm_cli.model.forward import guided, network, resolve_precision
from ddpm_cli.model.kernels import winograd
from ddpm_cli.model.unet import UNet
from ddpm_cli.sampler_config import DEFAULT_GUIDANCE_INTERVAL, SamplerConfig
from ddpm_cli.store.checkpoint import CheckpointError
from ddpm_cli.store.models import load_model
from ddpm_cli.text import shown

MAX_BATCH = 256
TRAJECTORY_FRAMES = 60  # steps kept for a trajectory (a GIF frame each; strips pick fewer)


@dataclass(frozen=True)
class SamplingModel:
    model: UNet
    model_config: ModelConfig
    diffusion: DiffusionConfig
    objective: str
    path: Path  # the file the weights came from
    content_hash: str
    weights: str  # "ema" or "raw"
    step: int
    # sampler settings the checkpoint asks for where the user sets none (an imported model's
    # scheduler: {"variance": "small", "clip": true}); empty for models ddpm trained
    defaults: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)  # the training data's summary (its fingerprint)
    training: dict = field(default_factory=dict)  # its run's training config (seed, holdout)
    fine_tuned: bool = False  # started from another model's weights (ddpm train --init)

    def trained_on(self, report) -> bool:
        """Whether the data of `report` (a data.folders.DataReport) is what the model trained
        on: a folder or data cache of the same file names and sizes, or the same built-in set
        (drawn from a fixed seed)."""
        fingerprint, source = self.data.get("fingerprint"), self.data.get("source")
        if isinstance(fingerprint, str):
            return report.fingerprint == fingerprint
        return isinstance(source, str) and source.startswith("builtin:") and report.source == source

    def held_out_split(self, n: int, report, labels: torch.Tensor | None):
        """(indices trained on, indices set aside for the quality figure) as its run split the
        `n` images of `report`, when they are its training data as the run read them (as many
        as it used); else None (held_out_reason says why)."""
        if self.held_out_reason(n, report) is not None:
            return None
        from ddpm_cli.data.batches import split  # (sampling itself never loads the data code)

        k, seed = self.training["holdout"], self.training["seed"]
        return split(n, k, seed, labels if self.model_config.num_classes else None)

    def held_out_reason(self, n: int, report) -> str | None:
        """Why the images its run set aside cannot be found among the `n` images of `report`,
        in the user's terms; None when they can."""
        source, model = shown(str(report.source)), shown(str(self.path))
        k, seed, used = (self.training.get("holdout"), self.training.get("seed"),
                         self.data.get("used"))  # fmt: skip
        if self.fine_tuned:
            return (f"{model} is fine-tuned: its parent run may have trained on the images its "
                    "own run set aside")  # fmt: skip
        if not self.trained_on(report):
            return (f"{source} is not the data {model} trained on; give its run's image "
                    "folder, data cache or built-in set")  # fmt: skip
        if not isinstance(used, int):
            return f"{model} does not record how many images its run used"
        if n != used:
            return (f"{source} has {n} images where the run used {used}: which were set aside "
                    "cannot be told")  # fmt: skip
        if not isinstance(k, int) or not isinstance(seed, int) or not 0 < k < n:
            return f"the run of {model} set no images aside for its quality figure"
        return None

def load_for_sampling(
    path: Path, raw: bool = False, device: torch.device | str = "cpu", step: int | None = None
) -> SamplingModel:
    """The model in a checkpoint file or run directory: its EMA weights (model.safetensors),
    with `raw` the raw training weights (train_state.safetensors beside it), or with `step`
    the snapshot of that step."""
    lm = load_model(path, raw, device, step)
    return SamplingModel(
        model=lm.model,
        model_config=lm.model_config,
        diffusion=lm.diffusion,
        objective=lm.training.objective.value,
        path=lm.ckpt.path,
        content_hash=lm.ckpt.meta["content_hash"],
        weights=lm.weights,
        step=lm.ckpt.step,
        defaults=dict(lm.ckpt.config.get("sampler") or {}),
        data=dict(lm.ckpt.config.get("data") or {}),
        training=dict(lm.ckpt.config.get("training") or {}),
        fine_tuned=bool(lm.ckpt.config.get("parent")),
    )


def with_model_defaults(config: SamplerConfig, sm: SamplingModel, clip_given: bool):
    """`config` with the checkpoint's own sampler settings where the user chose none."""
    if config.variance is None and sm.defaults.get("variance"):
        config = replace(config, variance=sm.defaults["variance"])
    if not clip_given and "clip" in sm.defaults:
        config = replace(config, clip=bool(sm.defaults["clip"]))
    return config


def image_seed(seed: int, index: int) -> int:
    """The seed of image `index` under run seed `seed`: a hash, so nearby (seed, index) pairs
    give unrelated noise."""
    digest = hashlib.sha256(f"ddpm-image:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def edit_seed(seed: int, index: int) -> int:
    """The seed of image `index`'s edit noise (RePaint's noised originals and jumps, ILVR's
    noised reference): a stream apart from the sampler's, so that an edit that keeps nothing
    draws exactly the image plain sampling draws."""
    digest = hashlib.sha256(f"ddpm-edit:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def batch_noise(seeds: list[int], device: torch.device) -> NoiseFn:
    """Noise for a batch: item i's from its own generator seeded seeds[i], drawn on the CPU."""
    gens = [torch.Generator().manual_seed(s) for s in seeds]

    def noise(shape: tuple[int, ...]) -> torch.Tensor:
        return to_device(torch.stack([torch.randn(shape[1:], generator=g) for g in gens]), device)

    return noise


EditBuilder = Callable[[DiffusionTables, int, int, NoiseFn], Edit]  # (tables, a, b, noise)


def default_batch_size(model_config: ModelConfig, device: torch.device, n: int) -> int:
    """As many images as fit in about a quarter of the free memory, by a rough per-image
    estimate of the network's activations at inference (fp32), at most MAX_BATCH and n."""
    h, w = model_config.image_size
    ch = model_config.channels
    per_image = 0
    size = h * w
    for level, mult in enumerate(model_config.channel_mult):
        res = size // 4**level
        per_image += 16 * 4 * ch * mult * res  # a few live tensors per block, 4 bytes each
        if min(h, w) >> level in model_config.attention_resolutions:
            per_image += 3 * 4 * res * res  # the attention matrix and its softmax
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        free = available_memory() or 4 * 2**30
    return max(1, min(n, MAX_BATCH, int(free / 4 / max(per_image, 1))))


@dataclass
class Trajectory:
    """x_t and the predicted x_0 of the first images at chosen steps."""

    steps: list[tuple[int, int]] = field(default_factory=list)  # (step index, t); t=-1: sample
    x: list[torch.Tensor] = field(default_factory=list)  # (K, C, H, W) each
    x0: list[torch.Tensor] = field(default_factory=list)

    def add(self, index: int, t: int, x: torch.Tensor, x0: torch.Tensor) -> None:
        k = x.shape[0]
        self.steps.append((index, t))
        self.x.append(x.float().cpu())
        self.x0.append(x0[:k].float().cpu())


def generate(
    sm: SamplingModel,
    sampler: SamplerConfig,
    indices: list[int],
    seed: int,
    batch_size: int,
    device: torch.device,
    precision: Precision | None = None,
    compile: bool = False,
    trajectory: Trajectory | None = None,
    trajectory_images: int = 0,
    on_step: Callable[[int, int], None] = lambda i, total: None,
    labels: list[int] | None = None,
    guidance: float = 0.0,
    edit: EditBuilder | None = None,
    guidance_interval: tuple[float, float] | None = DEFAULT_GUIDANCE_INTERVAL,
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Sample the images `indices` in batches; yields (indices, images in [-1, 1] on the CPU).

    For a class-conditional model, `labels` (one per index) are the images' classes, sampled
    with classifier-free guidance of weight `guidance`; without labels it samples with no
    class; guided only at the noise levels sigma in `guidance_interval` (lo, hi], at every
    step when None (forward.guided). With `trajectory`, the first `trajectory_images` images
    of the first batch are recorded at up to TRAJECTORY_FRAMES evenly spread steps.
    `precision` None is the device's default, as for `ddpm sample`
    (forward.default_precision). With `edit`, each batch
    indices[a:b] walks the Edit that `edit(tables, a, b, noise)` builds (generation/editing.py),
    `noise` drawing from each image's edit stream (`edit_seed`).
    """
    precision = resolve_precision(precision, device)
    sampler = sampler.resolved(sm.diffusion.timesteps, sm.objective)
    exact = DiffusionTables.from_config(sm.diffusion)  # float64: the same steps on every device
    tables = exact.to(device, torch.float32)
    net = network(sm.model, device, precision, compile)
    c = sm.model_config.in_channels
    h, w = sm.model_config.image_size
    where = None
    if guidance_interval is not None:
        sigma = exact.snr.rsqrt()  # sqrt((1 - alpha_bar) / alpha_bar)
        where = ((sigma > guidance_interval[0]) & (sigma <= guidance_interval[1])).to(device)
    for start in range(0, len(indices), batch_size):
        chunk = indices[start : start + batch_size]
        noise = batch_noise([image_seed(seed, k) for k in chunk], device)
        x_T = noise((len(chunk), c, h, w))
        model = net
        if labels is not None:
            y = to_device(torch.tensor(labels[start : start + batch_size]), device)
            model = guided(net, y, guidance, sm.model_config.num_classes, where)
        changes = None
        if edit is not None:
            edit_noise = batch_noise([edit_seed(seed, k) for k in chunk], device)
            changes = edit(tables, start, start + len(chunk), edit_noise)
        steps = from_config(sampler, model, tables, x_T, noise, sm.objective, changes)
        record = trajectory is not None and start == 0 and trajectory_images > 0
        keep: set[int] = set()
        x = x_T
        with winograd.keep_filters():  # per batch: nothing outside may change weights meanwhile
            for step in steps:
                if record and not keep:
                    n = min(step.total, TRAJECTORY_FRAMES)
                    keep = {round(i * (step.total - 1) / max(n - 1, 1)) for i in range(n)}
                if record and step.index in keep:  # x_t as the network saw it, and its x_0
                    trajectory.add(step.index, step.t, step.x_t[:trajectory_images], step.x0)
                on_step(step.index + 1, step.total)
                x = step.x
        if record:  # and the sample itself
            trajectory.add(step.total, -1, x[:trajectory_images], x)
        yield chunk, x.float().cpu()


def resolve_classes(requested: list[str], sm: SamplingModel) -> list[int]:
    """Class labels for `--class` values: names, indices or "all" (every class, in order)."""
    names = sm.model_config.classes
    if not names:
        raise UsageError(
            f"{sm.path} was trained without classes; drop --class (a folder of class "
            "subfolders trains a class-conditional model)"
        )
    labels: list[int] = []
    for value in requested:
        if value == "all":
            labels.extend(range(len(names)))
        elif value in names:
            labels.append(names.index(value))
        elif value.isdigit() and int(value) < len(names):
            labels.append(int(value))
        else:
            raise UsageError(f"unknown class {value!r}; the model knows: {', '.join(names)} "
                             f"(or their numbers, 0 to {len(names) - 1})")  # fmt: skip
    twice = [names[i] for i in sorted(set(labels)) if labels.count(i) > 1]
    if twice:  # (by name, by number or within "all")
        if requested.count("all") > 1:
            raise UsageError("--class all is given twice; give it once")
        if "all" in requested:
            raise UsageError(f"--class all includes {twice[0]}; give all, or the classes "
                             "one by one")  # fmt: skip
        raise UsageError(f"--class {twice[0]} is asked for twice; give each class once")
    return labels


def check_model(sm: SamplingModel) -> None:
    """Refuse weights that are not finite: they can only give noise or black images."""
    for name, p in sm.model.state_dict().items():
        if not torch.isfinite(p).all():
            raise CheckpointError(f"{sm.path}: weight {name} has NaN or infinite values")
