"""`unclip bench --quick`: every stage's measurement runs at tiny sizes and the report holds real numbers."""

import json
import math
import statistics

import pytest

from jobs.bench.main import BenchConfig, markdown, run


@pytest.mark.slow  # ~10 s: a benchmark smoke test (the decoder's own tests are in the default suite)
def test_bench_decoder_stage_quick(tmp_path):
    run(BenchConfig(out=str(tmp_path), repeats=1, quick=True, stages="decoder"))
    r = json.loads((tmp_path / "results.json").read_text())["results"]
    assert r["decoder_train"]["median"] > 0 and r["decoder_train"]["batch"] == 32
    assert {"ddim_2", "dpm++_2"} <= set(r["decoder_sample"]) and r["decoder_sample"]["images"] == 36
    assert all(r["decoder_sample"][k] > 0 for k in ("ddim_2", "dpm++_2", "two_stage_dpm++_2"))
    assert "| decoder_train |" in (tmp_path / "results.md").read_text()


@pytest.mark.slow  # ~160 s: every stage, img2dataset and dask start-ups included
def test_bench_quick_writes_ratios_and_table(tmp_path):
    run(BenchConfig(out=str(tmp_path), repeats=1, quick=True))
    report = json.loads((tmp_path / "results.json").read_text())
    r = report["results"]
    for name in ("download_overhead", "embed_vs_forward", "embed_in_tasks_vs_forward", "stream_vs_mmap"):
        # The in-task figure pairs each of the 8 shards with a forward on its captions (one per shard).
        n = 8 if name == "embed_in_tasks_vs_forward" else 1
        assert (
            r[name]["repeats"] == n and r[name]["ratio_median"] > 0 and math.isfinite(r[name]["ratio_median"])
        )
        assert r[name]["ratio_median"] == statistics.median(
            a / b for a, b in zip(r[name]["ours"], r[name]["theirs"], strict=True)
        )
        op, bound = r[name]["target"].split()
        want = (
            r[name]["ratio_median"] <= float(bound) if op == "<=" else r[name]["ratio_median"] >= float(bound)
        )
        assert r[name]["met"] is want  # the verdict follows from the measured ratio and the stated target
    assert r["prior_train"]["median"] > 0 and r["prior_sample"]["median"] > 0
    assert set(r["prior_peak_rss_mb"]) == {"1x", "2x"} and all(
        v > 50 for v in r["prior_peak_rss_mb"].values()
    )
    assert set(r["embed_peak_rss"]["doubling_unclip_tiny_mb"]) == {"2_shards", "4_shards"}
    lb = r["embed_launch_bound_inline_vs_thread"]  # both ways measured, each with its phases
    assert lb["repeats"] == 1 and lb["ours"][0] > 0 and lb["theirs"][0] > 0
    assert lb["phases_inline"]["models"] > 0 and lb["phases_thread"]["models"] > 0
    ra = r["embed_read_ahead_on_vs_off"]  # 2 shards on one worker: the second one at least was copied ahead
    assert ra["repeats"] == 1 and ra["ours"][0] > 0 and ra["theirs"][0] > 0
    assert ra["read_ahead_on"].get("copy", 0) >= 1 and sum(ra["read_ahead_on"].values()) == 2
    table = (tmp_path / "results.md").read_text()
    assert table == markdown(report) and "| stream_vs_mmap |" in table and report["commit"] in table


@pytest.mark.parametrize("value, want", [(["false"], False), (["no"], False), (["true"], True), ([], True)])
def test_quick_flag_parses_like_every_boolean_flag(value, want):
    from jobs.cli import build_parser
    from jobs.config import build_config

    argv = ["bench", "--quick", *value, "--stages", "stream"]
    cfg = build_config(BenchConfig, build_parser(argv).parse_args(argv))
    assert cfg.quick is want and cfg.stages == "stream"


def test_unknown_stage_is_one_line_exit_2_before_anything_runs(tmp_path, capsys):
    from jobs.cli import main

    code = main(["bench", "--out", str(tmp_path / "out"), "--stages", "stream,bogus"])
    err = capsys.readouterr().err
    assert code == 2 and err.strip() == (
        "unclip bench: error: unknown bench stage 'bogus'; valid: download, embed, embed_gpu, stream, prior, decoder"
    )
    assert not (tmp_path / "out").exists()
    assert main(["bench", "--out", str(tmp_path / "out"), "--stages", "stream", "--repeats", "0"]) == 2
    assert capsys.readouterr().err.strip() == "unclip bench: error: --repeats must be >= 1 (got 0)"
    assert not (tmp_path / "out").exists()


