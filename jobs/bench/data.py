"""Data both benchmarks make for themselves: procedural images served on 127.0.0.1 and downloaded through
img2dataset, random stores written through `pipeline.store`, and whole-store reads to compare against."""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np


def demo_images(out: Path, n: int, size: int, seed: int) -> Path:
    """``n`` procedural images at ``size`` px and their demo.parquet under ``out``."""
    from pipeline import demo_data

    demo_data.run(demo_data.DemoDataConfig(out=str(out), n=n, size=size, seed=seed))
    return out


@contextlib.contextmanager
def served(data: Path, urls: Path) -> Iterator[Path]:
    """``data`` served on 127.0.0.1 while inside; yields ``urls``, demo.parquet rewritten with its URLs."""
    from jobs.http_server import serve_folder
    from jobs.serve import served_urls

    with serve_folder(str(data)) as base:
        yield served_urls(data, base, urls)


def download_shards(data: Path, urls: Path, shards: Path, image_size: int, samples_per_shard: int) -> dict:
    """``data``'s images downloaded from the local server into webdataset shards (2 processes, 16 threads)."""
    from pipeline import download

    with served(data, urls) as table:
        return download.run(
            download.DownloadConfig(
                urls=str(table),
                out=str(shards),
                image_size=image_size,
                samples_per_shard=samples_per_shard,
                processes=2,
                threads=16,
            )
        )


def image_shards(
    work: Path, prefix: str, n: int, size: int, per: int, seed: int, stale: tuple[Path, ...] = ()
) -> tuple[Path, dict | None]:
    """``work/{prefix}shards``: ``n`` procedural images at ``size`` px -> 127.0.0.1 -> img2dataset, ``per``
    a shard, and the download summary. Reused (summary None) when ``work/{prefix}data.json`` says they were
    made alike and complete; otherwise the images, the shards and ``stale`` (what was made from earlier
    shards) are removed first, because img2dataset's overwrite mode is broken."""
    shards, data, stamp = work / f"{prefix}shards", work / f"{prefix}data", work / f"{prefix}data.json"
    want = {"n": n, "image_size": size, "samples_per_shard": per, "seed": seed}
    if stamp.exists() and json.loads(stamp.read_text()) == want:
        return shards, None
    for d in (data, shards, *stale):
        shutil.rmtree(d, ignore_errors=True)
    demo_images(data, n, size, seed)
    summary = download_shards(data, work / f"{prefix}urls.parquet", shards, size, per)
    if summary["successes"] == n:  # reused only when complete
        stamp.write_text(json.dumps(want))
    return shards, summary


def random_store(root: Path, shards: int, rows: int, dim: int = 512, seed: int = 0) -> Path:
    """A store of random unit rows (float16, ``dim``) with key/caption metadata, written by `pipeline.store`
    like the embed stage writes one. Reused when it exists with the same shape."""
    import pyarrow as pa

    from pipeline import store

    want = {"shards": shards, "rows": rows, "dim": dim, "seed": seed}
    stamp = root / "scale.json"
    if stamp.exists() and json.loads(stamp.read_text()) == want:
        return root
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(seed)
    manifest = store.Manifest.new(
        {"bench_scale_store": want}, store.ClipInfo("random", "none", dim, random_init=True)
    )
    store.write_manifest(root, manifest)
    for i in range(shards):
        sid = f"{i:05d}"
        arrays = {}
        for f in ("img_emb", "text_emb"):
            x = rng.standard_normal((rows, dim), dtype=np.float32)
            arrays[f] = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)
        meta = pa.table(
            {"key": [f"{sid}{j:05d}" for j in range(rows)], "caption": [f"row {j}" for j in range(rows)]}
        )
        store.write_shard(
            root, sid, arrays, {"metadata": meta, "errors": None}, rows, {"source": f"random/{sid}"}
        )
    manifest.shards = [{"shard": s, "rows": n} for s, n in store.shard_rows(root)]
    store.write_manifest(root, manifest)
    stamp.write_text(json.dumps(want))
    return root


def concat_field(root: Path, field: str) -> np.ndarray:
    """Every done shard's rows of one .npy field, in shard order (the order embedding-reader uses)."""
    from pipeline import store

    arrays = [store.open_array(root, field, s) for s, n in store.shard_rows(root) if n > 0]
    return np.concatenate(arrays)


def concat_metadata(root: Path, columns: list[str]) -> dict[str, list]:
    import pyarrow as pa

    from pipeline import store

    tables = [store.read_metadata(root, s, columns) for s, n in store.shard_rows(root) if n > 0]
    table = pa.concat_tables(tables)
    return {c: table[c].to_pylist() for c in columns}
