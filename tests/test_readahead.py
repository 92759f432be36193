"""``embed --read-ahead``: a dask worker fetches its next shard while it embeds the current one
(`pipeline.readahead`). The plugin is driven here by the transitions dask would send it, with shards on
fsspec's in-memory filesystem standing in for an object store; then a real (in-process) dask run reads every
remote shard but its first from a local copy and stores the same bytes as a run on local files."""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from pathlib import Path
from types import SimpleNamespace

import fsspec
import pytest

from pipeline import readahead
from pipeline.readahead import ReadAhead, new_run, task_keys
from tests.test_embed import TINY, embed, good_samples, write_tar


@pytest.fixture
def remote(tmp_path) -> tuple[list[str], list[bytes]]:
    """Three tars on the in-memory filesystem (a stand-in for s3:// or gs://), and their bytes."""
    root = f"memory://readahead-{uuid.uuid4().hex[:8]}"
    fs = fsspec.filesystem("memory")
    urls, data = [], []
    for i in range(3):
        local = write_tar(tmp_path / "src" / f"{i:05d}.tar", good_samples(i, list(range(6))))
        urls.append(f"{root}/{i:05d}.tar")
        fs.pipe(urls[-1], local.read_bytes())
        data.append(local.read_bytes())
    yield urls, data
    fs.rm(root, recursive=True)


def plugin(tmp_path: Path, urls: list[str], ahead: int = 1) -> tuple[ReadAhead, list[str]]:
    run = new_run()
    p = ReadAhead(run, str(tmp_path / "store"), urls, ahead)
    p.setup(SimpleNamespace(local_directory=str(tmp_path / "worker")))
    return p, task_keys(run, len(urls))


def arrive(p: ReadAhead, key: str) -> None:
    p.transition(key, "released", "waiting")
    p.transition(key, "waiting", "ready")


def settle(p: ReadAhead) -> None:
    """Wait for what the fetch thread was given so far (copies, then removals: it runs them in order)."""
    p._pool.submit(lambda: None).result(timeout=30)


def copies(p: ReadAhead) -> list[int]:
    """The shard indexes of the copies on disk (named ``<index>-<token>.tar``)."""
    return sorted(int(x.name.partition("-")[0]) for x in p.dir.iterdir()) if p.dir.exists() else []


def teardown(p: ReadAhead) -> None:
    asyncio.run(p.teardown(None))  # a coroutine: dask awaits it, off the worker's event loop
    assert not p.dir.exists()


def test_a_worker_copies_the_next_queued_shard_and_its_task_owns_the_copy(tmp_path, remote):
    urls, data = remote
    p, keys = plugin(tmp_path, urls, ahead=1)
    arrive(p, keys[0])
    arrive(p, keys[1])
    settle(p)
    assert copies(p) == [0]  # ahead=1: only the first queued shard
    p.transition(keys[0], "ready", "executing")
    settle(p)
    assert copies(p) == [0, 1]  # the next one, while the first runs
    path, how = p.take(0)
    assert how == "copy" and Path(path).read_bytes() == data[0]
    # dask cancels the running task (executing -> released; it may still finish and count): the copy it
    # took stays until the task is done with it
    p.transition(keys[0], "executing", "released")
    settle(p)
    assert Path(path).exists()
    readahead.release(path)
    assert copies(p) == [1]
    # dask moves the queued task to another worker (work stealing): its copy goes, nothing else is fetched
    p.transition(keys[1], "ready", "released")
    settle(p)
    assert copies(p) == [] and p._fetches == {}
    assert p.take(1) == (None, "none")
    arrive(
        p, keys[2]
    )  # a task whose shard was never fetched ahead, arriving on an idle worker: fetched at once
    settle(p)
    p.transition(keys[2], "ready", "executing")
    assert p.take(2)[1] == "copy"
    teardown(p)


def test_queued_shards_are_fetched_in_the_runs_order_whatever_order_they_arrive_in(tmp_path, remote):
    urls, _ = remote
    p, keys = plugin(tmp_path, urls, ahead=1)
    for k in (keys[2], keys[1], keys[0]):  # constrained: tasks that ask for a GPU wait in that state
        p.transition(k, "waiting", "constrained")
    settle(p)
    assert copies(p) == [0]  # 2, then 1 were fetched and dropped as a task ahead of them arrived
    p.transition(keys[0], "constrained", "executing")
    p.transition(keys[0], "executing", "error")  # a failed shard that never took its copy: it goes too
    settle(p)
    assert copies(p) == [1]
    p.transition("some-other-task", "waiting", "ready")  # not a shard task: ignored
    p.transition(task_keys(new_run(), 3)[0], "waiting", "ready")  # another run's on the same worker: ignored
    assert sorted(p._fetches) == [1] and p._queued == [1, 2]
    teardown(p)


def test_a_copy_less_than_half_done_when_its_task_starts_is_abandoned_for_streaming(
    tmp_path, remote, monkeypatch
):
    urls, _ = remote
    started, stopped = threading.Event(), []

    def slow_copy(f):  # a shard of 100 bytes of which 10 have come
        f.size, f.copied = 100, 10
        started.set()
        f.stop.wait(30)
        stopped.append(f.stop.is_set())
        raise readahead._Cancelled

    monkeypatch.setattr(readahead, "_copy", slow_copy)
    p, keys = plugin(tmp_path, urls)
    arrive(p, keys[0])
    assert started.wait(30)
    p.transition(keys[0], "ready", "executing")
    assert p.take(0) == (None, "abandoned")
    settle(p)
    assert stopped == [True]
    teardown(p)


