"""`unclip train-prior`: train the diffusion prior on a store's (text embedding -> image embedding) pairs.

Reads the store through `pipeline.stream`; writes under ``--out``: ``ckpt/`` (see `jobs.checkpoint`),
``metrics.jsonl``, ``loss.png``, ``config.json``. Multi-GPU (or multi-process CPU, gloo) under torchrun:
each rank streams a disjoint part of every step, gradients are averaged by DDP.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from jobs import checkpoint
from models.prior import PRIOR_PRESETS, DiffusionPrior, PriorConfig, prior_config
from pipeline import store
from pipeline.encoders import resolve_device
from pipeline.errors import StageError, UsageError
from pipeline.stream import Stream, StreamConfig

log = logging.getLogger(__name__)
# Training settings that may change between a run and its resume; any other difference is an error.
RESUMABLE_CHANGES = {
    "stop_after",
    "eval_every",
    "save_every",
    "resume",
    "device",
    "log_every",
    "eval_samples",
}


@dataclass
class TrainPriorConfig:
    data: str
    out: str
    preset: str = "tiny"
    batch_size: int = 64
    lr: float = 3e-4
    weight_decay: float = 6e-2  # LAION's prior recipe
    warmup_steps: int = 100
    steps: int = 2000  # length of the whole run: the learning-rate schedule is laid out over it
    stop_after: int = (
        0  # stop this invocation at this step (checkpointed; --resume continues); 0 = run to --steps
    )
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    eval_every: int = 500
    eval_samples: int = 1024
    save_every: int = 500
    log_every: int = 10
    resume: bool = False
    seed: int = 0
    val_fraction: float = 0.05  # held-out share, drawn per shard from split_seed: stable as data grows
    split_seed: int = 0
    text_encodings: bool = False  # condition on per-token encodings too (the store needs --text-encodings)
    sample_steps: int = 64
    guidance_scale: float = 1.0
    device: str = "auto"
    log_rows: bool = False  # write the (shard, row) ids each rank trained on, for auditing data order


def build_prior(prior_cfg: dict) -> DiffusionPrior:
    return DiffusionPrior(PriorConfig(**prior_cfg))


class _Loss(torch.nn.Module):
    """DDP averages gradients of what runs through `forward`: route the prior's loss through it."""

    def __init__(self, prior: DiffusionPrior):
        super().__init__()
        self.prior = prior

    def forward(self, img, txt, enc, mask, generator):
        return self.prior.loss(img, txt, enc, mask, generator=generator)


def _setup_distributed(device: str) -> tuple[int, int, str]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
    rank = dist.get_rank()
    if device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    return rank, world, device


def _prior_settings(cfg: TrainPriorConfig) -> dict:
    if cfg.preset not in PRIOR_PRESETS:
        raise UsageError(f"unknown --preset '{cfg.preset}'; valid: {', '.join(PRIOR_PRESETS)}")
    if not (Path(cfg.data) / store.MANIFEST).exists():
        raise UsageError(
            f"--data {cfg.data} is not an embedding store (no {store.MANIFEST}); run `unclip embed`"
        )
    manifest = store.load_manifest(cfg.data)
    if cfg.text_encodings and not manifest.get("text_enc"):
        raise UsageError(
            f"--text-encodings needs a store embedded with --text-encodings; {cfg.data} has none"
        )
    width = manifest["text_enc"]["width"] if cfg.text_encodings else 0
    return asdict(
        prior_config(
            cfg.preset, emb_dim=manifest["clip"]["dim"], text_enc_dim=width, guidance_scale=cfg.guidance_scale
        )
    )


def _check_resume(meta: dict, cfg: TrainPriorConfig, prior_cfg: dict) -> None:
    if meta["prior"] != prior_cfg:
        diff = sorted(k for k in prior_cfg if meta["prior"].get(k) != prior_cfg[k])
        raise UsageError(f"checkpoint's model config differs from this run's in {', '.join(diff)}")
    old, new = meta["config"], asdict(cfg)
    diff = sorted(k for k in new if k not in RESUMABLE_CHANGES and old.get(k) != new[k])
    if diff:
        raise UsageError(
            f"--resume with other settings than the checkpoint's: {', '.join(diff)} "
            f"(only {', '.join(sorted(RESUMABLE_CHANGES))} may change)"
        )


