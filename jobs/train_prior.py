"""`unclip train-prior`: train the diffusion prior on a store's (text embedding -> image embedding) pairs.

Reads the store through `pipeline.stream`; writes under ``--out`` what `jobs.train_loop` writes (``ckpt/``,
``metrics.jsonl``, ``loss.png``, ``config.json``). This module is only the prior's `Task`: its settings, its
network from the store's manifest, its loss and its held-out evaluation.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from jobs.train_loop import RunState, Task, TrainConfig, train
from models.prior import PRIOR_PRESETS, DiffusionPrior, build_prior, prior_config
from models.samplers import SAMPLERS
from pipeline.errors import UsageError

log = logging.getLogger(__name__)


@dataclass
class TrainPriorConfig(TrainConfig):
    preset: str = "tiny"  # tiny, vit-b-32 or vit-l-14
    text_encodings: bool = False  # condition on per-token encodings too (the store needs --text-encodings)
    eval_samples: int = 1024  # held-out pairs each evaluation samples embeddings for
    sample_steps: int = 64  # sampler steps of the evaluation
    sampler: str = "ddim"  # ddim or dpm++, for evaluation
    guidance_scale: float = 1.0  # guidance of the evaluation, recorded for sampling; 1 = none


class PriorTask(Task):
    name = "prior"
    loss_label = "loss (x0 MSE)"
    model_settings = frozenset({"guidance_scale"})  # recorded in the network's config
    cfg: TrainPriorConfig

    @property
    def fields(self) -> tuple[str, ...]:
        return ("img_emb", "text_emb", "text_enc") if self.cfg.text_encodings else ("img_emb", "text_emb")

    def model_config(self, manifest: dict) -> dict:
        cfg = self.cfg
        if cfg.preset not in PRIOR_PRESETS:
            raise UsageError(f"unknown --preset '{cfg.preset}'; valid: {', '.join(PRIOR_PRESETS)}")
        if cfg.sampler not in SAMPLERS:
            raise UsageError(f"unknown --sampler '{cfg.sampler}'; valid: {', '.join(SAMPLERS)}")
        if cfg.text_encodings and not manifest.get("text_enc"):
            raise UsageError(
                f"--text-encodings needs a store embedded with --text-encodings; {cfg.data} has none"
            )
        width = manifest["text_enc"]["width"] if cfg.text_encodings else 0
        made_for, dim = PRIOR_PRESETS[cfg.preset].emb_dim, manifest["clip"]["dim"]
        if cfg.preset != "tiny" and made_for != dim and int(os.environ.get("RANK", "0")) == 0:
            log.warning(
                "--preset %s is sized for %d-d CLIP embeddings and %s holds %d-d ones (%s): it trains at %d-d, "
                "but the preset for this CLIP may fit it better",
                cfg.preset, made_for, cfg.data, dim, manifest["clip"].get("arch"), dim,
            )  # fmt: skip
        pc = prior_config(
            cfg.preset, emb_dim=manifest["clip"]["dim"], text_enc_dim=width, guidance_scale=cfg.guidance_scale
        )
        return asdict(pc)

    def build(self, model_cfg: dict) -> DiffusionPrior:
        return build_prior(model_cfg)

    def loss(self, model: DiffusionPrior, batch: dict, generator: torch.Generator) -> torch.Tensor:
        b = batch
        return model.loss(b["img_emb"], b["text_emb"], b.get("text_enc"), b.get("text_enc_mask"), generator)

    def evaluate(self, run: RunState, step: int) -> dict | None:
        from jobs.eval_prior import evaluate, format_table

        val = self.val_stream()
        if val.num_samples == 0:
            log.warning("no held-out samples (val_fraction %.3f): skipping evaluation", self.cfg.val_fraction)
            return None
        c = self.cfg
        m = evaluate(
            run.ema,
            val,
            c.sample_steps,
            c.guidance_scale,
            c.eval_samples,
            run.device,
            c.text_encodings,
            c.sampler,
        )
        tqdm.write(format_table(m))
        return m


def main(cfg: TrainPriorConfig) -> dict:
    return train(PriorTask(cfg))


run = main  # the CLI calls `run(cfg)` on every stage
