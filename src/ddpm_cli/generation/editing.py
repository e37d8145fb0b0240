"""The inputs of an edit (`ddpm inpaint`, `ddpm upscale`, `ddpm sample --init/--guide`): read
and check every image, mask and box against the model before any sampling, and build the
per-batch `samplers.Edit` that diffusion/editing.py defines.

An input is a file, a folder (its images, in name order; a folder of masks pairs with them by
file name) or "-" for stdin. Masks: white pixels are regenerated and black ones kept; grey
counts as white above 50%.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ddpm_cli.data.folders import mattes
from ddpm_cli.data.images import decode_image
from ddpm_cli.data.search import images_in
from ddpm_cli.diffusion import editing
from ddpm_cli.diffusion.samplers import Edit, NoiseFn, config_pairs, evaluations
from ddpm_cli.diffusion.schedules import DiffusionTables
from ddpm_cli.errors import DataError, UsageError
from ddpm_cli.sampler_config import (
    DEFAULT_GUIDE_FACTOR,
    FACTORS,
    INPAINT_STEPS,
    INPAINT_VARIANCE,
    EditMode,
    EditSpec,
    SamplerConfig,
    SamplerName,
)
from ddpm_cli.store.files import STDIO, read_input_bytes

FLAG = {EditMode.sdedit: ("--init",), EditMode.guide: ("--guide",)}  # else positional


@dataclass(frozen=True)
class EditInput:
    """One input image, checked and ready: `image` (C, H, W) in [-1, 1] at the model's size
    (the padded canvas when outpainting; the small image when upscaling); `keep` (1, H, W),
    True where a pixel is kept, when inpainting."""

    name: str  # its file name, "stdin" for "-": the output's stem
    image: torch.Tensor
    keep: torch.Tensor | None
    digest: str  # sha256 of the image's (and mask's) bytes
    args: tuple[str, ...]  # the command's arguments that redraw from this input
    files: tuple[str, ...]  # what was read: the image's path (and the mask's), or "-"
    factor: int = 1  # ILVR's block size (upscale, guide); 1 for the other edits

    @property
    def stem(self) -> str:
        return Path(self.name).stem

    def shown(self, height: int) -> torch.Tensor:
        """The input as a grid cell of the output's `height`: the kept pixels (the regenerated
        ones mid-grey), or a small image enlarged."""
        if self.keep is not None:
            return torch.where(self.keep, self.image, torch.zeros_like(self.image))
        return editing.upsample(self.image[None], height // self.image.shape[1])[0]


def _sources(spec: str, what: str) -> list[tuple[str, str]]:
    """(name, path) of each image a file, folder or "-" names."""
    if spec == STDIO:
        return [("stdin", STDIO)]
    path = Path(spec)
    if path.is_dir():
        found = images_in(path)
        if not found:
            raise DataError(f"{path}: no images in this folder ({what})")
        return [(p.name, str(p)) for p in found]
    if not path.exists():
        raise DataError(f"{path}: no such file ({what})")
    return [(path.name, str(path))]


def _pair_mask(name: str, masks: list[tuple[str, str]], folder: bool) -> tuple[str, str]:
    if not folder:
        return masks[0]
    by_name = dict(masks)
    if name in by_name:
        return name, by_name[name]
    same = [(n, p) for n, p in masks if Path(n).stem == Path(name).stem]
    if len(same) > 1:
        raise DataError(f"masks {' and '.join(n for n, _ in same)} both pair with {name}; "
                        "keep one in the mask folder")  # fmt: skip
    if same:
        return same[0]
    raise DataError(f"no mask for {name} in the mask folder (masks pair with images by file name)")


def _shown(name: str, path: str) -> str:
    """An input as messages name it: its path as typed, its folder included; "stdin" for "-"."""
    return name if path == STDIO else path


def _size_text(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def _decode(path: str, name: str, size: tuple[int, int] | None, read: dict,
            matte: bool = False, what: str = "the image") -> tuple:  # fmt: skip
    """(the decoded image, its bytes); `read` keeps each path's bytes, as stdin reads once.
    `matte`: transparency drawn over white, as training draws it."""
    if path not in read:
        read[path] = read_input_bytes(path, what)
    return decode_image(read[path], name, size, matte=matte), read[path]


def _channels(img, name: str, channels: int) -> torch.Tensor:
    """The image's channels as the model draws them; a mismatch is refused."""
    pixels = img.pixels
    if channels == 4 and img.alpha is not None and pixels.shape[0] == 3:
        pixels = torch.cat([pixels, img.alpha[None].float() / 127.5 - 1])
    if pixels.shape[0] != channels:
        kinds = {1: "grayscale", 2: "grayscale with alpha", 3: "RGB", 4: "RGBA"}
        have = kinds.get(pixels.shape[0] + (img.alpha is not None), f"{pixels.shape[0]}-channel")
        raise DataError(
            f"{name} is {have}; the model draws {kinds.get(channels, channels)} images "
            f"({channels} channel{'s' if channels > 1 else ''}): convert it first"
        )
    return pixels


