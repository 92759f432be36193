"""`--image-decode device`: JPEGs decoded by torchvision and preprocessed as tensor ops, checked on CPU (the same
code path a GPU runs, with device "cpu") against the PIL path: embeddings, row order, error rows, latents."""

from __future__ import annotations

import io
import threading
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline import store
from pipeline.embed_shard import ShardParams, embed_shard
from pipeline.image_input import (
    TensorPreprocess,
    decode_jpegs,
    is_complete_jpeg,
    is_jpeg,
    resolve_image_decode,
)
from tests.test_embed import TINY, clip, embed, jpeg, sample, write_tar  # noqa: F401  (fixture)


def _image(fmt: str, size=(40, 52), seed=3, mode="RGB") -> bytes:
    rng = np.random.default_rng(seed)
    px = rng.integers(0, 256, (size[1], size[0], 3)).astype(np.uint8)
    img = Image.fromarray(px).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def test_tensor_preprocessing_matches_open_clip_per_image(clip):  # noqa: F811
    from pipeline.encoders import encode_image, normalize

    tp = TensorPreprocess.from_open_clip(clip.model)
    assert tp is not None and tp.size == 64
    blobs = [jpeg(s, size) for s, size in enumerate([(48, 48), (56, 40), (300, 200), (17, 90), (64, 64)])]
    decoded = decode_jpegs(blobs, "cpu")
    assert all(t is not None and t.dtype == torch.uint8 for t in decoded)
    ours = tp(decoded)
    pil = torch.stack([clip.preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in blobs])
    assert ours.shape == pil.shape == (5, 3, 64, 64)
    assert (ours - pil).abs().mean() < 0.05  # normalised units; resampling arithmetic differs slightly
    cos = (normalize(encode_image(clip, ours)) * normalize(encode_image(clip, pil))).sum(-1)
    assert cos.min().item() >= 0.999, cos


