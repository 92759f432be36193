"""`unclip validate STORE`: check every shard of an embedding store against its manifest.

Reads the store (and each shard's source tar, when reachable, to compare keys). Writes nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from pipeline import store
from pipeline.errors import UsageError

log = logging.getLogger(__name__)
NORM_TOLERANCE = 1e-2  # float16 storage keeps norms within ~1e-3 of 1


@dataclass
class ValidateConfig:
    store: str = field(metadata={"help": "store folder written by `unclip embed`"})
    check_tars: bool = True  # compare keys with the source tars when they can be read


def _tar_keys(url: str) -> list[str]:
    from pipeline.shard_samples import read_tar

    return [s.key for s in read_tar(url)]


MARKER_KEYS = {"shard": str, "rows": int, "files": dict}


def check_shard(root: Path, manifest: dict, marker: dict, check_tars: bool) -> list[str]:
    """Problems of one done shard; a file that cannot be read is a problem naming it, never an exception."""
    try:
        return _check_shard(root, manifest, marker, check_tars)
    except Exception as e:  # a damaged .npy/.parquet that still matches its checksum, or a missing field file
        shard = marker["shard"]
        what = getattr(e, "damage", None) or (
            f"cannot read its files ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]})"
        )
        return [f"{shard}: {what}; {_repair(root, manifest, shard)}"]


def _finite(a: np.ndarray, chunk: int = 1 << 16) -> bool:
    return all(
        np.isfinite(np.asarray(a[i : i + chunk], dtype=np.float32)).all() for i in range(0, len(a), chunk)
    )


def _embedding_problems(a: np.ndarray, normalized: bool) -> str | None:
    """What is wrong with a shard's embeddings, read in chunks: NaN or inf, all-zero rows, or (where the
    manifest says they are normalised) rows whose norm is not 1."""
    zeros = off = 0
    for n in store.row_norms(a):
        if n is None:
            return "has NaN or inf"
        zeros += int((n < store.ZERO_NORM).sum())
        off += int((np.abs(n - 1) > NORM_TOLERANCE).sum()) if normalized else 0
    if zeros:
        return f"has {zeros} all-zero row(s), which are no embeddings"
    return f"has {off} rows whose norm is not 1" if off else None


def _check_shard(root: Path, manifest: dict, marker: dict, check_tars: bool) -> list[str]:
    shard, rows, problems = marker["shard"], marker["rows"], []
    for rel, digest in marker["files"].items():
        p = root / rel
        if not p.exists():
            problems.append(f"{shard}: missing file {rel}; {_repair(root, manifest, shard)}")
        elif store.sha256_of(p) != digest:
            problems.append(f"{shard}: checksum mismatch for {rel}; {_repair(root, manifest, shard)}")
    if problems or rows == 0:
        return problems
    dim = manifest["clip"]["dim"]
    for fld in ("img_emb", "text_emb"):
        a = store.open_array(root, fld, shard)
        want = manifest[fld]["dtype"]  # float16 from embed; adopted folders may hold float32
        if a.shape != (rows, dim) or str(a.dtype) != want:
            problems.append(
                f"{shard}: {fld} is {a.dtype}{list(a.shape)}, manifest says {want}[{rows}, {dim}]"
            )
            continue
        if why := _embedding_problems(a, manifest[fld].get("normalized", True)):
            problems.append(f"{shard}: {fld} {why}")
    if (lat := manifest.get("latents")) is not None:
        a = store.open_array(root, "latents", shard)
        if a.shape != (rows, *lat["shape"]) or a.dtype != store.LATENT_DTYPE:
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
        if tok.ndim != 2 or tok.shape[1] != enc["width"] or tok.dtype != enc["dtype"]:
            problems.append(
                f"{shard}: text_enc is {tok.dtype}{list(tok.shape)}, manifest says {enc['dtype']}[*, {enc['width']}]"
            )
        elif not _finite(tok):
            problems.append(f"{shard}: text_enc has NaN or inf")
    names = pq.ParquetFile(store.field_path(root, "metadata", shard)).schema_arrow.names
    if "key" not in names:  # an adopted folder's metadata may have no key column: count its rows
        n = pq.ParquetFile(store.field_path(root, "metadata", shard)).metadata.num_rows
        return problems + ([f"{shard}: metadata has {n} rows, done marker says {rows}"] if n != rows else [])
    keys = store.read_metadata(root, shard, ["key"])["key"].to_pylist()
    if len(keys) != rows:
        problems.append(f"{shard}: metadata has {len(keys)} rows, done marker says {rows}")
    if None in keys:  # the stream splits rows by key: training stops at the first null
        problems.append(
            f"{shard}: metadata has {keys.count(None)} null key(s) (row {keys.index(None)} first)"
        )
    elif len(set(keys)) != len(keys):
        problems.append(f"{shard}: keys are not unique")
    if check_tars:
        problems += _check_keys(root, shard, marker, keys)
    return problems


def redo(root: Path, manifest: dict) -> str:
    """The command that rewrites this store's damaged or missing shards: adopt for an adopted folder."""
    ident = manifest.get("identity") or {}
    if ident.get("adopted"):
        norm = " --normalize" if (manifest.get("img_emb") or {}).get("normalize_on_read") else ""
        return f"rerun `unclip adopt {root} --clip {ident.get('clip')} --pretrained {ident.get('pretrained')}{norm}`"
    return "rerun `unclip embed`"


