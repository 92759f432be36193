"""`unclip adopt`: a folder written the way clip-retrieval writes it (unpadded shard numbers with a gap,
float16 embeddings, metadata with image_path/caption/url and no key column) becomes a store that validate,
the stream and train-prior accept, with only manifest.json and done/ added."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.cli import main
from pipeline import store
from pipeline.stream import Stream, StreamConfig

DIM = 64  # unclip-tiny's embedding size
ADOPT = ["--clip", "unclip-tiny", "--pretrained", "none"]


def write_clip_retrieval_folder(
    root: Path, rows: dict[int, int], dtype="float16", scale: float = 1.0, seed: int = 0
) -> None:
    """img_emb/img_emb_{n}.npy, text_emb/text_emb_{n}.npy, metadata/metadata_{n}.parquet, n unpadded. The text
    embeddings are ADOPT's model's of the captions (adopt checks the model against them); the image ones random."""
    rng = np.random.default_rng(0)
    for n, count in rows.items():
        captions = [f"picture {i} of part {n}" for i in range(count)]
        for field in ("img_emb", "text_emb"):
            x = rng.normal(size=(count, DIM)) if field == "img_emb" else text_embeddings(captions, seed)
            x = scale * x / np.linalg.norm(x, axis=1, keepdims=True)
            (root / field).mkdir(parents=True, exist_ok=True)
            np.save(root / field / f"{field}_{n}.npy", x.astype(dtype))
        (root / "metadata").mkdir(exist_ok=True)
        pq.write_table(
            pa.table(
                {
                    "image_path": [f"{n}_{i:04d}" for i in range(count)],
                    "caption": captions,
                    "url": [f"http://img.test/{n}/{i}.jpg" for i in range(count)],
                }
            ),
            root / "metadata" / f"metadata_{n}.parquet",
        )


def text_embeddings(captions: list[str], seed: int = 0) -> np.ndarray:
    """unclip-tiny's (random weights of ``seed``) text embeddings of ``captions``, unit norm, float64."""
    import torch

    from pipeline.encoders import encode_text, load_clip, normalize

    clip = load_clip("unclip-tiny", "none", "cpu", seed)
    if not captions:
        return np.zeros((0, DIM))
    with torch.no_grad():
        return normalize(encode_text(clip, clip.tokenizer(captions))[0]).double().numpy()


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_adopted_folder_validates_streams_in_order_and_trains(tmp_path, capsys):
    folder = tmp_path / "laion"
    write_clip_retrieval_folder(folder, {0: 30, 1: 25, 3: 20, 10: 15})  # a gap, and 10 after 3, not after 1
    before = snapshot(folder)
    assert main(["adopt", str(folder), *ADOPT]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rows"] == 90 and report["shards"] == 4 and report["adopted_now"]
    after = snapshot(folder)
    added = sorted(set(after) - set(before))
    assert added == ["done/0.json", "done/1.json", "done/10.json", "done/3.json", "manifest.json"]
    assert {k: after[k] for k in before} == before  # the data is neither moved nor rewritten
    assert main(["validate", str(folder)]) == 0
    capsys.readouterr()

    stream = Stream(StreamConfig(str(folder), batch_size=90, split="all"))
    batch = next(stream.batches())
    expected = np.concatenate([np.load(folder / "img_emb" / f"img_emb_{n}.npy") for n in (0, 1, 3, 10)])
    assert np.array_equal(batch["img_emb"], expected)  # numeric shard order, rows aligned

    mtimes = {p: p.stat().st_mtime_ns for p in folder.rglob("*")}
    assert main(["adopt", str(folder), *ADOPT]) == 0  # a rerun is a no-op
    assert json.loads(capsys.readouterr().out)["adopted_now"] is False
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*")} == mtimes

    run = ["--data", str(folder), "--out", str(tmp_path / "prior"), "--preset", "tiny", "--steps", "3"]
    assert main(["train-prior", *run, "--batch-size", "8", "--device", "cpu", "--eval-every", "0"]) == 0
    assert (tmp_path / "prior" / "ckpt" / "latest").exists()


def test_unnormalised_embeddings_are_stated_and_normalised_on_read_when_asked(tmp_path, capsys):
    folder = tmp_path / "raw"
    write_clip_retrieval_folder(folder, {0: 12, 1: 8}, dtype="float32", scale=7.0)
    copy = tmp_path / "raw_norm"
    shutil.copytree(folder, copy)
    assert main(["adopt", str(folder), *ADOPT]) == 0
    assert "NOT normalised (pass --normalize" in json.loads(capsys.readouterr().out)["norms"]
    assert main(["adopt", str(copy), *ADOPT, "--normalize"]) == 0
    assert "normalised on read" in json.loads(capsys.readouterr().out)["norms"]
    assert main(["validate", str(copy)]) == 0
    raw = next(Stream(StreamConfig(str(folder), batch_size=20, split="all")).batches())["img_emb"]
    unit = next(Stream(StreamConfig(str(copy), batch_size=20, split="all")).batches())["img_emb"]
    assert raw.dtype == np.float32 and np.allclose(np.linalg.norm(raw, axis=1), 7.0, atol=1e-4)
    assert np.allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-5)
    assert np.allclose(unit * 7.0, raw, atol=1e-4)


