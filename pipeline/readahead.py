"""Read a dask worker's next shard while it embeds the current one (``embed --read-ahead``).

A shard task reads its tar as a stream while it embeds, so within a shard the reading already overlaps the
models. What it cannot overlap is the gap between shards: the next tar's first bytes (an object store's
time to first byte, a cold network filesystem) are fetched only once the task that reads it has started.

A worker learns its next shard from dask itself: the scheduler hands a one-thread worker its next task while
the current one runs (dask's task queuing), and a `ReadAhead` plugin on every worker sees that task arrive
(the public ``WorkerPlugin.transition`` hook: ``waiting -> ready``, or ``constrained`` for tasks that ask for a
``GPU``). The shard tasks are given keys that name their place in the run's list (`task_keys`), so the plugin
knows which tar that task will read without looking inside dask's task specs. It then fetches up to ``ahead``
queued shards, one at a time, in the order dask will run them:

- a shard on another filesystem (``s3://``, ``gs://``, ``http://``: anything fsspec opens that is not local)
  is copied into the worker's local directory, and the task reads the copy (`take`). A copy less than half
  done when its task starts is abandoned and the task streams the tar as before: waiting for the rest would
  stop the models for longer than streaming it does. The copy is deleted as soon as its task ends, or when
  dask moves the task to another worker (work stealing), so a worker holds at most ``ahead + 1`` copies;
- a local file gets ``posix_fadvise(WILLNEED)``: the kernel reads it into its page cache in the background
  (this matters on network filesystems such as NFS or Lustre, and on cold disks); nothing is copied.

The bytes a task reads are the same either way (a copy is complete, or not used), so the store is too.
"""

from __future__ import annotations

import bisect
import logging
import os
import shutil
import threading
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import fsspec

try:  # dask is the embed stage's engine; the module still imports without it (single-process tools)
    from distributed import WorkerPlugin
except ImportError:  # pragma: no cover
    WorkerPlugin = object

log = logging.getLogger(__name__)

PLUGIN = "unclip-embed-read-ahead"
KEY_PREFIX = "unclip-embed-shard"
CHUNK = 8 << 20  # bytes a copy reads at a time (and how often it checks whether it is still wanted)
QUEUED = ("ready", "constrained")  # a task this worker holds and will run once a thread (or GPU) is free


def new_run() -> str:
    """A token naming one embed run's shard tasks and its plugin (two runs may share a scheduler)."""
    return uuid.uuid4().hex[:12]


def task_keys(run: str, n: int) -> list[str]:
    """Dask keys for a run's ``n`` shard tasks, in the run's order: the run's token, then the index."""
    return [f"{KEY_PREFIX}-{run}-{i}" for i in range(n)]


def plugin_name(run: str) -> str:
    return f"{PLUGIN}-{run}"


def _index(key, run: str) -> int | None:
    """The place in the run's list of a task of ``run``; None for any other task (another run's, a warm-up)."""
    prefix = f"{KEY_PREFIX}-{run}-"
    if not isinstance(key, str) or not key.startswith(prefix) or not key[len(prefix) :].isdigit():
        return None
    return int(key[len(prefix) :])


def is_local(url: str) -> bool:
    fs, _ = fsspec.core.url_to_fs(url)
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    return bool({"file", "local"} & set(protocols))


class _Cancelled(Exception):
    pass


@dataclass
class _Fetch:
    url: str
    path: Path | None  # the local copy (None for a local shard: the page cache holds it)
    stop: threading.Event = field(default_factory=threading.Event)
    size: int | None = None  # the shard's bytes, once known
    copied: int = 0
    future: Future | None = None


def _advise(url: str) -> None:
    """Ask the kernel to read a local shard into its page cache (no-op where there is no posix_fadvise)."""
    advise = getattr(os, "posix_fadvise", None)
    if advise is None:
        return
    _, path = fsspec.core.url_to_fs(url)
    fd = os.open(path, os.O_RDONLY)
    try:
        advise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
    finally:
        os.close(fd)


