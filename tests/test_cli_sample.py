"""`ddpm sample`: files, grids, stdout, provenance, reproducibility, trajectories, bad input."""

from __future__ import annotations

import io
import json
import os
import shlex

import pytest
import torch
from PIL import Image

from conftest import draw_shapes, pixels
from ddpm_cli.cli import app
from ddpm_cli.config import DiffusionConfig, TrainConfig
from ddpm_cli.generation.sampling import image_seed
from ddpm_cli.store.checkpoint import load_checkpoint
from ddpm_cli.training.run import train

TINY = dict(preset="tiny", image_size=8, batch_size=8, sample_every=0, device="cpu", seed=1)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny trained runs on 8x8 pictures: a v model (RGB) and an eps model (grayscale)."""
    root = tmp_path_factory.mktemp("runs")
    colour, gray = root / "colour", root / "gray"
    colour.mkdir()
    gray.mkdir()
    for i in range(8):
        draw_shapes((16 + i, 16)).save(colour / f"{i}.png")
        draw_shapes((16 + i, 16), "L").save(gray / f"{i}.png")
    v = train(
        str(colour), TrainConfig(**TINY, steps=3, objective="v"), DiffusionConfig(), root / "v"
    )
    # 12 steps: the power-function EMA follows the raw weights closely over the first few
    eps_cfg = TrainConfig(**TINY, steps=12, objective="eps")
    eps = train(str(gray), eps_cfg, DiffusionConfig(timesteps=200), root / "e")
    return {"v": v.out, "eps": eps.out}


def sample(runner, *args):
    return runner.invoke(app, ["sample", *map(str, args), "-q"])


def text_chunks(path_or_bytes) -> dict:
    data = path_or_bytes if isinstance(path_or_bytes, bytes) else path_or_bytes.read_bytes()
    img = Image.open(io.BytesIO(data))
    img.load()
    return dict(img.text)


def test_writes_numbered_pngs_lists_them_and_records_provenance(runner, runs, tmp_path):
    model = runs["v"] / "model.safetensors"
    r = sample(runner, model, "-n", 3, "-o", tmp_path / "out", "--seed", 5)
    assert r.exit_code == 0, r.output
    files = [tmp_path / "out" / f"00000{i}.png" for i in range(3)]
    assert r.stdout.splitlines() == [str(f) for f in files]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f.name for f in files]
    text = text_chunks(files[2])
    assert text["ddpm:checkpoint_hash"] == load_checkpoint(model).meta["content_hash"]
    assert (text["ddpm:sampler"], text["ddpm:steps"], text["ddpm:spacing"]) == (
        "dpm++",
        "20",
        "logsnr",
    )
    assert (text["ddpm:seed"], text["ddpm:index"], text["ddpm:weights"]) == ("5", "2", "ema")
    assert Image.open(files[0]).size == (8, 8) and Image.open(files[0]).mode == "RGB"


def test_ctrl_c_lists_what_was_written_and_the_hint_draws_the_rest(runner, runs, tmp_path,
                                                                    monkeypatch):  # fmt: skip
    """Interrupted in its third batch of two (before its first image, then after it), sample
    lists the files written on stdout (a pipeline gets them) and says how to draw the rest;
    following the hint gives the files an uninterrupted run writes, byte for byte."""
    from ddpm_cli.generation import job

    model = runs["v"] / "model.safetensors"
    whole = sample(runner, model, "-n", 6, "-b", 2, "--steps", 2, "-o", tmp_path / "a",
                   "--seed", 5)  # fmt: skip
    assert whole.exit_code == 0, whole.output
    real = job.encode_png
    for cut_at in (5, 6):  # 4 written, then 5 (the third batch's first image)
        def interrupted(*args, calls=[], cut_at=cut_at, **kwargs):  # noqa: B006 (a counter)
            calls.append(1)
            if len(calls) == cut_at:
                raise KeyboardInterrupt
            return real(*args, **kwargs)

        monkeypatch.setattr(job, "encode_png", interrupted)
        out = tmp_path / f"cut{cut_at}"
        cut = runner.invoke(app, ["sample", str(model), "-n", "6", "-b", "2", "--steps", "2",
                                  "-o", str(out), "--seed", "5"])  # fmt: skip
        assert cut.exit_code == 130
        done = cut_at - 1
        assert cut.stdout.splitlines() == [str(out / f"00000{i}.png") for i in range(done)]
        hint = cut.stderr.strip().splitlines()[-1]
        assert hint.endswith(f"{done} images written; the rest: --start {done} -n {6 - done} "
                             "--seed 5"), hint  # fmt: skip
        monkeypatch.setattr(job, "encode_png", real)
        rest = sample(runner, model, "-b", 2, "--steps", 2, "-o", out,
                      *hint.split("the rest: ")[1].split())  # fmt: skip
        assert rest.exit_code == 0, rest.output
        names = sorted(p.name for p in (tmp_path / "a").iterdir())
        assert names == sorted(p.name for p in out.iterdir())
        assert all((tmp_path / "a" / n).read_bytes() == (out / n).read_bytes()
                   for n in names)  # fmt: skip


def test_an_interrupted_job_leaves_no_empty_folder_it_made(runner, runs, tmp_path, monkeypatch):
    """Ctrl-C before the first image: the -o folder the job created is removed again, with the
    parents it created for it; a folder that was there before is kept."""
    from ddpm_cli.generation import job

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(job, "encode_png", interrupted)
    model = runs["v"] / "model.safetensors"
    args = ["sample", str(model), "-n", "2", "--steps", "2"]
    r = runner.invoke(app, [*args, "-o", str(tmp_path / "new" / "out")])
    assert r.exit_code == 130 and "0 images written" in r.stderr
    assert not (tmp_path / "new").exists() and tmp_path.is_dir()
    (tmp_path / "old").mkdir()
    r = runner.invoke(app, [*args, "-o", str(tmp_path / "old")])
    assert r.exit_code == 130 and (tmp_path / "old").is_dir()
    r = runner.invoke(app, [*args, "-o", str(tmp_path / "old" / "a" / "b")])
    assert r.exit_code == 130 and os.listdir(tmp_path / "old") == []


def test_image_k_does_not_depend_on_n_batch_size_or_run(runner, runs, tmp_path):
    model = runs["v"] / "model.safetensors"
    a = sample(runner, model, "-n", 5, "-b", 2, "-o", tmp_path / "a", "--seed", 9)
    b = sample(runner, model, "-n", 2, "--start", 3, "-b", 1, "-o", tmp_path / "b", "--seed", 9)
    c = sample(runner, model, "-n", 5, "-b", 5, "-o", tmp_path / "c", "--seed", 9)
    assert a.exit_code == b.exit_code == c.exit_code == 0
    for k in (3, 4):
        assert (tmp_path / "a" / f"00000{k}.png").read_bytes() == (
            tmp_path / "b" / f"00000{k}.png"
        ).read_bytes()
    for k in range(5):
        assert (tmp_path / "a" / f"00000{k}.png").read_bytes() == (
            tmp_path / "c" / f"00000{k}.png"
        ).read_bytes()
    # different images of one run differ; different seeds differ
    assert (tmp_path / "a" / "000000.png").read_bytes() != (
        tmp_path / "a" / "000001.png"
    ).read_bytes()
    d = sample(runner, model, "-n", 1, "-o", tmp_path / "d", "--seed", 10)
    assert d.exit_code == 0
    assert (tmp_path / "d" / "000000.png").read_bytes() != (
        tmp_path / "a" / "000000.png"
    ).read_bytes()
    assert len({image_seed(s, k) for s in range(50) for k in range(50)}) == 2500


def test_the_recorded_command_redraws_the_image(runner, runs, tmp_path, monkeypatch):
    model = runs["v"] / "model.safetensors"
    r = sample(runner, model, "-n", 4, "-o", tmp_path, "--seed", 2, "--sampler", "ddim", "--eta", 1)
    assert r.exit_code == 0, r.output
    command = text_chunks(tmp_path / "000003.png")["ddpm:command"]
    args = shlex.split(command)
    assert args[:3] == ["ddpm", "sample", "model.safetensors"] and "--eta" in args
    # the default precision depends on the device, so the command names the one used
    assert "--precision fp32" in command
    monkeypatch.chdir(runs["v"])
    again = runner.invoke(app, [*args[1:], "-o", "-", "-q"])
    assert again.exit_code == 0, again.output
    assert again.stdout_bytes == (tmp_path / "000003.png").read_bytes()


def test_a_result_changing_switch_is_recorded_and_set_by_the_redraw_command(
    runner, runs, tmp_path, monkeypatch, switches
):
    """The switches that change bits (runtime.RECORDED) are in each checkpoint's metadata and
    each PNG; the PNG's command sets the ones away from their defaults."""
    from ddpm_cli import runtime

    model = runs["v"] / "model.safetensors"
    assert json.loads(load_checkpoint(model).meta["runtime"]) == runtime.current().recorded()
    switches(winograd=False)
    r = sample(runner, model, "-n", 2, "-o", tmp_path, "--seed", 4)
    assert r.exit_code == 0, r.output
    text = text_chunks(tmp_path / "000001.png")
    assert json.loads(text["ddpm:runtime"])["winograd"] is False
    env, *args = shlex.split(text["ddpm:command"])
    assert env == "DDPM_WINOGRAD=0" and args[:2] == ["ddpm", "sample"]
    monkeypatch.chdir(runs["v"])
    with runtime.use(None):  # a new process: the switches come from its environment
        again = runner.invoke(app, [*args[1:], "-o", "-", "-q"], env={"DDPM_WINOGRAD": "0"})
        assert runtime.current().winograd is False
    assert again.exit_code == 0, again.output
    assert again.stdout_bytes == (tmp_path / "000001.png").read_bytes()


