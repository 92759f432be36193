"""`unclip bench`, prior: train-step samples/s and sampling time of the prior, each in its own process, and
the trainer's peak RSS on a store twice as large."""

from __future__ import annotations

import shutil
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING

from jobs.bench.data import random_store
from jobs.bench.harness import PY, measure, probe

if TYPE_CHECKING:
    from jobs.bench.main import BenchConfig


def probe_prior(preset: str, batch: int, steps: int, sample_prompts: int, sample_steps: int) -> dict:
    import torch

    from models.prior import DiffusionPrior, prior_config

    torch.manual_seed(0)
    prior = DiffusionPrior(prior_config(preset, emb_dim=512 if preset != "tiny" else 64, text_enc_dim=0))
    opt = torch.optim.AdamW(prior.parameters(), lr=1e-4)
    d = prior.cfg.emb_dim
    img, txt = torch.randn(batch, d), torch.randn(batch, d)

    def step():
        loss = prior.loss(img, txt)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    train = batch * steps / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    with torch.no_grad():
        prior.sample(torch.randn(sample_prompts, d), steps=sample_steps)
    return {"train_samples_per_s": train, "sample_seconds": time.perf_counter() - t0}


def trainer_peak_rss(data: Path, out: Path) -> float:
    """Peak RSS (MB) of 20 `unclip train-prior` steps on ``data``."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [PY, "-m", "jobs.cli", "train-prior", "--data", str(data), "--out", str(out)]
    return measure(cmd + "--steps 20 --eval-every 0 --batch-size 64".split()).peak_rss_mb


def bench(cfg: BenchConfig, work: Path) -> dict:
    preset = "tiny" if cfg.quick else "vit-b-32"
    kw = dict(
        preset=preset,
        batch=64,
        steps=3 if cfg.quick else 10,
        sample_prompts=64,
        sample_steps=4 if cfg.quick else 64,
    )
    runs = [probe(probe_prior, **kw)[0] for _ in range(cfg.repeats)]
    train = [r["train_samples_per_s"] for r in runs]
    sample = [r["sample_seconds"] for r in runs]
    rss = {}
    for tag, shards in (("1x", 4), ("2x", 8)):  # the trainer over a store twice as large
        rss[tag] = trainer_peak_rss(
            random_store(work / f"prior_{tag}", shards, 2048, 64), work / f"prior_run_{tag}"
        )
    return {
        "prior_train": {
            "samples_per_s": train,
            "median": statistics.median(train),
            "preset": preset,
            "batch": 64,
            "unit": "train-step samples/s on CPU",
        },
        "prior_sample": {
            "seconds": sample,
            "median": statistics.median(sample),
            "prompts": 64,
            "ddim_steps": kw["sample_steps"],
            "unit": "seconds to sample 64 prompts",
        },
        "prior_peak_rss_mb": rss,
    }