def _copy(f: _Fetch) -> None:
    fs, path = fsspec.core.url_to_fs(f.url)
    part = f.path.with_name(f.path.name + ".part")
    try:
        with fs.open(path, "rb") as src, open(part, "wb") as dst:
            f.size = getattr(src, "size", None)
            while chunk := src.read(CHUNK):
                if f.stop.is_set():
                    raise _Cancelled
                dst.write(chunk)
                f.copied += len(chunk)
        os.replace(part, f.path)  # the name appears only once the copy is whole
    finally:
        part.unlink(missing_ok=True)


class ReadAhead(WorkerPlugin):
    """On each dask worker: fetch the shards of the tasks queued there, ``ahead`` at a time (module docs)."""

    def __init__(self, run: str, urls: list[str], ahead: int = 1):
        self.run, self.urls, self.ahead = run, list(urls), ahead
        self.name = plugin_name(run)

    def setup(self, worker) -> None:
        self.dir = Path(worker.local_directory) / f"read-ahead-{self.run}"  # this run's copies only
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._queued: list[int] = []  # indexes of the tasks this worker holds, not yet running, in run order
        self._fetches: dict[int, _Fetch] = {}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="read-ahead")  # one shard's bytes at a time

    def teardown(self, worker) -> None:
        with self._lock:
            for f in self._fetches.values():
                f.stop.set()
            self._fetches.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(self.dir, ignore_errors=True)

    def transition(self, key, start, finish, **kwargs) -> None:
        i = _index(key, self.run)
        if i is None or i >= len(self.urls):
            return
        with self._lock:
            pos = bisect.bisect_left(self._queued, i)
            queued = pos < len(self._queued) and self._queued[pos] == i
            if finish in QUEUED and not queued:
                self._queued.insert(pos, i)
            elif finish not in QUEUED and queued:
                del self._queued[pos]
            if (start == "executing" and finish != "executing") or finish in ("released", "forgotten"):
                self._drop(i)  # ended, or moved elsewhere: its copy is no longer wanted
            self._plan()

    def take(self, url: str) -> tuple[str | None, str]:
        """In the shard task, before it reads ``url``: (the path of its local copy, or None to read ``url``
        itself; how the read-ahead went: ``copy``, ``page cache``, ``abandoned``, ``failed`` or ``none``)."""
        with self._lock:
            f = next((f for f in self._fetches.values() if f.url == url), None)
        if f is None:
            return None, "none"  # it started as soon as it arrived (a worker's first shard)
        if f.path is not None and not f.future.done() and (f.size is None or f.copied < f.size / 2):
            f.stop.set()  # less than half here: streaming the rest beats waiting for it
            return None, "abandoned"
        try:
            f.future.result()  # a local shard's advice is a moment; a copy past half is finished
        except Exception as e:  # the task reads the url itself, and reports its own error if that fails too
            if not isinstance(e, _Cancelled):
                log.warning("read-ahead of %s failed (%s: %s): reading it directly", url, type(e).__name__, e)
            return None, "failed"
        return (None, "page cache") if f.path is None else (str(f.path), "copy")

    def _plan(self) -> None:
        """Fetch the first ``ahead`` queued shards not yet fetched (the caller holds the lock)."""
        for i in self._queued[: self.ahead]:
            if i in self._fetches:
                continue
            url = self.urls[i]
            local = is_local(url)
            f = _Fetch(url, None if local else self.dir / f"{i}-{os.path.basename(url)}")
            f.future = self._pool.submit(self._fetch, f)
            self._fetches[i] = f

    def _fetch(self, f: _Fetch) -> None:
        if f.stop.is_set():
            raise _Cancelled
        if f.path is None:
            _advise(f.url)
        else:
            _copy(f)

    def _drop(self, i: int) -> None:
        f = self._fetches.pop(i, None)
        if f is None:
            return
        f.stop.set()
        if f.path is not None:
            # after the copy (if it is still running, its own cleanup removes the part file)
            f.future.add_done_callback(lambda _: f.path.unlink(missing_ok=True))


def plugin_of_this_worker() -> ReadAhead | None:
    """The `ReadAhead` of the run whose shard task is running in this thread; None outside a dask worker or
    when the run has none (``--read-ahead 0``)."""
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        return None
    key = worker.get_current_task()
    if not isinstance(key, str) or not key.startswith(KEY_PREFIX + "-"):
        return None
    run = key[len(KEY_PREFIX) + 1 :].rpartition("-")[0]
    return worker.plugins.get(plugin_name(run))