def test_a_failed_copy_is_read_from_its_url_and_a_local_shard_is_only_advised(tmp_path, remote, monkeypatch):
    urls, _ = remote
    gone = urls[0].replace(
        "00000", "00009"
    )  # no such object: the copy fails, the task reads (and fails) itself
    advised = []
    monkeypatch.setattr(readahead, "_advise", advised.append)
    local = str(tmp_path / "src" / "00001.tar")
    p, keys = plugin(tmp_path, [gone, local])
    arrive(p, keys[0])
    settle(p)
    p.transition(keys[0], "ready", "executing")
    arrive(p, keys[1])
    settle(p)
    assert p.take(0) == (None, "failed")
    assert p.take(1) == (None, "page cache") and advised == [local]
    settle(p)
    assert copies(p) == []  # nothing is copied for a local shard, and a failed copy leaves no part file
    teardown(p)


def test_teardown_waits_for_a_copy_off_the_event_loop(tmp_path, remote, monkeypatch):
    """dask runs teardown on the worker's event loop (when the run ends, or the worker closes): a copy stuck in a
    slow read must not stop the loop, or the worker misses its heartbeats."""
    urls, _ = remote
    in_copy, unblock = threading.Event(), threading.Event()

    def stuck_copy(f):  # a read that does not return until the network does
        in_copy.set()
        unblock.wait(30)
        raise readahead._Cancelled

    monkeypatch.setattr(readahead, "_copy", stuck_copy)
    p, keys = plugin(tmp_path, urls)
    arrive(p, keys[0])
    assert in_copy.wait(30)

    async def close() -> int:
        closing = asyncio.create_task(p.teardown(None))
        ticks = 0
        for _ in range(5):  # the loop keeps running while teardown waits for the copy
            await asyncio.sleep(0.02)
            ticks += 1
        assert not closing.done()
        unblock.set()
        await asyncio.wait_for(closing, 30)
        return ticks

    assert asyncio.run(close()) == 5
    assert not p.dir.exists()


def test_a_short_copy_is_refused(tmp_path, remote):
    urls, _ = remote
    f = readahead._Fetch(0, urls[0], tmp_path / "c" / "0.tar")

    class Short:  # a filesystem that says 1,000,000 bytes and ends early
        size = 1_000_000

        def __init__(self):
            self.left = [b"x" * 10]

        def read(self, n):
            return self.left.pop() if self.left else b""

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

    fs = SimpleNamespace(open=lambda path, mode: Short())
    with pytest.MonkeyPatch.context() as m:
        m.setattr(readahead.fsspec.core, "url_to_fs", lambda url: (fs, url))
        with pytest.raises(OSError, match="read 10 of its 1000000 bytes"):
            readahead._copy(f)
    assert not list((tmp_path / "c").iterdir())  # neither the copy nor its part file


def test_advise_reads_a_local_file_into_the_page_cache_without_error(tmp_path):
    path = write_tar(tmp_path / "00000.tar", good_samples(0, [0, 1]))
    readahead._advise(str(path))  # posix_fadvise on Linux; a no-op where the OS has none
    readahead._advise(f"file://{path}")


def test_an_embed_run_on_remote_shards_reads_them_from_copies_and_stores_the_same_bytes(tmp_path, remote):
    from distributed import LocalCluster

    urls, _ = remote
    # in one process, so the workers see the in-memory filesystem the shards are on
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        shards = urls[0].rpartition("/")[0] + "/*.tar"
        rc = embed(
            "--shards", shards, "--out", tmp_path / "remote", *TINY, "--scheduler", cluster.scheduler_address
        )
        assert rc == 0
        # the run removed its plugin from the workers, and with it every copy
        assert not list(Path(cluster.workers[0].local_directory).glob("read-ahead-*"))
    assert embed("--shards", tmp_path / "src", "--out", tmp_path / "local", *TINY, "--read-ahead", "0") == 0
    summary = json.loads((tmp_path / "remote" / "logs" / "embed_summary.json").read_text())
    # the worker's first shard may start before its copy does; every later one was copied while one ran
    assert summary["read_ahead"].get("copy", 0) >= 2 and sum(summary["read_ahead"].values()) == 3
    assert json.loads((tmp_path / "local" / "logs" / "embed_summary.json").read_text())["read_ahead"] == {
        "off": 3
    }
    for i in range(3):
        done = [
            json.loads((tmp_path / s / "done" / f"{i:05d}.json").read_text()) for s in ("remote", "local")
        ]
        assert done[0]["files"] == done[1]["files"] and done[0]["rows"] == 6


def test_read_ahead_must_not_be_negative(tmp_path, capsys):
    assert embed("--shards", tmp_path, "--out", tmp_path / "o", *TINY, "--read-ahead", "-1") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "unclip embed: error: --read-ahead must be >= 0 (shards fetched ahead per worker; 0 = off), not -1"
    ]
