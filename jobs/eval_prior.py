"""`unclip eval-prior`: the LAION prior card's metrics, and retrieval, on a store's held-out split.

Reads a checkpoint (EMA weights) and a store; writes ``eval.json`` next to the checkpoint (or ``--out``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline import store
from pipeline.errors import UsageError
from pipeline.stream import Stream, StreamConfig

log = logging.getLogger(__name__)
RETRIEVAL_POOL = 256  # candidates per retrieval query: a fixed pool keeps top-1 comparable across split sizes


@dataclass
class EvalPriorConfig:
    ckpt: str  # training --out folder, ckpt/ or step_* folder of a prior
    data: str  # the store it was trained on
    split: str = "val"  # val (the training run's held-out split), train or all
    out: str = ""  # the report's JSON path; default: eval.json in the checkpoint folder
    steps: int = 64  # sampler steps for the predictions
    sampler: str = "ddim"  # ddim or dpm++
    guidance_scale: float | None = None  # default: the checkpoint's own setting
    max_samples: int = 2048  # held-out pairs evaluated at most
    device: str = "auto"  # auto (cuda if visible, else cpu), cuda, cuda:N or cpu


@torch.no_grad()
def evaluate(
    prior,
    stream: Stream,
    steps: int,
    guidance: float | None,
    max_samples: int,
    device: str,
    use_text_enc: bool,
    sampler: str = "ddim",
) -> dict:
    """Mean cosines (prediction vs image, vs text, text vs image baseline, image vs a prediction from another
    sample's caption, mean-image predictor) and top-1/top-5 retrieval among groups of 256."""
    preds, imgs, txts = [], [], []
    gen = torch.Generator().manual_seed(0)
    n = 0
    for b in stream.torch_batches(device):
        enc = (b["text_enc"], b["text_enc_mask"]) if use_text_enc else (None, None)
        preds.append(
            prior.sample(
                b["text_emb"], *enc, steps=steps, guidance_scale=guidance, sampler=sampler, generator=gen
            ).float()
        )
        imgs.append(F.normalize(b["img_emb"].float(), dim=-1))
        txts.append(F.normalize(b["text_emb"].float(), dim=-1))
        n += len(imgs[-1])
        if n >= max_samples:
            break
    if not preds:
        raise UsageError(
            "the evaluation split is empty (a small or empty store, or --val-fraction 0); "
            "use --split all, or add data"
        )
    pred, img, txt = (torch.cat(x)[:max_samples].cpu() for x in (preds, imgs, txts))
    mean_img = F.normalize(img.mean(0, keepdim=True), dim=-1)
    out = {
        "samples": len(pred),
        "sim_pred_image": (pred * img).sum(-1).mean().item(),
        "sim_pred_text": (pred * txt).sum(-1).mean().item(),
        "sim_text_image_baseline": (txt * img).sum(-1).mean().item(),
        "sim_image_unrelated_pred": (img * pred.roll(1, 0)).sum(-1).mean().item(),
        "sim_mean_image_predictor": (img * mean_img).sum(-1).mean().item(),
    }
    for name, query in (("pred", pred), ("text", txt)):
        top1, top5, groups = 0.0, 0.0, 0
        for s in range(0, len(img), RETRIEVAL_POOL):
            q, c = query[s : s + RETRIEVAL_POOL], img[s : s + RETRIEVAL_POOL]
            if len(q) < 5:
                continue
            ranks = (q @ c.T).argsort(dim=1, descending=True)
            hit = ranks == torch.arange(len(q))[:, None]
            top1 += hit[:, :1].any(1).float().sum().item()
            top5 += hit[:, :5].any(1).float().sum().item()
            groups += len(q)
        out[f"top1_{name}"], out[f"top5_{name}"] = top1 / max(groups, 1), top5 / max(groups, 1)
    out["retrieval_pool"] = min(
        RETRIEVAL_POOL, len(img)
    )  # candidates per query (the last group may hold fewer)
    out["retrieval_chance_top1"] = 1 / out["retrieval_pool"]
    return out


def format_table(m: dict) -> str:
    # of a report from before the pool was recorded: its chance says how many candidates a query had
    pool = m.get("retrieval_pool") or round(1 / m["retrieval_chance_top1"])
    rows = [
        ("predicted vs true image (cos)", m["sim_pred_image"]),
        ("predicted vs text (cos)", m["sim_pred_text"]),
        ("text vs true image, baseline (cos)", m["sim_text_image_baseline"]),
        ("true image vs unrelated caption's prediction", m["sim_image_unrelated_pred"]),
        ("mean-image predictor vs true image (cos)", m["sim_mean_image_predictor"]),
        (f"top-1 retrieval / {pool}, prediction", m["top1_pred"]),
        (f"top-1 retrieval / {pool}, text embedding", m["top1_text"]),
        (f"top-5 retrieval / {pool}, prediction", m["top5_pred"]),
        (f"top-5 retrieval / {pool}, text embedding", m["top5_text"]),
        ("top-1 chance", m["retrieval_chance_top1"]),
    ]
    width = max(len(r[0]) for r in rows)
    return "\n".join(
        [f"eval-prior on {m['samples']} {_SPLIT_WORDS.get(m.get('split', 'val'))} samples"]
        + [f"  {name:<{width}}  {v:7.4f}" for name, v in rows]
    )


_SPLIT_WORDS = {"val": "held-out", "train": "training", "all": "store"}


def run(cfg: EvalPriorConfig) -> dict:
    from jobs import checkpoint
    from jobs.train_loop import load_store_manifest
    from models.samplers import SAMPLERS, check_steps
    from pipeline.encoders import resolve_device

    if cfg.sampler not in SAMPLERS:
        raise UsageError(f"unknown --sampler '{cfg.sampler}'; valid: {', '.join(SAMPLERS)}")
    for name in ("steps", "max_samples"):
        if getattr(cfg, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(cfg, name)})")
    from jobs.sample import check_guidance

    check_guidance(cfg)
    if cfg.out:
        store.check_out_file(cfg.out, ours=is_eval_report, what="an earlier eval-prior report")

    folder = checkpoint.resolve(cfg.ckpt)
    meta = checkpoint.read_meta(folder)
    if meta.get("task") != "prior":
        raise UsageError(f"{folder} is a {meta.get('task')} checkpoint, not a prior")
    if not cfg.out:  # the default, beside the checkpoint, which may be shared and read-only
        checkpoint.default_out_writable(
            lambda: store.check_out_file(folder / "eval.json", flag="eval-prior's report")
        )
    tcfg = meta["config"]
    manifest = load_store_manifest(cfg.data)
    checkpoint.check_store(meta, manifest, cfg.data)
    if tcfg["text_encodings"] and not manifest.get("text_enc"):
        raise UsageError(
            f"the prior was trained with --text-encodings and {cfg.data} has none: evaluate it on a store "
            "embedded with --text-encodings"
        )
    device = resolve_device(cfg.device)
    prior = checkpoint.build_model(folder, meta).to(device).eval()
    try:
        check_steps(cfg.steps, prior.cfg.timesteps, "--steps")
    except ValueError as e:
        raise UsageError(str(e)) from None
    checkpoint.load_weights(prior, folder / "ema.safetensors")
    fields = ("img_emb", "text_emb", "text_enc") if tcfg["text_encodings"] else ("img_emb", "text_emb")
    stream = Stream(
        StreamConfig(
            cfg.data,
            fields=fields,
            batch_size=256,
            split=cfg.split,
            val_fraction=tcfg["val_fraction"],
            split_seed=tcfg["split_seed"],
            one_pass=True,  # the train split's samples once each, not the training stream's repeats
        )
    )
    checkpoint.warn_if_other_split(meta, stream.order)
    metrics = evaluate(
        prior,
        stream,
        cfg.steps,
        cfg.guidance_scale,
        cfg.max_samples,
        device,
        tcfg["text_encodings"],
        cfg.sampler,
    )
    metrics["step"] = meta["step"]
    metrics["split"] = cfg.split
    print(format_table(metrics))
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        store.write_json(cfg.out, metrics)
    else:
        with checkpoint.writing_beside(folder, "eval.json"):  # never made again if a training pruned it
            store.write_json(folder / "eval.json", metrics, make_parent=False)
    return metrics


def is_eval_report(path: Path) -> bool:
    return store.is_report(path, "step", "retrieval_chance_top1")