def _factor(spec: EditSpec, size: tuple[int, int], model: tuple[int, int], name: str) -> int:
    """ILVR's factor: --factor, the guide's default, or for upscaling the model's size over
    the image's; 1 for the other edits."""
    (w, h), (mw, mh) = size, model
    if spec.mode not in (EditMode.upscale, EditMode.guide):
        return 1
    factor = spec.factor or (DEFAULT_GUIDE_FACTOR if spec.mode is EditMode.guide else None)
    if factor is None:
        if mw % w == 0 and mh % h == 0 and mw // w == mh // h and mw // w in FACTORS:
            return mw // w
        raise UsageError(
            f"{name} is {w}x{h} and the model draws {mw}x{mh}: upscale needs a size that is "
            "the model's divided by 2, 4 or 8; give --factor N with --resize to resize it"
        )
    if mh % factor or mw % factor:
        given = "--factor" if spec.factor else "the default --factor"
        raise UsageError(f"{given} {factor} does not divide the model's {mw}x{mh} images")
    return factor


def _target(spec: EditSpec, mh: int, mw: int) -> tuple[int, int] | None:
    """The (height, width) an input must have (what --resize makes it); None: upscaling with
    the factor left to the sizes."""
    if spec.mode is EditMode.upscale:
        f = spec.factor
        return (mh // f, mw // f) if f and not (mh % f or mw % f) else None
    if spec.outpaint is not None:
        left, top, right, bottom = spec.outpaint
        target = (mh - top - bottom, mw - left - right)
        if min(target) < 1:
            raise UsageError(f"--outpaint {_pad_text(spec.outpaint)} leaves no room in the "
                             f"model's {mw}x{mh} images")  # fmt: skip
        return target
    return (mh, mw)


def open_inputs(spec: EditSpec, image_size: tuple[int, int], channels: int) -> list[EditInput]:
    """Every input of `spec`, read and checked for a model of `image_size` (height, width) and
    `channels`; the first problem is one UsageError naming the file and the fix."""
    mh, mw = image_size
    if spec.mask == STDIO and spec.image == STDIO:
        raise UsageError("the image and the mask cannot both come from stdin")
    sources = _sources(spec.image, "the image")
    mask_folder = spec.mask is not None and spec.mask != STDIO and Path(spec.mask).is_dir()
    masks = _sources(spec.mask, "the mask") if spec.mask is not None else []
    target = _target(spec, mh, mw)
    inputs, stems, read = [], {}, {}
    for name, path in sources:
        shown = _shown(name, path)
        # a model of 1 or 3 channels learnt transparent parts as white: they are drawn so
        img, data = _decode(path, shown, target if spec.resize else None, read, mattes(channels))
        pixels = _channels(img, shown, channels)
        size = img.size
        factor = _factor(spec, size, (mw, mh), shown)
        want = (mw // factor, mh // factor) if spec.mode is EditMode.upscale else target[::-1]
        if size != want:
            raise UsageError(_size_problem(spec, shown, size, want, (mw, mh), factor))
        if inputs and factor != inputs[0].factor:
            raise UsageError(
                f"{name} upscales by {factor} and {inputs[0].name} by {inputs[0].factor}: "
                "one command upscales by one factor (give --factor, with --resize)"
            )
        digest = hashlib.sha256(data)
        args = [*FLAG.get(spec.mode, ()), path]
        if factor > 1:
            args += ["--factor", str(factor)]
        keep, files = None, [path]
        if spec.mode is EditMode.inpaint:
            pixels, keep, mask_args, mask = _keep(
                spec, shown, img, pixels, masks, mask_folder, read
            )
            args += mask_args
            if mask is not None:
                files.append(mask)
                digest.update(read[mask])
        stem = Path(name).stem
        if stem in stems:
            raise UsageError(
                f"{name} and {stems[stem]} would write the same output files "
                f"({stem}-000000.png, ...); rename one, or edit them apart"
            )
        stems[stem] = name
        inputs.append(EditInput(name, pixels, keep, digest.hexdigest(), tuple(args),
                                tuple(files), factor))  # fmt: skip
    return inputs


def _size_problem(spec, name, size, want, model, factor) -> str:
    """What is wrong with an input's size, and the fix."""
    (w, h), (mw, mh) = size, model
    if spec.mode is EditMode.upscale:
        return (f"{name} is {w}x{h}; --factor {factor} makes the model's {mw}x{mh} from "
                f"{want[0]}x{want[1]} images: add --resize")  # fmt: skip
    if spec.outpaint is not None:
        left, top, right, bottom = spec.outpaint
        return (f"{name} is {w}x{h} and --outpaint {_pad_text(spec.outpaint)} makes a "
                f"{w + left + right}x{h + top + bottom} canvas; the model draws {mw}x{mh}: the "
                f"image must be {want[0]}x{want[1]} (or add --resize)")  # fmt: skip
    return (
        f"{name} is {w}x{h}; the model draws {mw}x{mh} images: add --resize to resize and "
        "centre-crop it"
    )


def _pad_text(pad: tuple[int, int, int, int]) -> str:
    return ",".join(str(v) for v in pad)


def _keep(spec, name, img, pixels, masks, mask_folder, read):
    """(canvas, keep mask, redraw arguments, the mask's path or None) of an inpainting input
    (`name` as messages show it: a mask folder pairs by its file name); the mask's bytes are in
    `read`."""
    if spec.outpaint is not None:
        canvas, keep = editing.outpaint_canvas(pixels, spec.outpaint)
        return canvas, keep, ["--outpaint", _pad_text(spec.outpaint)], None
    h, w = pixels.shape[1:]
    if spec.box is not None:
        x0, y0, x1, y1 = spec.box
        if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
            raise UsageError(
                f"--box {_pad_text(spec.box)} is not inside {name} ({w}x{h}): it needs "
                f"0 <= X0 < X1 <= {w} and 0 <= Y0 < Y1 <= {h}"
            )
        return pixels, editing.box_mask(h, w, spec.box), ["--box", _pad_text(spec.box)], None
    mask_name, mask_path = _pair_mask(Path(name).name, masks, mask_folder)
    mask_name = _shown(mask_name, mask_path)
    mask, data = _decode(mask_path, mask_name, (h, w) if spec.resize else None, read,
                         what="the mask")  # fmt: skip
    if mask.source_size != img.source_size:
        raise UsageError(
            f"the mask {mask_name} is {_size_text(mask.source_size)} and {name} is "
            f"{_size_text(img.source_size)}: they must be the same size"
        )
    if mask.alpha is not None and bool((mask.alpha < 255).any()):
        raise UsageError(
            f"the mask {mask_name} has transparent pixels; a mask is white (regenerate) and "
            "black (keep): flatten it onto black or white first"
        )
    regenerate = mask.pixels.mean(0, keepdim=True) > 0  # white above 50% grey
    if not bool(regenerate.any()):
        raise UsageError(
            f"the mask {mask_name} has no white pixels: nothing to regenerate "
            "(white is regenerated, black kept)"
        )
    return pixels, ~regenerate, ["--mask", mask_path], mask_path


def edit_sampler(spec: EditSpec, config: SamplerConfig, timesteps: int) -> SamplerConfig:
    """The sampler an edit runs: the user's; for inpainting with none named or ddpm named, the
    ancestral sampler over INPAINT_STEPS with INPAINT_VARIANCE where those are not given, which
    agrees with the kept pixels better than the deterministic ones per second (docs/editing.md).
    Refuses a --jump that would leave nothing to resample."""
    if spec.mode is not EditMode.inpaint or config.sampler not in (None, SamplerName.ddpm):
        return config
    return replace(
        config, sampler=SamplerName.ddpm, steps=config.steps or min(INPAINT_STEPS, timesteps),
        variance=config.variance or INPAINT_VARIANCE,
    )  # fmt: skip


def evaluations_per_image(spec: EditSpec, sampler: SamplerConfig, tables, objective: str) -> int:
    """Network evaluations per image of the edit's walk (RePaint's jumps add, SDEdit's later
    start saves)."""
    pairs = config_pairs(sampler, tables, objective)
    if spec.mode is EditMode.inpaint:
        pairs = editing.resample_pairs(pairs, spec.jump, spec.resample)
    elif spec.mode is EditMode.sdedit:
        pairs = editing.sdedit(tables, pairs, torch.zeros(1), spec.strength).pairs
    return evaluations(pairs)


def check_jump(spec: EditSpec, steps: int) -> None:
    """RePaint jumps back `jump` steps: a jump as long as the walk never happens."""
    if spec.mode is EditMode.inpaint and spec.resample > 1 and spec.jump >= steps:
        raise UsageError(
            f"--jump {spec.jump} is not shorter than the sampler's {steps} steps, so nothing "
            "would be resampled: give a shorter --jump (or --resample 1)"
        )


def spec_args(spec: EditSpec) -> list[str]:
    """The options besides the inputs that redraw an edit's image."""
    args = ["--resize"] if spec.resize else []
    if spec.mode is EditMode.inpaint:
        args += ["--jump", str(spec.jump), "--resample", str(spec.resample)]
    elif spec.mode is EditMode.sdedit:
        args += ["--strength", repr(spec.strength)]
    return args


def builder(
    spec: EditSpec, inputs: list[EditInput], items: list[int], sampler: SamplerConfig,
    objective: str,
) -> Callable[[DiffusionTables, int, int, NoiseFn], Edit]:  # fmt: skip
    """The edit of the images items[a:b] (an input's index each): what `generate` calls per
    batch, with the tables on the device and the batch's own edit noise."""

    def build(tables: DiffusionTables, a: int, b: int, noise: NoiseFn) -> Edit:
        chunk = [inputs[i] for i in items[a:b]]
        device = tables.alpha_bar.device
        image = torch.stack([e.image for e in chunk]).to(device)
        pairs = config_pairs(sampler, tables, objective)
        if spec.mode is EditMode.inpaint:
            keep = torch.stack([e.keep for e in chunk]).to(device)
            return editing.inpaint(tables, pairs, image, keep, noise, spec.jump, spec.resample)
        if spec.mode is EditMode.sdedit:
            return editing.sdedit(tables, pairs, image, spec.strength)
        factor = chunk[0].factor  # one per command (open_inputs)
        small = image if spec.mode is EditMode.upscale else editing.downsample(image, factor)
        return editing.ilvr(tables, pairs, small, factor, noise)

    return build