def test_grid_stdout_and_json(runner, runs, tmp_path):
    model = runs["v"] / "model.safetensors"
    r = sample(runner, model, "-n", 4, "--grid", tmp_path / "g.png", "--seed", 1)
    assert r.exit_code == 0 and r.stdout.splitlines() == [str(tmp_path / "g.png")]
    assert Image.open(tmp_path / "g.png").size == (2 * 8 + 3 * 2,) * 2  # 2x2, 2px padding
    assert sorted(os.listdir(tmp_path)) == ["g.png"]
    one = sample(runner, model, "-n", 1, "-o", "-", "--seed", 1)
    assert one.exit_code == 0 and Image.open(io.BytesIO(one.stdout_bytes)).size == (8, 8)
    several = sample(runner, model, "-n", 4, "-o", "-", "--seed", 1)
    assert several.stdout_bytes == (tmp_path / "g.png").read_bytes()  # the grid
    j = sample(runner, model, "-n", 2, "-o", tmp_path / "o", "--json", "--seed", 3)
    summary = json.loads(j.stdout)
    assert summary["files"] == [
        str(tmp_path / "o" / "000000.png"),
        str(tmp_path / "o" / "000001.png"),
    ]
    assert summary["sampler"]["sampler"] == "dpm++" and summary["seed"] == 3
    assert summary["img_per_s"] > 0


