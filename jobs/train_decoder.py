"""`unclip train-decoder`: train the image decoder (CLIP image embedding -> latents) on a store with latents.

Streams (image embedding, uint8 latents) through `pipeline.stream`; latents are dequantised on the training
device with the manifest's constants (the ``pixels`` codec to [-1, 1]). Writes under ``--out`` what
`jobs.train_loop` writes, plus ``reconstructions.png`` at every evaluation: held-out true images (odd rows)
above the decoder's reconstructions from their image embeddings (even rows), EMA weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from dataclasses import dataclass

import numpy as np
import torch

from jobs.render import latents_to_images, save_grid, vae_source
from jobs.train_loop import RunState, Task, TrainConfig, train
from models.decoder import DECODER_PRESETS, DiffusionDecoder, build_decoder, decoder_config
from models.samplers import SAMPLERS
from pipeline.errors import UsageError
from pipeline.stream import dequantize_torch

log = logging.getLogger(__name__)


@dataclass
class TrainDecoderConfig(TrainConfig):
    preset: str = "tiny"  # tiny, tiny-base (pixels codec), b32, base or large (VAE latents)
    lr: float = 2e-4
    weight_decay: float = 1e-2  # light: the UNet's convolutions overfit little at these data sizes
    warmup_steps: int = 200
    eval_samples: int = 16  # held-out images reconstructed into reconstructions.png at each evaluation
    sample_steps: int = 25  # sampler steps of the evaluation's reconstructions
    sampler: str = "dpm++"  # dpm++ or ddim
    guidance_scale: float | None = None  # guidance recorded for sampling; default: the preset's
    snr_shift: float | None = None  # timesteps shifted towards noise (models.decoder); default: the preset's
    # Train at this latent side, the store's latents area-pooled to it: the first stage of a two-stage decoder
    # (`unclip sample --base`), e.g. 8 with the `tiny-base` preset on the demo's 32 px pixels. 0 = the store's.
    resolution: int = 0


def dequantized_latents(batch: dict, codec: dict, size: int | None = None) -> torch.Tensor:
    """Model-scale latents float32 [B, C, h, w] from the batch's uint8 latents, on their device; area-pooled to
    size x size where that is given and smaller."""
    x = dequantize_torch(batch["latents"], codec["lo"], codec["hi"])
    if size is not None and size != x.shape[-1]:
        x = torch.nn.functional.interpolate(x.float(), size=(size, size), mode="area")
    return x


# Presets made to be the first stage of a two-stage decoder: without --resolution they train at their own side.
FIRST_STAGES = ("tiny-base",)


class DecoderTask(Task):
    name = "decoder"
    loss_label = "loss (min-SNR weighted v MSE)"
    fields = ("img_emb", "latents")
    # each resolved into the network's config: latent_size, snr_shift, guidance_scale
    model_settings = frozenset({"resolution", "snr_shift", "guidance_scale"})
    cfg: TrainDecoderConfig

    def model_config(self, manifest: dict) -> dict:
        cfg = self.cfg
        if cfg.preset not in DECODER_PRESETS:
            raise UsageError(f"unknown --preset '{cfg.preset}'; valid: {', '.join(DECODER_PRESETS)}")
        if cfg.sampler not in SAMPLERS:
            raise UsageError(f"unknown --sampler '{cfg.sampler}'; valid: {', '.join(SAMPLERS)}")
        if cfg.snr_shift is not None and not cfg.snr_shift > 0:
            raise UsageError(f"--snr-shift must be > 0 (1 = uniform timesteps), got {cfg.snr_shift}")
        codec = manifest.get("latents")
        if not codec:
            raise UsageError(
                f"--data {cfg.data} has no latents; embed the shards with `unclip embed --latents pixels` "
                "(or `--latents vae --vae NAME_OR_PATH`) to train a decoder"
            )
        self.codec = codec
        # rank 0's evaluation decodes its pictures with the store's VAE: checked there before step 0
        if codec["codec"] == "vae" and cfg.eval_every and int(os.environ.get("RANK", "0")) == 0:
            vae_source(
                codec, fix="put that VAE back there, or train with --eval-every 0 (no evaluation pictures)"
            )
        c, h, w = codec["shape"]
        if h != w:
            raise UsageError(f"the store's latents are {h}x{w}; the decoder needs square latents")
        if cfg.resolution and not (0 < cfg.resolution <= h and h % cfg.resolution == 0):
            raise UsageError(
                f"--resolution {cfg.resolution} must divide the store's latent side {h} (0 = train at {h})"
            )
        self.size = cfg.resolution or h
        own = DECODER_PRESETS[cfg.preset].latent_size
        if not cfg.resolution and cfg.preset in FIRST_STAGES and own < h and h % own == 0:
            self.size = (
                own  # a first stage at the store's full side took hours for what it is not meant to do
            )
            log.info(
                "--preset %s: training at its own %d x %d (the store's %d pooled; --resolution to change)",
                cfg.preset,
                own,
                own,
                h,
            )
        overrides = {"emb_dim": manifest["clip"]["dim"], "latent_channels": c, "latent_size": self.size}
        for name in ("guidance_scale", "snr_shift"):
            if getattr(cfg, name) is not None:
                overrides[name] = getattr(cfg, name)
        try:
            dc = decoder_config(cfg.preset, **overrides)
        except ValueError as e:
            raise UsageError(
                f"preset '{cfg.preset}' does not fit the store's latents {c}x{h}x{w}: {e}"
            ) from e
        return dataclasses.asdict(dc)

    def build(self, model_cfg: dict) -> DiffusionDecoder:
        return build_decoder(model_cfg)

    def loss(self, model: DiffusionDecoder, batch: dict, generator: torch.Generator) -> torch.Tensor:
        return model.loss(
            dequantized_latents(batch, self.codec, self.size), batch["img_emb"].float(), generator
        )

    def evaluate(self, run: RunState, step: int) -> dict | None:
        val = self.val_stream(batch_size=self.cfg.eval_samples)
        if val.num_samples == 0:
            log.warning("no held-out samples (val_fraction %.3f): skipping evaluation", self.cfg.val_fraction)
            return None
        with contextlib.closing(val.torch_batches(run.device)) as batches:  # its prefetch thread stops here
            b = next(batches)
        true = dequantized_latents(b, self.codec, self.size)
        gen = torch.Generator().manual_seed(0)
        recon = run.ema.sample(
            b["img_emb"].float(), steps=self.cfg.sample_steps, sampler=self.cfg.sampler, generator=gen
        )
        try:
            images = [latents_to_images(x, self.codec, run.device) for x in (true, recon)]
        except (UsageError, OSError) as e:
            # the VAE moved or was rewritten since step 0: the training goes on, without this evaluation's pictures
            log.warning("evaluation at step %d: no pictures: %s", step, e)
            return {"samples": len(true), "recon_latent_mse": float(((recon - true.float()) ** 2).mean())}
        cols = min(8, len(true))
        grid = []
        for s in range(0, len(true), cols):  # a row of true images, then the same images reconstructed
            grid += [images[0][s : s + cols], images[1][s : s + cols]]
        save_grid(np.concatenate(grid), run.out / "reconstructions.png", cols)
        return {
            "samples": len(true),
            "recon_latent_mse": float(((recon - true.float()) ** 2).mean()),
            "recon_pixel_mae": float(abs(images[1].astype(float) - images[0].astype(float)).mean()),
        }


def main(cfg: TrainDecoderConfig) -> dict:
    return train(DecoderTask(cfg))


run = main  # the CLI calls `run(cfg)` on every stage
