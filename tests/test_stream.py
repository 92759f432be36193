"""Stream: alignment with the store, determinism, restart at a step, rank split, held-out split."""

import os
import re
import signal

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipeline import store
from pipeline.errors import StageError, UsageError
from pipeline.stream import Recycler, Store, Stream, StreamConfig, dequantize_torch
from tests.synthetic_store import make_store


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("store")
    make_store(r, [100, 0, 73, 120, 55], dim=16, text_enc_width=8)
    return r


def take(stream, n):
    it = stream.batches()
    return [next(it) for _ in range(n)]


def test_batches_are_the_stored_rows(root):
    for b in take(
        Stream(StreamConfig(str(root), fields=("img_emb", "text_emb", "text_enc"), batch_size=32)), 6
    ):
        shards = Stream(StreamConfig(str(root))).store.shards
        for i, (s, r) in enumerate(zip(b["shard"], b["row"])):
            sid = shards[s][0]
            assert np.array_equal(b["img_emb"][i], store.open_array(root, "img_emb", sid)[r])
            assert np.array_equal(b["text_emb"][i], store.open_array(root, "text_emb", sid)[r])
            off = store.open_array(root, "text_enc_offsets", sid)
            n = off[r + 1] - off[r]
            assert b["text_enc_mask"][i].sum() == n and not b["text_enc_mask"][i, n:].any()
            assert np.array_equal(
                b["text_enc"][i, :n], store.open_array(root, "text_enc", sid)[off[r] : off[r + 1]]
            )
        assert b["text_enc"].shape[1] == b["text_enc_mask"].sum(1).max()  # padded to the batch's longest only


def test_deterministic_and_restartable_at_any_step(root):
    cfg = dict(store=str(root), batch_size=24, seed=3)
    straight = [r for _, r in zip(range(40), Stream(StreamConfig(**cfg)).indices())]  # crosses epochs
    again = [r for _, r in zip(range(40), Stream(StreamConfig(**cfg)).indices())]
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(straight, again))
    for k in (1, 13, 14, 31):
        restarted = next(Stream(StreamConfig(**cfg, start_step=k)).indices())
        assert np.array_equal(restarted[0], straight[k][0]) and np.array_equal(restarted[1], straight[k][1])
    other = next(Stream(StreamConfig(**{**cfg, "seed": 4})).indices())
    assert not np.array_equal(other[1], straight[0][1])


def test_epoch_covers_each_train_sample_once_and_mixes_shards(root):
    s = Stream(StreamConfig(str(root), batch_size=16))
    ids = [
        (int(a), int(b)) for _, (sh, rw) in zip(range(s.steps_per_epoch), s.indices()) for a, b in zip(sh, rw)
    ]
    assert len(ids) == len(set(ids)) == s.steps_per_epoch * 16
    first = next(Stream(StreamConfig(str(root), batch_size=64)).indices())[0]
    assert len(set(first.tolist())) > 1  # one batch draws from several shards


def test_ranks_see_disjoint_data(root):
    seen = []
    for rank in range(2):
        s = Stream(StreamConfig(str(root), batch_size=10, rank=rank, world_size=2))
        seen.append(
            {
                (int(a), int(b))
                for _, (sh, rw) in zip(range(s.steps_per_epoch), s.indices())
                for a, b in zip(sh, rw)
            }
        )
    assert len(seen[0]) == len(seen[1]) > 100 and not seen[0] & seen[1]


def test_val_split_is_held_out_and_stable(root):
    val = Stream(StreamConfig(str(root), split="val", val_fraction=0.1, batch_size=32))
    train = Stream(StreamConfig(str(root), split="train", val_fraction=0.1, batch_size=32))
    v = {(int(a), int(b)) for sh, rw in val.indices() for a, b in zip(sh, rw)}
    t = {
        (int(a), int(b))
        for _, (sh, rw) in zip(range(train.steps_per_epoch), train.indices())
        for a, b in zip(sh, rw)
    }
    assert 10 < len(v) < 60 and not v & t
    assert v == {(int(a), int(b)) for sh, rw in val.indices() for a, b in zip(sh, rw)}
    assert val.num_samples + train.num_samples == 348


