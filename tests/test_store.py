"""The store format: uint8 latent quantisation, atomic writes, the done marker written last."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pipeline import store
from pipeline.errors import UsageError
from tests.synthetic_store import make_store


def test_quantize_round_trip_is_within_half_a_step():
    rng = np.random.default_rng(0)
    x = (
        rng.normal(0, 1, (64, 4, 8, 8)).astype(np.float32)
        * np.array([1, 3, 0.5, 10], np.float32)[None, :, None, None]
    )
    lo, hi = store.fit_quantization(x)
    assert lo.shape == hi.shape == (4,) and (hi > lo).all()
    assert np.allclose(hi - lo, np.array([1, 3, 0.5, 10]) * (hi[0] - lo[0]), rtol=0.1)  # per channel
    q = store.quantize(x, lo, hi)
    assert q.dtype == np.uint8 and q.shape == x.shape
    assert q.min() == 0 and q.max() == 255
    step = (hi - lo)[None, :, None, None] / 255
    inside = (x >= lo[None, :, None, None]) & (x <= hi[None, :, None, None])
    err = np.abs(store.dequantize(q, lo, hi) - x)
    assert inside.mean() > 0.99 and np.broadcast_to(err <= step / 2 + 1e-6, x.shape)[inside].all()
    # outliers clip to the ends of the range
    assert (q[~inside] % 255 == 0).all()
    # the formula of the design: q = round((x - lo) / (hi - lo) * 255)
    assert store.quantize(
        np.array([[0.0, 0.5, 1.0, 0.502]], np.float32).reshape(1, 1, 4), [0.0], [1.0]
    ).tolist() == [[[0, 128, 255, 128]]]
    assert np.allclose(store.dequantize(np.array([[0, 255]], np.uint8), [-1.0], [1.0]), [[-1, 1]])


def test_fit_quantization_ignores_a_few_outliers():
    x = np.linspace(-1, 1, 10000, dtype=np.float32).reshape(100, 1, 100)
    x[0, 0, :5] = 1000.0
    lo, hi = store.fit_quantization(x)
    assert -1.01 < lo[0] < -0.99 and 0.99 < hi[0] < 1.01
    lo, hi = store.fit_quantization(np.zeros((4, 2, 3), np.float32))  # constant channel: no division by 0
    assert (hi > lo).all() and store.quantize(np.zeros((4, 2, 3), np.float32), lo, hi).max() == 0


def tables(keys: list[str], errors: list[str] = ()) -> dict[str, pa.Table]:
    return {
        "metadata": pa.table({"key": keys, "caption": [f"c {k}" for k in keys]}),
        "errors": pa.table({"key": list(errors), "reason": ["bad"] * len(errors)}),
    }


def arrays(n: int) -> dict[str, np.ndarray]:
    return {
        "img_emb": np.ones((n, 4), np.float16),
        "text_emb": np.zeros((n, 4), np.float16),
        "text_enc": np.ones((3 * n, 2), np.float16),
        "text_enc_offsets": np.arange(0, 3 * n + 1, 3),
    }


def test_write_shard_writes_the_marker_last_with_checksums(tmp_path, monkeypatch):
    order = []
    real = store.atomic_write
    monkeypatch.setattr(
        store,
        "atomic_write",
        lambda p, d, *a, **kw: (order.append(p.relative_to(tmp_path)), real(p, d, *a, **kw)),
    )
    marker = store.write_shard(
        tmp_path, "00007", arrays(3), tables(["a", "b", "c"], ["z"]), 3, {"source": "x"}
    )
    assert str(order[-1]) == "done/00007.json" and len(order) == 7
    assert marker == store.read_done(tmp_path, "00007") and marker["rows"] == 3 and marker["source"] == "x"
    assert sorted(marker["files"]) == sorted(str(p) for p in order[:-1])
    for rel, digest in marker["files"].items():
        assert hashlib.sha256((tmp_path / rel).read_bytes()).hexdigest() == digest
    assert [p.name for p in tmp_path.rglob(".*")] == []  # no temp files left
    assert store.read_metadata(tmp_path, "00007")["key"].to_pylist() == ["a", "b", "c"]
    assert store.open_array(tmp_path, "text_enc_offsets", "00007").tolist() == [0, 3, 6, 9]
    assert store.shard_rows(tmp_path) == [("00007", 3)]


def test_same_content_gives_the_same_bytes(tmp_path):
    a = store.write_shard(tmp_path / "a", "00000", arrays(2), tables(["k", "l"]), 2)
    b = store.write_shard(tmp_path / "b", "00000", arrays(2), tables(["k", "l"]), 2)
    assert a["files"] == b["files"]


class Killed(BaseException):
    """Stands for a kill mid-write: nothing in the writer runs after it."""


@pytest.mark.parametrize("fault", [OSError("disk full"), Killed("SIGKILL")])
def test_a_failed_write_leaves_nothing_and_a_kill_mid_shard_leaves_it_not_done(fault, tmp_path, monkeypatch):
    """A write that fails (a full disk) removes what the shard wrote, so no file is left for `validate` to call
    stray; a kill leaves files but no marker, and the rerun's remove_shard cleans them."""
    calls = []
    real_replace = os.replace

    def flaky(src, dst):
        calls.append(dst)
        if len(calls) == 3:
            raise fault
        real_replace(src, dst)

    monkeypatch.setattr(store.os, "replace", flaky)
    with pytest.raises(type(fault), match=str(fault)):
        store.write_shard(tmp_path, "00001", arrays(2), tables(["k", "l"]), 2)
    monkeypatch.setattr(store.os, "replace", real_replace)
    assert not store.is_done(tmp_path, "00001") and store.done_shards(tmp_path) == []
    left = [p for p in tmp_path.rglob("*") if p.is_file()]
    if isinstance(fault, OSError):
        assert left == []
        return
    assert len(list(tmp_path.rglob(".*.tmp*"))) == 1 and len([p for p in left if p.suffix == ".npy"]) == 2
    store.remove_shard(tmp_path, "00001")
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_shard_with_no_rows_writes_only_errors_and_marker(tmp_path):
    marker = store.write_shard(
        tmp_path, "00003", {}, {"metadata": None, "errors": tables([], ["x", "y"])["errors"]}, 0
    )
    assert marker["rows"] == 0 and list(marker["files"]) == ["errors/errors_00003.parquet"]
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == [
        "done/00003.json",
        "errors/errors_00003.parquet",
    ]


