"""Embed stage: real dask runs on tiny webdataset tars with the random `unclip-tiny` CLIP, checked row by row
against the encoders called directly."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, ImageOps

from jobs.cli import main
from pipeline import store
from pipeline.errors import StageError, UsageError
from pipeline.shard_samples import read_tar

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
TINY = ["--clip", "unclip-tiny", "--pretrained", "none", "--batch-size", "8", "--workers", "1"]
PIXELS = ["--latents", "pixels", "--latent-size", "16"]
FP16_ATOL = 2e-3


# ---------------------------------------------------------------- tiny webdataset shards


def jpeg(seed: int, size: tuple[int, int] = (48, 48)) -> bytes:
    """A noise image of its own colour: every sample's embedding differs from every other's."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, 3)
    px = np.clip(base + rng.integers(-60, 60, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(px).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def caption(seed: int) -> str:
    words = ["red", "dog", "on", "a", "blue", "sofa", "under", "the", "bright", "moon"]
    return " ".join(words[(seed + i) % len(words)] for i in range(2 + seed % 7)) + f" number {seed}"


def sample(key: str, seed: int, image: bytes | None = b"", text: str | None = "", size=(48, 48)) -> dict:
    """One img2dataset-style sample; ``image=None`` / ``text=None`` leave that member out."""
    cap = caption(seed) if text == "" else text
    meta = {
        "key": key,
        "url": f"http://img.test/{key}.jpg",
        "caption": cap,
        "width": size[0],
        "height": size[1],
    }
    return {
        "key": key,
        "jpg": jpeg(seed, size) if image == b"" else image,
        "txt": cap.encode() if cap is not None else None,
        "json": json.dumps(meta).encode(),
    }


def write_tar(path: Path, samples: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for s in samples:
            for ext in ("jpg", "txt", "json"):
                if s.get(ext) is not None:
                    info = tarfile.TarInfo(f"{s['key']}.{ext}")
                    info.size = len(s[ext])
                    tf.addfile(info, io.BytesIO(s[ext]))
    return path


def good_samples(shard: int, order: list[int]) -> list[dict]:
    """Keys in the given (unsorted) order, as img2dataset writes them in completion order."""
    return [
        sample(f"{shard:05d}{i:04d}", shard * 100 + i, size=(48, 48) if i % 3 else (56, 40)) for i in order
    ]


BAD_KEYS = {"000000900": "cannot decode image", "000000901": "no caption", "000000902": "no image"}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """00000: 13 good samples out of key order plus 3 unusable ones; 00001: empty; 00002: 9 good samples."""
    d = tmp_path_factory.mktemp("shards")
    s0 = good_samples(0, [7, 2, 11, 0, 5, 12, 1, 9, 3, 10, 4, 8, 6])
    s0.insert(3, sample("000000900", 900, image=b"\xff\xd8 this is not a jpeg " * 20))
    s0.insert(8, sample("000000901", 901, text=None))
    s0.insert(12, sample("000000902", 902, image=None))
    write_tar(d / "00000.tar", s0)
    write_tar(d / "00001.tar", [])  # img2dataset writes an empty tar when every row of a shard failed
    write_tar(d / "00002.tar", good_samples(2, [4, 0, 8, 2, 6, 1, 3, 7, 5]))
    return d


def tar_samples(path: Path) -> dict[str, dict]:
    return {s.key: s for s in read_tar(str(path))}


def embed(*args: str) -> int:
    return main(["embed", *map(str, args)])


def test_tar_members_group_into_samples_as_webdataset_groups_them(tmp_path):
    """Keys keep the member's folder (two folders' k00 are two samples, not a duplicate), and hidden members
    (macOS tar's ._ AppleDouble files, which used to split every sample into error rows) are no samples."""
    import webdataset as wds

    path = tmp_path / "t.tar"
    members = []
    for name in ("a/k00", "b/k00", "./k01"):
        s = sample(name, len(members))
        if name == "./k01":
            members.append(("./._k01.jpg", b"\x00\x05\x16\x07 AppleDouble"))
        members += [(f"{name}.{ext}", s[ext]) for ext in ("jpg", "txt", "json")]
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    ours = list(read_tar(str(path)))
    assert [s.key for s in ours] == ["a/k00", "b/k00", "k01"]  # "./" dropped: k01 names the same file
    assert all(s.image and s.caption and s.problem is None for s in ours)
    theirs = list(wds.WebDataset(str(path), shardshuffle=False))
    assert [t["__key__"] for t in theirs] == ["a/k00", "b/k00", "./k01"]
    assert [s.image for s in ours] == [t["jpg"] for t in theirs]


def test_a_tar_cut_off_on_or_inside_a_header_is_damaged_not_short(tmp_path):
    """tarfile ends an archive quietly on no bytes, a cut block or a block that is no header, as on its
    end-of-archive marker: a local tar cut there was embedded and marked done without its last samples (without
    an img2dataset record, not even as error rows, and `validate` said OK). Only the marker ends a whole tar."""
    import gzip

    from pipeline.shard_samples import TarDamaged

    path = tmp_path / "t.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:  # img2dataset's: a pax header a member
        for i in range(4):
            for ext, data in (("jpg", b"\xff" * 700), ("txt", "caption é".encode())):
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size, info.pax_headers = len(data), {"comment": "x"}
                tf.addfile(info, io.BytesIO(data))
    whole = path.read_bytes()
    with tarfile.open(path) as tf:
        end = tf.getmembers()[-1].offset_data + tf.getmembers()[-1].size
        marker = tf.offset  # where the end-of-archive marker starts
    assert len(list(read_tar(str(path)))) == 4
    (tmp_path / "t.tar.gz").write_bytes(gzip.compress(whole))
    assert len(list(read_tar(str(tmp_path / "t.tar.gz")))) == 4
    assert len(list(read_tar_bytes(tmp_path, whole[: marker + 512]))) == 4  # one zero block is an end
    cuts = {
        "on the member boundary before the marker": (marker, "without the end-of-archive marker"),
        "inside a header block": (marker - 2048 + 100, "without the end-of-archive marker"),
        # (tarfile itself raises here: its pax header's member is missing)
        "after a member's pax header": (marker - 2048 + 1024, "empty header"),
    }
    assert end <= marker
    for _what, (cut, said) in cuts.items():
        with pytest.raises(TarDamaged, match=f"is truncated or damaged after .* members .*{said}"):
            list(read_tar_bytes(tmp_path, whole[:cut]))
    garbage = bytearray(whole)
    garbage[marker - 2048 : marker - 1536] = b"\x01" * 512  # a header block overwritten
    with pytest.raises(TarDamaged, match="is not one|truncated or damaged"):
        list(read_tar_bytes(tmp_path, bytes(garbage)))


def read_tar_bytes(tmp_path, data: bytes):
    (tmp_path / "cut.tar").write_bytes(data)
    return read_tar(str(tmp_path / "cut.tar"))


@pytest.fixture(scope="module")
def base(shards, tmp_path_factory, own_embed_cluster) -> Path:
    """Pixels latents and per-token text encodings; shards named by a brace range. Its run starts a worker of
    its own, as a user's does: the summary's warm rate and read-ahead figures are those of a cold worker."""
    out = tmp_path_factory.mktemp("base") / "store"
    args = ["--shards", f"{shards}/{{00000..00002}}.tar", "--out", out, *TINY, *PIXELS, "--text-encodings"]
    with own_embed_cluster():
        assert embed(*args) == 0
    return out


@pytest.fixture(scope="module")
def clip():
    from pipeline.encoders import load_clip

    return load_clip("unclip-tiny", "none", "cpu", 0)


def direct(clip, image: bytes, text: str) -> tuple[np.ndarray, np.ndarray]:
    """The CLIP image and text embeddings of one sample, computed without the pipeline: open_clip's own
    `encode_image` and `encode_text` over the full context (the pipeline trims the text tower to the batch's
    longest caption, so this also checks that the trimming changes nothing)."""
    img = clip.preprocess(Image.open(io.BytesIO(image)).convert("RGB"))[None]
    tokens = clip.tokenizer([text])  # [1, context_length], padded
    with torch.no_grad():
        i, t = clip.model.encode_image(img), clip.model.encode_text(tokens)
    return (
        torch.nn.functional.normalize(i.float(), dim=-1)[0].numpy(),
        torch.nn.functional.normalize(t.float(), dim=-1)[0].numpy(),
    )


def files_of(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.relative_to(root).parts[0] != "logs"
    }


def mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


# ---------------------------------------------------------------- row alignment and content


def test_rows_are_aligned_with_the_samples_they_come_from(base, shards, clip):
    manifest = store.load_manifest(base)
    assert manifest["clip"]["dim"] == 64 and manifest["latents"]["shape"] == [3, 16, 16]
    assert store.shard_rows(base) == [("00000", 13), ("00001", 0), ("00002", 9)]
    for shard, rows in [("00000", 13), ("00002", 9)]:
        src = tar_samples(shards / f"{shard}.tar")
        meta = store.read_metadata(base, shard).to_pylist()
        keys = [m["key"] for m in meta]
        assert keys == [k for k in src if k not in BAD_KEYS]  # tar order, not sorted order
        assert keys != sorted(keys)
        img, txt = store.open_array(base, "img_emb", shard), store.open_array(base, "text_emb", shard)
        lat = store.open_array(base, "latents", shard)
        assert img.dtype == txt.dtype == np.float16 and img.shape == txt.shape == (rows, 64)
        assert lat.dtype == np.uint8 and lat.shape == (rows, 3, 16, 16)
        for arr in (img, txt):
            assert np.allclose(np.linalg.norm(arr.astype(np.float32), axis=1), 1, atol=2e-3)
            # rows differ by more than the tolerance, so a shifted row could not pass the per-row check below
            x = arr.astype(np.float32)
            apart = np.abs(x[:, None] - x[None]).max(-1)[~np.eye(rows, dtype=bool)]
            assert apart.min() > 3 * FP16_ATOL
        for i, m in enumerate(meta):
            s = src[m["key"]]
            assert m["caption"] == s.caption and m["url"] == s.meta["url"]
            assert (m["width"], m["height"]) == (s.meta["width"], s.meta["height"])
            want_img, want_txt = direct(clip, s.image, s.caption)
            np.testing.assert_allclose(img[i].astype(np.float32), want_img, atol=FP16_ATOL)
            np.testing.assert_allclose(txt[i].astype(np.float32), want_txt, atol=FP16_ATOL)
            pil = Image.open(io.BytesIO(s.image)).convert("RGB")
            want_px = np.asarray(ImageOps.fit(pil, (16, 16), Image.BICUBIC)).transpose(2, 0, 1)
            np.testing.assert_array_equal(lat[i], want_px)


def test_summary_reports_the_rate_inside_tasks_and_without_each_workers_first_shard(base):
    s = json.loads((base / "logs" / "embed_summary.json").read_text())
    assert s["rows_this_run"] == 22 and s["samples_per_second_in_tasks"] > 0
    # One worker, three shards: its later two (rows > 0 among them whatever the order) make the warm figure.
    assert s["samples_per_second_in_warm_tasks"] > 0
    # --read-ahead's default: the plugin ran in the worker process and advised the page cache of a local shard
    # queued before its task started. Only 00001 is sure to be: it is queued while 00000's 16 samples embed.
    # 00000 may be too (queued behind the worker's warm-up task), or not; and 00002 arrives once the scheduler
    # hears 00000 ended, when the empty 00001 may be done already, so it can start at once, with "none".
    assert sum(s["read_ahead"].values()) == 3 and s["read_ahead"].get("page cache", 0) >= 1
    assert set(s["read_ahead"]) <= {"page cache", "none"}


def _worker_state(params) -> tuple[bool, int | None]:
    """In a dask worker: is this task thread warm for the run's CLIP, and the worker's GPU slot."""
    from pipeline import embed_shard
    from pipeline.encoders import load_clip

    clip = load_clip(params.clip, params.pretrained, params.device, params.seed)
    warm = getattr(embed_shard._thread_state, "warm", None) == embed_shard.warm_key(clip)
    return warm, embed_shard._process_state["gpu_slot"]


def test_every_worker_is_warmed_in_its_task_thread_and_given_its_gpu_slot(tmp_path, monkeypatch):
    # The warm-up must run where shard tasks run (a worker's task thread), not in its event-loop thread as
    # `client.run` would: OpenMP and oneDNN set-up are per thread, and the first shard would pay them.
    # In-process workers (fast): they share the models and the process state, not their task threads.
    from dask.distributed import Client, LocalCluster

    from pipeline import embed_shard
    from pipeline.embed_cluster import warm_workers
    from pipeline.embed_shard import ShardParams

    tiny = {"clip": "unclip-tiny", "pretrained": "none", "seed": 0, "device": "cpu", "batch_size": 8}
    params = ShardParams(
        out=str(tmp_path),
        latents="none",
        vae="",
        text_encodings=False,
        torch_threads=1,
        latent_params=None,
        **tiny,
    )
    monkeypatch.setitem(embed_shard._process_state, "gpu_slot", None)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        with Client(cluster) as client:
            workers = list(client.scheduler_info()["workers"])

            def state() -> list:
                return client.gather(
                    [client.submit(_worker_state, params, workers=[w], pure=False) for w in workers]
                )

            assert state() == [(False, None), (False, None)]
            warm_workers(client, params)
            after = state()
    # Both task threads warm; the slot reached the workers (one process here, so the last one written shows).
    assert [warm for warm, _ in after] == [True, True] and after[0][1] in (0, 1)


def test_default_workers_are_one_per_visible_gpu_for_cuda_and_one_otherwise(monkeypatch, tmp_path):
    # --device cuda means every visible GPU, one per worker: a LocalCluster of one worker would leave 7 of 8 idle
    from pipeline import embed as embed_stage

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert embed_stage.local_workers("cuda") == 8
    assert embed_stage.local_workers("cuda:3") == 1 and embed_stage.local_workers("cpu") == 1
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert embed_stage.local_workers("cuda") == 1
    # the torch threads each worker is sent follow the resolved count (cores / workers), not --workers 0
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    cfg = embed_stage.EmbedConfig(shards="x", out=str(tmp_path))
    manifest = {"latents": None}
    assert embed_stage.shard_params(cfg, "cuda", manifest).torch_threads == 8
    assert embed_stage.shard_params(cfg, "cpu", manifest).torch_threads == 16


def test_gpu_slots_number_the_workers_of_each_host_and_cuda_maps_a_slot_to_a_visible_gpu(monkeypatch):
    from pipeline import embed_cluster, embed_shard
    from pipeline.embed_cluster import gpu_slots
    from pipeline.embed_shard import ShardParams, worker_params

    workers = ["tcp://10.0.0.2:9001", "tcp://10.0.0.1:9002", "tcp://10.0.0.1:9001", "tcp://10.0.0.2:9000"]
    assert gpu_slots(workers) == {
        "tcp://10.0.0.1:9001": 0,
        "tcp://10.0.0.1:9002": 1,
        "tcp://10.0.0.2:9000": 0,
        "tcp://10.0.0.2:9001": 1,
    }
    current = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    params = ShardParams("/s", "ViT-B-32", "none", 0, "cuda", 256, "none", "", False, 0, None)
    monkeypatch.setitem(embed_shard._process_state, "gpu_slot", None)  # not in a dask worker: unchanged
    monkeypatch.setitem(embed_shard._process_state, "late_slot_asked", False)
    assert worker_params(params) is params and current == []
    # A dask worker that joined after the warm-up claims a slot at its first shard, once.
    claims = []
    monkeypatch.setattr(embed_cluster, "claim_late_slot", lambda run: claims.append(run) or 2)
    assert worker_params(params) is params  # asked once per process, already asked above
    monkeypatch.setitem(embed_shard._process_state, "late_slot_asked", False)
    assert worker_params(params).device == "cuda:2" and worker_params(params).device == "cuda:2"
    assert claims == ["/s"] and current == ["cuda:2", "cuda:2"]  # the run is named by its store
    current.clear()
    monkeypatch.setitem(embed_shard._process_state, "gpu_slot", 5)  # more workers than GPUs: they share
    assert worker_params(params).device == "cuda:1" and current == ["cuda:1"]
    assert worker_params(dataclasses.replace(params, device="cpu")).device == "cpu"  # only "cuda" is spread
    assert worker_params(dataclasses.replace(params, device="cuda:3")).device == "cuda:3"  # and not "cuda:N"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(
        UsageError, match=r"--device cuda: a dask worker \(slot 5 on its host\) sees no CUDA device"
    ):
        worker_params(params)


class _FakeFuture:
    def __init__(self, status="finished"):
        self.status = status

    def cancel(self):
        self.status = "cancelled"

    def result(self):
        if self.status == "finished":
            return {"input": 2}  # a worker's probe
        raise RuntimeError("the model could not be built")


class _FakeClient:
    """Records what `warm_workers` would send; the dask wiring is tested with real workers above."""

    def __init__(self, workers, visible=None, status="finished", leave=(), join=None):
        self.workers, self.visible, self.status, self.leave, self.sent = (
            workers,
            visible or {},
            status,
            leave,
            [],
        )
        self.join, self.asked = join or {}, 0  # join: workers that join at the third question

    def scheduler_info(self, n_workers=-1):
        self.asked += 1
        info = {"workers": {**self.workers, **(self.join if self.asked >= 3 else {})}}
        for w in self.leave if self.sent else ():  # these leave once their warm-up was sent
            info["workers"].pop(w)
        return info

    def run(self, fn, workers):
        return {w: self.visible.get(w) for w in workers}

    def set_metadata(self, key, value):
        assert key == ["unclip-embed-gpu-slots", "/s"]  # the run's own table, keyed by its store
        self.published = value

    def submit(self, fn, params, slot, workers, allow_other_workers, pure):
        self.sent.append((fn.__name__, slot, workers, allow_other_workers))
        return _FakeFuture("pending" if workers[0] in self.leave else self.status)


def test_warm_up_goes_to_each_worker_that_can_take_the_shards_with_its_own_slot(caplog, monkeypatch):
    import distributed

    from pipeline import embed_cluster
    from pipeline.embed_cluster import warm_workers

    monkeypatch.setattr(distributed, "wait", lambda futures, timeout: None)
    cuda = SimpleNamespace(device="cuda", out="/s")
    gpu, cpu = {"resources": {"GPU": 1}}, {"resources": {}}
    hosts = {
        "tcp://10.0.0.1:2": gpu,
        "tcp://10.0.0.1:1": gpu,
        "tcp://10.0.0.1:3": cpu,
        "tcp://10.0.0.2:1": gpu,
    }
    c = _FakeClient(hosts)
    warm_workers(c, cuda, {"GPU": 1})
    assert sorted(c.sent) == [
        ("warm_up", 0, ["tcp://10.0.0.1:1"], False),
        ("warm_up", 0, ["tcp://10.0.0.2:1"], False),
        ("warm_up", 1, ["tcp://10.0.0.1:2"], False),
    ]  # the CPU-only worker gets no GPU model and takes no GPU slot
    assert c.published == {  # for workers that join later
        "slots": {"tcp://10.0.0.1:1": 0, "tcp://10.0.0.1:2": 1, "tcp://10.0.0.2:1": 0},
        "visible": {"tcp://10.0.0.1:1": None, "tcp://10.0.0.1:2": None, "tcp://10.0.0.2:1": None},
        "own_list_hosts": [],
    }
    # Workers started with their own CUDA_VISIBLE_DEVICES (dask-cuda rotates the list): each its first GPU.
    c = _FakeClient(hosts, visible={"tcp://10.0.0.1:1": "0,1", "tcp://10.0.0.1:2": "1,0"})
    warm_workers(c, cuda, {"GPU": 1})
    assert sorted(slot for _, slot, _, _ in c.sent) == [0, 0, 0] and c.published["own_list_hosts"] == [
        "10.0.0.1"
    ]
    # None able yet: it waits for one (whose warm-up settles the store's CLIP probe) instead of sending the shards
    # to workers that would compare nothing
    monkeypatch.setattr(embed_cluster, "WORKER_POLL_S", 0.0)
    c = _FakeClient({"tcp://10.0.0.1:3": cpu}, join={"tcp://10.0.0.2:1": gpu})
    assert warm_workers(c, cuda, {"GPU": 1}) == {"tcp://10.0.0.2:1": {"input": 2}}
    assert "no dask worker has the resources the shard tasks ask for ({'GPU': 1}) yet: waiting" in caplog.text
    assert c.sent == [("warm_up", 0, ["tcp://10.0.0.2:1"], False)] and c.asked == 4
    assert c.published["slots"] == {"tcp://10.0.0.2:1": 0}  # the later ones claim theirs (`claim_late_slot`)
    # A worker that leaves before its warm-up ran: its pinned task could never run; skipped, not waited on.
    c = _FakeClient(hosts, leave=("tcp://10.0.0.1:2",))
    assert set(warm_workers(c, cuda, {"GPU": 1})) == {"tcp://10.0.0.1:1", "tcp://10.0.0.2:1"}
    assert "dask worker tcp://10.0.0.1:2 left before its warm-up; skipped" in caplog.text
    with pytest.raises(RuntimeError, match="the model could not be built"):  # once, with its own error
        warm_workers(_FakeClient(hosts, status="error"), cuda, {"GPU": 1})


def test_a_worker_that_joins_late_takes_the_lowest_gpu_slot_free_on_its_host(monkeypatch):
    from dask.distributed import Client, LocalCluster

    from pipeline.embed_cluster import SLOTS_KEY, claim_late_slot

    assert claim_late_slot("/s") is None  # not in a dask worker
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    kw = {"processes": False, "protocol": "tcp", "host": "127.0.0.1", "dashboard_address": None}
    with LocalCluster(n_workers=3, threads_per_worker=1, **kw) as cluster, Client(cluster) as client:
        a, b, c = sorted(client.scheduler_info()["workers"])

        def claim(w: str) -> int | None:
            return client.submit(claim_late_slot, "/s", workers=[w], pure=False).result()

        def publish(slots: dict, own=(), visible=None) -> None:
            client.set_metadata(
                [SLOTS_KEY, "/s"], {"slots": slots, "visible": visible or {}, "own_list_hosts": own}
            )

        assert claim(b) is None  # this run published nothing: no warm-up gave slots
        dead, elsewhere = "tcp://127.0.0.1:1", "tcp://10.9.9.9:1"  # a worker that died; one on another host
        publish({a: 0, dead: 1, elsewhere: 1, c: 2})
        client.set_metadata([SLOTS_KEY, "/other"], {"slots": {}, "visible": {}, "own_list_hosts": []})
        assert claim(b) == 1  # the dead worker's slot; another host's slot 1 does not count here
        assert client.get_metadata([SLOTS_KEY, "/s", "slots", b]) == 1  # published for the next one
        assert client.get_metadata([SLOTS_KEY, "/other"])["slots"] == {}  # another run's table untouched
        publish({a: 0, b: 1})
        assert claim(c) == 2
        publish({a: 0}, own=["127.0.0.1"])
        assert (
            claim(b) == 0
        )  # the host's workers have their own CUDA_VISIBLE_DEVICES: the first GPU of its own
        # Its own list, unlike its host-mates' (dask-cuda rotates it per worker), or no host-mate known yet.
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,0")
        publish({a: 0}, visible={a: "0,1"})
        assert claim(b) == 0
        publish({})
        assert claim(b) == 0
        publish({a: 0}, visible={a: "1,0"})  # the same list as its host-mate's: one GPU each, in order
        assert claim(b) == 1


class _CountsClient:
    """Workers (address -> scheduler info) and the CUDA devices each one sees, for `cluster_device`."""

    def __init__(self, counts: dict, gpu_resource: tuple = ()):
        self.counts, self.asked = counts, 0
        self.info = {w: {"resources": {"GPU": 1} if w in gpu_resource else {}} for w in counts}

    def scheduler_info(self, n_workers=-1):
        return {"workers": self.info}

    def run(self, fn, on_error="raise"):
        assert fn.__name__ == "_cuda_device_count" and on_error == "return"  # a worker leaving is no error
        self.asked += 1
        return dict(self.counts)


def test_on_a_cluster_the_workers_settle_the_device_not_the_submitting_host(caplog):
    from pipeline.embed_cluster import cluster_device

    a, b = "tcp://10.0.0.1:1", "tcp://10.0.0.2:1"
    both = (a, b)
    assert cluster_device(_CountsClient({a: 2, b: 1}, both), "auto") == "cuda"  # this host has no GPU
    assert cluster_device(_CountsClient({a: 0, b: 0}), "auto") == "cpu"
    c = _CountsClient({a: 2, b: 0}, both)
    assert cluster_device(c, "auto") == "cpu" and "1 of 2 dask workers see no CUDA device" in caplog.text
    c = _CountsClient({a: 2, b: 0}, (a,))
    assert cluster_device(c, "cuda") == "cuda"  # b takes no GPU task: it declares no GPU
    c = _CountsClient({a: 2})
    assert cluster_device(c, "cpu") == "cpu" and c.asked == 0
    assert cluster_device(_CountsClient({a: 2, b: 2}), "cuda:1") == "cuda:1"
    assert cluster_device(_CountsClient({}), "cuda") == "cuda"  # no worker yet: the tasks wait for one
    c = _CountsClient({a: 2, b: OSError("gone")}, both)
    assert cluster_device(c, "auto") == "cuda"  # b left while asked: it takes no task, and is no error
    refused = [
        ({}, (), "auto", "--device auto with --scheduler: no dask worker has joined yet"),
        ({a: 2, b: 1}, (), "auto", "none of the 2 dask worker(s) declares one; start them with `dask worker"),
        ({a: 2}, (), "cuda", "--resources GPU=1`, or pass --device cpu"),
        ({a: 2, b: 0}, both, "cuda", f"dask worker {b} declares a GPU resource but sees no CUDA device"),
        (
            {a: 2, b: 1},
            both,
            "cuda:1",
            f"--device cuda:1: dask worker {b} sees 1 CUDA device(s); valid there: cpu, cuda, cuda:0..cuda:0",
        ),
        (
            {a: 0, b: 0},
            both,
            "cuda:0",
            f"dask worker {a} sees 0 CUDA device(s) (2 such workers); valid there: cpu",
        ),
        ({a: 1}, (a,), "gpu", "unknown --device 'gpu'; valid: auto, cpu, cuda, cuda:N"),
    ]
    for counts, gpus, device, expect in refused:
        with pytest.raises(UsageError) as e:
            cluster_device(_CountsClient(counts, gpus), device)
        assert expect in str(e.value), (device, str(e.value))


def test_a_shard_task_embeds_on_its_workers_gpu(monkeypatch, tmp_path):
    from pipeline import embed_shard
    from pipeline.embed_shard import ShardParams

    seen = []

    def models(params):
        seen.append(params.device)
        raise StopIteration  # the device is all this test needs

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: None)
    monkeypatch.setattr(embed_shard, "_models", models)
    monkeypatch.setitem(embed_shard._process_state, "gpu_slot", 3)
    params = ShardParams(str(tmp_path), "unclip-tiny", "none", 0, "cuda", 8, "none", "", False, 0, None)
    with pytest.raises(StopIteration):
        embed_shard.embed_shard(str(tmp_path / "00000.tar"), params)
    assert seen == ["cuda:1"]


def test_a_download_record_without_its_status_column_is_reported_not_trusted(tmp_path, caplog):
    from pipeline.shard_samples import download_record

    pq.write_table(pa.table({"key": ["000000000"]}), tmp_path / "00000.parquet")
    (tmp_path / "00000_stats.json").write_text("{}")
    assert download_record(str(tmp_path / "00000.tar")) is None
    assert "not cross-checked" in caplog.text and "no column status" in caplog.text
    pq.write_table(
        pa.table({"key": ["a", "b"], "status": ["success", "failed_to_download"]}), tmp_path / "00001.parquet"
    )
    (tmp_path / "00001_stats.json").write_text("{}")
    assert download_record(str(tmp_path / "00001.tar")) == ["a"]
    assert download_record(str(tmp_path / "00002.tar")) is None  # another tool's shard: no record, no stats


@pytest.mark.parametrize(
    "left",
    [  # its worker's stderr is read once, from a worker started under this test's capture (~15 s)
        pytest.param("record_empty", marks=pytest.mark.own_cluster),
        "record_missing_in_our_download",
    ],
)
def test_a_shard_whose_download_did_not_finish_fails_and_is_embedded_whole_once_it_has(
    left, request, tmp_path, capfd
):
    """A killed (or still running) img2dataset leaves a tar that may end cleanly at a member boundary, beside an
    empty record or none, and no NNNNN_stats.json (written last): the shard fails (no marker, exit 1, what to do
    named) instead of being stored short, and the finished download is then embedded whole."""
    from pipeline.errors import StageError
    from pipeline.shard_samples import download_record

    d, out = tmp_path / "shards", tmp_path / "store"
    d.mkdir()
    full = good_samples(0, list(range(8)))
    write_tar(d / "00000.tar", full[:5])  # the tar as the kill left it: 5 of 8 samples, no torn member
    if left == "record_empty":
        (d / "00000.parquet").write_bytes(b"")  # img2dataset's record, opened but never written
    else:  # our download's folder: its settings are written before the first shard starts
        (d / "summary").mkdir()
        (d / "summary" / "download_settings.json").write_text("{}")
    capfd.readouterr()
    assert embed("--shards", d / "00000.tar", "--out", out, *TINY) == 1
    if request.node.get_closest_marker("own_cluster"):  # the worker's stderr: failed once, not retried
        err = capfd.readouterr().err  # with a traceback each time
        assert "Compute Failed" not in err and "Traceback" not in err
    assert not store.is_done(out, "00000") and not list((out / "img_emb").glob("*00000*"))
    failed = json.loads((out / "logs" / "embed_summary.json").read_text())["failed"][str(d / "00000.tar")]
    assert "has not finished" in failed and "00000_stats.json" in failed and "unclip download" in failed
    if left == "record_empty":
        return  # what follows is the same for both (a finished download): run once, on the shared cluster
    record = pa.table({"key": [s["key"] for s in full], "status": ["success"] * 8})
    pq.write_table(record, d / "00000.parquet")
    (d / "00000_stats.json").write_text('{"count": 8}')
    cut = (d / "00000.parquet").read_bytes()
    (d / "00000.parquet").write_bytes(cut[: len(cut) // 2])  # a record damaged after the download finished
    with pytest.raises(StageError, match="is damaged"):
        download_record(str(d / "00000.tar"))
    write_tar(d / "00000.tar", full)  # the download rerun finished the shard
    pq.write_table(record, d / "00000.parquet")
    assert embed("--shards", d / "00000.tar", "--out", out, *TINY) == 0
    assert store.read_done(out, "00000")["rows"] == 8
    assert store.read_done(out, "00000")["checked_against_download_record"] is True


def test_unusable_samples_become_error_rows_not_misaligned_rows(base):
    errors = pq.read_table(store.field_path(base, "errors", "00000")).to_pylist()
    assert sorted(e["key"] for e in errors) == sorted(BAD_KEYS)
    for e in errors:
        assert BAD_KEYS[e["key"]] in e["reason"]
    marker = store.read_done(base, "00000")
    assert marker["rows"] == 13 and marker["errors"] == 3
    assert not set(BAD_KEYS) & set(store.read_metadata(base, "00000")["key"].to_pylist())
    assert not store.field_path(base, "errors", "00002").exists()
    summary = json.loads((base / "logs" / "embed_summary.json").read_text())
    assert (
        summary["rows"] == summary["rows_this_run"] == 22 and summary["errors"] == 3 and not summary["failed"]
    )
    reasons = [e["reason"] for e in errors]  # each kind once here: counted as they are in the summary
    assert summary["errors_by_reason"] == {r: reasons.count(r) for r in reasons}


def test_empty_shard_writes_only_its_marker_and_embedding_reader_reads_the_store(base):
    from embedding_reader import EmbeddingReader

    assert store.read_done(base, "00001") == {**store.read_done(base, "00001"), "rows": 0, "files": {}}
    assert [p for p in base.rglob("*_00001.*")] == []
    reader = EmbeddingReader(
        str(base / "img_emb"),
        file_format="parquet_npy",
        meta_columns=["key", "caption"],
        metadata_folder=str(base / "metadata"),
    )
    assert reader.count == 22
    got_emb, got_meta = [], []
    for emb, meta in reader(batch_size=5, show_progress=False):
        got_emb.append(emb)
        got_meta += meta[["key", "caption"]].to_dict("records")
    ours = [(s, i) for s, n in store.shard_rows(base) for i in range(n)]
    meta = {s: store.read_metadata(base, s).to_pylist() for s in ("00000", "00002")}
    assert len(got_meta) == len(ours) == 22
    got = np.concatenate(got_emb)
    for j, (s, i) in enumerate(ours):
        assert got_meta[j] == {"key": meta[s][i]["key"], "caption": meta[s][i]["caption"]}
        np.testing.assert_array_equal(got[j], store.open_array(base, "img_emb", s)[i].astype(got.dtype))


def test_text_encodings_are_each_captions_tokens(base, shards, clip):
    from pipeline.encoders import encode_text

    assert store.load_manifest(base)["text_enc"]["width"] == 128
    for shard in ("00000", "00002"):
        enc, off = (
            store.open_array(base, "text_enc", shard),
            store.open_array(base, "text_enc_offsets", shard),
        )
        caps = store.read_metadata(base, shard)["caption"].to_pylist()
        assert enc.dtype == np.float16 and off.dtype == np.int64 and len(off) == len(caps) + 1
        assert off[0] == 0 and off[-1] == len(enc)
        lengths = np.diff(off)
        assert len(set(lengths.tolist())) > 3  # captions of different lengths: the flat layout is exercised
        for i, cap in enumerate(caps):
            _, tok, n = encode_text(clip, clip.tokenizer([cap]), with_tokens=True)
            assert lengths[i] == int(n[0]) == len(clip.tokenizer.encode(cap)) + 2  # start/end-of-text
            np.testing.assert_allclose(
                enc[off[i] : off[i + 1]].astype(np.float32), tok[0, : n[0]].numpy(), atol=1e-2, rtol=2e-3
            )


# ---------------------------------------------------------------- VAE latents and real weights


def tiny_vae(path: Path, seed: int = 0) -> Path:
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    ).save_pretrained(path)
    return path


def test_loading_a_vae_prints_no_diffusers_warning_about_accelerate(tmp_path, capfd):
    """Every command that loaded a VAE (embed --latents vae, sample, eval-decoder, export) printed diffusers'
    five-line advice to install accelerate, which the project does not use, above its own output."""
    from pipeline.encoders import load_vae

    vae = load_vae(str(tiny_vae(tmp_path / "vae")), "cpu", weights="fresh")  # a folder no test loaded before
    assert vae.channels == 4
    assert "accelerate" not in capfd.readouterr().err


def test_a_vae_is_known_by_its_content_a_folder_rewritten_in_place_is_refused_a_moved_one_continues(
    shards, tmp_path, capsys
):
    """--vae was recorded by its path alone: a VAE fine-tuned and saved over the same folder continued the
    store with rows of another latent space (and `sample` decoded with it), and a moved folder could not
    continue it. The store now records the files' digest; every worker checks its copy against it."""
    from jobs.render import vae_source
    from pipeline import embed_shard
    from pipeline.encoders import vae_sha256

    vae_dir = tiny_vae(tmp_path / "vae")
    digest, out = vae_sha256(str(vae_dir)), tmp_path / "store"
    settings = [*TINY, "--latents", "vae", "--latent-size", "8", "--out", out]
    assert embed("--shards", shards / "00002.tar", *settings, "--vae", vae_dir) == 0
    m = store.load_manifest(out)
    assert m["latents"]["sha256"] == m["identity"]["vae_sha256"] == digest and m["latents"]["vae"] == str(
        vae_dir
    )
    assert vae_source(m["latents"]) == (str(vae_dir), digest)
    moved = tmp_path / "moved"
    shutil.copytree(vae_dir, moved)
    (moved / "README.md").write_text("notes")  # not a file diffusers loads: the same VAE
    assert embed("--shards", f"{shards}/0000[02].tar", *settings, "--vae", moved) == 0
    assert store.done_shards(out) == ["00000", "00002"]
    time.sleep(0.01)  # another mtime, as a real rewrite has
    tiny_vae(vae_dir, seed=1)
    capsys.readouterr()
    assert embed("--shards", f"{shards}/0000[012].tar", *settings, "--vae", vae_dir) == 2
    err = capsys.readouterr().err
    assert f"vae: another VAE: the store's had sha256 {digest[:12]}..., {vae_dir} has" in err, err
    assert store.done_shards(out) == ["00000", "00002"] and not store.is_done(out, "00001")
    with pytest.raises(
        UsageError, match=r"the VAE at .*vae \(sha256 \w{12}\.\.\.\) is not the one the store's latents"
    ):
        vae_source(m["latents"])
    assert vae_source(m["latents"], str(moved)) == (str(moved), digest)  # --vae: where it lies now
    params = embed_shard.ShardParams(
        str(out),
        "unclip-tiny",
        "none",
        0,
        "cpu",
        8,
        "vae",
        str(vae_dir),
        False,
        0,
        m["latents"],
        vae_sha256=digest,
    )
    with pytest.raises(
        StageError,
        match=f"--vae {vae_dir} on dask worker host .* has sha256 \\w{{12}}...; the store was made with sha256 {digest[:12]}",
    ):
        embed_shard._models(params)
    assert embed_shard._models(dataclasses.replace(params, vae=str(moved))).vae is not None
    gone = dataclasses.replace(params, vae=str(tmp_path / "gone"))
    with pytest.raises(
        StageError,
        match=f"gone on dask worker host .* is not there; the store was made with sha256 {digest[:12]}...; give every worker the same VAE$",
    ):
        embed_shard._models(gone)
    capsys.readouterr()  # a decoder trained on the store would preview its samples with the other VAE
    assert main(["train-decoder", "--data", str(out), "--out", str(tmp_path / "dec"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "is not the one the store's latents were made with" in err
    assert "; put that VAE back there, or train with --eval-every 0 (no evaluation pictures)" in err
    assert not (tmp_path / "dec").exists()
    shutil.rmtree(vae_dir)
    with pytest.raises(
        UsageError, match=r"made with \(sha256 \w{12}...\) is not at .*vae on this machine; put that"
    ):
        vae_source(m["latents"])


def test_a_vaes_digest_is_of_the_files_diffusers_builds_it_from_and_a_hub_name_is_fetched_to_check_it(
    tmp_path, monkeypatch
):
    """Every *.bin and *.safetensors used to count: a hub snapshot holding both weights forms (as
    stabilityai/sd-vae-ft-mse does), or an fp16 variant beside the weights, was refused as another VAE. And a hub
    name not cached on this machine was refused where it had to be fetched."""
    import shutil

    import huggingface_hub

    from pipeline import encoders

    vae_dir = tiny_vae(tmp_path / "vae")
    digest = encoders.vae_sha256(str(vae_dir))
    assert encoders.vae_files(str(vae_dir)) == ["config.json", "diffusion_pytorch_model.safetensors"]
    both = tmp_path / "both"
    shutil.copytree(vae_dir, both)
    for extra in ("diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.safetensors", "README.md"):
        (both / extra).write_bytes(b"other weights")
    assert encoders.vae_sha256(str(both)) == digest
    (both / "diffusion_pytorch_model.safetensors").unlink()  # then diffusers loads the .bin: another VAE
    assert encoders.vae_files(str(both)) == ["config.json", "diffusion_pytorch_model.bin"]
    assert encoders.vae_sha256(str(both)) != digest
    (both / "diffusion_pytorch_model.safetensors").write_bytes(b"weights")
    index = both / "diffusion_pytorch_model.safetensors.index.json"  # diffusers prefers it to the single file
    index.write_text("{not json")
    with pytest.raises(UsageError, match="the VAE's .*index.json is damaged"):
        encoders.vae_sha256(str(both))
    index.write_text(
        json.dumps(
            {"weight_map": {"a": "part-2.safetensors", "b": "part-1.safetensors", "c": "part-2.safetensors"}}
        )
    )
    assert encoders.vae_files(str(both)) == [
        "config.json",
        "diffusion_pytorch_model.safetensors.index.json",
        "part-1.safetensors",
        "part-2.safetensors",
    ]
    remote = shutil.copytree(vae_dir, tmp_path / "remote")
    (remote / "diffusion_pytorch_model.bin").write_bytes(b"the other form")
    fetched = []

    def download(repo, filename):  # the hub, as huggingface_hub fetches into its cache
        fetched.append(filename)
        if not (remote / filename).exists():
            raise huggingface_hub.errors.EntryNotFoundError(filename)
        dest = tmp_path / "cache" / repo / filename
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(remote / filename, dest)
        return str(dest)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr(encoders, "validate_vae", lambda name: None)  # the hub answers
    assert encoders.vae_sha256("unclip-test/not-cached") is None  # not asked to fetch: nothing is
    assert encoders.vae_sha256("unclip-test/not-cached", fetch=True) == digest
    assert fetched == [
        "config.json",
        "diffusion_pytorch_model.safetensors.index.json",
        "diffusion_pytorch_model.safetensors",
    ]
    sharded = remote.parent / "sharded"  # a sharded checkpoint: its index, then each shard the index names
    sharded.mkdir()
    shutil.copy(remote / "config.json", sharded)
    shutil.copy(both / "diffusion_pytorch_model.safetensors.index.json", sharded)
    for n in ("part-1.safetensors", "part-2.safetensors"):
        (sharded / n).write_bytes(n.encode())
    remote, fetched[:] = sharded, []
    shards_digest = encoders.vae_sha256("unclip-test/sharded", fetch=True)
    assert fetched == [
        "config.json",
        "diffusion_pytorch_model.safetensors.index.json",
        "part-1.safetensors",
        "part-2.safetensors",
    ]
    assert shards_digest == encoders.vae_sha256(str(sharded)) != digest
    only_config = tmp_path / "cut"  # a download cut short: the config alone is no VAE to take a digest of
    only_config.mkdir()
    shutil.copy(vae_dir / "config.json", only_config)
    assert encoders.vae_sha256(str(only_config)) is None

    def failing(repo, filename):  # e.g. httpx's, as a server error or timeout arrives
        raise ConnectionError("503 Server Error.\nService Unavailable for url")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", failing)
    with pytest.raises(
        UsageError,
        match=r"^VAE someone/typo: fetching it from the hub failed \(ConnectionError: 503 Server Error.\)$",
    ):
        encoders.vae_sha256("someone/typo", fetch=True)


def test_a_vae_hub_name_not_cached_is_one_line_when_the_hub_is_unreachable(monkeypatch):
    """A hub name (owner/name) used to be refused as a missing folder, so the README's --vae
    stabilityai/sd-vae-ft-mse could never run. Not cached and the hub unreachable, it is refused in one line,
    fast (the cached case: `test_vae_by_hub_name_loads_from_the_hub_cache`)."""
    from pipeline.encoders import validate_vae

    monkeypatch.setenv("HF_ENDPOINT", "https://127.0.0.1:9")
    with pytest.raises(
        UsageError, match="VAE unclip-test/not-cached is not cached and 127.0.0.1 cannot be reached"
    ):
        validate_vae("unclip-test/not-cached", probe_timeout=2)
    with pytest.raises(UsageError, match="VAE folder not found: ./nope/vae"):
        validate_vae("./nope/vae")


@pytest.mark.slow  # ~12 s: a fresh process, as huggingface_hub reads HF_HUB_CACHE as it is imported
def test_vae_by_hub_name_loads_from_the_hub_cache(tmp_path):
    snap = tmp_path / "hub" / "models--unclip-test--tiny-vae" / "snapshots" / ("0" * 40)
    tiny_vae(snap)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("0" * 40)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    code = (
        "from pipeline.encoders import load_vae, validate_vae; validate_vae('unclip-test/tiny-vae'); "
        "v = load_vae('unclip-test/tiny-vae', 'cpu'); print(v.channels, v.downsample)"
    )
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.split() == ["4", "2"], run.stderr[-2000:]


def test_vae_latents_are_uint8_with_a_fitted_range_here_or_on_a_cluster_worker(
    shards, tmp_path, monkeypatch, capsys
):
    from pipeline.encoders import load_vae, vae_encode

    vae_dir = tiny_vae(tmp_path / "vae")
    out = tmp_path / "store"
    # shards 00001 (empty) and 00002: the latent range is fitted on data even though the first shard is empty
    args = ["--shards", f"{shards}/0000[12].tar", *TINY, "--latents", "vae", "--vae", vae_dir]
    args += ["--latent-size", "8"]
    assert embed(*args, "--out", out) == 0
    lat = store.load_manifest(out)["latents"]
    assert lat["codec"] == "vae" and lat["shape"] == [4, 8, 8] and lat["image_size"] == 16
    lo, hi = np.array(lat["lo"]), np.array(lat["hi"])
    assert lo.shape == hi.shape == (4,) and (hi > lo).all()
    q = store.open_array(out, "latents", "00002")
    assert q.dtype == np.uint8 and q.shape == (9, 4, 8, 8)
    assert q.min() < 20 and q.max() > 235  # the range is fitted: the codes use most of 0..255
    mae = store.read_done(out, "00002")["latent_roundtrip_mae"]
    assert 0 < mae < (hi - lo).max() / 100
    # row i dequantises to the VAE latent of that row's image
    vae = load_vae(str(vae_dir), "cpu")
    src = tar_samples(shards / "00002.tar")
    keys = store.read_metadata(out, "00002")["key"].to_pylist()
    px = np.stack(
        [
            np.asarray(
                ImageOps.fit(Image.open(io.BytesIO(src[k].image)).convert("RGB"), (16, 16), Image.BICUBIC)
            )
            for k in keys
        ]
    ).transpose(0, 3, 1, 2)
    x = vae_encode(vae, torch.from_numpy(px).float() / 127.5 - 1).numpy()
    err = np.abs(store.dequantize(q, lo, hi) - np.clip(x, store._bcast(lo, 4), store._bcast(hi, 4)))
    assert err.max() <= (hi - lo).max() / 255 / 2 + 1e-4
    # With --scheduler the range is fitted on a worker, where the models run (the submitting host may have no
    # GPU), and the store is the same. In-process workers: the spy runs in this process.
    import distributed
    from dask.distributed import LocalCluster

    from pipeline import embed as embed_stage
    from pipeline import embed_shard

    log, calibrate = tmp_path / "where.txt", embed_shard.calibrate_latents

    def spy(cfg, *args):  # dask pickles the task even for in-process workers: it reports through a file
        try:
            where = distributed.get_worker().address
        except ValueError:
            where = "client"
        with open(log, "a") as f:
            f.write(f"{where} {cfg.vae}\n")
        return calibrate(cfg, *args)

    monkeypatch.setattr(embed_shard, "calibrate_latents", spy)
    # --vae as a relative folder: workers (which may run in another folder) are sent its absolute path, the
    # store's identity keeps it as typed
    monkeypatch.chdir(tmp_path)
    relative = [a if a != vae_dir else "vae" for a in args]
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        assert embed(*relative, "--out", tmp_path / "cluster", "--scheduler", cluster.scheduler_address) == 0
        worker = next(iter(cluster.workers.values())).address
    assert log.read_text().split() == [worker, str(vae_dir)]
    cluster_manifest = store.load_manifest(tmp_path / "cluster")
    assert cluster_manifest["identity"]["vae"] == cluster_manifest["latents"]["vae"] == "vae"
    (tmp_path / "w.pt").touch()
    cfg = embed_stage.EmbedConfig(
        shards=str(shards), out=str(out), latents="vae", vae="vae", pretrained="w.pt"
    )
    sent = embed_stage.shard_params(cfg, "cpu", store.load_manifest(out))
    assert (sent.vae, sent.pretrained) == (str(vae_dir), str(tmp_path / "w.pt"))
    cfg.pretrained = "laion2b_s34b_b79k"  # a tag, even with a file of that name here, stays a tag
    (tmp_path / cfg.pretrained).touch()
    assert embed_stage.shard_params(cfg, "cpu", store.load_manifest(out)).pretrained == cfg.pretrained
    # The same fitted range, up to float rounding: the worker's thread runs the VAE with another intra-op
    # thread layout, and on some CPUs (an AMD EPYC VM, 2026-12-02) that moves the last bits of lo and hi.
    local, remote = store.load_manifest(out)["latents"], cluster_manifest["latents"]
    fitted = dict.fromkeys(("lo", "hi"))
    assert {**remote, **fitted} == {**local, "vae": "vae", **fitted}
    for k in fitted:
        np.testing.assert_allclose(remote[k], local[k], rtol=1e-5, atol=1e-7)
    # so a code may move by one step where a latent sits on a rounding boundary, never more
    cq = store.open_array(tmp_path / "cluster", "latents", "00002")
    assert cq.shape == q.shape and np.abs(cq.astype(int) - q.astype(int)).max() <= 1
    # The VAE's digest is the one taken where the range was fitted: a client without the folder (a login node)
    # still records it, and a client whose copy differs from the worker's is refused before anything is written
    from pipeline.encoders import vae_sha256

    mine = embed_stage.identity_of
    blind = lambda c: {k: v for k, v in mine(c).items() if k != "vae_sha256"}  # noqa: E731
    monkeypatch.setattr(embed_stage, "identity_of", blind)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        assert embed(*relative, "--out", tmp_path / "blind", "--scheduler", cluster.scheduler_address) == 0
        monkeypatch.setattr(embed_stage, "identity_of", lambda c: {**mine(c), "vae_sha256": "f" * 64})
        capsys.readouterr()
        assert embed(*relative, "--out", tmp_path / "differs", "--scheduler", cluster.scheduler_address) == 2
    m = store.load_manifest(tmp_path / "blind")
    assert m["latents"]["sha256"] == m["identity"]["vae_sha256"] == vae_sha256(str(vae_dir))
    err = capsys.readouterr().err
    assert (
        "this host's copy has sha256 ffffffffffff..., the dask worker that fitted the latent range has" in err
    )
    assert (
        not store.done_shards(tmp_path / "differs") and not (tmp_path / "differs" / "manifest.json").exists()
    )


def test_clip_weights_from_a_checkpoint_path_and_its_content_not_its_path_is_the_stores(
    shards, base, tmp_path, clip, capsys
):
    import open_clip

    from pipeline.encoders import Clip, encode_image, normalize

    torch.manual_seed(5)
    model, _, _ = open_clip.create_model_and_transforms("unclip-tiny", pretrained=None)
    ckpt = tmp_path / "tiny5.pt"
    torch.save(model.state_dict(), ckpt)
    out = tmp_path / "store"
    assert embed("--shards", shards / "00002.tar", "--out", out, *TINY, "--pretrained", ckpt) == 0
    assert store.load_manifest(out)["clip"]["random_init"] is False
    src = tar_samples(shards / "00002.tar")
    keys = store.read_metadata(out, "00002")["key"].to_pylist()
    images = torch.stack([clip.preprocess(Image.open(io.BytesIO(src[k].image)).convert("RGB")) for k in keys])
    five = Clip(**{**vars(clip), "model": model.eval()})
    want = normalize(encode_image(five, images)).numpy()
    got = store.open_array(out, "img_emb", "00002").astype(np.float32)
    np.testing.assert_allclose(got, want, atol=FP16_ATOL)
    assert np.abs(got - store.open_array(base, "img_emb", "00002")).max() > 0.1  # not the seed-0 weights
    digest = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert (
        store.load_manifest(out)["clip"]["sha256"]
        == store.load_manifest(out)["identity"]["pretrained_sha256"]
    )
    assert store.load_manifest(out)["clip"]["sha256"] == digest

    # The same file moved (a folder moved or mounted elsewhere): the store goes on, not refused or wiped
    moved = tmp_path / "moved" / "tiny5.pt"
    moved.parent.mkdir()
    ckpt.rename(moved)
    before = {k: t for k, t in mtimes(out).items() if not k.startswith("logs/")}  # the run's summary is new
    assert embed("--shards", shards / "00002.tar", "--out", out, *TINY, "--pretrained", moved) == 0
    assert mtimes(out).items() >= before.items() and store.is_done(out, "00002")
    before = mtimes(out)
    # Other weights written over the same file (a CLIP retrained in place): refused, as mixing the two models'
    # embeddings in one store went unnoticed before its content was recorded
    torch.manual_seed(6)
    other, _, _ = open_clip.create_model_and_transforms("unclip-tiny", pretrained=None)
    torch.save(other.state_dict(), moved)
    capsys.readouterr()
    assert embed("--shards", shards / "00000.tar", "--out", out, *TINY, "--pretrained", moved) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"the store's had sha256 {digest[:12]}..., {moved} has " in err[0]
    assert "--overwrite" in err[0] and mtimes(out) == before and not store.is_done(out, "00000")


def test_each_worker_checks_its_clip_checkpoint_and_a_rewritten_file_is_loaded_again(tmp_path):
    """A node whose copy of --pretrained differs embeds with other weights than the store's; a long-lived worker
    (--scheduler) kept the model it had cached for that path after the file was rewritten."""
    from pipeline import embed_shard
    from pipeline.encoders import _open_clip, checkpoint_sha256

    oc = _open_clip()
    ckpt = tmp_path / "clip.pt"

    def write(seed):
        torch.manual_seed(seed)
        torch.save(oc.create_model_and_transforms("unclip-tiny", pretrained=None)[0].state_dict(), ckpt)
        return checkpoint_sha256(str(ckpt))

    first = write(5)
    params = embed_shard.ShardParams(
        str(tmp_path),
        "unclip-tiny",
        str(ckpt),
        0,
        "cpu",
        8,
        "none",
        "",
        False,
        0,
        None,
        pretrained_sha256=first,
    )
    a = embed_shard._models(params).clip.model.state_dict()
    time.sleep(0.01)  # another mtime, as a real rewrite has
    second = write(6)
    with pytest.raises(
        StageError, match=f"has sha256 {second[:12]}...; the store was made with sha256 {first[:12]}...; give"
    ):
        embed_shard._models(params)
    b = embed_shard._models(dataclasses.replace(params, pretrained_sha256=second)).clip.model.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the new file's weights, not the cached model's


def test_the_clip_probe_is_one_models_on_any_precision_and_tells_another_model_apart(clip):
    """Two open_clip versions can build other models from one arch, seed and weights; the probe tells them
    apart by cosine, and one model at fp16 rounding still agrees with itself."""
    from pipeline.encoders import PROBE_MIN_COSINE, _unb64, clip_probe, load_clip, probe_mismatch

    mine = clip_probe(clip)
    assert mine["input"] == 2 and mine["device"] == "cpu" and mine["open_clip"][0].isdigit()
    assert _unb64(mine["image"]).shape == (clip.dim,) and _unb64(mine["text"]).shape == (clip.dim,)
    assert abs(float(_unb64(mine["image"]).norm()) - 1) < 1e-3  # unit embeddings, float16-rounded
    assert clip_probe(clip) == mine and probe_mismatch(mine, dict(mine)) is None
    other = clip_probe(load_clip("unclip-tiny", "none", "cpu", 1))
    how = probe_mismatch(other, mine, ("on w2", "on w1"))
    assert how is not None and f"where one model gives >= {PROBE_MIN_COSINE}" in how
    cos = float(how.split("image cosine ")[1].split(",")[0])
    assert abs(cos) < 0.5, how
    assert f"open_clip {mine['open_clip']} and torch {torch.__version__} on w2" in how
    assert probe_mismatch(other, {**mine, "input": 1}) is None  # other inputs: nothing to compare
    # the model's preprocessing is part of it: another open_clip's mean and std for the same tag
    from open_clip.transform import image_transform

    size = clip.model.visual.image_size
    halves = image_transform(size, is_train=False, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert probe_mismatch(clip_probe(dataclasses.replace(clip, preprocess=halves)), mine) is not None


def test_a_worker_whose_model_is_not_the_stores_refuses_before_its_first_shard(tmp_path, clip):
    """A worker that joins after the warm-up compares its model in its first shard task: nothing written."""
    from pipeline import embed_shard
    from pipeline.encoders import clip_probe, load_clip

    tar = write_tar(tmp_path / "shards" / "00000.tar", good_samples(0, list(range(4))))
    out = tmp_path / "store"
    out.mkdir()
    params = ShardParams_tiny(out, clip_probe=clip_probe(load_clip("unclip-tiny", "none", "cpu", 1)))
    with pytest.raises(
        UsageError, match=r"CLIP unclip-tiny \(none\) on host .* is not the model that made the "
    ):
        embed_shard.embed_shard(str(tar), params)
    assert list(out.iterdir()) == []
    ok = embed_shard.embed_shard(str(tar), dataclasses.replace(params, clip_probe=clip_probe(clip)))
    assert ok["rows"] == 4 and store.is_done(out, "00000")


def ShardParams_tiny(out: Path, **kw):
    from pipeline.embed_shard import ShardParams

    return ShardParams(
        out=str(out), clip="unclip-tiny", pretrained="none", seed=0, device="cpu", batch_size=8,
        latents="none", vae="", text_encodings=False, torch_threads=0, latent_params=None, **kw,
    )  # fmt: skip


def test_workers_that_disagree_on_the_probe_are_refused_and_agreeing_ones_record_it(tmp_path, clip):
    from pipeline.embed import settle_probe
    from pipeline.encoders import clip_probe, load_clip

    mine, other = clip_probe(clip), clip_probe(load_clip("unclip-tiny", "none", "cpu", 1))
    manifest = {"clip": {"arch": "unclip-tiny"}}
    with pytest.raises(
        UsageError, match=r"dask workers tcp://a:1 and tcp://b:2 have other CLIP models: .*give"
    ):
        settle_probe(str(tmp_path), manifest, {"tcp://b:2": {**other, "host": "b"}, "tcp://a:1": mine})
    assert "probe" not in manifest["clip"] and not (tmp_path / store.MANIFEST).exists()
    assert settle_probe(str(tmp_path), manifest, {}) is None  # no worker yet: nothing to record
    got = settle_probe(str(tmp_path), manifest, {"tcp://b:2": {**mine, "host": "b"}, "tcp://a:1": mine})
    assert got == mine and json.loads((tmp_path / store.MANIFEST).read_text())["clip"]["probe"] == mine
    assert settle_probe(str(tmp_path), manifest, {"tcp://c:3": other}) == mine  # the store's, once it has one


def test_a_worker_unlike_the_store_that_joins_after_the_warm_up_stops_the_run(
    shards, tmp_path, capsys, monkeypatch
):
    """It failed each shard it took, fast, after dask's retries: one such worker emptied the queue into the
    failed list, and the run exited 1 as if the shards were at fault."""
    from pipeline import embed as embed_stage
    from pipeline.encoders import clip_probe, load_clip

    out = tmp_path / "store"
    args = ["--shards", f"{shards}/{{00000..00002}}.tar", "--out", out, *TINY]
    assert embed(*args) == 0
    manifest = store.load_manifest(out)
    manifest["clip"]["probe"] = clip_probe(load_clip("unclip-tiny", "none", "cpu", 1))
    store.write_json(out / store.MANIFEST, manifest)
    for shard in ("00001", "00002"):
        (out / "done" / f"{shard}.json").unlink()
    monkeypatch.setattr(
        embed_stage, "warm_workers", lambda client, params, resources=None: {}
    )  # joined later
    capsys.readouterr()
    assert embed(*args) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "shard/s]" not in line]  # the bar
    assert len(err) == 1 and "is not the model that made the store" in err[0], err
    assert store.done_shards(out) == ["00000"]


def test_a_resume_with_another_model_than_the_stores_is_refused_and_an_older_store_gains_a_probe(
    shards, tmp_path, capsys
):
    """A resume under another open_clip (here: the probe of another model put in the manifest) embedded the
    rest of the store with another model, and `validate` said OK."""
    from pipeline.encoders import clip_probe, load_clip

    out = tmp_path / "store"
    args = ["--shards", f"{shards}/{{00000..00001}}.tar", "--out", out, *TINY]
    assert embed(*args) == 0
    manifest = json.loads((out / store.MANIFEST).read_text())
    probe = manifest["clip"]["probe"]
    assert probe == clip_probe(load_clip("unclip-tiny", "none", "cpu", 0))

    manifest["clip"]["probe"] = clip_probe(load_clip("unclip-tiny", "none", "cpu", 1))
    store.write_json(out / store.MANIFEST, manifest)
    (out / "done" / "00001.json").unlink()
    before = files_of(out)
    # as a user runs it: the worker's "Compute Failed" block with the warm-up's traceback used to come first
    r = subprocess.run(
        [PY, "-m", "jobs.cli", "embed", *map(str, args)], cwd=ROOT, capture_output=True, text=True
    )
    # less the log lines: ours, and the worker's (its format) that says the tiny CLIP's weights are random
    err = [line for line in r.stderr.splitlines() if not line[:4].isdigit() and "RANDOM weights" not in line]
    assert r.returncode == 2 and len(err) == 1 and "is not the model that made the store" in err[0], r.stderr
    assert f"move {out} away first" in err[0] and "Compute Failed" not in r.stderr
    assert {k: v for k, v in files_of(out).items() if "logs" not in k} == {
        k: v for k, v in before.items() if "logs" not in k
    }

    del manifest["clip"]["probe"]  # as an older version wrote it
    store.write_json(out / store.MANIFEST, manifest)
    assert embed(*args) == 0
    assert json.loads((out / store.MANIFEST).read_text())["clip"]["probe"] == probe
    assert store.is_done(out, "00001")


# ---------------------------------------------------------------- resume, settings, bad input


def run_cli(args: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [PY, "-m", "jobs.cli", "embed", *map(str, args)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        **kw,
    )


@pytest.mark.slow  # ~40 s: dask workers killed and restarted
@pytest.mark.own_cluster  # its workers start with a preload that kills them
def test_a_shard_that_kills_its_worker_fails_alone_not_with_the_shards_queued_behind_it(tmp_path, caplog):
    """dask counts a worker's death against every task it held: the shard queued behind one that crashed its
    worker failed too (with GPU resources, every shard handed to that worker), though it never ran."""
    import dask

    d = tmp_path / "shards"
    for s in range(4):
        write_tar(d / f"{s:05d}.tar", good_samples(s, list(range(4))))
    preload = tmp_path / "poison.py"  # runs in each worker process as it starts
    preload.write_text(
        "import os\n"
        "import pipeline.embed_shard as m\n"
        "real = m.__dict__.setdefault('_unpoisoned', m.embed_shard)  # a preload may run twice\n"
        "def embed_shard(url, params):\n"
        "    if url.endswith('00002.tar'):\n"
        "        os._exit(1)  # as the OOM killer or a crash in native code would end it\n"
        "    return real(url, params)\n"
        "m.embed_shard = embed_shard\n"
    )
    out = tmp_path / "store"
    config = {"distributed.worker.preload": [str(preload)], "distributed.scheduler.allowed-failures": 0}
    with dask.config.set(config), caplog.at_level("WARNING"):
        assert embed("--shards", d, "--out", out, *TINY, "--retries", "0") == 1
    assert store.done_shards(out) == ["00000", "00001", "00003"]
    summary = json.loads((out / "logs" / "embed_summary.json").read_text())
    assert (
        list(summary["failed"]) == [str(d / "00002.tar")]
        and "KilledWorker" in summary["failed"][str(d / "00002.tar")]
    )
    assert "because a dask worker died while it held them" in caplog.text


@pytest.mark.slow
def test_killed_run_resumes_to_identical_bytes(tmp_path):
    d = tmp_path / "shards"
    for s in range(8):
        write_tar(d / f"{s:05d}.tar", good_samples(s, [(i * 7) % 24 for i in range(24)]))
    args = ["--shards", d, *TINY, *PIXELS, "--text-encodings"]
    out, ref = tmp_path / "store", tmp_path / "ref"
    proc = run_cli([*args, "--out", out], start_new_session=True)
    try:
        deadline = time.time() + 120
        while not list((out / "done").glob("*.json")) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and its dask cluster, mid-run
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert 1 <= len(store.done_shards(out)) < 8
    assert embed(*args, "--out", out) == 0
    assert embed(*args, "--out", ref) == 0
    got, want = files_of(out), files_of(ref)
    assert sorted(got) == sorted(want) and len(want) == 1 + 8 * 7  # manifest + 8 x (6 arrays/tables + marker)
    assert [k for k in want if got[k] != want[k]] == []
    before = mtimes(out)
    assert run_cli([*args, "--out", out]).wait() == 0
    assert json.loads((out / "logs" / "embed_summary.json").read_text())["rows_this_run"] == 0
    after = mtimes(out)
    assert {k: v for k, v in after.items() if not k.startswith("logs")} == {
        k: v for k, v in before.items() if not k.startswith("logs")
    }


def test_our_worker_preload_comes_after_the_users_in_every_form_dask_takes():
    """dask's config takes a preload as one name or a list, and its argv as one list for every preload or a
    list each: the first form was split into characters ("No module named 'u'") and the last refused for
    mismatched lengths, so that a user's own preload stopped the cluster's start."""
    import dask

    from pipeline import embed_cluster

    ours = embed_cluster.__name__
    cases = [
        ({}, {"preload": [ours]}),
        ({"distributed.worker.preload": "userpre"}, {"preload": ["userpre", ours]}),
        ({"distributed.worker.preload": ["a", "b"]}, {"preload": ["a", "b", ours]}),
        (
            {"distributed.worker.preload": ["a"], "distributed.worker.preload-argv": ["--x", "1"]},
            {"preload": ["a", ours]},  # one argv for every preload: ours is no click command and ignores it
        ),
        (
            {"distributed.worker.preload": ["a", "b"], "distributed.worker.preload-argv": [["--x"], []]},
            {"preload": ["a", "b", ours], "preload_argv": [["--x"], [], []]},
        ),
    ]
    for config, want in cases:
        with dask.config.set(
            {"distributed.worker.preload": [], "distributed.worker.preload-argv": [], **config}
        ):
            assert embed_cluster._with_our_preload() == want, config


def test_a_ctrl_c_while_the_cluster_starts_is_taken_once_it_has_and_a_second_at_once():
    """One that landed inside LocalCluster's start left a half-made cluster for dask's exit hook to fail on."""
    from pipeline.embed_cluster import _ctrl_c_deferred

    finished = []
    with pytest.raises(KeyboardInterrupt):
        with _ctrl_c_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            finished.append("the start")  # not cut short
    assert finished == ["the start"]
    with pytest.raises(KeyboardInterrupt) as caught:
        with _ctrl_c_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            raise RuntimeError("Nanny failed to start.")  # the same Ctrl-C ended a worker
    assert isinstance(caught.value.__cause__, RuntimeError)
    with pytest.raises(KeyboardInterrupt):
        with _ctrl_c_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGINT)  # a start that hangs: the second is taken at once
            time.sleep(0.05)
            finished.append("after the second")
    assert finished == ["the start"] and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with pytest.raises(ValueError):  # no Ctrl-C: the start's own error
        with _ctrl_c_deferred():
            raise ValueError("port in use")


def test_ctrl_c_ends_the_run_in_one_line_and_the_same_command_finishes_it(tmp_path):
    """Ctrl-C reaches the whole process group. Each LocalCluster worker died of it with a traceback of its own
    (and the read-ahead plugin's teardown error), some 40 lines above the one that says what to do; now the
    workers ignore it and this command closes them."""
    d = tmp_path / "shards"
    for s in range(12):
        write_tar(d / f"{s:05d}.tar", good_samples(s, list(range(32))))
    args = ["--shards", d, *TINY]
    out, ref = tmp_path / "store", tmp_path / "ref"
    proc = subprocess.Popen(
        [PY, "-m", "jobs.cli", "embed", *map(str, args), "--out", str(out)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 120
        while not list((out / "done").glob("*.json")) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = err.decode()
    assert proc.returncode == 130, text[-3000:]
    assert text.rstrip().endswith("unclip embed: interrupted; rerun the same command to continue"), text[
        -3000:
    ]
    assert "Traceback" not in text and "ERROR" not in text, text[-3000:]
    assert 1 <= len(store.done_shards(out)) < 12
    assert embed(*args, "--out", out) == 0 and embed(*args, "--out", ref) == 0
    got, want = files_of(out), files_of(ref)
    assert sorted(got) == sorted(want) and [k for k in want if got[k] != want[k] and "logs" not in k] == []


def test_a_resume_with_another_batch_size_says_the_store_is_no_longer_byte_identical(tmp_path, caplog):
    """Batch size, device, image decode and --compile are not the store's identity, so a resume with others was
    accepted in silence and its shards differed from an uninterrupted run's by float rounding."""
    import dataclasses

    from pipeline.embed import warn_mixed_rounding
    from pipeline.embed_shard import ShardParams, embed_shard

    tar = write_tar(tmp_path / "shards" / "00000.tar", good_samples(0, list(range(6))))
    out = tmp_path / "store"
    out.mkdir()
    params = ShardParams(
        out=str(out), clip="unclip-tiny", pretrained="none", seed=0, device="cpu", batch_size=8,
        latents="none", vae="", text_encodings=False, torch_threads=0, latent_params=None,
    )  # fmt: skip
    embed_shard(str(tar), params)
    assert store.read_done(out, "00000")["embedded_with"] == {
        "device": "cpu",
        "batch_size": 8,
        "image_decode": "pil",
        "compile": False,
    }
    with caplog.at_level("WARNING"):
        assert warn_mixed_rounding(str(out), [str(tar)], params.rounding()) == []
        assert "other settings" not in caplog.text
        lines = warn_mixed_rounding(
            str(out), [str(tar)], dataclasses.replace(params, batch_size=4).rounding()
        )
    assert lines == ["--batch-size: the store's finished shards were embedded with 8, this run's with 4"]
    assert "resuming" in caplog.text and "not byte-identical to one made in one go" in caplog.text


def test_store_made_with_other_settings_is_refused_then_overwritten(base, shards, tmp_path, capsys):
    before = mtimes(base)
    assert embed("--shards", shards, "--out", base, *TINY, "--text-encodings") == 2  # no --latents pixels
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("unclip embed: error:") and "latents" in err[0]
    assert "--overwrite" in err[0]
    assert embed("--shards", shards, "--out", base, *TINY, *PIXELS, "--text-encodings", "--seed", "3") == 2
    assert "seed" in capsys.readouterr().err
    assert mtimes(base) == before
    out = tmp_path / "store"
    shutil.copytree(base, out)
    assert embed("--shards", shards / "00002.tar", "--out", out, *TINY, "--overwrite") == 0
    assert store.load_manifest(out)["latents"] is None and store.load_manifest(out)["text_enc"] is None
    assert store.done_shards(out) == ["00002"]
    assert not (out / "latents").exists() and not (out / "text_enc").exists()
    assert not (out / "errors").exists() and not (out / "img_emb" / "img_emb_00000.npy").exists()
    assert (
        store.read_metadata(out, "00002")["key"].to_pylist()
        == store.read_metadata(base, "00002")["key"].to_pylist()
    )


@pytest.mark.parametrize(
    "case, expect",
    [
        ("no_match", "no .tar shard matched"),
        # a brace range names its shards: one not there was skipped, and the run embedded short with exit 0
        ("named_but_missing", "names 2 shard(s) that do not exist: "),
        ("unbalanced_braces", "--shards "),
        ("unknown_scheme", "Protocol not known: nope"),
        ("torch_threads", "--torch-threads must be >= 0 (0 = cores / workers), not -1"),
        ("retries", "--retries must be >= 0"),
        ("calib_samples", "--calib-samples must be >= 1"),
        ("arch", "unknown CLIP architecture 'ViT-Nope'"),
        ("checkpoint", "CLIP checkpoint not found"),
        (
            "checkpoint_not_one",
            "cannot be read as a CLIP checkpoint: torch.load(weights_only=True) as open_clip",
        ),
        ("checkpoint_not_safetensors", "cannot be read as a CLIP checkpoint: safetensors failed"),
        ("garbage_tar", "unreadable tar"),
        # a folder that is no VAE: diffusers' "no file named config.json" after the work had begun, exit 1
        ("vae_not_a_vae_folder", "holds no config.json: not a diffusers AutoencoderKL folder"),
        ("vae_missing", "VAE folder not found"),
        ("device_name", "unknown --device 'tpu'; valid: auto, cpu, cuda, cuda:N"),
        ("device_index", "--device cuda:99 but "),
        ("device_zero_padded", "unknown --device 'cuda:01'"),
        ("device_not_ascii", "unknown --device 'cuda:\u00b2'"),
        ("decode_threads", "--decode-threads must be >= 0 (0 = by device), not -1"),
        ("workers", "--workers must be >= 0 (0 = by device), not -1"),
        ("batch_size", "--batch-size must be >= 0 (0 = by device), not -1"),
        ("latent_size", "--latent-size must be >= 1 (the latents' side in pixels), not 0"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, expect, shards, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--shards", shards, "--out", out, *TINY]
    if case == "no_match":
        args[1] = f"{tmp_path}/nowhere/*.tar"
    elif case == "named_but_missing":
        args[1] = f"{shards}/{{00000..00004}}.tar"
    elif case == "unbalanced_braces":
        args[1] = f"{shards}/{{00000..00004.tar"
    elif case == "unknown_scheme":
        args[1] = "nope://bucket/00000.tar"
    elif case in ("torch_threads", "retries", "calib_samples"):
        args += [f"--{case.replace('_', '-')}", "-1" if case != "calib_samples" else "0"]
    elif case == "arch":
        args += ["--clip", "ViT-Nope"]
    elif case == "checkpoint":
        args += ["--pretrained", f"{tmp_path}/missing.pt"]
    elif case.startswith("checkpoint_not"):  # the manifest used to be written before a worker failed on it
        bad = tmp_path / ("clip.pt" if case == "checkpoint_not_one" else "clip.safetensors")
        bad.write_text("a text file, not weights\n")
        args += ["--pretrained", bad]
    elif case == "garbage_tar":
        bad = tmp_path / "bad"
        shutil.copytree(shards, bad)
        (bad / "00003.tar").write_bytes(b"these are not the bytes of a tar file\n" * 40)
        args[1] = bad
    elif case == "vae_not_a_vae_folder":
        args += ["--latents", "vae", "--vae", shards]
    elif case == "vae_missing":
        args += ["--latents", "vae", "--vae", f"{tmp_path}/no_vae/"]
    elif case == "decode_threads":
        args += ["--decode-threads", "-1"]
    elif case == "workers":
        args += ["--workers", "-1"]
    elif case == "batch_size":
        args += ["--batch-size", "-1"]
    elif case == "latent_size":
        args += [*PIXELS[:2], "--latent-size", "0"]
    elif case.startswith("device"):
        spelt = {"device_name": "tpu", "device_index": "cuda:99", "device_zero_padded": "cuda:01"}
        args += ["--device", spelt.get(case, "cuda:\u00b2")]
    assert embed(*args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("unclip embed: error: ") and expect in err[0]
    if case == "no_match":
        assert "nowhere/*.tar" in err[0]
    if case == "named_but_missing":
        assert "00003.tar" in err[0] and "00004.tar" in err[0] and "00002.tar" not in err[0]
    if case == "arch":
        assert "ViT-B-32" in err[0] and "unclip-tiny" in err[0]
    if case == "garbage_tar":
        assert "00003.tar" in err[0]
    if case == "device_index":
        assert "CUDA device(s) are visible; valid here: auto, cpu" in err[0]
    assert not out.exists()


# ---------------------------------------------------------------- dask with an external scheduler


def test_on_a_scheduler_a_gpu_run_without_gpu_workers_is_refused_and_a_finished_store_needs_none(
    base, shards, tmp_path, capsys, monkeypatch, caplog
):
    from dask.distributed import LocalCluster

    out = tmp_path / "out"
    kw = {"processes": False, "dashboard_address": None}
    with LocalCluster(n_workers=1, threads_per_worker=1, **kw) as cluster:
        args = ["--shards", shards, "--out", out, *TINY, "--scheduler", cluster.scheduler_address]
        assert embed(*args, "--device", "cuda") == 2  # its tasks would wait for ever for a GPU resource
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "none of the 1 dask worker(s) declares one" in err[0] and not out.exists()
    # A finished store reruns without connecting: its scheduler may be long gone.
    done = tmp_path / "done"
    shutil.copytree(base, done)
    before = files_of(done)
    pattern = f"{shards}/{{00000..00002}}.tar"
    gone = f"tcp://127.0.0.1:{free_port()}"
    assert (
        embed("--shards", pattern, "--out", done, *TINY, *PIXELS, "--text-encodings", "--scheduler", gone)
        == 0
    )
    assert {k: v for k, v in files_of(done).items() if "logs/" not in k} == {
        k: v for k, v in before.items() if "logs/" not in k
    }
    # A store with work to do and nothing listening at --scheduler: refused in one line, not after dask's 30 s
    # of retries ("Timed out trying to connect")
    capsys.readouterr()
    from pipeline import embed_cluster

    monkeypatch.setattr(embed_cluster, "REFUSED_FOR_S", 0.5)  # a scheduler still starting gets 10 s
    for addr in (gone, gone[len("tcp://") :]):
        with caplog.at_level("INFO", logger="pipeline.embed_cluster"):
            assert embed("--shards", shards, "--out", tmp_path / "new", *TINY, "--scheduler", addr) == 2
        assert capsys.readouterr().err.strip() == (
            f"unclip embed: error: cannot reach --scheduler {addr}: nothing listens there (Connection refused); "
            "start a dask scheduler at that address, or leave --scheduler out to start a local cluster"
        )
    assert "nothing listens there yet; waiting up to 0.5 s for a scheduler to start" in caplog.text
    assert not (tmp_path / "new").exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def external_cluster(workers: list[list[str]]):
    """A `dask scheduler` and one `dask worker` process (1 thread) per entry of ``workers`` (its extra
    arguments), as a user starts them; yields the scheduler's address once every worker has joined."""
    from dask.distributed import Client

    dask = str(Path(PY).parent / "dask")
    addr = f"tcp://127.0.0.1:{free_port()}"
    quiet = {
        "cwd": ROOT,
        "start_new_session": True,
        "stdout": subprocess.DEVNULL,
        "stderr": subprocess.DEVNULL,
    }
    procs = [
        subprocess.Popen(
            [dask, "scheduler", "--host", "127.0.0.1", "--port", addr.rsplit(":", 1)[1], "--no-dashboard"],
            **quiet,
        )
    ]
    try:
        one = ["--nthreads", "1", "--nworkers", "1", "--no-dashboard", "--host", "127.0.0.1"]
        procs += [subprocess.Popen([dask, "worker", addr, *one, *extra], **quiet) for extra in workers]
        with Client(addr, timeout="60s") as c:
            c.wait_for_workers(len(workers), timeout=90)
        yield addr
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()


@pytest.mark.own_cluster  # the local side is a LocalCluster of its own, as a user's run gets
@pytest.mark.slow  # ~9 s: a dask scheduler and two worker processes
def test_external_scheduler_gives_the_local_cluster_result(base, shards, tmp_path):
    out = tmp_path / "store"
    with external_cluster([[], []]) as addr:
        assert (
            embed("--shards", shards, "--out", out, *TINY, *PIXELS, "--text-encodings", "--scheduler", addr)
            == 0
        )
    assert store.shard_rows(out) == store.shard_rows(base)
    assert store.load_manifest(out)["clip"]["probe"] == store.load_manifest(base)["clip"]["probe"]
    for shard in ("00000", "00002"):
        assert store.read_metadata(out, shard).equals(store.read_metadata(base, shard))
        for f in ("img_emb", "text_emb", "text_enc"):
            a, b = store.open_array(out, f, shard), store.open_array(base, f, shard)
            assert a.shape == b.shape and np.allclose(a, b, atol=FP16_ATOL, rtol=2e-3)
        for f in ("latents", "text_enc_offsets"):
            np.testing.assert_array_equal(store.open_array(out, f, shard), store.open_array(base, f, shard))
        assert (
            store.field_path(out, "errors", shard).exists()
            == store.field_path(base, "errors", shard).exists()
        )


# Another open_clip on one node, in effect: its random weights are drawn after one more draw from the seed
OTHER_OPEN_CLIP = """
import open_clip
import torch

if not hasattr(open_clip, "unpatched_create"):  # dask imports a preload twice, in one namespace
    open_clip.unpatched_create = open_clip.create_model_and_transforms


def create(*args, **kwargs):
    torch.rand(1)
    return open_clip.unpatched_create(*args, **kwargs)


open_clip.create_model_and_transforms = create
"""


@pytest.mark.slow  # ~15 s: a dask scheduler and two worker processes
def test_a_worker_with_another_open_clip_is_refused_before_any_shard(shards, tmp_path, capsys):
    """A worker whose open_clip builds another model from the same arch and seed embedded its shards with that
    model; the run exited 0 and `validate` said OK about a store of two embedding spaces."""
    preload = tmp_path / "other_open_clip.py"
    preload.write_text(OTHER_OPEN_CLIP)
    out = tmp_path / "store"
    args = ["--shards", f"{shards}/{{00000..00002}}.tar", "--out", out, *TINY]
    with external_cluster([[], ["--preload", str(preload)]]) as addr:
        capsys.readouterr()
        assert embed(*args, "--scheduler", addr) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "have other CLIP models: they embed a fixed probe otherwise" in err[0], err
        assert store.done_shards(out) == [] and "probe" not in store.load_manifest(out)["clip"]
    with external_cluster([["--preload", str(preload)]]) as addr:  # that node alone: it makes the store
        assert embed(*args, "--scheduler", addr) == 0
    (out / "done" / "00002.json").unlink()
    capsys.readouterr()
    assert embed(*args) == 2  # a resume here, with this host's open_clip, would mix the two
    assert "is not the model that made the store" in capsys.readouterr().err
    assert store.done_shards(out) == ["00000", "00001"]


# A preload that wraps open_clip's model factory in itself (dask imports a preload twice, in one namespace)
RECURSING_OPEN_CLIP = """
import open_clip

_create = open_clip.create_model_and_transforms


def create(*args, **kwargs):
    return _create(*args, **kwargs)


open_clip.create_model_and_transforms = create
"""


@pytest.mark.slow  # ~15 s: a dask scheduler and a worker process
def test_a_warm_up_that_recurses_without_end_fails_the_run_instead_of_hanging_it(shards, tmp_path):
    """dask cannot pickle a traceback as deep as the recursion limit: the client never learnt that the task had
    failed, and the embed waited forever."""
    preload = tmp_path / "recursing.py"
    preload.write_text(RECURSING_OPEN_CLIP)
    out = tmp_path / "store"
    with external_cluster([["--preload", str(preload)]]) as addr:
        r = subprocess.run(
            [
                PY,
                "-m",
                "jobs.cli",
                "embed",
                "--shards",
                f"{shards}/00000.tar",
                "--out",
                out,
                *TINY,
                "--scheduler",
                addr,
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=180,
        )
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 1 and last.startswith("unclip embed: failed: warm_up on host "), r.stderr[-2000:]
    assert "RecursionError: maximum recursion depth exceeded" in last and "in that worker's log" in last
    assert store.done_shards(out) == []


# ---------------------------------------------------------------- --compile


def _shard_files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "logs" not in p.parts
    }


def test_compile_wraps_both_towers_without_touching_the_cached_model(shards, tmp_path, monkeypatch):
    """--compile reaches the worker's models: the image tower and the text transformer go through torch.compile
    (faked here as the identity, so the store must be byte-identical), once per process, and the model that
    load_clip caches for everyone else stays eager."""
    from pipeline import encoders
    from pipeline.embed_shard import ShardParams, embed_shard

    wrapped = []

    def fake_compile(module, dynamic=None):
        wrapped.append((type(module).__name__, dynamic))
        return module

    monkeypatch.setattr(encoders.torch, "compile", fake_compile)
    encoders._compile_towers.cache_clear()
    lp = store.pixels_latents(16)
    stores = {}
    for flag in (False, True):
        out = tmp_path / f"compile_{flag}"
        out.mkdir()
        params = ShardParams(
            out=str(out), clip="unclip-tiny", pretrained="none", seed=0, device="cpu", batch_size=8,
            latents="pixels", vae="", text_encodings=True, torch_threads=0, latent_params=lp, compile=flag,
        )  # fmt: skip
        for s in ("00000", "00002"):
            embed_shard(str(shards / f"{s}.tar"), params)
        stores[flag] = _shard_files(out)
        for s in ("00000", "00002"):  # the markers say which way the shard was embedded; the rest is the same
            marker = json.loads(stores[flag].pop(f"done/{s}.json"))
            assert marker.pop("embedded_with")["compile"] is flag
            stores[flag][f"done/{s}.json"] = marker
    encoders._compile_towers.cache_clear()
    assert wrapped == [("VisionTransformer", True), ("Transformer", True)]  # once, dynamic shapes
    assert len(stores[True]) >= 10 and stores[True] == stores[False]
    model = encoders.load_clip("unclip-tiny", "none", "cpu", 0).model
    assert type(model.visual).__name__ == "VisionTransformer"


@pytest.mark.slow  # ~35 s: torch.compile of unclip-tiny's towers in the dask worker
def test_compiled_towers_embed_the_same_rows_as_eager(shards, base, tmp_path):
    out = tmp_path / "compiled"
    args = ("--shards", f"{shards}/{{00000..00002}}.tar", *TINY, *PIXELS, "--text-encodings")
    assert embed(*args, "--out", out, "--compile") == 0
    for shard in ("00000", "00002"):
        assert (
            store.read_metadata(out, shard)["key"].to_pylist()
            == store.read_metadata(base, shard)["key"].to_pylist()
        )
        for field in ("img_emb", "text_emb"):
            a, b = (store.open_array(s, field, shard).astype(np.float32) for s in (base, out))
            cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
            assert cos.min() >= 0.9999 and np.abs(a - b).max() < 1e-3  # float rounding apart, the same
        assert np.array_equal(
            store.open_array(base, "latents", shard), store.open_array(out, "latents", shard)
        )


def test_a_damaged_shard_fails_alone_with_vae_latents_too(shards, tmp_path, capsys):
    """The latent range is fitted on the first shards' images before any task: a tar cut mid-member there
    stopped the whole run with no store at all, where without latents only that shard fails."""
    vae_dir = tiny_vae(tmp_path / "vae")
    d = tmp_path / "shards"
    d.mkdir()
    whole = (shards / "00000.tar").read_bytes()
    (d / "00000.tar").write_bytes(whole[: len(whole) // 2])  # first in the order the range is fitted on
    shutil.copy(shards / "00002.tar", d / "00002.tar")
    out = tmp_path / "store"
    args = [
        "--shards",
        f"{d}/{{00000,00002}}.tar",
        *TINY,
        "--latents",
        "vae",
        "--vae",
        vae_dir,
        "--latent-size",
        "8",
    ]
    assert embed(*args, "--out", out, "--retries", "0") == 1
    got = capsys.readouterr()
    report = json.loads(got.out)
    assert report["done"] == 1 and "is truncated or damaged" in str(report["failed"])
    assert store.done_shards(out) == ["00002"] and store.load_manifest(out)["latents"]["fitted_on"] > 0
    # the run's last line says how it ended (it had been the JSON's closing brace)
    last = got.err.strip().splitlines()[-1]
    rows = f"{report['rows_this_run']} rows this run in {report['seconds_this_run']} s"
    assert last == (
        f"embed: 1 of 2 shards failed, not stored (00000: {report['failed'][str(d / '00000.tar')]}); 1 done "
        f"({rows}): rerun the same command to retry the failed ones"
    )
    shutil.copy(shards / "00000.tar", d / "00000.tar")  # mended: the rerun embeds it alone
    assert embed(*args, "--out", out) == 0
    got = capsys.readouterr()
    report = json.loads(got.out)
    rows = f"{report['rows_this_run']} rows this run in {report['seconds_this_run']} s"
    assert report["rows_this_run"] > 0 and got.err.strip().splitlines()[-1] == (
        f"embed: 2 of 2 shards done, {report['rows']} rows, {report['errors']} error rows ({rows}); "
        f"{out}/logs/embed_summary.json"
    )


def test_odd_members_and_metadata_make_error_rows_or_stored_text_never_a_failed_or_short_shard(
    tmp_path, capsys
):
    """A sample whose image is a link in the tar vanished (neither embedded nor an error row); a member name
    that is not UTF-8, a lone surrogate escaped in .json, and an empty object in .json each failed the whole
    shard (dask tracebacks: UnicodeEncodeError, "Cannot write struct type ... with no child field")."""
    path = tmp_path / "shards/00000.tar"
    path.parent.mkdir()
    ok = [sample(f"k{i}", i) for i in range(3)]
    ok[1]["json"] = json.dumps({"key": "k1", "url": "http://x/\ud83d.jpg", "extra": {}}).encode()
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT, encoding="latin-1") as tf:

        def add(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))

        for s in ok:
            for ext in ("jpg", "txt", "json"):
                add(f"{s['key']}.{ext}", s[ext])
        add("caf\xe9.jpg", jpeg(7))  # written as latin-1 bytes: not UTF-8
        add("caf\xe9.txt", b"a cafe")
        add("k8.jpg", jpeg(8))
        add("k8.txt", b"caf\xe9 au lait")  # latin-1, not UTF-8: kept with U+FFFD, and counted
        link = tarfile.TarInfo("k9.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "k0.jpg"
        tf.addfile(link)
        add("k9.txt", b"a linked picture")
    out = tmp_path / "store"
    assert embed("--shards", str(path), "--out", out, *TINY, "--retries", "0") == 0
    keys = store.read_metadata(out, "00000")["key"].to_pylist()
    errors = pq.read_table(store.field_path(out, "errors", "00000")).to_pydict()
    assert sorted(keys) == ["caf\\xe9", "k0", "k1", "k2", "k8"]
    captions = store.read_metadata(out, "00000")["caption"].to_pylist()
    assert captions[keys.index("k8")] == "caf\ufffd au lait"
    assert store.read_done(out, "00000")["captions_not_utf8"] == 1
    assert errors["key"] == ["k9"] and "is a link, which is not read" in errors["reason"][0]
    meta = store.read_metadata(out, "00000").to_pydict()
    row = keys.index("k1")
    assert meta["url"][row] == "http://x/\\ud83d.jpg" and meta["extra"][row] == "{}"
    capsys.readouterr()
    assert main(["validate", str(out)]) == 0  # its key check reads the tar's keys the same way


def test_a_killed_downloads_empty_tar_fails_alone_not_the_whole_run(shards, tmp_path):
    """A download killed as it opened a shard leaves a 0-byte tar: the run was refused (exit 2, "unreadable
    tar"), where a shard img2dataset has not finished fails alone, naming `unclip download`."""
    d, out = tmp_path / "shards", tmp_path / "store"
    d.mkdir()
    shutil.copy(shards / "00002.tar", d / "00002.tar")
    (d / "00002_stats.json").write_text('{"count": 9}')
    (d / "00003.tar").write_bytes(b"")
    (d / "summary").mkdir()
    (d / "summary/download_settings.json").write_text("{}")  # our download's folder
    assert embed("--shards", f"{d}/{{00002,00003}}.tar", "--out", out, *TINY, "--retries", "0") == 1
    failed = json.loads((out / "logs" / "embed_summary.json").read_text())["failed"]
    assert list(failed) == [str(d / "00003.tar")] and "unclip download" in failed[str(d / "00003.tar")]
    assert store.done_shards(out) == ["00002"]


def test_a_rerun_is_not_refused_for_latent_settings_of_a_store_without_latents(shards, tmp_path, capsys):
    """`--latent-size 16` (or --vae) on a rerun of a store made without latents was refused as "made with other
    settings (latent_size: 32)": a setting that changes nothing in it. Another --latents still is."""
    out = tmp_path / "store"
    args = ["--shards", str(shards / "00002.tar"), "--out", out, *TINY]
    assert embed(*args) == 0
    manifest = (out / "manifest.json").read_bytes()
    assert embed(*args, "--latent-size", "16", "--vae", "some/vae") == 0
    assert (out / "manifest.json").read_bytes() == manifest
    capsys.readouterr()
    assert embed(*args, "--latents", "pixels") == 2
    assert "made with other settings (latents: none)" in capsys.readouterr().err


def test_distributeds_harmless_cancel_error_on_an_early_ctrl_c_is_not_logged(caplog):
    """A Ctrl-C before a `sync` call had started: distributed's cancel fails with a NameError, which tornado
    logged at ERROR with a traceback above the command's one line (the Ctrl-C test failed on it in CI)."""
    import logging

    from pipeline.embed_cluster import _NoCancelNameError

    def record(exc):
        return logging.LogRecord(
            "tornado.application", logging.ERROR, "", 0, "Exception in callback", (), (type(exc), exc, None)
        )

    f = _NoCancelNameError()
    assert not f.filter(record(NameError("cannot access free variable 'future' where it is not associated")))
    assert f.filter(record(NameError("name 'x' is not defined"))) and f.filter(record(ValueError("future")))


@pytest.mark.own_cluster  # its worker's stderr is read, from a worker started under this test's capture
def test_a_damaged_local_tar_fails_once_not_retried(shards, tmp_path, capfd):
    """No retry mends a local tar cut off mid-member: it was run --retries times, each with a dask traceback."""
    d = tmp_path / "shards"
    d.mkdir()
    whole = (shards / "00000.tar").read_bytes()
    (d / "00000.tar").write_bytes(whole[: len(whole) // 2])
    capfd.readouterr()
    assert embed("--shards", d / "00000.tar", "--out", tmp_path / "store", *TINY, "--retries", "2") == 1
    err = capfd.readouterr().err
    assert "Compute Failed" not in err and "Traceback" not in err
    failed = json.loads((tmp_path / "store/logs/embed_summary.json").read_text())["failed"]
    assert "is truncated or damaged" in failed[str(d / "00000.tar")]


def test_a_shard_task_writes_only_while_its_embed_run_holds_the_store(base, shards, tmp_path, monkeypatch):
    """Dask cannot stop a task already running on a worker of an existing scheduler: after a Ctrl-C such a
    task wrote its shard seconds after the command had exited, even into the store a following
    `embed --overwrite` had begun again (with another model), and `validate` said OK. A worker that could not
    see --out wrote the shard onto its own disk, and the run exited 0 without it."""
    import shutil

    from pipeline import embed as embed_stage
    from pipeline import embed_shard

    out = tmp_path / "store"
    shutil.copytree(base, out)
    manifest = store.load_manifest(out)
    params = embed_stage.shard_params(
        embed_stage.EmbedConfig(shards=str(shards), out=str(out), clip="unclip-tiny", pretrained="none"),
        "cpu",
        manifest,
    )
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    url = str(shards / "00000.tar")
    # a task of a run that has ended (its run file gone, or another run's there): not a byte touched
    stale = dataclasses.replace(params, run_token="ended-run")
    res = embed_shard.embed_shard(url, stale)
    assert "has ended, or another holds the store" in res["failed"]
    token = store.start_run(out)
    res = embed_shard.embed_shard(url, stale)
    assert "has ended, or another holds the store" in res["failed"]
    assert store.is_done(out, "00000")  # its finished shard untouched: the stale task removed nothing
    # the run ends while the task works: its files are not renamed into place, nor its marker
    real = embed_shard._collect

    def ctrl_c_meanwhile(*a):
        store.end_run(out, token)
        return real(*a)

    monkeypatch.setattr(embed_shard, "_collect", ctrl_c_meanwhile)
    res = embed_shard.embed_shard(url, dataclasses.replace(params, run_token=token))
    assert "has ended, or another holds the store" in res["failed"]
    monkeypatch.undo()
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert not store.is_done(out, "00000")  # the task's start removed its partial shard, as before
    assert {p: b for p, b in after.items() if "00000" not in p.name} == {
        p: b for p, b in before.items() if "00000" not in p.name
    }
    assert not [p for p in after if "00000" in p.name]  # nor anything of its own left
    # a worker that cannot see the store (no manifest, no run file at --out): named, nothing made there
    # (raised, not a failed result: dask retries it, maybe on a worker that sees the store)
    nowhere = dataclasses.replace(params, out=str(tmp_path / "not_here"), run_token=token)
    with pytest.raises(StageError, match=r"is not visible from this worker .*\(a shared filesystem\)"):
        embed_shard.embed_shard(url, nowhere)
    assert not (tmp_path / "not_here").exists()


def test_a_shard_a_worker_cannot_open_is_named_as_such_not_as_damaged(tmp_path):
    """A worker that could not see the shards' path said "truncated or damaged after 0 members" (which invites
    deleting a good shard) and failed it at once; the latent range's fit on such a worker said only that no
    shard held an image, the cause in the worker's log alone."""
    from pipeline import embed as embed_stage
    from pipeline import embed_shard

    gone = str(tmp_path / "elsewhere/00000.tar")
    with pytest.raises(StageError) as e:
        list(read_tar(gone))
    assert not isinstance(e.value, embed_shard.TarDamaged)
    assert "cannot be read on host" in str(e.value) and "every dask worker must see the shards" in str(
        e.value
    )
    vae = tiny_vae(tmp_path / "vae")
    cfg = embed_stage.EmbedConfig(
        shards=gone, out=str(tmp_path / "s"), latents="vae", vae=str(vae), latent_size=8, batch_size=4
    )
    with pytest.raises(
        UsageError, match=r"no decodable image .* \(the first shard that failed: .*cannot be read"
    ):
        embed_shard.calibrate_latents(cfg, [gone], "cpu")


def test_a_store_of_error_rows_only_exits_1_and_train_prior_says_why_without_a_misleading_hint(
    tmp_path, capsys
):
    """Every image unreadable: embed exited 0 with a store of nothing, and train-prior then said to lower
    --batch-size or --val-fraction (of 0 samples)."""
    d = tmp_path / "shards"
    for s in range(2):
        write_tar(d / f"{s:05d}.tar", [{**x, "jpg": b"not a jpeg"} for x in good_samples(s, list(range(4)))])
    out = tmp_path / "store"
    assert embed("--shards", f"{d}/{{00000..00001}}.tar", *TINY, "--out", out) == 1
    got = capsys.readouterr()
    assert json.loads(got.out)["errors"] == 8 and store.done_shards(out) == ["00000", "00001"]
    assert got.err.strip().splitlines()[-1] == (
        "embed: 2 of 2 shards done, but every one of their 8 rows is an error row (commonest reason: cannot "
        "decode image: UnidentifiedImageError: cannot identify image file): the store holds nothing to train "
        f"on; {out}/logs/embed_summary.json"
    )
    assert main(["train-prior", "--data", str(out), "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"unclip train-prior: error: {out} holds no rows to train on: its 2 finished shard(s) hold only error "
        f"rows (8: samples embed could not read); see {out}/logs/embed_summary.json for why, or `unclip "
        f"validate {out}`"
    )
    assert not (tmp_path / "run").exists()
    # a store filled by runs over other --shards: the whole store's rows count, not this run's shards'
    write_tar(d / "00002.tar", good_samples(2, list(range(4))))
    assert embed("--shards", f"{d}/00002.tar", *TINY, "--out", out) == 0
    capsys.readouterr()
    assert embed("--shards", f"{d}/{{00000..00001}}.tar", *TINY, "--out", out) == 0
    assert "nothing to train on" not in capsys.readouterr().err
