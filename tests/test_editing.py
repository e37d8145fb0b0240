"""The editing math (diffusion/editing.py): RePaint's walk, kept pixels, the conditional it samples
on Gaussian data with an exact model, SDEdit's start, and ILVR's block means."""

from __future__ import annotations

import pytest
import torch

from ddpm_cli.config import DiffusionConfig
from ddpm_cli.diffusion import editing
from ddpm_cli.diffusion.samplers import config_pairs, evaluations, from_config, run
from ddpm_cli.diffusion.schedules import DiffusionTables
from ddpm_cli.sampler_config import SamplerConfig
from test_samplers import predicting

TABLES = DiffusionTables.from_config(DiffusionConfig())
SAMPLERS = {
    "ddpm": SamplerConfig(sampler="ddpm", steps=50),
    "ddim": SamplerConfig(sampler="ddim", steps=20),
    "ddim-eta1": SamplerConfig(sampler="ddim", steps=20, eta=1.0),
    "dpm++": SamplerConfig(sampler="dpm++", steps=10),
}

# ---- Gaussian data with correlated pixels, and its exact model ---------------------------------
# 2x2 images: the top row (known) correlates 0.85 with the pixel below it (unknown)
MU = torch.tensor([0.1, -0.2, 0.15, 0.05], dtype=torch.float64)
CORR = torch.tensor(
    [[1, 0.3, 0.85, 0.25], [0.3, 1, 0.25, 0.85], [0.85, 0.25, 1, 0.3], [0.25, 0.85, 0.3, 1]],
    dtype=torch.float64,
)
SIGMA = 0.09 * CORR
KNOWN, UNKNOWN = [0, 1], [2, 3]


def exact_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """E[eps | x_t] = sqrt(1 - ab) (ab SIGMA + (1 - ab) I)^-1 (x_t - sqrt(ab) MU)."""
    ab = TABLES.alpha_bar[t].view(-1, 1, 1)
    cov = ab * SIGMA + (1 - ab) * torch.eye(4, dtype=torch.float64)
    d = x.reshape(-1, 4, 1) - ab.sqrt() * MU.view(1, 4, 1)
    return ((1 - ab).sqrt() * torch.linalg.solve(cov, d)).reshape(x.shape)


def exact_model(objective: str = "eps"):
    """The exact prediction of `objective` for this data."""
    return predicting(objective, exact_eps)


def conditional(known_values: torch.Tensor):
    """Mean and covariance of the bottom row given the top row (the Schur complement)."""
    s_kk, s_uk = SIGMA[KNOWN][:, KNOWN], SIGMA[UNKNOWN][:, KNOWN]
    gain = s_uk @ torch.linalg.inv(s_kk)
    return MU[UNKNOWN] + gain @ (known_values - MU[KNOWN]), SIGMA[UNKNOWN][
        :, UNKNOWN
    ] - gain @ s_uk.T


def streams(seed: int = 0):
    g, e = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
    return (
        lambda shape: torch.randn(shape, generator=g, dtype=torch.float64),
        lambda shape: torch.randn(shape, generator=e, dtype=torch.float64),
    )


def inpaint_gaussian(config: SamplerConfig, n: int, jump: int, resample: int, objective="eps"):
    """n inpaintings of the bottom row given a top row two and one standard deviations off;
    returns the (n, 4) samples, the known values and the network evaluations per image."""
    noise, edit_noise = streams()
    known_values = MU[KNOWN] + torch.tensor([0.6, -0.3], dtype=torch.float64)  # 2 and -1 sd
    known = torch.zeros(n, 1, 2, 2, dtype=torch.float64)
    known.view(n, 4)[:, KNOWN] = known_values
    keep = torch.zeros(n, 1, 2, 2, dtype=torch.bool)
    keep.view(n, 4)[:, KNOWN] = True
    pairs = config_pairs(config, TABLES, objective)
    edit = editing.inpaint(TABLES, pairs, known, keep, edit_noise, jump, resample)
    model = exact_model(objective)
    x = run(from_config(config, model, TABLES, noise((n, 1, 2, 2)), noise, objective, edit))
    return x.view(n, 4), known_values, evaluations(edit.pairs)


