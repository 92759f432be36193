"""`unclip adopt FOLDER`: make an embedding folder written elsewhere (clip-retrieval's output, LAION's published
embedding sets) a store that `validate`, `train-prior` and the stream accept, without moving or rewriting it.

The folder holds ``img_emb/img_emb_N.npy``, ``text_emb/text_emb_N.npy`` and ``metadata/metadata_N.parquet``,
numbered with or without zero padding, gaps allowed, float16 or float32, and no manifest. Adopt checks every
shard (row counts agree across the three files, dims and dtypes agree across shards and with the named CLIP
model, every row finite and not all zeros, norms measured, a ``key`` column, if there is one, without nulls or
repeats), then writes only ``manifest.json`` and ``done/N.json`` markers with checksums, the markers first and
the manifest last, each atomically. A folder that fails a check gets one line per problem (the first few, then
a count), exit 2, and nothing written. Rerunning on an adopted folder is a no-op, except that it writes a
damaged manifest again (it is derived from the folder's files). The user's other files in the folder
(``_SUCCESS``, notes) are left alone, and `validate` passes over them too.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from tqdm import tqdm

from pipeline import store
from pipeline.errors import UsageError

log = logging.getLogger(__name__)

FLOAT_DTYPES = ("float16", "float32")
# The named CLIP must embed the folder's captions as its text embeddings say, to this median cosine. One model
# agrees with itself to >= 0.9999 across devices and precisions (`pipeline.encoders.PROBE_MIN_COSINE`'s note);
# the median leaves room for a few captions another tokenizer cleans otherwise (HTML entities, full-width text)
CLIP_CHECK_MIN_COSINE = 0.99
NORM_TOLERANCE = 1e-2
SHOWN = 5  # problems listed before "and N more"


@dataclass
class AdoptConfig:
    folder: str = field(metadata={"help": "clip-retrieval-layout folder: img_emb/, text_emb/, metadata/"})
    clip: str = field(
        metadata={"help": "open_clip architecture the embeddings were made with, e.g. ViT-L-14"}
    )
    pretrained: str = field(
        metadata={"help": "its pretrained tag or checkpoint path (recorded for sampling)"}
    )
    normalize: bool = False  # L2-normalise embeddings when they are read (for folders stored un-normalised)
    # embed this many of the folder's captions with --clip/--pretrained and compare them with its text
    # embeddings (0: adopt without checking the model; nothing then tells a wrong --clip of the same size)
    check_clip: int = 64


def discover(folder: Path) -> list[str]:
    """Shard ids (the file names' numbers as written: "0", "12" or "00012"), in numeric order: every shard that
    any of the three folders holds a file of, so that a shard missing one of its files (its image embeddings
    included) is reported by `check_shard`, not passed over."""
    ids: set[str] = set()
    for f in ("img_emb", "text_emb", "metadata"):
        own = store.field_shard_ids(folder, f)
        if len({int(i) for i in own}) != len(own):
            raise UsageError(
                f"{store.field_dir(folder, f)} names the same shard number twice (padded and unpadded)"
            )
        ids.update(own)
    by_number: dict[int, set[str]] = {}
    for i in ids:
        by_number.setdefault(int(i), set()).add(i)
    twice = sorted(v for v in by_number.values() if len(v) > 1)
    if twice:
        raise UsageError(
            f"{folder}: the folders name shard {' and '.join(sorted(twice[0]))} differently (padded and unpadded); "
            "rename the files to one spelling"
        )
    return sorted(ids, key=int)


@dataclass
class ShardCheck:
    shard: str
    rows: int
    dims: dict[str, tuple[int, str]]  # field -> (dim, dtype)
    norm_min: float
    norm_max: float


def _norms(a: np.ndarray) -> tuple[bool, int, float, float]:
    """(all rows finite, rows of zero norm, smallest and largest norm of the others), read in chunks."""
    lo, hi, finite, zeros = np.inf, 0.0, True, 0
    for n in store.row_norms(a):
        if n is None:
            finite = False
            continue
        zero = n < store.ZERO_NORM
        zeros += int(zero.sum())
        n = n[~zero]
        if len(n):
            lo, hi = min(lo, float(n.min())), max(hi, float(n.max()))
    return finite, zeros, lo, hi


def _key_problems(path: Path) -> str | None:
    """What is wrong with a metadata file's ``key`` column, if it has one: the stream splits rows by key, so a
    null one stops training, and a key twice in a shard is refused by `validate` too. None when it is fine."""
    if "key" not in pq.ParquetFile(path).schema_arrow.names:
        return None  # rows are then split by position
    keys = pq.read_table(path, columns=["key"])["key"]
    if keys.null_count:
        first = keys.to_pylist().index(None)
        return f"its key column has {keys.null_count} null key(s) (row {first} first)"
    if len(set(keys.to_pylist())) != len(keys):
        return "its key column holds a key twice"
    return None


def check_shard(folder: Path, shard: str, dim: int) -> tuple[ShardCheck | None, list[str]]:
    problems: list[str] = []
    paths = {f: store.field_path(folder, f, shard) for f in ("img_emb", "text_emb", "metadata")}
    for p in paths.values():
        if not p.is_file():
            problems.append(f"shard {shard}: {p.relative_to(folder)} is missing")
    if problems:
        return None, problems
    arrays, dims, lo, hi = {}, {}, np.inf, 0.0
    for f in ("img_emb", "text_emb"):
        try:
            a = np.load(paths[f], mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as e:
            problems.append(f"shard {shard}: {paths[f].relative_to(folder)} is not a readable .npy ({e})")
            continue
        if a.ndim != 2 or str(a.dtype) not in FLOAT_DTYPES:
            problems.append(
                f"shard {shard}: {f} is {a.dtype}{list(a.shape)}; expected float16 or float32 [rows, dim]"
            )
            continue
        if a.shape[1] != dim:
            problems.append(f"shard {shard}: {f} is {a.shape[1]}-d; the named CLIP model gives {dim}-d")
        arrays[f], dims[f] = a, (a.shape[1], str(a.dtype))
        finite, zeros, n_lo, n_hi = _norms(a)
        if not finite:
            problems.append(f"shard {shard}: {f} has NaN or inf rows")
        if zeros:
            problems.append(f"shard {shard}: {f} has {zeros} all-zero row(s), which are no embeddings")
        lo, hi = min(lo, n_lo), max(hi, n_hi)
    try:
        meta_rows = pq.ParquetFile(paths["metadata"]).metadata.num_rows
    except Exception as e:  # pyarrow raises several types for a file that is not parquet
        problems.append(
            f"shard {shard}: {paths['metadata'].relative_to(folder)} is not readable parquet ({e})"
        )
        meta_rows = None
    if meta_rows is not None and (why := _key_problems(paths["metadata"])):
        problems.append(
            f"shard {shard}: {paths['metadata'].relative_to(folder)}: {why}; mend it, or drop the key column "
            "(rows are then split by position)"
        )
    counts = {f: len(a) for f, a in arrays.items()}
    if meta_rows is not None:
        counts["metadata"] = meta_rows
    if len(set(counts.values())) > 1:
        problems.append(
            f"shard {shard}: row counts differ: " + ", ".join(f"{f} {n}" for f, n in counts.items())
        )
    if problems:
        return None, problems
    return ShardCheck(shard, counts["img_emb"], dims, lo, hi), []


def _digest(path: Path) -> str:
    return store.sha256_of(path, 1 << 24)


def _manifest(
    cfg: AdoptConfig, checks: list[ShardCheck], dim: int, context_length: int, probe: dict | None = None
) -> dict:
    lo, hi = min(c.norm_min for c in checks), max(c.norm_max for c in checks)
    normalized = abs(lo - 1) <= NORM_TOLERANCE and abs(hi - 1) <= NORM_TOLERANCE

    def emb(f: str) -> store.EmbeddingInfo:
        return store.EmbeddingInfo(dim, checks[0].dims[f][1], normalized, cfg.normalize and not normalized)

    from pipeline.encoders import checkpoint_sha256

    clip = store.ClipInfo(
        cfg.clip,
        cfg.pretrained,
        dim,
        context_length,
        cfg.pretrained.lower() in ("none", "random", ""),
        checkpoint_sha256(cfg.pretrained),  # what sampling checks the file against
        probe,  # where the model was checked against the folder (`check_clip`): what sampling compares
    )
    return store.Manifest(
        identity={"adopted": True, "clip": cfg.clip, "pretrained": cfg.pretrained},
        clip=clip,
        img_emb=emb("img_emb"),
        text_emb=emb("text_emb"),
        adopted={"norm_min": lo, "norm_max": hi},
        shards=[{"shard": c.shard, "rows": c.rows, "source": "adopted"} for c in checks],
    ).to_json()


def run(cfg: AdoptConfig) -> dict:
    from pipeline.encoders import clip_dims, validate_clip

    folder = Path(cfg.folder)
    if not store.field_dir(folder, "img_emb").is_dir():
        raise UsageError(f"{folder} has no img_emb/ folder: not a clip-retrieval-layout embedding folder")
    validate_clip(cfg.clip, cfg.pretrained)
    dims = clip_dims(cfg.clip)
    shards = discover(folder)
    if not shards:
        raise UsageError(
            f"{folder} holds no img_emb_<number>.npy, text_emb_<number>.npy or metadata_<number>.parquet files"
        )
    checks, problems = [], []
    for s in tqdm(shards, desc="adopt: check", unit="shard", disable=None):
        c, p = check_shard(folder, s, dims.dim)
        problems += p
        if c is not None:
            checks.append(c)
    dtypes = {(f, c.dims[f][1]) for c in checks for f in c.dims}
    if (
        len({d for f, d in dtypes if f == "img_emb"}) > 1
        or len({d for f, d in dtypes if f == "text_emb"}) > 1
    ):
        problems.append("dtypes differ across shards: " + ", ".join(sorted(f"{f} {d}" for f, d in dtypes)))
    stale = sorted(
        (p for p in (folder / "done").glob("*.json") if p.stem not in shards), key=lambda p: p.name
    )
    if stale and not (folder / store.MANIFEST).exists():
        problems.append(
            f"done/ holds markers of no shard here ({', '.join(p.name for p in stale[:3])}); remove them"
        )
    if not problems and not sum(c.rows for c in checks):
        problems.append(f"its {len(checks)} shard(s) hold no rows: nothing to train on")
    if problems:
        more = f"; and {len(problems) - SHOWN} more" if len(problems) > SHOWN else ""
        raise UsageError(f"{folder} cannot be adopted: " + "; ".join(problems[:SHOWN]) + more)
    old = _old_manifest(folder)
    if old is not None and not old.get("identity", {}).get("adopted"):
        raise UsageError(f"{folder} is already a store written by `unclip embed`; it needs no adopting")
    probe = _checked_probe(cfg, folder, checks, old)
    manifest = _manifest(cfg, checks, dims.dim, dims.context_length, probe)
    stale = stale if store.is_adopted(folder) else []  # an earlier adoption's, of shards since removed
    ondisk = {c.shard: _read_marker(folder, c.shard) for c in checks}
    # by the files' size and time: the shards whose files are unchanged since they were hashed are not read
    todo = [c for c in checks if not _marker_current(folder, c, ondisk[c.shard])]
    unmarked = {c.shard for c in todo if ondisk[c.shard] is None}
    must_write = old != manifest or bool(stale) or bool(unmarked)
    if must_write:
        _check_writable(folder)  # before the checksums, which read every byte: a read-only mount
    markers = {}
    for c in tqdm(todo, desc="adopt: checksums", unit="shard", disable=None):
        marker = {"shard": c.shard, "rows": c.rows, "files": {}, "stat": {}, "source": "adopted", "errors": 0}
        for rel, path in _shard_files(folder, c.shard).items():
            marker["stat"][rel] = _stat(path)  # before hashing: a file changed meanwhile is hashed again
            marker["files"][rel] = _digest(path)
        markers[c.shard] = {**marker, "truncated_captions": 0}
    # (with nothing else to write, every shard has a marker: only its rows and checksums can have changed)
    if not must_write and all(
        ondisk[c.shard][k] == markers[c.shard][k] for c in todo for k in ("rows", "files")
    ):
        # A rerun over unchanged files (a folder adopted by an earlier version, or copied: the times differ):
        # where it can, it keeps their times, so that the next rerun reads none
        leftovers = _our_temp_files(folder)
        if (todo or leftovers) and store.unwritable(folder / "done") is None:
            with store.hold_folder(folder, flag="folder"):
                for p in _our_temp_files(folder):  # a kill during an earlier rerun's marker writes
                    p.unlink(missing_ok=True)
                for c in todo:
                    store.write_json(store.done_path(folder, c.shard), markers[c.shard])
        return _report(folder, manifest, checks, adopted_now=False)
    _check_writable(folder)
    with store.hold_folder(folder, flag="folder"):  # two adoptions of one folder at once: refused
        for p in _our_temp_files(folder):  # an earlier adoption's, killed mid-write
            p.unlink(missing_ok=True)
        for p in stale:
            log.warning("adopt: %s is no longer in %s: its done marker %s goes", p.stem, folder, p)
            p.unlink()
        for c in todo:
            store.write_json(store.done_path(folder, c.shard), markers[c.shard])
        # last: a folder with a manifest is a finished adoption
        store.write_json(folder / store.MANIFEST, manifest)
    return _report(folder, manifest, checks, adopted_now=True)


def _checked_probe(cfg: AdoptConfig, folder: Path, checks: list[ShardCheck], old: dict | None) -> dict | None:
    """The named CLIP's probe (`pipeline.encoders.clip_probe`) once it is checked to make the folder's text
    embeddings (`check_clip`); an earlier adoption's where it checked this same model (a rerun loads none);
    None when unchecked. A model that does not make them is a UsageError: a prior trained on another model's
    embeddings of the same size samples from prompts it never learnt, and nothing else tells."""
    from pipeline.encoders import checkpoint_sha256

    then = (old or {}).get("clip") or {}
    same = (then.get("arch"), then.get("pretrained"), then.get("sha256")) == (
        cfg.clip,
        cfg.pretrained,
        checkpoint_sha256(cfg.pretrained),
    )
    if same and then.get("probe"):
        return then["probe"]
    if cfg.check_clip <= 0:
        return None
    return check_clip(cfg, folder, checks)


def check_clip(cfg: AdoptConfig, folder: Path, checks: list[ShardCheck]) -> dict | None:
    """Embed up to ``cfg.check_clip`` of the folder's captions (the first non-empty ones, in shard order) with
    the named CLIP and compare them with the folder's text embeddings of those rows; the model's probe when they
    agree (median cosine >= CLIP_CHECK_MIN_COSINE), None when the folder has no captions to check with."""
    import torch

    from pipeline.encoders import clip_probe, encode_text, load_clip, normalize

    captions, rows = [], []
    for c in checks:
        meta = pq.ParquetFile(store.field_path(folder, "metadata", c.shard))
        if "caption" not in meta.schema_arrow.names:
            continue
        text = meta.read(columns=["caption"]).column("caption").to_pylist()
        take = [i for i, t in enumerate(text) if isinstance(t, str) and t.strip()][
            : cfg.check_clip - len(captions)
        ]
        if take:
            emb = np.load(store.field_path(folder, "text_emb", c.shard), mmap_mode="r")
            captions += [text[i] for i in take]
            rows.append(np.asarray(emb[take], dtype=np.float32))
        if len(captions) >= cfg.check_clip:
            break
    if not captions:
        log.warning(
            "adopt: %s has no captions to check --clip %s against; adopted unchecked", folder, cfg.clip
        )
        return None
    try:
        clip = load_clip(cfg.clip, cfg.pretrained, "cpu")
    except UsageError as e:
        raise UsageError(f"{e} (adopt loads --clip to check it; --check-clip 0 adopts without that)") from e
    with torch.no_grad():
        mine = normalize(encode_text(clip, clip.tokenizer(captions))[0])
    cos = (mine * normalize(torch.from_numpy(np.concatenate(rows)))).sum(-1)
    median, low = float(cos.median()), float(cos.min())
    if median < CLIP_CHECK_MIN_COSINE:
        raise UsageError(
            f"--clip {cfg.clip} --pretrained {cfg.pretrained} did not make {folder}'s text embeddings: it embeds "
            f"the first {len(captions)} captions at a median cosine of {median:.3f} to them (the model that made "
            f"them gives >= {CLIP_CHECK_MIN_COSINE}); name that model, or pass --check-clip 0 to adopt unchecked"
        )
    log.info(
        "adopt: --clip %s checked on %d captions: cosine median %.4f, min %.4f",
        cfg.clip,
        len(captions),
        median,
        low,
    )
    return clip_probe(clip)


def _old_manifest(folder: Path) -> dict | None:
    """The folder's manifest, if it has one. One that cannot be read is rewritten when the folder is an
    adoption (every done marker is adopt's): it is derived from the user's files, which are all there; no other
    command could mend it (embed refuses an adopted folder)."""
    if not (folder / store.MANIFEST).exists():
        return None
    try:
        return store.load_manifest(folder)
    except UsageError as e:
        try:  # a newer version's manifest is not damaged: this code must not write over it
            version = store.read_json(folder / store.MANIFEST).get("format_version")
            newer = isinstance(version, int) and version > store.FORMAT_VERSION
        except (OSError, ValueError, AttributeError):
            newer = False
        markers = [_read_marker(folder, s) for s in store.done_shards(folder)]
        ours = markers and all(m is not None and m.get("source") == "adopted" for m in markers)
        if newer or not ours:  # (a manifest.json beside no marker of ours may be the user's own file)
            raise
        log.warning("adopt: %s; it is written again from the folder's files", e)
        return None


def _our_temp_files(folder: Path) -> list[Path]:
    """Temp files of adopt's own writes (a marker's or the manifest's, cut off by a kill): only those names, in
    only those places; the rest of the folder is the user's."""
    ours = {
        folder / "done": re.compile(r"\..+\.json\.tmp\d+"),
        folder: re.compile(r"\.manifest\.json\.tmp\d+"),
    }
    return [p for p in store.temp_files(folder) if p.parent in ours and ours[p.parent].fullmatch(p.name)]


def _check_writable(folder: Path) -> None:
    for place in (folder / "done", folder):
        if (blocked := store.unwritable(place)) is not None:
            raise UsageError(
                f"{folder} cannot be adopted here: {blocked} is not writable (adopt writes manifest.json and done/ "
                "markers beside the embeddings); copy or link the folder somewhere writable"
            )


def _read_marker(folder: Path, shard: str) -> dict | None:
    try:
        return store.read_done(folder, shard)
    except (OSError, ValueError, UsageError):
        return None


def _shard_files(folder: Path, shard: str) -> dict[str, Path]:
    """A shard's adopted files by their path relative to the folder (a done marker's ``files`` keys)."""
    return {
        str(store.field_path(folder, f, shard).relative_to(folder)): store.field_path(folder, f, shard)
        for f in ("img_emb", "text_emb", "metadata")
    }


def _stat(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _marker_current(folder: Path, c: ShardCheck, marker: dict | None) -> bool:
    """Whether the shard's done marker still describes its files: same rows, same files, each of the same size
    and modification time as when it was hashed. A file the user rewrote (new captions in its metadata, say)
    is hashed again by a rerun, so its marker never keeps a checksum the file no longer has."""
    if marker is None:
        return False
    files = _shard_files(folder, c.shard)
    stat = marker.get("stat")
    return (
        marker.get("source") == "adopted"
        and marker.get("rows") == c.rows
        and isinstance(stat, dict)
        and set(marker.get("files", {})) == set(files) == set(stat)
        and all(stat[rel] == _stat(p) for rel, p in files.items())
    )


def _report(folder: Path, manifest: dict, checks: list[ShardCheck], adopted_now: bool) -> dict:
    a = manifest["adopted"]
    state = (
        "normalised"
        if manifest["img_emb"]["normalized"]
        else (
            "NOT normalised: normalised on read"
            if manifest["img_emb"].get("normalize_on_read")
            else "NOT normalised (pass --normalize to normalise them on read)"
        )
    )
    return {
        "store": str(folder),
        "shards": len(checks),
        "rows": sum(c.rows for c in checks),
        "dim": manifest["clip"]["dim"],
        "dtype": manifest["img_emb"]["dtype"],
        "norms": f"{a['norm_min']:.4f} .. {a['norm_max']:.4f} ({state})",
        "adopted_now": adopted_now,
    }