def test_gpu_embed_stage_says_it_was_skipped_without_a_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the stage measures instead (make bench)")
    run(BenchConfig(out=str(tmp_path), repeats=1, quick=True, stages="embed_gpu"))
    r = json.loads((tmp_path / "results.json").read_text())["results"]
    assert r == {"embed_gpu": {"skipped": "no CUDA device visible", "unit": "GPU embed figures need a GPU"}}
    assert "| embed_gpu | skipped no CUDA device visible |" in (tmp_path / "results.md").read_text()


def test_a_timed_out_command_takes_the_sessions_it_started_with_it(tmp_path):
    # The device check runs `unclip bench`, whose measurements start in sessions of their own; on a timeout they
    # must go too (they would hold the GPU, and the pipe they inherit kept measure() waiting for them).
    import sys
    import time

    import psutil

    from jobs.bench.harness import measure

    pid_file = tmp_path / "grandchild.pid"
    cmd = [
        sys.executable,
        "-c",
        "import subprocess, sys, time; "
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], start_new_session=True); "
        f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)",
    ]
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match="exited -9"):
        measure(cmd, timeout=1.5)
    assert time.perf_counter() - t0 < 10
    time.sleep(0.3)
    try:
        alive = psutil.Process(int(pid_file.read_text())).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        alive = False
    assert not alive


def test_gpu_embed_rows_are_assembled_from_both_decode_paths_and_one_forward(tmp_path, monkeypatch):
    # The embed_gpu stage runs only where CUDA is: its bookkeeping is checked here with the measurements faked.
    from jobs.bench import embed_gpu

    calls = []

    def fake_embed(shards, out, clip, decode):
        calls.append((clip, decode))
        rate = {"device": 900.0, "pil": 300.0, "device_2_workers": 700.0, "device_4_workers": 500.0}.get(
            decode, 950.0
        )
        return {
            "rows": 8192,
            "samples_per_second_in_tasks": rate,
            # n workers at once: n times one task's rate
            "samples_per_second_all_tasks": {"device_2_workers": 2, "device_4_workers": 4}.get(decode, 1)
            * rate
            - (10 if "workers" not in decode else 0),
            "close_seconds": 28.0,
            "gpu_peak_mb": 1e3,
            "device_decode_fallbacks": 0,
        }, 20.0

    def fake_probe(fn, **kw):
        calls.append((kw["clip"], "forward"))
        return {"images_per_s": 1000.0, "gpu_peak_mb": 900.0}, None

    monkeypatch.setattr(embed_gpu, "gpu_name", lambda: "Fake H200")
    monkeypatch.setattr(embed_gpu, "write_jpeg_shards", lambda root, shards, per: root)
    monkeypatch.setattr(embed_gpu, "embed_run", fake_embed)
    monkeypatch.setattr(embed_gpu, "probe", fake_probe)
    r = embed_gpu.bench(BenchConfig(out=str(tmp_path), repeats=2), tmp_path)
    b32 = [
        ("ViT-B-32", d)
        for d in ("device", "pil", "device_2_workers", "device_4_workers", "device_compile", "forward")
    ] * 2
    l14 = [("ViT-L-14", d) for d in ("device", "forward")] * 2
    assert calls == b32 + l14
    dev, pil = (
        r["embed_gpu_ViT-L-14_device_in_tasks_vs_forward"],
        r["embed_gpu_ViT-B-32_pil_in_tasks_vs_forward"],
    )
    assert (
        dev["ratio_median"] == 0.9
        and dev["met"] is True
        and pil["ratio_median"] == 0.3
        and pil["met"] is False
    )
    assert "Fake H200" in dev["unit"] and "--image-decode pil" in pil["unit"]
    # two workers: their tasks' rate together (2 x 700), not one task's (700)
    two = r["embed_gpu_ViT-B-32_device_2_workers_in_tasks_vs_forward"]
    assert two["ratio_median"] == 1.4 and "--workers 2" in two["unit"] and "every worker" in two["unit"]
    assert r["embed_gpu_ViT-B-32_device_4_workers_in_tasks_vs_forward"]["ratio_median"] == 2.0
    assert "embed_gpu_ViT-L-14_device_2_workers_in_tasks_vs_forward" not in r
    e2e = r["embed_gpu_ViT-B-32_device_end_to_end"]
    assert e2e["ratio_median"] == 8192 / 20.0 / 1000.0 and e2e["device_decode_fallbacks"] == [0, 0]
    assert e2e["close_seconds"] == [28.0, 28.0] and e2e["samples_per_second_all_tasks"] == [890.0, 890.0]
    calls.clear()  # --gpu-clips: one model (the device check runs each in its own stage)
    r = embed_gpu.bench(BenchConfig(out=str(tmp_path), repeats=1, gpu_clips="ViT-L-14"), tmp_path)
    assert calls == [("ViT-L-14", "device"), ("ViT-L-14", "forward")]
    assert all(k.startswith("embed_gpu_ViT-L-14_") for k in r)
    calls.clear()  # --gpu-variants: some rows of a model
    r = embed_gpu.bench(
        BenchConfig(out=str(tmp_path), repeats=1, gpu_variants="device_compile,pil"), tmp_path
    )
    assert calls == [("ViT-B-32", "pil"), ("ViT-B-32", "device_compile"), ("ViT-B-32", "forward")]
    assert "--compile" in r["embed_gpu_ViT-B-32_device_compile_in_tasks_vs_forward"]["unit"]


