"""Smoke test of `make bench-anchors` at tiny sizes, without the anchor venv: the stream vs embedding-reader
comparison, the embedding-reader interoperability check (and that it catches a misaligned store), our side of
the train-prior comparison, and the report files."""

import dataclasses
import json
import math
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.bench import anchor_stream, random_store
from jobs.bench.anchor_interop import check_embedding_reader
from jobs.bench.anchor_prior import prior_worker
from jobs.bench.anchor_stream import stream_comparison, stream_pass_ours, stream_pass_theirs
from jobs.bench.anchors import AnchorsConfig, run
from jobs.bench.harness import comparison
from pipeline import store
from tests.synthetic_store import make_store

ROWS = [40, 0, 24, 32]  # an empty shard in the middle: embedding-reader must not misalign the next one


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("store")
    make_store(r, ROWS, dim=32)
    return r


def test_comparison_ratios_and_targets():
    c = comparison("rate", [10.0, 20.0, 30.0], [2.0, 5.0, 5.0], "x/s", 5.0)
    assert c["ratio"]["values"] == [5.0, 4.0, 6.0]
    assert (c["ratio"]["median"], c["ratio"]["min"], c["ratio"]["max"]) == (5.0, 4.0, 6.0)
    assert c["met"] is True and c["repeats"] == 3
    rss = comparison("rss", [100.0], [400.0], "MB", None, higher_is_better=False)
    assert rss["ratio"]["median"] == 4.0 and rss["met"] is None
    assert comparison("slow", [1.0], [2.0], "x/s", 1.5)["met"] is False


def test_stream_passes_deliver_every_row(root):
    rows = sum(ROWS)
    n_ours, s_ours = stream_pass_ours(root, batch=8, epochs=3)
    n_theirs, s_theirs = stream_pass_theirs(root, batch=8, epochs=3)
    assert n_ours == 3 * (rows // 8) * 8 == 288
    assert n_theirs == 3 * rows == 288
    assert s_ours > 0 and s_theirs > 0


def test_stream_comparison_on_the_store(root):
    c = stream_comparison("stream", root, batch=16, epochs=2, repeats=2, notes="tiny")
    assert c["repeats"] == 2 and c["units"] == "pairs/s" and c["target"] == anchor_stream.TARGET
    assert len(c["ours"]["values"]) == len(c["theirs"]["values"]) == 2
    assert all(v > 0 for v in c["ours"]["values"] + c["theirs"]["values"])
    assert c["ratio"]["min"] <= c["ratio"]["median"] <= c["ratio"]["max"]
    assert isinstance(c["met"], bool)


def test_embedding_reader_reads_our_store(root):
    checks = check_embedding_reader(root)
    assert [c["passed"] for c in checks] == [True, True]
    assert [c["rows"] for c in checks] == [sum(ROWS)] * 2
    # and the same rows by value, read here directly
    from embedding_reader import EmbeddingReader

    reader = EmbeddingReader(
        str(root / "text_emb"),
        file_format="parquet_npy",
        meta_columns=["key", "caption"],
        metadata_folder=str(root / "metadata"),
    )
    emb, meta = next(reader(batch_size=sum(ROWS), show_progress=False))
    want = np.concatenate([store.open_array(root, "text_emb", s) for s, n in store.shard_rows(root) if n])
    assert emb.dtype == np.float32 and np.array_equal(emb, want.astype(np.float32))
    assert meta["key"].tolist()[40:42] == ["000020000", "000020001"]  # shard 00001 is empty: 00002 follows


def test_embedding_reader_check_catches_misaligned_rows(tmp_path):
    """What a naive writer would leave for an empty shard (0-row .npy files and an empty metadata file):
    embedding-reader drops the 0-row .npy but not the parquet, pairs the next shard's rows with the empty
    table and fails; the check reports that as failed instead of crashing the benchmark."""
    make_store(tmp_path, [12, 0, 10], dim=8)
    for field in ("img_emb", "text_emb"):
        np.save(store.field_path(tmp_path, field, "00001"), np.zeros((0, 8), np.float16))
    pq.write_table(
        pa.table({"key": pa.array([], pa.string()), "caption": pa.array([], pa.string())}),
        store.field_path(tmp_path, "metadata", "00001"),
    )
    checks = check_embedding_reader(tmp_path)
    assert [c["passed"] for c in checks] == [False, False]
    assert all(c["details"].startswith("embedding-reader raised ValueError") for c in checks)


def test_scale_store_is_a_valid_store(tmp_path):
    root = random_store(tmp_path / "scale", shards=2, rows=50, dim=16)
    assert store.shard_rows(root) == [("00000", 50), ("00001", 50)]
    emb = store.open_array(root, "img_emb", "00001")
    assert emb.shape == (50, 16) and emb.dtype == np.float16
    assert np.allclose(np.linalg.norm(emb.astype(np.float32), axis=1), 1.0, atol=2e-3)
    assert [c["passed"] for c in check_embedding_reader(root)] == [True, True]
    mtime = (root / "scale.json").stat().st_mtime_ns
    assert random_store(tmp_path / "scale", shards=2, rows=50, dim=16) == root  # reused as is
    assert (root / "scale.json").stat().st_mtime_ns == mtime


def test_our_prior_worker_times_real_steps():
    overrides = {"emb_dim": 16, "dim": 32, "depth": 1, "heads": 2, "head_dim": 16}
    r = prior_worker({"batch": 4, "warmup": 1, "steps": 3, "seed": 0, "overrides": overrides})
    assert len(r["step_seconds"]) == 3 and len(r["losses"]) == 4
    assert all(math.isfinite(x) for x in r["losses"])
    assert r["samples_per_s"] == pytest.approx(4 / np.median(r["step_seconds"]))
    assert r["peak_rss_mb"] > 0 and r["params"] > 0
    assert r["config"]["text_enc_dim"] == 0 and r["config"]["dim"] == 32


def test_run_without_anchor_venv_reports_what_it_could(root, tmp_path):
    cfg = AnchorsConfig(
        out=str(tmp_path / "out"),
        work=str(tmp_path / "work"),
        anchors_python=str(tmp_path / "no-venv" / "python"),
        parts="stream,interop",
        store=str(root),
        stream_batch=16,
        stream_epochs=2,
        stream_repeats=2,
        scale_shards=2,
        scale_rows_per_shard=64,
    )
    report = run(cfg)
    assert report["exit_code"] == 1  # the dalle2-pytorch loader check needs .venv-anchors
    assert [f["part"] for f in report["failures"]] == ["interop: dalle2-pytorch loader"]
    assert "not found" in report["failures"][0]["error"]
    names = [c["name"] for c in report["comparisons"]]
    assert names == ["stream vs EmbeddingReader", "stream vs EmbeddingReader, larger store"]
    assert [c["passed"] for c in report["checks"]] == [True, True]

    saved = json.loads((tmp_path / "out" / "anchors.json").read_text())
    assert saved["machine"]["cpu_count"] >= 1 and saved["date"] and saved["commit"]
    assert saved["comparisons"][0]["ratio"]["median"] == report["comparisons"][0]["ratio"]["median"]
    assert saved["comparisons"][1]["ours"]["values"] and saved["comparisons"][1]["repeats"] == 2
    md = (tmp_path / "out" / "anchors.md").read_text()
    assert "| stream vs EmbeddingReader |" in md and "| embedding-reader parquet_npy reads img_emb/" in md
    assert "Could not run:" in md


def _cli(capsys, argv: list[str]) -> tuple[int, str, str]:
    from jobs.cli import main

    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own refusals and --help
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_help_lists_every_setting(capsys):
    code, out, _ = _cli(capsys, ["bench-anchors", "--help"])
    assert code == 0
    for f in dataclasses.fields(AnchorsConfig):
        assert "--" + f.name.replace("_", "-") in out


@pytest.mark.parametrize(
    "argv, want",
    [
        (["--repeats", "two"], "argument --repeats: invalid int value: 'two'"),
        (
            ["--parts", "stream,bogus"],
            "error: unknown part(s) bogus; valid: embed, stream, prior, decoder, interop",
        ),
    ],
)
def test_cli_bad_input_is_one_line_exit_2_and_nothing_is_written(argv, want, capsys, tmp_path):
    dirs = ["--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")]
    code, _, err = _cli(capsys, ["bench-anchors", *argv, *dirs])
    lines = [ln for ln in err.splitlines() if ln.startswith("unclip bench-anchors:")]
    assert code == 2 and "Traceback" not in err, err
    assert len(lines) == 1 and want in lines[0], err
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()


