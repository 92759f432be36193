"""`unclip bench-anchors`, train-prior: an AdamW step of `models.prior.DiffusionPrior` against
dalle2-pytorch's `DiffusionPrior` at the same width, depth, heads, batch and embedding size, both conditioned on the text
embedding only (samples/s and peak RSS, each in its own process, alternating)."""

from __future__ import annotations

import resource
import statistics
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from jobs.bench.harness import ANCHOR_SCRIPTS, alternate, comparison, probe_cmd, side_json, timed_train_steps

if TYPE_CHECKING:
    from jobs.bench.anchors import AnchorsConfig

TARGET = 3.0


def our_prior_config(**overrides):
    """The vit-b-32 preset conditioned on the text embedding only (no per-token encodings), as compared."""
    from models.prior import prior_config

    return prior_config("vit-b-32", **{"emb_dim": 512, "text_enc_dim": 0, **overrides})


def prior_worker(args: dict) -> dict:
    """Our side of the train-prior comparison, in its own process: AdamW steps on random embeddings.
    ``args``: batch, warmup, steps, seed, and optional ``overrides`` of the prior config (tests only)."""
    import torch
    import torch.nn.functional as F

    from models.prior import DiffusionPrior

    torch.manual_seed(args["seed"])
    cfg = our_prior_config(**args.get("overrides", {}))
    model = DiffusionPrior(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=6e-2)
    gen = torch.Generator().manual_seed(args["seed"])
    img = F.normalize(torch.randn(args["batch"], cfg.emb_dim, generator=gen), dim=-1)
    txt = F.normalize(torch.randn(args["batch"], cfg.emb_dim, generator=gen), dim=-1)
    times, losses = timed_train_steps(model, opt, lambda: model.loss(img, txt), args["warmup"], args["steps"])
    return {
        "impl": "unclip-pipeline",
        "step_seconds": times,
        "samples_per_s": args["batch"] / statistics.median(times),
        "params": sum(p.numel() for p in model.parameters()),
        "losses": losses,
        "torch_threads": torch.get_num_threads(),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "config": {**args, **asdict(cfg)},
    }


def prior_ours(cfg: AnchorsConfig, log: Path) -> dict:
    args = {"batch": cfg.prior_batch, "warmup": cfg.ours_prior_warmup, "steps": cfg.ours_prior_steps}
    return side_json(probe_cmd(prior_worker, args={**args, "seed": cfg.seed}), log, "our prior step")


