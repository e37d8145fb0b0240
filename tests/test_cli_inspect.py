"""`ddpm inspect`: checkpoints and run directories, as tables and JSON."""

from __future__ import annotations

import io
import json
import re

import pytest
import torch
from safetensors.torch import save_file

from conftest import draw_shapes, train_tiny
from ddpm_cli.cli import app
from ddpm_cli.config import DiffusionConfig, ModelConfig
from ddpm_cli.model.unet import UNet, count_parameters
from ddpm_cli.store.checkpoint import load_checkpoint


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect")
    diffusion = DiffusionConfig(schedule="cosine", timesteps=500)
    return train_tiny(root, 6, diffusion, seed=2, steps=3, sample_every=2, num_samples=4)


def inspect_json(runner, *args):
    r = runner.invoke(app, ["inspect", *map(str, args), "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_a_checkpoint_reports_its_model_diffusion_training_and_file(runner, run):
    path = run / "model.safetensors"
    info = inspect_json(runner, path)
    ckpt = load_checkpoint(path)
    model_config = ModelConfig(**{**ckpt.config["model"], "image_size": (8, 8)})
    expected = count_parameters(UNet(model_config))
    assert info["model"]["parameters"] == expected == sum(info["model"]["blocks"].values())
    assert {"down.0", "up.1", "temb.0", "conv_in"} <= set(info["model"]["blocks"])
    assert info["model"]["preset"] == "tiny" and info["model"]["channels"] == 32
    assert info["diffusion"] == {
        "schedule": "cosine",
        "timesteps": 500,
        "objective": "v",
        "default_sampler": "dpm++, 20 steps",
    }
    assert info["content_hash"] == ckpt.meta["content_hash"] and info["step"] == 3
    assert info["file_bytes"] == path.stat().st_size and info["kind"] == "model"
    assert info["training"]["batch_size"] == 4 and info["data"]["used"] == 6
    assert info["torch_version"] == torch.__version__  # a string, even where it looks numeric
    assert isinstance(info["safetensors_version"], str) and info["ddpm_version"]
    assert "tensors" not in info
    with_tensors = inspect_json(runner, path, "--tensors")["tensors"]
    assert {t["name"]: t["shape"] for t in with_tensors} == {
        k: list(v.shape) for k, v in ckpt.tensors.items()
    }


def test_a_checkpoint_whose_tensors_do_not_fit_its_config_is_flagged(runner, run, tmp_path):
    """A config edited (or written by another tool) so that the weights no longer fit: inspect
    still shows everything, and says what sampling would refuse."""
    ckpt = load_checkpoint(run / "model.safetensors")
    assert inspect_json(runner, run / "model.safetensors")["warnings"] == []
    config = {**ckpt.config, "model": {**ckpt.config["model"], "channels": 64}}
    bad = tmp_path / "bad.safetensors"
    save_file(ckpt.tensors, str(bad), {**ckpt.meta, "config": json.dumps(config)})
    info = inspect_json(runner, bad)
    assert len(info["warnings"]) == 1 and "of the wrong shape" in info["warnings"][0]
    assert info["model"]["channels"] == 64 and info["step"] == 3
    table = runner.invoke(app, ["inspect", str(bad)])
    words = " ".join(table.output.replace("│", " ").split())  # the table wraps long rows
    assert table.exit_code == 0 and "warning" in words and "cannot be sampled" in words
    sampled = runner.invoke(app, ["sample", str(bad), "-n", "1", "-o", str(tmp_path / "out")])
    assert sampled.exit_code == 2 and "of the wrong shape" in sampled.output


def test_the_model_table_says_how_the_timestep_enters_each_block(runner, run, tmp_path):
    """tiny adds it, as the paper does; small scales and shifts the norms with it
    (ModelConfig.scale_shift), which inspect and the pre-flight table say."""
    from ddpm_cli.config import TrainConfig
    from ddpm_cli.model.presets import build_model_config
    from ddpm_cli.store.checkpoint import save_checkpoint

    def row(path):
        shown = runner.invoke(app, ["inspect", str(path)]).stdout
        return " ".join(shown.replace("│", " ").split())

    assert "time embedding added before each block's second norm (the paper's)" in row(run)
    config = build_model_config("small", (16, 16), 3)
    assert config.scale_shift
    configs = {"model": config.to_dict(), "diffusion": DiffusionConfig().to_dict(),
               "training": TrainConfig(preset="small").to_dict()}  # fmt: skip
    path = tmp_path / "small.safetensors"
    save_checkpoint(path, UNet(config).state_dict(), "model", {"config": configs, "step": 1})
    assert inspect_json(runner, path)["warnings"] == []  # the weights fit the config
    assert "time embedding scales and shifts each block's second norm" in row(path)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(4):
        draw_shapes((16, 16)).save(folder / f"{i}.png")
    r = runner.invoke(app, ["train", str(folder), "--out", str(tmp_path / "r"), "--preset",
                            "small", "--steps", "1", "--device", "cpu"])  # fmt: skip
    assert r.exit_code == 0, r.output
    preflight = " ".join(r.output.replace("│", " ").split())
    assert "attention at 8, scale-shift norms" in preflight
    assert "scales and shifts" in row(tmp_path / "r")


def test_a_data_cache_shows_its_data_and_no_network(runner, run):
    info = inspect_json(runner, run / "data_cache.safetensors")
    assert info["kind"] == "data_cache" and not {"model", "diffusion", "training"} & set(info)
    assert info["data"]["used"] == 6 and info["data"]["image_size"] == [8, 8]
    table = runner.invoke(app, ["inspect", str(run / "data_cache.safetensors")])
    assert table.exit_code == 0 and "8x8, 3 channels" in table.output
    assert "model" not in table.output and "parameters" not in table.output


def test_a_run_directory_adds_progress_and_resumability(runner, run, tmp_path):
    info = inspect_json(runner, run)
    r = info["run"]
    assert r["resumable"] and r["resume"] == "at step 3"
    assert r["logged_steps"] == 3 and r["last"]["step"] == 3
    assert r["newest_grid"].endswith("step-0000003.png") and r["grids"] == 2
    assert "train_state.safetensors" in r["files"] and r["folders"] == ["samples"]
    assert r["processes"] == 1  # one process: no "trained by" row
    shown = runner.invoke(app, ["inspect", str(run)]).stdout
    assert "trained by" not in shown and "samples/" in shown
    state = inspect_json(runner, run / "train_state.safetensors")
    assert state["kind"] == "train_state"
    assert state["model"]["parameters"] == info["model"]["parameters"]
    # a copy without its train state cannot resume, and says why
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "model.safetensors").write_bytes((run / "model.safetensors").read_bytes())
    assert inspect_json(runner, tmp_path / "r")["run"]["resumable"] is False


def test_tables_on_the_terminal(runner, run):
    r = runner.invoke(app, ["inspect", str(run), "--tensors"])
    assert r.exit_code == 0, r.output
    n = inspect_json(runner, run)["model"]["parameters"]
    for text in ("parameters per block", f"{n:,}", "cosine", "resumable", "yes, at step 3",
                 f"torch {torch.__version__}",
                 "tensors", "conv_in.weight"):  # fmt: skip
        assert text in r.stdout, text
    # what ends the run, in words: no Python None for the length it was not given
    assert re.search(r"│ steps +│ 3 ", r.stdout) and "None" not in r.stdout
    assert not re.search(r"│ epochs ", r.stdout)


def test_bad_input_is_one_line(runner, tmp_path):
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    (tmp_path / "empty").mkdir()
    draw_shapes((8, 8)).save(tmp_path / "photo.jpg")
    for path, message in (
        (tmp_path / "missing.safetensors", "no such checkpoint file, run directory or image"),
        (foreign, "not a ddpm checkpoint"),
        (tmp_path / "empty", "no readable images found"),
        (tmp_path / "photo.jpg", "photo.jpg: is an image, not a checkpoint"),
    ):
        r = runner.invoke(app, ["inspect", str(path)])
        assert r.exit_code == 2, r.output
        (line,) = r.stderr.strip().splitlines()
        assert message in line and r.stdout == ""


def test_an_option_for_another_kind_of_subject_is_refused_not_ignored(runner, run, tmp_path):
    """-T is for --schedule, --image-size for image folders, --tensors for checkpoints and runs:
    given elsewhere, each would be silently ignored; it is refused, naming what it applies to."""
    (tmp_path / "pics").mkdir()
    draw_shapes((8, 8)).save(tmp_path / "pics" / "a.png")
    cases = [
        ([run, "-T", "50"], "--timesteps applies to --schedule, not to a run directory"),
        ([run / "model.safetensors", "--image-size", "32"],
         "--image-size applies to an image folder, not to a checkpoint; drop it"),
        # an image given for its folder: the option is refused for what the path is
        ([tmp_path / "pics" / "a.png", "--image-size", "32"],
         "--image-size applies to an image folder, not to a file; drop it"),
        ([tmp_path / "pics", "--tensors"],
         "--tensors applies to a checkpoint or run, not to an image folder"),
        ([tmp_path / "pics", "--timesteps", "50"], "--timesteps applies to --schedule, not to an"),
        (["--schedule", "linear", "--image-size", "8"],
         "--image-size applies to an image folder, not to --schedule"),
    ]  # fmt: skip
    for args, message in cases:
        r = runner.invoke(app, ["inspect", *map(str, args)])
        assert r.exit_code == 2, r.output
        (line,) = r.stderr.strip().splitlines()
        assert message in line and r.stdout == "", (args, line)
    # where each belongs, it is used
    assert inspect_json(runner, "--schedule", "linear", "-T", "50")["timesteps"] == 50
    assert inspect_json(runner, "--schedule", "linear")["timesteps"] == 1000
    assert inspect_json(runner, tmp_path / "pics", "--image-size", "16")["image_size"] == [16, 16]
    r = runner.invoke(app, ["inspect", str(tmp_path / "pics" / "a.png"), "--tensors"])
    assert r.exit_code == 2 and "is an image, not a checkpoint" in r.stderr  # --tensors may pass


def test_an_image_folder_gets_the_training_preflight_report(runner, tmp_path):
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    for i in range(3):
        draw_shapes((20 + i, 10)).save(folder / f"{i}.png")
    draw_shapes((40, 30), "L").save(folder / "sub" / "gray.jpg")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    r = runner.invoke(app, ["inspect", str(folder), "--image-size", "16", "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert (info["found"], info["used"], info["skipped"]) == (5, 4, 1)
    assert info["modes"] == {"RGB": 3, "L": 1} and info["channels"] == 3
    assert info["bytes"] == 4 * 3 * 16 * 16 and info["max_size"] == [40, 30]
    assert info["skipped_files"][0]["path"].endswith("broken.png")
    assert any("only 4 images" in w for w in info["warnings"])
    table = runner.invoke(app, ["inspect", str(folder)])
    assert table.exit_code == 0 and "4 readable of 5 found, 1 skipped" in table.stdout
    assert table.stdout.count("│ skipped") == 1 and "warning" in table.stdout  # the reason row


def test_schedules_side_by_side_against_a_plain_python_recomputation(runner, run):
    r = runner.invoke(
        app, ["inspect", "--schedule", "linear", "--schedule", "cosine", "-T", "200", "--json"]
    )
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["timesteps"] == 200 and list(info["schedules"]) == ["linear", "cosine"]
    rows = info["schedules"]["linear"]
    assert [row["t"] for row in rows] == [0, 2, 10, 20, 50, 100, 149, 179, 199]
    # linear betas rescaled by 1000/T from 1e-4..0.02, alpha_bar their running product
    lo, hi = 1e-4 * 1000 / 200, 0.02 * 1000 / 200
    betas = [lo + (hi - lo) * i / 199 for i in range(200)]
    for row in rows:
        ab = 1.0
        for b in betas[: row["t"] + 1]:
            ab *= 1 - b
        assert abs(row["alpha_bar"] - ab) < 1e-12 and abs(row["beta"] - betas[row["t"]]) < 1e-12
        assert abs(row["snr"] - ab / (1 - ab)) < 1e-9 * max(1.0, row["snr"])
    table = runner.invoke(app, ["inspect", "--schedule", "cosine"])
    assert table.exit_code == 0 and "cosine alpha_bar" in table.stdout
    for args in ([], [str(run), "--schedule", "linear"]):
        bad = runner.invoke(app, ["inspect", *args])
        assert bad.exit_code == 2 and "give a PATH" in bad.stderr


def _has_colour(img, rgb, tol=30) -> bool:
    colours = [c for _, c in img.getcolors(maxcolors=1 << 24)]
    return any(all(abs(a - b) <= tol for a, b in zip(c, rgb, strict=True)) for c in colours)


TAB_BLUE, TAB_ORANGE, TAB_GREEN = (31, 119, 180), (255, 127, 14), (44, 160, 44)


def test_loss_curve_in_the_terminal_and_as_a_plot(runner, run, tmp_path):
    from PIL import Image

    from ddpm_cli.cli.views import loss_curve

    line = loss_curve([{"step": s, "loss": 1.0 / s} for s in range(1, 101)])
    spark = line.split("[cyan]")[1].split("[/cyan]")[0]
    assert len(spark) == 60 and spark[0] == "█" and spark[-1] == "▁"
    assert list(spark) == sorted(spark, reverse=True)  # falling loss, falling bars
    assert "1 at step 1" in line and "0.01 at step 100" in line
    r = runner.invoke(app, ["inspect", str(run), "--plot", str(tmp_path / "loss.png")])
    assert r.exit_code == 0, r.output
    assert "loss (log scale)" in r.stdout
    img = Image.open(tmp_path / "loss.png").convert("RGB")
    assert img.size == (900, 624)
    # the loss in black and one line per quarter of the timesteps (matplotlib's first colours)
    assert (
        _has_colour(img, (0, 0, 0)) and _has_colour(img, TAB_BLUE) and _has_colour(img, TAB_GREEN)
    )
    again = runner.invoke(app, ["inspect", str(run), "--plot", str(tmp_path / "loss.png")])
    assert again.exit_code == 2 and "--overwrite" in again.stderr


def test_a_plot_of_one_logged_step_shows_its_points(tmp_path):
    """One point makes no line: the loss and the learning rate are drawn as markers then
    (before, the plot of a run that had logged one step showed neither)."""
    from PIL import Image

    from ddpm_cli.evaluation.plots import loss_plot

    def grey(metrics) -> int:  # pixels of the learning rate's colour (tab:gray)
        img = Image.open(io.BytesIO(loss_plot(metrics))).convert("RGB")
        return sum(n for n, c in img.getcolors(1 << 24) if all(abs(v - 127) <= 3 for v in c))

    # against the same plot without a learning rate: the point adds a marker's pixels
    assert grey([{"step": 1, "loss": 0.5, "lr": 1e-3}]) > grey([{"step": 1, "loss": 0.5}]) + 20


def test_schedule_plot_draws_one_line_per_schedule(runner, tmp_path):
    from PIL import Image

    from ddpm_cli.evaluation.inspection import schedule_curves, schedule_info

    curves = schedule_curves(["linear"], 100)["linear"]
    for row in schedule_info(["linear"], 100)["schedules"]["linear"]:
        assert curves["alpha_bar"][row["t"]] == pytest.approx(row["alpha_bar"], rel=1e-12)
        assert curves["log_snr"][row["t"]] == pytest.approx(row["log_snr"], rel=1e-9)
    out = tmp_path / "s.png"
    args = ["inspect", "--schedule", "linear", "--schedule", "cosine", "--plot", str(out)]
    assert runner.invoke(app, args).exit_code == 0
    img = Image.open(out).convert("RGB")
    assert _has_colour(img, TAB_BLUE) and _has_colour(img, TAB_ORANGE)
    assert not _has_colour(img, TAB_GREEN, tol=10)  # two schedules, two colours


def test_plot_errors(runner, run, tmp_path, monkeypatch):
    cases = (
        ([str(run), "--plot", str(tmp_path / "loss.jpg")], "written as .png, .svg, .pdf"),
        ([str(run / "model.safetensors"), "--plot", str(tmp_path / "a.png")], "not a run dir"),
        ([str(run), "--plot", str(tmp_path / "no" / "a.png")], "does not exist"),
    )
    for args, message in cases:
        r = runner.invoke(app, ["inspect", *args])
        assert r.exit_code == 2 and message in r.stderr, r.output
    monkeypatch.setitem(__import__("sys").modules, "matplotlib.figure", None)
    r = runner.invoke(app, ["inspect", str(run), "--plot", str(tmp_path / "a.png")])
    assert r.exit_code == 2 and "pip install 'ddpm-cli[plot]'" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "a.png").exists()


def test_what_ends_a_run_reads_as_its_options(runner, run):
    """A --time run shows its limit as it is typed (1h30m), no default epochs beside it; a
    run given nothing shows the default 100 epochs; a limit that is not a number is left out."""
    from rich.console import Console

    from ddpm_cli.cli.reports import tables

    info = inspect_json(runner, run / "model.safetensors")

    def rows(**training):
        console = Console(width=200, record=True, file=io.StringIO())
        for table in tables({**info, "training": {**info["training"], **training}}, False):
            console.print(table)
        return console.export_text()

    timed = rows(steps=None, epochs=None, time_limit=5400.0)
    assert re.search(r"│ time limit +│ 1h30m ", timed) and not re.search(r"│ epochs ", timed)
    plain = rows(steps=None, epochs=None, time_limit=None)
    assert re.search(r"│ epochs +│ 100 ", plain) and "time limit" not in plain
    hostile = rows(steps=None, epochs=None, time_limit="soon")
    assert "time limit" not in hostile and "soon" not in hostile
