"""`unclip bench`, embed: ``--read-ahead 1`` against ``0`` on shards behind emulated object storage.

The shards are read through `ThrottledFileSystem`, an fsspec filesystem (protocol ``throttled://``) over the
local files whose every opened file waits `FIRST_BYTE_S` before its first bytes and then delivers
`MB_PER_S` (as one GET stream from an object store does; S3 and GCS are usually quoted at tens of ms to the
first byte and tens to ~100 MB/s a stream). The embed runs on a dask cluster in this process (one worker, one
thread), so the filesystem registered here is the workers' too, through the same ``--scheduler`` path a user's
cluster takes. The model is the random `unclip-tiny`, fast enough on CPU that reading shards is a real part
of a shard task, as it is for ViT-B-32 on a GPU.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from fsspec.implementations.local import LocalFileSystem

from jobs.bench.harness import probe, ratio_figure

if TYPE_CHECKING:
    from jobs.bench.main import BenchConfig

FIRST_BYTE_S = 0.1
MB_PER_S = 8.0


class _Throttled:
    """A file object that delivers its bytes at `MB_PER_S`, the first after `FIRST_BYTE_S`."""

    def __init__(self, f):
        self.f, self.started = f, False

    def read(self, n: int = -1) -> bytes:
        if not self.started:
            time.sleep(FIRST_BYTE_S)
            self.started = True
        data = self.f.read(n)
        time.sleep(len(data) / (MB_PER_S * 1e6))
        return data

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


class ThrottledFileSystem(LocalFileSystem):
    protocol = "throttled"
    root_marker = "/"

    def _open(self, path, mode="rb", **kwargs):
        f = super()._open(path, mode, **kwargs)
        return _Throttled(f) if "r" in mode else f


def bench(cfg: BenchConfig, work: Path, shards: Path) -> dict:
    """The row: images/s over the shard tasks, read-ahead on / off, alternated ``cfg.repeats`` times."""
    n = 2 if cfg.quick else 8
    res = probe(
        probe_read_ahead,
        shards=str(shards / f"{{00000..{n - 1:05d}}}.tar"),
        out=str(work / "read_ahead_store"),
        repeats=cfg.repeats,
    )[0]
    r = ratio_figure(res["on"], res["off"])
    return {
        **r,
        "unit": f"images/s over the shard tasks, --read-ahead 1 / 0, {n} shards of {res['rows'] // n} 256 px "
        f"images behind emulated object storage ({FIRST_BYTE_S * 1000:.0f} ms to the first byte, "
        f"{MB_PER_S:g} MB/s a stream), unclip-tiny, one dask worker with one thread, device cpu",
        "read_ahead_on": res["how"],
        "target": "> 1 (worth its default of 1)",
        "met": r["ratio_median"] > 1,
    }


def probe_read_ahead(shards: str, out: str, repeats: int) -> dict:
    import logging
    import shutil

    import fsspec
    from distributed import LocalCluster

    from pipeline.embed import EmbedConfig, run

    logging.getLogger("distributed").setLevel(logging.ERROR)
    fsspec.register_implementation("throttled", ThrottledFileSystem, clobber=True)
    rates: dict[str, list[float]] = {"on": [], "off": []}
    how, rows = {}, 0
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        for _ in range(repeats):
            for side, ahead in (("on", 1), ("off", 0)):
                shutil.rmtree(out, ignore_errors=True)
                cfg = EmbedConfig(
                    shards=f"throttled://{shards}", out=out, clip="unclip-tiny", pretrained="none",
                    batch_size=64, device="cpu", scheduler=cluster.scheduler_address, read_ahead=ahead,
                )  # fmt: skip
                s = run(cfg)
                rates[side].append(s["samples_per_second_all_tasks"])
                rows = s["rows"]
                if ahead:
                    how = s["read_ahead"]
    return {**rates, "how": how, "rows": rows}