def prior_theirs(cfg: AnchorsConfig, log: Path, max_text_len: int) -> dict:
    pc = our_prior_config()
    cmd = [cfg.anchors_python, str(ANCHOR_SCRIPTS / "dalle2_prior_step.py")]
    cmd += ["--dim", str(pc.dim), "--depth", str(pc.depth), "--heads", str(pc.heads)]
    cmd += ["--dim-head", str(pc.head_dim or pc.dim // pc.heads), "--ff-mult", str(pc.ff_mult)]
    cmd += ["--dropout", str(pc.dropout), "--cond-drop-prob", str(pc.cond_drop_prob)]
    cmd += ["--timesteps", str(pc.timesteps), "--max-text-len", str(max_text_len)]
    cmd += [
        "--batch",
        str(cfg.prior_batch),
        "--warmup",
        str(cfg.prior_warmup),
        "--steps",
        str(cfg.prior_steps),
    ]
    cmd += ["--seed", str(cfg.seed)]
    return side_json(cmd, log, "dalle2-pytorch prior step")


def _pairs(
    cfg: AnchorsConfig, work: Path, tag: str, max_text_len: int, line: str
) -> tuple[list[dict], list[dict]]:
    """``repeats`` alternating runs of ours and dalle2-pytorch's step, logs ``prior_{ours,theirs}{tag}_R``."""

    def progress(r, o, t):
        print(line.format(r=r + 1, n=cfg.repeats, o=o, t=t))

    return alternate(
        cfg.repeats,
        lambda r: prior_ours(cfg, work / "logs" / f"prior_ours{tag}_{r}.log"),
        lambda r: prior_theirs(cfg, work / "logs" / f"prior_theirs{tag}_{r}.log", max_text_len),
        progress,
    )


def _load(runs: list[dict]) -> list[float]:
    return [x["load_avg_1m_after"] for x in runs]


def bench(cfg: AnchorsConfig, work: Path) -> list[dict]:
    pc = our_prior_config()
    if pc.dim != pc.emb_dim:
        raise RuntimeError("dalle2-pytorch's prior needs width == embedding size")
    ours, theirs = _pairs(
        cfg,
        work,
        "",
        cfg.dalle2_max_text_len,
        "[anchors] train-prior repeat {r}/{n}: ours {o[samples_per_s]:,.0f} samples/s ({o[peak_rss_mb]:,.0f} MB), "
        "dalle2-pytorch {t[samples_per_s]:,.2f} samples/s ({t[peak_rss_mb]:,.0f} MB)",
    )
    shape = (
        f"width {pc.dim}, depth {pc.depth}, {pc.heads} heads x {pc.head_dim}, ff x{pc.ff_mult}, dropout "
        f"{pc.dropout}, embeddings {pc.emb_dim}, batch {cfg.prior_batch}, conditioned on the text embedding only, "
        f"AdamW + grad clip, CPU; params ours {ours[0]['params']:,}, dalle2 {theirs[0]['params']:,}"
    )
    step = comparison(
        "train-prior step vs dalle2-pytorch DiffusionPrior",
        [o["samples_per_s"] for o in ours],
        [t["samples_per_s"] for t in theirs],
        "samples/s",
        TARGET,
        notes=(
            f"{shape}; dalle2 max_text_len {cfg.dalle2_max_text_len} (its default: it attends over that many "
            f"padded text positions even without text encodings); median of {cfg.ours_prior_steps} (ours) / "
            f"{cfg.prior_steps} (dalle2) steps after {cfg.ours_prior_warmup} / {cfg.prior_warmup} warm-up; "
            "our small per-step ops slow down several-fold when other processes hold the cores (2 torch "
            f"threads on 2 shared cores): 1-min load average after each run, ours {_load(ours)}, "
            f"dalle2 {_load(theirs)}"
        ),
    )
    step["runs"] = {"ours": ours, "theirs": theirs}
    rss = comparison(
        "train-prior peak RSS vs dalle2-pytorch",
        [o["peak_rss_mb"] for o in ours],
        [t["peak_rss_mb"] for t in theirs],
        "MB",
        None,
        higher_is_better=False,
        notes="peak RSS of each process (ru_maxrss), same runs as above",
    )
    return [step, rss] + ([_short_text(cfg, work, shape)] if cfg.extra_max_text_len else [])


def _short_text(cfg: AnchorsConfig, work: Path, shape: str) -> dict:
    """The informational run with dalle2-pytorch padded to CLIP's context length (``extra_max_text_len``)."""
    ours, theirs = _pairs(
        cfg,
        work,
        "_short",
        cfg.extra_max_text_len,
        f"[anchors] train-prior, dalle2 max_text_len {cfg.extra_max_text_len}, repeat {{r}}/{{n}}: "
        "ours {o[samples_per_s]:,.1f}, dalle2-pytorch {t[samples_per_s]:,.2f} samples/s",
    )
    extra = comparison(
        f"train-prior step vs dalle2-pytorch, its max_text_len={cfg.extra_max_text_len} (informational)",
        [o["samples_per_s"] for o in ours],
        [t["samples_per_s"] for t in theirs],
        "samples/s",
        None,
        notes=(
            f"{shape}; dalle2 padded to CLIP's context length instead of its default; 1-min load average "
            f"after each run, ours {_load(ours)}, dalle2 {_load(theirs)}"
        ),
    )
    extra["runs"] = {"ours": ours, "theirs": theirs}
    return extra
