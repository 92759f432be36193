"""The on-disk format of the embedding store: the one module every writer and reader imports.

Layout under the store root (shard ``00012.tar`` becomes shard id ``"00012"``)::

    manifest.json                               model, dims, dtypes, codec, quantisation constants, shards
    img_emb/img_emb_00012.npy                   float16 [N, D], L2-normalised
    text_emb/text_emb_00012.npy                 float16 [N, D], L2-normalised
    metadata/metadata_00012.parquet             key, caption, url, width, height, ... (same row order)
    latents/latents_00012.npy                   uint8 [N, C, h, w]                  (optional)
    text_enc/text_enc_00012.npy                 float16 [T, W] per-token encodings, flat (optional)
    text_enc/text_enc_offsets_00012.npy         int64 [N + 1]: row i is tokens offsets[i]:offsets[i+1]
    errors/errors_00012.parquet                 key, reason for samples that could not be used
    done/00012.json                             rows and sha256 of every file above; written last

The folder, file and column names follow clip-retrieval's layout, which embedding-reader reads. A shard with
0 usable rows writes only its done marker (and its error table): embedding-reader drops 0-row .npy files and
would then pair later metadata files with the wrong embeddings.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import StageError, UsageError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# field -> (folder, file prefix, suffix)
FIELDS: dict[str, tuple[str, str, str]] = {
    "img_emb": ("img_emb", "img_emb", ".npy"),
    "text_emb": ("text_emb", "text_emb", ".npy"),
    "metadata": ("metadata", "metadata", ".parquet"),
    "latents": ("latents", "latents", ".npy"),
    "text_enc": ("text_enc", "text_enc", ".npy"),
    "text_enc_offsets": ("text_enc", "text_enc_offsets", ".npy"),
    "errors": ("errors", "errors", ".parquet"),
}
LATENT_CODECS = ("none", "pixels", "vae")
EMB_DTYPE = np.float16  # what `unclip embed` writes; adopted folders may hold float32 (the manifest says)
LATENT_DTYPE = np.uint8
ZERO_NORM = 1e-6  # an embedding row shorter than this is none (a failed image's zeros: it has no direction)
TEXT_ENC_LAYOUT = "flat tokens + offsets"


class ManifestError(UsageError):
    """A manifest this code cannot read: not an object, missing keys, or a newer format version."""


@dataclass
class ClipInfo:
    arch: str
    pretrained: str
    dim: int
    context_length: int = 77
    random_init: bool = False
    sha256: str | None = (
        None  # a checkpoint file's content (`pipeline.encoders.checkpoint_sha256`); None: a tag
    )
    # what the model embeds a fixed image and caption as (`pipeline.encoders.clip_probe`), recorded by the first
    # embed run's warm-up; every later model embedding into the store is compared with it. None: not yet, or
    # a store of `unclip adopt` (no model at hand)
    probe: dict | None = None


@dataclass
class EmbeddingInfo:
    """One embedding field (img_emb or text_emb): [rows, dim] of ``dtype``."""

    dim: int
    dtype: str = np.dtype(EMB_DTYPE).name
    normalized: bool = True
    normalize_on_read: bool = False  # adopted folders stored un-normalised, normalised by the stream

    def to_json(self) -> dict:
        out = {"dtype": self.dtype, "shape": [self.dim], "normalized": self.normalized}
        return {**out, "normalize_on_read": True} if self.normalize_on_read else out

    @classmethod
    def from_json(cls, d: dict) -> EmbeddingInfo:
        return cls(
            int(d["shape"][0]), d["dtype"], bool(d["normalized"]), bool(d.get("normalize_on_read", False))
        )


@dataclass
class Manifest:
    """``manifest.json``: what the store holds, as every writer records it and every reader checks it.

    ``latents`` is the codec's own description (``codec``, ``shape``, ``dtype``, ``lo``/``hi`` quantisation
    constants, ``image_size``, and for ``vae`` the model, its ``scale`` and, where its folder was at hand, its
    content's ``sha256``: `pipeline.encoders.vae_sha256`), kept as the codec wrote it.
    """

    identity: dict  # the settings that made the store; a rerun with others is refused
    clip: ClipInfo
    img_emb: EmbeddingInfo
    text_emb: EmbeddingInfo
    text_enc_width: int = 0  # 0 = no per-token text encodings
    latents: dict | None = None
    shards: list[dict] = field(default_factory=list)
    adopted: dict | None = None  # norms measured by `unclip adopt`
    format_version: int = FORMAT_VERSION

    @classmethod
    def new(
        cls, identity: dict, clip: ClipInfo, text_enc_width: int = 0, latents: dict | None = None
    ) -> Manifest:
        """A fresh store's manifest: unit-norm float16 embeddings of the CLIP's size, no shards yet."""
        return cls(identity, clip, EmbeddingInfo(clip.dim), EmbeddingInfo(clip.dim), text_enc_width, latents)

    def to_json(self) -> dict:
        out = {
            "format_version": self.format_version,
            "identity": self.identity,
            "clip": {
                "arch": self.clip.arch,
                "pretrained": self.clip.pretrained,
                "random_init": self.clip.random_init,
                "dim": self.clip.dim,
                "context_length": self.clip.context_length,
                **({"sha256": self.clip.sha256} if self.clip.sha256 else {}),
                **({"probe": self.clip.probe} if self.clip.probe else {}),
            },
            "img_emb": self.img_emb.to_json(),
            "text_emb": self.text_emb.to_json(),
            "text_enc": {
                "dtype": np.dtype(EMB_DTYPE).name,
                "width": self.text_enc_width,
                "layout": TEXT_ENC_LAYOUT,
            }
            if self.text_enc_width
            else None,
            "latents": self.latents,
            "shards": self.shards,
        }
        return {**out, "adopted": self.adopted} if self.adopted is not None else out

    @classmethod
    def from_json(cls, d: Any) -> Manifest:
        if not isinstance(d, dict):
            raise ManifestError(f"{MANIFEST} is not a JSON object")
        version = d.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ManifestError(
                f"store format version {version} is not one this code reads (<= {FORMAT_VERSION}); "
                "upgrade unclip-pipeline, or re-embed"
            )
        try:
            c = d["clip"]
            return cls(
                identity=d["identity"],
                clip=ClipInfo(
                    c["arch"],
                    c["pretrained"],
                    int(c["dim"]),
                    int(c["context_length"]),
                    bool(c["random_init"]),
                    c.get("sha256"),
                    c.get("probe"),
                ),
                img_emb=EmbeddingInfo.from_json(d["img_emb"]),
                text_emb=EmbeddingInfo.from_json(d["text_emb"]),
                text_enc_width=int(d["text_enc"]["width"]) if d.get("text_enc") else 0,
                latents=d.get("latents"),
                shards=list(d.get("shards", [])),
                adopted=d.get("adopted"),
                format_version=version,
            )
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise ManifestError(f"{MANIFEST} lacks or mistypes {e}") from e


def pixels_latents(size: int) -> dict:
    """The ``pixels`` codec's description: the image itself at ``size`` px, uint8, dequantising to [-1, 1]."""
    return {
        "codec": "pixels",
        "shape": [3, size, size],
        "dtype": np.dtype(LATENT_DTYPE).name,
        "lo": [-1.0] * 3,
        "hi": [1.0] * 3,
        "image_size": size,
    }