def test_existing_files_are_refused_unless_overwrite(runner, runs, tmp_path):
    model = runs["v"] / "model.safetensors"
    assert sample(runner, model, "-n", 2, "-o", tmp_path, "--seed", 1).exit_code == 0
    before = (tmp_path / "000001.png").stat().st_mtime_ns
    r = sample(runner, model, "-n", 3, "-o", tmp_path, "--seed", 2)
    assert r.exit_code == 2 and "000000.png already exists (2 of the 3 files do)" in r.stderr
    assert "Traceback" not in r.output and not (tmp_path / "000002.png").exists()
    assert (tmp_path / "000001.png").stat().st_mtime_ns == before
    assert sample(runner, model, "-n", 2, "-o", tmp_path, "--start", 2).exit_code == 0
    assert sample(runner, model, "-n", 2, "-o", tmp_path, "--overwrite").exit_code == 0
    assert sorted(os.listdir(tmp_path)) == [f"00000{i}.png" for i in range(4)]


def test_run_directory_raw_weights_and_grayscale_eps_models(runner, runs, tmp_path):
    r = sample(runner, runs["eps"], "-n", 2, "-o", tmp_path / "ema", "--seed", 4)
    assert r.exit_code == 0, r.output
    text = text_chunks(tmp_path / "ema" / "000000.png")
    # eps models default to ddpm over 100 steps (here T = 200) with the posterior variance
    assert (text["ddpm:sampler"], text["ddpm:steps"], text["ddpm:variance"]) == (
        "ddpm",
        "100",
        "small",
    )
    assert Image.open(tmp_path / "ema" / "000000.png").mode == "L"
    raw = sample(runner, runs["eps"], "-n", 2, "-o", tmp_path / "raw", "--seed", 4, "--raw")
    assert raw.exit_code == 0, raw.output
    assert text_chunks(tmp_path / "raw" / "000000.png")["ddpm:weights"] == "raw"
    a = pixels(tmp_path / "ema" / "000000.png")
    b = pixels(tmp_path / "raw" / "000000.png")
    assert not torch.equal(a, b)  # after 12 steps the EMA is not the raw weights