def _break(folder: Path, case: str) -> None:
    if case == "row_counts_differ":
        np.save(folder / "text_emb" / "text_emb_1.npy", np.load(folder / "text_emb" / "text_emb_1.npy")[:-1])
    elif case == "wrong_dim_for_the_clip":
        for n in (0, 1):
            np.save(
                folder / "img_emb" / f"img_emb_{n}.npy", (np.ones((10, 32)) / np.sqrt(32)).astype(np.float16)
            )
    elif case == "nan_rows":
        a = np.load(folder / "img_emb" / "img_emb_0.npy")
        a[3, 0] = np.nan
        np.save(folder / "img_emb" / "img_emb_0.npy", a)
    elif case == "dtypes_differ":
        a = np.load(folder / "text_emb" / "text_emb_1.npy")
        np.save(folder / "text_emb" / "text_emb_1.npy", a.astype(np.float32))
    elif case == "missing_text_emb":
        (folder / "text_emb" / "text_emb_0.npy").unlink()
    elif case == "missing_img_emb":  # its shard's other files still there: once passed over, rows and all
        (folder / "img_emb" / "img_emb_1.npy").unlink()
    elif case == "padded_in_one_folder":
        (folder / "metadata" / "metadata_1.parquet").rename(folder / "metadata" / "metadata_00001.parquet")
    elif case == "integer_embeddings":
        np.save(folder / "img_emb" / "img_emb_0.npy", np.zeros((10, DIM), np.int8))
    elif case == "not_an_embedding_folder":
        shutil.rmtree(folder / "img_emb")
    elif case == "metadata_not_parquet":
        (folder / "metadata" / "metadata_1.parquet").write_bytes(b"not parquet at all")
    elif case in ("null_key", "key_twice"):  # passed adopt and validate; training stopped at the null
        path = folder / "metadata" / "metadata_1.parquet"
        keys = [f"1{i:04d}" for i in range(10)]
        keys[5] = None if case == "null_key" else keys[6]
        pq.write_table(pq.read_table(path).append_column("key", pa.array(keys, pa.string())), path)
    elif case == "zero_rows":  # adopted and trained on, and two of them marked the folder "not normalised"
        a = np.load(folder / "img_emb" / "img_emb_1.npy")
        a[[2, 7]] = 0
        np.save(folder / "img_emb" / "img_emb_1.npy", a)
    elif case == "no_rows":  # adopted, with "norm_min": Infinity in its manifest (not JSON)
        for n in (0, 1):
            for field in ("img_emb", "text_emb"):
                np.save(folder / field / f"{field}_{n}.npy", np.zeros((0, DIM), np.float16))
            path = folder / "metadata" / f"metadata_{n}.parquet"
            pq.write_table(pq.read_table(path).slice(0, 0), path)


