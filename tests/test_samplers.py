"""Samplers on a Gaussian toy whose exact denoiser and exact probability-flow end point are known."""

import numpy as np
import pytest
import torch

from models.diffusion import cosine_alpha_bar
from models.samplers import make_scheduler, sample

D, S = 16, 0.5  # data: x0 ~ N(mu, S^2) per coordinate
MU = torch.linspace(-1, 1, D, dtype=torch.float64)
AB = torch.from_numpy(cosine_alpha_bar(1000))


def exact_x0(x, t):
    """E[x0 | x_t] for Gaussian data."""
    a = AB[t].view(-1, 1)
    return MU + a.sqrt() * S * S / (a * S * S + 1 - a) * (x - a.sqrt() * MU)


def exact_v(x, t):
    a = AB[t].view(-1, 1)
    x0 = exact_x0(x, t)
    eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
    return a.sqrt() * eps - (1 - a).sqrt() * x0


MODEL_FNS = {"sample": exact_x0, "v_prediction": exact_v}


@pytest.fixture(scope="module")
def toy():
    noise = torch.randn(64, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    # The probability-flow ODE keeps (x_t - sqrt(ab) mu) / sqrt(ab S^2 + 1 - ab) constant for Gaussian data.
    a = AB[999]
    return noise, MU + S * (noise - a.sqrt() * MU) / (a * S * S + 1 - a).sqrt()


def error(toy, sampler, prediction_type, steps):
    noise, exact = toy
    out = sample(
        MODEL_FNS[prediction_type],
        (64, D),
        sampler=sampler,
        steps=steps,
        prediction_type=prediction_type,
        noise=noise,
        dtype=torch.float64,
    )
    return (out - exact).abs().max().item()


def test_schedule_equals_diffusers_squaredcos_cap_v2():
    for sampler in ("ddim", "dpm++"):
        sched = make_scheduler(sampler, "sample")
        assert np.abs(sched.alphas_cumprod.double().numpy() - AB.numpy()).max() < 1e-6
        sched.set_timesteps(10)
        assert int(sched.timesteps[0]) == 999  # trailing spacing starts at the pure-noise end


@pytest.mark.parametrize("prediction_type", ["sample", "v_prediction"])
def test_error_falls_with_steps_and_dpm_beats_ddim(toy, prediction_type):
    # 64, 128 and 300 do not divide 1,000: diffusers' DDIMScheduler stepped off its own timesteps there (128 and
    # 300 steps measured 0.147 and 0.148, against 0.025 at 100)
    ddim = [error(toy, "ddim", prediction_type, n) for n in (5, 10, 25, 50, 64, 100, 128, 300)]
    dpm = [error(toy, "dpm++", prediction_type, n) for n in (5, 10, 25, 50)]
    assert all(a > b for a, b in zip(ddim, ddim[1:])), ddim
    assert dpm[0] > dpm[1] > dpm[2] and dpm[3] < dpm[1], dpm
    assert dpm[2] < ddim[4] / 10  # DPM-Solver++ at 25 steps vs DDIM at 64: measured ~60x smaller
    assert ddim[4] < 0.05 and ddim[7] < 0.01


@pytest.mark.parametrize("steps", [10, 50, 200])
def test_ddim_is_diffusers_ddim_where_its_steps_divide_the_schedule(toy, steps):
    """Where 1,000 / steps is whole, DDIMScheduler steps to its own next timestep: there our first-order
    DPM-Solver++ must give DDIM's samples (eta 0)."""
    from diffusers import DDIMScheduler

    noise, _ = toy
    ddim = DDIMScheduler(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
        timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=True,
    )  # fmt: skip
    ddim.set_timesteps(steps)
    x = noise.clone()
    for t in ddim.timesteps:
        x = ddim.step(exact_v(x, torch.full((64,), int(t))), t, x).prev_sample
    ours = sample(exact_v, (64, D), sampler="ddim", steps=steps, prediction_type="v_prediction", noise=noise,
                  dtype=torch.float64)  # fmt: skip
    assert (ours - x).abs().max().item() < 1e-5  # float32 schedulers both; measured <= 2e-6


def test_more_steps_than_the_schedule_are_refused():
    """1,001 steps of 1,000 repeated a timestep, and DPM-Solver++'s zero-length step made every value NaN."""
    fn = MODEL_FNS["sample"]
    assert torch.isfinite(sample(fn, (2, D), sampler="dpm++", steps=1000, dtype=torch.float64)).all()
    for sampler in ("ddim", "dpm++"):
        with pytest.raises(ValueError, match="steps must be between 1 and 1000 .* got 1001"):
            sample(fn, (2, D), sampler=sampler, steps=1001)


def test_one_step_x0_returns_the_networks_prediction():
    x0 = torch.randn(4, 8)
    out = sample(lambda x, t: x0.expand_as(x), (4, 8), steps=1, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(out, x0, atol=1e-6)


def test_seeded_and_validated():
    def fn(x, t):
        return exact_x0(x.double(), t).float()

    a, b, c = (
        sample(fn, (4, D), sampler="dpm++", steps=5, generator=torch.Generator().manual_seed(s))
        for s in (1, 1, 2)
    )
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="valid: ddim, dpm\\+\\+"):
        make_scheduler("euler", "sample")
    with pytest.raises(ValueError, match="valid: sample, v_prediction, epsilon"):
        make_scheduler("ddim", "x0")


@pytest.mark.parametrize("sampler", ["ddim", "dpm++"])
def test_image_to_image_keeps_more_of_the_init_as_strength_falls(toy, sampler):
    """From `init` noised part way: the exact denoiser pulls a far-off init towards the data, the more so the
    more steps (strength) it is given; strength 1 forgets the init (pure noise at t = 999)."""
    noise, exact = toy
    init = MU + 3.0  # far outside the data's N(mu, 0.5^2)

    def run(strength):
        return sample(
            exact_v,
            (64, D),
            sampler=sampler,
            steps=25,
            prediction_type="v_prediction",
            noise=noise,
            dtype=torch.float64,
            init=init.expand(64, D),
            strength=strength,
        )

    dist = [
        (run(s) - init).abs().mean().item() for s in (0.04, 0.2, 0.5, 1.0)
    ]  # measured 0.08, 0.6, 1.7, 3.0
    assert dist[0] < 0.1 and dist[0] < dist[1] < dist[2] < dist[3], dist
    assert (run(1.0) - exact).abs().mean().item() < 0.05  # near the plain sample from the same noise
    with pytest.raises(ValueError, match="strength must be in \\(0, 1\\]"):
        run(0.0)


def test_image_to_image_takes_the_steps_diffusers_img2img_takes():
    """int(steps * strength) of the steps, at least one: the count of diffusers' img2img `get_timesteps`."""
    seen = []

    def count(x, t):
        seen.append(int(t[0]))
        return torch.zeros_like(x)

    for steps, strength, want in ((25, 0.5, 12), (25, 0.3, 7), (10, 0.75, 7), (25, 0.01, 1), (25, 1.0, 25)):
        seen.clear()
        sample(count, (2, D), steps=steps, init=torch.zeros(2, D), strength=strength, sampler="dpm++")
        assert len(seen) == want, (steps, strength, len(seen))
        assert seen == sorted(seen, reverse=True) and (
            strength < 1 or seen[0] > 900
        )  # the last, noisiest first