def test_the_exact_model_is_exact():
    """E[eps | x_t] checked by regression on simulated (x_t, eps) pairs: the residual is
    uncorrelated with every pixel of x_t."""
    g = torch.Generator().manual_seed(0)
    n, t = 200_000, 300
    x0 = MU + torch.randn(n, 4, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(SIGMA).T
    eps = torch.randn(n, 4, generator=g, dtype=torch.float64)
    ab = TABLES.alpha_bar[t]
    xt = (ab.sqrt() * x0 + (1 - ab).sqrt() * eps).view(n, 1, 2, 2)
    residual = eps - exact_model()(xt, torch.full((n,), t)).view(n, 4)
    c = torch.corrcoef(torch.cat([residual, xt.view(n, 4)], 1).T)[:4, 4:]
    assert c.abs().max() < 0.01 and residual.mean(0).abs().max() < 0.01


def test_repaint_samples_the_conditional_of_the_missing_pixels():
    """Inpainting the bottom row given the top row must reproduce the conditional Gaussian:
    its mean within 0.25 of its standard deviation and its spread within 10% (standard error
    of the mean with 3000 samples: 0.018 sd). Without resampling the known row barely reaches
    the unknown one: the mean stays more than a standard deviation off towards the marginal
    (1.2 measured), which the second half checks, so that the first cannot pass by luck."""
    ddpm = SamplerConfig(sampler="ddpm", steps=100, variance="large")
    x, known_values, _ = inpaint_gaussian(ddpm, 3000, jump=1, resample=10)
    mean, cov = conditional(known_values)
    sd = cov.diagonal().sqrt()
    assert ((x[:, UNKNOWN].mean(0) - mean).abs() / sd).max() < 0.25
    assert (x[:, UNKNOWN].std(0) / sd - 1).abs().max() < 0.10
    assert torch.equal(x[:, KNOWN], known_values.expand(3000, 2))
    naive, _, _ = inpaint_gaussian(ddpm, 3000, jump=1, resample=1)
    assert ((naive[:, UNKNOWN].mean(0) - mean).abs() / sd).max() > 1.0


def test_resample_walk():
    """RePaint's walk over 7 steps, jump 2, resample 3: jumps counted from the sample's end,
    each jump back two timesteps, each stretch walked three times."""
    ts = [60, 50, 40, 30, 20, 10, 0]
    pairs = list(zip(ts, ts[1:] + [-1], strict=True))
    assert editing.resample_pairs(pairs, 2, 1) == pairs
    walk = editing.resample_pairs(pairs, 2, 3)
    expected_t = [60, 50, 40, 30, 50, 40, 30, 50, 40, 30, 20, 10, 30, 20, 10, 30, 20, 10, 0, -1,
                  10, 0, -1, 10, 0, -1]  # fmt: skip
    assert [walk[0][0]] + [b for _, b in walk] == expected_t
    assert evaluations(walk) == 7 + 3 * 2 * 2  # three boundaries, two extra walks of 2 steps
    assert all(a == b for (_, a), (b, _) in zip(walk, walk[1:], strict=False))


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_known_pixels_are_kept_exactly_and_nothing_kept_is_plain_sampling(name):
    config, n = SAMPLERS[name], 6
    model = exact_model("v")
    g = torch.Generator().manual_seed(3)
    known = torch.rand(n, 1, 2, 2, generator=g, dtype=torch.float64) * 2 - 1
    keep = torch.rand(n, 1, 2, 2, generator=g) < 0.5
    pairs = config_pairs(config, TABLES, "v")

    def inpainted(keep, resample=3):
        noise, edit_noise = streams(5)
        edit = editing.inpaint(TABLES, pairs, known, keep, edit_noise, 2, resample)
        return run(from_config(config, model, TABLES, noise((n, 1, 2, 2)), noise, "v", edit))

    x = inpainted(keep)
    assert torch.equal(x[keep], known[keep]) and not torch.equal(x, known)
    assert torch.equal(inpainted(torch.ones_like(keep)), known)  # everything kept
    noise, _ = streams(5)
    plain = run(from_config(config, model, TABLES, noise((n, 1, 2, 2)), noise, "v"))
    assert torch.equal(inpainted(torch.zeros_like(keep), resample=1), plain)  # nothing kept


def test_box_and_outpaint_masks():
    keep = editing.box_mask(4, 5, (1, 2, 3, 4))
    assert keep.shape == (1, 4, 5) and (~keep).sum() == 4 and not keep[0, 2:4, 1:3].any()
    canvas, keep = editing.outpaint_canvas(torch.ones(3, 2, 2), (1, 0, 2, 1))
    assert canvas.shape == (3, 3, 5) and keep.sum() == 4 and keep[0, 0, 1:3].all()
    assert torch.equal(canvas[:, :2, 1:3], torch.ones(3, 2, 2)) and canvas.sum() == 12


def test_sdedit_starts_from_the_noised_image_and_strength_moves_it_away():
    """S -> 0 returns the input; the distance to it grows with S; S = 1 is plain sampling."""
    n, model = 2000, exact_model("v")
    config = SamplerConfig(sampler="ddim", steps=50)
    pairs = config_pairs(config, TABLES, "v")
    init = (MU + 0.5).view(1, 1, 2, 2).expand(n, 1, 2, 2)  # far from the data, inside [-1, 1]
    distances = []
    for strength in (0.001, 0.1, 0.3, 0.5, 0.8, 1.0):
        noise, _ = streams(1)
        edit = editing.sdedit(TABLES, pairs, init, strength)
        x = run(from_config(config, model, TABLES, noise((n, 1, 2, 2)), noise, "v", edit))
        distances.append(float((x - init).pow(2).mean().sqrt()))
        t0 = editing.start_timestep(1000, strength)
        if strength < 1:  # the network first sees the image noised to t0, x_T as the noise
            x_T = torch.randn(n, 1, 2, 2, dtype=torch.float64)
            first = next(from_config(config, model, TABLES, x_T, noise, "v", edit))
            assert first.t == t0
            assert torch.equal(first.x_t, editing.noised_to(TABLES, init, t0, x_T))
        if strength == 0.001:
            assert editing.start_timestep(1000, strength) == 0 and evaluations(edit.pairs) == 1
            assert (x - init).abs().max() < 0.05
    assert all(a < b for a, b in zip(distances, distances[1:], strict=False)), distances
    noise, _ = streams(1)
    plain = run(from_config(config, model, TABLES, noise((n, 1, 2, 2)), noise, "v"))
    assert torch.equal(x, plain)
    assert editing.start_timestep(1000, 0.5) == 499
    with pytest.raises(ValueError):
        editing.start_timestep(1000, 0.0)


@pytest.mark.parametrize("factor", [2, 4, 8])
def test_ilvr_output_has_the_small_images_block_means(factor):
    """ILVR's guarantee: the output downsampled by N is the small image (exactly, before the
    8-bit rounding), inside the data range; other seeds differ in the detail in the blocks."""
    size, n = 16, 2
    g = torch.Generator().manual_seed(factor)
    small = torch.rand(n, 1, size // factor, size // factor, generator=g, dtype=torch.float64)
    small = small * 1.2 - 0.6

    def model(x, t):  # a stand-in for a network predicting eps, pushing x out of range
        return -0.8 * torch.tanh(3 * x) + 0.1 * torch.sin(t.double() / 50).view(-1, 1, 1, 1)

    config = SamplerConfig(sampler="ddpm", steps=20)
    pairs = config_pairs(config, TABLES, "eps")
    outs = []
    for seed in (1, 2):
        noise, edit_noise = streams(seed)
        edit = editing.ilvr(TABLES, pairs, small, factor, edit_noise)
        x_T = noise((n, 1, size, size))
        outs.append(run(from_config(config, model, TABLES, x_T, noise, "eps", edit)))
    for x in outs:
        assert (editing.downsample(x, factor) - small).abs().max() < 1e-9
        assert x.abs().max() <= 1
    detail = outs[0] - outs[1]
    assert editing.lowpass(detail, factor).abs().max() < 1e-9
    assert detail.abs().max() > (0.05 if factor < 8 else 0.0)


def test_matching_block_means_is_the_projection_onto_the_range():
    """clamp(x + c) per block: the means match, and no other image in range with those means
    is nearer x (checked against random feasible perturbations)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64) * 1.5
    small = torch.rand(3, 2, 2, 2, generator=g, dtype=torch.float64) * 1.8 - 0.9
    z = editing.match_block_means(x, small, 2)
    assert (editing.downsample(z, 2) - small).abs().max() < 1e-9 and z.abs().max() <= 1
    inside = (z.abs() < 1).double()
    checked = 0
    for _ in range(200):  # moves of the free pixels that keep the block means
        d = torch.randn(z.shape, generator=g, dtype=torch.float64) * 0.05 * inside
        d = d - editing.upsample(editing.downsample(d, 2) * 4 / editing.downsample(
            inside, 2).mul(4).clamp(min=1), 2) * inside  # fmt: skip
        w = z + d
        if w.abs().max() <= 1:
            assert (editing.downsample(w, 2) - small).abs().max() < 1e-9
            assert (w - x).pow(2).sum() >= (z - x).pow(2).sum() - 1e-12
            checked += 1
    assert checked > 50


def test_dpmpp_steps_first_order_after_a_jump_back():
    """DPM-Solver++(2M) uses its previous prediction only when it came from a higher t: after
    a jump back, the step is the first-order one (DDIM's), not an extrapolation across it."""
    from ddpm_cli.diffusion.samplers import Edit, dpmpp_2m, dpmpp_2m_update, q_jump

    model = exact_model("v")
    z = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x_T = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    pairs = [(900, 600), (600, 300), (300, 600), (600, 300), (300, -1)]
    edit = Edit(pairs=pairs, noise=lambda shape: z)
    steps = list(dpmpp_2m(model, TABLES, x_T, objective="v", edit=edit))
    assert [s.t for s in steps] == [900, 600, 600, 300]
    x_jumped = q_jump(TABLES, steps[1].x, 300, 600, z)
    assert torch.equal(steps[2].x_t, x_jumped)  # what the network saw after the jump
    first_order = dpmpp_2m_update(TABLES, x_jumped, 600, 300, steps[2].x0, None)
    assert torch.allclose(steps[2].x, first_order, rtol=0, atol=1e-12)
    # without the jump the same step would have been second order
    second_order = dpmpp_2m_update(TABLES, x_jumped, 600, 300, steps[2].x0, (900, steps[0].x0))
    assert not torch.allclose(steps[2].x, second_order, atol=1e-6)
