"""`unclip bench-anchors`, interoperability: embedding-reader and DALLE2-pytorch's prior loader
(`get_reader` / `make_splits`, in .venv-anchors) read our store, and what they yield is compared with the
store row by row."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from jobs.bench.data import concat_field, concat_metadata
from jobs.bench.harness import ANCHOR_SCRIPTS, side

if TYPE_CHECKING:
    from jobs.bench.anchors import AnchorsConfig


def _read_with_embedding_reader(store_root: Path, field: str):
    """The reader of ``field``/ with key and caption metadata, and the embeddings, keys, captions it yields."""
    from embedding_reader import EmbeddingReader

    reader = EmbeddingReader(
        str(store_root / field),
        file_format="parquet_npy",
        meta_columns=["key", "caption"],
        metadata_folder=str(store_root / "metadata"),
    )
    embs, keys, captions = [], [], []
    for emb, m in reader(batch_size=max(1, min(100, reader.count // 3)), show_progress=False):
        embs.append(emb)
        keys += m["key"].tolist()
        captions += m["caption"].tolist()
    return reader, np.concatenate(embs), keys, captions


def check_embedding_reader(store_root: Path) -> list[dict]:
    """embedding-reader (parquet_npy) reads our img_emb/ and text_emb/ with metadata: rows, values, keys."""
    meta = concat_metadata(store_root, ["key", "caption"])
    checks = []
    for field in ("img_emb", "text_emb"):
        name = f"embedding-reader parquet_npy reads {field}/ + metadata/"
        want = concat_field(store_root, field).astype(np.float32)
        try:
            reader, got, keys, captions = _read_with_embedding_reader(store_root, field)
        except Exception as e:  # it cannot read the store: that is the check failing, not the benchmark
            details = f"embedding-reader raised {type(e).__name__}: {e}"
            checks.append({"name": name, "passed": False, "details": details, "rows": 0})
            continue
        same = got.shape == want.shape and np.array_equal(got, want)
        keys_ok, captions_ok = keys == meta["key"], captions == meta["caption"]
        passed = (
            int(reader.count) == len(want) == len(got)
            and reader.dimension == want.shape[1]
            and same
            and keys_ok
            and captions_ok
        )
        details = (
            f"{int(reader.count)} rows (store {len(want)}), dim {reader.dimension}, embeddings "
            f"{'equal' if same else 'DIFFER'}, keys {'match' if keys_ok else 'DIFFER'}, "
            f"captions {'match' if captions_ok else 'DIFFER'}"
        )
        checks.append({"name": name, "passed": bool(passed), "details": details, "rows": int(reader.count)})
    return checks


def check_dalle2_loader(cfg: AnchorsConfig, store_root: Path, work: Path) -> list[dict]:
    """DALLE2-pytorch's get_reader/make_splits (in .venv-anchors) read our store; compare with the store."""
    import open_clip

    out = work / "dalle2_loader.npz"
    out.unlink(missing_ok=True)
    cmd = [cfg.anchors_python, str(ANCHOR_SCRIPTS / "dalle2_loader_check.py"), "--store", str(store_root)]
    cmd += ["--out", str(out), "--batch", "32"]
    info = side(cmd, work / "logs" / "dalle2_loader.log", "dalle2-pytorch prior loader").result()
    got = np.load(out)
    img = concat_field(store_root, "img_emb").astype(np.float32)
    txt = concat_field(store_root, "text_emb").astype(np.float32)
    captions = concat_metadata(store_root, ["caption"])["caption"]
    tokens = open_clip.tokenize(captions).numpy()
    n = len(img)
    pairs_ok = (
        got["img"].shape == img.shape and np.array_equal(got["img"], img) and np.array_equal(got["txt"], txt)
    )
    tc_ok = (
        got["img_tc"].shape == img.shape
        and np.array_equal(got["img_tc"], img)
        and got["tokens"].shape == tokens.shape
        and np.array_equal(got["tokens"], tokens)
    )
    return [
        {
            "name": "DALLE2-pytorch get_reader/make_splits: img_emb/ + text_emb/ pairs",
            "passed": bool(pairs_ok and sum(info["split_sizes"]) == n),
            "details": (
                f"train/eval/test {'/'.join(map(str, info['split_sizes']))} of {n} rows; image and text "
                f"embeddings {'equal to the store' if pairs_ok else 'DIFFER from the store'}"
            ),
            "rows": int(sum(info["split_sizes"])),
        },
        {
            "name": "DALLE2-pytorch get_reader/make_splits: img_emb/ + metadata/ captions",
            "passed": bool(tc_ok and sum(info["caption_split_sizes"]) == n),
            "details": (
                f"train/eval/test {'/'.join(map(str, info['caption_split_sizes']))} of {n} rows; image "
                f"embeddings {'equal' if tc_ok else 'DIFFER'}; its CLIP tokens of the captions "
                f"{'equal' if tc_ok else 'DIFFER from'} open_clip's tokens of our metadata captions"
            ),
            "rows": int(sum(info["caption_split_sizes"])),
        },
    ]