def test_decoder_refusals_fall_back_one_by_one():
    good = jpeg(1)
    blobs = [good, b"\xff\xd8\xff" + b"garbage" * 20, good[: len(good) // 2], _image("JPEG", mode="CMYK")]
    out = decode_jpegs(blobs, "cpu")
    assert out[0] is not None and out[1] is None and out[2] is None
    assert out[3] is not None and out[3].shape == (3, 52, 40)  # CMYK converted, as PIL converts it
    assert is_jpeg(good) and not is_jpeg(_image("PNG")) and not is_jpeg(None)
    # a cut-off file never reaches the device decoder (nvJPEG may fill in its missing rows); zero padding is fine
    assert is_complete_jpeg(good) and is_complete_jpeg(good + b"\x00" * 7) and not is_complete_jpeg(good[:-1])


def test_images_of_one_size_are_preprocessed_together_to_the_same_values(clip, monkeypatch):  # noqa: F811
    import pipeline.image_input

    # the three 48 x 48 images: resized in calls of 2 and 1
    monkeypatch.setattr(pipeline.image_input, "RESIZE_PIXELS", 2 * 48 * 48)
    tp = TensorPreprocess.from_open_clip(clip.model)
    sizes = [(48, 48), (56, 40), (48, 48), (300, 200), (56, 40), (48, 48)]
    decoded = decode_jpegs([jpeg(s, size) for s, size in enumerate(sizes)], "cpu")
    together = tp.many(decoded)
    assert len(together) == 6
    for t, img in zip(together, decoded, strict=True):  # each in its own place, as `one` makes it
        assert torch.allclose(t, tp.one(img), atol=1e-5)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """JPEGs of several sizes, a PNG, a GIF, a CMYK JPEG, a JPEG cut in half, garbage behind a JPEG magic."""
    d = tmp_path_factory.mktemp("mixed")
    good = [sample(f"0000000{i:02d}", i, size=(48, 48) if i % 2 else (70, 33)) for i in range(10)]
    odd = {
        "000000050": _image("PNG"),
        "000000051": _image("GIF"),
        "000000052": _image("JPEG", mode="CMYK"),
        "000000053": jpeg(53)[:300],
        "000000054": b"\xff\xd8\xff" + b"not really" * 30,
    }
    samples = good[:3] + [sample(k, 50 + i, image=v) for i, (k, v) in enumerate(odd.items())] + good[3:]
    write_tar(d / "shards" / "00000.tar", samples)
    return d


def _embed(
    mixed,
    name: str,
    decode: str,
    latents: str = "pixels",
    threads: int = 1,
    batch_prep: str = "auto",
    enc=False,
) -> Path:
    """One shard through the shard task itself (no dask cluster: the task is what differs between paths)."""
    out = mixed / name
    lp = store.pixels_latents(16) if latents == "pixels" else None
    out.mkdir()
    params = ShardParams(
        out=str(out),
        clip="unclip-tiny",
        pretrained="none",
        seed=0,
        device="cpu",
        batch_size=8,
        latents=latents,
        vae="",
        text_encodings=enc,
        torch_threads=0,
        latent_params=lp,
        image_decode=decode,
        decode_threads=threads,
        batch_prep=batch_prep,
    )
    marker = embed_shard(str(mixed / "shards" / "00000.tar"), params)
    assert marker["batch_prep"] == ("inline" if batch_prep == "inline" else "thread")  # auto on CPU: thread
    assert marker["rows"] == 13
    # Without latents the JPEG cut in half and the garbage behind a JPEG magic reach the device path, which
    # hands them to PIL (which refuses them too); with latents PIL decodes every sample first and refuses them.
    assert marker["device_decode_fallbacks"] == (2 if decode == "device" and latents == "none" else 0)
    return out


def test_device_path_embeds_the_rows_and_errors_the_pil_path_does(mixed):
    pil, dev = _embed(mixed, "pil", "pil"), _embed(mixed, "dev", "device")
    keys = store.read_metadata(pil, "00000")["key"].to_pylist()
    assert keys == store.read_metadata(dev, "00000")["key"].to_pylist()
    assert len(keys) == 13  # 10 JPEGs, the PNG, the GIF, the CMYK JPEG
    errors = [pq.read_table(store.field_path(s, "errors", "00000")).to_pylist() for s in (pil, dev)]
    assert errors[0] == errors[1] and [e["key"] for e in errors[0]] == ["000000053", "000000054"]
    a, b = (store.open_array(s, "img_emb", "00000").astype(np.float32) for s in (pil, dev))
    assert (a * b).sum(-1).min() >= 0.999
    for field in ("text_emb", "latents"):  # latents come from the PIL decode in both paths
        assert np.array_equal(store.open_array(pil, field, "00000"), store.open_array(dev, field, "00000"))


@pytest.mark.parametrize("decode,latents", [("pil", "pixels"), ("device", "none")])
def test_more_decode_threads_store_the_same_bytes(mixed, decode, latents):
    one, three = (_embed(mixed, f"t{n}_{decode}", decode, latents, threads=n) for n in (1, 3))
    files = sorted(p.relative_to(one) for p in one.rglob("*") if p.is_file())
    assert len(files) >= 4 and files == sorted(p.relative_to(three) for p in three.rglob("*") if p.is_file())
    for f in files:
        assert (one / f).read_bytes() == (three / f).read_bytes(), f


@pytest.mark.parametrize("decode,latents,threads", [("pil", "pixels", 3), ("device", "none", 1)])
def test_batches_prepared_inline_store_the_bytes_a_background_thread_does(mixed, decode, latents, threads):
    """--batch-prep inline (CUDA's default: the models' thread reads the next batch while the device runs the
    one it launched) against the background thread (CPU's), with text encodings: the same files, byte for
    byte, error rows included."""
    made = [
        _embed(mixed, f"{prep}_{decode}", decode, latents, threads, batch_prep=prep, enc=True)
        for prep in ("thread", "inline")
    ]
    files = sorted(p.relative_to(made[0]) for p in made[0].rglob("*") if p.is_file())
    assert any("text_enc" in str(f) for f in files) and any("errors" in str(f) for f in files), files
    assert files == sorted(p.relative_to(made[1]) for p in made[1].rglob("*") if p.is_file())
    for f in files:
        assert (made[0] / f).read_bytes() == (made[1] / f).read_bytes(), f


@pytest.mark.parametrize("batch_prep", ["thread", "inline"])
def test_a_shard_that_fails_midway_stops_its_batch_preparation_at_once(mixed, monkeypatch, batch_prep):
    # while the failure's traceback (which holds the task's frame) is still alive, as in a log or a retry
    from pipeline import embed_shard as task

    launches, launch = [], task._launch

    def failing(*args, **kwargs):
        launches.append(1)
        if len(launches) == 2:
            raise RuntimeError("CUDA error: out of memory")
        return launch(*args, **kwargs)

    monkeypatch.setattr(task, "_launch", failing)
    before = set(threading.enumerate())
    with pytest.raises(RuntimeError, match="out of memory") as failed:
        _embed(mixed, f"fail_{batch_prep}", "pil", "pixels", threads=3, batch_prep=batch_prep)
    left = [t.name for t in threading.enumerate() if t not in before and t.is_alive()]
    assert failed.traceback and not left, left


def test_without_latents_the_refused_jpegs_fall_back_to_the_same_error_rows(mixed):
    pil, dev = _embed(mixed, "pil0", "pil", "none"), _embed(mixed, "dev0", "device", "none")
    assert (
        store.read_metadata(pil, "00000")["key"].to_pylist()
        == store.read_metadata(dev, "00000")["key"].to_pylist()
    )
    errors = [pq.read_table(store.field_path(s, "errors", "00000")).to_pylist() for s in (pil, dev)]
    assert errors[0] == errors[1] and [e["key"] for e in errors[0]] == ["000000053", "000000054"]
    a, b = (store.open_array(s, "img_emb", "00000").astype(np.float32) for s in (pil, dev))
    assert (a * b).sum(-1).min() >= 0.999


def test_auto_picks_the_device_decoder_only_for_embedding_only_cuda_runs():
    assert resolve_image_decode("auto", "cuda", "none", True) == "device"
    assert resolve_image_decode("auto", "cuda", "vae", True) == "pil"
    assert resolve_image_decode("auto", "cpu", "none", True) == "pil"
    assert resolve_image_decode("auto", "cuda", "none", False) == "pil"
    assert resolve_image_decode("device", "cpu", "none", True) == "device"


def test_unknown_image_decode_is_one_line(mixed, capsys):
    args = ["--shards", mixed / "shards" / "00000.tar", "--out", mixed / "x", *TINY, "--image-decode", "gpu"]
    with pytest.raises(SystemExit) as e:  # argparse's choices: one line, exit 2
        embed(*args)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "--image-decode: invalid choice: 'gpu'" in err[-1] and "'auto', 'pil', 'device'" in err[-1], err
    assert not (mixed / "x").exists()


def test_device_decode_of_a_clip_without_a_tensor_equivalent_is_refused_before_anything(mixed, capsys):
    import json

    from pipeline.encoders import _open_clip

    cfg_dir = mixed / "clipcfg"
    cfg_dir.mkdir()
    spec = json.loads((Path(__file__).parents[1] / "pipeline/clip_configs/unclip-tiny.json").read_text())
    (cfg_dir / "unclip-tiny-bilinear.json").write_text(
        json.dumps({**spec, "preprocess_cfg": {"interpolation": "bilinear"}})
    )
    _open_clip().add_model_config(cfg_dir)
    out = mixed / "refused"
    args = ["--shards", mixed / "shards" / "00000.tar", "--out", out, "--clip", "unclip-tiny-bilinear"]
    assert embed(*args, "--pretrained", "none", "--image-decode", "device", "--device", "cpu") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no tensor equivalent; valid here: auto, pil" in err[0], err
    assert not out.exists()


def test_batches_ramp_up_in_tar_order_around_bad_samples(tmp_path, clip):  # noqa: F811
    """A shard's batches double from batch_size // 8 up to batch_size (the models start after a small first
    decode); every good sample is in exactly one batch, in tar order, and bad ones are errors at their place."""
    from itertools import islice

    from pipeline.shard_samples import batch_ramp, prepare_batches

    samples = [sample(f"{i:09d}", i) for i in range(40)]
    for i in (3, 17):
        samples[i]["jpg"] = b"not an image"
    tar = write_tar(tmp_path / "00000.tar", samples)
    errors: list[dict] = []
    batches = list(
        prepare_batches(str(tar), clip.preprocess, 16, "none", 0, errors, tokenizer=clip.tokenizer)
    )
    # decoded by 3 threads at once: the same batches, bit for bit, and the same error rows; and torch's thread
    # count for threads that start afterwards (the models' thread of a fresh worker) is left as it was
    import threading

    def fresh_thread_torch_threads() -> int:
        seen = []
        t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        t.start()
        t.join()
        return seen[0]

    before = fresh_thread_torch_threads()
    errors3: list[dict] = []
    batches3 = list(
        prepare_batches(
            str(tar), clip.preprocess, 16, "none", 0, errors3, tokenizer=clip.tokenizer, threads=3
        )
    )
    assert errors3 == errors and len(batches3) == len(batches)
    assert fresh_thread_torch_threads() == before
    for b, b3 in zip(batches, batches3, strict=True):
        assert b.keys == b3.keys and b.positions == b3.positions
        assert torch.equal(b.images, b3.images) and torch.equal(b.tokens, b3.tokens)
    assert list(islice(batch_ramp(16), 6)) == [2, 4, 8, 16, 16, 16]
    assert next(batch_ramp(4)) == 1 and list(islice(batch_ramp(256), 5)) == [32, 64, 128, 256, 256]
    assert [len(b.keys) for b in batches] == [2, 4, 8, 16, 8]  # 38 good samples
    assert [k for b in batches for k in b.keys] == [
        s["key"] for i, s in enumerate(samples) if i not in (3, 17)
    ]
    assert [(e["key"], e["pos"]) for e in errors] == [("000000003", 3), ("000000017", 17)]
    assert all(len(b.keys) == b.images.shape[0] == b.tokens.shape[0] for b in batches)


def test_pil_batches_are_bitwise_open_clips_transform_image_by_image():
    import open_clip
    from torchvision import transforms as T

    from pipeline.shard_samples import clip_inputs

    rng = np.random.default_rng(5)
    images = [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)
        for (h, w), mode in [((256, 256), "RGB"), ((300, 517), "RGB"), ((90, 40), "L"), ((64, 80), "RGBA"),
                             ((33, 33), "P"), ((224, 224), "CMYK")]
    ]  # fmt: skip
    vit = open_clip.image_transform(224, is_train=False, mean=(0.48, 0.45, 0.40), std=(0.26, 0.26, 0.27))
    squash = open_clip.image_transform(64, is_train=False, resize_mode="squash")
    for transform in (vit, squash):
        want = torch.stack([transform(im) for im in images])
        got = clip_inputs(images, transform)
        assert got.shape == want.shape and got.dtype == want.dtype and torch.equal(got, want)
        assert torch.equal(clip_inputs(images[1:2], transform), want[1:2])
    # another tail, or first steps that leave an image in another mode: image by image, the same values
    tail = T.Compose([T.Resize(32), T.CenterCrop(32), T.PILToTensor(), T.ConvertImageDtype(torch.float32)])
    grey = T.Compose([T.Resize(32), T.CenterCrop(32), T.ToTensor(), T.Normalize((0.5,), (0.2,))])
    for transform, group in ((tail, images[:2]), (grey, [images[2], images[2].rotate(90)])):
        want = torch.stack([transform(im) for im in group])
        assert torch.equal(clip_inputs(group, transform), want)


def test_cheap_items_skip_the_decode_threads_and_order_is_kept():
    """`_in_order` with ``slow``: the slow items run in the pool (here they finish out of order), the cheap ones
    in the calling thread, and every result comes out in the items' order."""
    import threading
    import time

    from pipeline.shard_samples import _in_order

    caller = threading.get_ident()
    ran_in: dict[int, bool] = {}

    def fn(i: int) -> int:
        if i % 3 == 0:  # slow: later ones finish first
            time.sleep(0.02 * (10 - i % 10) / 10)
        ran_in[i] = threading.get_ident() == caller
        return i * i

    out = list(_in_order(fn, ((i,) for i in range(30)), threads=4, slow=lambda i: i % 3 == 0))
    assert out == [((i,), i * i) for i in range(30)]
    assert all(ran_in[i] == (i % 3 != 0) for i in range(30))


def _one_shard(tmp_path: Path, samples: list[dict], decode: str) -> tuple[Path, dict]:
    """``samples`` as one tar through the shard task (unclip-tiny, batch 8, no latents): (store, done marker)."""
    write_tar(tmp_path / "shards" / "00000.tar", samples)
    out = tmp_path / "store"
    out.mkdir()
    params = ShardParams(
        out=str(out), clip="unclip-tiny", pretrained="none", seed=0, device="cpu", batch_size=8, latents="none",
        vae="", text_encodings=False, torch_threads=0, latent_params=None, image_decode=decode,
    )  # fmt: skip
    return out, embed_shard(str(tmp_path / "shards" / "00000.tar"), params)


@pytest.mark.parametrize("decode", ["pil", "device"])
def test_an_image_too_narrow_to_resize_is_an_error_row_not_its_shards_failure(tmp_path, decode):
    """A 1 x 3,000,000 PNG (11 KB) asked open_clip's Resize for a 224 x 672 M image: the MemoryError failed the
    whole shard on every retry. Beyond 100:1 an image is an error row, on either decode path alike."""
    narrow_png = _image("PNG", size=(3_000_000, 1))
    banner_jpeg = _image("JPEG", size=(1500, 12))  # 125:1, reaches the device decoder
    samples = [sample("000000000", 0), sample("000000001", 1, image=narrow_png)]
    samples += [sample("000000002", 2, image=banner_jpeg), sample("000000003", 3)]
    samples.append(sample("000000004", 4, image=_image("JPEG", size=(1000, 10))))  # exactly 100:1: embedded
    out, marker = _one_shard(tmp_path, samples, decode)
    assert marker["rows"] == 3
    assert store.read_metadata(out, "00000")["key"].to_pylist() == ["000000000", "000000003", "000000004"]
    errors = pq.read_table(store.field_path(out, "errors", "00000")).to_pylist()
    assert errors == [
        {"key": "000000001", "reason": "image is 3000000 x 1: sides beyond 100:1 are not embedded"},
        {"key": "000000002", "reason": "image is 1500 x 12: sides beyond 100:1 are not embedded"},
    ]


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # the 48 px images, at this limit
@pytest.mark.parametrize("decode", ["pil", "device"])
def test_a_decompression_bomb_is_the_same_error_row_on_both_paths(tmp_path, monkeypatch, decode):
    """PIL refuses an image over twice its MAX_IMAGE_PIXELS; the device decoder has no such limit and used to
    embed it, so the two paths' error rows differed. (The limit is lowered here: a real bomb is 179 M pixels.)"""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1200)
    samples = [sample("000000000", 0), sample("000000001", 1, size=(60, 60)), sample("000000002", 2)]
    out, marker = _one_shard(tmp_path, samples, decode)
    assert marker["rows"] == 2
    (error,) = pq.read_table(store.field_path(out, "errors", "00000")).to_pylist()
    assert (
        error["key"] == "000000001" and "DecompressionBombError: Image size (3600 pixels)" in error["reason"]
    )
