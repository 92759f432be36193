"""`unclip bench`, embed: `unclip embed` end to end and inside its shard tasks against the pure model forward
on the same captions, and the embed worker's peak RSS as the data doubles."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

from jobs.bench import readahead
from jobs.bench.data import image_shards
from jobs.bench.harness import PY, alternate, measure, probe, ratio_figure

if TYPE_CHECKING:
    from jobs.bench.main import BenchConfig


def embed_data(cfg: BenchConfig, work: Path) -> Path:
    """8 shards of procedural 256 px images, downloaded through img2dataset from 127.0.0.1."""
    per = 16 if cfg.quick else 128
    shards, _ = image_shards(work, "emb_", n=8 * per, size=256, per=per, seed=2)
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
    paired = probe(
        paired_in_worker,
        shards=str(shards / "{00000..00007}.tar"),
        store=str(work / "emb_paired"),
        clip=clip,
        passes=1 if cfg.quick else 2,
    )[0]
    e2e = [s["rows"] / seconds for s, seconds in runs]
    rss = [s["worker_peak_rss_mb"] for s, _ in runs]
    doubling = {}
    for n in ("00001", "00003"):  # 2 shards, then 4: the worker's peak RSS should not follow the data
        s, _ = embed_summary(str(shards / f"{{00000..{n}}}.tar"), work / f"emb_rss_{n}", "unclip-tiny")
        doubling[f"{int(n) + 1}_shards"] = s["worker_peak_rss_mb"]
    forward, full = [f["images_per_s"] for f in fwd], [f["images_per_s_full_context"] for f in fwd]
    tasks, fwd_tasks = paired["tasks"], paired["forwards"]
    r, rt, rw = (
        ratio_figure(e2e, forward),
        ratio_figure(tasks, fwd_tasks),
        ratio_figure(tasks[1:], fwd_tasks[1:]),
    )
    return {
        "embed_vs_forward": {
            **r,
            "unit": f"images/s end to end (dask + model start-up included) / pure forward, {clip}, batch 64",
            "target": ">= 0.9",
            "met": r["ratio_median"] >= 0.9,
        },
        "embed_in_tasks_vs_forward": {
            **rt,
            "unit": f"images/s inside each shard task / a pure forward on its captions beside it, in the same "
            f"embed worker; {len(tasks)} pairs ({paired['passes']} passes over 8 shards of "
            f"{paired['rows'] // len(tasks)}, the second forward first), the worker's first shard included",
            "target": ">= 0.95",
            "met": rt["ratio_median"] >= 0.95,
        },
        "embed_warm_tasks_vs_forward": {
            **rw,
            "unit": "the same without the worker's first shard",
            "target": ">= 0.95",
            "met": rw["ratio_median"] >= 0.95,
        },
        "embed_trimmed_vs_full_context_forward": {
            **ratio_figure(forward, full),
            "unit": "pure forward images/s, text tower trimmed to the batch's longest caption / 77 tokens",
        },
        "embed_peak_rss": {"worker_peak_rss_mb": rss, "doubling_unclip_tiny_mb": doubling},
        "embed_launch_bound_inline_vs_thread": launch_bound(cfg, work),
        "embed_read_ahead_on_vs_off": readahead.bench(cfg, work, shards),
    }


# A CLIP whose forward is as many small ops as ViT-B-32's (12 + 12 layers) at a fraction of the arithmetic: on
# CPU it is bound by Python and op dispatch, as ViT-B-32 is on a GPU, where each op is a kernel launch.
LAUNCH_BOUND_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 12, "width": 64, "head_width": 64, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 1, "layers": 12},
}


def launch_bound(cfg: BenchConfig, work: Path) -> dict:
    """--batch-prep inline against thread on a launch-bound stand-in for a GPU (`LAUNCH_BOUND_CLIP`): shard
    tasks in one process, the two alternated (`jobs.bench.embed_gpu.probe_tasks`)."""
    from jobs.bench.embed_gpu import write_jpeg_shards

    # 48 px JPEGs: libjpeg decodes them in tens of microseconds with the GIL let go, as a GPU's decoder would
    shards = write_jpeg_shards(
        work / "launch_bound_shards", shards=1, per=256 if cfg.quick else 1024, size=48
    )
    res = probe(
        probe_launch_bound, shards=str(shards), out=str(work / "launch_bound_store"), repeats=cfg.repeats
    )[0]
    inline, thread = res["device_inline"], res["device_thread"]
    r = ratio_figure(inline["images_per_s"], thread["images_per_s"])
    return {
        **r,
        "unit": "images/s inside a shard task, --batch-prep inline / thread, --image-decode device on CPU, "
        "batch 256, 1 torch thread, a 12 + 12-layer 16-64-wide CLIP (Python-bound, as ViT-B-32 is on a GPU)",
        "phases_inline": inline["phases"],
        "phases_thread": thread["phases"],
        "target": "> 1 (why CUDA's default is inline)",
        "met": r["ratio_median"] > 1,
    }


def probe_launch_bound(shards: str, out: str, repeats: int) -> dict:
    import tempfile

    import open_clip
    import torch

    from jobs.bench.embed_gpu import probe_tasks

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        Path(d, "bench-launch-bound.json").write_text(json.dumps(LAUNCH_BOUND_CLIP))
        open_clip.add_model_config(d)
    return probe_tasks(
        ["bench-launch-bound"], shards, out, device="cpu", per_round=1, rounds=repeats, batch=256,
        variants=("device_inline", "device_thread"), torch_threads=1,
    )["bench-launch-bound"]  # fmt: skip


def probe_forward(clip: str, store: str, batch: int) -> dict:
    """Pure model forward on pre-made tensors: the same captions the store holds, random pixels."""
    import pyarrow.parquet as pq
    import torch

    from pipeline.embed_shard import _clip_input_size
    from pipeline.encoders import encode_image, encode_text, load_clip

    torch.set_num_threads(os.cpu_count())
    c = load_clip(clip, "none", "cpu", 0)
    caps = [
        c
        for p in sorted(Path(store, "metadata").glob("*.parquet"))
        for c in pq.read_table(p, columns=["caption"])["caption"].to_pylist()
    ]
    batch = min(batch, len(caps))
    size = _clip_input_size(c)
    images = torch.randn(batch, 3, size, size)
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


def _forward(c, captions: list[str], batch: int) -> float:
    """Images/s of CLIP's two towers alone on ``captions`` (random pixels), split into batches as a shard
    task splits them (`batch_ramp`), tokenised beforehand."""
    import torch

    from pipeline.embed_shard import _clip_input_size
    from pipeline.encoders import encode_image, encode_text
    from pipeline.shard_samples import batch_ramp

    size = _clip_input_size(c)
    images, tokens, i = torch.randn(batch, 3, size, size), [], 0
    for n in batch_ramp(batch):
        if i >= len(captions):
            break
        tokens.append(c.tokenizer(captions[i : i + n]))
        i += n
    with torch.no_grad():
        t0 = time.perf_counter()
        for tok in tokens:
            encode_image(c, images[: len(tok)])
            encode_text(c, tok)
    return len(captions) / (time.perf_counter() - t0)


def _forward_on_shard(params, shard: str) -> float:
    """`_forward` in a dask worker, on one store shard's captions."""
    from pipeline import store
    from pipeline.encoders import load_clip

    c = load_clip(params.clip, params.pretrained, params.device, params.seed)
    captions = store.read_metadata(params.out, shard, ["caption"])["caption"].to_pylist()
    return _forward(c, captions, params.batch_size)


