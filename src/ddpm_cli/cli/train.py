"""`ddpm train`: train the paper's U-Net on a folder of images or the built-in dataset."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from ddpm_cli.cli.common import (
    MAX_COUNT,
    DeviceOpt,
    QuietOpt,
    TimestepsOpt,
    deferred_interrupt,
    open_range,
    precision_option,
    print_path,
    seed_option,
)
from ddpm_cli.cli.stopping import Stopper
from ddpm_cli.cli.train_data import (
    ChannelsOpt,
    CondDropOpt,
    DataCacheOpt,
    FlipOpt,
    HoldoutOpt,
    ImageSizeOpt,
    ShiftOpt,
    StreamOpt,
    UnconditionalOpt,
    WorkersOpt,
)
from ddpm_cli.cli.views import ProgressView
from ddpm_cli.config import (
    DEFAULT_EPOCHS,
    DiffusionConfig,
    LogTo,
    Objective,
    Schedule,
    TrainConfig,
)
from ddpm_cli.model.presets import PRESETS
from ddpm_cli.text import parse_duration

D = TrainConfig()  # the one source of defaults

# the model presets as a closed set of choices, so that --help and completion list them
PresetName = Enum("PresetName", {name: name for name in ("auto", *PRESETS)}, type=str)
AUTO = PresetName(D.preset)


def train(
    ctx: typer.Context,
    data: Annotated[
        str | None,
        typer.Argument(
            help="Folder of images (searched recursively), builtin:NAME, or an earlier run's "
            "data_cache.safetensors. Default: the built-in 'shapes' dataset."
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Run directory. Default: runs/NAME-N.")
    ] = None,
    resume: Annotated[
        Path | None,
        typer.Option(
            "--resume", help="Continue the run in this directory exactly where it stopped."
        ),
    ] = None,
    preset: Annotated[
        PresetName,
        typer.Option(
            "--preset",
            help="Model. auto: the paper's CIFAR-10 network up to 64 px on a GPU, small on a "
            "CPU (tiny at 16 px and below).",
        ),
    ] = AUTO,
    image_size: ImageSizeOpt = None,
    channels: ChannelsOpt = D.channels,
    flip: FlipOpt = D.flip,
    shift: ShiftOpt = D.shift,
    stream: StreamOpt = D.stream,
    workers: WorkersOpt = D.workers,
    data_cache: DataCacheOpt = D.data_cache,
    objective: Annotated[
        Objective,
        typer.Option(
            "--objective",
            help="What the network predicts: v (default; docs/training.md says why), "
            "eps (the paper's L_simple) or x0.",
        ),
    ] = D.objective,
    min_snr_gamma: Annotated[
        float | None,
        typer.Option(
            "--min-snr-gamma", min=0.0, max=1000.0, callback=open_range,
            help="Min-SNR-gamma loss weighting (e.g. 5).",  # fmt: skip
        ),
    ] = D.min_snr_gamma,
    unconditional: UnconditionalOpt = D.unconditional,
    cond_drop: CondDropOpt = D.cond_drop,
    lr: Annotated[
        float | None,
        typer.Option(
            "--lr",
            min=0.0,
            callback=open_range,
            max=10.0,
            help="Adam learning rate. Default: 1e-3 for the CPU presets (small, tiny, medium), "
            "the paper's 2e-4 for cifar10, celebahq256 and lsun256.",
            show_default=False,
        ),
    ] = D.lr,
    warmup_steps: Annotated[
        int | None,
        typer.Option(
            "--warmup-steps",
            max=MAX_COUNT,
            min=0,
            help="Linear warm-up steps. Default: 100 for the CPU presets, the paper's 5000 for "
            "its networks; at most 5% of a run of known length (for the CPU presets, of a "
            "--time budget too).",
            show_default=False,
        ),
    ] = D.warmup_steps,
    cooldown: Annotated[
        float | None,
        typer.Option(
            "--cooldown",
            min=0.0,
            max=1.0,
            help="The share of the run (--steps, --epochs or --time) at its end over which the "
            "learning rate falls linearly to 0. Default: 0.3 for the CPU presets, 0 (constant, "
            "the paper's) for its networks.",
            show_default=False,
        ),
    ] = D.cooldown,
    ema_decay: Annotated[
        float,
        typer.Option(
            "--ema-decay",
            min=0.0,
            callback=open_range,
            max=1.0,
            help="The EMA's largest decay; before it, a power-function EMA over the last 6% "
            "of the run.",
        ),
    ] = D.ema_decay,
    batch_size: Annotated[
        int | None,
        typer.Option(
            "--batch-size",
            "-b",
            max=65_536,
            min=1,
            help="Images per step. Default: 128 on CUDA, else 32.",
        ),
    ] = D.batch_size,
    grad_accum: Annotated[
        int,
        typer.Option("--grad-accum", max=65_536, min=1, help="Micro-batches per optimizer step."),
    ] = D.grad_accum,
    grad_checkpoint: Annotated[
        bool,
        typer.Option(
            "--grad-checkpoint",
            help="Recompute each residual block's activations in the "
            "backward pass: about a third of the activation memory for 15% more time.",
        ),
    ] = D.grad_checkpoint,
    epochs: Annotated[
        int | None,
        typer.Option("--epochs", max=MAX_COUNT, min=1,
                     help=f"Passes over the data (default {DEFAULT_EPOCHS})."),
    ] = D.epochs,
    steps: Annotated[
        int | None,
        typer.Option(
            "--steps",
            max=MAX_COUNT,
            min=1,
            help="Optimizer steps; the first limit reached ends training.",
        ),
    ] = D.steps,
    time_limit: Annotated[
        str | None,
        typer.Option(
            "--time",
            help="Train for this long (e.g. 90s, 10m, 2h, 1h30m), then checkpoint and stop; "
            "the schedules are planned for it. The first limit reached ends training.",
            show_default=False,
        ),
    ] = None,
    seed: seed_option("Seed. Default: random, stored in the run.") = D.seed,
    precision: precision_option() = D.precision,
    compile: Annotated[
        bool | None,
        typer.Option(
            "--compile/--no-compile",
            help="torch.compile the model (CUDA graphs on CUDA). Default: on CUDA for runs of "
            "10000 steps or more, where the minutes of compiling pay off.",
        ),
    ] = D.compile,
    device: DeviceOpt = D.device,
    schedule: Annotated[
        Schedule | None,
        typer.Option(
            "--schedule",
            help="Beta schedule of the forward process. Default: cosine for the CPU presets "
            "(small, tiny, medium), linear (the paper's) for the paper's networks.",
        ),
    ] = None,
    timesteps: TimestepsOpt = DiffusionConfig.timesteps,
    sample_every: Annotated[
        int,
        typer.Option(
            "--sample-every", max=MAX_COUNT, min=0, help="Steps between sample grids (0: never)."
        ),
    ] = D.sample_every,
    init: Annotated[
        str | None,
        typer.Option(
            "--init",
            help="Fine-tune: start from this checkpoint's or run's weights (one of "
            "ddpm's, or made by ddpm import), keeping its architecture, schedule and objective.",
            show_default=False,
        ),
    ] = D.init,
    checkpoint_every: Annotated[
        int,
        typer.Option("--checkpoint-every", max=MAX_COUNT, min=1, help="Steps between checkpoints."),
    ] = D.checkpoint_every,
    keep: Annotated[
        int | None,
        typer.Option(
            "--keep",
            max=MAX_COUNT,
            min=1,
            help="Also keep the N newest step-numbered snapshots, "
            "model-00050000.safetensors (one per --checkpoint-every; ddpm sample RUN --step K).",
            show_default=False,
        ),
    ] = D.keep,
    eval_every: Annotated[
        int | None,
        typer.Option(
            "--eval-every",
            max=MAX_COUNT,
            min=0,
            help="Steps between quality figures (the loss on images set aside from training; "
            "the lowest yet is saved as best.safetensors). Default: at every checkpoint; "
            "0: never.",
            show_default=False,
        ),
    ] = D.eval_every,
    holdout: HoldoutOpt = D.holdout,
    log: Annotated[
        list[LogTo] | None,
        typer.Option(
            "--log",
            help="Also log live to tensorboard (under RUN/tensorboard/; the tensorboard "
            "extra) or wandb (Weights & Biases; WANDB_MODE=offline keeps it local): losses, "
            "learning rate, throughput, the quality figure, sample grids. Repeatable.",
            show_default=False,
        ),
    ] = None,
    log_every: Annotated[
        int, typer.Option("--log-every", max=MAX_COUNT, min=1, help="Steps between metrics lines.")
    ] = D.log_every,
    num_samples: Annotated[
        int, typer.Option("--num-samples", max=1024, min=1, help="Images in each sample grid.")
    ] = D.num_samples,
    quiet: QuietOpt = False,
) -> None:
    """Train the paper's U-Net on a folder of images.

    Writes a run directory with [bold]model.safetensors[/bold] (EMA weights and the full
    config: all [bold]ddpm sample[/bold] needs), the resumable train state, sample grids and
    metrics.jsonl. Ctrl-C saves a checkpoint and stops; [bold]--resume[/bold] continues.

    [dim]Examples:[/dim]

      [bold]ddpm train --steps 2000[/bold]

      [bold]ddpm train ./images --epochs 100 --image-size 64[/bold]

      [bold]ddpm train ./images --time 10m[/bold]

      [bold]ddpm train --resume runs/images-1 --steps 20000[/bold]
    """
    names = [p.name for p in ctx.command.params if p.name in TrainConfig.__dataclass_fields__]
    values = {k: v for k, v in locals().items() if k in names}
    values["preset"] = preset.value
    values["log"] = tuple(log or ())
    if time_limit is not None:
        values["time_limit"] = parse_duration(time_limit)
    given = {k: v for k, v in values.items() if ctx.get_parameter_source(k).name == "COMMANDLINE"}
    config = TrainConfig(**values)
    diffusion = DiffusionConfig(schedule=schedule, timesteps=timesteps)
    for key in ("schedule", "timesteps"):
        if ctx.get_parameter_source(key).name == "COMMANDLINE":
            given[key] = locals()[key]

    with deferred_interrupt():
        from ddpm_cli import distributed
        from ddpm_cli.training.run import train as run_training

    quiet = quiet or not distributed.env_main()  # in a torchrun job, rank 0 speaks
    view = ProgressView(quiet)
    stop = Stopper(view.event, resume, speaks=distributed.env_main())
    stop.install()
    try:
        result = run_training(data, config, diffusion, out=out, resume=resume, given=given,
                              on_event=stop.show, should_stop=stop.requested,
                              quiet=quiet)  # fmt: skip
    except Exception as e:
        error = stop.out_of(e)  # the machine ran out: say what is saved, and what to try
        if error is None:
            raise
        raise error from None
    finally:
        try:
            view.close()
        except OSError:
            stop.lost_output()
        stop.restore()
    if (result.out / "model.safetensors").exists() and distributed.env_main():
        print_path(result.out / "model.safetensors")
    if result.status == "stopped" or stop.signalled():  # a Ctrl-C during the last step
        raise typer.Exit(stop.exit_code())  # still stops `ddpm train ... && ddpm sample ...`
