"""Download stage: real img2dataset runs against a local server with good and bad images."""

from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.cli import main
from jobs.http_server import serve_folder
from pipeline.errors import UsageError

BAD = {"missing.jpg": None, "empty.jpg": b"", "page.jpg": b"<html><body>not an image</body></html>"}


def make_images(folder: Path, n_good: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n_good):
        buf = io.BytesIO()
        Image.new("RGB", (48, 40), (i * 3 % 256, 100, 200 - i % 200)).save(buf, format="JPEG")
        (folder / f"good{i:03d}.jpg").write_bytes(buf.getvalue())
        names.append(f"good{i:03d}.jpg")
    for name, data in BAD.items():
        if data is not None:
            (folder / name).write_bytes(data)
    full = (folder / "good000.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(full[:120])  # header only: the scan data is cut off
    return names


def write_table(path: Path, base: str, names: list[str]) -> Path:
    pq.write_table(
        pa.table(
            {
                "url": [f"{base}/{n}" for n in names],
                "caption": [f"caption of {n}" for n in names],
                "source": ["test"] * len(names),  # an extra column: kept in the shard metadata
            }
        ),
        path,
    )
    return path


def read_tars(out: Path) -> dict[str, dict[str, bytes]]:
    """key -> {extension: bytes} over all tars, plus the shard it came from."""
    samples: dict[str, dict[str, bytes]] = {}
    for tar in sorted(out.glob("*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {"shard": tar.stem.encode()})[ext] = tf.extractfile(m).read()
    return samples


def test_download_counts_failures_and_keeps_captions(tmp_path, capfd, monkeypatch):
    names = make_images(tmp_path / "www", 20)
    bad = ["missing.jpg", "empty.jpg", "page.jpg", "truncated.jpg"]
    with serve_folder(str(tmp_path / "www")) as base:
        urls = write_table(tmp_path / "urls.parquet", base, names[:10] + bad + names[10:])
        rc = main(
            [
                "download",
                "--urls",
                str(urls),
                "--out",
                str(tmp_path / "shards"),
                "--image-size",
                "32",
                "--samples-per-shard",
                "10",
                "--processes",
                "1",
                "--threads",
                "4",
            ]
        )
    assert rc == 0
    summary = json.loads((tmp_path / "shards/summary/download_summary.json").read_text())
    assert summary["rows"] == 24 and summary["successes"] == 20 and summary["failures"] == 4
    assert summary["complete"] and summary["shards"] == {
        "expected": 3,
        "finished": 3,
        "downloaded_this_run": 3,
    }
    assert summary["failed_to_download"] == 1 and summary["failed_to_resize"] == 3
    assert sum(summary["failures_by_reason"].values()) == 4
    assert any("404" in reason for reason in summary["failures_by_reason"])
    samples = read_tars(tmp_path / "shards")
    assert len(samples) == 20
    meta = pd.concat([pd.read_parquet(p) for p in sorted(glob.glob(str(tmp_path / "shards/*.parquet")))])
    by_url = meta.set_index("url")
    for name in bad:
        assert by_url.loc[f"{base}/{name}", "status"] != "success"
        assert by_url.loc[f"{base}/{name}", "error_message"]
    for key, sample in samples.items():
        row = meta[meta.key == key].iloc[0]
        assert sample["txt"].decode() == row.caption == f"caption of {row.url.rsplit('/', 1)[1]}"
        assert Image.open(io.BytesIO(sample["jpg"])).size == (32, 32)
    assert set(meta.source) == {"test"}
    got = capfd.readouterr()
    assert "20/24 images" in got.out
    # img2dataset's own lines (and bars) broke up our bar on the terminal: they go to its log
    log_text = (tmp_path / "shards/summary/img2dataset.log").read_text()
    assert "Downloading starting now" in log_text and "Downloading starting now" not in got.out + got.err
    settings = json.loads((tmp_path / "shards/summary/download_settings.json").read_text())
    assert settings["samples_per_shard"] == 10 and settings["image_size"] == 32 and settings["rows"] == 24
    # A rerun with another shard size would repeat rows in new shards beside the old: refused, nothing touched.
    before = {p.name: p.read_bytes() for p in (tmp_path / "shards").rglob("*") if p.is_file()}
    again = ["download", "--urls", str(urls), "--out", str(tmp_path / "shards"), "--image-size", "32"]
    assert main([*again, "--samples-per-shard", "5"]) == 2
    err = capfd.readouterr().err.strip()
    assert "holds shards made with other settings (--samples-per-shard 10 -> 5)" in err and "\n" not in err
    assert {p.name: p.read_bytes() for p in (tmp_path / "shards").rglob("*") if p.is_file()} == before
    # Another table of as many rows would finish the folder with its own rows: refused, nothing touched.
    urls_b = write_table(tmp_path / "b.parquet", base, list(reversed(names[:10] + bad + names[10:])))
    b = ["download", "--urls", str(urls_b), "--out", str(tmp_path / "shards"), "--image-size", "32"]
    assert main([*b, "--samples-per-shard", "10"]) == 2
    err = capfd.readouterr().err.strip()
    assert f"holds shards of another table: {urls_b} has as many rows, but other URLs or captions" in err
    assert {p.name: p.read_bytes() for p in (tmp_path / "shards").rglob("*") if p.is_file()} == before
    # The same rows served from another host and port (the demo's case) are the same table: a resume.
    t = pq.read_table(urls)
    moved = [u.replace("http://127.0.0.1:", "https://localhost:1") for u in t.column("url").to_pylist()]
    pq.write_table(t.set_column(0, "url", pa.array(moved)), tmp_path / "moved.parquet")
    m = ["download", "--urls", str(tmp_path / "moved.parquet"), "--out", str(tmp_path / "shards")]
    from pipeline import download  # every shard is finished: img2dataset (a ~10 s start) is not run again

    monkeypatch.setattr(download, "_run_img2dataset", lambda *a, **kw: pytest.fail("img2dataset ran again"))
    assert main([*m, "--image-size", "32", "--samples-per-shard", "10"]) == 0
    assert "none downloaded this run (every shard was finished before)" in capfd.readouterr().out
    # as many stats files as shards, but one of another number in place of 00001's: not finished
    shards_dir = tmp_path / "shards"
    kept = {p.name: p.read_bytes() for p in shards_dir.glob("00001*")}
    for name in kept:
        (shards_dir / name).rename(shards_dir / name.replace("00001", "00009"))
    ran = []
    monkeypatch.setattr(download, "_run_img2dataset", lambda *a, **kw: ran.append(1) or (True, 0.0))
    assert main([*m, "--image-size", "32", "--samples-per-shard", "10"]) == 130 and ran == [1]
    summary = json.loads((tmp_path / "shards/summary/download_summary.json").read_text())
    assert summary["shards"]["finished"] == 2 and not summary["complete"]  # 00009 is none of the table's
    for name in kept:
        (shards_dir / name.replace("00001", "00009")).rename(shards_dir / name)
    monkeypatch.setattr(download, "_run_img2dataset", lambda *a, **kw: pytest.fail("img2dataset ran again"))
    assert main([*m, "--image-size", "32", "--samples-per-shard", "10"]) == 0
    shards = {n: v for n, v in before.items() if n.endswith((".tar", ".parquet", "_stats.json"))}
    assert {n: before[n] for n in shards} == {
        p.name: p.read_bytes() for p in (tmp_path / "shards").glob("0*") if p.name in shards
    }
    assert json.loads((tmp_path / "shards/summary/download_summary.json").read_text())["complete"]


def test_the_rows_digest_reads_content_not_batches_hosts_or_formats(tmp_path):
    from pipeline.download import rows_digest

    urls = [f"http://127.0.0.1:8000/img/{i}.jpg?s={i % 3}" for i in range(5000)]
    caps = [None if i % 50 == 0 else f"caption {i}" for i in range(5000)]
    pq.write_table(pa.table({"url": urls, "caption": caps}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"url": urls, "caption": caps}), tmp_path / "b.parquet", row_group_size=777)
    moved = [u.replace("http://127.0.0.1:8000", "https://mirror.example") for u in urls]
    pq.write_table(pa.table({"x": range(5000), "caption": caps, "url": moved}), tmp_path / "c.parquet")
    digest = rows_digest(str(tmp_path / "a.parquet"), "parquet", "url", "caption")
    assert rows_digest(str(tmp_path / "b.parquet"), "parquet", "url", "caption") == digest
    assert rows_digest(str(tmp_path / "c.parquet"), "parquet", "url", "caption") == digest
    # one caption changed, two rows swapped, a null caption made empty, a path changed: each another table
    for i, (u, c) in enumerate(
        [
            (urls, caps[:4000] + ["other"] + caps[4001:]),
            (urls[:2] + [urls[3], urls[2]] + urls[4:], caps),
            (urls, [""] + caps[1:]),
            (urls[:-1] + [urls[-1].replace("/img/", "/im/g")], caps),
        ]
    ):
        pq.write_table(pa.table({"url": u, "caption": c}), tmp_path / f"d{i}.parquet")
        assert rows_digest(str(tmp_path / f"d{i}.parquet"), "parquet", "url", "caption") != digest, i
    with open(tmp_path / "a.jsonl", "w") as f:
        f.writelines(json.dumps({"url": u, "caption": c}) + "\n" for u, c in zip(urls, caps))
    pacsv.write_csv(pa.table({"caption": caps, "url": urls}), tmp_path / "a.csv")
    assert rows_digest(str(tmp_path / "a.jsonl"), "jsonl", "url", "caption") == digest
    # csv has no null string: its empty captions are empty strings, read so every run
    csv = rows_digest(str(tmp_path / "a.csv"), "csv", "url", "caption")
    assert csv == rows_digest(str(tmp_path / "a.csv"), "csv", "url", "caption") != digest


@pytest.mark.parametrize(
    "case, message",
    [
        ("urls_inside_out", "lies inside --out"),
        ("user_files_in_out", "is not empty (notes.txt) and is not a download's folder"),
        ("older_summary_other_size", "holds shards made with other settings (--image-size 64 -> 32)"),
    ],
)
def test_download_never_writes_over_the_users_files(tmp_path, capsys, case, message):
    out = tmp_path / "out"
    out.mkdir()
    urls = out / "00000.parquet" if case == "urls_inside_out" else tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": ["http://127.0.0.1:9/a.jpg"], "caption": ["a"]}), urls)
    if case == "user_files_in_out":
        (out / "notes.txt").write_text("mine")
    elif (
        case == "older_summary_other_size"
    ):  # a folder from before download_settings.json: its summary's config
        (out / "summary").mkdir()
        (out / "summary/download_summary.json").write_text(
            json.dumps({"rows": 1, "config": {"image_size": 64, "samples_per_shard": 10000}})
        )
        (out / "00000_stats.json").write_text("{}")  # one finished shard: the settings are compared
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main(["download", "--urls", str(urls), "--out", str(out), "--image-size", "32"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("unclip download: error: ") and message in err and "\n" not in err
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_file", "input file not found"),
        ("bad_ext", "unsupported input extension '.xlsx'"),
        ("missing_col", "--caption-col 'caption' is not a column of"),
        ("empty", "has no rows"),
        ("bad_size", "--image-size must be between 8 and 8192"),
        ("bad_retries", "--retries must be >= 0 (got -1)"),  # img2dataset crashed inside, half-written
        ("bad_quality", "--encode-quality must be between 0 and 100"),
        # img2dataset's own JSON read failed after shards were started, with "rerun the same command" advice
        (
            "jsonl_key_changes_type",
            "cannot be read as img2dataset reads it: JSON parse error: Column(/n) changed",
        ),
        ("csv_numeric_urls", "--url-col 'url' of"),  # downloaded, failing every row
        # demo-data's own table: paths, which img2dataset failed one by one, ending with 0 images and exit 0
        ("paths_not_urls", "holds 'images/00000.png' (row 1), not a URL"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, case, message):
    urls = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": ["http://127.0.0.1:9/a.jpg"], "caption": ["a"]}), urls)
    args = ["--urls", str(urls)]
    if case == "missing_file":
        args = ["--urls", str(tmp_path / "nope.parquet")]
    elif case == "bad_ext":
        (tmp_path / "urls.xlsx").write_text("x")
        args = ["--urls", str(tmp_path / "urls.xlsx")]
    elif case == "missing_col":
        (tmp_path / "urls.csv").write_text("url,text\nhttp://127.0.0.1:9/a.jpg,a\n")
        args = ["--urls", str(tmp_path / "urls.csv")]
    elif case == "empty":
        (tmp_path / "urls.jsonl").write_text("")
        args = ["--urls", str(tmp_path / "urls.jsonl")]
    elif case == "bad_size":
        args += ["--image-size", "0"]
    elif case == "jsonl_key_changes_type":
        lines = [
            json.dumps({"url": f"http://127.0.0.1:9/{i}.jpg", "caption": "a", "n": i if i < 3 else "x"})
            for i in range(5)
        ]
        (tmp_path / "u.jsonl").write_text("\n".join(lines) + "\n")
        args = ["--urls", str(tmp_path / "u.jsonl")]
    elif case == "csv_numeric_urls":
        (tmp_path / "u.csv").write_text("url,caption\n1,a\n2,b\n")
        args = ["--urls", str(tmp_path / "u.csv")]
    elif case == "bad_retries":
        args += ["--retries", "-1"]
    elif case == "bad_quality":
        args += ["--encode-quality", "101"]
    elif case == "paths_not_urls":
        pq.write_table(pa.table({"url": ["images/00000.png"], "caption": ["a"]}), urls)
    out = tmp_path / "out"
    out.mkdir()
    assert main(["download", *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("unclip download: error: ") and message in err and "\n" not in err
    assert os.listdir(out) == []
    if case == "missing_col":
        assert "columns: url, text" in err


def _download_cmd(urls: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "jobs.cli",
        "download",
        "--urls",
        str(urls),
        "--out",
        str(out),
        "--image-size",
        "32",
        "--samples-per-shard",
        "8",
        "--processes",
        "1",
        "--threads",
        "2",
    ]


def _wait_for_stats(folder: Path, more_than: int) -> None:
    deadline = time.time() + 120
    while len(list(folder.glob("*_stats.json"))) <= more_than and time.time() < deadline:
        time.sleep(0.02)


def test_ctrl_c_exits_130_and_says_how_many_shards_remain(tmp_path):
    names = make_images(tmp_path / "www", 48)
    out = tmp_path / "out"
    with serve_folder(str(tmp_path / "www"), delay=0.05) as base:
        urls = write_table(tmp_path / "urls.parquet", base, names)
        proc = subprocess.Popen(
            _download_cmd(urls, out), start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        _wait_for_stats(out, 0)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C sends: the whole process group
        _, err = proc.communicate(timeout=120)
    finished = len(list(out.glob("*_stats.json")))
    assert proc.returncode == 130, err.decode()[-2000:]
    assert (
        1 <= finished < 6
        and f"{6 - finished} shards remain; rerun the same command to finish" in err.decode()
    ), (finished, err.decode()[-2000:])  # failed once in six full-suite runs on 2026-12-04, not reproduced
    summary = json.loads((out / "summary/download_summary.json").read_text())
    assert summary["interrupted"] and not summary["complete"]


@pytest.mark.slow  # ~35 s: four img2dataset runs
def test_interrupted_and_killed_download_resumes_to_the_same_shards(tmp_path):
    names = make_images(tmp_path / "www", 48)
    resumed = tmp_path / "resumed"
    with serve_folder(str(tmp_path / "www"), delay=0.05) as base:
        urls = write_table(tmp_path / "urls.parquet", base, names)
        subprocess.run(_download_cmd(urls, tmp_path / "straight"), check=True, capture_output=True)
        # Ctrl-C: the terminal sends SIGINT to the whole process group.
        proc = subprocess.Popen(
            _download_cmd(urls, resumed),
            start_new_session=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        _wait_for_stats(resumed, 0)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        after_int = len(list(resumed.glob("*_stats.json")))
        assert proc.returncode == 130, err.decode()[-2000:]
        assert f"{6 - after_int} shards remain; rerun the same command to finish" in err.decode()
        # A hard kill (no handler runs) in the next run.
        proc = subprocess.Popen(
            _download_cmd(urls, resumed),
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_for_stats(resumed, after_int)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        finished_before = len(list(resumed.glob("*_stats.json")))
        assert 1 <= after_int < finished_before < 6, "the interrupt and the kill should land mid-run"
        subprocess.run(_download_cmd(urls, resumed), check=True, capture_output=True)
    summary = json.loads((resumed / "summary/download_summary.json").read_text())
    assert summary["shards"]["downloaded_this_run"] == 6 - finished_before and summary["complete"]
    straight, got = read_tars(tmp_path / "straight"), read_tars(resumed)
    assert len(straight) == 48
    assert got == straight  # same keys, same shard, same image bytes and captions


def test_a_retry_before_any_shard_finished_may_change_the_settings(tmp_path):
    from pipeline.download import DownloadConfig, validate

    out = tmp_path / "out"
    (out / "summary").mkdir(parents=True)
    (out / "summary/download_settings.json").write_text(json.dumps({"image_size": 64, "rows": 1}))
    urls = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": ["http://127.0.0.1:9/a.jpg"], "caption": ["a"]}), urls)
    assert validate(DownloadConfig(urls=str(urls), out=str(out), image_size=32))[2] == 1
    (out / "00000_stats.json").write_text("{}")
    with pytest.raises(UsageError, match="--image-size 64 -> 32"):
        validate(DownloadConfig(urls=str(urls), out=str(out), image_size=32))


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_a_row_without_a_url_is_a_failed_row_in_every_format(fmt, tmp_path):
    """An empty URL refused the whole table as "not a URL" in csv, tsv and jsonl, and was a counted failure in
    parquet (a null): one rule now, a row that fails and is counted, in each."""
    from pipeline.download import DownloadConfig, validate

    urls = [f"http://127.0.0.1:9/{i}.jpg" for i in range(20)]
    urls[11] = None
    path = tmp_path / f"u.{fmt}"
    if fmt == "parquet":
        pq.write_table(pa.table({"url": urls, "caption": ["a"] * 20}), path)
    elif fmt == "csv":
        path.write_text("url,caption\n" + "".join(f"{u or ''},a\n" for u in urls))
    else:
        path.write_text("".join(json.dumps({"url": u, "caption": "a"}) + "\n" for u in urls))
    assert validate(DownloadConfig(urls=str(path), out=str(tmp_path / "out")))[2] == 20


def test_a_download_starts_by_removing_the_files_of_unfinished_shards_only(tmp_path):
    """A run killed before any shard finished, retried with another --samples-per-shard, left the first run's
    00001.tar behind (the retry made one shard): the store reported complete, and embed refused 00001.tar."""
    from pipeline.download import _remove_unfinished, finished_shards

    out = tmp_path / "out"
    (out / "summary").mkdir(parents=True)
    for name in ("00000.tar", "00000.parquet", "00000_stats.json", "00001.tar", "00001.parquet", "00002.tar"):
        (out / name).write_text("x")
    (out / "summary/download_summary.json").write_text("{}")
    _remove_unfinished(str(out), finished_shards(str(out)))
    assert sorted(p.name for p in out.iterdir()) == [
        "00000.parquet",
        "00000.tar",
        "00000_stats.json",
        "summary",
    ]


def test_a_torn_stats_file_is_rebuilt_from_the_shards_record_and_nothing_is_deleted(tmp_path, capsys):
    """img2dataset writes NNNNN_stats.json in place after closing the shard: a kill mid-write leaves it cut off
    beside a whole shard (our summary then crashed on every rerun). Its counts come back from the record; with
    the record damaged too, one line says what to delete, and nothing is deleted."""
    names = make_images(tmp_path / "www", 10)
    out = tmp_path / "shards"
    with serve_folder(str(tmp_path / "www")) as base:
        urls = write_table(tmp_path / "urls.parquet", base, names[:4] + ["missing.jpg"] + names[4:])
        args = ["download", "--urls", str(urls), "--out", str(out), "--image-size", "32"]
        args += ["--samples-per-shard", "5", "--processes", "1", "--threads", "2"]
        assert main(args) == 0
        first = read_tars(out)
        stats = json.loads((out / "00000_stats.json").read_text())
        (out / "00000_stats.json").write_bytes(b'{"count": 5, "succ')
        capsys.readouterr()
        assert main(args) == 0
    summary = json.loads((out / "summary/download_summary.json").read_text())
    assert summary["complete"] and summary["shards"]["downloaded_this_run"] == 0
    assert summary["successes"] == 10 and summary["failed_to_download"] == 1
    rebuilt = json.loads((out / "00000_stats.json").read_text())
    assert {k: rebuilt[k] for k in ("count", "successes", "failed_to_download", "status_dict")} == {
        k: stats[k] for k in ("count", "successes", "failed_to_download", "status_dict")
    }
    assert read_tars(out) == first
    (out / "00001_stats.json").write_bytes(b"")
    (out / "00001.parquet").write_bytes(b"cut")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"delete {out / '00001_stats.json'} to download shard 00001 again" in err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_jsonl_columns_are_every_key_as_pyarrow_reads_them(tmp_path):
    """A key that first appears after line 1 (a caption the first row lacks) is a column, as it is to the
    pyarrow JSON reader img2dataset uses: it was refused as "not a column" when only line 1 was read."""
    import pyarrow.json as pajson

    from pipeline.download import count_rows

    urls = tmp_path / "urls.jsonl"
    rows = [
        {"url": "http://127.0.0.1:9/a.jpg"},
        {"url": "http://127.0.0.1:9/b.jpg", "caption": "a dog", "w": 3},
    ]
    urls.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert count_rows(str(urls), "jsonl") == (["url", "caption", "w"], 2)
    assert pajson.read_json(urls).column_names == ["url", "caption", "w"]


def test_a_download_where_every_url_failed_exits_1(tmp_path, capsys):
    """Finished, with nothing to embed: it exited 0."""
    urls = tmp_path / "urls.parquet"
    pq.write_table(
        pa.table({"url": [f"http://127.0.0.1:9/{i}.jpg" for i in range(3)], "caption": ["a"] * 3}), urls
    )
    args = ["download", "--urls", str(urls), "--out", str(tmp_path / "out"), "--image-size", "32"]
    assert main([*args, "--processes", "1", "--threads", "2", "--timeout", "2"]) == 1
    summary = json.loads((tmp_path / "out" / "summary" / "download_summary.json").read_text())
    assert summary["complete"] and summary["successes"] == 0 and summary["exit_code"] == 1


def test_failure_reasons_that_name_their_url_are_counted_as_one_kind(tmp_path, capsys):
    """A million URLs of one bad kind made a million one-off reasons in the summary, each printed."""
    from jobs.demo import print_download_summary
    from pipeline.download import summarize
    from pipeline.errors import KINDS_KEPT, OTHER_KINDS

    status = {"success": 5, "HTTP Error 404: Not Found": 2}
    status.update({f"unknown url type: 'images/{i:05d}.png'": 1 for i in range(300)})
    status.update({f"cannot identify image file <_io.BytesIO object at 0x7f{i:04x}>": 1 for i in range(7)})
    status.update(
        {
            f"HTTPSConnectionPool(host='h{i}.org', port=443): Max retries exceeded with url: /{i}.jpg (Caused by "
            f'NameResolutionError("<urllib3.connection.HTTPSConnection object at 0x7f{i:04x}>: Failed to resolve '
            f"'h{i}.org' ([Errno -2] Name or service not known)\"))": 1
            for i in range(3)
        }
    )
    status.update({f"rare kind {i}": 1 for i in range(KINDS_KEPT + 4)})
    for shard, part in (("00000", list(status.items())[:150]), ("00001", list(status.items())[150:])):
        st = dict(part)
        fails = sum(v for k, v in st.items() if k != "success")
        stats = {"count": fails + st.get("success", 0), "successes": st.get("success", 0)}
        stats.update(failed_to_download=fails, failed_to_resize=0, status_dict=st)
        (tmp_path / f"{shard}_stats.json").write_text(json.dumps(stats))
    s = summarize(str(tmp_path), set(), 1.0, 372, 2)
    reasons = s["failures_by_reason"]
    assert sum(reasons.values()) == s["failures"] == 2 + 300 + 7 + 3 + KINDS_KEPT + 4
    assert list(reasons)[:4] == [
        "unknown url type: '...'",
        "cannot identify image file",
        "HTTPSConnectionPool(host='...', port=443): Max retries exceeded with url: <url> (Caused by "
        "NameResolutionError(\": Failed to resolve '...' ([Errno -2] Name or service not known)\"))",
        "HTTP Error 404: Not Found",
    ]
    assert reasons["unknown url type: '...'"] == 300 and reasons["cannot identify image file"] == 7
    assert len(reasons) == KINDS_KEPT + 1 and reasons[OTHER_KINDS] == 8  # the 54 one-off kinds, least kept
    print_download_summary({**s, "images_per_second": 5.0, "seconds": 1.0})
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 12 and lines[1].split() == ["300", "unknown", "url", "type:", "'...'"]
    assert lines[-1].split()[:3] == [str(sum(list(reasons.values())[10:])), "...", "41"]


def _wait_ready(ready: Path) -> list[int]:
    deadline = time.monotonic() + 60
    while not ready.exists() or not ready.read_text().endswith("\n"):
        assert time.monotonic() < deadline, "the stand-in never started"
        time.sleep(0.02)
    return [int(p) for p in ready.read_text().split()]


def _gone(*pids: int, within: float = 10.0) -> bool:
    import psutil

    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if all(not psutil.pid_exists(p) or psutil.Process(p).status() == psutil.STATUS_ZOMBIE for p in pids):
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("presses", [1, 2])
def test_an_interrupt_ends_a_download_whose_ctrl_c_handler_hangs(tmp_path, presses):
    """img2dataset's own Ctrl-C handling hung about once in eight interrupted runs (its pool's terminate blocked
    on a queue lock), so `unclip download` never exited. The download runs in a child: after an interrupt it
    and every process under it have the grace period to end, then are killed, and the run reports the
    interrupt. A second Ctrl-C cuts the wait short, and does not escape with the child still running (the
    process would then hang at exit, waiting for it)."""
    import threading

    from pipeline.download import _run_img2dataset

    ready = tmp_path / "ready"

    def interrupt_when_ready():
        _wait_ready(ready)
        for _ in range(presses):
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C, as the CLI's main thread gets it
            time.sleep(0.3)

    threading.Thread(target=interrupt_when_ready, daemon=True).start()
    start = time.monotonic()
    grace = 1.0 if presses == 1 else 60.0
    assert _run_img2dataset({"ready": str(ready)}, grace, "tests.stuck_child:ignores_ctrl_c")[0] is True
    assert time.monotonic() - start < 30
    assert _gone(*_wait_ready(ready)), "the child or its own process outlived the kill"


def test_an_interrupted_download_ends_without_the_resource_trackers_leak_warning(tmp_path):
    """Every Ctrl-C of `unclip download` ended with multiprocessing's "There appear to be N leaked semaphore
    objects to clean up at shutdown", printed after the command's own last line."""
    ready = tmp_path / "ready"
    code = (
        "import os, signal, threading, time\n"
        "from pipeline.download import _run_img2dataset\n"
        "def press():\n"
        f"    while not os.path.exists({str(ready)!r}): time.sleep(0.02)\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "threading.Thread(target=press, daemon=True).start()\n"
        f"print(_run_img2dataset({{'ready': {str(ready)!r}}}, 0.5, 'tests.stuck_child:holds_semaphores_and_ignores_ctrl_c')[0])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).parents[1],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.stdout.strip() == "True", done.stderr
    assert "leaked semaphore" not in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert "PYTHONWARNINGS" not in os.environ or "resource_tracker" not in os.environ["PYTHONWARNINGS"]


def test_a_download_child_ends_when_its_parent_is_killed(tmp_path):
    """A child left behind by a killed `unclip download` went on downloading unwatched, outside the parent's
    hold on --out (a rerun meanwhile raced it over img2dataset's temporary files)."""
    import psutil

    ready = tmp_path / "ready"
    code = (
        "from pipeline.download import _run_img2dataset\n"
        f"_run_img2dataset({{'ready': {str(ready)!r}}}, download='tests.stuck_child:ignores_ctrl_c')\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], cwd=Path(__file__).parents[1])
    child, worker = _wait_ready(ready)
    try:
        assert psutil.Process(child).ppid() == parent.pid
        parent.kill()  # SIGKILL: no handler of the parent runs
        parent.wait()
        assert _gone(child, worker), "the child or its own process outlived its parent"
    finally:
        for pid in (child, worker):
            if psutil.pid_exists(pid):
                psutil.Process(pid).kill()


def test_no_process_of_a_killed_downloads_child_outlives_it_even_one_started_as_the_child_ends(tmp_path):
    """A SIGKILLed `unclip download` left img2dataset's pool workers downloading, adopted by init: the child
    killed its processes one by one, and the pool started new ones before the child was gone. They wrote
    shards into --out after the command had let go of it."""
    import psutil

    ready, pids = tmp_path / "ready", tmp_path / "pids"
    kw = {"ready": str(ready), "pids": str(pids)}
    code = f"from pipeline.download import _run_img2dataset\n_run_img2dataset({kw!r}, download='tests.stuck_child:keeps_starting_workers')\n"
    parent = subprocess.Popen([sys.executable, "-c", code], cwd=Path(__file__).parents[1])
    (child,) = _wait_ready(ready)
    parent.kill()
    parent.wait()
    assert _gone(child), "the child outlived its parent"
    time.sleep(0.5)  # any worker started as the child ended has been, by now
    started = [int(p) for p in pids.read_text().split()]
    alive = [
        p for p in started if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
    ]
    for p in alive:
        psutil.Process(p).kill()
    assert len(started) > 10 and alive == [], f"{len(alive)} of {len(started)} workers outlived the child"


def test_ctrl_z_stops_the_download_child_with_the_command_and_fg_goes_on_with_both(tmp_path):
    """The child leads its own process group, which the terminal's Ctrl-Z (SIGTSTP to the foreground group)
    does not reach: the command stops, and takes the child's group with it; SIGCONT wakes both."""
    import psutil

    ready = tmp_path / "ready"
    code = (
        "from pipeline.download import _run_img2dataset\n"
        f"_run_img2dataset({{'ready': {str(ready)!r}}}, download='tests.stuck_child:ignores_ctrl_c')\n"
    )
    # A group of its own whose parent (pytest) is outside it, as a shell's job is: the kernel drops a Ctrl-Z to
    # an orphaned group, as pytest's own is when it runs detached (under setsid, or left by its shell)
    parent = subprocess.Popen([sys.executable, "-c", code], cwd=Path(__file__).parents[1], process_group=0)
    pids = _wait_ready(ready)
    procs = [psutil.Process(p) for p in (parent.pid, *pids)]

    def states(want: str) -> bool:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if all((p.status() == psutil.STATUS_STOPPED) == (want == "stopped") for p in procs):
                return True
            time.sleep(0.05)
        return False

    try:
        parent.send_signal(signal.SIGTSTP)
        assert states("stopped"), [p.status() for p in procs]
        parent.send_signal(signal.SIGCONT)
        assert states("running"), [p.status() for p in procs]
    finally:
        for p in procs:
            with contextlib.suppress(psutil.Error):
                p.kill()


def test_the_download_child_writes_to_the_terminal_under_stty_tostop(tmp_path):
    """Its process group is not the terminal's foreground one: with `stty tostop` its first progress bar
    stopped it and its workers (SIGTTOU) for good. It ignores SIGTTOU, which its workers inherit."""
    from pipeline.download import _run_img2dataset

    ready = tmp_path / "ready"
    _run_img2dataset({"ready": str(ready)}, download="tests.stuck_child:says_how_it_takes_sigttou")
    assert _wait_ready(ready) == [1]


def test_a_jsonl_whose_key_first_appears_past_pyarrows_first_block_is_taken(tmp_path):
    """Read as img2dataset reads it (read_json, whole): a streaming read fixed its columns on the first block
    and refused a key first seen later ("unexpected field")."""
    from pipeline.download import DownloadConfig, validate

    rows = [{"url": f"http://127.0.0.1:9/{i}.jpg", "caption": f"caption {i}"} for i in range(30_000)]
    rows[29_000]["extra"] = "late"
    path = tmp_path / "late.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert validate(DownloadConfig(urls=str(path), out=str(tmp_path / "out")))[2] == 30_000


def test_a_sigint_to_the_download_child_alone_is_an_interrupt(tmp_path):
    """img2dataset's handler ends its process with sys.exit(0): the run is reported interrupted, not finished."""
    import threading

    from pipeline.download import _run_img2dataset

    ready = tmp_path / "ready"
    threading.Thread(target=lambda: os.kill(_wait_ready(ready)[0], signal.SIGINT), daemon=True).start()
    before = time.time()
    interrupted, started = _run_img2dataset(
        {"ready": str(ready)}, download="tests.stuck_child:exits_on_ctrl_c"
    )
    assert interrupted is True and before < started < time.time()


@pytest.mark.parametrize(
    "stand_in, kwargs, message",
    [
        (
            "fails",
            {},
            r"^img2dataset ended with exit code 1 \(its error is above\); .*rerun the same command",
        ),
        ("is_killed", {}, r"^img2dataset was killed by signal 9; .*rerun the same command"),
        ("exits_with", {"code": 3}, r"^img2dataset ended with exit code 3 "),  # not taken for an interrupt
    ],
)
def test_a_download_child_that_fails_is_a_stage_error(stand_in, kwargs, message):
    from pipeline.download import _run_img2dataset
    from pipeline.errors import StageError

    with pytest.raises(StageError, match=message):
        _run_img2dataset(kwargs, download=f"tests.stuck_child:{stand_in}")


def test_a_failed_download_child_shows_the_end_of_its_log(tmp_path, caplog):
    """Its output goes to a log (not the terminal): a failure shows that run's last lines, and names the file;
    a child that dies before its output went there shows no earlier run's lines as if they were its own."""
    from pipeline.download import _run_img2dataset, run_mark
    from pipeline.errors import StageError

    log_file = tmp_path / "img2dataset.log"
    log_file.write_text(f"{run_mark(1)} earlier\nValueError: an earlier run's error\n")
    with pytest.raises(
        StageError, match=rf"^img2dataset ended with exit code 1 \(its output: {log_file}\); "
    ):
        _run_img2dataset({}, download="tests.stuck_child:fails", log_file=str(log_file))
    shown = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(shown) == 1 and shown[0].startswith(f"img2dataset's last lines ({log_file}):"), shown
    assert "ValueError: img2dataset refused the input" in shown[0] and "an earlier run's" not in shown[0]
    assert log_file.read_text().count("--- img2dataset run in process") == 2  # appended, the earlier run kept
    caplog.clear()
    with pytest.raises(StageError, match=r"^img2dataset was killed by signal 9; "):
        _run_img2dataset({}, download="tests.stuck_child:is_killed", log_file=str(tmp_path / "none.log"))
    assert [r for r in caplog.records if r.levelname == "ERROR"] == []


def test_the_processes_of_a_download_child_that_was_killed_are_ended_too(tmp_path):
    """Killed by a signal (the OOM killer), the child left img2dataset's pool workers and logger running as
    orphans, out of the command's reach and after it had let go of --out."""
    from pipeline.download import _run_img2dataset
    from pipeline.errors import StageError

    ready = tmp_path / "ready"
    with pytest.raises(StageError, match="killed by signal 9"):
        _run_img2dataset({"ready": str(ready)}, download="tests.stuck_child:dies_leaving_a_worker")
    child, worker = _wait_ready(ready)
    assert _gone(worker), "the killed child's own process was left running"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a child subreaper is Linux's")
def test_an_orphan_of_the_download_childs_tree_is_ended_with_it(tmp_path):
    """A process of the child's tree whose parent died went to init, out of the notes of the tree: one started
    less than a second before the child was killed was left running."""
    from pipeline.download import _run_img2dataset, _subreaper
    from pipeline.errors import StageError

    ready = tmp_path / "ready"
    before = _subreaper(0)
    with pytest.raises(StageError, match="killed by signal 9"):
        _run_img2dataset({"ready": str(ready)}, download="tests.stuck_child:orphans_a_worker_then_dies")
    child, worker = _wait_ready(ready)
    try:
        assert _gone(worker), "the orphan was left running"
        assert _subreaper(before) == 0, "the subreaper setting was not given back"
    finally:
        if not _gone(worker, within=0.1):
            os.kill(worker, signal.SIGKILL)


def test_a_download_child_that_fails_with_its_logger_running_ends(tmp_path):
    """img2dataset's logger process is no daemon: an error in img2dataset left the child waiting for it in
    multiprocessing's exit hook, and the command waiting for the child, for good."""
    ready = tmp_path / "ready"
    code = (
        "from pipeline.download import _run_img2dataset\n"
        f"_run_img2dataset({{'ready': {str(ready)!r}}}, download='tests.stuck_child:fails_with_its_logger_running')\n"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", code], cwd=Path(__file__).parents[1], capture_output=True, timeout=60
        )
    finally:
        pids = _wait_ready(ready) if ready.exists() else []
        for pid in pids:  # a hang: what it left
            if not _gone(pid, within=0.1):
                os.kill(pid, signal.SIGKILL)
    err = done.stderr.decode()
    assert "ValueError: img2dataset failed after starting its logger" in err
    assert "StageError: img2dataset ended with exit code 1" in err
    assert _gone(*pids), "the logger process was left running"
