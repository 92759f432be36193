"""`unclip bench`, download: `unclip download` against a bare img2dataset call on the same served images."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow.parquet as pq

from jobs.bench.data import demo_images, served
from jobs.bench.harness import PY, QUIET, alternate, measure, ratio_figure

if TYPE_CHECKING:
    from jobs.bench.main import BenchConfig

EXTRA_COLUMNS = "['background','shape1','color1','position1','shape2','color2','position2']"


def ours_cmd(urls: Path, out: Path) -> list[str]:
    cmd = [PY, "-m", "jobs.cli", "download", "--urls", str(urls), "--out", str(out)]
    return cmd + "--image-size 64 --samples-per-shard 500 --processes 2 --threads 16".split()


def theirs_cmd(urls: Path, out: Path) -> list[str]:
    cmd = [str(Path(PY).parent / "img2dataset"), "--url_list", str(urls)]
    cmd += "--input_format parquet --url_col url --caption_col caption --output_format webdataset".split()
    cmd += ["--output_folder", str(out)]
    cmd += "--image_size 64 --resize_mode center_crop --number_sample_per_shard 500".split()
    cmd += "--processes_count 2 --thread_count 16".split()
    return cmd + ["--save_additional_columns", EXTRA_COLUMNS]


def bench(cfg: BenchConfig, work: Path) -> dict:
    n = 64 if cfg.quick else 2000
    data = work / "dl_data"
    # the table's rows, not its existence: a --quick run's 64 images were timed and reported as 2,000
    if not (data / "demo.parquet").exists() or pq.ParquetFile(data / "demo.parquet").metadata.num_rows != n:
        shutil.rmtree(data, ignore_errors=True)
        demo_images(data, n, 64, seed=1)

    def timed(who: str, urls: Path):
        def one(i: int) -> float:
            out = work / f"dl_{who}_{i}"
            shutil.rmtree(out, ignore_errors=True)
            return measure((ours_cmd if who == "ours" else theirs_cmd)(urls, out), env=QUIET).seconds

        return one

    with served(data, work / "dl_urls.parquet") as urls:
        theirs, ours = alternate(cfg.repeats, timed("theirs", urls), timed("ours", urls))
    r = ratio_figure(ours, theirs)
    return {
        "download_overhead": {
            **r,
            "unit": "seconds, ours / bare img2dataset",
            "images": n,
            "target": "<= 1.05",
            "met": r["ratio_median"] <= 1.05,
        }
    }
