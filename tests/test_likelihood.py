"""The variational bound in bits/dim, against closed forms on Gaussian data."""

from __future__ import annotations

import math

import pytest
import torch

from ddpm_cli.config import DiffusionConfig
from ddpm_cli.data.folders import InMemory
from ddpm_cli.diffusion.process import (
    discretized_gaussian_log_likelihood,
    prior_bpd,
    q_sample,
    reverse_log_variance,
    vb_terms_bpd,
)
from ddpm_cli.diffusion.schedules import DiffusionTables
from ddpm_cli.evaluation.likelihood import bound, evaluations, image_batches, strata

MU, S = 0.1, 0.2  # every pixel of the "images" is N(MU, S^2), quantized to 256 levels
LN2 = math.log(2.0)


@pytest.fixture(scope="module")
def tables():
    return DiffusionTables.from_config(DiffusionConfig(schedule="linear", timesteps=1000))


def gaussian_images(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = MU + S * torch.randn(n, 3, 8, 8, generator=g, dtype=torch.float64)
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def to_unit(images: torch.Tensor) -> torch.Tensor:
    return images.double() / 127.5 - 1.0


def true_nll_bits(x0: torch.Tensor) -> torch.Tensor:
    """-log2 P(x_0) per image and dimension: the data's own law, N(MU, S^2) on the bins."""
    mean, log_var = torch.full_like(x0, MU), torch.full_like(x0, 2 * math.log(S))
    return -discretized_gaussian_log_likelihood(x0, mean, log_var).mean(dim=(1, 2, 3)) / LN2


def exact_eps(tables: DiffusionTables):
    """E[eps | x_t] for Gaussian data, in closed form: the best possible eps-prediction network."""
    ab = tables.alpha_bar

    def network(xt, t):
        a = ab[t].reshape(-1, 1, 1, 1).to(xt)
        return (1 - a).sqrt() * (xt - a.sqrt() * MU) / (a * S * S + 1 - a)

    return network


def true_reverse_variance(tables: DiffusionTables) -> torch.Tensor:
    """Var(x_{t-1} | x_t) per zero-based t for Gaussian data (x_{-1} = x_0): jointly Gaussian, so
    Var(x_{t-1}) - Cov(x_{t-1}, x_t)^2 / Var(x_t) with Cov = sqrt(alpha_t) Var(x_{t-1})."""
    var_t = tables.alpha_bar * S * S + 1 - tables.alpha_bar
    var_prev = torch.cat([torch.tensor([S * S], dtype=torch.float64), var_t[:-1]])
    return var_prev - tables.alphas * var_prev**2 / var_t


def test_a_discretized_gaussian_puts_all_its_mass_on_the_256_bins():
    levels = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    for mean, std in ((0.0, 0.3), (0.97, 0.01), (-1.3, 0.5), (0.2, 1e-4)):
        ll = discretized_gaussian_log_likelihood(
            levels, torch.full_like(levels, mean), torch.full_like(levels, 2 * math.log(std))
        )
        assert float(ll.exp().sum()) == pytest.approx(1.0, abs=1e-9)
        # away from the edges a bin's mass is the CDF difference over its width
        k = 100
        lo, hi = (levels[k] - 1 / 255 - mean) / std, (levels[k] + 1 / 255 - mean) / std
        want = 0.5 * (math.erf(hi / math.sqrt(2)) - math.erf(lo / math.sqrt(2)))
        if want > 1e-300:
            assert float(ll[k]) == pytest.approx(math.log(want), rel=1e-6)


def test_the_prior_term_is_about_1e_5_bits_per_dim_for_the_linear_schedule(tables):
    # uniform intensities: E[x^2] over the 256 levels
    x0 = to_unit(torch.arange(256, dtype=torch.uint8).repeat(4, 3, 1).reshape(4, 3, 16, 16))
    ab = float(tables.alpha_bar[-1])
    ex2 = float(x0.pow(2).mean())
    closed = 0.5 * (ab * ex2 - ab - math.log(1 - ab)) / LN2  # KL(N(sqrt(ab) x, 1-ab) || N(0, 1))
    got = prior_bpd(tables, x0)
    assert torch.allclose(got, torch.full_like(got, closed), rtol=1e-9)
    assert 5e-6 < closed < 2e-5  # the paper: L_T is about 1e-5 bits/dim


def test_with_the_exact_reverse_process_the_bound_is_the_data_nll(tables):
    """Exact mean and variance of q(x_{t-1} | x_t): the joint of the model is the forward joint,
    so the bound equals -log2 P(x_0), up to the quantization of x_0 (measured: 0.015 bits)."""
    g = torch.Generator().manual_seed(1)
    x0 = to_unit(gaussian_images(256))
    log_var = true_reverse_variance(tables).log()
    network = exact_eps(tables)
    total = prior_bpd(tables, x0)
    for t in range(tables.timesteps):
        tt = torch.full((x0.shape[0],), t)
        xt = q_sample(tables, x0, tt, torch.randn(x0.shape, generator=g, dtype=torch.float64))
        x0_pred = (xt - (1 - tables.alpha_bar[t]).sqrt() * network(xt, tt)) / tables.alpha_bar[
            t
        ].sqrt()
        total += vb_terms_bpd(tables, x0, xt, tt, x0_pred, log_var)
    gap = total - true_nll_bits(x0)
    assert float(gap.mean()) == pytest.approx(0.0, abs=0.035)
    assert float(gap.std() / 16) < 0.01


@pytest.mark.parametrize("variance", ["large", "small"])
def test_a_fixed_variance_costs_exactly_its_gaussian_kl(tables, variance):
    """With the exact eps, a fixed sigma_t^2 costs sum_{t>1} KL(N(0, v_t) || N(0, sigma_t^2))
    over the true reverse variances v_t: closed form. Both runs draw the same noise, and share
    the decoder's sigma_1^2 (the decoder is discretized, so it has no such closed form)."""
    images = gaussian_images(64, seed=2)
    sigma2 = reverse_log_variance(tables, variance).exp()
    v = true_reverse_variance(tables)
    v[0] = sigma2[0]

    def run(var):
        return bound(
            exact_eps(tables.to(dtype=torch.float32)), "eps", tables,
            image_batches(InMemory(images), 64, 64), variance=var,
            generator=torch.Generator().manual_seed(3), device=torch.device("cpu"),
        )  # fmt: skip

    fixed, exact = run(variance), run(v.log())
    kl_gap = float((0.5 * (v / sigma2 - 1 - torch.log(v / sigma2))).sum() / LN2)
    assert kl_gap > (0.005 if variance == "large" else 0.5)  # a real difference to detect
    gap = fixed.per_image - exact.per_image
    assert float(gap.mean()) == pytest.approx(kl_gap, rel=0.05, abs=0.002)
    # and the exact process is within the quantization gap of the data's NLL
    assert float((exact.per_image - true_nll_bits(to_unit(images))).mean()) < 0.15
    assert fixed.bits_per_dim == pytest.approx(fixed.prior + fixed.decoder + fixed.kl)
    assert fixed.per_t is not None and len(fixed.per_t) == 1000
    assert sum(fixed.per_t) + fixed.prior == pytest.approx(fixed.bits_per_dim, rel=1e-9)
    assert exact.to_dict()["variance"] == "custom" and fixed.to_dict()["variance"] == variance


def test_the_sampled_estimate_is_unbiased(tables):
    images = gaussian_images(64, seed=4)
    network = exact_eps(tables.to(dtype=torch.float32))

    def run(k, seed):
        return bound(
            network, "eps", tables, image_batches(InMemory(images), 64, 64), t_samples=k,
            generator=torch.Generator().manual_seed(seed), device=torch.device("cpu"),
        )  # fmt: skip

    full = run(None, 0)
    runs = [run(8, s) for s in range(1, 17)]  # 16 x 8 strata per image
    estimates = torch.stack([r.per_image for r in runs])
    # one run's mean over 64 images has a spread of about 0.07 bits (measured)
    assert float((estimates.mean(0) - full.per_image).mean()) == pytest.approx(0.0, abs=0.05)
    assert float(estimates.mean(1).std()) < 0.15
    assert abs(sum(r.decoder for r in runs) / 16 - full.decoder) < 0.02  # always computed
    assert evaluations(64, 1000, 8) == 64 * 9 and evaluations(64, 1000, None) == 64 * 1000


def test_strata_cover_every_kl_timestep_once():
    for T, k in ((1000, 8), (1000, 999), (10, 3), (4, 3)):
        ranges = strata(T, k)
        covered = [t for lo, hi in ranges for t in range(lo, hi)]
        assert covered == list(range(1, T)) and len(ranges) == k


def test_strata_even_in_log_t_make_the_estimate_far_less_noisy(tables, monkeypatch):
    # likelihood.strata's reason to exist: equal ranges in t would put most of the bound in one
    # stratum, and a K = 20 estimate would spread about 40x wider on Gaussian data
    images = gaussian_images(32, seed=5)
    network = exact_eps(tables.to(dtype=torch.float32))

    def spread() -> float:
        runs = [
            bound(network, "eps", tables, image_batches(InMemory(images), 32, 32), t_samples=20,
                  generator=torch.Generator().manual_seed(s), device=torch.device("cpu")).per_image
            for s in range(8)
        ]  # fmt: skip
        return float(torch.stack(runs).std(0).mean())

    in_log_t = spread()
    even = [(1 + i * 999 // 20, 1 + (i + 1) * 999 // 20) for i in range(20)]
    monkeypatch.setattr("ddpm_cli.evaluation.likelihood.strata", lambda T, k: even)
    assert spread() > 10 * in_log_t


def test_the_default_budget_plan():
    """eval's default: as many timesteps per image as fit the budget; the full bound when all
    T fit; at least MIN_T_SAMPLES, on fewer images, when not even those fit (issue 27)."""
    from ddpm_cli.evaluation.evaluate import MIN_IMAGES, MIN_T_SAMPLES, budget_plan

    # 60 s at 1 ms per image and timestep: 60,000 evaluations over 100 images, 600 each
    assert budget_plan(100, 1000, 1e-3, 60.0) == (599, 100)
    assert budget_plan(100, 1000, 1e-6, 60.0) == (None, 100)  # all T fit: the whole bound
    # 10 ms: 6,000 evaluations; 10,000 images get MIN_T_SAMPLES each on 352 of them
    assert budget_plan(10_000, 1000, 1e-2, 60.0) == (MIN_T_SAMPLES, 6000 // (MIN_T_SAMPLES + 1))
    assert budget_plan(10_000, 1000, 1.0, 60.0) == (MIN_T_SAMPLES, MIN_IMAGES)  # the floor
    assert budget_plan(10, 1000, 1.0, 60.0) == (MIN_T_SAMPLES, 10)  # never more than there are
    # a chain of T <= MIN_T_SAMPLES + 1 steps: every timestep, on as many images as fit
    assert budget_plan(10_000, 10, 1e-2, 60.0) == (None, 600)


def test_the_budget_times_the_bounds_arithmetic_as_well_as_the_network(tmp_path, monkeypatch):
    """For a small model the bound's float64 terms cost about as much as the network: timing the
    network alone overran the minute about twice. Here each term's arithmetic is made to take
    20 ms, far longer than the network: the time per evaluation must include it."""
    import time

    from conftest import train_tiny
    from ddpm_cli.evaluation import evaluate, likelihood
    from ddpm_cli.generation.sampling import load_for_sampling

    run = train_tiny(tmp_path, 8, diffusion=DiffusionConfig(timesteps=50))
    sm = load_for_sampling(run)
    real = likelihood.vb_terms_bpd

    def slow(*args):
        time.sleep(0.02)
        return real(*args)

    monkeypatch.setattr(likelihood, "vb_terms_bpd", slow)
    batch = 4
    assert evaluate.seconds_per_evaluation(sm, batch, torch.device("cpu")) >= 0.02 / batch
    # T = 1: no KL terms to sample, the decoder term is the whole bound (and is timed)
    (tmp_path / "one").mkdir()
    one = train_tiny(tmp_path / "one", 8, diffusion=DiffusionConfig(timesteps=1))
    sm = load_for_sampling(one)
    assert evaluate.seconds_per_evaluation(sm, batch, torch.device("cpu")) >= 0.02 / batch


def test_eval_defaults_to_a_budget_and_full_is_one_flag_away(runner, tmp_path, monkeypatch):
    import json

    from conftest import train_tiny
    from ddpm_cli.cli import app
    from ddpm_cli.evaluation import evaluate

    run = train_tiny(tmp_path, 8, diffusion=DiffusionConfig(timesteps=200))
    monkeypatch.setattr(evaluate, "seconds_per_evaluation", lambda *a: 60.0 / 800)  # a slow net
    args = ["eval", str(run), "--data", str(tmp_path / "pics"), "--json"]
    lik = json.loads(runner.invoke(app, args).stdout)["likelihood"]
    assert lik["t_samples"] == 800 // 8 - 1 and lik["images"] == 8 and lik["estimate"]
    assert 0 < lik["stderr"] < lik["bits_per_dim"]
    full = json.loads(runner.invoke(app, [*args, "--full"]).stdout)["likelihood"]
    assert full["t_samples"] is None and not full["estimate"] and len(full["per_t"]) == 200
    # the estimate agrees with the whole bound within a few standard errors
    assert abs(lik["bits_per_dim"] - full["bits_per_dim"]) < 5 * lik["stderr"] + 1e-3
    r = runner.invoke(app, [*args, "--full", "--t-samples", "5"])
    assert r.exit_code == 2 and "--full" in r.stderr


def test_held_out_measures_exactly_the_images_the_run_set_aside(runner, tmp_path, monkeypatch):
    """`--held-out` bounds the images the run set aside for its quality figure (never trained
    on), in the data's order, and nothing else: a test-set figure from the model's own data.
    Without it, the report says how many there are; where they cannot be known, it is refused
    with the reason."""
    import json

    from conftest import train_tiny
    from ddpm_cli.cli import app
    from ddpm_cli.data.batches import split
    from ddpm_cli.data.sources import load_source
    from ddpm_cli.evaluation import evaluate

    run = train_tiny(tmp_path, 40, steps=2, holdout=6, diffusion=DiffusionConfig(timesteps=20))
    pics = tmp_path / "pics"
    data = load_source(str(pics), (8, 8), 3)[0].data  # in the order the run read them
    aside = split(40, 6, seed=1)[1].sort().values
    seen = []
    real = evaluate.bound

    def recording(network, objective, tables, batches, **kw):
        batches = list(batches)
        seen.append(torch.cat(batches))
        return real(network, objective, tables, iter(batches), **kw)

    monkeypatch.setattr(evaluate, "bound", recording)

    def measure(*args: str) -> dict:
        r = runner.invoke(app, ["eval", str(run), "--full", "--json", *args])
        assert r.exit_code == 0, r.output
        return json.loads(r.stdout)["likelihood"]

    for source in (pics, run / "data_cache.safetensors"):
        held = measure("--data", str(source), "--held-out")
        assert torch.equal(seen[-1], data[aside]) and held["images"] == 6
        assert held["held_out"] and not held["training_images"] and held["set_aside"] == 6
    assert measure("--data", str(pics), "--held-out", "--limit", "2")["images"] == 2
    assert torch.equal(seen[-1], data[aside[:2]])
    whole = measure("--data", str(pics))
    assert torch.equal(seen[-1], data) and whole["training_images"] and whole["set_aside"] == 6
    r = runner.invoke(app, ["eval", str(run), "--data", str(pics), "--full"])
    assert "a training-set bound; --held-out measures the 6 images its run set aside" in r.stderr
    assert "(6 held-out images of" in runner.invoke(
        app, ["eval", str(run), "--data", str(pics), "--full", "--held-out"]).stdout  # fmt: skip
    # other data: refused with the reason, in one line
    other = tmp_path / "other"
    other.mkdir()
    for p in sorted(pics.iterdir())[:20]:
        (other / p.name).write_bytes(p.read_bytes())
    r = runner.invoke(app, ["eval", str(run), "--data", str(other), "--held-out"])
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "--held-out: " in r.stderr and "is not the data" in r.stderr, r.stderr
    assert measure("--data", str(other))["set_aside"] == 0
    # streamed from disk, a set-aside image that stops decoding between the scan and its read
    # is stood in for by another set-aside image, never by a training image
    real_load = evaluate.load_source

    def load_then_break(*args, **kwargs):
        loaded = real_load(*args, stream=True)
        victim = loaded[0].paths[int(aside[0])]
        victim.write_bytes(b"\0" * victim.stat().st_size)
        return loaded

    monkeypatch.setattr(evaluate, "load_source", load_then_break)
    assert measure("--data", str(pics), "--held-out")["images"] == 6
    rows = seen[-1].flatten(1)
    kept = data[aside].flatten(1)
    assert all((kept == row).all(1).any() for row in rows)
    assert not (rows == data[aside[0]].flatten()).all(1).any()  # the broken one is not there
    # the other reasons, as the refusal words them
    from dataclasses import replace

    from ddpm_cli.generation.sampling import load_for_sampling

    sm = load_for_sampling(run)
    report = load_source(str(pics), (8, 8), 3)[1]
    assert "is fine-tuned" in replace(sm, fine_tuned=True).held_out_reason(40, report)
    assert "has 39 images where the run used 40" in sm.held_out_reason(39, report)
    assert sm.held_out_reason(40, report) is None
    (tmp_path / "none").mkdir()
    whole = train_tiny(tmp_path / "none", 10, steps=1, holdout=0)
    r = runner.invoke(app, ["eval", str(whole), "--data", str(tmp_path / "none" / "pics"),
                            "--held-out"])  # fmt: skip
    assert r.exit_code == 2 and "set no images aside for its quality figure" in r.stderr


def test_an_option_for_a_measurement_not_asked_for_is_refused(runner, tmp_path):
    """eval's options each belong to one measurement; given without it, each would be silently
    ignored: it is refused, naming what it applies to."""
    from conftest import train_tiny
    from ddpm_cli.cli import app

    run = train_tiny(tmp_path, 4)
    data = ["--data", str(tmp_path / "pics")]
    cases = [
        (["--memorization", str(tmp_path / "pics"), "--held-out"], "--held-out applies to --data"),
        (["--fid-ref", "x", "--limit", "2"], "--limit applies to --data"),
        (["--fid-ref", "x", "--full"], "--full applies to --data"),
        (["--fid-ref", "x", "--t-samples", "3"], "--t-samples applies to --data"),
        (["--fid-ref", "x", "--variance", "large"], "--variance applies to --data"),
        ([*data, "-n", "9"], "-n/--num applies to --fid-ref or --memorization"),
        ([*data, "--steps", "9"], "--steps applies to --fid-ref or --memorization"),
        ([*data, "--sampler", "ddim"], "--sampler applies to --fid-ref or --memorization"),
        ([*data, "--precision", "fp32"], "--precision applies to --fid-ref or --memorization"),
        ([*data, "--no-ref-cache"], "--ref-cache/--no-ref-cache applies to --fid-ref"),
        ([*data, "--inception-weights", "w"], "--inception-weights applies to --fid-ref"),
    ]
    for args, message in cases:
        r = runner.invoke(app, ["eval", str(run), *args])
        assert r.exit_code == 2, (args, r.output)
        (line,) = r.stderr.strip().splitlines()
        assert message in line and line.endswith("not given here; drop it"), (args, line)
    # with no measurement at all, the option says which one it was for
    for args, end in [(["--held-out"], "--held-out applies to --data, not given here; add it"),
                      (["-n", "5"], "--fid-ref or --memorization, not given here; add one")]:
        r = runner.invoke(app, ["eval", str(run), *args])
        assert r.exit_code == 2 and r.stderr.strip().endswith(end), r.stderr


def test_files_of_the_data_that_cannot_be_read_are_said_not_dropped_silently(runner, tmp_path):
    import json

    from conftest import train_tiny
    from ddpm_cli.cli import app

    run = train_tiny(tmp_path, 8, diffusion=DiffusionConfig(timesteps=50))
    (tmp_path / "pics" / "notes.png").write_text("not an image")
    for option in ("--data", "--memorization"):
        rest = ["--t-samples", "2"] if option == "--data" else ["-n", "4", "--steps", "2"]
        args = ["eval", str(run), option, str(tmp_path / "pics"), *rest]
        r = runner.invoke(app, [*args, "--json"])
        assert r.exit_code == 0, r.output
        result = json.loads(r.stdout)["likelihood" if option == "--data" else option[2:]]
        [skipped] = result["skipped_files"]
        assert skipped["path"] == str(tmp_path / "pics" / "notes.png")
        assert (f"warning: left out of {tmp_path / 'pics'}: 1 unreadable file; e.g. "
                f"{skipped['reason']}") in " ".join(r.stderr.split()), r.stderr
        assert result["unsearched"] == []


def test_a_data_cache_is_read_for_a_model_as_its_folder_is(runner, tmp_path):
    """eval reads a folder of another channel count converted to the model's (Pillow's luma);
    a run's data cache of those images is converted alike, where it was refused with train's
    `--channels` advice; what eval cannot use is refused in eval's words, not train's."""
    from conftest import train_tiny
    from ddpm_cli.cli import app
    from ddpm_cli.data.sources import load_source

    for name in "abc":
        (tmp_path / name).mkdir()
    colour = train_tiny(tmp_path / "a", 6, diffusion=DiffusionConfig(timesteps=50))
    gray = train_tiny(tmp_path / "b", 4, diffusion=DiffusionConfig(timesteps=50), channels=1)
    cache = str(colour / "data_cache.safetensors")
    cached = load_source(cache, (8, 8), 1, for_training=False)[0].data
    folder = load_source(str(tmp_path / "a" / "pics"), (8, 8), 1)[0].data
    assert cached.shape == folder.shape == (6, 1, 8, 8)
    assert (cached.int() - folder.int()).abs().max() <= 1  # Pillow rounds its integer luma
    grays = str(gray / "data_cache.safetensors")  # and gray to colour: the same level thrice
    cached = load_source(grays, (8, 8), 3, for_training=False)[0].data
    assert torch.equal(cached, load_source(grays, (8, 8), 1)[0].data.repeat(1, 3, 1, 1))
    r = runner.invoke(app, ["eval", str(gray), "--data", cache, "--t-samples", "2"])
    assert r.exit_code == 0, r.output
    cases = [(["--data", str(colour / "model.safetensors")],
              "is a model file, expected a data_cache file: give images here (a folder, or a "
              "run's data_cache.safetensors)"),
             (["--memorization", cache, "-n", "2", "--steps", "2"], None)]  # fmt: skip
    for args, said in cases:
        r = runner.invoke(app, ["eval", str(gray), *args])
        if said is None:
            assert r.exit_code == 0, r.output
            continue
        assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1, r.output
        line = " ".join(r.stderr.split())
        assert said in line and "--init" not in line and "--channels" not in line, line
    big = train_tiny(tmp_path / "c", 4, diffusion=DiffusionConfig(timesteps=50), image_size=16)
    r = runner.invoke(app, ["eval", str(gray), "--data", str(big / "data_cache.safetensors")])
    assert r.exit_code == 2 and "holds 16x16 images, not the model's 8x8; give a folder of the " \
        "images instead" in " ".join(r.stderr.split()), r.stderr