def test_rows_that_disagree_are_refused_before_anything_is_written(tmp_path):
    bad = arrays(3)
    bad["text_emb"] = bad["text_emb"][:2]
    with pytest.raises(ValueError, match="text_emb has 2 rows, expected 3"):
        store.write_shard(tmp_path, "00000", bad, tables(["a", "b", "c"]), 3)
    with pytest.raises(ValueError, match="metadata has 2 rows, expected 3"):
        store.write_shard(tmp_path, "00000", arrays(3), tables(["a", "b"]), 3)
    assert not tmp_path.joinpath("done").exists() and list(tmp_path.rglob("*.npy")) == []


def test_shard_id_of():
    assert store.shard_id_of("s3://bucket/data/00012.tar") == "00012"
    assert store.shard_id_of("/x/00003.tar") == "00003"


# ---------------------------------------------------------------- the manifest


EMBED_MANIFEST = {  # what `unclip embed` wrote before the manifest was typed (a real store's, paths shortened)
    "clip": {
        "arch": "unclip-tiny",
        "context_length": 32,
        "dim": 64,
        "pretrained": "clip.pt",
        "random_init": False,
    },
    "format_version": 1,
    "identity": {
        "clip": "unclip-tiny",
        "latent_size": 32,
        "latents": "pixels",
        "pretrained": "clip.pt",
        "seed": 0,
    },
    "img_emb": {"dtype": "float16", "normalized": True, "shape": [64]},
    "latents": {
        "codec": "pixels",
        "dtype": "uint8",
        "hi": [1.0, 1.0, 1.0],
        "image_size": 32,
        "lo": [-1.0, -1.0, -1.0],
        "shape": [3, 32, 32],
    },
    "shards": [{"rows": 500, "shard": "00000", "source": "shards/00000.tar"}],
    "text_emb": {"dtype": "float16", "normalized": True, "shape": [64]},
    "text_enc": {"dtype": "float16", "layout": "flat tokens + offsets", "width": 128},
}


