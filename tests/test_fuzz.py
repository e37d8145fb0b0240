"""Fuzzing with hypothesis: mutated checkpoints and images through the commands.

Every case must end with exit 0 (the mutation was harmless) or a clear error: exit 1 or 2, one
line on stderr, no traceback, no "internal error", within a time bound. CI runs a fixed-seed
slice; DDPM_FUZZ_SCALE=10 runs the full suite (1000+ checkpoints, 500+ images).
"""

from __future__ import annotations

import io
import json
import os
import struct
import time

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import draw_shapes, train_tiny
from ddpm_cli.cli import app

SCALE = int(os.environ.get("DDPM_FUZZ_SCALE", "1"))
SECONDS = 20  # the bound on one case
MAX_RSS_GIB = 6  # the whole test process, torch and all; a 2^40-element tensor would be 4 TiB


def peak_rss_gib() -> float:
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**30 if sys.platform == "darwin" else rss / 2**20


REFUSALS: list[tuple[float, str]] = []  # (seconds, command) of each refused case, for report()

SETTINGS = dict(
    deadline=None,  # timed by hand below, with a clearer message
    derandomize=False,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
)


def run_case(runner, args, subject: str | None = None) -> int:
    """Run one case; returns its exit code. A failure must be one clean line; with `subject`
    (the input's file or folder name) it must also name that input, which shows the command got
    past its own option parsing to the input itself, not refused a flag."""
    t0 = time.perf_counter()
    r = runner.invoke(app, args)
    seconds = time.perf_counter() - t0
    assert seconds < SECONDS, f"{args}: {seconds:.1f} s"
    if r.exit_code:
        REFUSALS.append((seconds, args[0]))
    out = r.output
    assert "Traceback" not in out and "internal error" not in out, out
    assert "\x1b" not in out, out  # text from files is shown escaped, never acted on
    assert r.exit_code in (0, 1, 2), (r.exit_code, out)
    if r.exit_code:
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
        if subject is not None:
            assert subject in lines[0], (args, lines[0])
    return r.exit_code


@pytest.fixture(scope="module")
def model_bytes(tmp_path_factory) -> bytes:
    run = train_tiny(tmp_path_factory.mktemp("fuzz"), 4)
    return (run / "model.safetensors").read_bytes()


def split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


@st.composite
def mutated_checkpoint(draw, base: bytes) -> bytes:
    kind = draw(st.sampled_from(["truncate", "flip", "header_len", "metadata", "tensor_entry"]))
    if kind == "truncate":
        return base[: draw(st.integers(0, len(base) - 1))]
    if kind == "flip":
        data = bytearray(base)
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= draw(st.integers(1, 255))
        return bytes(data)
    if kind == "header_len":
        n = draw(st.sampled_from([0, 1, 2**31, 2**63 - 1, len(base)]))
        return struct.pack("<Q", n) + base[8:]
    header, body = split(base)
    if kind == "metadata":
        meta = header["__metadata__"]
        key = draw(st.sampled_from(sorted(meta)))
        value = draw(
            st.one_of(
                st.text(max_size=30),
                st.just("{"),
                st.just("9" * 400),
                st.just(json.dumps({"model": {"channels": 10**9}})),
                st.just(json.dumps({"model": {"image_size": [-1, 2]}})),
                st.just("[]"),
                st.just("[" * 100_000 + "]" * 100_000),  # deeper than Python's parser recurses
                st.just("[bold red]x[/] \x1b[2J\x1b]0;title\x07 \u202e"),  # markup, escapes
                st.just(json.dumps({"model": {"num_res_blocks": 100_000}})),
            )
        )
        if key == "config" and draw(st.booleans()):
            config = json.loads(meta["config"])
            section = draw(st.sampled_from(sorted(config)))
            if isinstance(config[section], dict) and config[section]:
                field = draw(st.sampled_from(sorted(config[section])))
                config[section][field] = draw(
                    st.one_of(st.none(), st.integers(-(10**12), 10**12), st.text(max_size=8),
                              st.lists(st.integers(-5, 5), max_size=3), st.floats(),
                              st.booleans(), st.just([[[[]]]]))
                )  # fmt: skip
            value = json.dumps(config)
        meta[key] = value
        return join(header, body)
    # tensor_entry: wrong dtype, shape or offsets for one tensor
    name = draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
    entry = header[name]
    change = draw(st.sampled_from(["dtype", "shape", "offsets"]))
    if change == "dtype":
        entry["dtype"] = draw(st.sampled_from(["F16", "I64", "BOOL", "U8", "XX"]))
    elif change == "shape":
        entry["shape"] = draw(st.lists(st.integers(0, 2**40), max_size=4))
    else:
        entry["data_offsets"] = [draw(st.integers(0, 2**40)), draw(st.integers(0, 2**40))]
    return join(header, body)


