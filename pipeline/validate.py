"""`unclip validate STORE`: check every shard of an embedding store against its manifest.

Reads the store (and each shard's source tar, when reachable, to compare keys). Writes nothing.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline import store
from pipeline.errors import UsageError

log = logging.getLogger(__name__)
NORM_TOLERANCE = 1e-2  # float16 storage keeps norms within ~1e-3 of 1


@dataclass
class ValidateConfig:
    store: str = field(metadata={"help": "store folder written by `unclip embed`"})
    check_tars: bool = True  # compare keys with the source tars when they can be read


def _tar_keys(url: str) -> list[str]:
    from pipeline.embed_shard import read_tar

    return [s.key for s in read_tar(url)]


def check_shard(root: Path, manifest: dict, marker: dict, check_tars: bool) -> list[str]:
    shard, rows, problems = marker["shard"], marker["rows"], []
    for rel, digest in marker["files"].items():
        p = root / rel
        if not p.exists():
            problems.append(f"{shard}: missing file {rel}")
        elif hashlib.sha256(p.read_bytes()).hexdigest() != digest:
            problems.append(f"{shard}: checksum mismatch for {rel}")
    if problems or rows == 0:
        return problems
    dim = manifest["clip"]["dim"]
    for fld in ("img_emb", "text_emb"):
        a = store.open_array(root, fld, shard)
        if a.shape != (rows, dim) or a.dtype != np.float16:
            problems.append(
                f"{shard}: {fld} is {a.dtype}{list(a.shape)}, manifest says float16[{rows}, {dim}]"
            )
            continue
        x = np.asarray(a, dtype=np.float32)
        if not np.isfinite(x).all():
            problems.append(f"{shard}: {fld} has NaN or inf")
        elif bad := int((np.abs(np.linalg.norm(x, axis=1) - 1) > NORM_TOLERANCE).sum()):
            problems.append(f"{shard}: {fld} has {bad} rows whose norm is not 1")
    if (lat := manifest.get("latents")) is not None:
        a = store.open_array(root, "latents", shard)
        if a.shape != (rows, *lat["shape"]) or a.dtype != np.uint8:
            problems.append(
                f"{shard}: latents are {a.dtype}{list(a.shape)}, manifest says uint8{[rows, *lat['shape']]}"
            )
    if (enc := manifest.get("text_enc")) is not None:
        off, tok = (
            store.open_array(root, "text_enc_offsets", shard),
            store.open_array(root, "text_enc", shard),
        )
        if len(off) != rows + 1 or off[0] != 0 or off[-1] != len(tok) or np.any(np.diff(off) <= 0):
            problems.append(f"{shard}: text_enc offsets do not cover {rows} rows")
        if tok.ndim != 2 or tok.shape[1] != enc["width"]:
            problems.append(f"{shard}: text_enc width {tok.shape[1:]} != {enc['width']}")
    meta = store.read_metadata(root, shard, ["key"])
    keys = meta["key"].to_pylist()
    if len(keys) != rows:
        problems.append(f"{shard}: metadata has {len(keys)} rows, done marker says {rows}")
    if len(set(keys)) != len(keys):
        problems.append(f"{shard}: keys are not unique")
    if check_tars:
        problems += _check_keys(root, shard, marker, keys)
    return problems


def _check_keys(root: Path, shard: str, marker: dict, keys: list[str]) -> list[str]:
    try:
        tar_keys = _tar_keys(marker["source"])
    except Exception as e:  # the tar may live elsewhere; say so, do not fail for it
        log.warning("%s: source tar %s not readable (%s); key check skipped", shard, marker["source"], e)
        return []
    err_path = store.field_path(root, "errors", shard)
    err_keys = set()
    if err_path.exists():
        import pyarrow.parquet as pq

        err_keys = set(pq.read_table(err_path, columns=["key"])["key"].to_pylist())
    expected = [k for k in tar_keys if k not in err_keys]
    return (
        [] if expected == keys else [f"{shard}: metadata keys differ from the tar's keys (order or content)"]
    )


def run(cfg: ValidateConfig) -> dict:
    root = Path(cfg.store)
    if not (root / store.MANIFEST).exists():
        raise UsageError(f"{root} is not an embedding store (no {store.MANIFEST})")
    manifest = store.load_manifest(root)
    problems: list[str] = []
    done = store.done_shards(root)
    listed = [s["shard"] for s in manifest.get("shards", [])]
    if listed != done:
        problems.append(f"manifest lists {len(listed)} shards but {len(done)} are done; rerun `unclip embed`")
    for folder in ("img_emb", "text_emb", "metadata"):
        for p in sorted((root / folder).glob(f"{folder}_*")):
            sid = p.name[len(folder) + 1 :].split(".")[0]
            if sid not in done:
                problems.append(f"{sid}: {p.name} has no done marker (partial shard); rerun `unclip embed`")
    rows = 0
    for sid in done:
        marker = store.read_done(root, sid)
        rows += marker["rows"]
        problems += check_shard(root, manifest, marker, cfg.check_tars)
    return {
        "store": str(root),
        "shards": len(done),
        "rows": rows,
        "ok": not problems,
        "problems": problems,
        "exit_code": 1 if problems else 0,
    }


def print_report(r: dict) -> None:
    status = "OK" if r["ok"] else f"{len(r['problems'])} problem(s)"
    print(f"validate {r['store']}: {r['shards']} shards, {r['rows']} rows: {status}")
    for p in r["problems"]:
        print(f"  - {p}")
