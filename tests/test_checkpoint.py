"""Checkpoints: round trips, self-description, atomic writes, and validation of bad files."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save

from ddpm_cli.config import DiffusionConfig, ModelConfig, TrainConfig
from ddpm_cli.errors import DataError
from ddpm_cli.model.unet import UNet
from ddpm_cli.store.checkpoint import (
    CheckpointError,
    content_hash,
    load_checkpoint,
    save_checkpoint,
)
from ddpm_cli.store.models import load_model

MODEL = ModelConfig(
    image_size=(8, 8),
    channels=32,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(),
    dropout=0.0,
)


def write_model(path, model=None, step=7):
    model = model or UNet(MODEL)
    configs = {
        "model": MODEL.to_dict(),
        "diffusion": DiffusionConfig().to_dict(),
        "training": TrainConfig(seed=1).to_dict(),
        "data": {"source": "x"},
    }
    save_checkpoint(path, model.state_dict(), "model", {"config": configs, "step": step})
    return model


def test_model_roundtrip_needs_nothing_but_the_file(tmp_path):
    torch.manual_seed(0)
    model = write_model(tmp_path / "m.safetensors")
    lm = load_model(tmp_path / "m.safetensors")
    loaded, model_config, diffusion, training, ckpt = (
        lm.model, lm.model_config, lm.diffusion, lm.training, lm.ckpt
    )
    assert model_config == MODEL and diffusion == DiffusionConfig() and training.seed == 1
    assert ckpt.step == 7 and ckpt.meta["format"] == "ddpm" and ckpt.meta["format_version"] == "1"
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


def test_content_hash_covers_names_dtypes_shapes_and_bytes():
    a = {"w": torch.zeros(2, 2)}
    assert content_hash(a) == content_hash({"w": torch.zeros(2, 2)})
    assert content_hash(a) != content_hash({"v": torch.zeros(2, 2)})
    assert content_hash(a) != content_hash({"w": torch.zeros(4)})
    assert content_hash(a) != content_hash({"w": torch.zeros(2, 2, dtype=torch.float64)})
    assert content_hash(a) != content_hash({"w": torch.tensor([[0.0, 0.0], [0.0, 1e-30]])})


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    write_model(path, step=1)
    before = path.read_bytes()
    import ddpm_cli.store.files as files

    real_fsync = files.os.fsync

    def crash(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(files.os, "fsync", crash)
    with pytest.raises(Exception, match="cannot write"):
        write_model(path, step=2)
    monkeypatch.setattr(files.os, "fsync", real_fsync)
    assert path.read_bytes() == before
    assert load_checkpoint(path).step == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def corrupt(path, how):
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    meta = header["__metadata__"]
    if how == "flip_tensor_byte":
        data[-5] ^= 0xFF
        return bytes(data)
    if how == "truncate":
        return bytes(data[: len(data) // 2])
    if how == "huge_header":
        return struct.pack("<Q", 2**40) + bytes(data[8:])
    if how == "not_json":
        return bytes(data[:8]) + b"{" * n + bytes(data[8 + n :])
    if how == "format_version":
        meta["format_version"] = "99"
    elif how == "foreign":
        del meta["format"]
    elif how == "no_config":
        del meta["config"]
    elif how == "config_not_json":
        meta["config"] = "{not json"
    elif how == "bad_model_config":
        cfg = json.loads(meta["config"])
        cfg["model"]["in_channels"] = 7
        meta["config"] = json.dumps(cfg)
    elif how == "unknown_field":
        cfg = json.loads(meta["config"])
        cfg["model"]["wings"] = 2
        meta["config"] = json.dumps(cfg)
    elif how == "wrong_arch":
        cfg = json.loads(meta["config"])
        cfg["model"]["channels"] = 64
        meta["config"] = json.dumps(cfg)
    elif how == "kind":
        meta["kind"] = "train_state"
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + bytes(data[8 + n :])


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("flip_tensor_byte", "content hash mismatch"),
        ("truncate", "not a safetensors file|corrupt"),
        ("huge_header", "bad header length"),
        ("not_json", "not a readable safetensors file"),
        ("format_version", "format version 99 is not supported"),
        ("foreign", "not a ddpm checkpoint"),
        ("no_config", "metadata lacks config"),
        ("config_not_json", "'config' is missing or not JSON"),
        ("bad_model_config", "in_channels must be 1, 3 or 4"),
        ("unknown_field", "unknown fields wings"),
        ("wrong_arch", "tensors do not fit the model"),
        ("kind", "is a train_state file, expected a model file"),
    ],
)
def test_bad_checkpoints_are_one_clear_error(tmp_path, how, message):
    path = tmp_path / "m.safetensors"
    write_model(path)
    path.write_bytes(corrupt(path, how))
    if how == "kind":  # opening a model refuses a train state before reading its tensors
        with pytest.raises(DataError, match="is a train state; add --raw for its raw weights$"):
            load_model(path)  # (no model.safetensors beside it to suggest)
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(path, kind="model")
        return
    with pytest.raises(CheckpointError, match=message):
        load_model(path)


def test_missing_and_foreign_files(tmp_path):
    with pytest.raises(DataError, match="no such checkpoint"):
        load_model(tmp_path / "none.safetensors")
    foreign = tmp_path / "f.safetensors"
    foreign.write_bytes(save({"w": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match="not a ddpm checkpoint"):
        load_model(foreign)
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="too short"):
        load_model(tmp_path / "empty.safetensors")