def test_torch_batches_and_errors(root):
    b = next(Stream(StreamConfig(str(root), batch_size=8)).torch_batches("cpu"))
    assert b["img_emb"].dtype == torch.float16 and b["img_emb"].shape == (8, 16)
    with pytest.raises(UsageError, match="unknown stream field"):
        Stream(StreamConfig(str(root), fields=("pixels",)))
    with pytest.raises(UsageError, match="fewer than one step"):
        Stream(StreamConfig(str(root), batch_size=1000))


def _stored(root, shard_ids, field, shards, rows):
    return np.stack([store.open_array(root, field, shard_ids[s])[r] for s, r in zip(shards, rows)])


def test_batches_kept_by_the_trainer_are_never_overwritten_and_dropped_ones_are_reused(tmp_path):
    root = tmp_path
    make_store(root, [100, 0, 73, 120, 55], dim=16, latent_size=4)
    cfg = StreamConfig(str(root), fields=("img_emb", "text_emb", "latents"), batch_size=16, prefetch=2)
    s = Stream(cfg)
    ids = [sid for sid, _ in s.store.shards]
    held = [next(it) for it in [s.torch_batches("cpu")] for _ in range(30)]  # more than the pool keeps
    views = [b["img_emb"][2:5] for b in held]  # slices outlive their batch dicts
    for b in held:
        assert np.array_equal(b["img_emb"].numpy(), _stored(root, ids, "img_emb", b["shard"], b["row"]))
        assert np.array_equal(b["latents"].numpy(), _stored(root, ids, "latents", b["shard"], b["row"]))
    for b, v in zip(held, views):
        assert np.array_equal(v.numpy(), _stored(root, ids, "img_emb", b["shard"][2:5], b["row"][2:5]))

    again = Stream(cfg)  # the same stream, each batch dropped once checked: its arrays go round again
    it, reused = again.batches(), 0
    for b in held:
        got = next(it)
        assert np.array_equal(got["text_emb"], b["text_emb"].numpy())
        assert np.array_equal(got["row"], b["row"].numpy())
        reused += any(got["text_emb"] is k for kept in again.store._outs._kept.values() for k in kept)
        del got
    assert reused >= 25  # all but the first few batches' arrays came from the pool


def test_recycler_hands_out_an_array_again_only_when_nothing_else_holds_it():
    r = Recycler(keep=2)
    a = r.empty("img_emb", (4, 3), np.float16)
    b = r.empty("img_emb", (4, 3), np.float16)
    c = r.empty("img_emb", (4, 3), np.float16)  # both kept ones in use: a fresh array, not kept
    assert len({id(a), id(b), id(c)}) == 3
    t, v = torch.from_numpy(a), b[1:]
    del a, b, c
    assert all(r.empty("img_emb", (4, 3), np.float16) is not x for x in (t.numpy().base, v.base))
    d = r.empty("img_emb", (4, 3), np.float16)  # a tensor and a slice still hold the two kept arrays
    d[:] = 7
    assert not (t.numpy() == 7).any() and not (v == 7).any()
    del t
    assert r.empty("img_emb", (4, 3), np.float16) is not v.base
    assert r.empty("text_emb", (4, 3), np.float16) is not r.empty("img_emb", (4, 3), np.float16)


def test_maps_are_bounded_and_each_block_is_read_ahead_before_its_rows_are_gathered(tmp_path, monkeypatch):
    make_store(tmp_path, [7] * 12, dim=8)
    events = []
    monkeypatch.setattr(Store, "advise", lambda self, fields, members: events.append(("advise", members)))
    gather = Store.gather

    def spy(self, field, shards, rows):
        events.append(("gather", tuple(sorted(set(shards.tolist())))))
        assert len(self._maps) <= self._max_maps
        return gather(self, field, shards, rows)

    monkeypatch.setattr(Store, "gather", spy)
    s = Stream(
        StreamConfig(
            str(tmp_path), fields=("img_emb",), batch_size=7, shards_per_block=2, prefetch=1, val_fraction=0.0
        )
    )
    it = s.batches()
    for _ in range(2 * s.steps_per_epoch):
        next(it)
    advised = [set(m) for kind, m in events if kind == "advise"]
    assert len(s.store._maps) <= s.store._max_maps == 4
    for k, (kind, shards) in enumerate(events):
        if kind == "gather":  # every shard read was advised before, and so was the next block
            before = [m for kd, m in events[:k] if kd == "advise"]
            assert set(shards) <= set().union(*before[-2:])
    assert len(advised) >= 2 * 6 - 1  # six blocks an epoch, each advised once an epoch