def paired_in_worker(shards: str, store: str, clip: str, passes: int = 2) -> dict:
    """One embed worker, made as `unclip embed` makes it (`pipeline.embed_cluster`): each shard's task and a
    pure forward on that shard's captions in the same worker, shard after shard. The two sides of a pair run
    seconds apart, so the VM's drifting load (±15% between whole runs) hits both alike; the second pass runs
    each pair the other way round (forward first, on the captions the first pass stored, then the task, which
    redoes the shard), so that a drift within a pair does not favour one side."""
    from pipeline import embed, embed_cluster
    from pipeline import store as st
    from pipeline.embed_shard import embed_shard_or_fail as embed_shard

    cfg = embed.EmbedConfig(
        shards=shards,
        out=os.path.abspath(store),
        clip=clip,
        pretrained="none",
        batch_size=64,
        device="cpu",
        workers=1,
    )
    shutil.rmtree(cfg.out, ignore_errors=True)
    todo = embed.validate(cfg)
    params = embed.shard_params(cfg, "cpu", embed.prepare_store(cfg, todo, "cpu"))
    client, cluster = embed_cluster.connect(cfg)
    tasks, forwards, rows = [], [], 0

    def task(url):
        res = client.submit(embed_shard, url, params=params, pure=False).result()
        tasks.append(res["rows"] / res["seconds"])
        return res["rows"]

    def forward(url):
        forwards.append(client.submit(_forward_on_shard, params, st.shard_id_of(url), pure=False).result())

    try:
        embed_cluster.warm_workers(client, params)
        for p in range(passes):
            for url in todo:
                if p % 2 == 0:
                    rows += task(url)
                    forward(url)
                else:
                    forward(url)
                    rows += task(url)
    finally:
        client.close()
        cluster.close()
    return {"tasks": tasks, "forwards": forwards, "rows": rows, "passes": passes}
