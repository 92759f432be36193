"""Read a dask worker's next shard while it embeds the current one (``embed --read-ahead``).

A shard task reads its tar as a stream while it embeds, so within a shard the reading already overlaps the
models. What it cannot overlap is the gap between shards: the next tar's first bytes (an object store's
time to first byte, a cold network filesystem) are fetched only once the task that reads it has started.

A worker learns its next shard from dask itself: the scheduler hands a one-thread worker its next task while
the current one runs (dask's task queuing), and a `ReadAhead` plugin on every worker sees that task arrive
(the public ``WorkerPlugin.transition`` hook: ``waiting -> ready``, or ``constrained`` for tasks that ask for a
``GPU``). The shard tasks are given keys that name their place in the run's list (`task_keys`), so the plugin
knows which tar that task will read without looking inside dask's task specs. It then fetches the first
``ahead`` queued shards, one at a time, in the order dask will run them:

- a shard on another filesystem (``s3://``, ``gs://``, ``http://``: anything fsspec opens that is not local)
  is copied into the worker's local directory, and the task reads the copy (`take`), then deletes it
  (`release`). A copy less than half done when its task starts is abandoned and the task streams the tar as
  before: waiting for the rest would stop the models for longer than streaming it does. A copy no task took
  is deleted when its task ends, leaves the worker (work stealing) or falls out of the first ``ahead``, so a
  worker holds about ``ahead + 1`` copies;
- a local file gets ``posix_fadvise(WILLNEED)``: the kernel reads it into its page cache in the background
  (this matters on network filesystems such as NFS or Lustre, and on cold disks); nothing is copied.

A one-thread worker on a cluster without resources holds one queued task at a time (dask's default
``worker-saturation`` of 1.1), so there ``ahead`` > 1 changes nothing; tasks that ask for a ``GPU`` are all
handed out at the start, and there it does. The plugin carries the run's list of shard URLs (~5 MB pickled per
100,000), sent to every worker. The bytes a task reads are the same either way (a copy is whole, its length
checked, or not used), so the store is too.
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import logging
import os
import shutil
import threading
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import fsspec

from pipeline.prefetch import will_need

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
    """A token naming one embed run's shard tasks (two runs may share a scheduler)."""
    return uuid.uuid4().hex[:12]


def task_keys(run: str, n: int) -> list[str]:
    """Dask keys for a run's ``n`` shard tasks, in the run's order: the run's token, then the index."""
    return [f"{KEY_PREFIX}-{run}-{i}" for i in range(n)]


def plugin_name(out: str) -> str:
    """One plugin name per store: a run registered under it replaces a killed earlier run's plugin (left on a
    ``--scheduler`` when its client died) instead of adding another."""
    return f"{PLUGIN}-{hashlib.sha1(os.path.abspath(out).encode()).hexdigest()[:12]}"


def _index(key, run: str) -> int | None:
    """The place in the run's list of a task of ``run``; None for any other task (another run's, a warm-up)."""
    prefix = f"{KEY_PREFIX}-{run}-"
    if not isinstance(key, str) or not key.startswith(prefix) or not key[len(prefix) :].isdigit():
        return None
    return int(key[len(prefix) :])


def is_local(url: str) -> bool:
    """Whether fsspec reads ``url`` from a local path (decided from the URL alone: no filesystem is made)."""
    return fsspec.core.split_protocol(url)[0] in (None, "file", "local")


class _Cancelled(Exception):
    pass


@dataclass
class _Fetch:
    index: int
    url: str
    path: Path | None  # the local copy (None for a local shard: the page cache holds it)
    stop: threading.Event = field(default_factory=threading.Event)
    size: int | None = None  # the shard's bytes, once known
    copied: int = 0
    future: Future | None = None


def _advise(url: str) -> None:
    """Ask the kernel to read a local shard into its page cache (`prefetch.will_need`)."""
    will_need(fsspec.core.url_to_fs(url)[1])


def _copy(f: _Fetch) -> None:
    fs, path = fsspec.core.url_to_fs(f.url)
    f.path.parent.mkdir(parents=True, exist_ok=True)
    part = f.path.with_name(f.path.name + ".part")
    try:
        with fs.open(path, "rb") as src, open(part, "wb") as dst:
            f.size = getattr(src, "size", None)
            while chunk := src.read(CHUNK):
                if f.stop.is_set():
                    raise _Cancelled
                dst.write(chunk)
                f.copied += len(chunk)
        if f.size is not None and f.copied != f.size:
            raise OSError(f"read {f.copied} of its {f.size} bytes")
        if f.stop.is_set():
            raise _Cancelled
        os.replace(part, f.path)  # the name appears only once the copy is whole
    finally:
        part.unlink(missing_ok=True)


