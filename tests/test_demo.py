"""The whole demo, small: every stage through `jobs.demo`; the prior learns the caption -> image mapping and the
decoder's pictures show the captions' colours far above chance."""

import json

import pytest

from jobs.demo import DemoConfig, run

DEMO_SLOW = dict(
    n=1200,
    samples_per_shard=300,
    clip_steps=200,
    prior_steps=1000,
    decoder_steps=500,
    base_steps=500,
    eval_samples=64,
)


@pytest.mark.slow
def test_demo_end_to_end_prior_beats_baselines(tmp_path, caplog):
    with caplog.at_level("WARNING"):
        r = run(DemoConfig(out=str(tmp_path / "demo"), **DEMO_SLOW))
    assert "--resume: no checkpoint" not in caplog.text  # a fresh run warned so at each training stage
    tmp_path = tmp_path / "demo"
    assert r["download"]["successes"] == 1200 and r["download"]["complete"]
    assert r["validate"]["ok"] and r["embed"]["rows"] == 1200
    m = r["eval_prior"]
    assert m["top1_pred"] > 10 * m["retrieval_chance_top1"]
    # The prediction is closer to the true image embedding than the caption's own text embedding is. Top-1 is not
    # compared: this CLIP's text and image embeddings are already at cos ~0.94, and both retrieve 58-59 of 63.
    assert m["sim_pred_image"] > m["sim_text_image_baseline"] + 0.01  # measured 0.961 vs 0.940
    assert m["sim_pred_image"] > m["sim_mean_image_predictor"] + 0.2
    a = r["eval_decoder"]["attributes"]
    for path in ("reconstruction", "text_to_image"):
        assert a[path]["background_accuracy"] > 2 * a[path]["background_chance"]
        assert a[path]["shape_color_anywhere_accuracy"] > 2 * a[path]["shape_color_anywhere_chance"]
        n1, n2 = a[path]["images_one_shape"], a[path]["images_two_shapes"]
        assert n1 > 10 and n2 > 10 and n1 + n2 == a[path]["images"]
        # Colour at the stated position is not asserted: at 500 decoder steps placement is at chance (0.13 vs
        # 0.14 measured); the full demo reports it.
    for name in ("samples.png", "reconstructions.png", "summary.json", "loss_prior.png", "loss_decoder.png"):
        assert (tmp_path / name).stat().st_size > 500
    # Where the time went: every stage timed once, the stages within the whole demo's wall time.
    st = r["stage_seconds"]
    assert list(st) == [
        "demo_data",
        "download",
        "demo_clip",
        "embed",
        "validate",
        "train_prior",
        "eval_prior",
        "train_decoder",
        "train_base",
        "sample",
        "eval_decoder",
    ]
    assert all(v > 0 for v in st.values()) and sum(st.values()) <= r["seconds"] + 0.5
    summary = json.loads((tmp_path / "summary.json").read_text())["summary"]
    assert summary["seconds_train_decoder"] == st["train_decoder"]

    # The demo folder moved: the rerun finds every stage done (its CLIP is known by content, not by the path the
    # store recorded) and samples from the moved CLIP
    moved = tmp_path.with_name("moved")
    tmp_path.rename(moved)
    caplog.clear()
    with caplog.at_level("WARNING"):
        again = run(DemoConfig(out=str(moved), **DEMO_SLOW))
    assert "nothing to train" not in caplog.text  # a finished stage is news, not a warning
    assert again["embed"]["rows_this_run"] == 0 and again["embed"]["rows"] == 1200
    assert again["train_prior"]["start_step"] == 1000 and again["train_decoder"]["start_step"] == 500
    assert (moved / "samples.png").stat().st_size > 500


def test_summary_table_names_a_missing_score_instead_of_printing_none():
    from jobs.demo import format_summary

    table = format_summary(
        {"reconstruction_shape_color_two_shapes": None, "prior_top1_retrieval": 0.94643, "n": 3}
    )
    lines = table.splitlines()
    assert lines[0] == "[demo] summary (also in summary.json)"
    assert lines[1].split() == ["reconstruction_shape_color_two_shapes", "-", "(no", "such", "samples)"]
    assert lines[2].split() == ["prior_top1_retrieval", "0.946"]
    assert lines[3].split() == ["n", "3"]
    assert "None" not in table


