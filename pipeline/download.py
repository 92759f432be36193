"""Stage 1 — download: a table of image URLs and captions -> webdataset shards, through img2dataset.

Reads ``--urls`` (parquet, csv, tsv or jsonl). Writes ``OUT/00000.tar`` with img2dataset's ``00000.parquet``
and ``00000_stats.json`` beside each shard, ``OUT/summary/download_summary.json``, and img2dataset's own output
(its progress lines, its workers' tracebacks) in ``OUT/summary/img2dataset.log``. The summary sits in a
sub-folder because img2dataset's incremental mode reads every ``OUT/*.json`` as ``<shard>_stats.json``.

Resumable: img2dataset's incremental mode skips shards whose stats file exists, and a shard is only complete
once its stats file is written. Downloading itself is img2dataset's; this module validates the input first,
shows progress, and summarises the result.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import json
import logging
import math
import os
import re
import signal
import sys
import threading
import time
import traceback
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline import progress
from pipeline.errors import StageError, UsageError, by_kind
from pipeline.signals import handling
from pipeline.store import check_out_folder, hold_folder, unwritable, write_json

log = logging.getLogger(__name__)

INPUT_FORMATS = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl"}
RESIZE_MODES = ("no", "border", "keep_ratio", "keep_ratio_largest", "center_crop")
DISTRIBUTORS = ("multiprocessing", "pyspark", "ray")
SUMMARY = "summary/download_summary.json"
# What the shards were made with, written before img2dataset starts: a rerun (the resume) must make the same shards.
SETTINGS = "summary/download_settings.json"
# img2dataset's stdout and stderr, each run's appended: on the terminal its stats lines and bars of its own
# broke up our bar, and a Ctrl-C printed a traceback from each of its pool's workers above our one line.
IMG2DATASET_LOG = "summary/img2dataset.log"
LOG_TAIL_LINES = 20  # of IMG2DATASET_LOG, shown when img2dataset fails
SHARD_SETTINGS = (
    "url_col",
    "caption_col",
    "image_size",
    "resize_mode",
    "samples_per_shard",
    "encode_quality",
)
# What img2dataset and this module write into --out; anything else there is the user's.
_OURS = re.compile(r"\d+(\.tar|\.parquet|_stats\.json)|summary|_tmp")


@dataclass
class DownloadConfig:
    urls: str = field(metadata={"help": "input table: .parquet, .csv, .tsv or .jsonl"})
    out: str = field(metadata={"help": "output folder for the webdataset shards"})
    url_col: str = "url"  # the table's URL column
    caption_col: str = "caption"  # the table's caption column (other columns are kept in the shards' .json)
    image_size: int = 256  # side of the stored images, after --resize-mode
    # How img2dataset fits each image to --image-size.
    resize_mode: str = field(default="center_crop", metadata={"choices": RESIZE_MODES})
    samples_per_shard: int = 10000  # rows of the table per webdataset shard
    # Download processes. 2 processes x 32 threads kept a 2-core machine busy on local images; raise both on a
    # real network.
    processes: int = 2
    threads: int = 32  # download threads per process
    # img2dataset's distributor: multiprocessing on one machine, pyspark or ray for a cluster.
    distributor: str = field(default="multiprocessing", metadata={"choices": DISTRIBUTORS})
    timeout: int = 10  # seconds per request
    retries: int = 0  # extra tries of a failed URL
    encode_quality: int = 95  # JPEG quality of the stored images


def count_rows(path: str, fmt: str) -> tuple[list[str], int]:
    """Column names and row count of the input table, without loading it whole."""
    try:
        if fmt == "parquet":
            meta = pq.ParquetFile(path)
            return list(meta.schema_arrow.names), meta.metadata.num_rows
        if fmt in ("csv", "tsv"):
            opts = pacsv.ParseOptions(delimiter="\t" if fmt == "tsv" else ",")
            reader = pacsv.open_csv(path, parse_options=opts)
            return list(reader.schema.names), sum(b.num_rows for b in reader)
        return _scan_jsonl(path)
    except UsageError:
        raise
    except Exception as e:  # a malformed file: name it, do not dump a traceback
        raise UsageError(f"cannot read {path} as {fmt}: {type(e).__name__}: {e}".splitlines()[0]) from e


def _scan_jsonl(path: str) -> tuple[list[str], int]:
    """Every line must be a JSON object (img2dataset would stop at the first that is not): the columns (every
    key any object has, in order of first appearance, as pyarrow's JSON reader, which img2dataset uses, takes
    them), and the number of objects."""
    columns, n = {}, 0
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise UsageError(f"{path} line {lineno} is not valid JSON ({e})") from e
            if not isinstance(obj, dict):
                raise UsageError(f"{path} line {lineno} is a JSON {type(obj).__name__}, not an object")
            columns.update(dict.fromkeys(obj))
            n += 1
    return list(columns), n


URL_CHECKED = 1000  # first rows whose URLs must have a scheme


def check_urls(path: str, url_col: str, urls: list) -> None:
    """The first rows' URLs must be URLs (a scheme: http://, https://, file://): img2dataset fails each path
    ("images/00001.png") as an "unknown url type", and the run ends with every row failed."""
    from urllib.parse import urlsplit

    # an empty or missing one is a row that fails, counted, as parquet's null is
    for i, u in enumerate(urls, 1):
        if isinstance(u, str) and u.strip() and not urlsplit(u).scheme:
            raise UsageError(
                f"--url-col '{url_col}' of {path} holds {u[:80]!r} (row {i}), not a URL: img2dataset downloads "
                "http://, https:// or file:// URLs (serve a folder of images over HTTP, or give file:// + its "
                "absolute path)"
            )


def check_columns(path: str, fmt: str, url_col: str, caption_col: str) -> None:
    """URLs must be strings and captions strings or missing, in every row: img2dataset fails on the first
    row that is not, after shards were started."""
    import pyarrow as pa

    if fmt == "parquet":
        table = pq.ParquetFile(path)
        schema = table.schema_arrow
        for flag, col, nullable_ok in (("--url-col", url_col, False), ("--caption-col", caption_col, True)):
            tp = schema.field(col).type
            if not (
                pa.types.is_string(tp)
                or pa.types.is_large_string(tp)
                or (nullable_ok and pa.types.is_null(tp))
            ):
                raise UsageError(f"{flag} '{col}' of {path} holds {tp}, not text")
        first = next(table.iter_batches(batch_size=URL_CHECKED, columns=[url_col]), None)
        check_urls(path, url_col, first.column(0).to_pylist() if first is not None else [])
    elif fmt in ("csv", "tsv"):
        opts = pacsv.ParseOptions(delimiter="\t" if fmt == "tsv" else ",")
        first = next(iter(pacsv.open_csv(path, parse_options=opts)), None)
        tp = first.schema.field(url_col).type if first is not None else pa.string()
        if not (pa.types.is_string(tp) or pa.types.is_large_string(tp) or pa.types.is_null(tp)):
            raise UsageError(f"--url-col '{url_col}' of {path} holds {tp}, not text")
        check_urls(
            path, url_col, first.column(url_col).to_pylist()[:URL_CHECKED] if first is not None else []
        )
    elif fmt == "jsonl":
        urls = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                obj = json.loads(line)
                if len(urls) < URL_CHECKED:
                    urls.append(obj.get(url_col))
                if obj.get(url_col) is not None and not isinstance(obj.get(url_col), str):
                    raise UsageError(
                        f"{path} line {lineno}: '{url_col}' is not a string ({obj.get(url_col)!r})"
                    )
                cap = obj.get(caption_col)
                if cap is not None and not isinstance(cap, str):
                    raise UsageError(f"{path} line {lineno}: '{caption_col}' is not a string ({cap!r})")
        check_urls(path, url_col, urls)
        # read as img2dataset will (pyarrow's read_json, whole): a key whose values change type fails it
        if urls:
            import pyarrow.json as pajson

            try:
                pajson.read_json(path)
            except pa.ArrowException as e:
                raise UsageError(
                    f"{path} cannot be read as img2dataset reads it: {e}".splitlines()[0]
                ) from None


def check_out(out: str, urls: str | None = None) -> None:
    """--out must be a folder we can write, holding nothing img2dataset would misread (it parses every
    ``OUT/*.json`` as a shard's ``NNNNN_stats.json``) or write over (``NNNNN.parquet``, ``NNNNN.tar``): only
    shards, their stats and our summary; and the input table must lie outside it."""
    p = Path(out)
    if p.exists() and not p.is_dir():
        raise UsageError(f"--out {out} is a file; name a folder for the shards")
    if (blocked := unwritable(p)) is not None:
        raise UsageError(f"--out {out} cannot be written ({blocked} is not writable)")
    if urls is not None and p.absolute().resolve() in Path(urls).absolute().resolve().parents:
        raise UsageError(
            f"--urls {urls} lies inside --out {out}, where img2dataset writes NNNNN.parquet shard tables: "
            "keep the input table outside the output folder"
        )
    if p.is_dir():
        foreign = sorted(
            q.name
            for q in p.glob("*.json")
            if not (q.name.endswith("_stats.json") and q.name.split("_")[0].isdigit())
        )
        if foreign:
            raise UsageError(
                f"--out {out} holds .json files that are not img2dataset shard stats ({', '.join(foreign[:3])}"
                f"{', ...' if len(foreign) > 3 else ''}); img2dataset would misread them: use another --out"
            )
        check_out_folder(
            p, lambda q: all(_OURS.fullmatch(x.name) for x in q.iterdir()), "a download's folder"
        )


# A URL's scheme and host: left out of the rows' digest, so that the same rows served from elsewhere (the demo
# serves its images on a new port each run; a mirror moves) still resume.
_URL_HOST = r"^[A-Za-z][A-Za-z0-9+.\-]*://[^/?#]*"


def _table_batches(path: str, fmt: str, columns: list[str]):
    """The table's record batches, read as img2dataset reads the format (jsonl: pyarrow's JSON reader)."""
    if fmt == "parquet":
        yield from pq.ParquetFile(path).iter_batches(batch_size=65536, columns=columns)
    elif fmt in ("csv", "tsv"):
        opts = pacsv.ParseOptions(delimiter="\t" if fmt == "tsv" else ",")
        yield from pacsv.open_csv(
            path,
            parse_options=opts,
            convert_options=pacsv.ConvertOptions(
                include_columns=columns, column_types=dict.fromkeys(columns, "string")
            ),
        )
    else:
        import pyarrow.json as pajson

        yield from pajson.read_json(path).select(columns).to_batches()


def rows_digest(path: str, fmt: str, url_col: str, caption_col: str) -> str:
    """sha256 of what the shards are made from: every row's URL, less its scheme and host, and its caption, in
    order. Another table with as many rows then reads as another table; the demo's, written again with a new
    port, reads as the same. Independent of how the reader cuts the table into batches."""
    import hashlib

    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    parts = {k: hashlib.sha256() for k in ("url_lengths", "urls", "caption_lengths", "captions")}
    try:
        for batch in _table_batches(path, fmt, list(dict.fromkeys([url_col, caption_col]))):
            for col, name in ((url_col, "url"), (caption_col, "caption")):
                arr = batch.column(col)
                arr = arr.cast(pa.large_string()) if not pa.types.is_large_string(arr.type) else arr
                if name == "url":
                    arr = pc.replace_substring_regex(arr, _URL_HOST, "")
                lengths = pc.fill_null(pc.binary_length(arr), -1)  # a null is not an empty string
                parts[f"{name}_lengths"].update(
                    lengths.to_numpy(zero_copy_only=False).astype("<i8").tobytes()
                )
                _, offsets, data = arr.buffers()
                if data is not None and len(arr):
                    at = np.frombuffer(offsets, "<i8")[arr.offset : arr.offset + len(arr) + 1]
                    parts[f"{name}s"].update(memoryview(data)[at[0] : at[-1]])
    except (OSError, pa.ArrowException) as e:
        raise UsageError(f"cannot read {path} as {fmt}: {e}".splitlines()[0]) from e
    return hashlib.sha256(b"".join(h.digest() for h in parts.values())).hexdigest()


def _shard_settings(cfg: DownloadConfig, rows: int, digest: str) -> dict:
    """What decides the shards' content: `SETTINGS` holds it. Not the table's bytes: the demo serves its
    images on a new port each run and writes its table again (a resume was refused as another table)."""
    return {**{k: getattr(cfg, k) for k in SHARD_SETTINGS}, "rows": rows, "rows_digest": digest}


def check_same_settings(cfg: DownloadConfig, rows: int, digest: str) -> None:
    """A rerun into a folder with shards continues that download: other shard settings or another table would
    put shards of two kinds in one folder (another --samples-per-shard even repeats rows), so they are refused."""
    if not finished_shards(cfg.out):  # nothing made yet: a retry with corrected settings starts afresh
        return
    old: dict = {}
    try:
        if (Path(cfg.out) / SETTINGS).is_file():
            old = json.loads((Path(cfg.out) / SETTINGS).read_text())
        elif (Path(cfg.out) / SUMMARY).is_file():  # a folder from before the settings file: its last summary
            summary = json.loads((Path(cfg.out) / SUMMARY).read_text())
            old = {**summary.get("config", {}), "rows": summary.get("rows")}
    except (OSError, ValueError, AttributeError):
        old = {}  # unreadable: nothing to compare with (both are written atomically, so only by hand)
    new = _shard_settings(cfg, rows, digest)
    diff = [k for k in new if k in old and old[k] != new[k]]
    if diff == ["rows_digest"]:
        raise UsageError(
            f"--out {cfg.out} holds shards of another table: {cfg.urls} has as many rows, but other URLs or "
            "captions; rerun with the earlier table to finish that download, or choose a new --out"
        )
    diff = [k for k in diff if k != "rows_digest"]
    if diff:
        names = {"rows": "input rows"}
        said = ", ".join(
            f"{names.get(k, '--' + k.replace('_', '-'))} {str(old[k])[:12]} -> {str(new[k])[:12]}"
            for k in diff
        )
        raise UsageError(
            f"--out {cfg.out} holds shards made with other settings ({said}); rerun with the earlier ones to "
            "finish that download, or choose a new --out"
        )


def validate(cfg: DownloadConfig) -> tuple[str, list[str], int, str]:
    """Check everything before anything is written. Returns (img2dataset input format, columns, rows, the
    rows' digest)."""
    if not os.path.isfile(cfg.urls):
        raise UsageError(f"input file not found: {cfg.urls}")
    ext = Path(cfg.urls).suffix.lower()
    if ext not in INPUT_FORMATS:
        raise UsageError(
            f"unsupported input extension '{ext}' for {cfg.urls}; valid: {', '.join(INPUT_FORMATS)}"
        )
    if not 8 <= cfg.image_size <= 8192:
        raise UsageError(f"--image-size must be between 8 and 8192 pixels (got {cfg.image_size})")
    for name in ("samples_per_shard", "processes", "threads", "timeout"):
        if getattr(cfg, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(cfg, name)})")
    if cfg.retries < 0:  # img2dataset then tries no URL at all, and fails inside
        raise UsageError(f"--retries must be >= 0 (got {cfg.retries})")
    if not 0 <= cfg.encode_quality <= 100:
        raise UsageError(
            f"--encode-quality must be between 0 and 100, a JPEG quality (got {cfg.encode_quality})"
        )
    if cfg.resize_mode not in RESIZE_MODES:
        raise UsageError(f"unknown --resize-mode '{cfg.resize_mode}'; valid: {', '.join(RESIZE_MODES)}")
    if cfg.distributor not in DISTRIBUTORS:
        raise UsageError(f"unknown --distributor '{cfg.distributor}'; valid: {', '.join(DISTRIBUTORS)}")
    if cfg.distributor != "multiprocessing":
        try:
            __import__(cfg.distributor)
        except ImportError as e:
            raise UsageError(f"--distributor {cfg.distributor} needs `pip install {cfg.distributor}`") from e
    check_out(cfg.out, cfg.urls)
    fmt = INPUT_FORMATS[ext]
    columns, rows = count_rows(cfg.urls, fmt)
    if rows == 0:
        raise UsageError(f"input table {cfg.urls} has no rows")
    for flag, col in (("--url-col", cfg.url_col), ("--caption-col", cfg.caption_col)):
        if col not in columns:
            raise UsageError(f"{flag} '{col}' is not a column of {cfg.urls}; columns: {', '.join(columns)}")
    check_columns(cfg.urls, fmt, cfg.url_col, cfg.caption_col)
    if rows >= 1_000_000:  # ~0.7 s a million rows on 2 cores: say why a large table's start takes a while
        log.info("download: reading %s's %d rows to know the table again on a resume", cfg.urls, rows)
    digest = rows_digest(cfg.urls, fmt, cfg.url_col, cfg.caption_col)
    check_same_settings(cfg, rows, digest)
    return fmt, columns, rows, digest


STATS_KEYS = ("count", "successes", "failed_to_download", "failed_to_resize", "status_dict")


def shard_stats(out: str, shard: str) -> dict:
    """img2dataset's ``NNNNN_stats.json`` of a finished shard. img2dataset writes it in place after closing the
    shard's tar and record, so one that a kill left empty or cut off sits beside a whole shard: it is rebuilt
    from the record's status column (and written back atomically) rather than trusted or deleted."""
    path = os.path.join(out, f"{shard}_stats.json")
    try:
        with open(path) as f:
            st = json.load(f)
        if isinstance(st, dict) and all(k in st for k in STATS_KEYS):
            return st
        why = "not img2dataset's stats"
    except ValueError as e:  # empty or cut off
        why = f"{type(e).__name__}: {e}"
    except OSError as e:
        raise UsageError(f"{path} cannot be read ({e})") from None
    record = os.path.join(out, f"{shard}.parquet")
    try:
        table = pq.read_table(record, columns=["status", "error_message"]).to_pydict()
    except Exception as e:  # pyarrow's own kinds for missing, empty and cut-off files
        raise UsageError(
            f"{path} does not read ({why}) and neither does {record} ({type(e).__name__}), so the shard's counts "
            f"are lost; delete {path} to download shard {shard} again"
        ) from None
    status = table["status"]
    rebuilt = {
        "count": len(status),
        "successes": status.count("success"),
        "failed_to_download": status.count("failed_to_download"),
        "failed_to_resize": status.count("failed_to_resize"),
        "status_dict": dict(
            Counter("success" if s == "success" else (m or s) for s, m in zip(status, table["error_message"]))
        ),
        "rebuilt_from_record": True,
    }
    log.warning("download: %s does not read (%s): rebuilt from %s", path, why, record)
    write_json(path, rebuilt)
    return rebuilt


def finished_shards(out: str) -> set[str]:
    return {os.path.basename(p)[: -len("_stats.json")] for p in glob.glob(os.path.join(out, "*_stats.json"))}


def table_shards(finished: set[str], expected: int) -> list[str]:
    """Those of ``finished`` that are the table's shards (numbers below ``expected``), in order: a stats file of
    another number (a copied or left-over shard) is none of them."""
    return sorted(s for s in finished if s.isdigit() and int(s) < expected)


def _watch(out: str, total: int, already: int, stop: threading.Event) -> None:
    """A progress bar over finished shards, fed by img2dataset's stats files."""
    with progress.bar(total=total, initial=already, desc="download", unit="shard") as bar:
        while not stop.wait(1.0):
            if (n := len(finished_shards(out))) > bar.n:
                bar.update(n - bar.n)
        bar.update(len(finished_shards(out)) - bar.n)


def summarize(out: str, shards: set[str], seconds: float, total_rows: int, expected: int) -> dict:
    """Aggregate img2dataset's per-shard stats into one report."""
    totals: Counter = Counter()
    reasons: Counter = Counter()
    new_successes = 0
    ours = table_shards(finished_shards(out), expected)
    for shard in ours:
        st = shard_stats(out, shard)
        totals.update({k: st[k] for k in ("count", "successes", "failed_to_download", "failed_to_resize")})
        reasons.update({k: v for k, v in st["status_dict"].items() if k != "success"})
        new_successes += st["successes"] if shard in shards else 0
    done = len(ours)
    return {
        "rows": total_rows,
        "shards": {"expected": expected, "finished": done, "downloaded_this_run": len(shards)},
        "complete": done == expected,
        "successes": totals["successes"],
        "failures": totals["count"] - totals["successes"],
        "failed_to_download": totals["failed_to_download"],
        "failed_to_resize": totals["failed_to_resize"],
        "failures_by_reason": by_kind(reasons),  # grouped: a reason naming its URL would be one per URL
        "seconds": round(seconds, 2),
        "images_per_second": round(new_successes / seconds, 1) if seconds > 0 else None,
    }


def run(cfg: DownloadConfig) -> dict:
    """Validate, download the missing shards with img2dataset, write and return the summary."""
    input_format, columns, rows, digest = validate(cfg)
    expected = math.ceil(rows / cfg.samples_per_shard)
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # else albumentations checks for updates online
    with hold_folder(cfg.out):  # one download writes a folder at a time
        return _download(cfg, input_format, columns, rows, digest, expected)


# How long an interrupted img2dataset gets to end itself before its processes are killed. Its own Ctrl-C
# handler sometimes never returns: its pool's terminate waited forever on a queue's lock (py-spy: in
# Pool._terminate_pool, SimpleQueue.put), the pool's workers already ended by the same Ctrl-C (1 of 8 runs of
# the Ctrl-C test on a loaded 2-core VM).
INTERRUPT_GRACE_S = 10.0


_CHILD: dict = {}  # in the download's child: its shared exit code, and whether it leads its process group


def _img2dataset(download: str, kwargs: dict, started, exit_code=None, log_file: str | None = None) -> None:
    """The download itself, in a child process (`_run_img2dataset`): ``download`` ("module:function",
    img2dataset's) called with ``kwargs``. ``started`` (a shared double) gets the wall-clock time the download
    starts at, after the import, so that the summary's rate leaves the import out; ``exit_code`` (a shared int)
    the code it ends with by `_exit_now`, whose kill of its process group ends it by SIGKILL. With
    ``log_file``, the child's stdout and stderr, which every process it starts inherits, are appended there.

    The child leads a process group of its own, which every process img2dataset starts joins: `_exit_now`
    ends them all with one kill of the group, which no process being forked meanwhile escapes (the pool
    starts a new worker for each one that ends: killed one by one, its new workers outlived the child)."""
    import importlib

    _CHILD["exit_code"] = exit_code
    # Its group is not the terminal's foreground one: with `stty tostop` its first write to the terminal (a
    # progress bar) would stop it and its workers for good. Ignored, the write goes through (and workers,
    # which inherit the setting, do the same).
    signal.signal(signal.SIGTTOU, signal.SIG_IGN)
    try:
        os.setpgid(0, 0)
        _CHILD["group"] = True
    except OSError:  # pragma: no cover (a session leader cannot; a spawned child is none)
        pass
    _end_with_parent()
    try:
        if log_file:
            _output_to(log_file)
        module, name = download.split(":")
        fn = getattr(importlib.import_module(module), name)  # img2dataset: a heavy import (~10 s)
        started.value = time.time()
        fn(**kwargs)
    except (KeyboardInterrupt, SystemExit) as e:  # img2dataset's Ctrl-C handler ends with sys.exit(0)
        code = getattr(e, "code", None)  # a KeyboardInterrupt has none
        if code is None or (type(code) is int and code == 0):
            code = 130  # an interrupt
        elif type(code) is not int:
            if isinstance(code, str):  # sys.exit("message"): Python would print it
                print(code, file=sys.stderr)
            code = 1
        _exit_now(code)
    except Exception:
        traceback.print_exc()
        _exit_now(1)


def _output_to(log_file: str) -> None:
    """This process's stdout and stderr (file descriptors 1 and 2, which its children inherit) appended to
    ``log_file``, after a line that starts this run's part of it (`run_mark`: this process's own)."""
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.write(fd, f"{run_mark(os.getpid())} {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def run_mark(pid: int) -> str:
    """The line that starts the log's part written by the download child ``pid``."""
    return f"--- img2dataset run in process {pid}, started"


TAIL_BYTES = 64 * 1024  # a traceback's end is in a log's last 64 KiB


def log_tail(log_file: str | Path, pid: int, lines: int = LOG_TAIL_LINES) -> list[str]:
    """The last ``lines`` lines that the download child ``pid`` wrote to ``log_file``: none where it wrote
    nothing (it died before its output went there) or the file cannot be read."""
    try:
        with open(log_file, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - TAIL_BYTES))
            text = f.read(TAIL_BYTES).decode(errors="replace")
    except OSError:
        return []
    mark = run_mark(pid)
    if mark not in text:
        return []
    return [line for line in text.rsplit(mark, 1)[1].splitlines()[1:] if line.strip()][-lines:]


def _exit_now(code: int) -> None:
    """End the child without Python's exit hooks: multiprocessing's would wait for img2dataset's logger process,
    which is no daemon and runs until told to stop, so an error in img2dataset left the child (and the command
    waiting on it) hanging. What runs under the child is killed first: once the child is gone, a process the
    parent has not noted yet would be out of its reach."""
    sys.stdout.flush()
    sys.stderr.flush()
    if _CHILD.get("exit_code") is not None:
        _CHILD["exit_code"].value = code  # what the parent reports: the group's kill ends this one by SIGKILL
    _kill_all(psutil.Process().children(recursive=True), wait=False)  # any that left the group
    if _CHILD.get("group"):
        os.killpg(0, signal.SIGKILL)
    os._exit(code)


def _kill_all(processes: list, wait: bool = True) -> None:
    """SIGKILL to each of ``processes`` still there (psutil checks each is the process it was, not another given
    its pid since), and wait for them: those that are our children (orphans we adopted) are reaped."""
    for p in processes:
        try:
            p.kill()
        except psutil.Error:
            pass
    if wait:
        psutil.wait_procs(processes, timeout=5)


def _signal_group(proc, sig: int) -> None:
    """``sig`` to the download child's process group (it and every process img2dataset started), or to the
    child alone if it has not made its group yet."""
    if proc.pid is None:  # not started
        return
    try:
        if os.getpgid(proc.pid) == proc.pid:
            os.killpg(proc.pid, sig)
            return
    except OSError:
        pass
    try:
        os.kill(proc.pid, sig)
    except OSError:
        pass


PR_SET_CHILD_SUBREAPER, PR_GET_CHILD_SUBREAPER = 36, 37  # <linux/prctl.h>


def _subreaper(on: int) -> int | None:
    """Linux: make this process its descendants' "child subreaper" (``on`` = 1) or not (0): a process whose
    parent dies is then adopted by us, not by init, and stays in reach. Returns the setting it had before, or
    None where it cannot be set (not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        was = ctypes.c_int(0)
        if libc.prctl(PR_GET_CHILD_SUBREAPER, ctypes.byref(was), 0, 0, 0) != 0:
            return None
        if libc.prctl(PR_SET_CHILD_SUBREAPER, on, 0, 0, 0) != 0:
            return None
        return was.value
    except (OSError, AttributeError):
        return None


def _adopted(ours: set) -> list:
    """The processes that came to us as orphans (`_subreaper`), and theirs: our children now that were not
    ``ours`` (those we had before the download's child started)."""
    found = []
    for p in psutil.Process().children():
        if p not in ours:
            try:
                found += [p, *p.children(recursive=True)]
            except psutil.Error:
                pass
    return found


def _end_with_parent() -> None:
    """When the parent dies (killed, or ended by SIGTERM), this child and the processes under it end too: else
    img2dataset would go on downloading unwatched, outside the parent's hold on ``--out``."""
    import multiprocessing

    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch():
        from multiprocessing.connection import wait

        wait([parent.sentinel])
        _exit_now(1)

    threading.Thread(target=watch, name="end-with-parent", daemon=True).start()


def _run_img2dataset(
    kwargs: dict,
    grace_s: float = INTERRUPT_GRACE_S,
    download: str = "img2dataset:download",
    log_file: str | None = None,
) -> tuple[bool, float]:
    """Run img2dataset's `download` in a child process: (whether it was interrupted (Ctrl-C, SIGINT), the
    wall-clock time the download started at, after the child's imports; 0.0 when it never did). With
    ``log_file``, what it prints goes there, and a failure shows that run's last lines.

    A child, so that an interrupt always ends the run: the child and its own processes (img2dataset's pool and
    logger) get the terminal's SIGINT with us (or ours, forwarded), have ``grace_s`` to end (a second Ctrl-C
    cuts that short), and are then killed. What a kill cuts short is what a resume redoes: a shard counts as
    finished only once its stats file is written (`shard_stats` rebuilds one cut off mid-write).

    While the child lives, SIGINT here (on the main thread) only counts presses (no KeyboardInterrupt can leave
    the child running for multiprocessing's exit hook to wait on). The processes under a child that dies are
    ended too, not left as orphans out of reach: on Linux they come to us (`_subreaper`), and elsewhere those
    noted (every second) are killed."""
    import multiprocessing
    from multiprocessing import resource_tracker

    ctx = multiprocessing.get_context("spawn")
    started = ctx.Value("d", 0.0, lock=False)
    exit_code = ctx.Value("i", 0, lock=False)
    proc = ctx.Process(
        target=_img2dataset, args=(download, kwargs, started, exit_code, log_file), name="img2dataset"
    )
    presses: list[float] = []
    tree: list = []
    with _quiet_tracker():  # started by the child's start otherwise, and then taken for an orphan
        resource_tracker.ensure_running()
    ours = set(psutil.Process().children())
    # an orphan of the child's tree comes to us, noted or not (a child killed by a signal)
    was = _subreaper(1)

    def suspend(*_):  # Ctrl-Z: the child's group is not the terminal's, so it is stopped with us, and goes on
        _signal_group(proc, signal.SIGSTOP)  # with us (`fg`, `bg`)
        signal.signal(signal.SIGTSTP, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTSTP)  # stops us here, unless the kernel drops it (an orphaned group)
        signal.signal(signal.SIGTSTP, suspend)
        _signal_group(proc, signal.SIGCONT)

    with (
        handling(signal.SIGINT, lambda *_: presses.append(time.monotonic())),
        handling(signal.SIGTSTP, suspend),
        handling(signal.SIGCONT, lambda *_: _signal_group(proc, signal.SIGCONT)),
    ):
        try:
            proc.start()
            noted = 0.0
            while proc.is_alive() and not presses:
                if time.monotonic() - noted > 1.0:
                    tree, noted = _tree(proc) or tree, time.monotonic()
                proc.join(0.05)
            if presses:
                _stop(proc, grace_s, presses, tree)
                return True, started.value
        finally:
            _kill(proc, tree)  # what is left: a child that died by a signal, or an exception here
            if was is not None:
                _kill_all(_adopted(ours))
                _subreaper(was)
    code = proc.exitcode
    if code == -signal.SIGKILL and exit_code.value:  # it ended itself (`_exit_now`), by killing its group
        code = exit_code.value
    if code == 130:  # img2dataset's own handler ran: a SIGINT sent to the child alone
        return True, started.value
    if code != 0:
        how = f"was killed by signal {-code}" if code < 0 else f"ended with exit code {code}"
        where = " (its error is above)" if code > 0 else ""
        tail = log_tail(log_file, proc.pid) if log_file else []
        if tail:
            log.error("img2dataset's last lines (%s):\n  %s", log_file, "\n  ".join(tail))
            where = f" (its output: {log_file})"
        raise StageError(
            f"img2dataset {how}{where}; finished shards are kept: rerun the same command to finish"
        )
    return False, started.value


@contextlib.contextmanager
def _quiet_tracker():
    """Around the start of multiprocessing's resource tracker: it is told not to warn of "leaked semaphore
    objects" when it exits. An interrupted child ends by `os._exit` (its exit hooks could hang), so the
    semaphores of img2dataset's pool are never unlinked by it; the tracker unlinks them, as it is there to,
    and its warning, printed after the command's last line at every Ctrl-C, only alarmed."""
    key, was = "PYTHONWARNINGS", os.environ.get("PYTHONWARNINGS")
    quiet = "ignore::UserWarning:multiprocessing.resource_tracker"
    os.environ[key] = f"{was},{quiet}" if was else quiet
    try:
        yield
    finally:
        if was is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = was


def _tree(proc) -> list:
    """The processes under ``proc`` now (none once it has gone)."""
    try:
        return psutil.Process(proc.pid).children(recursive=True) if proc.pid else []
    except psutil.Error:
        return []


def _kill(proc, tree: list) -> None:
    """SIGKILL to ``proc`` if it still runs, and to each process of ``tree`` (noted while it ran) still there."""
    if proc.pid is not None and proc.is_alive():
        tree = _tree(proc) or tree
        _signal_group(proc, signal.SIGKILL)
        proc.kill()
        proc.join()
    if (
        proc.pid is not None
    ):  # what is left of its group (the child just reaped: the group id is still its own)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
    _kill_all(tree)


def _stop(proc, grace_s: float, presses: list, tree: list) -> None:
    """End an interrupted child: SIGINT (it may have had the terminal's already), ``grace_s`` to exit, then
    SIGKILL to it and every process under it (`_run_img2dataset`'s ``finally``). A second Ctrl-C cuts the wait
    short."""
    if proc.is_alive():  # not reaped: its pid is still its own
        tree[:] = _tree(proc) or tree
        _signal_group(proc, signal.SIGINT)  # its group is no longer the terminal's: it gets our Ctrl-C
    deadline = time.monotonic() + grace_s
    while proc.is_alive() and time.monotonic() < deadline and len(presses) < 2:
        proc.join(0.05)
    if proc.is_alive():
        why = "a second Ctrl-C" if len(presses) > 1 else f"it did not end {grace_s:.0f} s after the interrupt"
        log.warning("download: killing img2dataset (%s)", why)


def _remove_unfinished(out: str, finished: set[str]) -> None:
    """Delete the tar and record of each shard without its stats file: a killed run's partial output, which
    img2dataset redoes anyway, and which a rerun with another --samples-per-shard (a fresh start after a kill
    before any shard finished) would never redo: it stayed, and embed refused it as unfinished."""
    gone = (
        [
            p
            for p in Path(out).iterdir()
            if (m := re.fullmatch(r"(\d+)\.(tar|parquet)", p.name)) and m.group(1) not in finished
        ]
        if Path(out).is_dir()
        else []
    )
    for p in gone:
        p.unlink(missing_ok=True)
    if gone:
        log.info("download: removed %d file(s) of unfinished shards (%s ...)", len(gone), gone[0].name)


def _download(
    cfg: DownloadConfig, input_format: str, columns: list, rows: int, digest: str, expected: int
) -> dict:
    before = finished_shards(cfg.out)
    for shard in sorted(before):  # a stats file a kill cut off: rebuilt now, or refused before any download
        shard_stats(cfg.out, shard)
    _remove_unfinished(cfg.out, before)
    # checked against the earlier ones: the same, or a folder from before the digest, which it now records
    write_json(Path(cfg.out) / SETTINGS, _shard_settings(cfg, rows, digest))
    if len(table_shards(before, expected)) == expected:  # same settings and rows (checked): all finished
        log.info("download: all %d shards in %s are already finished; nothing to download", expected, cfg.out)
        summary = summarize(cfg.out, set(), 0.0, rows, expected)
        summary.update(config=asdict(cfg), interrupted=False)
        return _finish(cfg, summary, interrupted=False)
    extra = [c for c in columns if c not in (cfg.url_col, cfg.caption_col)] or None  # extra columns are kept
    log_file = Path(cfg.out) / IMG2DATASET_LOG
    open(log_file, "ab").close()  # one that cannot be written (a folder there, a full disk): said here, once
    stop = threading.Event()
    watcher = threading.Thread(target=_watch, args=(cfg.out, expected, len(before), stop), daemon=True)
    start = time.perf_counter()
    watcher.start()
    try:
        interrupted, started = _run_img2dataset(
            dict(
                url_list=cfg.urls,
                output_folder=cfg.out,
                input_format=input_format,
                output_format="webdataset",
                url_col=cfg.url_col,
                caption_col=cfg.caption_col,
                save_additional_columns=extra,
                image_size=cfg.image_size,
                resize_mode=cfg.resize_mode,
                number_sample_per_shard=cfg.samples_per_shard,
                processes_count=cfg.processes,
                thread_count=cfg.threads,
                distributor=cfg.distributor,
                timeout=cfg.timeout,
                retries=cfg.retries,
                encode_quality=cfg.encode_quality,
                incremental_mode="incremental",
                enable_wandb=False,
            ),
            log_file=str(log_file),
        )
    finally:
        stop.set()
        watcher.join()
    seconds = time.time() - started if started else time.perf_counter() - start  # from the download's start
    summary = summarize(cfg.out, finished_shards(cfg.out) - before, seconds, rows, expected)
    summary["config"] = asdict(cfg)
    summary["interrupted"] = interrupted
    return _finish(cfg, summary, interrupted)


def _finish(cfg: DownloadConfig, summary: dict, interrupted: bool) -> dict:
    """The run's exit code, by what it left, into ``summary``; the summary written and returned."""
    expected = summary["shards"]["expected"]
    if not summary["complete"]:  # e.g. a worker killed, or Ctrl-C
        remain = expected - summary["shards"]["finished"]
        log.error(
            "download %s: %d of %d shards finished, %d shards remain; rerun the same command to finish",
            "interrupted" if interrupted else "incomplete",
            summary["shards"]["finished"],
            expected,
            remain,
        )
        summary["exit_code"] = 130 if interrupted else 1
    elif interrupted:
        summary["exit_code"] = 130
    elif summary["rows"] and not summary["successes"]:  # finished, and nothing to embed: a failed download
        reason = next(iter(summary["failures_by_reason"]), "unknown")
        log.error(
            "download: none of the %d images could be downloaded (first reason: %s)", summary["rows"], reason
        )
        summary["exit_code"] = 1
    write_json(Path(cfg.out) / SUMMARY, summary)
    return summary