def write_manifest(root: str | Path, manifest: Manifest) -> None:
    write_json(Path(root) / MANIFEST, manifest.to_json())


def shard_id_of(path: str) -> str:
    """``.../00012.tar`` -> ``"00012"``."""
    name = os.path.basename(str(path).rstrip("/"))
    return name[: -len(".tar")] if name.endswith(".tar") else name


def field_path(root: str | Path, field: str, shard: str) -> Path:
    folder, prefix, suffix = FIELDS[field]
    return Path(root) / folder / f"{prefix}_{shard}{suffix}"


def field_shard_ids(root: str | Path, field: str) -> list[str]:
    """The shard ids that ``field``'s folder holds a file for, as written ("0", "12" or "00012"), unsorted."""
    folder, prefix, suffix = FIELDS[field]
    pattern = re.compile(rf"{re.escape(prefix)}_(\d+){re.escape(suffix)}")
    return [
        m.group(1)
        for p in (Path(root) / folder).glob(f"{prefix}_*{suffix}")
        if (m := pattern.fullmatch(p.name))
    ]


def field_dir(root: str | Path, field: str) -> Path:
    return Path(root) / FIELDS[field][0]


def done_path(root: str | Path, shard: str) -> Path:
    return Path(root) / "done" / f"{shard}.json"


