"""Gaussian noise process (cosine schedule) and the training losses of the prior and the decoder.

Kept apart from the networks: a network is only a `model_fn(x_t, t) -> prediction` here. The prior predicts
x0 (as the LAION prior does); the decoder predicts v (`models.decoder`). Sampling is in `models.samplers`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cosine_alpha_bar(timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """alpha_bar[t] for t = 0 .. timesteps-1 of the cosine schedule (Nichol & Dhariwal 2021), float64.

    f(u) = cos((u / T + s) / (1 + s) * pi / 2) ** 2; beta_t = 1 - f(t + 1) / f(t) clipped at max_beta (the last
    step would otherwise be 1); alpha_bar = cumprod(1 - beta).
    """
    u = np.arange(timesteps + 1, dtype=np.float64) / timesteps
    f = np.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    betas = np.minimum(1.0 - f[1:] / f[:-1], max_beta)
    return np.cumprod(1.0 - betas)


def guided(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance on x0 predictions: uncond + scale * (cond - uncond); scale 1 = cond."""
    return uncond + scale * (cond - uncond)


def _randn(
    shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device | str, dtype: torch.dtype
) -> torch.Tensor:
    """Normal noise drawn on the generator's device (so a CPU generator also seeds GPU runs)."""
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device, dtype=dtype).to(device)


class GaussianDiffusion:
    """Forward process q(x_t | x0) with a cosine schedule and the x0-prediction loss."""

    def __init__(self, timesteps: int = 1000) -> None:
        if timesteps < 1:
            raise ValueError(f"timesteps must be >= 1, got {timesteps}")
        self.num_timesteps = timesteps
        ab = cosine_alpha_bar(timesteps)
        self.alpha_bar64 = ab  # float64, for the sampler's scalar coefficients
        # float32 tables computed in float64: 1 - alpha_bar near t = 0 would lose digits in float32.
        self.alpha_bar = torch.from_numpy(ab).float()
        self.sqrt_alpha_bar = torch.from_numpy(np.sqrt(ab)).float()
        self.sqrt_one_minus_alpha_bar = torch.from_numpy(np.sqrt(1.0 - ab)).float()

    def _gather(self, table: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """table[t] shaped to broadcast against x: t [B] -> [B, 1, ..., 1]."""
        vals = table.to(t.device)[t].to(x.dtype)  # [B]
        return vals.view(-1, *([1] * (x.dim() - 1)))  # [B, 1, ..., 1]

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise; x0, noise [B, ...], t [B] long."""
        return (
            self._gather(self.sqrt_alpha_bar, t, x0) * x0
            + self._gather(self.sqrt_one_minus_alpha_bar, t, x0) * noise
        )

    def sample_t(
        self, batch: int, device: torch.device | str, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Uniform training timesteps [batch] in 0 .. num_timesteps - 1."""
        gen_device = generator.device if generator is not None else device
        t = torch.randint(0, self.num_timesteps, (batch,), generator=generator, device=gen_device)
        return t.to(device)

    def shifted_timesteps(self, shift: float) -> torch.Tensor:
        """Long [T]: for each timestep t, the timestep whose log-SNR is nearest log-SNR(t) - 2 log(shift).

        Indexing a uniform draw with it draws training timesteps as if the schedule were shifted towards noise
        by `shift` (Hoogeboom et al. 2023, "simple diffusion"; SD3's timestep shift): the schedule itself, and
        so sampling, stay as they are. shift 1 is the identity; shift > 1 moves draws to higher noise.
        """
        if not shift > 0:
            raise ValueError(f"shift must be > 0, got {shift}")
        ab = self.alpha_bar64
        log_snr = np.log(ab) - np.log1p(-ab)  # decreasing in t
        target = log_snr - 2.0 * math.log(shift)
        right = np.clip(np.searchsorted(-log_snr, -target), 1, len(ab) - 1)  # first t with log_snr <= target
        nearer_left = (log_snr[right - 1] - target) < (target - log_snr[right])
        return torch.from_numpy(np.where(nearer_left, right - 1, right).astype(np.int64))

    def x0_loss(
        self,
        model_fn: ModelFn,
        x0: torch.Tensor,
        t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Mean squared error between model_fn(x_t, t) and x0; t and noise are drawn when not given."""
        if t is None:
            t = self.sample_t(x0.shape[0], x0.device, generator)
        if noise is None:
            noise = _randn(tuple(x0.shape), generator, x0.device, x0.dtype)
        pred = model_fn(self.q_sample(x0, t, noise), t)
        return F.mse_loss(pred.float(), x0.float())
