"""`unclip device-check`: the one-run script for a lent GPU. Here (no GPU) its bookkeeping is tested, and in
the slow suite a dry run of every stage on the CPU at tiny sizes."""

import dataclasses
import json
import sys

import pytest

from jobs.bench import device_check
from jobs.bench.device_check import DeviceCheckConfig, run
from jobs.cli import main
from pipeline.errors import UsageError


def test_a_failing_stage_is_recorded_and_the_next_still_runs(tmp_path, monkeypatch):
    ran = []

    def broken(c):
        ran.append("broken")
        raise RuntimeError("unclip embed exited 1: CUDA error: out of memory")

    def fine(c):
        ran.append("fine")
        return {"samples_per_s": 123.0}

    monkeypatch.setitem(device_check.STAGES, "embed", broken)
    monkeypatch.setitem(device_check.STAGES, "sample", fine)
    status = run(
        DeviceCheckConfig(out=str(tmp_path), device="cpu", stages="embed,sample", work=str(tmp_path))
    )
    # a failed stage fails the check (exit 1): it exited 0 for the lease's tool and CI whatever failed
    assert ran == ["broken", "fine"] and status == {"embed": "failed", "sample": "ok", "exit_code": 1}
    report = json.loads((tmp_path / "device_check.json").read_text())
    assert (
        report["stages"]["embed"]["error"] == "RuntimeError: unclip embed exited 1: CUDA error: out of memory"
    )
    assert report["stages"]["sample"]["samples_per_s"] == 123.0
    md = (tmp_path / "device_check.md").read_text()
    assert "| embed | failed |" in md and "| sample | ok |" in md


def test_stages_past_the_budget_are_skipped_not_started(tmp_path):
    # budget 5 s: a stage that would start a command (under 10 s left) is recorded as skipped
    cfg = DeviceCheckConfig(out=str(tmp_path), device="cpu", stages="env,train_prior", budget_s=5)
    status = run(dataclasses.replace(cfg, work=str(tmp_path / "work")))
    assert status == {"env": "ok", "train_prior": "skipped", "exit_code": 0}  # a skip is no failure
    report = json.loads((tmp_path / "device_check.json").read_text())
    assert report["stages"]["train_prior"]["error"] == "out of budget: command not started"
    assert report["env"]["device_name"] is None and report["env"]["torch"]


def test_a_command_cut_short_is_timed_out_with_its_log_kept(tmp_path, monkeypatch):
    def slow(c):
        c.run(
            [sys.executable, "-c", "import sys, time; print('started', file=sys.stderr); time.sleep(30)"], 1.5
        )
        return {}

    monkeypatch.setitem(device_check.STAGES, "embed", slow)
    cfg = DeviceCheckConfig(out=str(tmp_path), device="cpu", stages="embed", work=str(tmp_path / "w"))
    assert run(cfg) == {"embed": "timed_out", "exit_code": 1}
    report = json.loads((tmp_path / "device_check.json").read_text())
    assert report["stages"]["embed"]["error"].startswith("cut short after 2 s")
    assert "started" in (tmp_path / "log.txt").read_text()  # a failed command's log reaches log.txt too
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "device_check.json",
        "device_check.md",
        "log.txt",
        "w",
    ]


def test_the_cli_report_is_found_past_other_output():
    out = 'progress\n{\n  "rows": 3,\n  "nested": {\n    "a": 1\n  }\n}\ntrailing line\n'
    assert device_check._last_report(out) == {"rows": 3, "nested": {"a": 1}}
    assert device_check._last_report("no report here\n") == {}


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(UsageError, match="unknown device-check stage.*warp.*valid: env, embed"):
        run(DeviceCheckConfig(out=str(tmp_path), device="cpu", stages="env,warp"))
    assert main(["device-check", "--out", str(tmp_path / "x"), "--device", "tpu"]) == 2
    assert "valid: cuda, cpu" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # nothing written for bad input
    # ",," ran every stage; a budget of 0 or less ran none and said ok
    assert main(["device-check", "--out", str(tmp_path / "x"), "--device", "cpu", "--stages", ",,"]) == 2
    assert "--stages ',,' names no stage; valid: env, embed" in capsys.readouterr().err
    assert main(["device-check", "--out", str(tmp_path / "x"), "--device", "cpu", "--budget-s", "-5"]) == 2
    assert "--budget-s must be a number of seconds > 0 (got -5.0)" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.slow  # ~3 min: every stage's commands at tiny sizes on the CPU
