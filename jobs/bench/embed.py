"""`unclip bench`, embed: `unclip embed` end to end and inside its shard tasks against the pure model forward
on the same captions, and the embed worker's peak RSS as the data doubles."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

from jobs.bench.data import image_shards
from jobs.bench.harness import PY, alternate, measure, probe, ratio_figure

if TYPE_CHECKING:
    from jobs.bench.main import BenchConfig


def embed_data(cfg: BenchConfig, work: Path) -> Path:
    """4 shards of procedural 256 px images, downloaded through img2dataset from 127.0.0.1."""
    per = 16 if cfg.quick else 128
    shards, _ = image_shards(work, "emb_", n=4 * per, size=256, per=per, seed=2)
    return shards


def embed_cmd(shards: str, out: Path, clip: str) -> list[str]:
    cmd = [PY, "-m", "jobs.cli", "embed", "--shards", shards, "--out", str(out), "--clip", clip]
    return cmd + "--pretrained none --batch-size 64 --device cpu".split()


def embed_summary(shards: str, out: Path, clip: str) -> tuple[dict, float]:
    """A fresh `unclip embed` run: the summary it printed, and its wall seconds."""
    shutil.rmtree(out, ignore_errors=True)
    run = measure(embed_cmd(shards, out, clip))
    return json.loads(run.stdout[run.stdout.index("{") :]), run.seconds


def bench(cfg: BenchConfig, work: Path) -> dict:
    shards = embed_data(cfg, work)
    clip = "unclip-tiny" if cfg.quick else cfg.clip
    two = str(shards / "{00000..00001}.tar")
    runs, fwd = alternate(
        cfg.repeats,
        lambda i: embed_summary(two, work / f"emb_store_{i}", clip),
        lambda i: probe(probe_forward, clip=clip, store=str(work / f"emb_store_{i}"), batch=64)[0],
    )
    e2e = [s["rows"] / seconds for s, seconds in runs]
    in_task = [s["samples_per_second_in_tasks"] for s, _ in runs]
    warm = [s["samples_per_second_in_warm_tasks"] for s, _ in runs]
    rss = [s["worker_peak_rss_mb"] for s, _ in runs]
    doubling = {}
    for n in ("00001", "00003"):  # 2 shards, then 4: the worker's peak RSS should not follow the data
        s, _ = embed_summary(str(shards / f"{{00000..{n}}}.tar"), work / f"emb_rss_{n}", "unclip-tiny")
        doubling[f"{int(n) + 1}_shards"] = s["worker_peak_rss_mb"]
    forward, full = [f["images_per_s"] for f in fwd], [f["images_per_s_full_context"] for f in fwd]
    r, rt, rw = ratio_figure(e2e, forward), ratio_figure(in_task, forward), ratio_figure(warm, forward)
    return {
        "embed_vs_forward": {
            **r,
            "unit": f"images/s end to end (dask + model start-up included) / pure forward, {clip}, batch 64",
            "target": ">= 0.9",
            "met": r["ratio_median"] >= 0.9,
        },
        "embed_in_tasks_vs_forward": {
            **rt,
            "unit": "images/s inside the shard tasks / pure forward",
            "target": ">= 0.95",
            "met": rt["ratio_median"] >= 0.95,
        },
        "embed_warm_tasks_vs_forward": {
            **rw,
            "unit": "images/s inside the worker's later shard tasks (its first, with one-off costs, left out) "
            "/ pure forward",
            "target": ">= 0.95",
            "met": rw["ratio_median"] >= 0.95,
        },
        "embed_trimmed_vs_full_context_forward": {
            **ratio_figure(forward, full),
            "unit": "pure forward images/s, text tower trimmed to the batch's longest caption / 77 tokens",
        },
        "embed_peak_rss": {"worker_peak_rss_mb": rss, "doubling_unclip_tiny_mb": doubling},
    }


def probe_forward(clip: str, store: str, batch: int) -> dict:
    """Pure model forward on pre-made tensors: the same captions the store holds, random pixels."""
    import pyarrow.parquet as pq
    import torch

    from pipeline.encoders import encode_image, encode_text, load_clip

    torch.set_num_threads(os.cpu_count())
    c = load_clip(clip, "none", "cpu", 0)
    caps = [
        c
        for p in sorted(Path(store, "metadata").glob("*.parquet"))
        for c in pq.read_table(p, columns=["caption"])["caption"].to_pylist()
    ]
    batch = min(batch, len(caps))
    size = c.preprocess.transforms[1].size if hasattr(c.preprocess, "transforms") else (224, 224)
    images = torch.randn(batch, 3, *size)
    batches = [c.tokenizer(caps[i : i + batch]) for i in range(0, len(caps) - batch + 1, batch)]
    res = {}
    for name, fn in (
        ("images_per_s", lambda t: encode_text(c, t)),
        ("images_per_s_full_context", lambda t: c.model.encode_text(t)),
    ):
        with torch.no_grad():
            encode_image(c, images[:2]), fn(batches[0][:2])  # warm-up
            t0 = time.perf_counter()
            for tok in batches:
                encode_image(c, images[: len(tok)])
                fn(tok)
        res[name] = len(batches) * batch / (time.perf_counter() - t0)
    return res