def test_a_rerun_that_finds_a_stage_trained_says_so_instead_of_a_nan_loss():
    from jobs.demo import _trained

    fresh = {"steps": 1000, "start_step": 0, "final_loss": 0.01234, "samples_per_s": 210.5, "ckpt": "d/ckpt"}
    assert _trained("train-decoder", fresh) == "train-decoder: final loss 0.0123, 210.5 samples/s"
    rerun = {**fresh, "start_step": 1000, "final_loss": float("nan"), "samples_per_s": None}
    assert (
        _trained("train-decoder", rerun)
        == "train-decoder: already trained to step 1000 (checkpoint in d/ckpt)"
    )


def test_a_rerun_with_other_settings_is_refused_before_any_stage(tmp_path):
    """Stages resume from what exists: a rerun with --seed 1 downloaded the new seed's scenes beside the old
    ones' shards, and --clip-steps was ignored once a demo CLIP existed. Now named, and nothing runs."""
    from jobs.demo import SETTINGS, check_settings
    from pipeline.errors import UsageError

    check_settings(DemoConfig(out=str(tmp_path / "d"), n=100))
    assert json.loads((tmp_path / "d" / SETTINGS).read_text())["n"] == 100
    check_settings(DemoConfig(out=str(tmp_path / "d"), n=100))  # the same: continues
    with pytest.raises(
        UsageError, match="holds a demo run with --clip-steps 800, --seed 0; rerun with those"
    ):
        check_settings(DemoConfig(out=str(tmp_path / "d"), n=100, seed=1, clip_steps=5))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    with pytest.raises(UsageError, match="is not empty and is not a demo folder"):
        check_settings(DemoConfig(out=str(tmp_path / "mine")))
    (tmp_path / "killed").mkdir()  # a first run killed while it wrote its settings: the same command goes on
    (tmp_path / "killed" / f".{SETTINGS}.tmp4623").write_text('{"n": ')
    check_settings(DemoConfig(out=str(tmp_path / "killed"), n=100))
    assert json.loads((tmp_path / "killed" / SETTINGS).read_text())["n"] == 100


@pytest.mark.parametrize("code, raised", [(1, "StageError"), (130, "KeyboardInterrupt")])
def test_a_stage_that_reports_a_failure_stops_the_demo(tmp_path, monkeypatch, code, raised):
    """download/embed/validate report failure by exit_code, not by raising: the demo went on to train on a
    cut download and exited 0."""
    from jobs import demo, demo_clip
    from pipeline.errors import StageError

    monkeypatch.setattr(demo.demo_data, "run", lambda cfg: None)
    monkeypatch.setattr(demo, "served_urls", lambda *a: tmp_path / "urls.parquet")
    report = {"complete": False, "exit_code": code, "successes": 3, "failed": 1}
    monkeypatch.setattr(demo.download, "run", lambda cfg: report)
    monkeypatch.setattr(demo, "print_download_summary", lambda s: None)
    monkeypatch.setattr(demo_clip, "run", lambda cfg: pytest.fail("the demo went on past a failed download"))
    (tmp_path / "data").mkdir()
    with pytest.raises({"StageError": StageError, "KeyboardInterrupt": KeyboardInterrupt}[raised]):
        run(DemoConfig(out=str(tmp_path)))


@pytest.mark.parametrize(
    "flag, value, said",
    [
        ("--n", "0", "--n must be >= 1 (got 0)"),
        ("--samples-per-shard", "0", "--samples-per-shard must be >= 1 (got 0)"),
        ("--clip-steps", "0", "--clip-steps must be >= 1 (got 0)"),  # was an UnboundLocalError traceback
        ("--prior-steps", "0", "--prior-steps must be >= 1 (got 0)"),  # was "--steps must be >= 1" at stage 5
        ("--decoder-batch-size", "0", "--decoder-batch-size must be >= 1 (got 0)"),
        ("--eval-samples", "0", "--eval-samples must be >= 1 (got 0)"),  # was refused after the whole demo
        ("--base-steps", "-1", "--base-steps must be >= 0 (got -1)"),
        ("--strength", "2", "--strength must be in (0, 1]"),
        ("--size", "8", "--size must be between 16 and 4096 pixels (got 8)"),
        ("--decoder-guidance", "-1", "--decoder-guidance must be >= 0"),
    ],
)
def test_a_bad_value_is_refused_before_anything_is_written(tmp_path, capsys, flag, value, said):
    """Each was checked by its own stage when reached: after demo_settings.json had kept it (so the corrected
    rerun was refused as "another demo run"), some after every stage before them had run."""
    from jobs.cli import main

    assert main(["demo", "--out", str(tmp_path / "d"), flag, value]) == 2
    err = capsys.readouterr().err.strip()
    assert said in err and "\n" not in err, err
    assert not (tmp_path / "d").exists()
