"""Few-step samplers for the prior and the decoder: DDIM and DPM-Solver++(2M), through diffusers' schedulers.

Both networks are trained on the cosine schedule of `models.diffusion` over 1,000 steps, which is diffusers'
``squaredcos_cap_v2`` (the same alpha_bar function and 0.999 beta cap; tested equal to float32 precision), so
diffusers' scheduler classes step them exactly. Both samplers are diffusers' `DPMSolverMultistepScheduler`
(trailing spacing, so the first step starts at t = 999, the pure-noise end the networks were trained on; no
clipping; ending at sigma 0): ``dpm++`` is DPM-Solver++ of order 2 (first order on the last steps), ``ddim`` is
its first order, which is DDIM with eta 0 step for step. Not `DDIMScheduler`: its step goes from t to
t - 1000 // steps, not to the next of its own trailing timesteps, so at a step count that does not divide 1,000
(64, 128, 300) every network call after the first saw a timestep other than its noise level's (at 128 steps its
error on a Gaussian toy was 7x that at 100; `tests/test_samplers.py`).
Using their classes keeps our samplers the ones an exported diffusers pipeline runs. A network is only a
``model_fn(x_t, t) -> prediction`` here, in the parametrisation it was trained with: ``sample`` (x0, the prior)
or ``v_prediction`` (the decoder); classifier-free guidance happens inside ``model_fn``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

SAMPLERS = ("ddim", "dpm++")
PREDICTION_TYPES = ("sample", "v_prediction", "epsilon")
ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def make_scheduler(sampler: str, prediction_type: str, num_train_timesteps: int = 1000):
    """A fresh diffusers scheduler (they are stateful) for `sampler` on the cosine schedule."""
    from diffusers import DPMSolverMultistepScheduler

    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler '{sampler}'; valid: {', '.join(SAMPLERS)}")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction type '{prediction_type}'; valid: {', '.join(PREDICTION_TYPES)}")
    common = dict(
        num_train_timesteps=num_train_timesteps,
        beta_schedule="squaredcos_cap_v2",
        prediction_type=prediction_type,
        timestep_spacing="trailing",
    )
    return DPMSolverMultistepScheduler(
        algorithm_type="dpmsolver++",
        solver_order=1 if sampler == "ddim" else 2,
        lower_order_final=True,
        final_sigmas_type="zero",
        thresholding=False,
        **common,
    )


def check_steps(steps: int, num_train_timesteps: int, flag: str = "steps") -> None:
    """1 .. num_train_timesteps sampler steps (ValueError otherwise): more than the training schedule has would
    repeat a timestep, and the solver's zero-length step turned every value to NaN."""
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(
            f"{flag} must be between 1 and {num_train_timesteps} (the training schedule's steps), got {steps}"
        )


@torch.no_grad()
def sample(
    model_fn: ModelFn,
    shape: tuple[int, ...],
    *,
    sampler: str = "ddim",
    steps: int = 50,
    prediction_type: str = "sample",
    num_train_timesteps: int = 1000,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    noise: torch.Tensor | None = None,
    init: torch.Tensor | None = None,
    strength: float = 1.0,
    on_step: Callable[[], object] | None = None,
) -> torch.Tensor:
    """The clean sample [shape] in `dtype`, from `noise` (or Gaussian noise drawn from `generator` on the
    generator's own device, so a CPU generator also seeds GPU runs) over `steps` steps; `on_step` is called
    after each (a progress bar's; `steps_taken` of them).

    With `init` [shape] (image to image, as diffusers' img2img pipelines do it): only the last
    int(steps * strength) of the `steps` steps (diffusers' img2img `get_timesteps` count, but at least one
    where diffusers would take none), starting from `init` noised to the first of them.
    The scheduler works in float32 whatever the network's dtype; the network sees `dtype`.
    """
    check_steps(steps, num_train_timesteps)
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    sched = make_scheduler(sampler, prediction_type, num_train_timesteps)
    sched.set_timesteps(steps, device=device)
    if noise is None:
        gen_device = generator.device if generator is not None else device
        noise = torch.randn(tuple(shape), generator=generator, device=gen_device, dtype=torch.float32)
    noise = noise.to(device=device, dtype=torch.float32)
    timesteps = sched.timesteps
    if init is None:
        x = noise * sched.init_noise_sigma
    else:
        skip = steps - steps_taken(steps, strength)
        timesteps = timesteps[skip:]
        sched.set_begin_index(skip)  # the multistep solver counts its steps from here
        x = sched.add_noise(init.to(device=device, dtype=torch.float32), noise, timesteps[:1])
    for t in timesteps:
        t_batch = torch.full((shape[0],), int(t), device=device, dtype=torch.long)  # [B]
        out = model_fn(x.to(dtype), t_batch).float()
        x = sched.step(out, t, x).prev_sample
        if on_step is not None:
            on_step()
    return x.to(dtype)


def steps_taken(steps: int, strength: float = 1.0) -> int:
    """The steps `sample` takes of `steps` at `strength` (from an `init`: the last int(steps * strength), at
    least one)."""
    return max(1, int(steps * strength))
