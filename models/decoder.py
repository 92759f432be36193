"""unCLIP decoder: CLIP image embedding -> image latents, a diffusers UNet in Kandinsky 2.2's decoder form.

The network is `diffusers.UNet2DConditionModel` configured as Kandinsky 2.2's decoder: the image embedding
enters twice, as an addition to the timestep embedding (``addition_embed_type="image"``) and as a few
cross-attention tokens (``encoder_hid_dim_type="image_proj"``); there are no text hidden states. It predicts
``2 * C`` channels like Kandinsky's (whose pipeline splits off a variance half); the loss uses the first half.
So a trained decoder is a plain diffusers UNet (`unet.save_pretrained` writes it) that
`KandinskyV22Pipeline` can load. The ``pixels`` codec (the image itself, 3 x 32 x 32) is folded
space-to-depth into 12 x 16 x 16 before the UNet and unfolded after it.

Diffusion: the prior's cosine schedule (diffusers' ``squaredcos_cap_v2``), v-prediction (Salimans & Ho 2022;
well-conditioned at both ends of the schedule, unlike eps near t = T or x0 near t = 0), and min-SNR-5 loss
weighting (Hang et al. 2023: for v-prediction the per-sample weight is min(SNR, 5) / (SNR + 1)), which stops the
many low-noise steps from dominating and speeds up convergence. Training timesteps can be drawn shifted
towards noise (``snr_shift``; the schedule and the samplers stay as they are). Where a picture is laid out — which
colour goes where — is settled at the noisiest steps, and the flatter the picture the noisier they are: the
demo's flat shapes are still legible at a log-SNR where a photo is not. Drawn uniformly, those steps are a small
share of training and min-SNR weights them by their SNR, so the layout is learnt last. The `tiny` preset draws
them with shift 4: on the demo store after 1,000 steps (111 held-out reconstructions, guidance 2), the shape
colour at its stated position was 0.36 with uniform draws, 0.54 with shift 2.5 or 4, 0.48 with shift 8. The VAE
presets keep uniform draws (not measured on VAE latents). 10% of conditions are dropped to a zero embedding, the
"negative" embedding of classifier-free guidance at sampling (and of an exported pipeline).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from models.diffusion import GaussianDiffusion, _randn


@dataclass
class DecoderConfig:
    emb_dim: int = 768  # CLIP image embedding size; set from the store's manifest
    latent_channels: int = 4  # 4 for an SD-style VAE, 3 for the pixels codec
    latent_size: int = 32  # latents are latent_size x latent_size
    space_to_depth: int = 1  # fold f x f pixel blocks into channels before the UNet (1 = none)
    widths: tuple[int, ...] = (256, 512, 768, 1024)  # UNet block widths; the first block has no attention
    layers_per_block: int = 2
    attention_head_dim: int = 64
    cross_attention_dim: int = 768  # width of the image-embedding tokens the UNet cross-attends to
    norm_groups: int = 32
    timesteps: int = 1000
    cond_drop_prob: float = 0.1  # DALL-E 2: 10% unconditional, so one network serves guidance too
    min_snr_gamma: float = 5.0  # Hang et al.'s recommended gamma
    # Training timesteps drawn as if the schedule's log-SNR were lowered by 2 log(snr_shift) (1 = uniform draws).
    # Sampling is unchanged. See the module docstring for why the demo's flat-colour pictures want 4.
    snr_shift: float = 1.0
    # 1 = the plain conditional prediction. Kandinsky 2.2 samples at 4, but guidance extrapolates away from the
    # unconditional branch, which a short run (10% of its steps) has barely trained: raise it for long runs.
    guidance_scale: float = 1.0
    unet_extra: dict = field(default_factory=dict)  # any other UNet2DConditionModel argument

    def __post_init__(self) -> None:
        self.widths = tuple(int(w) for w in self.widths)
        self.unet_extra = dict(self.unet_extra)  # its own copy: a preset's dict is never shared
        for name in (
            "emb_dim",
            "latent_channels",
            "latent_size",
            "space_to_depth",
            "layers_per_block",
            "attention_head_dim",
            "cross_attention_dim",
            "timesteps",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"DecoderConfig.{name} must be >= 1, got {getattr(self, name)}")
        if len(self.widths) < 2:
            raise ValueError(f"DecoderConfig.widths needs at least 2 blocks, got {self.widths}")
        bad = [w for w in self.widths if w % self.norm_groups or w % self.attention_head_dim]
        if bad:
            raise ValueError(
                f"DecoderConfig.widths {bad} must be multiples of norm_groups {self.norm_groups} and "
                f"attention_head_dim {self.attention_head_dim}"
            )
        if self.latent_size % self.space_to_depth:
            raise ValueError(
                f"latent_size {self.latent_size} is not divisible by space_to_depth {self.space_to_depth}"
            )
        side, down = self.latent_size // self.space_to_depth, 2 ** (len(self.widths) - 1)
        if side % down:
            raise ValueError(
                f"the UNet sees {side} x {side} latents, not divisible by its {down}x downsampling "
                f"({len(self.widths)} blocks)"
            )
        if not self.snr_shift > 0:
            raise ValueError(f"DecoderConfig.snr_shift must be > 0, got {self.snr_shift}")
        if not 0.0 <= self.cond_drop_prob < 1.0:
            raise ValueError(f"DecoderConfig.cond_drop_prob must be in [0, 1), got {self.cond_drop_prob}")

    @property
    def unet_channels(self) -> int:
        return self.latent_channels * self.space_to_depth**2


DECODER_PRESETS: dict[str, DecoderConfig] = {
    # CPU demo: the 32 px pixels codec folded to 12 x 16 x 16; ~4.9 M parameters, ~0.16-0.3 s a batch-32 step
    # on 2 cores. Widths 32/64/128 (head 32: 1, 2 and 4 heads), one layer a block. The timestep embedding, which
    # carries the image embedding to every ResNet's scale and shift, is 512 wide instead of diffusers' default
    # 4 x 32 = 128: the same step time (0.996x, measured side by side), and on the demo store after 1,000 steps
    # the shape colour at its stated position rose 0.634 -> 0.701 (reconstruction) and 0.602 -> 0.643 (text ->
    # image), the mean of two seeds, each seed gaining.
    "tiny": DecoderConfig(
        latent_channels=3,
        latent_size=32,
        space_to_depth=2,
        widths=(32, 64, 128),
        layers_per_block=1,
        attention_head_dim=32,
        cross_attention_dim=128,
        snr_shift=4.0,
        unet_extra={"time_embedding_dim": 512},
    ),
    # The first stage of a two-stage decoder for the demo (`train-decoder --resolution 8`, then `sample --base`):
    # the same image conditioning on the 32 px pictures area-pooled to 8 x 8, ~1.8 M parameters, ~70 ms a
    # batch-64 step on 2 cores, so it sees four times the samples of `tiny` in about the same time. Where each
    # colour goes is decided there; `tiny` then redraws the upsampled picture from half way (strength 0.5).
    "tiny-base": DecoderConfig(
        latent_channels=3,
        latent_size=8,
        widths=(32, 64),
        layers_per_block=1,
        attention_head_dim=32,
        cross_attention_dim=128,
        snr_shift=4.0,
        unet_extra={"time_embedding_dim": 512},
    ),
    # 4 x 32 x 32 SD-VAE latents of 256 px images, 768-d CLIP: 85 M, 190 M and 890 M parameters.
    "b32": DecoderConfig(widths=(128, 256, 448)),
    "base": DecoderConfig(widths=(192, 320, 448, 640)),
    "large": DecoderConfig(widths=(320, 640, 960, 1280), layers_per_block=3, cross_attention_dim=1024),
}


def decoder_config(name: str, **overrides: object) -> DecoderConfig:
    """The preset `name` with fields replaced by `overrides` (emb_dim and the latent shape from the store)."""
    if name not in DECODER_PRESETS:
        raise ValueError(f"unknown decoder preset '{name}'; valid: {', '.join(DECODER_PRESETS)}")
    fields = [f.name for f in dataclasses.fields(DecoderConfig)]
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(f"unknown DecoderConfig field(s) {', '.join(unknown)}; valid: {', '.join(fields)}")
    return dataclasses.replace(DECODER_PRESETS[name], **overrides)


def unet_kwargs(cfg: DecoderConfig) -> dict:
    """UNet2DConditionModel arguments of Kandinsky 2.2's decoder form at this config's sizes."""
    n = len(cfg.widths)
    return dict(
        sample_size=cfg.latent_size // cfg.space_to_depth,
        in_channels=cfg.unet_channels,
        out_channels=2 * cfg.unet_channels,  # [prediction, variance] as Kandinsky's; the variance is unused
        down_block_types=["ResnetDownsampleBlock2D"] + ["SimpleCrossAttnDownBlock2D"] * (n - 1),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        up_block_types=["SimpleCrossAttnUpBlock2D"] * (n - 1) + ["ResnetUpsampleBlock2D"],
        block_out_channels=list(cfg.widths),
        layers_per_block=cfg.layers_per_block,
        attention_head_dim=cfg.attention_head_dim,
        cross_attention_dim=cfg.cross_attention_dim,
        encoder_hid_dim=cfg.emb_dim,
        encoder_hid_dim_type="image_proj",
        addition_embed_type="image",
        addition_embed_type_num_heads=cfg.attention_head_dim,
        resnet_time_scale_shift="scale_shift",
        norm_num_groups=cfg.norm_groups,
        **cfg.unet_extra,
    )


def space_to_depth(x: torch.Tensor, f: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, C * f * f, H / f, W / f]."""
    return x if f == 1 else F.pixel_unshuffle(x, f)


