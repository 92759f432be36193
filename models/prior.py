"""DALL-E 2 diffusion prior: text (embedding, optionally per-token encodings) -> CLIP image embedding.

`PriorNetwork` is a causal transformer over the tokens

    [text encodings (0..L, optional), text embedding, timestep, noised image embedding, learned query]

whose output at the learned query is the predicted clean (scaled) image embedding. `DiffusionPrior` joins it
with the cosine-schedule `GaussianDiffusion`: `loss` for training (x0 MSE with condition dropout for
classifier-free guidance) and `sample` (DDIM, guided) for inference.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.diffusion import GaussianDiffusion, guided
from models.layers import Block, TimestepEmbedder, causal_padding_mask


@dataclass
class PriorConfig:
    emb_dim: int = 512  # CLIP embedding size: ViT-B/32 512, ViT-L/14 768; set it from the store's manifest
    dim: int = 512
    depth: int = 6
    heads: int = 8
    head_dim: int | None = None  # None = dim // heads; LAION's ViT-L/14 prior uses 64 with 32 heads
    ff_mult: int = 4
    text_enc_dim: int = 0  # width of per-token text encodings; 0 = condition on the text embedding only
    max_text_len: int = 77  # CLIP's context length: encodings are never longer; sizes the position table
    timesteps: int = 1000  # training schedule length; sampling strides over it with far fewer steps
    cond_drop_prob: float = 0.1  # DALL-E 2 / LAION: 10% unconditional, so one net serves guidance too
    # None = sqrt(emb_dim): a unit-norm embedding then has per-coordinate variance ~1, like the noise.
    image_embed_scale: float | None = None
    dropout: float = 0.0  # attention and MLP dropout
    guidance_scale: float = 1.0  # 1 = plain conditional prediction; >1 trades diversity for text fidelity

    def __post_init__(self) -> None:
        for name in ("emb_dim", "dim", "depth", "heads", "ff_mult", "max_text_len", "timesteps"):
            if getattr(self, name) < 1:
                raise ValueError(f"PriorConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.head_dim is None and self.dim % self.heads:
            raise ValueError(
                f"PriorConfig.dim {self.dim} is not divisible by heads {self.heads}; set head_dim"
            )
        if self.text_enc_dim < 0:
            raise ValueError(f"PriorConfig.text_enc_dim must be >= 0, got {self.text_enc_dim}")
        if not 0.0 <= self.cond_drop_prob < 1.0:
            raise ValueError(f"PriorConfig.cond_drop_prob must be in [0, 1), got {self.cond_drop_prob}")

    @property
    def embed_scale(self) -> float:
        """The resolved image embedding scale."""
        return math.sqrt(self.emb_dim) if self.image_embed_scale is None else self.image_embed_scale


PRIOR_PRESETS: dict[str, PriorConfig] = {
    # CPU demo and tests: ~20 ms a batch-16 step on 2 cores, enough to fit a small procedural dataset.
    "tiny": PriorConfig(dim=128, depth=4, heads=4),
    # dalle2-pytorch's README network for ViT-B/32 embeddings; CLIP ViT-B/32's text width is 512.
    "vit-b-32": PriorConfig(
        emb_dim=512, dim=512, depth=6, heads=8, head_dim=64, text_enc_dim=512, dropout=0.05
    ),
    # LAION's ViT-L/14 prior: width 768, depth 24, 32 heads of 64, text encodings, 0.05 dropout.
    "vit-l-14": PriorConfig(
        emb_dim=768, dim=768, depth=24, heads=32, head_dim=64, text_enc_dim=768, dropout=0.05
    ),
}


def prior_config(name: str, **overrides: object) -> PriorConfig:
    """The preset `name` with fields replaced by `overrides` (e.g. emb_dim from the store's manifest)."""
    if name not in PRIOR_PRESETS:
        raise ValueError(f"unknown prior preset '{name}'; valid: {', '.join(PRIOR_PRESETS)}")
    fields = [f.name for f in dataclasses.fields(PriorConfig)]
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(f"unknown PriorConfig field(s) {', '.join(unknown)}; valid: {', '.join(fields)}")
    return dataclasses.replace(PRIOR_PRESETS[name], **overrides)


class PriorNetwork(nn.Module):
    """Causal transformer predicting the clean (scaled) image embedding from a noised one and the text."""

    def __init__(self, cfg: PriorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.text_in = nn.Linear(cfg.emb_dim, d)
        self.time_in = TimestepEmbedder(d)
        self.image_in = nn.Linear(cfg.emb_dim, d)
        self.query = nn.Parameter(torch.randn(d) * 0.02)
        self.null_text = nn.Parameter(torch.randn(d) * 0.02)  # stands in for a dropped text embedding
        if cfg.text_enc_dim:
            self.text_enc_in = nn.Linear(cfg.text_enc_dim, d)
            self.text_enc_pos = nn.Parameter(torch.randn(cfg.max_text_len, d) * 0.02)
        self.blocks = nn.ModuleList(
            Block(d, cfg.heads, cfg.head_dim, cfg.ff_mult, cfg.dropout) for _ in range(cfg.depth)
        )
        self.ln_out = nn.LayerNorm(d)
        self.out = nn.Linear(d, cfg.emb_dim)

    def _text_tokens(
        self, text_enc: torch.Tensor | None, mask: torch.Tensor | None, drop: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected text-encoding tokens [B, L, dim] and which of them are attended [B, L] bool."""
        b, dev = drop.shape[0], self.query.device
        if text_enc is None:
            return self.query.new_zeros(b, 0, self.cfg.dim), torch.zeros(b, 0, dtype=torch.bool, device=dev)
        if not self.cfg.text_enc_dim:
            raise ValueError("text encodings given to a prior built with text_enc_dim=0")
        if text_enc.dim() != 3 or text_enc.shape[-1] != self.cfg.text_enc_dim:
            raise ValueError(f"text_enc must be [B, L, {self.cfg.text_enc_dim}], got {list(text_enc.shape)}")
        n = text_enc.shape[1]
        if n > self.cfg.max_text_len:
            raise ValueError(f"text_enc has {n} tokens, more than max_text_len {self.cfg.max_text_len}")
        tokens = self.text_enc_in(text_enc.to(self.query)) + self.text_enc_pos[:n]  # [B, L, dim]
        valid = torch.ones(b, n, dtype=torch.bool, device=dev) if mask is None else mask.to(dev, torch.bool)
        return tokens, valid & ~drop[:, None]  # [B, L]

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        text_emb: torch.Tensor,
        text_enc: torch.Tensor | None = None,
        text_enc_mask: torch.Tensor | None = None,
        drop_cond: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predicted clean image embedding [B, emb_dim].

        x_t [B, emb_dim] noised scaled image embedding; t [B] long timesteps; text_emb [B, emb_dim] (its
        direction: L2-normalised here);
        text_enc [B, L, text_enc_dim] padded to the batch's longest caption, or None; text_enc_mask [B, L]
        bool, True = real token (None = all real); drop_cond [B] bool, True = replace the text embedding by
        the learned null embedding and ignore the text encodings (None = keep every condition).
        Float inputs of any dtype are cast to the module's dtype and device.
        """
        b, dev = x_t.shape[0], self.query.device
        if drop_cond is None:
            drop_cond = torch.zeros(b, dtype=torch.bool)
        drop = drop_cond.to(dev, torch.bool)  # [B]
        # unit norm here, as sampling's CLIP text embeddings are: a store adopted without --normalize holds raw
        # ones, on which the prior trained off the inputs `unclip sample` gives it
        txt = self.text_in(F.normalize(text_emb.to(self.query), dim=-1))  # [B, dim]
        txt = torch.where(drop[:, None], self.null_text, txt)  # [B, dim]
        special = [txt, self.time_in(t.to(dev)), self.image_in(x_t.to(self.query)), self.query.expand(b, -1)]
        enc, enc_valid = self._text_tokens(text_enc, text_enc_mask, drop)  # [B, L, dim], [B, L]
        h = torch.cat([enc, torch.stack(special, dim=1)], dim=1)  # [B, L + 4, dim]
        valid = torch.cat([enc_valid, torch.ones(b, 4, dtype=torch.bool, device=dev)], dim=1)  # [B, L + 4]
        mask = causal_padding_mask(valid)  # [B, 1, L + 4, L + 4]
        for block in self.blocks:
            h = block(h, mask)
        return self.out(self.ln_out(h[:, -1]))  # [B, emb_dim], read at the learned query


def _double(x: torch.Tensor | None) -> torch.Tensor | None:
    """[B, ...] -> [2B, ...] (the batch twice), for one conditional + unconditional forward pass."""
    return None if x is None else torch.cat([x, x], dim=0)


class DiffusionPrior(nn.Module):
    """`PriorNetwork` + cosine `GaussianDiffusion` over image embeddings scaled by `cfg.embed_scale`."""

    def __init__(self, cfg: PriorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.net = PriorNetwork(cfg)
        self.diffusion = GaussianDiffusion(cfg.timesteps)  # no parameters or buffers: not in state_dict

    def loss(
        self,
        image_emb: torch.Tensor,
        text_emb: torch.Tensor,
        text_enc: torch.Tensor | None = None,
        text_enc_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Scalar x0 MSE for image_emb [B, emb_dim] given text_emb [B, emb_dim] (+ encodings [B, L, W]).

        The image embedding is L2-normalised and scaled by `cfg.embed_scale`; each sample's condition is
        dropped with probability `cfg.cond_drop_prob`. `generator` (any device) makes t, dropout and noise
        reproducible.
        """
        ref = self.net.query
        x0 = F.normalize(image_emb.to(ref), dim=-1) * self.cfg.embed_scale  # [B, emb_dim]
        gen_dev = generator.device if generator is not None else ref.device
        u = torch.rand(x0.shape[0], generator=generator, device=gen_dev).to(ref.device)  # [B]
        drop = u < self.cfg.cond_drop_prob

        def model_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.net(x_t, t, text_emb, text_enc, text_enc_mask, drop)

        return self.diffusion.x0_loss(model_fn, x0, generator=generator)

    def predict_x0(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        text_emb: torch.Tensor,
        text_enc: torch.Tensor | None = None,
        text_enc_mask: torch.Tensor | None = None,
        guidance_scale: float = 1.0,
    ) -> torch.Tensor:
        """Guided x0 prediction [B, emb_dim]: uncond + scale * (cond - uncond), one doubled-batch pass."""
        if guidance_scale == 1.0:
            return self.net(x_t, t, text_emb, text_enc, text_enc_mask)
        b = x_t.shape[0]
        drop = torch.arange(2 * b, device=self.net.query.device) >= b  # [2B]: second half unconditional
        args = (_double(x_t), _double(t), _double(text_emb), _double(text_enc), _double(text_enc_mask))
        cond, uncond = self.net(*args, drop_cond=drop).chunk(2, dim=0)  # 2 x [B, emb_dim]
        return guided(cond, uncond, guidance_scale)

    @torch.no_grad()
    def sample(
        self,
        text_emb: torch.Tensor,
        text_enc: torch.Tensor | None = None,
        text_enc_mask: torch.Tensor | None = None,
        steps: int = 64,
        guidance_scale: float | None = None,
        sampler: str = "ddim",
        generator: torch.Generator | None = None,
        on_step: Callable[[], object] | None = None,
    ) -> torch.Tensor:
        """Image embeddings [B, emb_dim] for text_emb [B, emb_dim]: float32, L2-normalised, unscaled.

        `sampler` is "ddim" or "dpm++" (`models.samplers`, x0 parametrisation) over `steps` steps;
        guidance_scale None = `cfg.guidance_scale`; `on_step` is called after each step. Runs in eval mode
        (dropout off), restores the mode.
        """
        from models.samplers import sample as run_sampler

        scale = self.cfg.guidance_scale if guidance_scale is None else guidance_scale
        ref = self.net.query

        def model_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.predict_x0(x_t, t, text_emb, text_enc, text_enc_mask, scale)

        was_training = self.training
        self.eval()
        try:
            x0 = run_sampler(
                model_fn,
                (text_emb.shape[0], self.cfg.emb_dim),
                sampler=sampler,
                steps=steps,
                prediction_type="sample",
                num_train_timesteps=self.cfg.timesteps,
                generator=generator,
                device=ref.device,
                dtype=ref.dtype,
                on_step=on_step,
            )
        finally:
            self.train(was_training)
        return F.normalize(x0.float(), dim=-1)


def build_prior(prior_cfg: dict) -> DiffusionPrior:
    """The prior from its config as saved in a checkpoint's meta.json (a plain dict)."""
    return DiffusionPrior(PriorConfig(**prior_cfg))