@pytest.mark.parametrize(
    "case, want",
    [
        ("row_counts_differ", "shard 1: row counts differ: img_emb 10, text_emb 9, metadata 10"),
        ("wrong_dim_for_the_clip", "shard 0: img_emb is 32-d; the named CLIP model gives 64-d"),
        ("nan_rows", "shard 0: img_emb has NaN or inf rows"),
        ("dtypes_differ", "dtypes differ across shards"),
        ("missing_text_emb", "shard 0: text_emb/text_emb_0.npy is missing"),
        ("missing_img_emb", "shard 1: img_emb/img_emb_1.npy is missing"),
        ("padded_in_one_folder", "the folders name shard 00001 and 1 differently"),
        ("integer_embeddings", "shard 0: img_emb is int8[10, 64]; expected float16 or float32"),
        ("not_an_embedding_folder", "has no img_emb/ folder"),
        ("metadata_not_parquet", "shard 1: metadata/metadata_1.parquet is not readable parquet"),
        ("null_key", "shard 1: metadata/metadata_1.parquet: its key column has 1 null key(s) (row 5 first)"),
        ("key_twice", "shard 1: metadata/metadata_1.parquet: its key column holds a key twice"),
        ("zero_rows", "shard 1: img_emb has 2 all-zero row(s), which are no embeddings"),
        ("no_rows", "its 2 shard(s) hold no rows: nothing to train on"),
    ],
)
def test_a_folder_that_fails_a_check_is_one_line_exit_2_and_nothing_written(case, want, tmp_path, capsys):
    folder = tmp_path / "f"
    write_clip_retrieval_folder(folder, {0: 10, 1: 10})
    _break(folder, case)
    before = snapshot(folder)
    assert main(["adopt", str(folder), *ADOPT]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("unclip adopt: error: ") and want in err[0], err
    assert snapshot(folder) == before


def test_many_problems_list_the_first_few_then_a_count(tmp_path, capsys):
    folder = tmp_path / "f"
    write_clip_retrieval_folder(folder, {n: 4 for n in range(9)})
    for n in range(9):
        (folder / "metadata" / f"metadata_{n}.parquet").unlink()
    assert main(["adopt", str(folder), *ADOPT]) == 2
    err = capsys.readouterr().err
    assert err.count("is missing") == 5 and "; and 4 more" in err
    assert not (folder / store.MANIFEST).exists() and not (folder / "done").exists()


def test_a_rerun_after_a_shard_left_the_folder_drops_its_marker_and_the_store_validates_and_trains(
    tmp_path, capsys
):
    folder = tmp_path / "laion"
    write_clip_retrieval_folder(folder, {0: 12, 1: 10, 2: 8})
    assert main(["adopt", str(folder), *ADOPT]) == 0
    capsys.readouterr()
    for field, ext in (("img_emb", "npy"), ("text_emb", "npy"), ("metadata", "parquet")):
        (folder / field / f"{field}_1.{ext}").unlink()
    assert main(["adopt", str(folder), *ADOPT]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["adopted_now"] and report["rows"] == 20 and report["shards"] == 2
    assert store.done_shards(folder) == ["0", "2"]
    assert [s["shard"] for s in store.load_manifest(folder)["shards"]] == ["0", "2"]
    assert main(["validate", str(folder)]) == 0
    run = ["--data", str(folder), "--out", str(tmp_path / "prior"), "--preset", "tiny", "--steps", "2"]
    assert main(["train-prior", *run, "--batch-size", "8", "--device", "cpu", "--eval-every", "0"]) == 0


def test_validate_on_an_adopted_folder_checks_no_tars_and_names_adopt_as_the_fix(
    tmp_path, capsys, caplog, monkeypatch
):
    folder = tmp_path / "laion"
    write_clip_retrieval_folder(folder, {0: 6, 1: 6})
    for n in (0, 1):  # with keys, as clip-retrieval writes them from webdataset input
        meta = folder / "metadata" / f"metadata_{n}.parquet"
        table = pq.read_table(meta)
        pq.write_table(table.append_column("key", table["image_path"]), meta)
    assert main(["adopt", str(folder), *ADOPT]) == 0
    monkeypatch.chdir(tmp_path)
    (tmp_path / "adopted").write_bytes(b"not a tar")  # "adopted" is each marker's source, not a path to open
    capsys.readouterr()
    with caplog.at_level("WARNING"):
        assert main(["validate", str(folder)]) == 0
    assert "source tar" not in caplog.text
    npy = folder / "img_emb" / "img_emb_1.npy"
    npy.write_bytes(npy.read_bytes()[:-2] + b"\x00\x3c")
    assert main(["validate", str(folder)]) == 1
    assert (
        f"1: checksum mismatch for img_emb/img_emb_1.npy; delete done/1.json and rerun `unclip adopt {folder} --clip unclip-tiny --pretrained none`"
        in (capsys.readouterr().out)
    )


@pytest.mark.parametrize("overwrite", [False, True])
def test_embed_never_writes_into_an_adopted_folder_even_with_overwrite(overwrite, tmp_path, capsys):
    """An adopted folder's done markers list the user's own embeddings: --overwrite used to delete them all."""
    from tests.test_embed import TINY, sample, write_tar

    folder = tmp_path / "laion"
    write_clip_retrieval_folder(folder, {0: 6, 1: 6})
    assert main(["adopt", str(folder), *ADOPT]) == 0
    before = snapshot(folder)
    write_tar(tmp_path / "shards" / "00000.tar", [sample(f"0000{i:05d}", i) for i in range(3)])
    args = ["embed", "--shards", str(tmp_path / "shards"), "--out", str(folder), *TINY]
    capsys.readouterr()
    assert main(args + (["--overwrite"] if overwrite else [])) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "is a folder adopted with `unclip adopt`" in err
    assert snapshot(folder) == before
    if overwrite:  # its manifest cut short: the markers still say whose files these are
        (folder / store.MANIFEST).write_text('{"clip": ')
        before = snapshot(folder)
        assert main(args + ["--overwrite"]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "holds done markers of `unclip adopt`" in err
        assert snapshot(folder) == before
        for marker in (folder / "done").iterdir():  # and with the markers unreadable too: the embeddings stay
            marker.write_text("{")
        assert main(args + ["--overwrite"]) == 0
        assert {k: v for k, v in snapshot(folder).items() if k.split("/")[0] in ("img_emb", "text_emb")} == {
            k: v for k, v in before.items() if k.split("/")[0] in ("img_emb", "text_emb")
        } | {k: v for k, v in snapshot(folder).items() if k.endswith("_00000.npy")}


def test_a_folder_that_cannot_be_written_is_one_line_before_the_checksums(tmp_path, capsys, monkeypatch):
    """A read-only mount (as LAION's sets often are): a PermissionError traceback after hashing every file."""
    import pipeline.adopt as adopt

    folder = tmp_path / "ro"
    write_clip_retrieval_folder(folder, {0: 10, 1: 10})
    digests = []
    monkeypatch.setattr(adopt, "_digest", lambda p: digests.append(p) or "x")
    monkeypatch.setattr(store, "unwritable", lambda p: folder if Path(p) == folder else None)
    before = snapshot(folder)
    assert main(["adopt", str(folder), *ADOPT]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{folder} is not writable" in err[0], err
    assert not digests and snapshot(folder) == before


def test_a_rerun_hashes_again_only_the_shards_whose_files_changed(tmp_path, capsys, monkeypatch):
    """The rerun used to be a no-op whenever the shard ids and the manifest were the same: new captions written
    into a shard's metadata kept the old checksum in its marker, and validate then called the store damaged."""
    import pipeline.adopt as adopt

    folder = tmp_path / "laion"
    write_clip_retrieval_folder(folder, {0: 8, 1: 8, 2: 8})
    assert main(["adopt", str(folder), *ADOPT]) == 0
    meta = folder / "metadata" / "metadata_1.parquet"
    table = pq.read_table(meta)
    pq.write_table(table.set_column(1, "caption", pa.array([f"recaptioned {i}" for i in range(8)])), meta)
    hashed = []
    digest = adopt._digest
    monkeypatch.setattr(adopt, "_digest", lambda p: hashed.append(p.name) or digest(p))
    capsys.readouterr()
    assert main(["adopt", str(folder), *ADOPT]) == 0
    assert json.loads(capsys.readouterr().out)["adopted_now"] is True
    assert sorted(hashed) == ["img_emb_1.npy", "metadata_1.parquet", "text_emb_1.npy"]
    assert main(["validate", str(folder)]) == 0
    hashed.clear()
    capsys.readouterr()
    assert main(["adopt", str(folder), *ADOPT]) == 0  # unchanged since: nothing hashed
    assert json.loads(capsys.readouterr().out)["adopted_now"] is False and hashed == []


def test_a_rerun_over_markers_without_file_times_writes_nothing_on_a_read_only_folder(
    tmp_path, capsys, monkeypatch
):
    """Markers of an earlier version (or a copied folder) carry no file times: the rerun hashed every file and,
    on a read-only mount, refused where it used to be a no-op."""
    import pipeline.adopt as adopt

    folder = tmp_path / "laion"
    write_clip_retrieval_folder(folder, {0: 6, 1: 6})
    assert main(["adopt", str(folder), *ADOPT]) == 0
    for m in (folder / "done").iterdir():  # as an earlier version wrote them
        marker = json.loads(m.read_text())
        del marker["stat"]
        m.write_text(json.dumps(marker))
    before = snapshot(folder)
    with monkeypatch.context() as mp:
        mp.setattr(store, "unwritable", lambda p: folder if Path(p).is_relative_to(folder) else None)
        capsys.readouterr()
        assert main(["adopt", str(folder), *ADOPT]) == 0
        assert json.loads(capsys.readouterr().out)["adopted_now"] is False and snapshot(folder) == before
    assert main(["adopt", str(folder), *ADOPT]) == 0  # writable: the markers gain their files' times
    assert json.loads(capsys.readouterr().out)["adopted_now"] is False
    assert all("stat" in json.loads(m.read_text()) for m in (folder / "done").iterdir())
    hashed = []
    monkeypatch.setattr(adopt, "_digest", lambda p: hashed.append(p) or "x")
    assert main(["adopt", str(folder), *ADOPT]) == 0 and hashed == []


def test_a_damaged_manifest_of_an_adoption_is_written_again_by_adopt_and_validate_says_so(tmp_path, capsys):
    """No command could mend it: adopt refused it as damage, validate said to re-embed with --overwrite, and
    embed refuses an adopted folder."""
    folder = tmp_path / "f"
    write_clip_retrieval_folder(folder, {0: 10, 1: 10})
    assert main(["adopt", str(folder), *ADOPT]) == 0
    good = (folder / "manifest.json").read_bytes()
    (folder / "manifest.json").write_text('{"trunc')
    capsys.readouterr()
    assert main(["validate", str(folder)]) == 1
    assert "rerun `unclip adopt` on it with its --clip and --pretrained" in capsys.readouterr().out
    assert main(["adopt", str(folder), *ADOPT]) == 0
    assert (folder / "manifest.json").read_bytes() == good and main(["validate", str(folder)]) == 0
    # a manifest.json beside no marker of adopt's may be the user's own file: refused, not written over
    other = tmp_path / "g"
    write_clip_retrieval_folder(other, {0: 10})
    (other / "manifest.json").write_text('{"mine": true}')
    assert main(["adopt", str(other), *ADOPT]) == 2
    assert (other / "manifest.json").read_text() == '{"mine": true}'


def test_validate_passes_over_the_users_own_files_in_an_adopted_folder_but_not_a_shard_added_since(
    tmp_path, capsys
):
    """`_SUCCESS`, `.DS_Store` or notes in the field folders: adopt took the folder, validate failed it and
    said to rerun adopt, which changed nothing."""
    folder = tmp_path / "f"
    write_clip_retrieval_folder(folder, {0: 10, 1: 10})
    for extra in (
        "img_emb/_SUCCESS",
        "img_emb/.DS_Store",
        "metadata/notes.txt",
        "text_emb/text_emb_0.npy.bak",
    ):
        (folder / extra).write_text("the user's")
    assert main(["adopt", str(folder), *ADOPT]) == 0
    capsys.readouterr()
    assert main(["validate", str(folder)]) == 0
    write_clip_retrieval_folder(tmp_path / "more", {2: 10})  # a shard added since: listed by no marker
    for field, ext in (("img_emb", "npy"), ("text_emb", "npy"), ("metadata", "parquet")):
        shutil.copy(tmp_path / "more" / field / f"{field}_2.{ext}", folder / field)
    capsys.readouterr()
    assert main(["validate", str(folder)]) == 1
    out = capsys.readouterr().out
    assert "img_emb/img_emb_2.npy: no done marker lists it" in out and "_SUCCESS" not in out


def test_a_store_whose_files_are_of_another_width_than_its_manifest_is_one_line_at_training(tmp_path, capsys):
    """An adopted folder's embeddings replaced by narrower ones: a torch traceback (mat1 and mat2 shapes)."""
    folder = tmp_path / "f"
    write_clip_retrieval_folder(folder, {0: 40, 1: 40})
    assert main(["adopt", str(folder), *ADOPT]) == 0
    for n in (0, 1):
        for field in ("img_emb", "text_emb"):
            x = np.load(folder / field / f"{field}_{n}.npy")[:, :32]
            np.save(folder / field / f"{field}_{n}.npy", x / np.linalg.norm(x, axis=1, keepdims=True))
    args = ["--data", str(folder), "--out", str(tmp_path / "run"), "--steps", "2", "--batch-size", "8"]
    assert main(["train-prior", *args, "--eval-every", "0", "--device", "cpu"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "holds 40 rows of shape (32,) where its done marker says 40 rows of shape (64,)" in err[-1]


def test_temp_files_of_a_killed_adoption_are_reported_by_validate_and_removed_by_the_rerun(tmp_path, capsys):
    folder = tmp_path / "f"
    write_clip_retrieval_folder(folder, {0: 10, 1: 10})
    assert main(["adopt", str(folder), *ADOPT]) == 0
    (folder / "done/1.json").rename(folder / "done/.1.json.tmp4242")  # killed while it wrote shard 1's marker
    (folder / "metadata/.notes.txt.tmp7").write_text("the user's")  # not adopt's: never touched
    capsys.readouterr()
    assert main(["validate", str(folder)]) == 1
    out = capsys.readouterr().out
    assert "done/.1.json.tmp4242: temp file of an interrupted write" in out and "notes" not in out
    assert main(["adopt", str(folder), *ADOPT]) == 0
    assert not (folder / "done/.1.json.tmp4242").exists() and (folder / "metadata/.notes.txt.tmp7").exists()
    assert main(["validate", str(folder)]) == 0
    # a rerun with nothing else to write (killed while it rewrote markers of a copied folder) removes them too
    (folder / "done/.0.json.tmp4343").write_text("{")
    (folder / ".manifest.json.tmp4343").write_text("{")
    assert main(["adopt", str(folder), *ADOPT]) == 0
    assert not (folder / "done/.0.json.tmp4343").exists() and not (folder / ".manifest.json.tmp4343").exists()
    assert main(["validate", str(folder)]) == 0


def test_adopt_checks_the_named_clip_makes_the_folders_text_embeddings(tmp_path, capsys, monkeypatch):
    """A wrong --clip of the same size (ViT-L-14's openai weights for laion2b's, say) was adopted in silence, and
    a prior trained on it sampled from prompts embedded by another model."""
    from pipeline import adopt, encoders
    from pipeline.encoders import clip_probe, load_clip

    other = tmp_path / "other"
    write_clip_retrieval_folder(other, {0: 40, 1: 40}, seed=1)  # made by another model of unclip-tiny's size
    before = snapshot(other)
    assert main(["adopt", str(other), *ADOPT]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1
        and f"--clip unclip-tiny --pretrained none did not make {other}'s text embeddings" in err[0]
    )
    assert "the first 64 captions at a median cosine of" in err[0] and "--check-clip 0" in err[0]
    assert snapshot(other) == before
    assert main(["adopt", str(other), *ADOPT, "--check-clip", "0"]) == 0  # the user's word for it
    assert "probe" not in store.load_manifest(other)["clip"]

    folder = tmp_path / "laion"
    write_clip_retrieval_folder(folder, {0: 40, 1: 40})
    assert main(["adopt", str(folder), *ADOPT]) == 0
    probe = store.load_manifest(folder)["clip"]["probe"]
    assert probe == clip_probe(
        load_clip("unclip-tiny", "none", "cpu", 0)
    )  # what sample compares its CLIP with
    capsys.readouterr()

    def no_model(*_a, **_k):
        raise AssertionError("a rerun loaded the model")

    monkeypatch.setattr(encoders, "load_clip", no_model)
    mtimes = {p: p.stat().st_mtime_ns for p in folder.rglob("*")}
    assert main(["adopt", str(folder), *ADOPT]) == 0  # checked before: the earlier probe is kept
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*")} == mtimes
    monkeypatch.undo()

    bare = tmp_path / "bare"  # no caption column: nothing to check with, said so
    write_clip_retrieval_folder(bare, {0: 10})
    meta = bare / "metadata" / "metadata_0.parquet"
    pq.write_table(pq.read_table(meta).drop(["caption"]), meta)
    assert adopt.run(adopt.AdoptConfig(str(bare), "unclip-tiny", "none"))["rows"] == 10
    assert "probe" not in store.load_manifest(bare)["clip"]