@pytest.mark.parametrize("suffix", [".gif", ".png"])
def test_trajectory(runner, runs, tmp_path, suffix):
    path = tmp_path / f"traj{suffix}"
    r = sample(
        runner,
        runs["v"],
        "-n",
        3,
        "--grid",
        tmp_path / "g.png",
        "--trajectory",
        path,
        "--trajectory-images",
        2,
        "--steps",
        10,
    )
    assert r.exit_code == 0, r.output
    # stdout lists every file written: the images (none here: no -o), the grid, the trajectory
    assert r.stdout.split("\n")[-3:] == [str(tmp_path / "g.png"), str(path), ""], r.stdout
    img = Image.open(path)
    if suffix == ".gif":
        assert img.n_frames == 11  # every step of a short run, and the sample
    else:
        assert img.width > 8 * img.height // 2  # 8 labelled columns side by side


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["missing.safetensors", "-n", "1", "-o", "x"], 2, "no such checkpoint"),
        (["{v}", "-n", "0", "-o", "x"], 2, "-n"),
        (["{v}", "-n", "1", "-o", "x", "--steps", "5000"], 2, "more than the model's 1000"),
        (["{v}", "-n", "1", "-o", "x", "--sampler", "euler"], 2, "euler"),
        (["{v}", "-n", "1"], 2, "say where the images go"),
        (["{v}", "-n", "1", "-o", "x", "--eta", "0.5"], 2, "--eta applies to --sampler ddim"),
        (["{v}", "-n", "1", "-o", "x", "--spacing", "cubic"], 2, "'cubic' is not one of"),
        (["{v}", "-n", "1", "-o", "x", "--trajectory", "t.mp4"], 2, ".gif animation or a .png"),
        (["{v}", "-n", "2", "--grid", "g.jpg"], 2, "g.jpg: --grid writes a PNG; name it .png"),
        (["{v}", "-n", "1", "-o", "x", "--precision", "fp16", "--device", "cpu"], 2, "CUDA"),
        (["{corrupt}", "-n", "1", "-o", "x"], 2, "not a safetensors file"),
        (["{v}", "-n", "1", "-o", "x/sub/out"], 2, "is a file"),
        (["{v}", "-n", "1", "--grid", "x/g.png"], 2, "does not exist"),
        (["{state}", "-n", "1", "-o", "x"], 2, "is a train state; use "),
        (["{v}", "-n", "1", "-o", "one.png"], 2,
         "-o one.png: -o names a folder for the images, and this looks like a file name; for "
         "one file, use --grid one.png, or -o - > one.png (end it with / for a folder of that "
         "name)"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(
    runner, runs, tmp_path, monkeypatch, args, code, message
):
    if "x/sub/out" in args:
        (tmp_path / "x").write_text("a file where a directory should be")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes((runs["v"] / "model.safetensors").read_bytes()[:5000])
    paths = {"v": runs["v"], "corrupt": corrupt, "state": runs["v"] / "train_state.safetensors"}
    args = [a.format(**paths) for a in args]
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, ["sample", *args])
    assert r.exit_code == code, r.output
    assert message in r.stderr and "Traceback" not in r.output
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").is_dir() and not list(tmp_path.glob("**/*.png"))
    assert not (tmp_path / "one.png").exists()


def test_a_train_state_of_another_name_samples_with_raw(runner, runs, tmp_path):
    """The refusal's advice works: --raw takes the train state given, not one beside it."""
    copy = tmp_path / "state_only.safetensors"
    copy.write_bytes((runs["v"] / "train_state.safetensors").read_bytes())
    r = runner.invoke(app, ["sample", str(copy), "-n", "1", "-o", str(tmp_path / "a")])
    assert r.exit_code == 2
    assert r.stderr.strip() == f"error: {copy}: is a train state; add --raw for its raw weights"
    r = runner.invoke(app, ["sample", str(copy), "-n", "1", "--raw", "-o", str(tmp_path / "a"),
                            "--steps", "2", "--seed", "1"])  # fmt: skip
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["sample", str(runs["v"]), "-n", "1", "--raw", "-o",
                            str(tmp_path / "b"), "--steps", "2", "--seed", "1"])  # fmt: skip
    assert r.exit_code == 0, r.output
    pixels = [Image.open(tmp_path / d / "000000.png").tobytes() for d in ("a", "b")]
    assert pixels[0] == pixels[1]  # the same raw weights (the files' provenance differs)


def test_plain_progress_lines_without_a_terminal_and_quiet(runner, runs, tmp_path):
    model = runs["v"] / "model.safetensors"
    r = runner.invoke(app, ["sample", str(model), "-n", "3", "-b", "2", "-o", str(tmp_path)])
    assert r.exit_code == 0, r.output
    lines = r.stderr.splitlines()
    assert lines[0].startswith("ddpm sample") and "dpm++ 20 steps" in lines[0]
    assert [line.split(" ")[0] for line in lines[1:3]] == ["2/3", "3/3"]
    assert "\x1b[" not in r.stderr  # no control codes in logs
    q = runner.invoke(app, ["sample", str(model), "-n", "1", "-o", str(tmp_path / "q"), "-q"])
    assert q.exit_code == 0 and q.stderr == ""


def test_default_batch_size_follows_free_memory(runs, monkeypatch):
    import ddpm_cli.generation.sampling as sampling

    sm = sampling.load_for_sampling(runs["v"])
    cpu = torch.device("cpu")
    monkeypatch.setattr(sampling, "available_memory", lambda: 10**12)
    assert sampling.default_batch_size(sm.model_config, cpu, 1000) == sampling.MAX_BATCH
    assert sampling.default_batch_size(sm.model_config, cpu, 7) == 7
    monkeypatch.setattr(sampling, "available_memory", lambda: 10**5)
    assert sampling.default_batch_size(sm.model_config, cpu, 1000) == 1


def test_training_grids_are_what_ddpm_sample_draws_with_the_run_seed(runner, tmp_path):
    folder = tmp_path / "pics"
    folder.mkdir()
    for i in range(4):
        draw_shapes((12, 12 + i)).save(folder / f"{i}.png")
    cfg = TrainConfig(**{**TINY, "sample_every": 2, "num_samples": 4, "seed": 8}, steps=2)
    run = train(str(folder), cfg, DiffusionConfig(), tmp_path / "run")
    r = sample(runner, run.out, "-n", 4, "--seed", 8, "--grid", tmp_path / "g.png")
    assert r.exit_code == 0, r.output
    grid = Image.open(run.out / "samples" / "step-0000002.png")
    again = Image.open(tmp_path / "g.png")
    assert grid.size == again.size and torch.equal(pixels(grid), pixels(again))


def test_bf16_sampling_on_the_cpu_is_close_to_fp32(runner, runs, tmp_path):
    model = runs["v"] / "model.safetensors"
    for precision in ("fp32", "bf16"):
        r = sample(runner, model, "-n", 4, "--seed", 1, "-o", tmp_path / precision,
                   "--precision", precision)  # fmt: skip
        assert r.exit_code == 0, r.output
    a = torch.stack([pixels(tmp_path / "fp32" / f"00000{i}.png") for i in range(4)])
    b = torch.stack([pixels(tmp_path / "bf16" / f"00000{i}.png") for i in range(4)])
    assert text_chunks(tmp_path / "bf16" / "000000.png")["ddpm:precision"] == "bf16"
    assert (a - b).abs().float().mean() < 8  # of 255: the same images, up to rounding


def test_compiled_sampling_matches_eager(runner, runs, tmp_path, compiles_for_real):
    pytest.importorskip("torch._inductor")
    model = runs["v"] / "model.safetensors"
    for flag in ([], ["--compile"]):
        out = tmp_path / ("compiled" if flag else "eager")
        r = sample(runner, model, "-n", 2, "--seed", 3, "--steps", 5, "-o", out, *flag)
        assert r.exit_code == 0, r.output
    for i in range(2):
        a = pixels(tmp_path / "eager" / f"00000{i}.png")
        b = pixels(tmp_path / "compiled" / f"00000{i}.png")
        assert (a - b).abs().max() <= 1  # the same images, up to rounding


def test_compiling_for_the_cpu_drops_torchs_no_cuda_runtime_line(monkeypatch):
    """On a machine with a CUDA toolkit and no GPU, torch's C++ builder logs "No CUDA runtime is
    found, using CUDA_HOME=..." while --compile builds for the CPU: dropped, and that logger's
    other lines kept. The compile is replaced by one that logs as the builder's import does."""
    import logging

    from ddpm_cli.config import ModelConfig, Precision
    from ddpm_cli.model.forward import network
    from ddpm_cli.model.unet import UNet

    logger = logging.getLogger("torch.utils.cpp_extension")
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(handler)

    def compile(fn, mode=None):
        logger.warning("No CUDA runtime is found, using CUDA_HOME='%s'", "/usr/local/cuda")
        logger.warning("another line")
        return fn

    monkeypatch.setattr(torch, "compile", compile)
    try:
        model = UNet(ModelConfig(channels=32, channel_mult=(1, 2)))
        network(model, torch.device("cpu"), Precision.fp32, compile=True)
    finally:
        logger.removeHandler(handler)
    assert seen == ["another line"]


def test_the_default_precision_is_bf16_on_ampere_and_later_and_fp32_elsewhere(monkeypatch):
    from ddpm_cli.config import Precision
    from ddpm_cli.errors import ConfigError
    from ddpm_cli.model.forward import resolve_precision

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_precision(None, cpu) is Precision.fp32
    assert resolve_precision(Precision.bf16, cpu) is Precision.bf16
    asked = []

    def capability(device, major):
        asked.append(device)
        return (major, 0)

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d: capability(d, 8))
    assert resolve_precision(None, cuda) is Precision.bf16  # A100, H100 and later
    assert resolve_precision(Precision.fp32, cuda) is Precision.fp32
    # a T4 or V100 only emulates bf16 (torch.cuda.is_bf16_supported() says yes there)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d: capability(d, 7))
    assert resolve_precision(None, torch.device("cuda", 1)) is Precision.fp32
    assert asked[-1] == torch.device("cuda", 1)  # the device asked about, not the current one
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        resolve_precision(Precision.fp16, cpu)


@pytest.mark.parametrize(
    "amx, env, expected",
    [(True, "1", "bf16"), (True, None, "bf16"), (True, "0", "fp32"), (False, "1", "fp32"),
     (None, "1", "fp32")],
)  # fmt: skip
def test_the_cpu_default_precision_is_bf16_with_amx(monkeypatch, amx, env, expected):
    """AMX CPUs compute bf16 several times faster than fp32 (docs/benchmarks.md); elsewhere,
    or where torch cannot tell (None), or with DDPM_AMX_BF16=0, the CPU default is fp32."""
    import ddpm_cli.model.forward as forward
    from ddpm_cli import runtime
    from ddpm_cli.config import Precision

    monkeypatch.setattr(forward, "cpu_has_amx", lambda: amx)
    with runtime.use(runtime.from_env({} if env is None else {"DDPM_AMX_BF16": env})):
        assert forward.resolve_precision(None, torch.device("cpu")) is Precision(expected)
        assert forward.resolve_precision(Precision.fp32, torch.device("cpu")) is Precision.fp32


def test_sample_takes_the_devices_default_precision(runner, runs, tmp_path, monkeypatch):
    """Without --precision, `ddpm sample` samples at forward.default_precision (bf16 on a
    recent GPU); here the CPU is made to claim bf16 as its default."""
    import ddpm_cli.model.forward as forward
    from ddpm_cli.config import Precision

    monkeypatch.setattr(forward, "default_precision", lambda device: Precision.bf16)
    r = sample(runner, runs["v"] / "model.safetensors", "-n", 1, "-o", tmp_path, "--seed", 1)
    assert r.exit_code == 0, r.output
    text = text_chunks(tmp_path / "000000.png")
    assert text["ddpm:precision"] == "bf16" and "--precision bf16" in text["ddpm:command"]


def test_the_report_counts_one_image_in_the_singular(runner, runs, tmp_path):
    model = str(runs["v"] / "model.safetensors")
    for n, words in ((1, "1 image"), (2, "2 images")):
        r = runner.invoke(app, ["sample", model, "-n", str(n), "-o", str(tmp_path / str(n))])
        assert r.exit_code == 0, r.output
        report = " ".join(r.stderr.split())  # the console wraps long lines
        assert f"): {words}, " in report and f" {words} in " in report, report