def _lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:  # linear warmup, then cosine decay to 10%
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return f


@torch.no_grad()
def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1 - decay)


def main(cfg: TrainPriorConfig) -> dict:
    device = resolve_device(cfg.device)
    prior_cfg = _prior_settings(cfg)
    rank, world, device = _setup_distributed(device)
    out = Path(cfg.out)
    ckpt_dir = out / "ckpt"
    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    prior = build_prior(prior_cfg).to(device)
    ema = copy.deepcopy(prior).requires_grad_(False)
    opt = torch.optim.AdamW(prior.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.96))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.warmup_steps, cfg.steps))
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank)  # noise, timesteps, condition dropout
    start = 0
    if cfg.resume and (ckpt_dir / "latest").exists():
        folder = checkpoint.resolve(ckpt_dir)
        meta = checkpoint.read_meta(folder)
        _check_resume(meta, cfg, prior_cfg)
        checkpoint.load_weights(prior, folder / "model.safetensors")
        checkpoint.load_weights(ema, folder / "ema.safetensors")
        state = checkpoint.load_state(folder)
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        gen.set_state(state["gen"][rank])
        torch.set_rng_state(state["torch_rng"][rank])
        start = meta["step"]
        log.info("resumed from %s at step %d", folder, start)
    elif cfg.resume:
        log.warning("--resume: no checkpoint in %s, starting from scratch", ckpt_dir)
    model = _Loss(prior)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps({"train": asdict(cfg), "prior": prior_cfg}, indent=2))
    fields = ("img_emb", "text_emb", "text_enc") if cfg.text_encodings else ("img_emb", "text_emb")
    stream = Stream(
        StreamConfig(
            cfg.data,
            fields=fields,
            batch_size=cfg.batch_size,
            val_fraction=cfg.val_fraction,
            split_seed=cfg.split_seed,
            seed=cfg.seed,
            rank=rank,
            world_size=world,
            start_step=start,
        )
    )
    ctx = dict(
        cfg=cfg,
        prior=prior,
        ema=ema,
        opt=opt,
        sched=sched,
        gen=gen,
        rank=rank,
        world=world,
        device=device,
        prior_cfg=prior_cfg,
        ckpt_dir=ckpt_dir,
        out=out,
    )
    try:
        report = _loop(model, stream, start, ctx)
    finally:
        if world > 1:
            dist.destroy_process_group()
    return report


def _gather_states(gen: torch.Generator, world: int) -> tuple[list, list]:
    """Every rank's RNG states, so that a resume restores each rank's own stream of noise."""
    mine = [gen.get_state(), torch.get_rng_state()]
    if world == 1:
        return [mine[0]], [mine[1]]
    allst = [None] * world
    dist.all_gather_object(allst, mine)
    return [s[0] for s in allst], [s[1] for s in allst]


def _save(step: int, ctx: dict, stream_pos: int) -> None:
    gens, rngs = _gather_states(ctx["gen"], ctx["world"])
    if ctx["rank"] != 0:
        return
    state = {
        "opt": ctx["opt"].state_dict(),
        "sched": ctx["sched"].state_dict(),
        "gen": gens,
        "torch_rng": rngs,
    }
    meta = {
        "config": asdict(ctx["cfg"]),
        "prior": ctx["prior_cfg"],
        "stream_step": stream_pos,
        "world_size": ctx["world"],
    }
    checkpoint.save(ctx["ckpt_dir"], step, ctx["prior"], ctx["ema"], state, meta)