def test_dry_run_of_every_stage_on_cpu(tmp_path):
    cfg = DeviceCheckConfig(out=str(tmp_path / "out"), device="cpu", quick=True, budget_s=900)
    status = run(dataclasses.replace(cfg, work=str(tmp_path / "work")))
    tmp_path = tmp_path / "out"
    assert status.pop("exit_code") == 0 and set(status.values()) == {"ok"}, status
    r = json.loads((tmp_path / "device_check.json").read_text())["stages"]
    assert r["embed"]["rows"] == 128 and r["embed"]["errors"] == 0 and r["embed_vae"]["rows"] == 128
    # the store's CLIP probe, taken by the run's worker, against the same model's taken here
    assert (
        r["embed"]["probe_cos_cpu_vs_cpu_image"] >= 0.9999
        and r["embed"]["probe_cos_cpu_vs_cpu_text"] >= 0.9999
    )
    # the odd samples: PIL's rows and error rows on the device path too; the cut and the garbage JPEG fell back
    assert r["decode_rules"]["rows"] == 10 and r["decode_rules"]["error_rows"] == 2
    assert (
        r["decode_rules"]["device_decode_fallbacks"] == 2
        and r["decode_rules"]["min_cos_device_vs_pil"] >= 0.999
    )
    assert r["train_prior"]["final_loss"] < r["train_prior"]["loss_at_first_log"]
    assert r["resume"]["identical"] is True  # on the CPU, 10 + 10 steps == 20 byte for byte
    assert r["sample"]["images"] == 8 and (tmp_path / "samples.png").stat().st_size > 0
    assert r["train_base"]["steps"] == 20 and r["sample"]["two_stage"]["images"] == 8
    assert (tmp_path / "samples_two_stage.png").stat().st_size > 0
    assert r["bench_embed_gpu"]["embed_gpu"]["skipped"] == "no CUDA device visible"
    for stage in ("embed_tasks", "embed_tasks_l14"):  # in one process: each variant against the forward
        assert r[stage]["device_inline"]["vs_forward"] > 0 and r[stage]["pil_thread"]["vs_forward"] > 0
    assert r["bench_embed_gpu_l14"]["embed_gpu"]["skipped"] == "no CUDA device visible"
    # where embed's time went, for the GPU run to show: every phase of the shard tasks, start-up and close
    assert set(r["embed"]["task_phase_seconds"]) == {
        "setup",
        "input_wait",
        "device_decode",
        "models",
        "write",
    }
    assert r["embed"]["startup_seconds"] > 0 and r["embed"]["close_seconds"] >= 0
    exits = {k: v for k, v in r["exit_probe"].items() if k.startswith("exit_s_")}
    assert set(exits) == {"exit_s_after_cuda_only", "exit_s_after_decode_jpeg"}
    assert all(0 <= v < 60 for v in exits.values()), exits


def test_decode_rules_stage_on_cpu(tmp_path):
    # the stage's own measurement, in process: what it will check on the GPU, seen to pass on the CPU
    from jobs.bench.decode_rules import decode_rules_probe, write_rules_shard

    tar = write_rules_shard(tmp_path / "rules" / "00000.tar")
    r = decode_rules_probe(str(tar), "unclip-tiny", "cpu")
    assert r["rows"] == 10 and r["same_rows"] and r["same_error_rows"] and r["error_rows"] == 2
    assert r["device_decode_fallbacks"] == 2 and r["min_cos_device_vs_pil"] >= 0.999
    assert any("Truncated" in reason for reason in r["error_reasons"])