# ---------------------------------------------------------------- atomic writes


def atomic_write(path: Path, data: bytes, make_parent: bool = True, before_rename=None) -> None:
    """Write `data` to `path` through a temporary file in its folder, synced, then renamed over it, and the
    rename synced too (the folder's entry): a done marker written after its files then never survives a power
    loss that they do not. Without ``make_parent`` a folder that is gone is a FileNotFoundError.
    ``before_rename()`` runs just before the rename; if it raises, the temporary file goes and nothing is
    renamed (`check_run`: a shard task whose embed run has ended)."""
    if make_parent:
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    if before_rename is not None:
        try:
            before_rename()
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    os.replace(tmp, path)
    fsync_path(path.parent)


def fsync_path(path: Path) -> None:
    """Flush a file's bytes, or a folder's entries (the renames into it), to the disk."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # a filesystem that cannot open a folder for syncing: the rename is as durable as it gets
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def hold_folder(path: str | Path, flag: str = "--out"):
    """Make ``path`` (created if absent) this process's to write while the block runs: a second command given
    the same folder meanwhile (the same `make` line in another terminal, a job array resubmitted while its
    first run still works) is refused in one line instead of writing its checkpoints, shards or export over
    this one's. An advisory ``flock`` on the folder itself, so it leaves no lock file and a killed holder
    releases it. A filesystem without locks (some network mounts) runs unlocked, with a warning.

    A folder this call created (with the parents it created) is removed again when the block fails before
    writing anything into it."""
    import fcntl

    check_out_folder(path, flag=flag)  # not a file, not under one, writable
    p = Path(path)
    try:  # what mkdir will make, deepest first
        made = [q for q in [p, *p.absolute().parents] if not q.exists()]
    except OSError:  # a name too long, say: mkdir names it below
        made = [p]
    try:
        p.mkdir(parents=True)
        created = True
    except FileExistsError:
        created, made = False, []
    except OSError as e:  # a dangling symlink, a name too long, ...
        raise UsageError(f"{flag} {path} cannot be created ({e.strerror}); give a folder") from None
    try:
        fd = os.open(p, os.O_RDONLY)
    except OSError as e:
        raise UsageError(f"{flag} {path} cannot be opened ({e.strerror}); give a folder") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(
                f"{flag} {path} is in use: another unclip command is writing to it (it holds the folder's "
                "lock); wait for that one to finish, or give another folder"
            ) from None
        except OSError as e:  # ENOLCK, EOPNOTSUPP, ...: this filesystem has no locks to offer
            log.warning(
                "%s %s: the filesystem cannot lock it (%s); nothing stops a second command writing there too",
                flag,
                path,
                e.strerror,
            )
        try:
            yield p
        except BaseException:
            if created:  # refused before any write: nothing half-written, not even the folder or its parents
                for q in made:
                    if not (q.is_dir() and not any(q.iterdir())):
                        break
                    q.rmdir()
            raise
    finally:
        os.close(fd)  # releases the lock


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    # Fixed writer settings so that the same table gives the same bytes on every run.
    pq.write_table(table, buf, compression="zstd", write_statistics=False, store_schema=True)
    return buf.getvalue()


def write_json(path: str | Path, obj: Any, make_parent: bool = True) -> None:
    atomic_write(Path(path), (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode(), make_parent)


def sha256_of(path: str | Path, chunk: int = 1 << 22) -> str:
    """A file's sha256, read a chunk at a time (a store's shard files can be gigabytes each)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def row_norms(a: np.ndarray, chunk: int = 1 << 16):
    """The L2 norm of each row of an embedding array, a chunk of rows at a time (a memory map is never read
    whole: a LAION part is ~1.5 GB as float32); None for a chunk that holds NaN or inf."""
    for i in range(0, len(a), chunk):
        x = np.asarray(a[i : i + chunk], dtype=np.float32)
        yield np.linalg.norm(x, axis=1) if np.isfinite(x).all() else None


