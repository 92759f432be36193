"""train-prior / eval-prior: exact resume, strict checkpoints, divergence, learning, two-process gloo."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from jobs import checkpoint, train_loop
from jobs.cli import main as cli
from jobs.eval_prior import EvalPriorConfig
from jobs.eval_prior import run as eval_run
from jobs.train_prior import TrainPriorConfig, main
from models.prior import DiffusionPrior
from pipeline.errors import StageError, UsageError
from tests.synthetic_store import make_store


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    make_store(root, [300, 0, 250, 300], dim=32, n_classes=48, text_enc_width=16)
    return str(root)


TORCHRUN2 = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"]


def cfg_for(data, out, **kw):
    base = dict(
        data=data,
        out=str(out),
        batch_size=32,
        steps=20,
        eval_every=0,
        save_every=10,
        log_every=5,
        warmup_steps=5,
        val_fraction=0.1,
    )
    return TrainPriorConfig(**{**base, **kw})


def weights(folder):
    return {n: (folder / n).read_bytes() for n in ("model.safetensors", "ema.safetensors")}


@pytest.mark.parametrize("text_encodings", [False, True])
def test_resume_is_exact(data, tmp_path, text_encodings):
    # An evaluation at the checkpoint (step 10) and after it must not perturb the run.
    kw = dict(text_encodings=text_encodings, eval_every=10, eval_samples=16, sample_steps=2)
    main(cfg_for(data, tmp_path / "straight", **kw))
    main(cfg_for(data, tmp_path / "resumed", stop_after=10, **kw))
    report = main(cfg_for(data, tmp_path / "resumed", resume=True, **kw))
    assert report["start_step"] == 10
    a = weights(tmp_path / "straight/ckpt/step_00000020")
    b = weights(tmp_path / "resumed/ckpt/step_00000020")
    assert a == b
    assert a != weights(tmp_path / "straight/ckpt/step_00000010")
    assert (tmp_path / "straight/loss.png").stat().st_size > 1000
    meta = checkpoint.read_meta(tmp_path / "straight/ckpt/step_00000020")
    assert meta["step"] == 20 and meta["config"]["text_encodings"] == text_encodings
    assert meta["version"]["checkpoint_format"] == checkpoint.CHECKPOINT_FORMAT


def test_the_ema_is_the_mean_of_every_steps_weights_until_its_window_is_full():
    """It used to start from the initial weights: 0.999^N of the random init stayed in what sampling and every
    evaluation use (0.14 after the default 2,000 steps)."""
    from jobs.train_loop import _ema_update, ema_decay_at

    g = torch.Generator().manual_seed(0)
    steps = [torch.randn(5, generator=g) for _ in range(12)]  # the weights after each step
    ema, net = torch.nn.Linear(5, 1, bias=False), torch.nn.Linear(5, 1, bias=False)
    ema.weight.data.fill_(100.0)  # the initial weights: no share of them may stay
    plain = ema.weight.detach().clone()
    for i, w in enumerate(steps):
        net.weight.data.copy_(w)
        _ema_update(ema, net, ema_decay_at(i, 0.75, True))
        plain = 0.75 * plain + 0.25 * w
        if i < 4:  # window 1 / (1 - 0.75) = 4 steps: the plain mean so far
            assert torch.allclose(ema.weight[0], torch.stack(steps[: i + 1]).mean(0), atol=1e-6)
    assert [ema_decay_at(i, 0.75, True) for i in range(6)] == [0.0, 0.5, 2 / 3, 0.75, 0.75, 0.75]
    assert ema_decay_at(0, 0.75, False) == 0.75
    expect = torch.stack(steps[:4]).mean(0)  # past the window, the usual recursion from that mean
    for w in steps[4:]:
        expect = 0.75 * expect + 0.25 * w
    assert torch.allclose(ema.weight[0], expect, atol=1e-5)
    assert not torch.allclose(plain[0], expect, atol=0.5)  # without the warmup: 0.75^12 of the init's 100


def test_a_checkpoint_from_before_ema_warmup_resumes_as_it_ran(data, tmp_path):
    """A run checkpointed by a version without --ema-warmup had no warmup: it resumes without one, to the same
    weights as if it had not stopped (the setting's new default would change its EMA mid-run)."""
    main(cfg_for(data, tmp_path / "straight", ema_warmup=False))
    main(cfg_for(data, tmp_path / "resumed", stop_after=10, ema_warmup=False))
    main(cfg_for(data, tmp_path / "warm"))
    meta_path = tmp_path / "resumed/ckpt/step_00000010/meta.json"  # as the older version wrote it
    meta = json.loads(meta_path.read_text())
    del meta["config"]["ema_warmup"]
    meta_path.write_text(json.dumps(meta))
    main(cfg_for(data, tmp_path / "resumed", resume=True))  # the new default, as a rerun of the command gives
    ema = "ema.safetensors"
    straight, resumed = (tmp_path / f"{r}/ckpt/step_00000020/{ema}" for r in ("straight", "resumed"))
    assert straight.read_bytes() == resumed.read_bytes()
    assert (tmp_path / f"warm/ckpt/step_00000020/{ema}").read_bytes() != straight.read_bytes()
    assert checkpoint.read_meta(tmp_path / "resumed/ckpt/step_00000020")["config"]["ema_warmup"] is False


def test_only_the_newest_checkpoints_are_kept(data, tmp_path, capsys):
    """Every checkpoint was kept: 400 of ~1.3 GB for a b32 decoder's 200k steps at the default --save-every."""
    main(cfg_for(data, tmp_path / "two", save_every=5, keep_checkpoints=2, stop_after=15))
    assert sorted(p.name for p in (tmp_path / "two/ckpt").iterdir()) == [
        "latest",
        "step_00000010",
        "step_00000015",
    ]
    report = main(cfg_for(data, tmp_path / "two", save_every=5, keep_checkpoints=2, resume=True))
    assert report["start_step"] == 15
    assert sorted(p.name for p in (tmp_path / "two/ckpt").iterdir()) == [
        "latest",
        "step_00000015",
        "step_00000020",
    ]
    main(cfg_for(data, tmp_path / "all", save_every=5, keep_checkpoints=0))
    assert len(list((tmp_path / "all/ckpt").glob("step_*"))) == 4
    # the kept ones are the same run's: the weights at 20 are an uninterrupted run's
    assert weights(tmp_path / "two/ckpt/step_00000020") == weights(tmp_path / "all/ckpt/step_00000020")
    assert cli(["train-prior", "--data", data, "--out", str(tmp_path / "x"), "--keep-checkpoints", "-1"]) == 2
    assert "--keep-checkpoints must be >= 0 (0 = keep every checkpoint)" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_a_checkpoint_from_before_stores_recorded_their_clip_digest_resumes_on_one_that_has_it(
    data, tmp_path
):
    """An adopt rerun adds the CLIP file's sha256 to an adopted folder's manifest: the checkpoint trained on it
    before was refused as another store's. A digest both record must still agree."""
    store_copy = tmp_path / "store"
    shutil.copytree(data, store_copy)
    main(cfg_for(str(store_copy), tmp_path / "run", stop_after=10))
    manifest_path = store_copy / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["clip"]["sha256"] = "ab" * 32
    manifest_path.write_text(json.dumps(manifest))
    main(cfg_for(str(store_copy), tmp_path / "run", stop_after=15, resume=True))  # was refused
    manifest["clip"]["sha256"] = "cd" * 32  # another file than the checkpoint's (step 15 recorded "ab...")
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(UsageError, match="is not the store this run was trained on"):
        main(cfg_for(str(store_copy), tmp_path / "run", resume=True))


def test_a_resume_compares_the_stores_clip_probe_by_what_the_model_embeds(data, tmp_path):
    """The next embed run of a store made before the probe adds one to its manifest: a checkpoint trained on it
    before must resume. One taken again of the same model (its last bits differ) must too; another model's
    under the same name must not."""
    import base64

    from pipeline.encoders import clip_probe, load_clip

    ours, other = (clip_probe(load_clip("unclip-tiny", "none", "cpu", s)) for s in (0, 1))
    store_copy, manifest_path = tmp_path / "store", tmp_path / "store" / "manifest.json"
    shutil.copytree(data, store_copy)

    def set_probe(probe):
        manifest = json.loads(manifest_path.read_text())
        manifest["clip"]["probe"] = probe
        manifest_path.write_text(json.dumps(manifest))

    main(cfg_for(str(store_copy), tmp_path / "run", stop_after=10))
    set_probe(ours)
    main(cfg_for(str(store_copy), tmp_path / "run", stop_after=15, resume=True))  # was refused
    noisy = np.frombuffer(base64.b64decode(ours["image"]), "<f2").copy()
    noisy[::7] += np.float16(1e-3)  # the same model's probe taken on another device
    set_probe({**ours, "image": base64.b64encode(noisy.tobytes()).decode(), "device": "cuda"})
    main(cfg_for(str(store_copy), tmp_path / "run", stop_after=20, resume=True))
    set_probe(other)
    with pytest.raises(
        UsageError, match="was embedded by another CLIP model than this run was trained on, under"
    ):
        main(cfg_for(str(store_copy), tmp_path / "run", resume=True))


def test_a_resume_on_a_store_an_embed_has_added_shards_to_says_its_data_changed(data, tmp_path, caplog):
    """A running embed writes each shard's done marker, and the manifest only at its end: the checkpoint
    recorded the manifest's shards, the stream trained on the done ones, and a resume after the embed added
    one continued silently, not as an uninterrupted run would."""
    store_copy = tmp_path / "store"
    shutil.copytree(data, store_copy)
    manifest = json.loads((store_copy / "manifest.json").read_text())
    manifest["shards"] = manifest["shards"][:1]  # as the embed's first run of the store wrote it
    (store_copy / "manifest.json").write_text(json.dumps(manifest))
    for later in ("00002", "00003"):  # not done yet
        (store_copy / "done" / f"{later}.json").rename(tmp_path / f"{later}.json")
    main(cfg_for(str(store_copy), tmp_path / "run", stop_after=10))
    (tmp_path / "00002.json").rename(store_copy / "done/00002.json")  # the embed finished one more shard
    with caplog.at_level("WARNING", logger="jobs.train_loop"):
        main(cfg_for(str(store_copy), tmp_path / "run", stop_after=15, resume=True))
    assert "changed since the checkpoint (2 shards of 300 rows then, 3 of 550 now)" in caplog.text


def test_resume_refuses_other_settings_and_loading_is_strict(data, tmp_path):
    main(cfg_for(data, tmp_path, stop_after=10))
    with pytest.raises(UsageError, match="lr"):
        main(cfg_for(data, tmp_path, lr=1e-3, resume=True))
    with pytest.raises(UsageError, match="model config differs .* depth"):
        main(cfg_for(data, tmp_path, preset="vit-b-32", resume=True))
    other = DiffusionPrior(_tiny(depth=1))
    with pytest.raises(UsageError, match="does not match the model"):
        checkpoint.load_weights(other, tmp_path / "ckpt/step_00000010/ema.safetensors")
    meta = tmp_path / "ckpt/step_00000010/meta.json"
    m = json.loads(meta.read_text())
    m["version"]["checkpoint_format"] = 99
    meta.write_text(json.dumps(m))
    with pytest.raises(UsageError, match="format 99"):
        checkpoint.read_meta(meta.parent)


def test_resume_with_another_world_size_is_refused(data, tmp_path):
    main(cfg_for(data, tmp_path, stop_after=10))
    meta_file = tmp_path / "ckpt/step_00000010/meta.json"
    meta = json.loads(meta_file.read_text())
    meta["world_size"] = 2  # as if trained under torchrun --nproc_per_node 2
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(UsageError, match=r"trained with 2 process\(es\), this run has 1"):
        main(cfg_for(data, tmp_path, resume=True))
    assert checkpoint.resolve(tmp_path).name == "step_00000010"  # nothing moved


def test_a_new_run_over_a_finished_one_is_refused(data, tmp_path, capsys):
    main(cfg_for(data, tmp_path, stop_after=10))
    before = weights(tmp_path / "ckpt/step_00000010")
    args = ["train-prior", "--data", data, "--out", str(tmp_path), "--batch-size", "32", "--steps", "20"]
    capsys.readouterr()
    assert cli(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds a training run" in err[0] and "step_00000010" in err[0]
    assert "--resume" in err[0]
    assert weights(tmp_path / "ckpt/step_00000010") == before
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["latest", "step_00000010"]


def test_metrics_of_a_resumed_run_read_as_one_run(data, tmp_path):
    """Killed after its last checkpoint, a run has logged steps its resumed run logs again: they are dropped."""
    main(cfg_for(data, tmp_path / "straight"))
    main(cfg_for(data, tmp_path / "killed", stop_after=15))  # checkpoints at 10 and 15, logs 5, 10, 15
    (tmp_path / "killed/ckpt/latest").write_text("step_00000010")  # as if killed at 15 before its checkpoint
    with open(tmp_path / "killed/metrics.jsonl", "a") as f:
        f.write('{"step": 16, "loss": 0.')  # and in the middle of writing a line
    main(cfg_for(data, tmp_path / "killed", resume=True))

    def losses(run):
        rows = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"]) for r in rows]

    assert [s for s, _ in losses("killed")] == [5, 10, 15, 20]
    assert losses("killed") == losses("straight")  # exact resume: the same losses, each logged once


def test_log_rows_of_a_resumed_run_are_those_of_an_uninterrupted_one(data, tmp_path, caplog):
    """Each invocation used to log only its own steps, over the file: a resumed run lost the rows before it."""
    main(cfg_for(data, tmp_path / "straight", log_rows=True))
    main(cfg_for(data, tmp_path / "killed", stop_after=15, log_rows=True))  # rows written at 10 and 15
    (tmp_path / "killed/ckpt/latest").write_text("step_00000010")  # as if killed at 15 before its checkpoint
    main(cfg_for(data, tmp_path / "killed", resume=True, log_rows=True))
    straight = torch.load(tmp_path / "straight/rows_rank0.pt")
    assert straight.shape == (20 * 32, 2)
    assert torch.equal(torch.load(tmp_path / "killed/rows_rank0.pt"), straight)
    # switched on at a resume: the steps before it are named as not logged, the rest are the run's rows
    main(cfg_for(data, tmp_path / "late", stop_after=10))
    main(cfg_for(data, tmp_path / "late", stop_after=15, resume=True, log_rows=True))
    late = torch.load(tmp_path / "late/rows_rank0.pt")  # row i is step i // 32's: -1 for the steps not logged
    assert late.shape == (15 * 32, 2) and torch.equal(late[: 10 * 32], torch.full((10 * 32, 2), -1))
    assert torch.equal(late[10 * 32 :], straight[10 * 32 : 15 * 32])
    assert "steps 0 .. 9 ran without --log-rows" in caplog.text
    (tmp_path / "late/ckpt/latest").write_text(
        "step_00000010"
    )  # killed before 15's checkpoint: its rows stay
    main(cfg_for(data, tmp_path / "late", resume=True, log_rows=True))  # used to log steps 15..19 twice
    assert torch.equal(torch.load(tmp_path / "late/rows_rank0.pt")[10 * 32 :], straight[10 * 32 :])


def test_a_resume_on_a_store_that_changed_says_the_data_order_is_no_longer_the_same(tmp_path, caplog):
    """The stream splits and orders the store as it finds it: one that gained a shard since the checkpoint
    silently changed the rest of the epoch (rows seen again, others skipped)."""
    import shutil

    data = tmp_path / "store"
    make_store(data, [60, 50], dim=32, n_classes=16)
    main(cfg_for(str(data), tmp_path / "run", steps=6, stop_after=3, save_every=3, batch_size=8))
    main(cfg_for(str(data), tmp_path / "same", steps=6, stop_after=3, save_every=3, batch_size=8))
    with caplog.at_level("WARNING"):
        main(cfg_for(str(data), tmp_path / "same", steps=6, save_every=3, batch_size=8, resume=True))
    assert "changed since the checkpoint" not in caplog.text
    main(cfg_for(str(data), tmp_path / "redone", steps=6, stop_after=3, save_every=3, batch_size=8))
    shutil.rmtree(data)
    make_store(data, [60, 50, 40], dim=32, n_classes=16)
    with caplog.at_level("WARNING"):
        main(cfg_for(str(data), tmp_path / "run", steps=6, save_every=3, batch_size=8, resume=True))
    assert "changed since the checkpoint (2 shards of 110 rows then, 3 of 150 now)" in caplog.text
    # shards written again with other samples, as many rows each (a download where other URLs succeeded)
    caplog.clear()
    shutil.rmtree(data)
    make_store(data, [60, 50], dim=32, n_classes=16, seed=1)
    with caplog.at_level("WARNING"):
        main(cfg_for(str(data), tmp_path / "redone", steps=6, save_every=3, batch_size=8, resume=True))
    said = "changed since the checkpoint (the same 2 shards of 110 rows, but some were written again since)"
    assert said in caplog.text


def test_training_on_a_store_whose_embed_did_not_finish_says_so(tmp_path, caplog):
    """A first embed run killed midway leaves a manifest listing no shards beside the shards it finished:
    training went on, on part of the data, without a word (validate named it)."""
    from pipeline import store

    data = tmp_path / "store"
    make_store(data, [60, 50], dim=32, n_classes=16)
    manifest = store.load_manifest(data)
    store.write_json(data / store.MANIFEST, {**manifest, "shards": []})  # as a killed first run leaves it
    with caplog.at_level("WARNING"):
        main(cfg_for(str(data), tmp_path / "run", steps=2, save_every=2, batch_size=8))
    assert "its manifest lists 0 shard(s) and 2 are done, so its embed run did not finish" in caplog.text
    caplog.clear()
    store.write_json(data / store.MANIFEST, manifest)
    with caplog.at_level("WARNING"):
        main(cfg_for(str(data), tmp_path / "run2", steps=2, save_every=2, batch_size=8))
    assert "did not finish" not in caplog.text


def test_log_rows_are_on_disk_before_the_checkpoint_that_needs_them(data, tmp_path, monkeypatch):
    """The rows were written after the checkpoint: killed in between, `latest` named a step whose rows the log
    lacked, and the resumed run's log had a hole and rows shifted to the wrong steps."""

    save, seen = checkpoint.save, []

    def checked(ckpt_dir, step, *a, **kw):
        seen.append((step, len(torch.load(tmp_path / "run/rows_rank0.pt"))))
        return save(ckpt_dir, step, *a, **kw)

    monkeypatch.setattr(train_loop.checkpoint, "save", checked)
    main(cfg_for(data, tmp_path / "run", log_rows=True))
    assert seen == [(10, 10 * 32), (20, 20 * 32)]


def test_log_rows_name_their_shards_and_keep_each_id_when_the_store_grows(data, tmp_path):
    """The logged shard id was a position among the non-empty shards: "1" meant shard 00002 here (00001 is
    empty), and every id after a new shard shifted."""
    from jobs.train_loop import ROWS_SHARDS, _shard_ids
    from pipeline import store

    main(cfg_for(data, tmp_path / "run", log_rows=True))
    names = json.loads((tmp_path / "run" / ROWS_SHARDS).read_text())
    assert names == ["00000", "00002", "00003"]
    sizes = dict(store.shard_rows(data))
    logged = torch.load(tmp_path / "run/rows_rank0.pt").tolist()
    assert {names[s] for s, _ in logged} == {"00000", "00002", "00003"}
    assert all(0 <= r < sizes[names[s]] for s, r in logged) and max(r for s, r in logged if s == 1) < 250
    # a store that gained shard 00001 (now first among the non-empty): the known ids stay, the new one is added
    ids = _shard_ids(tmp_path / "run", ["00000", "00001", "00002", "00003"], rank=0)
    assert ids.tolist() == [0, 3, 1, 2]
    assert json.loads((tmp_path / "run" / ROWS_SHARDS).read_text()) == ["00000", "00002", "00003", "00001"]


def test_resume_of_another_task_is_refused(data, tmp_path):
    main(cfg_for(data, tmp_path, stop_after=10))
    meta_file = tmp_path / "ckpt/step_00000010/meta.json"
    meta_file.write_text(json.dumps({**json.loads(meta_file.read_text()), "task": "decoder"}))
    with pytest.raises(UsageError, match="is a decoder run, not a prior run"):
        main(cfg_for(data, tmp_path, resume=True))


def _tiny(**kw):
    from models.prior import prior_config

    return prior_config("tiny", emb_dim=32, **kw)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(data, tmp_path, monkeypatch):
    real, calls = DiffusionPrior.loss, {"n": 0}

    def flaky(self, *a, **kw):
        calls["n"] += 1
        out = real(self, *a, **kw)
        return out * float("nan") if calls["n"] == 7 else out

    monkeypatch.setattr(DiffusionPrior, "loss", flaky)
    with pytest.raises(StageError, match="loss is nan at step 6"):
        main(cfg_for(data, tmp_path, save_every=3))
    assert checkpoint.resolve(tmp_path).name == "step_00000006"
    assert (
        cli(["eval-prior", "--ckpt", str(tmp_path), "--data", data, "--steps", "4", "--max-samples", "64"])
        == 0
    )


def test_eval_prior_writes_only_its_own_report_and_never_remakes_a_pruned_step_folder(
    data, tmp_path, capsys, monkeypatch
):
    """--out naming the store's manifest replaced it with metrics; a step folder pruned by a run still going
    was made again around eval.json alone (and the run's next prune deleted it): exit 0, no report anywhere."""
    from jobs import eval_prior

    main(cfg_for(data, tmp_path / "run", stop_after=4, save_every=4))
    ev = [
        "eval-prior",
        "--ckpt",
        str(tmp_path / "run"),
        "--data",
        data,
        "--steps",
        "2",
        "--max-samples",
        "32",
    ]
    manifest = Path(data) / "manifest.json"
    before = manifest.read_bytes()
    assert cli([*ev, "--out", str(manifest)]) == 2
    assert "exists and is not an earlier eval-prior report" in capsys.readouterr().err
    assert manifest.read_bytes() == before
    report = tmp_path / "r.json"
    assert (
        cli([*ev, "--out", str(report)]) == 0 and cli([*ev, "--out", str(report)]) == 0
    )  # its own: replaced
    r = json.loads(report.read_text())
    assert r["step"] == 4 and r["retrieval_pool"] == r["samples"] < 256
    # the table names the pool a query had: "/ 256" beside a chance of 1/39 misled
    assert f"top-1 retrieval / {r['samples']}, prediction" in eval_prior.format_table(r)
    step = tmp_path / "run/ckpt/step_00000004"
    real = eval_prior.evaluate

    def pruned_meanwhile(*a, **kw):
        out = real(*a, **kw)
        shutil.rmtree(step)
        return out

    monkeypatch.setattr(eval_prior, "evaluate", pruned_meanwhile)
    capsys.readouterr()
    assert cli(ev) == 1
    out, err = capsys.readouterr()
    assert "step_00000004 was deleted while it was evaluated" in err and "pass --out" in err
    assert "top-1 retrieval" in out and not step.exists()


def test_a_resume_with_nothing_to_train_says_so_and_evaluation_settings_may_change(
    data, tmp_path, capsys, caplog
):
    """A resume at or past --stop-after printed "steps": 5 from step 10 and "final_loss": NaN (not JSON); a
    changed --sampler or --sample-steps (the evaluation's own) was refused."""
    main(cfg_for(data, tmp_path, stop_after=10, eval_every=10, eval_samples=8, sample_steps=4))
    before = weights(tmp_path / "ckpt/step_00000010")
    # the same chunk again (a requeued job), or an earlier stop: a no-op that says so
    again = cfg_for(data, tmp_path, resume=True, stop_after=5, eval_every=10, eval_samples=8, sample_steps=4)
    with caplog.at_level("WARNING", logger="jobs.train_loop"):
        r = main(again)
    assert "the checkpoint is at step 10, at or past --stop-after 5: nothing to train" in caplog.text
    assert r["steps"] == 10 and r["start_step"] == 10 and r["final_loss"] is None
    assert weights(tmp_path / "ckpt/step_00000010") == before
    assert checkpoint.resolve(tmp_path).name == "step_00000010"
    main(cfg_for(data, tmp_path, resume=True, eval_every=10, eval_samples=8, sample_steps=2, sampler="dpm++"))
    capsys.readouterr()
    caplog.clear()
    with caplog.at_level("INFO", logger="jobs.train_loop"):
        assert (
            cli(["train-prior", *_flags(cfg_for(data, tmp_path, resume=True, eval_every=10, eval_samples=8))])
            == 0
        )
    report = json.loads(capsys.readouterr().out)  # strict JSON: no NaN
    assert report["steps"] == 20 and report["start_step"] == 20 and report["final_loss"] is None
    # a finished run is news, not a warning (the demo's rerun printed three)
    said = [(r.levelname, r.getMessage()) for r in caplog.records if "nothing to train" in r.getMessage()]
    assert said == [
        ("INFO", "train-prior: the checkpoint is at step 20, at or past --steps 20: nothing to train")
    ]


def _flags(cfg) -> list[str]:
    import dataclasses

    out = []
    for k, v in dataclasses.asdict(cfg).items():
        out += [f"--{k.replace('_', '-')}", str(v).lower() if isinstance(v, bool) else str(v)]
    return out


def test_eval_prior_of_a_text_encodings_prior_on_a_store_without_them_names_the_prior(data, tmp_path, capsys):
    """It blamed the store ("text_enc_offsets ... cannot be read; unclip validate lists the damage")."""
    main(cfg_for(data, tmp_path / "run", stop_after=2, save_every=2, text_encodings=True))
    plain = tmp_path / "plain"
    make_store(plain, [64], dim=32, n_classes=4)
    assert cli(["eval-prior", "--ckpt", str(tmp_path / "run"), "--data", str(plain), "--steps", "2"]) == 2
    err = capsys.readouterr().err
    assert "trained with --text-encodings and" in err and "has none" in err


def test_a_nan_in_the_store_names_the_data_and_validate_not_the_learning_rate(data, tmp_path):
    """It said "lower --lr ... the last good checkpoint is in RUN/ckpt", a folder that did not exist yet."""
    import shutil

    import numpy as np

    from pipeline import store

    bad = tmp_path / "store"
    shutil.copytree(data, bad)
    for s in store.done_shards(bad):  # every row: the first step's batch holds one whatever the order
        p = store.field_path(bad, "img_emb", s)
        if not p.exists():  # a 0-row shard has no files
            continue
        a = np.load(p)
        a[:, 0] = np.nan
        np.save(p, a)
    with pytest.raises(
        StageError, match=f"img_emb hold NaN or inf values from the store; `unclip validate {bad}`"
    ):
        main(cfg_for(str(bad), tmp_path / "run"))
    with pytest.raises(StageError, match="no checkpoint was written yet"):
        from jobs.train_loop import _last_good

        raise StageError(_last_good(type("R", (), {"ckpt_dir": tmp_path / "run" / "ckpt"})()))


@pytest.mark.slow  # ~11 s: 400 steps; the quick learning check is test_tiny_prior_overfits_16_pairs
def test_prior_learns_the_mapping(data, tmp_path, capsys):
    main(
        cfg_for(
            data, tmp_path, steps=400, batch_size=64, lr=1e-3, ema_decay=0.99, save_every=400, warmup_steps=20
        )
    )
    m = eval_run(EvalPriorConfig(ckpt=str(tmp_path), data=data, steps=16))
    assert f"top-1 retrieval / {m['retrieval_pool']}, prediction" in capsys.readouterr().out
    assert json.loads((tmp_path / "ckpt/step_00000400/eval.json").read_text())["top1_pred"] == m["top1_pred"]
    assert m["top1_pred"] > 10 * m["retrieval_chance_top1"]
    assert m["top1_pred"] > m["top1_text"] + 0.1
    assert m["sim_pred_image"] > m["sim_mean_image_predictor"] + 0.1
    assert m["sim_pred_image"] > m["sim_image_unrelated_pred"]


@pytest.mark.slow  # ~15 s: a two-process torchrun run
def test_the_logged_loss_is_the_mean_over_every_ranks_share(data, tmp_path):
    """metrics.jsonl held rank 0's loss alone: under N ranks a curve over 1/N of each batch. Each rank's own
    loss is recorded beside the run, and every logged loss is their mean."""
    out = tmp_path / "run"
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(
        "import os, sys\n"
        "from jobs import train_loop\n"
        "step = train_loop._step\n"
        "def recorded(model, batch, i, run):\n"
        "    loss, grad = step(model, batch, i, run)\n"
        f"    with open(os.path.join({str(tmp_path)!r}, f'rank{{run.rank}}.txt'), 'a') as f:\n"
        "        f.write(f'{i + 1} {loss!r}\\n')\n"
        "    return loss, grad\n"
        "train_loop._step = recorded\n"
        "from jobs.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    args = ["--data", data, "--out", str(out), "--steps", "4", "--batch-size", "16", "--log-every", "2"]
    args += ["--eval-every", "0", "--save-every", "4", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    p = subprocess.run(
        [*TORCHRUN2, str(wrapper), "train-prior", *args], env=env, capture_output=True, timeout=240
    )
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    own = [
        dict(line.split() for line in (tmp_path / f"rank{r}.txt").read_text().splitlines()) for r in (0, 1)
    ]
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = {row["step"]: row["loss"] for row in logged if "loss" in row}
    assert sorted(losses) == [2, 4]
    for step, loss in losses.items():
        mine = [float(own[r][str(step)]) for r in (0, 1)]
        assert abs(mine[0] - mine[1]) > 1e-4  # the ranks' shares differ: rank 0's alone would not pass
        assert loss == pytest.approx((mine[0] + mine[1]) / 2, rel=1e-6)


@pytest.mark.slow  # ~25 s: three two-process torchrun runs
def test_ranks_that_would_resume_from_different_checkpoints_are_refused(data, tmp_path):
    """Each rank read `latest` itself: a rank that saw another checkpoint (an --out its node does not share)
    trained from another step, DDP averaged the two, and the run hung at its next collective."""
    out = tmp_path / "run"
    args = ["--data", data, "--out", str(out), "--steps", "6", "--batch-size", "16", "--save-every", "2"]
    args += ["--eval-every", "0", "--device", "cpu"]
    wrapper = tmp_path / "wrapper.py"  # rank 1 finds step 2, as if its node's --out were an older copy
    wrapper.write_text(
        "import os, sys\n"
        "from pathlib import Path\n"
        "from jobs import checkpoint\n"
        "resolve = checkpoint.resolve\n"
        "if os.environ['RANK'] == '1':\n"
        "    checkpoint.resolve = lambda d, *a: Path(d) / 'step_00000002' if Path(d).name == 'ckpt' else resolve(d, *a)\n"
        "from jobs.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    run = TORCHRUN2
    subprocess.run(
        [*run, "-m", "jobs.cli", "train-prior", *args, "--stop-after", "4"],
        check=True,
        env=env,
        capture_output=True,
        timeout=240,
    )
    p = subprocess.run(
        [*run, str(wrapper), "train-prior", *args, "--resume"],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert p.returncode != 0
    assert "the ranks found different checkpoints" in p.stderr and "by rank: [4, 2]" in p.stderr, p.stderr[
        -3000:
    ]
    assert (out / "ckpt" / "latest").read_text().strip() == "step_00000004"


@pytest.mark.slow  # ~8 s: two torchrun processes
def test_every_rank_refuses_an_out_another_run_holds(data, tmp_path):
    """Only rank 0 takes the folder's lock: refused, it left the other ranks waiting in a collective."""
    from pipeline import store

    out = tmp_path / "run"
    args = ["train-prior", "--data", data, "--out", str(out), "--steps", "2", "--batch-size", "16"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with store.hold_folder(out):
        p = subprocess.run(
            [*TORCHRUN2, "-m", "jobs.cli", *args, "--eval-every", "0", "--device", "cpu"],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert p.returncode != 0 and p.stderr.count("is in use: another unclip command is writing to it") == 2
    assert "Connection closed by peer" not in p.stderr and list(out.iterdir()) == []


@pytest.mark.slow  # ~8 s: two torchrun processes
def test_two_process_gloo_training(data, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        *TORCHRUN2,
        "-m",
        "jobs.cli",
        "train-prior",
        "--data",
        data,
        "--out",
        str(tmp_path),
        "--steps",
        "6",
        "--batch-size",
        "16",
        "--save-every",
        "6",
        "--eval-every",
        "0",
        "--log-rows",
        "--device",
        "cpu",
    ]
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=240)
    r0, r1 = (torch.load(tmp_path / f"rows_rank{r}.pt") for r in (0, 1))
    assert r0.shape == r1.shape == (6 * 16, 2)
    s0, s1 = {tuple(x) for x in r0.tolist()}, {tuple(x) for x in r1.tolist()}
    assert len(s0) == len(s1) == 96 and not s0 & s1
    digests = json.loads((tmp_path / "weights_by_rank.json").read_text())
    assert len(digests) == 2 and digests[0] == digests[1]
    assert checkpoint.read_meta(checkpoint.resolve(tmp_path))["world_size"] == 2
    # each rank draws its own dropout masks: the global generators were seeded alike on every rank
    rngs = torch.load(checkpoint.resolve(tmp_path) / "state.pt")["torch_rng"]
    assert len(rngs) == 2 and not torch.equal(rngs[0], rngs[1])


def test_resume_names_a_model_setting_the_checkpoint_has_and_this_run_lacks():
    from types import SimpleNamespace

    from jobs.train_loop import _check_resume

    run = SimpleNamespace(task=SimpleNamespace(name="prior"), model_cfg={"dim": 64, "depth": 2})
    meta = {"task": "prior", "model": {"dim": 64, "depth": 2, "heads": 4}}
    with pytest.raises(UsageError, match="model config differs from this run.s in heads$"):
        _check_resume(meta, run)


def _wait_for_metrics(out, proc, timeout=120):
    import time

    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        if (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().strip():
            return
        time.sleep(0.02)
    raise AssertionError(f"no metrics within {timeout} s (exit code {proc.poll()})")


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_sigterm_or_ctrl_c_checkpoints_the_step_it_is_on_and_the_resume_is_exact(data, tmp_path, sig):
    """A batch scheduler's SIGTERM (SLURM's at the time limit or on preemption) killed the run: the steps since
    the last checkpoint (up to --save-every of them) were lost. Now the run checkpoints the step it is on,
    exits 143 saying to --resume, and the resume goes on as if it had never stopped. Ctrl-C lost them too, and
    then said to resume "from the last checkpoint" where there was none: it now does as SIGTERM does, exit 130."""
    import signal

    steps = dict(steps=400, save_every=1000, log_every=5)
    out = tmp_path / "run"
    args = ["--data", data, "--out", str(out), "--batch-size", "32", "--eval-every", "0", "--steps", "400"]
    args += ["--save-every", "1000", "--log-every", "5", "--warmup-steps", "5", "--val-fraction", "0.1"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobs.cli", "train-prior", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        _wait_for_metrics(out, proc)
        proc.send_signal(getattr(signal, sig))
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    last = err.decode().strip().splitlines()[-1]
    assert proc.returncode == 128 + getattr(signal, sig), err.decode()[-3000:]
    stopped = checkpoint.read_meta(checkpoint.resolve(out))["step"]
    assert 5 <= stopped < 400
    how = {"SIGTERM": "stopped by SIGTERM", "SIGINT": "interrupted (Ctrl-C)"}[sig]
    assert last == (
        f"unclip train-prior: {how}: train-prior stopped after step {stopped} of 400, checkpointed in "
        f"{out / 'ckpt'}; rerun it with --resume to continue from the last checkpoint"
    )
    assert (train_loop.CTRL_C_NOTE.decode().strip() in err.decode()) == (sig == "SIGINT")
    if sig == "SIGINT":  # the resume below is the same code after either signal
        return
    main(cfg_for(data, out, stop_after=stopped + 3, resume=True, **steps))
    main(cfg_for(data, tmp_path / "straight", stop_after=stopped + 3, **steps))
    at = f"ckpt/step_{stopped + 3:08d}"
    assert weights(out / at) == weights(tmp_path / "straight" / at)


@pytest.mark.parametrize("to", ["rank 1", "every process", pytest.param("ctrl-c", marks=pytest.mark.slow)])
def test_sigterm_under_torchrun_stops_every_rank_after_the_same_checkpointed_step(data, tmp_path, to):
    """Under torchrun the ranks must agree on the step they stop after: the checkpoint's RNG gather is a
    collective, and a rank that went on alone would wait in the next step's gradient all-reduce forever. SLURM
    signals every process of the step, torchrun included, which passes its own on: each rank gets two. So does
    Ctrl-C (the terminal's SIGINT to the process group), which must count as one press, not two."""
    import signal

    import psutil

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["--data", data, "--out", str(tmp_path), "--steps", "400", "--batch-size", "16", "--save-every"]
    args += ["1000", "--log-every", "5", "--eval-every", "0", "--device", "cpu"]
    proc = subprocess.Popen(
        [*TORCHRUN2, "-m", "jobs.cli", "train-prior", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        _wait_for_metrics(tmp_path, proc, timeout=240)
        ranks = [
            p
            for p in psutil.Process(proc.pid).children(recursive=True)
            if "jobs.cli" in " ".join(p.cmdline())
        ]
        assert len(ranks) == 2
        if to == "ctrl-c":
            os.killpg(proc.pid, signal.SIGINT)
        elif to == "rank 1":
            ranks[1].send_signal(
                signal.SIGTERM
            )  # one rank only: the other learns it from the flag's all-reduce
        else:  # as slurmstepd does
            for p in (psutil.Process(proc.pid), *ranks):
                p.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:  # a hang: the ranks too, not only torchrun
            for p in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
                p.kill()
            proc.wait()
    text = err.decode()
    how = "interrupted (Ctrl-C)" if to == "ctrl-c" else "stopped by SIGTERM"
    assert proc.returncode == 1 and text.count(f"unclip train-prior: {how}: ") == 2, text[-3000:]
    meta = checkpoint.read_meta(checkpoint.resolve(tmp_path))
    assert meta["world_size"] == 2 and 5 <= meta["step"] < 400
    digests = json.loads((tmp_path / "weights_by_rank.json").read_text())
    assert len(digests) == 2 and digests[0] == digests[1]


def test_a_repeated_sigterm_is_the_same_notice_a_later_one_ends_and_one_during_a_save_stops_on_it(
    data, tmp_path, monkeypatch
):
    """Under SLURM, torchrun and each rank get SIGTERM, and torchrun passes its own on: every rank had two a few
    milliseconds apart, and the second killed it before its checkpoint. A SIGTERM well after the first still has
    the previous handler's effect (by default the end: a rank stuck in a collective never gets back to the
    loop). And a SIGTERM during a periodic save stopped the run only after one more step and a second full
    checkpoint, inside the scheduler's kill window."""
    import signal

    from pipeline.errors import Stopped

    got = []
    before = signal.signal(signal.SIGTERM, lambda *_: got.append("previous"))  # a stand-in for the default
    try:
        with train_loop._stop_flag() as flag:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)  # the same notice, by another path
            assert flag.set and got == []
            monkeypatch.setattr(train_loop, "SIGTERM_REPEAT_S", 0.0)
            time.sleep(0.01)
            os.kill(os.getpid(), signal.SIGTERM)  # a later one: the previous handler's
            time.sleep(0.01)
            assert got == ["previous"]
        assert got == ["previous"] and signal.getsignal(signal.SIGTERM) is not None
    finally:
        signal.signal(signal.SIGTERM, before)
    monkeypatch.setattr(train_loop, "SIGTERM_REPEAT_S", 5.0)

    save = train_loop._save

    def save_then_sigterm(step, run):
        save(step, run)
        if step == 10:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(train_loop, "_save", save_then_sigterm)
    with pytest.raises(Stopped, match="stopped after step 10 of 20"):
        main(cfg_for(data, tmp_path, save_every=5))
    assert checkpoint.read_meta(checkpoint.resolve(tmp_path))["step"] == 10
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_second_ctrl_c_stops_at_once_and_says_what_a_rerun_continues_from(
    data, tmp_path, monkeypatch, capfd
):
    """The first Ctrl-C checkpoints (above); a second press is a KeyboardInterrupt, and the CLI's line then names
    the checkpoint a --resume continues from (it had said "from the last checkpoint" where none had been saved).
    Under a torchrun that shares the rank's process group, its copy of the press, milliseconds later, is the
    same press; a torchrun pressed twice passes SIGTERM on, which is a second press too."""
    import signal

    def second_press_stops(first, copy, second, repeat_s=0.0):
        monkeypatch.setattr(train_loop, "_sigint_repeat_s", lambda: repeat_s)
        reached = []
        with pytest.raises(KeyboardInterrupt):
            with train_loop._stop_flag() as flag:
                os.kill(os.getpid(), first)
                time.sleep(0.01)
                if copy:
                    os.kill(os.getpid(), copy)
                    time.sleep(0.01)
                reached.append(flag.signum)
                time.sleep(repeat_s + 0.05)
                os.kill(os.getpid(), second)
                time.sleep(1)
            pytest.fail("a second Ctrl-C did not stop the block")
        assert reached == [first]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL

    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    second_press_stops(signal.SIGINT, None, signal.SIGINT)
    assert capfd.readouterr().err.count("Ctrl-C: stopping once this step") == 1
    second_press_stops(signal.SIGINT, signal.SIGINT, signal.SIGINT, repeat_s=train_loop.SIGINT_REPEAT_S)
    second_press_stops(signal.SIGINT, None, signal.SIGTERM)  # torchrun's second
    second_press_stops(signal.SIGTERM, None, signal.SIGINT)  # a scheduler's notice, then Ctrl-C
    # who can send the same press twice: a torchrun rank in torchrun's process group (torch before 2.x started
    # each rank in a session of its own), not a process on its own
    monkeypatch.undo()
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert train_loop._sigint_repeat_s() == 0.0
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    same_group = os.getpgid(0) == os.getpgid(os.getppid())
    assert train_loop._sigint_repeat_s() == (train_loop.SIGINT_REPEAT_S if same_group else 0.0)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")

    def interrupted_at(step):
        def at(*a, **kw):
            if at.n == step:
                raise KeyboardInterrupt
            at.n += 1
            return real(*a, **kw)

        at.n = 0
        return at

    real = train_loop._step
    args = ["train-prior", "--data", data, "--out", str(tmp_path), "--steps", "20", "--save-every", "5"]
    args += ["--eval-every", "0", "--batch-size", "16"]
    monkeypatch.setattr(train_loop, "_step", interrupted_at(3))
    assert cli(args) == 130
    assert capfd.readouterr().err.strip().splitlines()[-1] == (
        "unclip train-prior: interrupted; no checkpoint was saved; rerun the same command to start again"
    )
    assert not (tmp_path / "ckpt/latest").exists()
    monkeypatch.setattr(train_loop, "_step", interrupted_at(7))
    assert cli(args) == 130
    assert capfd.readouterr().err.strip().splitlines()[-1] == (
        f"unclip train-prior: interrupted; nothing since {tmp_path}/ckpt/step_00000005 was saved; rerun it with "
        "--resume to continue from the last checkpoint"
    )


def test_a_preset_sized_for_another_clip_says_so(data, tmp_path, caplog):
    """--preset vit-l-14 ("768-d") on a store of another width trained at the store's width without a word."""
    from jobs.train_prior import PriorTask

    manifest = json.loads((Path(data) / "manifest.json").read_text())
    with caplog.at_level("WARNING", logger="jobs.train_prior"):
        assert PriorTask(cfg_for(data, tmp_path, preset="vit-b-32")).model_config(manifest)["emb_dim"] == 32
        assert "--preset vit-b-32 is sized for 512-d CLIP embeddings" in caplog.text
        caplog.clear()
        PriorTask(cfg_for(data, tmp_path, preset="tiny")).model_config(manifest)  # made to fit any store
        assert caplog.text == ""


def test_the_logged_learning_rate_is_the_one_its_step_was_taken_at(data, tmp_path):
    """metrics.jsonl logged the scheduler's rate after it had stepped: the next step's."""
    from jobs.train_loop import lr_lambda

    main(cfg_for(data, tmp_path, steps=10, warmup_steps=10, lr=1e-3, save_every=10))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r["lr"] for r in rows if "lr" in r}
    assert logged == {s: pytest.approx(1e-3 * lr_lambda(10, 10)(s - 1)) for s in (5, 10)}
    assert logged[5] == pytest.approx(0.5e-3)  # warmup step 5 of 10 (0-based 4): 5/10 of the rate


def test_eval_prior_on_a_store_of_another_clip_of_the_same_size_warns(data, tmp_path, caplog):
    main(cfg_for(data, tmp_path / "run", stop_after=2, save_every=2))
    other = tmp_path / "store"
    shutil.copytree(data, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["clip"]["arch"] = "RN50"
    (other / "manifest.json").write_text(json.dumps(manifest))
    ev = ["eval-prior", "--ckpt", str(tmp_path / "run"), "--steps", "2", "--max-samples", "16"]
    with caplog.at_level("WARNING", logger="jobs.checkpoint"):
        assert cli([*ev, "--data", data, "--out", str(tmp_path / "a.json")]) == 0
        assert "of the same size" not in caplog.text
        assert cli([*ev, "--data", str(other), "--out", str(tmp_path / "b.json")]) == 0
    assert "holds RN50 (" in caplog.text and "of the same size: its figures on them say little" in caplog.text


def test_a_checkpoint_whose_meta_lacks_a_field_or_whose_latest_is_empty_is_one_line(data, tmp_path, capsys):
    """meta.json without "store" was a KeyError traceback in sample; an empty `latest` said it named "ckpt"."""
    main(cfg_for(data, tmp_path / "run", stop_after=2, save_every=2))
    meta_file = tmp_path / "run/ckpt/step_00000002/meta.json"
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({k: v for k, v in meta.items() if k != "store"}))
    ev = ["eval-prior", "--ckpt", str(tmp_path / "run"), "--data", data, "--steps", "2"]
    assert cli(ev) == 2
    assert "meta.json lacks or mistypes store" in capsys.readouterr().err
    (tmp_path / "run/ckpt/latest").write_text("")
    assert cli(ev) == 2
    assert "latest is empty; point at one of the step_* folders" in capsys.readouterr().err


def test_a_report_written_beside_a_checkpoint_never_makes_its_folder_again(tmp_path):
    """The folder checked once, then pruned by a running training before the write: the write made it again
    around the report alone (a step folder without weights, which the next prune deletes, report and all)."""
    from pipeline import store

    folder = tmp_path / "ckpt/step_00000010"
    folder.mkdir(parents=True)
    with pytest.raises(StageError, match="step_00000010 was deleted while it was evaluated"):
        with checkpoint.writing_beside(folder, "eval.json"):
            shutil.rmtree(folder)
            store.write_json(folder / "eval.json", {"step": 10}, make_parent=False)
    assert not folder.exists()


def test_a_full_disk_during_a_save_is_one_line_and_the_steps_before_stay(data, tmp_path, monkeypatch, capsys):
    """safetensors and torch.save report a full disk with their own errors (torch's: "[enforce fail at
    inline_container.cc:672] . unexpected pos ..."), which the CLI printed as a 40-line traceback."""
    real, calls = torch.save, {"n": 0}

    def full(obj, f, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint's state.pt
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
        return real(obj, f, *a, **kw)

    monkeypatch.setattr(checkpoint.torch, "save", full)
    args = [
        "--data",
        data,
        "--out",
        str(tmp_path),
        "--batch-size",
        "32",
        "--steps",
        "20",
        "--eval-every",
        "0",
    ]
    assert cli(["train-prior", *args, "--save-every", "10", "--val-fraction", "0.1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]  # below the progress bar
    assert err.startswith("unclip train-prior: failed: cannot write checkpoint step_00000020 into ")
    assert "MiB free there): RuntimeError: [enforce fail at inline_container.cc:672]" in err
    assert checkpoint.resolve(tmp_path).name == "step_00000010"
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["latest", "step_00000010"]


def test_a_checkpoint_that_recorded_no_file_digests_is_compared_on_what_it_has():
    from jobs.train_loop import shards_changed, store_shards

    now = store_shards([("00000", 60), ("00001", 50)], {"00000": {"a": "1"}, "00001": {"a": "2"}})
    older = {k: v for k, v in now.items() if k != "files_sha256"}
    assert shards_changed(older, now) is None and shards_changed(None, now) is None
    redone = store_shards([("00000", 60), ("00001", 50)], {"00000": {"a": "1"}, "00001": {"a": "3"}})
    assert shards_changed(redone, now) == "the same 2 shards of 110 rows, but some were written again since"
    assert shards_changed(store_shards([("00000", 60)]), now) == "1 shards of 60 rows then, 2 of 110 now"


def test_eval_prior_on_the_train_split_takes_each_sample_once(data, tmp_path, capsys):
    """The train stream is endless and shuffled: 2,048 "held-out" samples were drawn from a split of ~760,
    and a train split under one batch of 256 was refused with advice to lower flags eval-prior lacks."""
    from pipeline.stream import Stream, StreamConfig

    main(cfg_for(data, tmp_path / "run", steps=2, save_every=2))
    m = eval_run(
        EvalPriorConfig(
            ckpt=str(tmp_path / "run"), data=data, steps=2, split="train", out=str(tmp_path / "e.json")
        )
    )
    train = Stream(StreamConfig(data, split="train", val_fraction=0.1, batch_size=1)).num_samples
    assert 700 < train < 2048 and m["samples"] == train and m["split"] == "train"
    assert f"eval-prior on {train} training samples" in capsys.readouterr().out
    # the pairs are the split's, once each: the one-pass stream covers every train row exactly once
    seen = [
        (int(s), int(r))
        for b in Stream(
            StreamConfig(data, split="train", val_fraction=0.1, batch_size=256, one_pass=True)
        ).batches()
        for s, r in zip(b["shard"], b["row"])
    ]
    assert len(seen) == len(set(seen)) == train
    small = tmp_path / "small"
    make_store(small, [60, 60], dim=32, n_classes=8)
    main(cfg_for(str(small), tmp_path / "srun", steps=2, save_every=2, batch_size=16))
    m = eval_run(
        EvalPriorConfig(
            ckpt=str(tmp_path / "srun"), data=str(small), steps=2, split="train", out=str(tmp_path / "s.json")
        )
    )
    assert (
        m["samples"]
        == Stream(StreamConfig(str(small), split="train", val_fraction=0.1, batch_size=1)).num_samples
    )


def test_a_plain_pickle_state_is_refused_without_torchs_warning_above_the_line(tmp_path):
    """torch warned "Detected pickle protocol 4 in the checkpoint..." in two lines above the one-line refusal."""
    import pickle
    import warnings

    (tmp_path / "state.pt").write_bytes(pickle.dumps({"step": 1}, protocol=4))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(UsageError, match="state.pt cannot be loaded safely"):
            checkpoint.load_state(tmp_path)
    assert not [w for w in seen if "pickle" in str(w.message)], [str(w.message) for w in seen]


@pytest.mark.slow  # ~8 s: two torchrun processes
def test_a_non_finite_loss_on_one_rank_stops_every_rank_with_a_line(tmp_path):
    """A NaN row in one rank's share stopped that rank before backward; the other waited in DDP's all-reduce
    and died of gloo's "Connection closed by peer" traceback."""
    import numpy as np

    from pipeline import store

    data = tmp_path / "store"
    make_store(data, [200, 200], dim=16, n_classes=8)
    path = store.field_path(data, "img_emb", store.shard_rows(data)[0][0])
    a = np.load(path)
    a[[3, 50, 120, 160]] = np.nan  # a few rows: one rank's batch holds one before the other's does
    np.save(path, a)
    args = ["--data", str(data), "--out", str(tmp_path / "run"), "--batch-size", "8", "--steps", "100"]
    r = subprocess.run(
        [*TORCHRUN2, "-m", "jobs.cli", "train-prior", *args, "--eval-every", "0", "--device", "cpu"],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert r.returncode != 0
    lines = [x for x in r.stderr.splitlines() if "unclip train-prior: failed:" in x]
    assert len(lines) == 2, r.stderr[-3000:]
    assert any("img_emb hold NaN or inf values from the store" in x for x in lines)
    assert any("loss is not finite on another rank at step" in x for x in lines)
    assert "Connection closed by peer" not in r.stderr and "[rank0]: Traceback" not in r.stderr
