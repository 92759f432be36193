"""Hostile input, one parametrised test per class of promise the README makes: nothing a user owns is
deleted, no silent loss, every bad input is one line with exit 2 and nothing written, `validate` names every
kind of damage, and a non-finite run never leaves a poisoned checkpoint behind.

Each case states what it does to the input and the words the one line must contain. Slow paths (a real embed
run) are few and shared: most cases are refused before any model is built.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import shutil
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from jobs import checkpoint
from jobs.cli import main
from pipeline import store
from pipeline.errors import StageError
from tests.synthetic_store import make_store
from tests.test_embed import TINY, sample, write_tar

# ---------------------------------------------------------------- helpers


def files(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes: 'nothing written, nothing deleted' is equality of these."""
    if not root.exists():
        return {}
    if root.is_file():
        return {"": root.read_bytes()}
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def one_line(capsys, command: str, code: int, want: str, rc: int = 2) -> str:
    """The run exited ``rc`` with exactly one `unclip COMMAND:` line on stderr containing ``want``."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith(f"unclip {command}:")]
    assert code == rc, (code, err[-2000:])
    assert len(lines) == 1, err[-2000:]
    assert want in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict[str, Path]:
    """Synthetic stores (16-d, with latents and text encodings; 24-d; empty) and a 4-step prior run."""
    d = tmp_path_factory.mktemp("hostile")
    make_store(d / "good", [40, 40], dim=16, text_enc_width=8, latent_size=8)
    make_store(d / "wide", [40, 40], dim=24)
    make_store(d / "empty", [0, 0], dim=16)
    args = ["--data", d / "good", "--out", d / "run", "--preset", "tiny", "--steps", "4", "--batch-size", "8"]
    assert (
        main(["train-prior", *map(str, args), "--save-every", "2", "--eval-every", "0", "--device", "cpu"])
        == 0
    )
    return {k: d / k for k in ("good", "wide", "empty", "run")}


# ---------------------------------------------------------------- 1. data loss: --overwrite and --out


def _foreign_folder(p: Path) -> None:
    for rel in ("logs/notes.txt", "metadata/metadata_00000.parquet", "done/00000.json", "errors/x.parquet"):
        (p / rel).parent.mkdir(parents=True, exist_ok=True)
        (p / rel).write_text(f"the user's {rel}")


@pytest.mark.parametrize(
    "case, want",
    [
        ("not_a_store_with_overwrite", "is not empty and holds no manifest.json"),
        ("not_a_store", "is not empty and holds no manifest.json"),
        ("out_is_a_file", "is a file, not a store folder"),
        ("out_is_the_shards_folder", "is not empty and holds no manifest.json"),
        ("config_string_false_on_a_store", "'overwrite' must be true or false, got the string \"false\""),
    ],
)
def test_embed_never_deletes_or_overwrites_what_it_did_not_write(case, want, work, tmp_path, capsys):
    shards = tmp_path / "shards"
    write_tar(shards / "00000.tar", [sample("000000000", 0), sample("000000001", 1)])
    out, extra = tmp_path / "out", []
    if case.startswith("not_a_store"):
        _foreign_folder(out)
        extra = ["--overwrite"] if case.endswith("overwrite") else []
    elif case == "out_is_a_file":
        out.write_text("a user's file")
    elif case == "out_is_the_shards_folder":
        out = shards
    else:  # a store made with other settings; a config whose "false" used to read as true wiped it
        shutil.copytree(work["good"], out)
        cfg = tmp_path / "c.json"
        cfg.write_text(json.dumps({"overwrite": "false"}))
        extra = ["--config", str(cfg)]
    before = files(out)
    code = main(["embed", "--shards", str(shards), "--out", str(out), *TINY, *extra])
    one_line(capsys, "embed", code, want)
    assert files(out) == before


def test_overwrite_removes_only_the_files_its_markers_list(work, tmp_path, capsys):
    out = tmp_path / "store"
    shutil.copytree(work["good"], out)
    (out / "img_emb" / "my_notes.txt").write_text("mine")
    (out / "logs").mkdir(exist_ok=True)
    (out / "logs" / "my_run.log").write_text("mine too")
    ours = [rel for s in store.done_shards(out) for rel in store.read_done(out, s)["files"]]
    shards = tmp_path / "shards"
    write_tar(shards / "00007.tar", [sample(f"00007{i:04d}", i) for i in range(3)])
    assert main(["embed", "--shards", str(shards), "--out", str(out), *TINY, "--overwrite"]) == 0
    assert (out / "img_emb" / "my_notes.txt").read_text() == "mine"
    assert (out / "logs" / "my_run.log").read_text() == "mine too"
    assert ours and not any((out / rel).exists() for rel in ours)
    assert store.done_shards(out) == ["00007"] and store.load_manifest(out)["clip"]["dim"] == 64


@pytest.mark.parametrize(
    "command, case",
    [
        ("train-prior", "user_folder"),
        ("train-prior", "user_folder_resume"),
        ("train-prior", "under_a_file"),
        ("demo-data", "user_folder"),
        ("demo-data", "user_parquet_and_images"),
    ],
)
def test_train_and_demo_data_never_write_into_a_folder_of_user_files(command, case, work, tmp_path, capsys):
    out = tmp_path / "user"
    if case == "under_a_file":
        out.write_text("a user's file")
        target = out / "run"
    else:
        target = out
        out.mkdir()
        (out / "config.json").write_text('{"lr": 1}')  # a file name train writes, in the user's own format
        (out / "notes.txt").write_text("mine")
        if case == "user_parquet_and_images":  # demo-data's own file names, not its table
            (out / "notes.txt").unlink()
            (out / "config.json").unlink()
            (out / "images").mkdir()
            (out / "images/00000.png").write_bytes(b"my picture")
            pq.write_table(pa.table({"url": ["images/00000.png"], "caption": ["mine"]}), out / "demo.parquet")
    before = files(out)
    if command == "train-prior":
        args = ["--data", str(work["good"]), "--out", str(target), "--preset", "tiny", "--steps", "2"]
        args += ["--batch-size", "8", "--eval-every", "0", "--device", "cpu"]
        args += ["--resume"] if case.endswith("resume") else []
    else:
        args = ["--out", str(target), "--n", "3"]
    code = main([command, *args])
    want = "lies under" if case == "under_a_file" else "is not empty"
    one_line(capsys, command, code, want)
    assert files(out) == before


@pytest.mark.parametrize("resume", [False, True])
def test_a_run_killed_writing_its_first_file_is_continued_and_its_leftovers_go(resume, work, tmp_path):
    """Killed while atomic_write wrote config.json, a run left only `.config.json.tmpPID`: the same command and
    --resume were both refused as "not a training run's folder"; and temp files and half-written checkpoint
    folders that kills left were never removed."""
    out = tmp_path / "run"
    out.mkdir()
    (out / ".config.json.tmp4623").write_text('{"task": ')
    args = ["--data", work["good"], "--out", out, "--preset", "tiny", "--steps", "4", "--batch-size", "8"]
    args += ["--eval-every", "0", "--device", "cpu", "--save-every", "2"]
    assert main(["train-prior", *map(str, args), "--stop-after", "2", *(["--resume"] if resume else [])]) == 0
    (out / "ckpt" / ".latest.tmp99").write_text("step_0000")
    (out / "ckpt" / ".tmp_step_00000009").mkdir()
    (out / "ckpt" / ".tmp_step_00000009" / "model.safetensors").write_bytes(b"half")
    (out / "my_notes.txt").write_text("mine")
    assert main(["train-prior", *map(str, args), "--resume"]) == 0
    left = sorted(str(p.relative_to(out)) for p in out.rglob(".*"))
    assert left == [] and (out / "my_notes.txt").read_text() == "mine"


def test_a_run_killed_before_its_first_checkpoint_starts_again_in_its_folder(work, tmp_path):
    out = tmp_path / "run"
    args = ["--data", str(work["good"]), "--out", str(out), "--preset", "tiny", "--batch-size", "8"]
    args += ["--eval-every", "0", "--device", "cpu", "--save-every", "2"]
    assert main(["train-prior", *args, "--steps", "2"]) == 0
    shutil.rmtree(out / "ckpt")  # as if killed before step 2 was saved: config.json and metrics.jsonl remain
    assert main(["train-prior", *args, "--steps", "2"]) == 0
    assert (out / "ckpt/latest").read_text().strip() == "step_00000002"


# ---------------------------------------------------------------- 2. --config values are typed


def _required(command: str, tmp_path: Path, work: dict) -> list[str]:
    shards = tmp_path / "shards"
    write_tar(shards / "00000.tar", [sample("000000000", 0)])
    urls = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": ["http://127.0.0.1:9/a.jpg"], "caption": ["a"]}), urls)
    return {
        "embed": ["--shards", str(shards), "--out", str(tmp_path / "out"), *TINY],
        "train-prior": ["--data", str(work["good"]), "--out", str(tmp_path / "out")],
        "eval-prior": [
            "--ckpt",
            str(work["run"]),
            "--data",
            str(work["good"]),
            "--out",
            str(tmp_path / "out"),
        ],
        "sample": [
            "--prior",
            str(work["run"]),
            "--decoder",
            str(work["run"]),
            "--out",
            str(tmp_path / "out"),
        ],
        "download": ["--urls", str(urls), "--out", str(tmp_path / "out")],
        "validate": [str(work["good"])],
    }[command]


@pytest.mark.parametrize(
    "command, text, want",
    [
        ("embed", '{"overwrite": "false"}', "'overwrite' must be true or false, got the string \"false\""),
        ("embed", '{"device": "tpu"}', "unknown --device 'tpu'; valid: auto, cpu, cuda, cuda:N"),
        ("train-prior", '{"steps": "4"}', "'steps' must be an integer, got the string \"4\""),
        ("train-prior", '{"lr": NaN}', "'lr' must be a finite number"),
        (
            "train-prior",
            '{"lr": 1' + "0" * 400 + "}",
            "'lr' must be a finite number, got int 1000",
        ),  # overflow
        ("train-prior", '{"resume": 1}', "'resume' must be true or false"),
        ("train-prior", "[1, 2]", "must hold a JSON object of settings (got list)"),
        ("eval-prior", "null", "must hold a JSON object of settings (got null)"),
        ("eval-prior", '{"steps": 2.5}', "'steps' must be an integer"),
        ("sample", '{"prompt": "a cat"}', "'prompt' must be a non-empty list, got the string \"a cat\""),
        ("download", '{"image_size": 1.5}', "'image_size' must be an integer"),
        ("download", "{not json", "cannot read --config"),
        ("validate", '{"check_tars": "no"}', "'check_tars' must be true or false"),
    ],
)
def test_config_values_are_checked_by_type_before_anything_runs(command, text, want, work, tmp_path, capsys):
    cfg = tmp_path / "c.json"
    cfg.write_text(text)
    args = _required(command, tmp_path, work)
    before = files(work["good"])
    code = main([command, *args, "--config", str(cfg)])
    one_line(capsys, command, code, want)
    assert not (tmp_path / "out").exists() and files(work["good"]) == before


# ---------------------------------------------------------------- 3. a non-finite run leaves no poisoned checkpoint


def test_non_finite_weights_are_never_checkpointed(work, tmp_path, monkeypatch):
    import jobs.train_loop as loop

    real, calls = loop._ema_update, {"n": 0}

    def poisoning(ema, model, decay):  # an optimiser step that blew the weights up (e.g. a huge --lr)
        calls["n"] += 1
        if calls["n"] == 6:
            with torch.no_grad():
                next(model.parameters()).fill_(math.inf)
        real(ema, model, decay)

    monkeypatch.setattr(loop, "_ema_update", poisoning)
    from jobs.train_prior import TrainPriorConfig
    from jobs.train_prior import main as train

    cfg = TrainPriorConfig(data=str(work["good"]), out=str(tmp_path), preset="tiny", steps=10, batch_size=8)
    cfg.save_every, cfg.eval_every, cfg.device = 3, 0, "cpu"
    with pytest.raises(StageError, match="weights are not finite at step 6: not checkpointed"):
        train(cfg)
    folder = checkpoint.resolve(tmp_path)
    assert folder.name == "step_00000003" and not (tmp_path / "ckpt" / "step_00000006").exists()
    from safetensors.torch import load_file

    for name in ("model.safetensors", "ema.safetensors"):
        assert all(torch.isfinite(t).all() for t in load_file(str(folder / name)).values())


# ---------------------------------------------------------------- 4. shards: a bad sample is one error row


def png16() -> bytes:
    """A 16-bit grey PNG at 3/4 of full scale: 8-bit grey 191 once scaled (PIL's own convert gives 255)."""
    buf = io.BytesIO()
    Image.fromarray(np.full((40, 40), 49152, dtype=np.uint16)).save(buf, format="PNG")
    return buf.getvalue()


def gif() -> bytes:
    buf = io.BytesIO()
    frames = [Image.new("RGB", (40, 40), c) for c in ((200, 30, 30), (30, 30, 200))]
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    return buf.getvalue()


def _raw_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def _members(s: dict, image_ext: str = "jpg") -> list[tuple[str, bytes]]:
    return [
        (f"{s['key']}.{image_ext}", s["jpg"]),
        (f"{s['key']}.txt", s["txt"]),
        (f"{s['key']}.json", s["json"]),
    ]


@pytest.fixture(scope="module")
def hostile_store(tmp_path_factory) -> tuple[Path, Path, int]:
    """Shard 00000: good samples around every kind of malformed one, and an img2dataset record listing a
    sample the tar lacks (cut at a member boundary). Shard 00001: a tar cut in the middle of a member."""
    d = tmp_path_factory.mktemp("hostile_shards")
    good = [sample(f"0000000{i:02d}", i) for i in range(6)]
    nan_caption = sample("000000020", 20)
    nan_caption["txt"], nan_caption["json"] = b"nan", b'{"key": "000000020", "caption": NaN, "width": 48}'
    members = _members(good[0])
    members += [
        ("000000010.jpg", good[1]["jpg"]),
        ("000000010.txt", b"a cat"),
        ("000000010.json", b"{not json"),
    ]
    members += [("000000011.jpg", good[1]["jpg"]), ("000000011.txt", b"a dog"), ("000000011.json", b"[1, 2]")]
    members += _members(good[1]) + _members(good[2])
    members += _members({**good[3], "key": good[1]["key"]})  # a second sample with an earlier key
    members += [("000000012.png", png16()), ("000000012.txt", b"grey"), ("000000012.json", b'{"width": "x"}')]
    members += [("000000013.gif", gif()), ("000000013.txt", b"red"), ("000000013.json", b'{"width": 40}')]
    members += [("000000014.jpg", b"\x89PNG not really"), ("000000014.txt", b"x"), ("000000014.json", b"{}")]
    members += _members(nan_caption) + _members(good[4])
    members += _members({**good[5], "key": good[4]["key"]})  # the same key twice in a row
    _raw_tar(d / "shards" / "00000.tar", members)
    recorded = [m[0].split(".")[0] for m in members if m[0].endswith(".json")] + ["000000099"]
    pq.write_table(
        pa.table({"key": recorded, "status": ["success"] * len(recorded)}), d / "shards" / "00000.parquet"
    )
    (d / "shards" / "00000_stats.json").write_text('{"count": 9}')  # img2dataset finished the shard
    cut = write_tar(d / "shards" / "00001.tar", [sample(f"0001{i:05d}", 100 + i) for i in range(4)])
    with tarfile.open(cut) as tf:
        inside = tf.getmembers()[3].offset_data + 100  # in the middle of the second sample's image
    cut.write_bytes(cut.read_bytes()[:inside])
    out = d / "store"
    code = main(["embed", "--shards", str(d / "shards"), "--out", str(out), *TINY, "--retries", "0"])
    return out, d / "shards", code


def test_each_malformed_sample_is_one_error_row_and_the_rest_is_embedded(hostile_store, capsys):
    out, shards, code = hostile_store
    assert code == 1  # shard 00001 failed: listed, exit 1
    meta = store.read_metadata(out, "00000").to_pydict()
    errors = dict(
        zip(*pq.read_table(store.field_path(out, "errors", "00000")).to_pydict().values(), strict=True)
    )
    assert meta["key"] == [
        "000000000",
        "000000001",
        "000000002",
        "000000012",
        "000000013",
        "000000020",
        "000000004",
    ]
    assert errors["000000010"].startswith("unparsable .json")
    assert errors["000000011"] == ".json is not an object (a list)"
    assert errors["000000014"].startswith("cannot decode image")
    assert errors["000000099"] == "downloaded (img2dataset record) but not in the tar"
    assert sum(k == "000000001" for k in meta["key"]) == 1  # the duplicate is an error row, not a second row
    assert errors["000000001"].startswith("duplicate key") and errors["000000004"].startswith("duplicate key")
    marker = store.read_done(out, "00000")
    assert marker["rows"] == 7 and marker["errors"] == 6 and marker["empty_captions"] == 1
    assert marker["checked_against_download_record"] is True
    assert meta["caption"][5] == ""  # not "nan"
    assert meta["width"][3] == "x" and meta["width"][0] == "48"  # mixed types kept as text, not a lost shard
    assert not store.is_done(out, "00001") and not list((out / "img_emb").glob("*00001*"))
    summary = json.loads((out / "logs" / "embed_summary.json").read_text())
    assert "truncated or damaged after" in summary["failed"][str(shards / "00001.tar")]
    assert main(["validate", str(out)]) == 0  # what was written validates, on every rerun


def tiff32(signed: bool = True) -> bytes:
    """A 32-bit grey TIFF (PIL's mode "I", as 16-bit PNGs opened in older Pillow) at 3/4 of full scale, signed
    as PIL writes it, or unsigned (its SampleFormat tag patched: PIL writes only signed ones)."""
    buf = io.BytesIO()
    value = 3 * 2**29 if signed else 3 * 2**30
    Image.fromarray(np.full((40, 40), value, dtype=np.uint32).view(np.int32)).save(buf, format="TIFF")
    data = buf.getvalue()
    if not signed:  # tag 339 (SampleFormat), SHORT, count 1, value 2 -> 1
        entry = b"\x53\x01\x03\x00\x01\x00\x00\x00"
        assert data.count(entry + b"\x02\x00") == 1
        data = data.replace(entry + b"\x02\x00", entry + b"\x01\x00")
    return data


def test_sixteen_and_thirty_two_bit_and_gif_images_decode_to_their_colours():
    from pipeline.shard_samples import Sample, decode

    grey, _ = decode(Sample("a", png16(), "grey", {}))
    grey32, _ = decode(Sample("c", tiff32(), "grey", {}))
    unsigned32, _ = decode(Sample("d", tiff32(signed=False), "grey", {}))
    red, _ = decode(Sample("b", gif(), "red", {}))
    assert np.asarray(grey)[0, 0].tolist() == [191, 191, 191]
    assert np.asarray(grey32)[0, 0].tolist() == [191, 191, 191]  # was 255: scaled as if 16-bit, then clipped
    assert np.asarray(unsigned32)[0, 0].tolist() == [191, 191, 191]  # read as int32: negative, then black
    assert np.asarray(red)[0, 0].tolist() == [200, 30, 30]


# ---------------------------------------------------------------- 5. one line, exit 2, nothing written


class Evil:  # a pickle global that weights_only loading must refuse (and not run)
    def __reduce__(self):
        return (print, ("this code ran",))


def _run_case(case: str, work: dict, tmp: Path, monkeypatch) -> tuple[str, list[str], Path]:
    """(command, argv, the folder that must be left as it was) for one hostile case."""
    out = tmp / "out"
    good, run = str(work["good"]), tmp / "run"
    tp = ["train-prior", "--preset", "tiny", "--steps", "4", "--batch-size", "8", "--device", "cpu"]
    ep = ["eval-prior", "--steps", "2", "--device", "cpu"]
    if case in (
        "latest_names_a_missing_step",
        "state_pt_holds_code",
        "truncated_weights",
        "resume_other_store",
        "resume_row_order",
        "eval_other_version_config",
    ):
        shutil.copytree(work["run"], run)
        step = run / "ckpt" / "step_00000004"
        if case == "latest_names_a_missing_step":
            (run / "ckpt" / "latest").write_text("step_00000999")
        elif case == "state_pt_holds_code":
            torch.save({"opt": Evil()}, step / "state.pt")
        elif case == "truncated_weights":
            (step / "ema.safetensors").write_bytes((step / "ema.safetensors").read_bytes()[:200])
        elif case == "resume_row_order":  # as written before the stream ordered rows by key
            meta = json.loads((step / "meta.json").read_text())
            del meta["stream_order"]
            (step / "meta.json").write_text(json.dumps(meta))
        elif (
            case == "eval_other_version_config"
        ):  # a field this code does not know: was a TypeError traceback
            meta = json.loads((step / "meta.json").read_text())
            meta["model"]["future_field"] = 1
            (step / "meta.json").write_text(json.dumps(meta))
    if case in ("train_manifest_not_json", "eval_done_marker_not_json"):
        shutil.copytree(work["good"], tmp / "damaged")
        good = str(tmp / "damaged")
        damaged = tmp / "damaged" / ("manifest.json" if case.startswith("train") else "done/00000.json")
        damaged.write_text('{"clip": {"arch": ')
    if case == "train_done_marker_without_rows":  # valid JSON, edited by hand: was a KeyError traceback
        shutil.copytree(work["good"], tmp / "damaged")
        good = str(tmp / "damaged")
        (tmp / "damaged" / "done" / "00001.json").write_text('{"shard": "00001", "files": {}}')
    shards = tmp / "shards"
    write_tar(shards / "00000.tar", [sample("000000000", 0)])
    table = {
        "train_manifest_not_json": (tp[0], [*tp[1:], "--data", good, "--out", out]),
        "eval_done_marker_not_json": (ep[0], [*ep[1:], "--ckpt", work["run"], "--data", good]),
        "train_done_marker_without_rows": (tp[0], [*tp[1:], "--data", good, "--out", out]),
        "download_bad_jsonl_line": ("download", ["--urls", "u.jsonl", "--out", out]),
        "download_caption_not_text": ("download", ["--urls", "c.jsonl", "--out", out]),
        "download_parquet_caption_not_text": ("download", ["--urls", "n.parquet", "--out", out]),
        "download_out_is_a_file": ("download", ["--urls", "ok.parquet", "--out", tmp / "file"]),
        "download_out_has_foreign_json": ("download", ["--urls", "ok.parquet", "--out", out]),
        "embed_hub_unreachable": ("embed", ["--shards", shards, "--out", out, "--clip", "ViT-B-32"]),
        "embed_out_is_a_file": ("embed", ["--shards", shards, "--out", tmp / "file", *TINY]),
        "embed_unknown_device": ("embed", ["--shards", shards, "--out", out, *TINY, "--device", "gpu"]),
        "train_empty_store": (tp[0], [*tp[1:], "--data", work["empty"], "--out", out]),
        "train_val_fraction_1": (tp[0], [*tp[1:], "--data", good, "--out", out, "--val-fraction", "1"]),
        "train_batch_larger_than_data": (
            tp[0],
            [*tp[1:], "--data", good, "--out", out, "--batch-size", "999"],
        ),
        "train_batch_0": (tp[0], [*tp[1:], "--data", good, "--out", out, "--batch-size", "0"]),
        "train_lr_negative": (tp[0], [*tp[1:], "--data", good, "--out", out, "--lr", "-1"]),
        "train_lr_nan": (tp[0], [*tp[1:], "--data", good, "--out", out, "--lr", "nan"]),
        "train_steps_0": (tp[0], [*tp[1:], "--data", good, "--out", out, "--steps", "0"]),
        "train_eval_samples_0": (tp[0], [*tp[1:], "--data", good, "--out", out, "--eval-samples", "0"]),
        "train_sample_steps_0": (tp[0], [*tp[1:], "--data", good, "--out", out, "--sample-steps", "0"]),
        "train_guidance_negative": (tp[0], [*tp[1:], "--data", good, "--out", out, "--guidance-scale", "-2"]),
        "train_missing_data": (tp[0], [*tp[1:], "--data", tmp / "nowhere", "--out", out]),
        "train_unknown_device": (tp[0], [*tp[1:], "--data", good, "--out", out, "--device", "tpu"]),
        "latest_names_a_missing_step": (tp[0], [*tp[1:], "--data", good, "--out", run, "--resume"]),
        "state_pt_holds_code": (tp[0], [*tp[1:], "--data", good, "--out", run, "--resume"]),
        "resume_row_order": (tp[0], [*tp[1:], "--data", good, "--out", run, "--resume"]),
        "resume_other_store": (tp[0], [*tp[1:], "--data", work["wide"], "--out", run, "--resume"]),
        "truncated_weights": (ep[0], [*ep[1:], "--ckpt", run, "--data", good]),
        "eval_missing_checkpoint": (ep[0], [*ep[1:], "--ckpt", tmp / "nothing", "--data", good]),
        "eval_other_embedding_size": (ep[0], [*ep[1:], "--ckpt", work["run"], "--data", work["wide"]]),
        "eval_unknown_split": (ep[0], [*ep[1:], "--ckpt", work["run"], "--data", good, "--split", "test"]),
        "eval_empty_store": (ep[0], [*ep[1:], "--ckpt", work["run"], "--data", work["empty"]]),
        "eval_steps_0": (ep[0], [*ep[1:], "--ckpt", work["run"], "--data", good, "--steps", "0"]),
        "train_seed_negative": (tp[0], [*tp[1:], "--data", good, "--out", out, "--seed", "-1"]),
        "train_sample_steps_above_schedule": (
            tp[0],
            [*tp[1:], "--data", good, "--out", out, "--sample-steps", "1001"],
        ),  # fmt: skip
        "eval_other_version_config": (ep[0], [*ep[1:], "--ckpt", run, "--data", good]),
        "eval_max_samples_0": (ep[0], [*ep[1:], "--ckpt", work["run"], "--data", good, "--max-samples", "0"]),
        "sample_n_0": (
            "sample",
            [
                "--prior",
                work["run"],
                "--decoder",
                work["run"],
                "--prompt",
                "a",
                "--n",
                "0",
                "--out",
                out / "g.png",
            ],
        ),
        "sample_prior_is_not_a_decoder": (
            "sample",
            ["--prior", work["run"], "--decoder", work["run"], "--prompt", "a", "--out", out / "g.png"],
        ),
    }
    pq.write_table(pa.table({"url": ["http://127.0.0.1:9/a.jpg"], "caption": ["a"]}), tmp / "ok.parquet")
    pq.write_table(pa.table({"url": ["http://127.0.0.1:9/a.jpg"], "caption": [3]}), tmp / "n.parquet")
    lines = ['{"url": "http://127.0.0.1:9/a.jpg", "caption": "a"}'] * 3
    (tmp / "u.jsonl").write_text("\n".join(lines[:2] + ["{broken"] + lines) + "\n")
    (tmp / "c.jsonl").write_text(
        "\n".join(lines + ['{"url": "http://127.0.0.1:9/b.jpg", "caption": 7}']) + "\n"
    )
    (tmp / "file").write_text("a user's file")
    if case == "download_out_has_foreign_json":
        out.mkdir()
        (out / "settings.json").write_text("{}")
    if case == "embed_hub_unreachable":  # nothing listens there: refused at once, whatever the network
        monkeypatch.setenv("HF_ENDPOINT", "https://127.0.0.1:9")
    command, argv = table[case]
    argv = [str(tmp / a) if a in ("u.jsonl", "c.jsonl", "n.parquet", "ok.parquet") else str(a) for a in argv]
    watched = {
        "latest_names_a_missing_step": run,
        "state_pt_holds_code": run,
        "resume_other_store": run,
        "resume_row_order": run,
        "eval_other_version_config": run,
    }
    return command, argv, watched.get(case, tmp / "file" if "out_is_a_file" in case else out)


@pytest.mark.parametrize(
    "case, want",
    [
        ("download_bad_jsonl_line", "u.jsonl line 3 is not valid JSON"),
        ("download_caption_not_text", "c.jsonl line 4: 'caption' is not a string (7)"),
        ("download_parquet_caption_not_text", "--caption-col 'caption' of"),
        ("download_out_is_a_file", "is a file; name a folder for the shards"),
        (
            "download_out_has_foreign_json",
            "holds .json files that are not img2dataset shard stats (settings.json)",
        ),
        ("embed_hub_unreachable", "are not cached and 127.0.0.1 cannot be reached"),
        ("embed_out_is_a_file", "is a file, not a store folder"),
        ("embed_unknown_device", "unknown --device 'gpu'; valid: auto, cpu, cuda, cuda:N"),
        (
            "train_empty_store",
            "holds no rows to train on: its 2 finished shard(s) hold no rows (`unclip validate",
        ),
        ("train_val_fraction_1", "--val-fraction must be in [0, 1) (got 1.0)"),
        ("train_batch_larger_than_data", "lower --batch-size or --val-fraction, or add data"),
        ("train_batch_0", "--batch-size must be >= 1 (got 0)"),
        ("train_lr_negative", "--lr must be > 0"),
        ("train_lr_nan", "argument --lr: expected a finite number, got 'nan'"),
        ("train_steps_0", "--steps must be >= 1 (got 0)"),
        ("train_eval_samples_0", "--eval-samples must be >= 1 (got 0)"),
        ("train_sample_steps_0", "--sample-steps must be >= 1 (got 0)"),
        ("train_guidance_negative", "--guidance-scale must be >= 0 (1 = no guidance) (got -2.0)"),
        ("train_missing_data", "is not an embedding store (no manifest.json)"),
        ("train_manifest_not_json", "manifest.json is not valid JSON (Expecting value: line 1"),
        ("eval_done_marker_not_json", "done/00000.json is not valid JSON"),
        ("train_done_marker_without_rows", "done/00001.json is not a done marker (an object with its rows"),
        ("train_unknown_device", "unknown --device 'tpu'; valid: auto, cpu, cuda, cuda:N"),
        ("latest_names_a_missing_step", "names step_00000999, which is missing or incomplete"),
        ("state_pt_holds_code", "state.pt cannot be loaded safely"),
        (
            "resume_row_order",
            "good by row position, this version's by sample key, so the run cannot continue",
        ),
        ("resume_other_store", "checkpoint's model config differs"),
        ("truncated_weights", "ema.safetensors cannot be read as safetensors"),
        ("eval_missing_checkpoint", "no checkpoint at"),
        ("eval_other_embedding_size", "was trained on 16-d CLIP embeddings"),
        ("eval_unknown_split", "unknown --split 'test'; valid: train, val, all"),
        ("eval_empty_store", "the evaluation split is empty"),
        ("eval_steps_0", "--steps must be >= 1 (got 0)"),
        ("train_seed_negative", "--seed must be in [0, 2**63) (got -1)"),
        ("train_sample_steps_above_schedule", "--sample-steps must be between 1 and 1000"),
        ("eval_other_version_config", "its prior config cannot be built by this code"),
        ("eval_max_samples_0", "--max-samples must be >= 1 (got 0)"),
        ("sample_n_0", "--n must be >= 1, got 0"),
        ("sample_prior_is_not_a_decoder", "is a prior checkpoint, not a decoder"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_is_written(case, want, work, tmp_path, capsys, monkeypatch):
    command, argv, watched = _run_case(case, work, tmp_path, monkeypatch)
    before = files(watched)
    try:
        code = main([command, *argv])
    except SystemExit as e:  # argparse's own refusals (a flag's type or choices) exit 2 with one line too
        code = e.code
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1, err  # no usage block before it
        print(err, file=sys.stderr, end="")  # for one_line
    line = one_line(capsys, command, code, want)
    assert files(watched) == before, f"{case} changed {watched}"
    assert "this code ran" not in line


@pytest.mark.parametrize("command", ["embed", "train-prior", "train-decoder", "adopt", "download", "demo"])
def test_a_folder_another_command_is_writing_to_is_refused_in_one_line(command, work, tmp_path, capsys):
    """Two runs given one --out (the same `make` line in two terminals, a job array resubmitted while its first
    run works) used to write into it together: checkpoints of one with the optimiser state of the other."""
    from tests.test_adopt import ADOPT, write_clip_retrieval_folder

    out = tmp_path / "out"
    write_tar(tmp_path / "shards" / "00000.tar", [sample("000000000", 0)])
    pq.write_table(pa.table({"url": ["http://127.0.0.1:9/a.jpg"], "caption": ["a"]}), tmp_path / "u.parquet")
    train = ["--data", work["good"], "--out", out, "--steps", "2", "--batch-size", "8", "--device", "cpu"]
    argv = {
        "embed": ["--shards", tmp_path / "shards", "--out", out, *TINY],
        "train-prior": [*train, "--preset", "tiny"],
        "train-decoder": [*train, "--preset", "tiny"],
        "adopt": [out, *ADOPT],
        "download": ["--urls", tmp_path / "u.parquet", "--out", out],
        "demo": ["--out", out],
    }[command]
    if command == "adopt":
        write_clip_retrieval_folder(out, {0: 4})
    with store.hold_folder(out):
        if command == "embed":  # the running embed is writing its manifest: the refused one leaves it be
            (out / f".{store.MANIFEST}.tmp4242").write_text('{"clip": ')
        before = files(out)
        code = main([command, *map(str, argv)])
        one_line(capsys, command, code, f"{out} is in use: another unclip command is writing to it")
        assert files(out) == before


# ---------------------------------------------------------------- 6. validate names every kind of damage


def _rewrite(root: Path, rel: str, change) -> None:
    p = root / rel
    a = np.load(p)
    np.save(p, change(a))
    m = store.read_done(root, rel.split("_")[-1].split(".")[0])
    m["files"][rel] = hashlib.sha256(p.read_bytes()).hexdigest()  # checksums agree: the deeper checks run
    store.write_json(store.done_path(root, m["shard"]), m)


def _nan_at(a: np.ndarray) -> np.ndarray:
    a = a.copy()
    a.flat[3] = np.nan
    return a


VALIDATE_CASES = {
    "nan_in_img_emb": (
        lambda r: _rewrite(r, "img_emb/img_emb_00000.npy", _nan_at),
        "00000: img_emb has NaN or inf",
    ),
    "inf_in_text_emb": (
        lambda r: _rewrite(
            r, "text_emb/text_emb_00001.npy", lambda a: np.where(a > 0.3, np.inf, a).astype(a.dtype)
        ),
        "00001: text_emb has NaN or inf",
    ),
    "nan_in_text_enc": (
        lambda r: _rewrite(r, "text_enc/text_enc_00000.npy", _nan_at),
        "00000: text_enc has NaN or inf",
    ),
    "latents_wrong_shape": (
        lambda r: _rewrite(r, "latents/latents_00001.npy", lambda a: a[:, :, :4]),
        "00001: latents are uint8[40, 3, 4, 8], manifest says uint8[40, 3, 8, 8]",
    ),
    "stray_file_in_latents": (
        lambda r: (r / "latents" / "latents_00009.npy").write_bytes(b"x"),
        "latents/latents_00009.npy: no done marker lists it",
    ),
    "partial_write_in_text_enc": (
        lambda r: (r / "text_enc" / ".text_enc_00002.npy.tmp123").write_bytes(b"x"),
        "text_enc/.text_enc_00002.npy.tmp123: temp file of an interrupted write",
    ),
    "marker_not_json": (
        lambda r: store.done_path(r, "00001").write_text("{oops"),
        "done/00001.json: 00001.json is not valid JSON",
    ),
    "marker_lacks_keys": (
        lambda r: store.done_path(r, "00000").write_text('{"shard": "00000"}'),
        "done/00000.json: 00000.json lacks or mistypes rows, files",
    ),
    "manifest_not_json": (lambda r: (r / store.MANIFEST).write_text("[1"), "manifest.json is not valid JSON"),
    "manifest_lacks_clip": (
        lambda r: (r / store.MANIFEST).write_text("{}"),
        "manifest.json lacks or mistypes clip",
    ),
    "metadata_unreadable": (
        lambda r: _replace_checksummed(r, "metadata/metadata_00000.parquet", b"PAR1 not parquet PAR1"),
        "00000: cannot read its files",
    ),
    # a damaged file that still matches its checksum: named, with the repair (not "run validate", from validate)
    "npy_unreadable": (
        lambda r: _replace_checksummed(r, "img_emb/img_emb_00000.npy", b"\x93NUMPY not an array"),
        "img_emb_00000.npy cannot be read (ValueError: ",
    ),
}


def _replace_checksummed(root: Path, rel: str, data: bytes) -> None:
    (root / rel).write_bytes(data)
    m = store.read_done(root, "00000")
    m["files"][rel] = hashlib.sha256(data).hexdigest()
    store.write_json(store.done_path(root, "00000"), m)


@pytest.mark.parametrize("case", list(VALIDATE_CASES))
def test_validate_names_each_kind_of_damage_without_a_traceback(case, work, tmp_path, capsys):
    root = tmp_path / "store"
    shutil.copytree(work["good"], root)
    assert main(["validate", str(root)]) == 0
    capsys.readouterr()
    damage, want = VALIDATE_CASES[case]
    damage(root)
    code = main(["validate", str(root)])
    captured = capsys.readouterr()
    assert code == 1 and "Traceback" not in captured.err
    assert any(want in ln for ln in captured.out.splitlines()), captured.out
    assert "`unclip validate" not in captured.out  # validate's own report never sends the user to validate
    if case.endswith("_unreadable"):
        assert "delete done/00000.json and rerun `unclip embed`" in captured.out


@pytest.mark.parametrize(
    "command, want",
    [
        ("train-prior", "interrupted; rerun it with --resume to continue from the last checkpoint"),
        ("embed", "interrupted; rerun the same command to continue"),
        ("sample", "interrupted; rerun the same command to start again"),
    ],
)
def test_ctrl_c_says_how_to_go_on(command, want, monkeypatch, capsys, tmp_path):
    """The trainers' rerun needs --resume (the same command is refused: --out holds a run); embed's is the
    same command; sampling starts over."""
    import importlib

    from jobs.cli import COMMANDS

    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib.import_module(COMMANDS[command].module), "run", interrupted)
    argv = {
        "train-prior": ["--data", str(tmp_path), "--out", str(tmp_path / "run")],
        "embed": ["--shards", str(tmp_path), "--out", str(tmp_path / "store")],
        "sample": ["--prior", "p", "--decoder", "d", "--prompt", "a"],
    }[command]
    assert main([command, *argv]) == 130
    assert capsys.readouterr().err.strip() == f"unclip {command}: {want}"


@pytest.mark.parametrize(
    "rel, damage",
    [
        ("img_emb/img_emb_00000.npy", "cut"),
        ("metadata/metadata_00000.parquet", "cut"),
        ("metadata/metadata_00000.parquet", "remove"),
    ],
)
def test_a_damaged_store_file_names_the_file_and_validate(rel, damage, work, tmp_path, capsys):
    """Metadata is read as the run opens the store: damage there is the input's, exit 2 before anything is
    written (it was exit 1); an embedding file is read when its first batch is, exit 1."""
    shutil.copytree(work["good"], tmp_path / "damaged")
    f = tmp_path / "damaged" / rel
    if damage == "cut":
        f.write_bytes(f.read_bytes()[:300])
    else:
        f.unlink()
    args = ["--data", str(tmp_path / "damaged"), "--out", str(tmp_path / "run"), "--preset", "tiny"]
    code = main(
        ["train-prior", *args, "--steps", "2", "--batch-size", "8", "--eval-every", "0", "--device", "cpu"]
    )
    on_opening = rel.startswith("metadata/")
    line = one_line(
        capsys, "train-prior", code, f"{Path(rel).name} cannot be read", rc=2 if on_opening else 1
    )
    assert f"`unclip validate {tmp_path / 'damaged'}`" in line
    assert (tmp_path / "run").exists() is not on_opening


def test_a_metadata_column_that_is_not_there_is_named_not_called_damage(work):
    with pytest.raises(StageError) as e:
        store.read_metadata(work["good"], "00000", ["caption", "no_such_column"])
    assert "has no column no_such_column (it has " in str(e.value) and "validate" not in str(e.value)


def test_overwrite_wipes_a_store_whose_manifest_or_marker_does_not_read(work, tmp_path):
    out = tmp_path / "store"
    shutil.copytree(work["good"], out)
    shards = store.done_shards(out)
    later = [rel for rel in store.read_done(out, shards[-1])["files"]]
    store.done_path(out, shards[0]).write_text("{torn")  # the first marker: wipe must go on past it
    (out / "manifest.json").write_text("{torn")
    (out / "notes.txt").write_text("mine")
    new = tmp_path / "shards"
    write_tar(new / "00007.tar", [sample(f"00007{i:04d}", i) for i in range(3)])
    assert main(["embed", "--shards", str(new), "--out", str(out), *TINY, "--overwrite"]) == 0
    assert later and not any((out / rel).exists() for rel in later)
    assert store.done_shards(out) == ["00007"] and (out / "notes.txt").read_text() == "mine"


def test_overwrite_killed_right_after_its_wipe_is_still_a_store_a_rerun_takes(work, tmp_path, monkeypatch):
    """The wipe leaves the files no marker lists (a partial shard's, a user's): were the old manifest deleted
    and the kill to land before the new one, the folder would be refused as "not a store" for good."""
    out = tmp_path / "store"
    shutil.copytree(work["good"], out)
    partial = store.done_shards(out)[-1]
    store.done_path(out, partial).unlink()  # a shard killed after its files, before its marker
    (out / "img_emb" / "my_notes.txt").write_text("mine")
    shards = tmp_path / "shards"
    write_tar(shards / "00007.tar", [sample(f"00007{i:04d}", i) for i in range(3)])
    args = ["embed", "--shards", str(shards), "--out", str(out), *TINY, "--overwrite", "--seed", "5"]
    real = store.wipe

    def wipe_then_die(root, **kw):
        real(root, **kw)
        raise KeyboardInterrupt  # the kill, right after the wipe

    monkeypatch.setattr(store, "wipe", wipe_then_die)
    assert main(args) == 130
    assert store.load_manifest(out)["identity"]["seed"] == 5  # the new settings' manifest, no done shards
    monkeypatch.setattr(store, "wipe", real)
    assert main(args) == 0
    assert store.done_shards(out) == ["00007"] and (out / "img_emb" / "my_notes.txt").read_text() == "mine"


def test_overwrite_killed_during_its_wipe_leaves_no_marker_whose_files_are_gone(work, tmp_path, monkeypatch):
    """The wipe deleted a shard's files before its marker: killed in between, a rerun with the old settings
    (the old manifest still there) skipped that shard as done and exited 0 over missing files."""
    out = tmp_path / "store"
    shutil.copytree(work["good"], out)
    unlink, calls = Path.unlink, []

    def dying_unlink(self, *a, **kw):
        calls.append(self.name)
        if len(calls) == 3:  # some way into the first shard
            raise KeyboardInterrupt
        return unlink(self, *a, **kw)

    monkeypatch.setattr(Path, "unlink", dying_unlink)
    with pytest.raises(KeyboardInterrupt):
        store.wipe(out, new_manifest=store.load_manifest(out))
    monkeypatch.setattr(Path, "unlink", unlink)
    assert calls[0].endswith(".json")  # the marker went first
    for s in store.done_shards(out):
        assert all((out / rel).exists() for rel in store.read_done(out, s)["files"]), s
    # ... and the same --overwrite, run again, removes the files that the killed wipe left unlisted: they were
    # left for good (validate then failed on a store the rerun called finished)
    shards = tmp_path / "shards"
    write_tar(shards / "00007.tar", [sample(f"00007{i:04d}", i) for i in range(3)])
    assert main(["embed", "--shards", str(shards), "--out", str(out), *TINY, "--overwrite"]) == 0
    assert store.done_shards(out) == ["00007"]
    assert sorted(p.name for p in (out / "img_emb").iterdir()) == ["img_emb_00007.npy"]
    assert not (out / "latents").exists() and not (out / "text_enc").exists()  # folders it left empty go too
    assert main(["validate", str(out)]) == 0


def test_overwrite_with_the_stores_own_settings_continues_it(work, tmp_path, capsys):
    """The same command rerun after a Ctrl-C, --overwrite in it: it wiped every finished shard each time."""
    out = tmp_path / "store"
    shards = tmp_path / "shards"
    for n in (0, 1):
        write_tar(shards / f"0000{n}.tar", [sample(f"0000{n}{i:04d}", i) for i in range(3)])
    args = ["embed", "--shards", str(shards), "--out", str(out), *TINY, "--overwrite", "--seed", "9"]
    assert main(args) == 0
    marker = store.done_path(out, "00000").read_bytes()
    store.remove_shard(out, "00001")  # as if interrupted before its last shard
    capsys.readouterr()
    assert main(args) == 0
    assert '"rows_this_run": 3' in capsys.readouterr().out  # only the missing shard ran
    assert store.done_path(out, "00000").read_bytes() == marker and store.done_shards(out) == [
        "00000",
        "00001",
    ]


def test_a_first_run_killed_writing_its_manifest_leaves_a_folder_the_rerun_takes(tmp_path):
    """Its temp file was all the folder held, and every later run refused it as "not empty, not a store"."""
    out = tmp_path / "store"
    out.mkdir()
    (out / ".manifest.json.tmp4242").write_text('{"clip": ')
    shards = tmp_path / "shards"
    write_tar(shards / "00000.tar", [sample(f"00000{i:04d}", i) for i in range(3)])
    assert main(["embed", "--shards", str(shards), "--out", str(out), *TINY]) == 0
    assert store.done_shards(out) == ["00000"] and not list(out.glob(".manifest.json.tmp*"))