def read_json(path: str | Path) -> Any:
    with open(path) as f:
        return json.load(f)


# ---------------------------------------------------------------- shards


def write_shard(
    root: str | Path,
    shard: str,
    arrays: dict[str, np.ndarray],
    tables: dict[str, pa.Table],
    rows: int,
    extra: dict | None = None,
    fence=None,
) -> dict:
    """Write one shard's files atomically, then its done marker (last). Returns the marker.

    ``arrays`` maps .npy fields to arrays with ``rows`` rows (``text_enc`` is flat); ``tables`` maps
    ``metadata`` / ``errors`` to tables. With ``rows == 0`` only ``errors`` and the marker are written.
    ``fence()`` runs before each file is renamed into place (`check_run`); its `Superseded` stops the write
    and leaves the store alone (it is another run's now).
    """
    files: dict[str, str] = {}
    payloads: dict[str, bytes] = {}
    if rows > 0:
        for field, arr in arrays.items():
            if field not in ("text_enc",) and len(arr) != (rows + 1 if field == "text_enc_offsets" else rows):
                raise ValueError(f"shard {shard}: {field} has {len(arr)} rows, expected {rows}")
            payloads[field] = npy_bytes(arr)
        if tables["metadata"].num_rows != rows:
            raise ValueError(
                f"shard {shard}: metadata has {tables['metadata'].num_rows} rows, expected {rows}"
            )
        payloads["metadata"] = parquet_bytes(tables["metadata"])
    if tables.get("errors") is not None and tables["errors"].num_rows > 0:
        payloads["errors"] = parquet_bytes(tables["errors"])
    marker = {"shard": shard, "rows": rows, "files": files, **(extra or {})}
    try:
        for field, data in payloads.items():
            path = field_path(root, field, shard)
            atomic_write(path, data, before_rename=fence)
            files[str(path.relative_to(root))] = hashlib.sha256(data).hexdigest()
        marker_bytes = (json.dumps(marker, indent=2, sort_keys=True) + "\n").encode()
        atomic_write(done_path(root, shard), marker_bytes, before_rename=fence)
    except Superseded:
        raise  # the store is another run's now: its files are not ours to remove
    except Exception:
        # a full disk, say: the shard is not done, so none of its files stays to be called stray
        try:
            remove_shard(root, shard)
        except OSError as e:
            log.warning("could not remove shard %s's files after its write failed: %s", shard, e)
        raise
    return marker


# The embed run that holds the store, for its shard tasks to check before they write (`check_run`). Dask cannot
# stop a task already running on a worker of an existing scheduler: after a Ctrl-C such a task finished its shard
# and wrote it into the store seconds after the command had exited and let go of the folder, even into the store
# a following `embed --overwrite` had started again.
RUN_FILE = "logs/embed_run.json"


class Superseded(StageError):
    """A shard task's embed run no longer holds the store (or this worker cannot see the store at all)."""


def start_run(root: str | Path) -> str:
    """Record a new embed run as the store's writer (the caller holds the folder's lock); returns its token."""
    import socket
    import uuid

    token = uuid.uuid4().hex
    write_json(Path(root) / RUN_FILE, {"run": token, "host": socket.gethostname(), "pid": os.getpid()})
    return token


def end_run(root: str | Path, token: str) -> None:
    """The run has ended (finished, failed or interrupted): tasks of it still running write nothing more. An
    empty logs/ goes too, so that a run refused before it wrote anything leaves no folder behind."""
    path = Path(root) / RUN_FILE
    try:
        if json.loads(path.read_text()).get("run") == token:
            path.unlink()
    except (OSError, ValueError, AttributeError):
        pass
    with contextlib.suppress(OSError):
        path.parent.rmdir()