def test_tensor_corruption_is_caught_by_the_content_hash(runner, model_bytes, tmp_path):
    header, body = split(model_bytes)
    data = bytearray(body)
    data[len(data) // 2] ^= 0x40  # one bit inside some tensor
    path = tmp_path / "bad.safetensors"
    path.write_bytes(join(header, bytes(data)))
    r = runner.invoke(app, ["inspect", str(path)])
    assert r.exit_code == 2 and "content hash" in r.stderr, r.output


def test_mutated_checkpoints_through_inspect_and_sample(runner, model_bytes, tmp_path):
    cases, codes = {"n": 0}, {"inspect": [], "sample": []}

    @seed(20261123)
    @settings(max_examples=100 * SCALE, **SETTINGS)
    @given(data=st.data())
    def check(data):
        blob = data.draw(mutated_checkpoint(model_bytes))
        path = tmp_path / "m.safetensors"
        path.write_bytes(blob)
        codes["inspect"].append(run_case(runner, ["inspect", str(path)], path.name))
        if cases["n"] % 4 == 0:  # sampling costs more: a quarter of the cases
            codes["sample"].append(
                run_case(runner, ["sample", str(path), "-n", "1", "--steps", "1", "-o",
                                  str(tmp_path / "o"), "--overwrite", "-q"], path.name)
            )  # fmt: skip
        cases["n"] += 1

    check()
    assert cases["n"] >= 100 * SCALE
    assert peak_rss_gib() < MAX_RSS_GIB  # no case allocated what a header merely declared
    report("checkpoints", codes)
    assert 0 in codes["inspect"] and any(codes["inspect"])  # both harmless and refused cases


def png_bytes(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height, with almost no data behind it."""
    import zlib

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (struct.pack(">I", len(payload)) + kind + payload
                + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF))  # fmt: skip

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = chunk(b"IDAT", zlib.compress(b"\0" * 64))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + data + chunk(b"IEND", b"")


@st.composite
def mutated_image(draw) -> tuple[bytes, str]:
    fmt = draw(st.sampled_from(["PNG", "JPEG", "GIF", "BMP"]))
    base = png_bytes(draw_shapes((24, 20), "RGB" if fmt != "GIF" else "P"), fmt)
    kind = draw(st.sampled_from(["truncate", "flip", "header", "bomb", "empty"]))
    if kind == "truncate":
        return base[: draw(st.integers(0, len(base) - 1))], fmt
    if kind == "flip":
        data = bytearray(base)
        for _ in range(draw(st.integers(1, 6))):
            data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
        return bytes(data), fmt
    if kind == "header":
        k = draw(st.integers(1, 24))
        return draw(st.binary(min_size=k, max_size=k)) + base[k:], fmt
    if kind == "bomb":
        side = draw(st.sampled_from([20_000, 65_535, 2**31 - 1]))
        return bomb_png(side, draw(st.sampled_from([side, 1]))), "PNG"
    return b"", fmt


SUFFIX = {"PNG": ".png", "JPEG": ".jpg", "GIF": ".gif", "BMP": ".bmp"}


def image_commands(runner, folder, path, tmp_path, n: int, train: bool) -> dict[str, int]:
    """The commands an image case goes through; their exit codes, each failure naming the
    input (run_case)."""
    codes = {
        "noise": run_case(runner, ["noise", str(path), "--t", "10", "-o",
                                   str(tmp_path / f"n{n}.png")], path.name),
        "inspect": run_case(runner, ["inspect", str(folder)], folder.name),
    }  # fmt: skip
    if train:
        codes["train"] = run_case(runner, ["train", str(folder), "--preset", "tiny",
                                           "--image-size", "8", "--steps", "1", "--sample-every",
                                           "0", "--out", str(tmp_path / f"run{n}"), "-q"],
                                  folder.name)  # fmt: skip
    return codes


def report(kind: str, codes: dict[str, list[int]]) -> None:
    """What reliability.md records: cases per command, and how many got through cleanly."""
    for command, seen in codes.items():
        print(f"fuzz {kind}: {command}: {len(seen)} cases, {seen.count(0)} exit 0, "
              f"{len(seen) - seen.count(0)} refused naming the input")  # fmt: skip
    if REFUSALS:
        seconds, command = max(REFUSALS)
        print(f"fuzz {kind}: the slowest refusal took {seconds:.2f} s ({command})")
    REFUSALS.clear()


@pytest.mark.parametrize("fmt", sorted(SUFFIX))
def test_intact_images_pass_every_command(runner, tmp_path, fmt):
    """The control: the fuzz's base images themselves go through, so a refusal in the fuzz is
    the mutation's doing, not an option the harness got wrong."""
    folder = tmp_path / "f"
    folder.mkdir()
    path = folder / f"img{SUFFIX[fmt]}"
    path.write_bytes(png_bytes(draw_shapes((24, 20), "RGB" if fmt != "GIF" else "P"), fmt))
    assert image_commands(runner, folder, path, tmp_path, 0, train=True) == dict(
        noise=0, inspect=0, train=0
    )


def test_mutated_images_through_noise_inspect_and_train(runner, tmp_path):
    cases, codes = {"n": 0}, {"noise": [], "inspect": [], "train": []}

    @seed(20261124)
    @settings(max_examples=50 * SCALE, **SETTINGS)
    @given(data=st.data())
    def check(data):
        blob, fmt = data.draw(mutated_image())
        n = cases["n"]
        folder = tmp_path / f"f{n}"
        folder.mkdir()
        path = folder / f"img{SUFFIX[fmt]}"
        path.write_bytes(blob)
        train = n % 10 == 0  # training costs more: a tenth of the cases
        if train:
            draw_shapes((12, 12)).save(folder / "good.png")  # so a folder can also train
        for command, code in image_commands(runner, folder, path, tmp_path, n, train).items():
            codes[command].append(code)
        cases["n"] += 1

    check()
    assert cases["n"] >= 50 * SCALE
    assert peak_rss_gib() < MAX_RSS_GIB
    report("images", codes)
    assert 0 in codes["noise"] and any(codes["noise"])  # both harmless and refused cases
