"""Checkpoints: safetensors files with JSON metadata, written atomically, validated on load.

Nothing here pickles or unpickles. A file holds named tensors and a string-to-string metadata
map; ours always carries:

    format          "ddpm"                  (FORMAT)
    format_version  "1"                     (FORMAT_VERSION)
    kind            "model" or "train_state"
    ddpm_version    the package version that wrote it
    created         ISO 8601 time, UTC
    content_hash    sha256 over the tensors' names, dtypes, shapes and bytes
    config          JSON: {"model": ..., "diffusion": ..., "training": ..., "data": ...}
    step            optimizer steps taken

plus what the writer adds (EMA decay, resume state). `ddpm sample model.safetensors` needs
nothing else to rebuild the network and its diffusion.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from ddpm_cli import __version__, runtime
from ddpm_cli.errors import ConfigError, DdpmError
from ddpm_cli.store.files import write_atomic
from ddpm_cli.text import parse_json

FORMAT = "ddpm"
FORMAT_VERSION = 1
MAX_HEADER_BYTES = 64 * 1024 * 1024  # safetensors headers are small; refuse absurd ones early
REQUIRED = ("format", "format_version", "kind", "ddpm_version", "content_hash", "config", "step")


class CheckpointError(DdpmError):
    """A checkpoint is missing, corrupt, from an unknown format, or does not fit the model."""

    exit_code = 2


def content_hash(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and raw bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{str(t.dtype)}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(
    path: Path, tensors: dict[str, torch.Tensor], kind: str, meta: dict, follow: bool = True
) -> None:
    """Write tensors and metadata atomically. `meta` values that are not strings become JSON.
    `follow`: as in write_atomic (a run's own files pass False)."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    header = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "kind": kind,
        "ddpm_version": __version__,
        "torch_version": torch.__version__,
        "safetensors_version": _safetensors_version(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "content_hash": content_hash(tensors),
        "runtime": json.dumps(runtime.current().recorded()),  # switches that change results
    }
    for key, value in meta.items():
        header[key] = value if isinstance(value, str) else json.dumps(value)
    write_atomic(Path(path), save(tensors, metadata=header), follow)


def _safetensors_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("safetensors")
    except PackageNotFoundError:
        return "unknown"


# the first bytes of PNG, JPEG, GIF, BMP, WebP/RIFF and TIFF files
IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"BM", b"RIFF", b"II*\x00", b"MM\x00*")


def read_header(path: Path) -> dict:
    """The safetensors JSON header of `path` (tensors and "__metadata__"), bounded in size."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory; give a .safetensors file")
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", raw)
            size = path.stat().st_size
            if n > MAX_HEADER_BYTES or 8 + n > size:
                if raw.startswith(IMAGE_MAGIC):  # (a valid header length never gets here)
                    raise CheckpointError(f"{path}: is an image, not a checkpoint (.safetensors)")
                raise CheckpointError(f"{path}: not a safetensors file (bad header length {n})")
            header = parse_json(f.read(n))
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (header is not an object)")
    return header


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    tensors: dict[str, torch.Tensor]
    meta: dict[str, str]

    def json(self, key: str):
        """A metadata value parsed as JSON, with a clear error when it is not."""
        try:
            return parse_json(self.meta[key])
        except (KeyError, ValueError):
            raise CheckpointError(f"{self.path}: metadata {key!r} is missing or not JSON") from None

    def number(self, key: str, integer: bool = True):
        """A metadata value that must be a count (integer) or a duration (a real number), zero
        or more: a hand-edited or damaged train state is one clear error, not a crash later."""
        value = self.json(key)
        ok = isinstance(value, int) if integer else isinstance(value, (int, float))
        if not ok or isinstance(value, bool) or not 0 <= value < math.inf:
            what = "a count" if integer else "a number of seconds"
            raise CheckpointError(f"{self.path}: metadata {key!r} is not {what}: {value!r:.40}")
        return value

    @property
    def world(self) -> int:
        """The processes of the torchrun job that saved it (1 for runs saved before
        distributed training, which had no such key)."""
        if "world_size" not in self.meta:
            return 1
        return self.number("world_size") or 1

    @property
    def step(self) -> int:
        step = self.json("step")
        if not isinstance(step, int) or step < 0:
            raise CheckpointError(f"{self.path}: metadata 'step' is not a step count")
        return step

    @property
    def config(self) -> dict:
        config = self.json("config")
        if not isinstance(config, dict):
            raise CheckpointError(f"{self.path}: metadata 'config' is not a JSON object")
        return config


def header_value(path: Path, key: str):
    """One metadata value of a safetensors file's header, parsed as JSON; None when the file,
    its header or the key is missing or unreadable."""
    try:
        return parse_json((read_header(path).get("__metadata__") or {})[key])
    except (CheckpointError, OSError, KeyError, TypeError, ValueError):
        return None


def load_checkpoint(path: Path, kind: str | None = None, verify: bool = True) -> Checkpoint:
    """Read and validate a checkpoint written by save_checkpoint.

    Checks the format and its version, the kind, the metadata fields, and (verify) the content
    hash, so corrupted tensor bytes are caught. Every problem is one CheckpointError.
    """
    path = Path(path)
    header = read_header(path)
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError(f"{path}: safetensors metadata must map strings to strings")
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: not a ddpm checkpoint (no 'format: {FORMAT}' in its metadata); "
            "checkpoints of other tools need converting first"
        )
    missing = [k for k in REQUIRED if k not in meta]
    if missing:
        raise CheckpointError(f"{path}: metadata lacks {', '.join(missing)}")
    if meta["format_version"] != str(FORMAT_VERSION):
        raise CheckpointError(
            f"{path}: checkpoint format version {meta['format_version']} is not supported by "
            f"ddpm {__version__} (it reads version {FORMAT_VERSION}); upgrade ddpm"
        )
    if kind is not None and meta["kind"] != kind:
        raise CheckpointError(f"{path}: is a {meta['kind']} file, expected a {kind} file")
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt checkpoint ({e})") from None
    if verify and content_hash(tensors) != meta["content_hash"]:
        raise CheckpointError(f"{path}: content hash mismatch: the tensor data is corrupted")
    return Checkpoint(path, tensors, meta)


def check_state_dict(path: Path, expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]):
    """Refuse tensors that are missing, unexpected, or of the wrong shape, in one message."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong = sorted(
        k for k in set(expected) & set(got) if tuple(expected[k].shape) != tuple(got[k].shape)
    )
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    if wrong:
        k = wrong[0]
        problems.append(
            f"{len(wrong)} of the wrong shape (e.g. {k}: {tuple(got[k].shape)}, "
            f"expected {tuple(expected[k].shape)})"
        )
    if problems:
        raise CheckpointError(
            f"{path}: tensors do not fit the model in its config: " + "; ".join(problems)
        )


def config_section(ckpt: Checkpoint, name: str, cls):
    """One config dataclass from the checkpoint's config JSON, or one clear error."""
    from ddpm_cli.config import from_dict

    try:
        return from_dict(cls, ckpt.config.get(name, {}))
    except ConfigError as e:
        raise CheckpointError(f"{ckpt.path}: bad {name} config in metadata: {e}") from None