def check_run(root: str | Path, token: str) -> None:
    """Superseded unless ``token``'s run still holds the store; nothing to check without a token (the benches
    and other direct callers of `pipeline.embed_shard.embed_shard`)."""
    if not token:
        return
    root = Path(root)
    import socket

    # Not Superseded, which is final, but a StageError that dask retries (--retries), maybe on another worker:
    # a worker without the store's mount, or a read error of a network filesystem (ESTALE, EIO)
    try:
        now = json.loads((root / RUN_FILE).read_text()).get("run")
    except FileNotFoundError:
        if not (root / MANIFEST).exists():
            raise StageError(
                f"the store {root} is not visible from this worker ({socket.gethostname()}): no {MANIFEST} "
                "there; give --out a folder every dask worker sees at that path (a shared filesystem)"
            ) from None
        now = None
    except OSError as e:
        raise StageError(f"{root / RUN_FILE} cannot be read on {socket.gethostname()}: {e}") from None
    except (ValueError, AttributeError):
        now = None
    if now != token:
        raise Superseded(
            f"the embed run that sent this task has ended, or another holds the store {root}: its shard is "
            "not written"
        )


def is_done(root: str | Path, shard: str) -> bool:
    return done_path(root, shard).exists()


def _read_store_json(path: Path) -> Any:
    """A manifest or done marker; one that is not valid JSON is a one-line refusal pointing at `validate`."""
    try:
        return read_json(path)
    except (UnicodeDecodeError, ValueError) as e:
        root = path.parent.parent if path.parent.name == "done" else path.parent
        raise ManifestError(
            f"{path} is not valid JSON ({str(e).splitlines()[0][:120]}); `unclip validate {root}` lists the "
            "store's damage"
        ) from e


def read_done(root: str | Path, shard: str) -> dict:
    """A shard's done marker, checked to hold what every reader takes from it (its rows and files): one that
    does not (edited by hand) is a one-line refusal pointing at `validate`, not a KeyError mid-run."""
    path = done_path(root, shard)
    marker = _read_store_json(path)
    rows = marker.get("rows") if isinstance(marker, dict) else None
    if (
        not isinstance(rows, int)
        or isinstance(rows, bool)
        or rows < 0
        or not isinstance(marker.get("files"), dict)
    ):
        raise ManifestError(
            f"{path} is not a done marker (an object with its rows and files); `unclip validate {root}` lists "
            "the store's damage"
        )
    return marker


def remove_shard(root: str | Path, shard: str) -> None:
    """Delete a shard's marker first, then its files (so a crash in between leaves it 'not done')."""
    done_path(root, shard).unlink(missing_ok=True)
    for path in [field_path(root, f, shard) for f in FIELDS] + [done_path(root, shard)]:
        path.unlink(missing_ok=True)
        for tmp in path.parent.glob(f".{path.name}.tmp*"):  # left by a writer killed mid-write
            tmp.unlink(missing_ok=True)


def _nearest_existing(path: str | Path) -> Path | None:
    """``path`` itself if it exists, else its nearest existing parent (absolute), or None."""
    p = Path(path).absolute()
    return next((q for q in [p, *p.parents] if _exists(q)), None)


def _exists(p: Path) -> bool:
    try:
        return p.exists()
    except OSError:  # a name too long, say: it is not there
        return False


def unwritable(path: str | Path) -> Path | None:
    """The nearest existing folder on ``path``'s way that we may not write into, or None. Tried, not only
    asked: `os.access` says yes to root everywhere, /proc and /sys included, where a file cannot be made."""
    parent = _nearest_existing(path)
    if parent is None or not parent.is_dir():
        return None
    return parent if not os.access(parent, os.W_OK | os.X_OK) or not _can_create_in(parent) else None


def _can_create_in(folder: Path) -> bool:
    """Whether a file can be made in ``folder``. Unseen where the filesystem allows (an unnamed O_TMPFILE):
    another process checking that the folder is empty (each rank of a torchrun) must not find the probe; else a
    named one, which `entries` passes over as a temp file of ours."""
    if hasattr(os, "O_TMPFILE"):
        try:
            os.close(os.open(folder, os.O_TMPFILE | os.O_WRONLY, 0o600))
            return True
        except OSError as e:
            # a filesystem (or sandbox) without O_TMPFILE: a named file decides
            if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.EPERM, errno.ENOSYS):
                return False
    try:
        fd, name = tempfile.mkstemp(dir=folder, prefix=".unclip-probe-", suffix=f".tmp{os.getpid()}")
    except OSError:
        return False
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(name)
    return True


def is_report(path: str | Path, *keys: str) -> bool:
    """Whether ``path`` is a JSON object holding each of ``keys``: a report one of our commands wrote, which its
    rerun may replace (anything else at an output path is the user's, and refused)."""
    try:
        if Path(path).stat().st_size > 64 << 20:
            return False
        report = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(report, dict) and all(k in report for k in keys)


