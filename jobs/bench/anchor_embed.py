"""`unclip bench-anchors`, embed: ``unclip embed`` against ``clip-retrieval inference`` on the same shards,
same open_clip architecture with random weights, same batch size, both timed end to end as subprocesses
(images/s), alternating; then a check that both embedded the same rows alike, and the adopt check on
clip-retrieval's own output."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from jobs.bench.anchor_adopt import check_adopt
from jobs.bench.data import concat_field, concat_metadata
from jobs.bench.harness import ANCHOR_SCRIPTS, PY, alternate, comparison, side

if TYPE_CHECKING:
    from jobs.bench.anchors import AnchorsConfig

TARGET = 1.5
RUN_FIELDS = ("seconds", "rows", "rate", "steady_rate", "load_avg_1m_after")


def embed_ours(cfg: AnchorsConfig, shards: Path, out: Path, log: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [PY, "-m", "jobs.cli", "embed", "--shards", str(shards), "--out", str(out)]
    cmd += ["--clip", cfg.clip, "--pretrained", "none", "--seed", str(cfg.seed)]
    cmd += ["--batch-size", str(cfg.embed_batch), "--device", "cpu"]
    run = side(cmd, log, "unclip embed")
    summary = json.loads((out / "logs" / "embed_summary.json").read_text())
    rows = summary["rows"]
    return {
        "seconds": run.seconds,
        "load_avg_1m_after": run.load_avg_1m_after,
        "rows": rows,
        "rate": rows / run.seconds,
        "steady_rate": summary.get("samples_per_second_in_tasks"),
    }


def prepro_workers(tars: list[Path]) -> int:
    """One DataLoader worker per shard at most: clip-retrieval hangs with more workers than shards."""
    return min(len(tars), os.cpu_count() or 1)


def embed_theirs(cfg: AnchorsConfig, tars: list[Path], out: Path, log: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    ids = [t.stem for t in tars]
    dataset = str(tars[0].parent / ("{" + ",".join(ids) + "}.tar")) if len(ids) > 1 else str(tars[0])
    cmd = [cfg.anchors_python, str(ANCHOR_SCRIPTS / "clip_retrieval_random.py"), "inference"]
    cmd += ["--input_dataset", dataset, "--output_folder", str(out), "--input_format", "webdataset"]
    cmd += ["--clip_model", f"open_clip:{cfg.clip}", "--batch_size", str(cfg.embed_batch)]
    cmd += ["--num_prepro_workers", str(prepro_workers(tars)), "--enable_metadata", "False"]
    cmd += ["--wds_number_file_per_input_file", str(cfg.samples_per_shard)]
    run = side(cmd, log, "clip-retrieval inference")
    rows = sum(np.load(p, mmap_mode="r").shape[0] for p in (out / "img_emb").glob("*.npy"))
    # clip-retrieval's own stats: its runner loop (reading, inference, writing), after model load and warm-up
    stats = [json.loads(p.read_text()) for p in (out / "stats").glob("*.json")]
    loop = sum(st.get("total_duration", 0.0) for st in stats)
    steady = sum(st.get("sample_count", 0) for st in stats) / loop if loop > 0 else None
    return {
        "seconds": run.seconds,
        "load_avg_1m_after": run.load_avg_1m_after,
        "rows": rows,
        "rate": rows / run.seconds,
        "steady_rate": steady,
    }


def _load_npy(folder: Path) -> np.ndarray:
    return np.concatenate([np.load(p) for p in sorted(folder.glob("*.npy"))]).astype(np.float32)


def embedding_agreement(ours: Path, theirs: Path) -> dict:
    """Cosine between our and clip-retrieval's embeddings of the same keys (1.0: same model and inputs)."""
    import pyarrow.parquet as pq

    keys = concat_metadata(ours, ["key"])["key"]
    o_img = concat_field(ours, "img_emb").astype(np.float32)
    o_txt = concat_field(ours, "text_emb").astype(np.float32)
    t_img, t_txt = _load_npy(theirs / "img_emb"), _load_npy(theirs / "text_emb")
    t_keys = []
    for p in sorted((theirs / "metadata").glob("*.parquet")):
        t_keys += pq.read_table(p, columns=["image_path"])["image_path"].to_pylist()
    pos = {k: i for i, k in enumerate(t_keys)}
    idx = np.array([pos[k] for k in keys])
    cos_img = (o_img * t_img[idx]).sum(1)
    cos_txt = (o_txt * t_txt[idx]).sum(1)
    return {
        "rows_matched": int(len(idx)),
        "image_cos_min": float(cos_img.min()),
        "image_cos_mean": float(cos_img.mean()),
        "text_cos_min": float(cos_txt.min()),
        "text_cos_mean": float(cos_txt.mean()),
    }