def _repair(root: Path, manifest: dict, shard: str) -> str:
    """How to redo one done shard whose files are damaged: its marker goes, then the store is redone."""
    return f"delete done/{shard}.json and {redo(root, manifest)}"


def _check_keys(root: Path, shard: str, marker: dict, keys: list[str]) -> list[str]:
    if not marker.get("source") or marker["source"] == "adopted":  # adopted folders keep no tars to compare
        return []
    from pipeline.shard_samples import tar_bytes

    then, now = marker.get("source_bytes"), tar_bytes(marker["source"])
    if then is not None and now is not None and then != now:  # another tar there now: nothing to compare with
        log.warning(
            "%s: source tar %s is %d bytes now, %d when the shard was embedded: not the tar it was embedded "
            "from (downloaded again since?); key check skipped",
            shard, marker["source"], now, then,
        )  # fmt: skip
        return []
    try:
        tar_keys = _tar_keys(marker["source"])
    except Exception as e:  # the tar may live elsewhere; say so, do not fail for it
        log.warning("%s: source tar %s not readable (%s); key check skipped", shard, marker["source"], e)
        return []
    err_path = store.field_path(root, "errors", shard)
    err_keys = set()
    if err_path.exists():
        import pyarrow.parquet as pq

        t = pq.read_table(err_path, columns=["key", "reason"]).to_pydict()
        # A duplicate's error row names the key of the first sample, which was kept.
        err_keys = {k for k, r in zip(t["key"], t["reason"]) if not r.startswith("duplicate key")}
    expected = [k for k in dict.fromkeys(tar_keys) if k not in err_keys]
    return (
        []
        if expected == keys
        else [f"{shard}: metadata keys differ from the tar's keys ({_key_diff(expected, keys)})"]
    )


def _key_diff(tar: list[str], ours: list[str]) -> str:
    """How the store's keys differ from the tar's (less its error rows): what a user needs to see why."""
    in_ours, in_tar = set(ours), set(tar)
    missing = [k for k in tar if k not in in_ours]
    extra = [k for k in ours if k not in in_tar]
    said = []
    if missing:
        said.append(
            f"{len(missing)} of the tar's samples neither embedded nor in its error rows, first {missing[0]!r}"
        )
    if extra:
        said.append(f"{len(extra)} key(s) not in the tar, first {extra[0]!r}")
    if not said and len(ours) != len(tar):  # the same keys, some twice ("keys are not unique" says so too)
        seen: set = set()
        again = [k for k in ours if k in seen or seen.add(k)]
        said.append(f"{len(again)} key(s) twice, first {again[0]!r}")
    elif not said:
        first = next(i for i, (a, b) in enumerate(zip(tar, ours)) if a != b)
        said.append(
            f"the same keys in another order, from row {first} ({ours[first]!r} where the tar has {tar[first]!r})"
        )
    return "; ".join(said)