def check_is_store_or_empty(root: str | Path) -> bool:
    """True when ``root`` holds a store (a manifest), False when it is absent or empty; raises ValueError for
    a file or for a non-empty folder without a manifest: its files are not ours to write over or delete."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise ValueError(f"{root} is a file, not a store folder")
    if (root / MANIFEST).is_file():
        return True
    # A first run killed while it wrote its manifest leaves only that write's temp file: still an empty store
    # (the run that takes the folder removes it, under its lock, at the end of embed: never here, where a
    # refused second command would delete the running one's temp file)
    # Nor is a first run killed before its manifest, which left only its run file (`start_run`)
    if root.exists() and [p for p in entries(root) if not _only_run_file(p)]:
        raise ValueError(f"{root} is not empty and holds no {MANIFEST}, so it is not a store")
    if (blocked := unwritable(root)) is not None:
        raise ValueError(f"{root} cannot be written ({blocked} is not writable)")
    return False


def check_out_folder(out: str | Path, ours=None, what: str = "", flag: str = "--out") -> None:
    """Refuse (UsageError) an output folder that is a file, lies under a file or a folder we may not write, or
    (with ``ours``) is not empty while ``ours(folder)`` says it is not `what` this command writes: its files are
    not ours to write over. Absent or empty is fine; without ``ours`` any contents are."""
    p = Path(out)
    above = _nearest_existing(p)
    if above is not None and not above.is_dir():
        where = "is a file" if above == p.absolute() else f"lies under {above}, a file"
        raise UsageError(f"{flag} {out} {where}; give a folder")
    if (blocked := unwritable(p)) is not None:
        raise UsageError(f"{flag} {out} cannot be written ({blocked} is not writable)")
    if ours is not None and p.is_dir() and entries(p) and not ours(p):
        names = sorted(x.name for x in entries(p))
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        raise UsageError(
            f"{flag} {out} is not empty ({shown}) and is not {what}, so its files are not ours to write over; "
            "choose a new or empty folder"
        )


def check_out_file(out: str | Path, flag: str = "--out", ours=None, what: str = "") -> None:
    """Refuse (UsageError) an output file path that names a folder, lies under a file, or cannot be written:
    found before the work whose result it would hold, not after. With ``ours`` (path -> bool), also an existing
    file it does not take for an earlier output of the command (``what`` names one): a rerun replaces its own
    output, never another file given by mistake (a store's manifest.json, say)."""
    p = Path(out)
    if p.is_dir():
        raise UsageError(f"{flag} {out} is a folder; name the file to write")
    if ours is not None and p.exists() and not ours(p):
        raise UsageError(f"{flag} {out} exists and is not {what}; give another path, or move it away first")
    above = _nearest_existing(p.parent)
    if above is not None and not above.is_dir():
        raise UsageError(f"{flag} {out} lies under {above}, a file; give a path in a folder")
    if (blocked := unwritable(p.parent)) is not None:
        raise UsageError(f"{flag} {out} cannot be written ({blocked} is not writable)")


def wipe(root: str | Path, *, new_manifest: dict) -> list[str]:
    """Delete what this project wrote into a store: the files each done marker lists, the markers, every other
    file its folders hold under a shard file's own name (``img_emb/img_emb_00012.npy``: a partial shard's, or
    one a killed wipe left unlisted), logs/embed_summary.json and temp files of ours; then the folders this
    left empty. Anything else in the folder stays. Returns the paths removed, relative to ``root``.

    The manifest is replaced by ``new_manifest`` (atomically), never deleted, so the folder is a store at every
    moment: killed midway, a folder that also holds other files (a user's, or a partial shard's that no marker
    lists) would otherwise be refused as "not a store" even by a rerun with --overwrite."""
    root = Path(root)
    removed: list[str] = []

    def rm(p: Path) -> None:
        if p.is_file():
            p.unlink()
            removed.append(str(p.relative_to(root)))

    base = root.resolve()  # resolved once: ``root`` may lie under a symlink (a data disk linked in)
    try:  # shard files no marker lists are removed by name only from a store `unclip embed` wrote
        by_name = not load_manifest(root).get("identity", {}).get("adopted")
    except (OSError, ValueError, UsageError):
        by_name = False  # a manifest that does not read: it could be an adopted folder's, the user's files
    adopted: set[str] = set()
    for shard in done_shards(root):
        try:
            marker = read_done(root, shard)
            # an adopted shard's files are the user's own embeddings: never ours to delete
            listed = [] if marker.get("source") == "adopted" else list(marker.get("files", {}))
            if marker.get("source") == "adopted":
                adopted.add(shard)
        except (OSError, ValueError, ManifestError):
            listed = []  # an unreadable marker names nothing: only the marker itself goes
        rm(done_path(root, shard))  # first, as in `remove_shard`: killed midway, no marker outlives its files
        for rel in listed:
            p = root / rel
            if p.resolve().is_relative_to(base):  # a marker cannot send us outside the store
                rm(p)
    # A shard's files that no marker lists: a partial shard's (killed before its marker), or a killed wipe's
    # (the marker goes first, so a kill between it and the files left them unlisted). Ours by their names.
    for name in FIELDS if by_name and not adopted else ():
        for sid in field_shard_ids(root, name):
            rm(field_path(root, name, sid))
    folders = store_folders(root)
    for tmp in temp_files(root):
        rm(tmp)
    rm(root / "logs" / "embed_summary.json")
    write_json(root / MANIFEST, new_manifest)
    for folder in folders:
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    return removed


def store_folders(root: str | Path) -> list[Path]:
    """The folders this project writes into a store: one per field, done/ and logs/."""
    root = Path(root)
    return [root / f for f in sorted({f[0] for f in FIELDS.values()})] + [root / "done", root / "logs"]


TEMP_NAME = re.compile(r"\..+\.tmp\d+")  # `atomic_write`'s temp names: .NAME.tmpPID


def _only_run_file(p: Path) -> bool:
    """``p`` is a store's logs/ holding nothing but an embed run's run file (and temp files)."""
    return p.name == "logs" and p.is_dir() and {x.name for x in entries(p)} <= {Path(RUN_FILE).name}


def entries(folder: str | Path) -> list[Path]:
    """What ``folder`` holds, less the temp files `atomic_write` left there (a command killed writing its first
    file): a folder holding only those is as empty as it was before that command."""
    return [p for p in Path(folder).iterdir() if not (TEMP_NAME.fullmatch(p.name) and p.is_file())]


def temp_files(root: str | Path) -> list[Path]:
    """Temp files `atomic_write` left in a store (a writer killed mid-write): in its own folders only, and only
    by their name pattern, so a user's files elsewhere under it are never taken for ours."""
    return [
        p
        for folder in [Path(root), *store_folders(root)]
        if folder.is_dir()
        for p in folder.iterdir()
        if TEMP_NAME.fullmatch(p.name) and p.is_file()
    ]


def is_adopted(root: str | Path) -> bool:
    """Whether ``root`` holds the manifest of a folder `unclip adopt` took in: its done markers then list the
    user's own files. Read as plain JSON, so a manifest this code would refuse still answers (False if unreadable)."""
    try:
        return bool((read_json(Path(root) / MANIFEST).get("identity") or {}).get("adopted"))
    except (OSError, ValueError, AttributeError):
        return False


def load_manifest(root: str | Path) -> dict:
    """The manifest as JSON, checked to be one this code reads (`ManifestError` otherwise)."""
    d = _read_store_json(Path(root) / MANIFEST)
    Manifest.from_json(d)
    return d


def shard_sort_key(shard: str) -> tuple:
    """Numeric order for numbered shards, padded ("00012", ours) or not ("12", clip-retrieval's), names after."""
    return (0, int(shard), shard) if shard.isdigit() else (1, 0, shard)


def done_shards(root: str | Path) -> list[str]:
    """Shard ids with a done marker, in shard order."""
    d = Path(root) / "done"
    return sorted((p.stem for p in d.glob("*.json")), key=shard_sort_key) if d.exists() else []


def shard_rows(root: str | Path) -> list[tuple[str, int]]:
    """(shard id, rows) of every done shard, in shard order: the index readers build on."""
    return [(s, int(m["rows"])) for s, m in done_markers(root)]


def done_markers(root: str | Path) -> list[tuple[str, dict]]:
    """(shard id, done marker) of every done shard, in shard order."""
    return [(s, read_done(root, s)) for s in done_shards(root)]


def open_array(root: str | Path, field: str, shard: str) -> np.ndarray:
    """Memory-map one shard's .npy field (read-only)."""
    return load_array(field_path(root, field, shard), mmap_mode="r")


def load_array(path: Path, **kw) -> np.ndarray:
    """np.load of a store's .npy; a missing or damaged one (found mid-run) is a StageError naming the file."""
    try:
        return np.load(path, allow_pickle=False, **kw)
    except OSError as e:
        if e.errno in (errno.EMFILE, errno.ENFILE):  # the process's limit, not the file's damage
            raise StageError(
                f"{path} cannot be opened: too many open files ({e.strerror}); raise the limit (`ulimit -n`)"
            ) from e
        raise _damaged(path, e) from e
    except (ValueError, EOFError) as e:
        raise _damaged(path, e) from e


def _damaged(path: Path, e: Exception) -> StageError:
    """A store file that cannot be read, in one line naming it and the command that lists the damage. The
    damage alone is kept as ``.damage``, for validate's own report (which must not send the user to itself)."""
    why = str(e).splitlines()[0][:120] if str(e) else ""
    damage = f"{path} cannot be read ({type(e).__name__}: {why})"
    err = StageError(f"{damage}; `unclip validate {path.parent.parent}` lists the store's damage")
    err.damage = damage
    return err


def read_metadata(root: str | Path, shard: str, columns: list[str] | None = None) -> pa.Table:
    path = field_path(root, "metadata", shard)
    try:
        return pq.read_table(path, columns=columns)
    except (OSError, pa.ArrowException) as e:  # missing, cut short or not parquet
        if columns and isinstance(e, pa.ArrowInvalid) and "FieldRef" in str(e):  # a whole file, other columns
            names = pq.read_schema(path).names
            raise StageError(
                f"{path} has no column {', '.join(c for c in columns if c not in names)} (it has "
                f"{', '.join(names)})"
            ) from e
        raise _damaged(path, e) from e


def read_keys(root: str | Path, shard: str) -> pa.Array | None:
    """A shard's sample keys in row order, or None where its metadata has no ``key`` column (an adopted
    folder's may not)."""
    path = field_path(root, "metadata", shard)
    try:
        f = pq.ParquetFile(path)
        if "key" not in f.schema_arrow.names:
            return None
        return f.read(columns=["key"]).column("key").combine_chunks()
    except (OSError, pa.ArrowException) as e:  # missing, cut short or not parquet
        raise _damaged(path, e) from e


# ---------------------------------------------------------------- uint8 latents


def fit_quantization(x: np.ndarray, q: float = 0.001) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (axis 1) lo/hi from the data's q and 1-q quantiles: robust to a few outliers."""
    ch = np.moveaxis(np.asarray(x, dtype=np.float32), 1, 0).reshape(x.shape[1], -1)
    lo, hi = np.quantile(ch, q, axis=1), np.quantile(ch, 1 - q, axis=1)
    hi = np.maximum(hi, lo + 1e-6)
    return lo.astype(np.float32), hi.astype(np.float32)


def _bcast(v: np.ndarray | list, ndim: int) -> np.ndarray:
    return np.asarray(v, dtype=np.float32).reshape((1, -1) + (1,) * (ndim - 2))


def quantize(x: np.ndarray, lo, hi) -> np.ndarray:
    """``q = round((clip(x, lo, hi) - lo) / (hi - lo) * 255)`` per channel (axis 1)."""
    lo, hi = _bcast(lo, x.ndim), _bcast(hi, x.ndim)
    q = np.rint((np.clip(x, lo, hi) - lo) / (hi - lo) * 255.0)
    return q.astype(LATENT_DTYPE)


def dequantize(q: np.ndarray, lo, hi) -> np.ndarray:
    """``x = lo + q / 255 * (hi - lo)``; the torch twin is in `pipeline.stream`."""
    lo, hi = _bcast(lo, q.ndim), _bcast(hi, q.ndim)
    return lo + q.astype(np.float32) / 255.0 * (hi - lo)