def test_manifest_round_trips_the_format_stores_already_have():
    m = store.Manifest.from_json(EMBED_MANIFEST)
    assert m.clip.dim == 64 and m.text_enc_width == 128 and m.img_emb.dtype == "float16"
    assert m.to_json() == EMBED_MANIFEST
    fresh = store.Manifest.new(
        EMBED_MANIFEST["identity"],
        store.ClipInfo("unclip-tiny", "clip.pt", 64, 32),
        text_enc_width=128,
        latents=store.pixels_latents(32),
    )
    assert fresh.to_json() == {**EMBED_MANIFEST, "shards": []}


@pytest.mark.parametrize(
    "change, want",
    [
        ({"format_version": 2}, "store format version 2 is not one this code reads (<= 1)"),
        ({"clip": {"arch": "x"}}, "lacks or mistypes 'pretrained'"),
        ({"img_emb": None}, "lacks or mistypes"),
    ],
)
def test_unreadable_manifests_are_refused_in_one_line(change, want, tmp_path, capsys):
    from jobs.cli import main

    make_store(tmp_path / "s", [20, 20], dim=16)
    d = {**store.read_json(tmp_path / "s" / store.MANIFEST), **change}
    store.write_json(tmp_path / "s" / store.MANIFEST, d)
    with pytest.raises(store.ManifestError, match=want.replace("(", r"\(").replace(")", r"\)")):
        store.load_manifest(tmp_path / "s")
    args = ["train-prior", "--data", str(tmp_path / "s"), "--out", str(tmp_path / "run"), "--preset", "tiny"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and want in err[0] and not (tmp_path / "run").exists()
    assert main(["validate", str(tmp_path / "s")]) == 1


def test_running_out_of_file_descriptors_is_not_called_damage(tmp_path, monkeypatch):
    import errno

    from pipeline.errors import StageError

    path = tmp_path / "img_emb" / "img_emb_0.npy"
    path.parent.mkdir()
    np.save(path, np.zeros((2, 3), np.float16))

    def no_fds(*a, **k):
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(np, "load", no_fds)
    with pytest.raises(StageError, match=r"too many open files .*ulimit -n") as e:
        store.load_array(path, mmap_mode="r")
    assert "validate" not in str(e.value)


def test_wipe_through_a_symlinked_folder_removes_every_listed_file(tmp_path):
    """A store under a symlink (a data disk linked in): the wipe used to compare resolved file paths with the
    unresolved root and raise after its first deletion, leaving a done marker whose files were gone."""
    real = tmp_path / "disk"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    root = tmp_path / "link" / "emb"
    manifest = make_store(root, [5, 6], dim=8)
    listed = {rel for s in store.done_shards(root) for rel in store.read_done(root, s)["files"]}
    (root / "notes.txt").write_text("mine")  # not ours: stays
    removed = store.wipe(root, new_manifest=manifest)
    assert listed and listed <= set(removed)  # named relative to the store, as given
    assert {"done/00000.json", "done/00001.json"} <= set(removed)
    left = sorted(str(p.relative_to(real / "emb")) for p in (real / "emb").rglob("*") if p.is_file())
    assert left == ["manifest.json", "notes.txt"]


def test_temp_files_are_atomic_writes_leftovers_in_the_stores_own_folders_only(tmp_path):
    """A run's end removed every .*.tmp* anywhere under --out (a user's files too), by a glob that a [ in the
    path broke."""
    root = tmp_path / "runs[1]" / "store"
    make_store(root, [4], dim=8)
    ours = [root / "img_emb" / ".img_emb_00001.npy.tmp77", root / ".manifest.json.tmp5"]
    theirs = [root / "notes" / ".draft.tmp1", root / "img_emb" / ".cache.tmp", root / "done" / "x.tmp3"]
    for p in ours + theirs:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("x")
    assert sorted(store.temp_files(root)) == sorted(ours)


def test_hold_folder_refuses_a_second_holder_and_removes_only_a_folder_it_made_and_left_empty(tmp_path):
    from pipeline.errors import UsageError

    out = tmp_path / "a" / "run"
    with store.hold_folder(out):
        assert out.is_dir()
        with pytest.raises(UsageError, match=r"^--out .*run is in use: another unclip command is writing"):
            with store.hold_folder(out):
                pass
        assert out.is_dir()  # the refused second holder removes nothing
    with store.hold_folder(out):  # released at the end of the block
        pass
    with pytest.raises(RuntimeError):  # a failure before any write: the folder it made goes again
        with store.hold_folder(tmp_path / "new"):
            raise RuntimeError("refused")
    assert not (tmp_path / "new").exists()
    with pytest.raises(RuntimeError):  # ... but never a folder that was there, nor one holding a file
        with store.hold_folder(out):
            raise RuntimeError("refused")
    with pytest.raises(RuntimeError):
        with store.hold_folder(tmp_path / "written") as p:
            (p / "x").write_text("kept")
            raise RuntimeError("failed midway")
    assert out.is_dir() and (tmp_path / "written" / "x").read_text() == "kept"
    (tmp_path / "f").write_text("a file")
    with pytest.raises(UsageError, match="is a file; give a folder"):
        with store.hold_folder(tmp_path / "f"):
            pass


def test_hold_folder_runs_unlocked_where_the_filesystem_has_no_locks(tmp_path, monkeypatch, caplog):
    import errno
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with caplog.at_level("WARNING"), store.hold_folder(tmp_path / "nfs") as p:
        (p / "x").write_text("written")
    assert "the filesystem cannot lock it (No locks available)" in caplog.text


def test_hold_folder_names_a_path_it_cannot_make_in_one_line(tmp_path):
    from pipeline.errors import UsageError

    (tmp_path / "link").symlink_to(tmp_path / "gone")  # a dangling symlink was a FileNotFoundError traceback
    with pytest.raises(UsageError, match="link cannot be opened .No such file or directory"):
        with store.hold_folder(tmp_path / "link"):
            pass
    with pytest.raises(UsageError, match="cannot be created .File name too long"):
        with store.hold_folder(tmp_path / ("x" * 300)):
            pass


def test_the_write_probe_leaves_nothing_another_process_would_take_for_content(tmp_path, monkeypatch):
    """`unwritable` makes a file to find out (os.access says yes to root in /proc): a named probe seen by the
    other rank of a torchrun made it refuse --out as "not empty"."""
    import tempfile

    assert store.unwritable(tmp_path / "run") is None and list(tmp_path.iterdir()) == []
    assert store.unwritable("/proc/run") == Path("/proc")
    made = []
    real = tempfile.mkstemp

    def named(*a, **kw):  # where O_TMPFILE is not there: a named probe, which `entries` passes over
        fd, name = real(*a, **kw)
        made.append(Path(name))
        assert store.entries(tmp_path) == []
        return fd, name

    monkeypatch.delattr(os, "O_TMPFILE", raising=False)
    monkeypatch.setattr(tempfile, "mkstemp", named)
    assert store.unwritable(tmp_path / "run") is None and len(made) == 1 and not made[0].exists()


def test_a_refusal_inside_hold_folder_leaves_no_folder_it_made_parents_included(tmp_path):
    """export checks its inputs under OUT's lock: a refused `--out new/a/b` left new/ and new/a behind."""
    (tmp_path / "kept").mkdir()
    with pytest.raises(UsageError, match="refused"):
        with store.hold_folder(tmp_path / "kept/new/a/b"):
            raise UsageError("refused")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["kept"]
    with store.hold_folder(tmp_path / "kept/new/a/b") as p:  # one that goes on keeps what it made
        (p / "x").write_text("1")
    assert (tmp_path / "kept/new/a/b/x").read_text() == "1"