def test_cli_flags_map_onto_the_config():
    from jobs.cli import build_parser
    from jobs.config import build_config

    argv = ["bench-anchors", "--stream-epochs", "3", "--anchors-python", "py", "--parts", "stream"]
    cfg = build_config(AnchorsConfig, build_parser(argv).parse_args(argv))
    assert (cfg.stream_epochs, cfg.anchors_python, cfg.parts, cfg.repeats) == (3, "py", "stream", 2)


def test_a_side_past_its_timeout_is_killed_with_its_children(tmp_path):
    from jobs.bench.harness import measure

    child = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match="exited -9"):
        measure([sys.executable, "-c", child], what="sleeper", log=tmp_path / "sleeper.log", timeout=1)
    assert time.perf_counter() - t0 < 30  # the grandchild held stdout open: it was killed too
    assert "killed after 1 s" in (tmp_path / "sleeper.log").read_text()


def test_our_prior_side_runs_in_its_own_process(tmp_path):
    """The way `bench-anchors` runs our side: `python -m jobs.bench.worker`, its JSON and the load average."""
    from jobs.bench.harness import probe_cmd, side_json

    overrides = {"emb_dim": 16, "dim": 32, "depth": 1, "heads": 2, "head_dim": 16}
    args = {"batch": 4, "warmup": 1, "steps": 2, "seed": 0, "overrides": overrides}
    r = side_json(probe_cmd(prior_worker, args=args), tmp_path / "prior.log", "our prior step")
    assert len(r["step_seconds"]) == 2 and r["params"] > 0 and r["load_avg_1m_after"] >= 0
    assert (tmp_path / "prior.log").read_text().startswith("$ ")