def _repeats(cfg: AnchorsConfig, work: Path, shards: Path, tars: list[Path]) -> tuple[list[dict], list[dict]]:
    """Alternating ours / clip-retrieval runs; the first of ours stays as the store the later parts read."""

    def ours(r):
        out = work / "store" if r == 0 else work / "embed_ours"
        return embed_ours(cfg, shards, out, work / "logs" / f"embed_ours_{r}.log")

    def theirs(r):
        return embed_theirs(cfg, tars, work / "embed_theirs", work / "logs" / f"embed_theirs_{r}.log")

    def check(r, o, t):
        if o["rows"] != cfg.n or t["rows"] != cfg.n:
            raise RuntimeError(f"embed rows: ours {o['rows']}, clip-retrieval {t['rows']}, expected {cfg.n}")
        print(
            f"[anchors] embed repeat {r + 1}/{cfg.repeats}: ours {o['seconds']:.1f} s ({o['rate']:.2f} img/s), "
            f"clip-retrieval {t['seconds']:.1f} s ({t['rate']:.2f} img/s)"
        )

    return alternate(cfg.repeats, ours, theirs, check)


def bench(cfg: AnchorsConfig, work: Path, shards: Path) -> tuple[list[dict], list[dict]]:
    """The comparisons, and the checks that both embedded the same rows with the same model and that
    clip-retrieval's folder adopts."""
    tars = sorted(shards.glob("*.tar"))
    ours, theirs = _repeats(cfg, work, shards, tars)
    runs = [
        {"ours": {f: o[f] for f in RUN_FIELDS}, "theirs": {f: t[f] for f in RUN_FIELDS}}
        for o, t in zip(ours, theirs)
    ]
    agree = embedding_agreement(work / "store", work / "embed_theirs")
    comp = comparison(
        "embed vs clip-retrieval inference",
        [o["rate"] for o in ours],
        [t["rate"] for t in theirs],
        "images/s",
        TARGET,
        notes=(
            f"{cfg.n} images ({len(tars)} shards x {cfg.samples_per_shard}, {cfg.image_size}px JPEG), "
            f"open_clip {cfg.clip} random weights, batch {cfg.embed_batch}, CPU; image + text embeddings; "
            "wall time of each command from start to exit (imports, model creation, dask / DataLoader start-up "
            f"included); clip-retrieval with {prepro_workers(tars)} prepro workers. "
            f"Embedding agreement ours vs theirs: image cos mean {agree['image_cos_mean']:.4f}, "
            f"text cos mean {agree['text_cos_mean']:.4f}; 1-min load average after each run, ours "
            f"{[x['ours']['load_avg_1m_after'] for x in runs]}, clip-retrieval "
            f"{[x['theirs']['load_avg_1m_after'] for x in runs]}"
        ),
    )
    comp["runs"], comp["agreement"] = runs, agree
    comps = [comp]
    steady = [
        (o["steady_rate"], t["steady_rate"])
        for o, t in zip(ours, theirs)
        if o["steady_rate"] and t["steady_rate"]
    ]
    if len(steady) == cfg.repeats:
        comps.append(
            comparison(
                "embed vs clip-retrieval, past start-up (informational)",
                [o for o, _ in steady],
                [t for _, t in steady],
                "images/s",
                None,
                notes=(
                    "same runs; ours: rows / time inside the dask shard tasks (first task includes model "
                    "creation), theirs: rows / clip-retrieval's runner loop from its stats (model creation and "
                    "its 2-batch warm-up excluded)"
                ),
            )
        )
    return comps, [_same_work(cfg, agree), check_adopt(cfg.clip, work / "embed_theirs", work, cfg.seed)]


def _same_work(cfg: AnchorsConfig, agree: dict) -> dict:
    return {
        "name": "same work: our embeddings vs clip-retrieval's, row by row (by key)",
        "passed": bool(
            agree["rows_matched"] == cfg.n and min(agree["image_cos_min"], agree["text_cos_min"]) > 0.99
        ),
        "details": (
            f"{agree['rows_matched']} keys matched; cosine image min {agree['image_cos_min']:.5f}, text min "
            f"{agree['text_cos_min']:.5f} (same random weights from the seed, same preprocessing)"
        ),
        "rows": agree["rows_matched"],
    }