def test_in_process_task_probe_measures_every_variant_against_one_forward(tmp_path):
    # the device check's embed_tasks stage, run here on CPU at tiny sizes: every variant's tasks are timed, the
    # warm-up round is left out, and each ratio is its median rate over the forward measured in the same process
    from jobs.bench.embed_gpu import TASK_VARIANTS, probe_tasks, write_jpeg_shards

    shards = write_jpeg_shards(tmp_path / "shards", shards=1, per=40, size=64)
    r = probe_tasks(
        ["unclip-tiny"], str(shards), str(tmp_path / "out"), device="cpu", per_round=1, rounds=2, batch=8
    )
    t = r["unclip-tiny"]
    assert len(t["forward_images_per_s"]) == 2
    forward = statistics.median(t["forward_images_per_s"])
    for v in TASK_VARIANTS:
        assert len(t[v]["images_per_s"]) == 2 and min(t[v]["images_per_s"]) > 0
        assert t[v]["vs_forward"] == round(statistics.median(t[v]["images_per_s"]) / forward, 3)
        assert set(t[v]["phases"]) == {"setup", "input_wait", "device_decode", "models", "write"}
    assert (
        t["device_inline"]["phases"]["device_decode"] > 0 and t["pil_thread"]["phases"]["device_decode"] == 0
    )


def test_jpeg_shards_are_made_again_for_other_sizes(tmp_path):
    """A folder made for a --quick run (2 x 64 JPEGs) was reused as it was for the real one (2 x 1,024), whose
    figures then came from 64 images and were reported as from 1,024."""
    import tarfile

    from jobs.bench.embed_gpu import write_jpeg_shards

    def samples(root):
        return sorted((t.name, len(tarfile.open(t).getnames()) // 3) for t in root.glob("*.tar"))

    root = write_jpeg_shards(tmp_path / "s", 1, 4, size=32)
    assert samples(root) == [("00000.tar", 4)]
    mtime = (root / "00000.tar").stat().st_mtime_ns
    assert write_jpeg_shards(root, 1, 4, size=32) == root and (root / "00000.tar").stat().st_mtime_ns == mtime
    write_jpeg_shards(root, 2, 6, size=32)
    assert samples(root) == [("00000.tar", 6), ("00001.tar", 6)]


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
def test_a_bench_ended_by_a_signal_takes_its_running_command_with_it(tmp_path, sig):
    """measure() starts each command in its own session; SIGTERM or SIGHUP (a lease's end, `timeout`) ended the
    bench alone and left the command running with no parent (an embed holding the lent GPU for minutes)."""
    import signal
    import subprocess
    import sys
    import time

    import psutil

    script = "import sys; from jobs.bench.harness import measure; measure([sys.executable, '-c', 'import time; time.sleep(120)'])"
    bench = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 60
        while not (kids := psutil.Process(bench.pid).children()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert kids, "the command never started"
        bench.send_signal(getattr(signal, sig))
        assert bench.wait(timeout=30) == 128 + getattr(signal, sig)
        gone, alive = psutil.wait_procs(kids, timeout=10)
        assert not alive
    finally:
        bench.kill()


def test_a_bench_whose_sighup_is_ignored_keeps_it_ignored(tmp_path):
    """Under nohup (SIGHUP ignored) a closed terminal must not end the bench: the handler was installed over
    the ignored disposition, and the bench and its command died with the terminal."""
    import signal
    import subprocess
    import sys
    import time

    import psutil

    script = (
        "import signal, sys; signal.signal(signal.SIGHUP, signal.SIG_IGN); from jobs.bench.harness import measure; "
        "measure([sys.executable, '-c', 'import time; time.sleep(3)']); print('finished')"
    )
    bench = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not psutil.Process(bench.pid).children() and time.monotonic() < deadline:
            time.sleep(0.1)
        bench.send_signal(signal.SIGHUP)
        out, _ = bench.communicate(timeout=60)
        assert bench.returncode == 0 and "finished" in out
    finally:
        bench.kill()
