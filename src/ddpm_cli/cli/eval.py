"""`ddpm eval`: bits/dim on held-out images (--data) and FID/KID of samples (--fid-ref)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ddpm_cli.cli.common import (
    MAX_COUNT,
    BatchSizeOpt,
    DeviceOpt,
    JsonOpt,
    QuietOpt,
    RawOpt,
    deferred_interrupt,
    note_line,
    precision_option,
    seed_option,
    warning_line,
)
from ddpm_cli.cli.views import EvalProgress
from ddpm_cli.config import INCEPTION_WEIGHTS, MAX_TIMESTEPS
from ddpm_cli.errors import UsageError
from ddpm_cli.sampler_config import SamplerConfig, SamplerName, Variance
from ddpm_cli.text import count, shown

# options that only one measurement reads: given without it, each would be silently ignored
_DATA, _SAMPLES = ("--data",), ("--fid-ref", "--memorization")
_SCOPES = [("held_out", "--held-out", _DATA), ("limit", "--limit", _DATA),
           ("t_samples", "--t-samples", _DATA), ("full", "--full", _DATA),
           ("variance", "--variance", _DATA), ("num", "-n/--num", _SAMPLES),
           ("sampler", "--sampler", _SAMPLES), ("steps", "--steps", _SAMPLES),
           ("precision", "--precision", _SAMPLES),
           ("inception_weights", "--inception-weights", ("--fid-ref",)),
           ("ref_cache", "--ref-cache/--no-ref-cache", ("--fid-ref",))]  # fmt: skip


def eval_(
    ctx: typer.Context,
    checkpoint: Annotated[
        Path,
        typer.Argument(help="A model.safetensors written by ddpm train, or its run directory."),
    ],
    data: Annotated[
        str | None,
        typer.Option(
            "--data",
            help="Images the model did not train on (a folder, builtin:NAME or a data cache), "
            "or its own training data with --held-out: report the negative log-likelihood "
            "bound in bits/dim.",
            show_default=False,
        ),
    ] = None,
    memorization: Annotated[
        str | None,
        typer.Option(
            "--memorization",
            help="The training images (a folder, builtin:NAME or a run's data cache): report the "
            "share of -n samples closer to a training image than 95% of the training images are "
            "to their own nearest neighbour (about 0.05 for new images, 1 for copies).",
            show_default=False,
        ),
    ] = None,
    held_out: Annotated[
        bool,
        typer.Option(
            "--held-out",
            help="With --data: measure only the images the model's run set aside for its "
            "quality figure, never trained on (a test-set bound; --data is then the run's own "
            "image folder, data cache or built-in set).",
        ),
    ] = False,
    limit: Annotated[
        int | None,
        typer.Option(
            "--limit",
            max=MAX_COUNT,
            min=1,
            help="With --data: only the first N images (sorted; of the set-aside ones with "
            "--held-out).",
        ),
    ] = None,
    t_samples: Annotated[
        int | None,
        typer.Option(
            "--t-samples",
            max=MAX_TIMESTEPS,
            min=1,
            help="With --data: estimate the T-1 KL terms from K timesteps per image (unbiased, "
            "K+1 network evaluations per image instead of T). Default: as many as fit in about "
            "a minute of the bound's work (at least 16, on fewer images if need be; all T when "
            "they fit); the standard error is printed.",
            show_default=False,
        ),
    ] = None,
    full: Annotated[
        bool,
        typer.Option("--full", help="With --data: the whole bound, all T timesteps per image."),
    ] = False,
    variance: Annotated[
        Variance,
        typer.Option("--variance", help="With --data: sigma_t^2 of the reverse process."),
    ] = Variance.small,
    fid_ref: Annotated[
        str | None,
        typer.Option(
            "--fid-ref",
            help="Reference images (a folder, builtin:NAME or a data cache): report FID and KID "
            "of -n samples against all of them.",
            show_default=False,
        ),
    ] = None,
    num: Annotated[
        int,
        typer.Option(
            "--num",
            "-n",
            max=10_000_000,
            min=2,
            help="With --fid-ref or --memorization: samples to draw.",
        ),
    ] = 5000,
    inception_weights: Annotated[
        Path | None,
        typer.Option(
            "--inception-weights",
            help="The FID Inception-v3 weights as safetensors. Default: "
            f"{INCEPTION_WEIGHTS} in the user cache directory (ddpm/ under ~/.cache on Linux, "
            "~/Library/Caches on macOS).",
            show_default=False,
        ),
    ] = None,
    ref_cache: Annotated[
        bool,
        typer.Option("--ref-cache/--no-ref-cache", help="Cache the reference features."),
    ] = True,
    sampler: Annotated[
        SamplerName | None,
        typer.Option(
            "--sampler",
            help="With --fid-ref or --memorization: as in ddpm sample.",
            show_default=False,
        ),
    ] = SamplerConfig.sampler,
    steps: Annotated[
        int | None,
        typer.Option(
            "--steps",
            max=MAX_TIMESTEPS,
            min=1,
            help="With --fid-ref or --memorization: as in ddpm sample.",
        ),
    ] = SamplerConfig.steps,
    seed: seed_option("Seed of the noise and samples.") = 0,
    raw: RawOpt = False,
    batch_size: BatchSizeOpt = None,
    precision: precision_option(
        "With --fid-ref or --memorization: sampling precision (the bound is fp32)."
    ) = None,
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Measure a model: bits/dim on held-out images, FID and KID of its samples.

    The bound is the paper's (eq. 5): the prior term, the KL terms and the discretized decoder,
    on images resized as for training. FID uses the standard Inception-v3 features through
    torch-fidelity (pip install 'ddpm-cli\\[fid]') and weights from a local file.

    [dim]Examples:[/dim]

      [bold]ddpm eval runs/shapes-1 --data ./held-out --t-samples 50[/bold]

      [bold]ddpm eval model.safetensors --fid-ref ./train-images -n 10000[/bold]

      [bold]ddpm eval model.safetensors --data ./test --json | jq .likelihood.bits_per_dim[/bold]
    """
    measured = {"--data": data is not None, "--fid-ref": fid_ref is not None,
                "--memorization": memorization is not None}  # fmt: skip
    for name, flag, needs in _SCOPES:
        given = ctx.get_parameter_source(name).name == "COMMANDLINE"
        if given and not any(measured[m] for m in needs):
            way_out = ("drop it" if any(measured.values())  # else it is what was asked for
                       else "add it" if len(needs) == 1 else "add one")  # fmt: skip
            raise UsageError(f"{flag} applies to {' or '.join(needs)}, not given here; {way_out}")
    if not any(measured.values()):
        raise UsageError(
            "say what to measure: --data DIR (bits/dim), --fid-ref DIR (FID) and/or "
            "--memorization DIR (copies of training images)"
        )
    if full and t_samples is not None:
        raise UsageError("--full computes every timestep; drop --t-samples, or drop --full")

    with deferred_interrupt():
        from ddpm_cli.device import resolve_device
        from ddpm_cli.evaluation.evaluate import BUDGET_SECONDS, likelihood, sample_quality
        from ddpm_cli.evaluation.fid import check_weights
        from ddpm_cli.evaluation.memorization import memorization as copies
        from ddpm_cli.generation.sampling import check_model, load_for_sampling
        from ddpm_cli.model.forward import resolve_precision

    if fid_ref is not None:
        check_weights(inception_weights)
    dev = resolve_device(device)
    precision = resolve_precision(precision, dev)
    sm = load_for_sampling(checkpoint, raw=raw, device=dev)
    check_model(sm)
    T = sm.diffusion.timesteps
    if t_samples is not None and t_samples > T - 1:
        raise UsageError(f"--t-samples {t_samples}: at most T - 1 = {T - 1} (drop it for all T)")
    report: dict = {"checkpoint": str(sm.path), "content_hash": sm.content_hash}
    # the header waits for the first progress, so that bad input gets its one error line alone
    header = f"ddpm eval {sm.path} ({sm.weights} weights, step {sm.step}), {dev}"  # shown as is
    view = EvalProgress(quiet, header)
    try:
        if data is not None:
            report["likelihood"] = likelihood(
                sm, data, limit=limit, t_samples=t_samples, variance=variance.value,
                batch_size=batch_size, seed=seed, device=dev, progress=view.update,
                budget=None if full or t_samples is not None else BUDGET_SECONDS,
                held_out=held_out,
            )  # fmt: skip
            r = report["likelihood"]
            _warn_skipped(r, data, quiet)
            if r["training_images"] and not quiet:
                aside = f"; --held-out measures the {r['set_aside']} images its run set aside"
                note_line("these are the model's training images: a training-set bound"
                          + (aside if r["set_aside"] else ""))  # fmt: skip
        if fid_ref is not None:
            config = SamplerConfig(sampler=sampler, steps=steps)
            report["fid"] = sample_quality(
                sm, fid_ref, n=num, sampler=config, seed=seed, batch_size=batch_size,
                device=dev, precision=precision, weights=inception_weights,
                use_cache=ref_cache, progress=view.update,
            )  # fmt: skip
            _warn_skipped(report["fid"], fid_ref, quiet)
        if memorization is not None:
            config = SamplerConfig(sampler=sampler, steps=steps)
            report["memorization"] = copies(
                sm, memorization, n=num, sampler=config, seed=seed, batch_size=batch_size,
                device=dev, precision=precision, progress=view.update,
            )  # fmt: skip
            _warn_skipped(report["memorization"], memorization, quiet)
            if report["memorization"]["threshold"] == 0 and not quiet:
                warning_line("over 5% of the training images have an exact duplicate among "
                             "them, so the threshold is 0 and only exact copies count; remove "
                             "the duplicates for a share that finds near-copies")  # fmt: skip
    finally:
        view.close()
    if as_json:
        print(json.dumps(report, indent=2))
        return
    for line in summary_lines(report):
        print(line)


