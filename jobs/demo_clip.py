"""A small CLIP for the offline demo: `unclip-tiny`, trained contrastively for a few minutes on the demo data.

No pretrained CLIP can be fetched offline, and a randomly initialised one maps every image to nearly the same
direction (one component carries ~87% of the variance on the demo set), which leaves a prior nothing to learn.
This job trains the small architecture on the demo's own images and captions (open_clip's model and
ClipLoss) and saves a plain state dict; `unclip embed --pretrained PATH` then loads it through the same
open_clip loading path that a real checkpoint takes. Reads ``DATA/demo.parquet`` + images; writes ``--out``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from pipeline.errors import UsageError

log = logging.getLogger(__name__)


@dataclass
class DemoClipConfig:
    data: str  # folder written by `unclip demo-data`
    out: str  # checkpoint file (.pt)
    arch: str = "unclip-tiny"
    steps: int = 300
    batch_size: int = 256
    lr: float = 1e-3
    # Linear warmup, then cosine decay to 10% (the trainers' schedule). Against a constant rate, at 800 steps an
    # MLP probe read each shape's colour at its position from the image embeddings at 0.69 instead of 0.61.
    warmup_steps: int = 50
    # NegCLIP-style hard negatives (Yuksekgonul et al. 2023): each caption's scene with its binding broken
    # (`demo_data.broken_binding`: two colours or two positions swapped, ...) as extra columns of the image ->
    # text softmax. Without them the demo CLIP's text embedding barely tells a caption from its colour-swapped
    # twin (cosine 0.95), and text -> prior -> image swaps colours in a third of two-colour scenes.
    hard_negatives: bool = True
    seed: int = 0


def contrastive_loss(img_f: torch.Tensor, txt_f: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric InfoNCE for B images [B, D] and B + K captions [B + K, D], caption i belonging to image i;
    the K extra captions are hard negatives, columns of the image -> text softmax only. K = 0 is open_clip's
    ClipLoss on one process."""
    b = len(img_f)
    logits = scale * img_f @ txt_f.T  # [B, B + K]
    labels = torch.arange(b, device=img_f.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits[:, :b].T, labels)) / 2


def run(cfg: DemoClipConfig) -> dict:
    from jobs.train_loop import adamw, lr_lambda
    from pipeline.demo_data import ATTRIBUTE_COLUMNS, broken_binding, caption_for
    from pipeline.encoders import load_clip, trimmed_text_forward

    if Path(cfg.out).exists():
        log.info("demo CLIP already trained: %s", cfg.out)
        return {"checkpoint": cfg.out, "skipped": True}
    if cfg.steps < 1:  # no step ran: an UnboundLocalError for the final loss
        raise UsageError(f"--clip-steps must be >= 1 (got {cfg.steps})")
    clip = load_clip(cfg.arch, "none", "cpu", cfg.seed)
    model = clip.model.train()
    columns = ["url", "caption", *(ATTRIBUTE_COLUMNS if cfg.hard_negatives else ())]
    table = pq.read_table(Path(cfg.data) / "demo.parquet", columns=columns).to_pydict()
    scenes = (
        [dict(zip(ATTRIBUTE_COLUMNS, v)) for v in zip(*(table[c] for c in ATTRIBUTE_COLUMNS))]
        if cfg.hard_negatives
        else []
    )
    images = torch.stack(
        [clip.preprocess(Image.open(Path(cfg.data) / u).convert("RGB")) for u in table["url"]]
    )
    tokens = clip.tokenizer(table["caption"])
    opt = adamw(model.parameters(), lr=cfg.lr, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.warmup_steps, cfg.steps))
    rng = np.random.default_rng(cfg.seed)
    bar = tqdm(range(cfg.steps), desc="demo-clip")
    for _ in bar:
        idx = rng.choice(len(images), size=min(cfg.batch_size, len(images)), replace=False)
        txt = tokens[idx]
        if cfg.hard_negatives:
            txt = torch.cat([txt, clip.tokenizer([caption_for(broken_binding(scenes[i], rng)) for i in idx])])
        img_f = model.encode_image(images[idx], normalize=True)
        # The text tower on the batch's longest caption, not the 32-token context: the same features, ~1/3 less work.
        txt_f = F.normalize(trimmed_text_forward(model, txt)[0], dim=-1)
        loss = contrastive_loss(img_f, txt_f, model.logit_scale.exp())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{cfg.out}.tmp"
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, cfg.out)
    load_clip.cache_clear()  # the cached random model was trained in place
    return {"checkpoint": cfg.out, "final_loss": loss.item()}