def _loop(model, stream: Stream, start: int, ctx: dict) -> dict:
    cfg, prior, rank, device = ctx["cfg"], ctx["prior"], ctx["rank"], ctx["device"]
    amp = device.startswith("cuda")
    metrics_file = ctx["out"] / "metrics.jsonl"
    rows_log = [] if cfg.log_rows else None
    batches = stream.torch_batches(device)
    t0, seen, last_loss, report_eval = time.perf_counter(), 0, float("nan"), None
    end = min(cfg.steps, cfg.stop_after) if cfg.stop_after else cfg.steps
    bar = tqdm(range(start, end), initial=start, total=cfg.steps, desc="train-prior", disable=rank != 0)
    prior.train()
    for step in bar:
        b = next(batches)
        if rows_log is not None:
            rows_log.append(torch.stack([b["shard"], b["row"]], 1).cpu())
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            loss = model(b["img_emb"], b["text_emb"], b.get("text_enc"), b.get("text_enc_mask"), ctx["gen"])
        if not torch.isfinite(loss):
            raise StageError(
                f"loss is {loss.item()} at step {step}: stopping; the last good checkpoint is in "
                f"{ctx['ckpt_dir']} (lower --lr or raise --warmup-steps, then --resume)"
            )
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(prior.parameters(), cfg.grad_clip)
        ctx["opt"].step()
        ctx["opt"].zero_grad(set_to_none=True)
        ctx["sched"].step()
        _ema_update(ctx["ema"], prior, cfg.ema_decay)
        seen += len(b["img_emb"]) * ctx["world"]
        last_loss, done = loss.item(), step + 1
        if rank == 0 and (done % cfg.log_every == 0 or done == cfg.steps):
            sps = seen / (time.perf_counter() - t0)
            bar.set_postfix(loss=f"{last_loss:.4f}", samples_per_s=f"{sps:.0f}")
            _append(
                metrics_file,
                {
                    "step": done,
                    "loss": last_loss,
                    "grad_norm": float(grad_norm),
                    "lr": ctx["sched"].get_last_lr()[0],
                    "samples_per_s": sps,
                },
            )
        if rank == 0 and cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.steps):
            report_eval = _eval(ctx, done, metrics_file)
        if done == end or (cfg.save_every and done % cfg.save_every == 0):
            _save(done, ctx, done)
    if rows_log is not None and rows_log:
        torch.save(torch.cat(rows_log), ctx["out"] / f"rows_rank{rank}.pt")
    _record_weight_digests(prior, ctx)
    if rank == 0:
        plot_loss(metrics_file, ctx["out"] / "loss.png")
    elapsed = time.perf_counter() - t0
    return {
        "steps": end,
        "start_step": start,
        "final_loss": last_loss,
        "seconds": round(elapsed, 2),
        "samples_per_s": round(seen / elapsed, 1) if seen else None,
        "ckpt": str(ctx["ckpt_dir"]),
        "eval": report_eval,
    }


def _record_weight_digests(prior: torch.nn.Module, ctx: dict) -> None:
    """Every rank's weight checksum in ``weights_by_rank.json``: DDP ranks must end identical."""
    h = hashlib.sha256()
    for v in prior.state_dict().values():
        h.update(v.detach().float().cpu().numpy().tobytes())
    digests = [h.hexdigest()]
    if ctx["world"] > 1:
        digests = [None] * ctx["world"]
        dist.all_gather_object(digests, h.hexdigest())
    if ctx["rank"] == 0:
        (ctx["out"] / "weights_by_rank.json").write_text(json.dumps(digests))
        if len(set(digests)) > 1:
            log.error("ranks ended with different weights: %s", digests)


def _eval(ctx: dict, step: int, metrics_file: Path) -> dict:
    from jobs.eval_prior import evaluate, format_table

    cfg = ctx["cfg"]
    fields = ("img_emb", "text_emb", "text_enc") if cfg.text_encodings else ("img_emb", "text_emb")
    val = Stream(
        StreamConfig(
            cfg.data,
            fields=fields,
            batch_size=256,
            split="val",
            val_fraction=cfg.val_fraction,
            split_seed=cfg.split_seed,
        )
    )
    if val.num_samples == 0:
        log.warning("no held-out samples (val_fraction %.3f): skipping evaluation", cfg.val_fraction)
        return {}
    m = evaluate(
        ctx["ema"],
        val,
        cfg.sample_steps,
        cfg.guidance_scale,
        cfg.eval_samples,
        ctx["device"],
        cfg.text_encodings,
    )
    _append(metrics_file, {"step": step, "eval": m})
    tqdm.write(format_table(m))
    return m


def _append(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def plot_loss(metrics_file: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in open(metrics_file)] if metrics_file.exists() else []
    pts = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    if not pts:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(*zip(*pts))
    ax.set(xlabel="step", ylabel="loss (x0 MSE)", yscale="log", title="train-prior")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


run = main  # the CLI calls `run(cfg)` on every stage