def _warn_skipped(result: dict, data: str, quiet: bool) -> None:
    """What of `data` could not be read: left out of the measurement, and said."""
    files, places = (result.get(k) or [] for k in ("skipped_files", "unsearched"))
    if (files or places) and not quiet:
        n = len(places)
        parts = [count(len(files), "unreadable file")] if files else []
        parts += [f"{n} folder{'s' * (n > 1)} or link{'s' * (n > 1)} it could not search"] * (n > 0)
        warning_line(f"left out of {data}: {' and '.join(parts)}; e.g. "
                     f"{(files or places)[0]['reason']}")  # fmt: skip


def summary_lines(report: dict) -> list[str]:
    from ddpm_cli.evaluation.fid import STANDARD_N

    lines = []
    if "likelihood" in report:
        r = report["likelihood"]
        how = (
            "full bound"
            if r["t_samples"] is None
            else (f"estimate from {r['t_samples']} t/image; --full for the whole bound")
        )
        which = "held-out images" if r.get("held_out") else "images"
        lines.append(
            f"bits/dim  {r['bits_per_dim']:.4f} ± {r['stderr']:.4f}  ({r['images']} {which} of "
            f"{shown(str(r['data']))}, {how}, variance {r['variance']})"
        )
        t = r["terms"]
        lines.append(
            f"  terms   prior L_T {t['prior']:.3g}, KL L_1..L_T-1 {t['kl']:.4f}, "
            f"decoder L_0 {t['decoder']:.4f}"
        )
    if "fid" in report:
        r = report["fid"]
        label = f"estimate from {r['samples']} samples" if r["estimate"] else f"{r['samples']}"
        s = r["sampler"]
        lines.append(
            f"FID       {r['fid']:.3f}  ({label}; papers use {STANDARD_N:,}; "
            f"{r['reference_images']} reference images)"
        )
        lines.append(
            f"KID       {r['kid']:.5f} ± {r['kid_std']:.5f}  ({s['sampler']} {s['steps']} steps, "
            f"seed {r['seed']})"
        )
    if "memorization" in report:
        r = report["memorization"]
        lines.append(
            f"copied    {r['copied_share']:.3f} of {r['samples']} samples closer to a training "
            f"image than 95% of the {r['training_images']} training images are to theirs "
            f"(new images: about {r['expected_share']:.2f}; median distance "
            f"{r['sample_distance_median']:.4f}, the data's {r['data_distance_median']:.4f})"
            + (f"; the {r['set_aside']} images the run set aside, never trained on, left out"
               if r.get("set_aside") else "")  # fmt: skip
        )
    return lines