def depth_to_space(x: torch.Tensor, f: int) -> torch.Tensor:
    """[B, C * f * f, H / f, W / f] -> [B, C, H, W]."""
    return x if f == 1 else F.pixel_shuffle(x, f)


class DiffusionDecoder(nn.Module):
    """The UNet (`self.unet`, a diffusers module) + the cosine `GaussianDiffusion`, v-prediction."""

    def __init__(self, cfg: DecoderConfig) -> None:
        from diffusers import UNet2DConditionModel

        super().__init__()
        self.cfg = cfg
        self.unet = UNet2DConditionModel(**unet_kwargs(cfg))
        self.diffusion = GaussianDiffusion(cfg.timesteps)  # no parameters or buffers: not in state_dict
        self._train_t = self.diffusion.shifted_timesteps(cfg.snr_shift)  # uniform draw -> training timestep

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, image_emb: torch.Tensor) -> torch.Tensor:
        """v prediction [B, C', h, w] (the first half of the UNet's channels).

        x_t [B, C', h, w] noised latents after space-to-depth; t [B] long; image_emb [B, emb_dim] (zeros = the
        unconditional embedding). Inputs are cast to the UNet's dtype.
        """
        ref = self.unet.conv_in.weight
        out = self.unet(
            x_t.to(ref), t, encoder_hidden_states=None, added_cond_kwargs={"image_embeds": image_emb.to(ref)}
        ).sample  # [B, 2C', h, w]
        return out[:, : self.cfg.unet_channels]  # [B, C', h, w]

    def loss(
        self, latents: torch.Tensor, image_emb: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Min-SNR-weighted v MSE for latents [B, C, H, W] (model scale) given image_emb [B, emb_dim].

        The embedding is L2-normalised; each sample's is replaced by zeros with probability cond_drop_prob.
        `generator` (any device) draws t, the dropout and the noise, so a seed reproduces a step exactly.
        """
        ref = self.unet.conv_in.weight
        x0 = space_to_depth(latents.to(ref), self.cfg.space_to_depth)  # [B, C', h, w]
        b = x0.shape[0]
        gen_dev = generator.device if generator is not None else ref.device
        keep = torch.rand(b, generator=generator, device=gen_dev).to(ref.device) >= self.cfg.cond_drop_prob
        emb = F.normalize(image_emb.to(ref), dim=-1) * keep[:, None].to(ref)  # [B, emb_dim]
        t = self._train_t.to(ref.device)[self.diffusion.sample_t(b, ref.device, generator)]  # [B]
        noise = _randn(tuple(x0.shape), generator, ref.device, ref.dtype)
        x_t = self.diffusion.q_sample(x0, t, noise)
        ab = self.diffusion.alpha_bar.to(ref.device)[t]  # [B]
        v = ab.sqrt().view(-1, 1, 1, 1) * noise - (1 - ab).sqrt().view(-1, 1, 1, 1) * x0  # [B, C', h, w]
        snr = ab / (1 - ab)  # [B]
        weight = snr.clamp(max=self.cfg.min_snr_gamma) / (snr + 1)  # min-SNR-gamma for v-prediction
        err = (self(x_t, t, emb).float() - v.float()).pow(2).mean(dim=(1, 2, 3))  # [B]
        return (weight * err).mean()

    def predict_v(
        self, x_t: torch.Tensor, t: torch.Tensor, image_emb: torch.Tensor, guidance_scale: float = 1.0
    ) -> torch.Tensor:
        """Guided v [B, C', h, w]: uncond + scale * (cond - uncond) in one doubled-batch pass; 1 = cond only."""
        if guidance_scale == 1.0:
            return self(x_t, t, image_emb)
        both = torch.cat([image_emb, torch.zeros_like(image_emb)])  # [2B, emb_dim]: second half unconditional
        cond, uncond = self(torch.cat([x_t, x_t]), torch.cat([t, t]), both).chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    @torch.no_grad()
    def sample(
        self,
        image_emb: torch.Tensor,
        steps: int = 25,
        sampler: str = "dpm++",
        guidance_scale: float | None = None,
        generator: torch.Generator | None = None,
        init: torch.Tensor | None = None,
        strength: float = 1.0,
        on_step: Callable[[], object] | None = None,
    ) -> torch.Tensor:
        """Latents [B, C, H, W] float32 (model scale) for image_emb [B, emb_dim]; guidance None = the config's.
        With `init` latents [B, C, H, W] (a base decoder's upsampled picture): image to image, the last
        `strength` of the steps from `init` noised to there (`models.samplers.sample`). `on_step` is called
        after each step. Runs in eval mode and restores the previous mode."""
        from models.samplers import sample as run_sampler

        scale = self.cfg.guidance_scale if guidance_scale is None else guidance_scale
        ref = self.unet.conv_in.weight
        emb = F.normalize(image_emb.to(ref), dim=-1)
        side = self.cfg.latent_size // self.cfg.space_to_depth
        was_training = self.training
        self.eval()
        try:
            x = run_sampler(
                lambda x_t, t: self.predict_v(x_t, t, emb, scale),
                (emb.shape[0], self.cfg.unet_channels, side, side),
                sampler=sampler,
                steps=steps,
                prediction_type="v_prediction",
                num_train_timesteps=self.cfg.timesteps,
                generator=generator,
                device=ref.device,
                dtype=ref.dtype,
                init=None
                if init is None
                else space_to_depth(init.to(ref.device).float(), self.cfg.space_to_depth),
                strength=strength,
                on_step=on_step,
            )
        finally:
            self.train(was_training)
        return depth_to_space(x.float(), self.cfg.space_to_depth)  # [B, C, H, W]


def build_decoder(cfg: dict) -> DiffusionDecoder:
    """The decoder from its config as saved in a checkpoint's meta.json (a plain dict)."""
    return DiffusionDecoder(DecoderConfig(**cfg))
