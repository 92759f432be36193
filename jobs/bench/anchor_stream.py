"""`unclip bench-anchors`, stream: `pipeline.stream.Stream` against `EmbeddingReader` ((image, text) embedding
pairs/s) over the store the embed part wrote, and over a larger random store."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from jobs.bench.data import random_store
from jobs.bench.harness import alternate, comparison

if TYPE_CHECKING:
    from jobs.bench.anchors import AnchorsConfig

TARGET = 5.0
HOW = (
    "ours: Stream.torch_batches (shuffled train split, val_fraction 0), theirs: EmbeddingReader parquet_npy "
    "(img_emb + metadata key) zipped with npy (text_emb), as DALLE2-pytorch's prior loader pairs them; "
    "in-process, opening included, page cache warm"
)


def stream_pass_ours(store_root: Path, batch: int, epochs: int) -> tuple[int, float]:
    from pipeline.stream import Stream, StreamConfig

    t0 = time.perf_counter()
    s = Stream(
        StreamConfig(
            str(store_root), fields=("img_emb", "text_emb"), batch_size=batch, split="train", val_fraction=0.0
        )
    )
    n, it = 0, s.torch_batches("cpu")
    for _ in range(epochs * s.steps_per_epoch):
        b = next(it)
        if len(b["img_emb"]) != len(b["text_emb"]):
            raise RuntimeError(
                f"stream paired {len(b['img_emb'])} image rows with {len(b['text_emb'])} text rows"
            )
        n += len(b["img_emb"])
    it.close()
    return n, time.perf_counter() - t0


def stream_pass_theirs(store_root: Path, batch: int, epochs: int) -> tuple[int, float]:
    """Pairs as DALLE2-pytorch's prior loader makes them: an image reader (here with the metadata keys,
    parquet_npy) zipped with a text-embedding reader; each epoch one call over every row."""
    from embedding_reader import EmbeddingReader

    t0 = time.perf_counter()
    with open(os.devnull, "w") as null, contextlib.redirect_stderr(null):  # its header scan's progress bars
        img_reader = EmbeddingReader(
            str(store_root / "img_emb"),
            file_format="parquet_npy",
            meta_columns=["key"],
            metadata_folder=str(store_root / "metadata"),
        )
        txt_reader = EmbeddingReader(str(store_root / "text_emb"), file_format="npy")
    n = 0
    for _ in range(epochs):
        pairs = zip(
            img_reader(batch_size=batch, show_progress=False),
            txt_reader(batch_size=batch, show_progress=False),
        )
        for (img, _meta), (txt, _) in pairs:
            if len(img) != len(txt):
                raise RuntimeError(f"embedding-reader paired {len(img)} image rows with {len(txt)} text rows")
            n += len(img)
    return n, time.perf_counter() - t0


def stream_comparison(name: str, store_root: Path, batch: int, epochs: int, repeats: int, notes: str) -> dict:
    """Pairs/s of both readers over ``epochs`` passes of the store, alternating. Ours serves whole batches of
    an endless shuffled order (``steps_per_epoch`` a pass); embedding-reader ends each pass with a partial
    batch."""
    from pipeline import store

    rows = sum(n for _, n in store.shard_rows(store_root))
    want_ours, want_theirs = epochs * (rows // batch) * batch, epochs * rows
    stream_pass_ours(store_root, batch, 1)  # page cache and imports warm for both
    stream_pass_theirs(store_root, batch, 1)

    def check(r, o, t):
        (n_o, s_o), (n_t, s_t) = o, t
        if n_o != want_ours or n_t != want_theirs:
            raise RuntimeError(
                f"pairs delivered: stream {n_o} (expected {want_ours}), embedding-reader {n_t} (expected {want_theirs})"
            )
        print(
            f"[anchors] {name} repeat {r + 1}/{repeats}: ours {n_o / s_o:,.0f} pairs/s, "
            f"embedding-reader {n_t / s_t:,.0f} pairs/s ({n_o:,} pairs each)"
        )

    ours, theirs = alternate(
        repeats,
        lambda _: stream_pass_ours(store_root, batch, epochs),
        lambda _: stream_pass_theirs(store_root, batch, epochs),
        check,
    )
    rate = [n / s for n, s in ours], [n / s for n, s in theirs]
    return comparison(name, *rate, "pairs/s", TARGET, notes=notes)


def bench(cfg: AnchorsConfig, store_root: Path, work: Path) -> list[dict]:
    from pipeline import store

    rows = sum(n for _, n in store.shard_rows(store_root))
    comps = [
        stream_comparison(
            "stream vs EmbeddingReader",
            store_root,
            cfg.stream_batch,
            cfg.stream_epochs,
            cfg.stream_repeats,
            f"(img_emb, text_emb) pairs of the embed store ({rows} rows, 512-d float16), batch "
            f"{cfg.stream_batch}, {cfg.stream_epochs} passes; {HOW}. At this size each pass is dominated by "
            "embedding-reader's per-call set-up (a thread pool and a pandas piece table per call)",
        )
    ]
    if cfg.scale_shards:
        big = random_store(work / "scale_store", cfg.scale_shards, cfg.scale_rows_per_shard, seed=cfg.seed)
        n = cfg.scale_shards * cfg.scale_rows_per_shard
        comps.append(
            stream_comparison(
                "stream vs EmbeddingReader, larger store",
                big,
                cfg.stream_batch,
                cfg.scale_epochs,
                cfg.stream_repeats,
                f"same readers on a {n:,}-row store ({cfg.scale_shards} shards x {cfg.scale_rows_per_shard}, "
                f"random 512-d float16 rows written by pipeline.store), batch {cfg.stream_batch}, "
                f"{cfg.scale_epochs} pass; {HOW}",
            )
        )
    return comps
