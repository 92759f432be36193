"""`unclip validate`: passes on a store fresh from `unclip embed`, names each kind of damage and exits 1."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.cli import main
from pipeline import store


def write_tar(path: Path, keys: list[str], bad: set[str] = frozenset()) -> None:
    with tarfile.open(path, "w") as tf:
        for i, key in enumerate(keys):
            buf = io.BytesIO()
            Image.new("RGB", (48, 48), (i * 37 % 256, 255 - i * 23 % 256, i * 91 % 256)).save(
                buf, format="JPEG"
            )
            members = {
                "jpg": b"garbage" * 30 if key in bad else buf.getvalue(),
                "txt": f"photo {key}".encode(),
                "json": json.dumps(
                    {
                        "key": key,
                        "url": f"http://img.test/{key}",
                        "caption": f"photo {key}",
                        "width": 48,
                        "height": 48,
                    }
                ).encode(),
            }
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("validate")
    write_tar(d / "00000.tar", [f"0000{i:05d}" for i in (4, 1, 7, 0, 3, 6, 2, 5)], bad={"000000003"})
    write_tar(d / "00001.tar", [f"0001{i:05d}" for i in (2, 0, 1)])
    out = d / "store"
    assert (
        main(
            [
                "embed",
                "--shards",
                str(d),
                "--out",
                str(out),
                "--clip",
                "unclip-tiny",
                "--pretrained",
                "none",
                "--batch-size",
                "4",
                "--workers",
                "1",
                "--latents",
                "pixels",
                "--latent-size",
                "8",
                "--text-encodings",
            ]
        )
        == 0
    )
    return out


@pytest.fixture
def copy(good, tmp_path) -> Path:
    shutil.copytree(good, tmp_path / "store")
    return tmp_path / "store"


def validate(root: Path, capsys, *args: str) -> tuple[int, str]:
    code = main(["validate", str(root), *args])
    return code, capsys.readouterr().out


def rechecksum(root: Path, shard: str, rel: str) -> None:
    """Make the done marker agree with a file we changed, so that the deeper checks are reached."""
    marker = store.read_done(root, shard)
    marker["files"][rel] = hashlib.sha256((root / rel).read_bytes()).hexdigest()
    store.write_json(store.done_path(root, shard), marker)


def test_fresh_store_passes_and_validate_writes_nothing(good, capsys):
    before = {p: p.stat().st_mtime_ns for p in good.rglob("*")}
    code, out = validate(good, capsys)
    assert code == 0
    assert out.splitlines() == [f"validate {good}: 2 shards, 10 rows: OK"]
    assert {p: p.stat().st_mtime_ns for p in good.rglob("*")} == before


def test_tampered_array_fails_its_checksum(copy, capsys):
    p = store.field_path(copy, "img_emb", "00000")
    data = bytearray(p.read_bytes())
    data[-5] ^= 0x40
    p.write_bytes(bytes(data))
    code, out = validate(copy, capsys)
    assert code == 1
    assert "1 problem(s)" in out and "00000: checksum mismatch for img_emb/img_emb_00000.npy" in out


def test_removed_done_marker_is_a_partial_shard(copy, capsys):
    store.done_path(copy, "00001").unlink()
    code, out = validate(copy, capsys)
    assert code == 1
    assert "img_emb/img_emb_00001.npy: no done marker lists it (a partial shard" in out
    assert "metadata/metadata_00001.parquet: no done marker lists it" in out
    assert "manifest lists 2 shards but 1 are done" in out
    assert "00000" not in out


def test_nan_in_embeddings_is_reported(copy, capsys):
    p = store.field_path(copy, "img_emb", "00000")
    a = np.load(p)
    a[2, 5] = np.nan
    np.save(p, a)
    code, out = validate(copy, capsys)
    assert code == 1 and "checksum mismatch for img_emb/img_emb_00000.npy" in out
    rechecksum(copy, "00000", "img_emb/img_emb_00000.npy")
    code, out = validate(copy, capsys)
    assert code == 1 and "1 problem(s)" in out and "00000: img_emb has NaN or inf" in out


def test_row_that_is_not_unit_norm_is_reported(copy, capsys):
    p = store.field_path(copy, "text_emb", "00001")
    a = np.load(p)
    a[1] *= 2
    np.save(p, a)
    rechecksum(copy, "00001", "text_emb/text_emb_00001.npy")
    code, out = validate(copy, capsys)
    assert code == 1 and "00001: text_emb has 1 rows whose norm is not 1" in out


def test_metadata_out_of_tar_order_is_reported_unless_tars_are_skipped(copy, capsys):
    p = store.field_path(copy, "metadata", "00000")
    t = pq.read_table(p)
    assert t.num_rows == 7  # the undecodable image is an error row, not a row
    p.write_bytes(store.parquet_bytes(t.take([1, 0, *range(2, t.num_rows)])))
    rechecksum(copy, "00000", "metadata/metadata_00000.parquet")
    code, out = validate(copy, capsys)
    keys = t.column("key").to_pylist()
    assert (
        code == 1
        and (
            "00000: metadata keys differ from the tar's keys (the same keys in another order, from row 0 "
            f"({keys[1]!r} where the tar has {keys[0]!r}))"
        )
        in out
    )
    assert validate(copy, capsys, "--check-tars", "false")[0] == 0
    # a sample lost without an error row (an earlier version dropped tar members that were links), and a row
    # the tar does not hold: each named, with how many
    p.write_bytes(store.parquet_bytes(t.slice(1)))
    rechecksum(copy, "00000", "metadata/metadata_00000.parquet")
    out = validate(copy, capsys)[1]
    assert f"(1 of the tar's samples neither embedded nor in its error rows, first {keys[0]!r})" in out
    renamed = t.set_column(t.schema.get_field_index("key"), "key", pa.array(["zz", *keys[1:]]))
    p.write_bytes(store.parquet_bytes(renamed))
    rechecksum(copy, "00000", "metadata/metadata_00000.parquet")
    out = validate(copy, capsys)[1]
    assert (
        f"(1 of the tar's samples neither embedded nor in its error rows, first {keys[0]!r}; 1 key(s) " in out
    )
    assert "not in the tar, first 'zz')" in out
    # a row repeated: every key is the tar's, one twice (this raised StopIteration, reported as unreadable files)
    p.write_bytes(store.parquet_bytes(t.take([*range(t.num_rows), t.num_rows - 1])))
    rechecksum(copy, "00000", "metadata/metadata_00000.parquet")
    out = validate(copy, capsys)[1]
    assert f"metadata keys differ from the tar's keys (1 key(s) twice, first {keys[-1]!r})" in out
    assert "00000: keys are not unique" in out and "StopIteration" not in out


def test_a_tar_replaced_since_its_shard_was_embedded_is_named_not_called_misaligned(
    copy, tmp_path, capsys, caplog
):
    """A store copied away from a folder that was downloaded again since: validate compared its rows with the
    new tar at the recorded path and reported "keys differ" about a sound store."""
    marker_path = copy / "done" / "00001.json"
    marker = json.loads(marker_path.read_text())
    src = Path(marker["source"])
    assert marker["source_bytes"] == src.stat().st_size
    again = tmp_path / "again" / "00001.tar"
    again.parent.mkdir()
    write_tar(again, ["000100009", "000100008"])  # downloaded again: other samples
    marker["source"] = str(again)
    marker_path.write_text(json.dumps(marker))
    with caplog.at_level("WARNING"):
        code, out = validate(copy, capsys)
    assert code == 0 and "keys differ" not in out, out
    assert (
        f"00001: source tar {again} is {again.stat().st_size} bytes now, {src.stat().st_size} when the shard "
        "was embedded: not the tar it was embedded from"
    ) in caplog.text
    del marker["source_bytes"]  # a store from before the size was kept: compared as before
    marker_path.write_text(json.dumps(marker))
    code, out = validate(copy, capsys)
    assert code == 1 and "00001: metadata keys differ from the tar's keys" in out


def test_wrong_shapes_are_reported(copy, capsys):
    lat = store.field_path(copy, "latents", "00001")
    np.save(lat, np.zeros((3, 3, 4, 4), np.uint8))
    rechecksum(copy, "00001", "latents/latents_00001.npy")
    off = store.field_path(copy, "text_enc_offsets", "00000")
    np.save(off, np.load(off)[:-1])
    rechecksum(copy, "00000", "text_enc/text_enc_offsets_00000.npy")
    code, out = validate(copy, capsys)
    assert code == 1 and "2 problem(s)" in out
    assert "00001: latents are uint8[3, 3, 4, 4], manifest says uint8[3, 3, 8, 8]" in out
    assert "00000: text_enc offsets do not cover 7 rows" in out


def test_not_a_store_is_a_usage_error(tmp_path, capsys):
    assert main(["validate", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"unclip validate: error: {tmp_path} is not an embedding store (no manifest.json)"]
