"""`make demo`: every stage on the built-in procedural dataset, on one CPU machine, nothing from the internet.

Folders under ``--out`` (default ``demo_out/``): ``data/`` (generated images + demo.parquet), ``urls.parquet``
(the same rows with http://127.0.0.1 URLs), ``shards/`` (download), and the later stages' outputs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jobs.http_server import serve_folder
from pipeline import demo_data, download

log = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    out: str = "demo_out"
    n: int = 2000
    # 64 px keeps the CPU demo fast; the shapes stay recognisable.
    size: int = 64
    seed: int = 0
    samples_per_shard: int = 500


def served_urls(data_dir: Path, base_url: str, out: Path) -> Path:
    """Rewrite demo.parquet's relative paths as URLs on the local server."""
    table = pq.read_table(data_dir / "demo.parquet")
    urls = pc.binary_join_element_wise(pa.scalar(base_url + "/"), table["url"], "")
    table = table.set_column(table.schema.get_field_index("url"), "url", urls)
    pq.write_table(table, out)
    return out


def run(cfg: DemoConfig) -> dict:
    out = Path(cfg.out)
    data_dir = out / "data"
    print(f"[demo] 1/2 demo-data: {cfg.n} procedural images at {cfg.size}px (seed {cfg.seed}) -> {data_dir}")
    demo_data.run(demo_data.DemoDataConfig(out=str(data_dir), n=cfg.n, size=cfg.size, seed=cfg.seed))
    with serve_folder(str(data_dir)) as base_url:
        print(f"[demo] 2/2 download: serving {data_dir} at {base_url} for img2dataset -> {out / 'shards'}")
        urls = served_urls(data_dir, base_url, out / "urls.parquet")
        summary = download.run(download.DownloadConfig(
            urls=str(urls), out=str(out / "shards"), image_size=cfg.size,
            samples_per_shard=cfg.samples_per_shard, processes=2, threads=16,
        ))
    print_download_summary(summary)
    return {"download": summary}


def print_download_summary(s: dict) -> None:
    print(f"download: {s['successes']}/{s['rows']} images in {s['shards']['finished']}/{s['shards']['expected']} "
          f"shards, {s['failures']} failed, {s['images_per_second']} images/s this run ({s['seconds']} s)")
    for reason, n in s["failures_by_reason"].items():
        print(f"  {n:>6}  {reason}")