def _read_json(path: Path, required: dict[str, type]) -> tuple[dict | None, str | None]:
    """(object, None) or (None, what is wrong with the file)."""
    try:
        obj = store.read_json(path)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return None, f"{path.name} is not valid JSON ({str(e).splitlines()[0][:120]})"
    if not isinstance(obj, dict):
        return None, f"{path.name} is not a JSON object"
    bad = [k for k, tp in required.items() if not isinstance(obj.get(k), tp) or isinstance(obj.get(k), bool)]
    if bad:
        return None, f"{path.name} lacks or mistypes {', '.join(bad)}"
    return obj, None


def _stray_files(root: Path, markers: dict[str, dict], again: str, adopted: bool = False) -> list[str]:
    """Files in the store's field folders that no done marker lists: partial shards, temp files of a killed
    writer, or files put there by hand. An adopted folder is the user's: there only shard files (a shard added
    since the adoption) count, not their other files (`_SUCCESS`, `.DS_Store`, notes), which adopt passes over."""
    listed = {rel for m in markers.values() for rel in m["files"]}
    shard_files = {
        str(store.field_path(root, f, s).relative_to(root))
        for f in store.FIELDS
        for s in store.field_shard_ids(root, f)
    }
    problems = [
        f"{p.relative_to(root)}: temp file of an interrupted write; remove it"
        for p in store.temp_files(root)
        if p.parent in (root, root / "done")
    ]
    for folder in sorted({f[0] for f in store.FIELDS.values()}):
        for p in sorted((root / folder).iterdir()) if (root / folder).is_dir() else []:
            rel = str(p.relative_to(root))
            if rel in listed or (adopted and rel not in shard_files):
                continue
            if p.name.startswith(".") and ".tmp" in p.name:
                problems.append(f"{rel}: temp file of an interrupted write; remove it")
            else:
                problems.append(
                    f"{rel}: no done marker lists it (a partial shard or a stray file); remove it, or {again} "
                    "if its shard is to be in the store"
                )
    return problems


def run(cfg: ValidateConfig) -> dict:
    root = Path(cfg.store)
    if not (root / store.MANIFEST).exists():
        raise UsageError(f"{root} is not an embedding store (no {store.MANIFEST})")
    manifest, why = _read_json(root / store.MANIFEST, {"clip": dict, "img_emb": dict, "text_emb": dict})
    if manifest is not None:
        try:
            store.Manifest.from_json(manifest)
        except store.ManifestError as e:
            manifest, why = None, str(e)
    if manifest is None:
        sources = [m.get("source") for p in (root / "done").glob("*.json") if (m := _json_object(p))]
        fix = (
            "rerun `unclip adopt` on it with its --clip and --pretrained, which writes the manifest again"
            if sources and all(x == "adopted" for x in sources)
            else "re-embed it with --overwrite"
        )
        return _report(root, 0, 0, [f"{why}; the store cannot be read ({fix})"])
    problems: list[str] = []
    again = redo(root, manifest)
    done = store.done_shards(root)
    markers: dict[str, dict] = {}
    for sid in done:
        marker, why = _read_json(store.done_path(root, sid), MARKER_KEYS)
        if marker is None:
            problems.append(f"done/{sid}.json: {why}; delete it and {again}")
        elif marker["shard"] != sid or any(not isinstance(d, str) for d in marker["files"].values()):
            problems.append(f"done/{sid}.json: names shard {marker['shard']!r} or has bad checksums")
        else:
            markers[sid] = marker
    listed = [s.get("shard") for s in manifest.get("shards", []) if isinstance(s, dict)]
    if listed != done:
        problems.append(f"manifest lists {len(listed)} shards but {len(done)} are done; {again}")
    problems += _stray_files(root, markers, again, bool((manifest.get("identity") or {}).get("adopted")))
    rows = 0
    for marker in markers.values():
        rows += marker["rows"]
        problems += check_shard(root, manifest, marker, cfg.check_tars)
    return _report(root, len(done), rows, problems)


def _json_object(path: Path) -> dict | None:
    try:
        obj = store.read_json(path)
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def _report(root: Path, shards: int, rows: int, problems: list[str]) -> dict:
    return {
        "store": str(root),
        "shards": shards,
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
