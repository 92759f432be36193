"""`unclip bench-anchors`, decoder: our decoder's train step vs dalle2-pytorch's `Unet` decoder.

Both on random 32 px RGB images conditioned on a 512-d image embedding, batch 32, AdamW + gradient clipping,
CPU, each side in its own process, alternating, ``repeats`` pairs. Ours is the `tiny` preset (the 32 px pixels
codec folded to 12 x 16 x 16); dalle2-pytorch's `Unet` is sized to a similar parameter count.
"""

from __future__ import annotations

import resource
import statistics
from pathlib import Path
from typing import TYPE_CHECKING

from jobs.bench.harness import ANCHOR_SCRIPTS, alternate, comparison, probe_cmd, side_json, timed_train_steps

if TYPE_CHECKING:
    from jobs.bench.anchors import AnchorsConfig

BATCH, EMB_DIM = 32, 512


def decoder_worker(args: dict) -> dict:
    """Our side, in its own process."""
    import torch

    from models.decoder import DiffusionDecoder, decoder_config

    torch.manual_seed(args["seed"])
    dec = DiffusionDecoder(decoder_config("tiny", emb_dim=EMB_DIM)).train()
    opt = torch.optim.AdamW(dec.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(args["seed"])
    lat = torch.rand(BATCH, 3, 32, 32, generator=gen) * 2 - 1
    emb = torch.nn.functional.normalize(torch.randn(BATCH, EMB_DIM, generator=gen), dim=-1)
    times, _ = timed_train_steps(dec, opt, lambda: dec.loss(lat, emb), args["warmup"], args["steps"])
    return {
        "impl": "unclip-pipeline",
        "step_seconds": times,
        "samples_per_s": BATCH / statistics.median(times),
        "params": sum(p.numel() for p in dec.parameters()),
        "torch_threads": torch.get_num_threads(),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _ours(cfg: AnchorsConfig, work: Path, r: int) -> dict:
    args = {"warmup": 2, "steps": 10, "seed": cfg.seed}
    return side_json(
        probe_cmd(decoder_worker, args=args), work / "logs" / f"decoder_ours_{r}.log", "our decoder step"
    )


def _theirs(cfg: AnchorsConfig, work: Path, r: int, dalle2_dim: int) -> dict:
    cmd = [cfg.anchors_python, str(ANCHOR_SCRIPTS / "dalle2_decoder_step.py"), "--dim", str(dalle2_dim)]
    cmd += ["--batch", str(BATCH), "--emb-dim", str(EMB_DIM), "--seed", str(cfg.seed)]
    cmd += ["--warmup", "1", "--steps", "3"]  # ~5 s a step here
    return side_json(cmd, work / "logs" / f"decoder_theirs_{r}.log", "dalle2-pytorch decoder step")


def bench(cfg: AnchorsConfig, work: Path, dalle2_dim: int = 32) -> list[dict]:
    def progress(r, o, t):
        print(
            f"[anchors] train-decoder repeat {r + 1}/{cfg.repeats}: ours {o['samples_per_s']:,.1f}, "
            f"dalle2-pytorch {t['samples_per_s']:,.1f} samples/s"
        )

    ours, theirs = alternate(
        cfg.repeats, lambda r: _ours(cfg, work, r), lambda r: _theirs(cfg, work, r, dalle2_dim), progress
    )
    shape = (
        f"32 px RGB, {EMB_DIM}-d image embedding, batch {BATCH}, AdamW + grad clip, CPU, median of 10 (ours) / 3 "
        f"(dalle2) steps after 2 / 1 warm-up; ours tiny preset ({ours[0]['params']:,} params, UNet2DConditionModel in Kandinsky 2.2 form), "
        f"dalle2 Unet dim {dalle2_dim}, mults 1,2,4 ({theirs[0]['params']:,} params)"
    )
    comps = [
        comparison(
            "train-decoder step vs dalle2-pytorch Unet decoder",
            [o["samples_per_s"] for o in ours],
            [t["samples_per_s"] for t in theirs],
            "samples/s",
            None,
            notes=f"{shape}; 1-min load average after each run, ours {[o['load_avg_1m_after'] for o in ours]}, "
            f"dalle2 {[t['load_avg_1m_after'] for t in theirs]}",
        ),
        comparison(
            "train-decoder peak RSS vs dalle2-pytorch",
            [o["peak_rss_mb"] for o in ours],
            [t["peak_rss_mb"] for t in theirs],
            "MB",
            None,
            higher_is_better=False,
            notes="peak RSS of each process (ru_maxrss), same runs as above",
        ),
    ]
    comps[0]["runs"] = {"ours": ours, "theirs": theirs}
    return comps
