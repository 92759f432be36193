"""`unclip bench`, decoder: train-step samples/s and sampling time, each in its own process.

Sampling is timed for 36 images (a 6 x 6 grid, the size transformer-latent-diffusion reports) at 15 and 25
steps with each sampler (guidance 1: one network pass a step; guidance > 1 doubles the batch of each pass),
and for `tiny` also through the demo's two stages (`tiny-base` at 8 x 8 over all the steps, then `tiny` from
the upsampled picture over the last half, `--strength 0.5`). On CUDA the `base` preset is measured too.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING

from jobs.bench.harness import probe

if TYPE_CHECKING:
    from jobs.bench.main import BenchConfig


def probe_decoder(
    preset: str, batch: int, steps: int, images: int, sample_steps: list[int], device: str
) -> dict:
    import torch

    from models.decoder import DiffusionDecoder, decoder_config

    torch.manual_seed(0)
    emb_dim = 64 if preset == "tiny" else 768
    dec = DiffusionDecoder(decoder_config(preset, emb_dim=emb_dim)).to(device)
    c = dec.cfg
    opt = torch.optim.AdamW(dec.parameters(), lr=1e-4)
    lat = torch.rand(batch, c.latent_channels, c.latent_size, c.latent_size, device=device) * 2 - 1
    emb = torch.randn(batch, emb_dim, device=device)
    cuda = device.startswith("cuda")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            loss = dec.loss(lat, emb)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dec.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    out = {"train_samples_per_s": batch * steps / (time.perf_counter() - t0), "sample_seconds": {}}
    e = torch.randn(images, emb_dim, device=device)
    for sampler in ("ddim", "dpm++"):  # warm-up at the timed batch and precision: kernels, autotuning
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            dec.sample(e, steps=2, sampler=sampler, guidance_scale=1.0)
    for sampler in ("ddim", "dpm++"):
        for n in sample_steps:
            sync()
            t0 = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                dec.sample(e, steps=n, sampler=sampler, guidance_scale=1.0)
            sync()
            out["sample_seconds"][f"{sampler}_{n}"] = time.perf_counter() - t0
    if preset == "tiny":
        from jobs.sample import two_stage as sample_two_stage

        base = DiffusionDecoder(decoder_config("tiny-base", emb_dim=emb_dim)).to(device)

        def two_stage(n: int) -> None:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                sample_two_stage(base, dec, e, 0.5, steps=n, sampler="dpm++", guidance_scale=1.0)

        two_stage(2)  # warm-up
        for n in sample_steps:
            sync()
            t0 = time.perf_counter()
            two_stage(n)
            sync()
            out["sample_seconds"][f"two_stage_dpm++_{n}"] = time.perf_counter() - t0
    return out


def bench(cfg: BenchConfig, work: Path) -> dict:
    kw = dict(
        preset="tiny",
        batch=32,
        steps=3 if cfg.quick else 20,
        images=36,
        sample_steps=[2] if cfg.quick else [15, 25],
        device="cpu",
    )
    runs = [probe(probe_decoder, **kw)[0] for _ in range(cfg.repeats)]
    train = [r["train_samples_per_s"] for r in runs]
    results = {
        "decoder_train": {
            "samples_per_s": train,
            "median": statistics.median(train),
            "preset": "tiny",
            "batch": 32,
            "unit": "train-step samples/s on CPU (tiny: 3x32x32 pixels, 4.9 M parameters)",
        },
        "decoder_sample": {
            **{k: statistics.median(r["sample_seconds"][k] for r in runs) for k in runs[0]["sample_seconds"]},
            "images": 36,
            "unit": "seconds to sample 36 images (tiny, CPU, guidance 1), median; key = sampler_steps; "
            "two_stage_*: tiny-base at 8 x 8, then tiny over the last half of the steps",
        },
    }
    import torch

    if torch.cuda.is_available() and not cfg.quick:
        gpu, _ = probe(probe_decoder, **{**kw, "preset": "base", "batch": 64, "device": "cuda"})
        results["decoder_base_cuda"] = {
            "train_samples_per_s": gpu["train_samples_per_s"],
            **gpu["sample_seconds"],
            "device": torch.cuda.get_device_name(0),
            "unit": "base preset (190 M) on the GPU, bf16 autocast: train samples/s (batch 64); seconds for 36 "
            "images (no VAE decode)",
        }
    return results
