"""Stream: alignment with the store, determinism, restart at a step, rank split, held-out split."""

import numpy as np
import pytest
import torch

from pipeline import store
from pipeline.errors import UsageError
from pipeline.stream import Stream, StreamConfig, dequantize_torch
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


def test_dequantize_torch_matches_numpy():
    q = np.random.default_rng(0).integers(0, 256, size=(2, 4, 3, 3), dtype=np.uint8)
    lo, hi = [-1.0, -2.0, 0.0, 0.5], [1.0, 2.0, 3.0, 0.75]
    assert np.allclose(
        dequantize_torch(torch.from_numpy(q), lo, hi).numpy(), store.dequantize(q, lo, hi), atol=1e-6
    )