class ReadAhead(WorkerPlugin):
    """On each dask worker: fetch the shards of the tasks queued there, ``ahead`` at a time (module docs).

    Its hooks run in the worker's event loop, so they only update its lists under a lock and hand work to its
    one fetch thread: the copies, and the removal of copies no task took (queued behind any copy still being
    made of them). A task that takes its copy (`take`) owns it and removes it (`release`)."""

    def __init__(self, run: str, out: str, urls: list[str], ahead: int = 1):
        self.run, self.urls, self.ahead = run, list(urls), ahead
        self.name = plugin_name(out)

    def setup(self, worker) -> None:  # nothing here can fail: a plugin whose setup fails stays half built
        self.dir = Path(worker.local_directory) / f"read-ahead-{self.run}"  # this run's copies only
        self._lock = threading.Lock()
        self._queued: list[int] = []  # indexes of the tasks this worker holds, not yet running, in run order
        self._fetches: dict[int, _Fetch] = {}  # started and not yet taken by their task
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="read-ahead")  # one shard's bytes at a time
        self._closed = False

    async def teardown(self, worker) -> None:
        """Stop fetching and remove this run's copies, off the event loop (a copy may be mid-read)."""
        with self._lock:
            self._closed = True
            for f in self._fetches.values():
                f.stop.set()
            self._fetches.clear()
        await asyncio.to_thread(self._close)

    def _close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(self.dir, ignore_errors=True)

    def transition(self, key, start, finish, **kwargs) -> None:
        i = _index(key, self.run)
        if i is None or i >= len(self.urls):
            return
        try:
            with self._lock:
                if self._closed:
                    return
                pos, queued = self._find(i)
                if finish in QUEUED and not queued:
                    self._queued.insert(pos, i)
                elif finish not in QUEUED and queued:
                    del self._queued[pos]
                f = self._fetches.get(i)
                if finish == "executing" and f is not None and f.future.cancel():
                    del self._fetches[i]  # never started: its task streams the tar (a worker's first shard)
                if (start == "executing" and finish != "executing") or finish in ("released", "forgotten"):
                    self._drop(i)  # ended, or moved elsewhere, before its task took the copy
                self._plan()
        except Exception as e:  # dask logs a plugin's errors at INFO, where nobody sees them
            log.warning("read-ahead: %s -> %s of %s failed: %s: %s", start, finish, key, type(e).__name__, e)

    def _find(self, i: int) -> tuple[int, bool]:
        """Where ``i`` is (or would go) in the sorted queue, and whether it is there (the caller holds the lock)."""
        pos = bisect.bisect_left(self._queued, i)
        return pos, pos < len(self._queued) and self._queued[pos] == i

    def take(self, i: int) -> tuple[str | None, str]:
        """In shard task ``i``, before it reads its tar: (the path of its local copy, or None to read the URL
        itself; how the read-ahead went: ``copy``, ``page cache``, ``abandoned``, ``failed`` or ``none``).
        The caller owns the copy from here and removes it with `release` when it is done."""
        with self._lock:
            f = self._fetches.pop(i, None)
        if f is None:
            return None, "none"  # it started as soon as it arrived (a worker's first shard)
        if f.path is None:  # a local shard: the advice, if it was given before the task started
            done = f.future.done() and not f.future.cancelled() and f.future.exception() is None
            return None, "page cache" if done else "none"
        if not f.future.done() and (f.size is None or f.copied < f.size / 2):
            f.stop.set()  # less than half here: streaming the rest beats waiting for it
            self._remove(f)
            return None, "abandoned"
        try:
            f.future.result()  # past half: the rest comes faster than a fresh stream would start
        except _Cancelled:  # its task started before the copy did
            return None, "abandoned"
        except Exception as e:  # the task reads the url itself, and reports its own error if that fails too
            log.warning("read-ahead of %s failed (%s: %s): reading it directly", f.url, type(e).__name__, e)
            self._remove(f)
            return None, "failed"
        return str(f.path), "copy"

    def _plan(self) -> None:
        """Fetch the first ``ahead`` queued shards, and drop the fetches of queued shards that a task ahead of
        them in the run's order has pushed out of that window (the caller holds the lock)."""
        window = self._queued[: self.ahead]
        for i in [i for i in self._fetches if i not in window and self._find(i)[1]]:
            self._drop(i)
        for i in window:
            if i not in self._fetches:
                url = self.urls[i]
                path = None if is_local(url) else self.dir / f"{i}-{uuid.uuid4().hex[:8]}.tar"
                f = _Fetch(i, url, path)
                f.future = self._pool.submit(self._fetch, f)
                self._fetches[i] = f

    def _fetch(self, f: _Fetch) -> None:
        with self._lock:
            wanted = self._find(f.index)[1]  # not if its task has started meanwhile: it streams the tar
        if f.stop.is_set() or not wanted:
            raise _Cancelled
        if f.path is None:
            _advise(f.url)
        else:
            _copy(f)

    def _drop(self, i: int) -> None:
        f = self._fetches.pop(i, None)
        if f is not None:
            f.stop.set()
            f.future.cancel()
            self._remove(f)

    def _remove(self, f: _Fetch) -> None:
        """Delete ``f``'s copy on the fetch thread, after the copy itself (which then stops at its next chunk)."""
        if f.path is None:
            return
        try:
            self._pool.submit(f.path.unlink, missing_ok=True)
        except RuntimeError:  # the pool is shut: teardown removes the whole folder
            pass


def take(out: str, url: str) -> tuple[str | None, str]:
    """In a shard task of the store ``out``: `ReadAhead.take` of its worker's plugin for this task, or
    (None, ``off``) outside a dask worker or without read-ahead (``--read-ahead 0``)."""
    try:
        from distributed import get_worker

        worker = get_worker()
        key = worker.get_current_task()
    except (ImportError, ValueError, KeyError):
        return None, "off"
    plugin = worker.plugins.get(plugin_name(out))
    i = _index(key, plugin.run) if isinstance(plugin, ReadAhead) else None
    if i is None or plugin.urls[i] != url:
        return None, "off"
    return plugin.take(i)


def release(path: str | None) -> None:
    """A shard task is done with the copy `take` gave it."""
    if path is not None:
        Path(path).unlink(missing_ok=True)