def test_batch_keys_follow_the_fields_asked_for(tmp_path):
    make_store(tmp_path, [40, 30], dim=8, text_enc_width=4, latent_size=4)
    b = next(
        Stream(StreamConfig(str(tmp_path), fields=("text_enc", "latents", "img_emb"), batch_size=8)).batches()
    )
    assert list(b) == ["text_enc", "text_enc_mask", "latents", "img_emb", "shard", "row"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork only")
def test_a_forked_child_streams_with_threads_of_its_own(tmp_path):
    make_store(tmp_path, [1500, 1500], dim=8)
    cfg = StreamConfig(str(tmp_path), batch_size=1024)  # two fields, 1,024 rows: gathered on the threads
    parent = next(Stream(cfg).batches())
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: the parent's gather threads are not here
        ok = False
        try:
            signal.alarm(20)
            b = next(Stream(cfg).batches())
            ok = np.array_equal(b["text_emb"], parent["text_emb"])
        finally:
            os.write(w, b"1" if ok else b"0")
            os._exit(0)
    os.close(w)
    got = os.read(r, 1)
    os.waitpid(pid, 0)
    assert got == b"1"


def test_a_shard_file_whose_rows_disagree_with_its_marker_is_named(tmp_path):
    make_store(tmp_path, [50, 60], dim=8)
    sid = store.shard_rows(tmp_path)[1][0]
    path = store.field_path(tmp_path, "text_emb", sid)
    np.save(path, np.load(path)[:40])  # cut short: 40 rows for a marker of 60
    with pytest.raises(StageError, match=rf"{path.name} holds 40 rows .* says 60.*unclip validate"):
        for _ in zip(range(50), Stream(StreamConfig(str(tmp_path), batch_size=16)).batches()):
            pass


@pytest.mark.parametrize("cut", ["offsets", "tokens"])
def test_text_encodings_that_do_not_fit_their_marker_are_named(tmp_path, cut):
    """Offsets cut short were an IndexError mid-training, token rows cut short a numpy broadcast error."""
    make_store(tmp_path, [40, 40], dim=16, text_enc_width=8)
    sid = store.shard_rows(tmp_path)[1][0]
    field = "text_enc_offsets" if cut == "offsets" else "text_enc"
    path = store.field_path(tmp_path, field, sid)
    np.save(path, np.load(path)[:20])
    said = "holds 20 offsets" if cut == "offsets" else r"holds 20 token rows where its offsets span 0\.\.\d+"
    cfg = StreamConfig(str(tmp_path), fields=("img_emb", "text_emb", "text_enc"), batch_size=8)
    with pytest.raises(
        StageError, match=rf"{path.name} {said}, which does not fit the 40 rows .*unclip validate"
    ):
        for _ in zip(range(50), Stream(cfg).batches()):
            pass


@pytest.mark.parametrize(
    "kw, said",
    [
        (
            dict(rank=2, world_size=2),
            "rank 2 of world size 2: the world size must be >= 1 and the rank in 0 ..",
        ),
        (dict(rank=-1, world_size=2), "rank -1 of world size 2"),
        (dict(world_size=0), "rank 0 of world size 0"),
        (dict(shards_per_block=0), "shards_per_block must be >= 1 (got 0)"),
        (dict(prefetch=-1), "prefetch must be >= 0 (got -1)"),
        (dict(start_step=-3), "start_step must be >= 0 (got -3)"),
    ],
)
def test_a_loader_of_your_own_gets_its_settings_checked(root, kw, said):
    """rank >= world size took a slice overlapping another rank's, shards_per_block 0 a ValueError from range."""
    with pytest.raises(UsageError, match=re.escape(said)):
        Stream(StreamConfig(str(root), **kw))


def test_the_next_epochs_first_block_is_read_ahead_before_the_epoch_ends(tmp_path, monkeypatch):
    make_store(tmp_path, [7] * 6, dim=8)
    seen = []
    monkeypatch.setattr(Store, "advise", lambda self, fields, members: seen.append(members))
    s = Stream(StreamConfig(str(tmp_path), fields=("img_emb",), batch_size=7, shards_per_block=2, prefetch=1))
    it = s.indices()
    for _ in range(s.steps_per_epoch):  # the first epoch only
        next(it)
    second = next(s._epoch_order(1))[0]
    assert second in seen


def test_a_gather_thread_keeps_nothing_of_a_result_once_handed_over():
    import time
    import weakref

    from pipeline.stream import _gather_pool

    res = _gather_pool().submit(np.zeros, 3).result()
    ref = weakref.ref(res)
    del res
    deadline = time.monotonic() + 2
    while ref() is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ref() is None  # else the Recycler could never hand that array out again


def test_dequantize_torch_matches_numpy():
    q = np.random.default_rng(0).integers(0, 256, size=(2, 4, 3, 3), dtype=np.uint8)
    lo, hi = [-1.0, -2.0, 0.0, 0.5], [1.0, 2.0, 3.0, 0.75]
    assert np.allclose(
        dequantize_torch(torch.from_numpy(q), lo, hi).numpy(), store.dequantize(q, lo, hi), atol=1e-6
    )


def _reordered_copy(src, dst, drop: str | None = None, no_keys: bool = False) -> None:
    """``src`` with each shard's rows in another order (as a second download would write them), optionally
    without the sample ``drop`` or without the key column."""
    import shutil

    dst.mkdir()
    shutil.copy(src / store.MANIFEST, dst / store.MANIFEST)
    for shard, n in store.shard_rows(src):
        if not n:
            store.write_shard(
                dst, shard, {}, {"metadata": None, "errors": None}, 0, store.read_done(src, shard)
            )
            continue
        meta = store.read_metadata(src, shard)
        perm = np.random.default_rng(int(shard)).permutation(n)
        perm = perm[np.asarray(meta["key"].to_pylist())[perm] != drop]
        arrays = {f: store.open_array(src, f, shard)[perm] for f in ("img_emb", "text_emb")}
        meta = meta.take(perm)
        if no_keys:
            meta = meta.drop(["key"])
        store.write_shard(dst, shard, arrays, {"metadata": meta, "errors": None}, len(perm), {"source": "x"})


def _keyed_batches(stream, steps: int) -> list[list[str]]:
    keys = {s: store.read_metadata(stream.cfg.store, s)["key"].to_pylist() for s, _ in stream.store.shards}
    return [
        [keys[stream.store.shards[s][0]][r] for s, r in zip(sh, rw)]
        for _, (sh, rw) in zip(range(steps), stream.indices())
    ]


def test_split_and_order_follow_the_keys_not_the_tar_order(tmp_path):
    # img2dataset writes a shard's samples in completion order: a second download of the same URLs gives
    # the same rows in another order. The held-out set and the training batches must not change with it.
    a = tmp_path / "a"
    make_store(a, [100, 0, 73, 120], dim=8)
    b, c = tmp_path / "b", tmp_path / "c"
    _reordered_copy(a, b)
    first = lambda root, **kw: Stream(StreamConfig(str(root), batch_size=16, val_fraction=0.2, **kw))  # noqa: E731
    assert _keyed_batches(first(a), 30) == _keyed_batches(first(b), 30)  # crosses an epoch (18 steps)
    val_a = _keyed_batches(first(a, split="val"), 100)
    assert val_a == _keyed_batches(first(b, split="val"), 100) and 40 < sum(map(len, val_a)) < 85
    # Embeddings follow their keys: the same batch holds the same vectors.
    sa, sb = first(a), first(b)
    assert np.array_equal(next(sa.batches())["img_emb"], next(sb.batches())["img_emb"])
    # A sample that failed in one download moves no other sample between the splits.
    gone = val_a[0][0]
    _reordered_copy(a, c, drop=gone)
    val_c = [k for batch in _keyed_batches(first(c, split="val"), 100) for k in batch]
    assert sorted(val_c) == sorted(k for batch in val_a for k in batch if k != gone)
    # Another split seed holds out other samples.
    other = [k for batch in _keyed_batches(first(a, split="val", split_seed=1), 100) for k in batch]
    assert set(other) != {k for batch in val_a for k in batch}


def test_a_store_without_keys_is_split_by_row_position(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    make_store(a, [100, 73], dim=8)
    _reordered_copy(a, b, no_keys=True)
    val = Stream(StreamConfig(str(b), split="val", val_fraction=0.2, batch_size=8))
    rows = {(int(s), int(r)) for sh, rw in val.indices() for s, r in zip(sh, rw)}
    expect = {
        (i, int(r))
        for i, (shard, n) in enumerate(val.store.shards)
        for r in np.flatnonzero(np.random.default_rng([0, int(shard)]).random(n) < 0.2)
    }
    assert rows == expect


def test_evaluating_a_checkpoint_of_another_split_warns(caplog):
    from jobs.checkpoint import warn_if_other_split

    warn_if_other_split({"stream_order": "key"}, "key")
    warn_if_other_split(
        {}, "row"
    )  # made before stream_order existed, on a store without keys: the same split
    assert "held-out" not in caplog.text
    warn_if_other_split({}, "key")
    assert "trained on a row split" in caplog.text and "include samples it was trained on" in caplog.text


def test_key_codes_depend_on_each_key_alone():
    from pipeline.stream import key_codes, key_uniform

    # Pinned values: a change to the codes would silently change every store's split (bump KEY_ORDER then).
    codes = key_codes(pa.array(["000120034", "7", "img-a"]))
    assert codes.tolist() == [(120034 << 5) | 9, (7 << 5) | 1, 12757350056616060858]
    assert np.round(key_uniform(codes, 0), 6).tolist() == [0.887105, 0.967565, 0.21399]
    # Each key's code is its own, whatever else is in the shard (an odd key does not switch the others).
    assert key_codes(pa.array(["", "12", None]).fill_null("x"))[1] == key_codes(pa.array(["12"]))[0]
    assert len(set(key_codes(pa.array(["1", "01", "001"])).tolist())) == 3  # leading zeros: other keys
    # Keys arrow would not parse as numbers are hashed, not refused: other digits, 18+ digits, bytes, ints.
    odd = key_codes(pa.array(["\u0661\u0662", "\uff11", "1" * 18]))
    assert (odd >> np.uint64(63)).tolist() == [1, 1, 1]
    assert key_codes(pa.array([b"\xff\x00"])).dtype == np.uint64
    assert key_codes(pa.array([12, 7], pa.int64())).tolist() == [(12 << 5) | 2, (7 << 5) | 1]


def _renamed_copy(src, dst, rename) -> None:
    """``src`` with every key renamed, each shard's rows in another order."""
    import shutil

    dst.mkdir()
    shutil.copy(src / store.MANIFEST, dst / store.MANIFEST)
    for shard, n in store.shard_rows(src):
        meta = store.read_metadata(src, shard)
        perm = np.random.default_rng(int(shard) + 7).permutation(n)
        keys = [rename(k) for k in np.asarray(meta["key"].to_pylist())[perm]]
        meta = meta.take(perm).set_column(0, "key", pa.array(keys, meta.schema.field("key").type))
        arrays = {f: store.open_array(src, f, shard)[perm] for f in ("img_emb", "text_emb")}
        store.write_shard(dst, shard, arrays, {"metadata": meta, "errors": None}, n, {"source": "x"})


def test_hashed_keys_are_followed_too_and_broken_keys_are_refused(tmp_path):
    a = tmp_path / "a"
    make_store(a, [100, 73], dim=8)
    b, c = tmp_path / "b", tmp_path / "c"
    _renamed_copy(a, b, lambda k: f"img-{k}")  # not numbers: hashed
    _renamed_copy(b, c, lambda k: k)
    first = lambda root, **kw: Stream(StreamConfig(str(root), batch_size=16, val_fraction=0.2, **kw))  # noqa: E731
    assert _keyed_batches(first(b), 12) == _keyed_batches(first(c), 12)
    assert _keyed_batches(first(b, split="val"), 50) == _keyed_batches(first(c, split="val"), 50)
    assert first(b).order == "key"
    d = tmp_path / "d"
    _reordered_copy(a, d, no_keys=True)
    assert first(d).order == "row"
    e = tmp_path / "e"
    _renamed_copy(a, e, lambda k: None if k.endswith("7") else k)
    with pytest.raises(
        UsageError, match=r"shard 00000's metadata has 100 keys \(10 null\) for 100 rows; run"
    ):
        first(e)
