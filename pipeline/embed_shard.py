"""The embed stage's per-shard work, run inside a dask worker: one pass over a tar -> one store shard.

A background thread reads the tar, decodes each image once and prepares the model inputs batch by batch,
while the calling thread runs the models, so decoding overlaps the forward pass. Samples that cannot be used
(undecodable image, no image, no caption, a .json that is not an object, a key seen earlier in the shard)
become rows of the shard's error table, never misaligned rows. When img2dataset's record of the shard
(``NNNNN.parquet`` beside the tar) lists successful samples that the tar lacks (a tar cut short at a member
boundary still reads cleanly), each one becomes an error row too: a shorter shard is never silent.
"""

from __future__ import annotations

import io
import json
import logging
import math
import re
import resource
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow as pa
import torch
from PIL import Image, ImageOps

from pipeline import store
from pipeline.errors import StageError, UsageError
from pipeline.image_input import TensorPreprocess, is_jpeg
from pipeline.prefetch import background

log = logging.getLogger(__name__)

# torch threads of the decode thread. Its per-image tensor ops (ToTensor, Normalize, stacking) would otherwise
# start an OpenMP team of their own beside the one running the models: on a CPU that oversubscribes the cores,
# and each small op then waits for a descheduled thread (measured: 2.5 -> 47 ms an image on 2 busy cores).
DECODE_THREADS = 1
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "bmp")  # a gif gives its first frame, as in img2dataset


@dataclass
class Sample:
    key: str
    image: bytes | None
    caption: str | None
    meta: dict
    problem: str | None = None  # why the sample cannot be used, found while reading it
    empty_caption: bool = False  # the source had no caption (None/NaN): stored as "" and counted


def read_tar(url: str) -> Iterator[Sample]:
    """Samples in the tar's own order (img2dataset writes them in completion order; the key is the truth)."""
    current: dict[str, bytes] = {}
    key, members = None, 0
    try:
        with fsspec.open(url, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tf:
            for member in tf:
                if not member.isfile():
                    continue
                k, _, ext = member.name.rpartition("/")[2].partition(".")
                # A member the current sample already has starts a new sample with the same key (a duplicate).
                if key is not None and (k != key or ext.lower() in current):
                    yield _sample(key, current)
                    current = {}
                key = k
                current[ext.lower()] = tf.extractfile(member).read()
                members += 1
    except (tarfile.TarError, EOFError, OSError) as e:
        # Nothing of the shard is written (its marker is written last): rerun once the tar is fixed.
        raise StageError(f"{url} is truncated or damaged after {members} members ({e})") from None
    if key is not None:
        yield _sample(key, current)


def _sample(key: str, parts: dict[str, bytes]) -> Sample:
    image = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
    caption = parts["txt"].decode("utf-8", errors="replace") if "txt" in parts else None
    meta, problem = {}, None
    if "json" in parts:
        try:
            meta = json.loads(parts["json"])
        except (ValueError, UnicodeDecodeError) as e:
            meta, problem = {}, f"unparsable .json: {e}"
        if not isinstance(meta, dict):
            meta, problem = {}, f".json is not an object (a {type(meta).__name__})"
    # img2dataset writes str(caption) into .txt: a missing caption arrives as "nan" or "None", and its .json
    # holds NaN or null. Such a sample keeps its image, with an empty caption, counted in the done marker.
    src = meta.get("caption", "")
    empty = (
        caption is not None
        and "caption" in meta
        and (src is None or (isinstance(src, float) and math.isnan(src)))
    )
    if empty:
        caption = ""
    return Sample(key, image, caption, meta, problem, empty)


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB, with 16- and 32-bit grey scaled to 8 bits (PIL's own convert clips them, which turns a 16-bit
    PNG nearly white)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        arr = np.nan_to_num(np.asarray(img, dtype=np.float64))
        img = Image.fromarray(np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8), "L")
    return img.convert("RGB")


def decode(sample: Sample) -> tuple[Image.Image | None, str | None]:
    """(RGB image, None) or (None, reason)."""
    if sample.problem is not None:
        return None, sample.problem
    if sample.image is None:
        return None, "no image in sample"
    if sample.caption is None:
        return None, "no caption in sample"
    try:
        img = Image.open(io.BytesIO(sample.image))
        img.load()
        return _to_rgb(img), None
    except Exception as e:  # PIL raises many kinds for corrupt data
        # PIL names the BytesIO by address ("<_io.BytesIO object at 0x7f..>"): error rows must not vary by run
        why = re.sub(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>", "", str(e))
        return None, f"cannot decode image: {type(e).__name__}: {why}"


def download_record(url: str) -> list[str] | None:
    """Keys img2dataset recorded as downloaded for this shard (``NNNNN.parquet`` beside ``NNNNN.tar``), or None
    when there is no such record (shards made by another tool)."""
    import pyarrow.parquet as pq

    record = url[: -len(".tar")] + ".parquet" if url.endswith(".tar") else None
    if record is None:
        return None
    fs, path = fsspec.core.url_to_fs(record)
    if not fs.exists(path):
        return None
    try:
        with fs.open(path, "rb") as f:
            table = pq.read_table(f, columns=["key", "status"])
    except Exception as e:  # an unreadable record is reported, not trusted
        log.warning("cannot read the download record %s (%s): not cross-checked", record, e)
        return None
    return [k for k, st in zip(table["key"].to_pylist(), table["status"].to_pylist()) if st == "success"]


@dataclass(frozen=True)
class ShardParams:
    """What a dask worker needs to embed a shard: sent once with every task, so plain, picklable values."""

    out: str  # store root, absolute (workers may run in another directory)
    clip: str
    pretrained: str
    seed: int
    device: str  # resolved: "cpu", "cuda" or "cuda:N"
    batch_size: int
    latents: str  # codec: none, pixels or vae
    vae: str
    text_encodings: bool
    torch_threads: int  # 0 = leave torch's default
    latent_params: dict | None  # the manifest's latents entry (codec constants), None without latents
    image_decode: str = "pil"  # resolved: "pil" (CPU, PIL) or "device" (JPEGs decoded on `device`)


@dataclass
class Batch:
    keys: list[str]
    captions: list[str]
    metas: list[dict]
    images: torch.Tensor | None  # [B, 3, H, W] CLIP input, when every sample went through PIL
    latent_input: np.ndarray | torch.Tensor | None  # uint8 [B, 3, s, s] (pixels) or [-1, 1] floats (vae)
    empty_captions: int = 0
    tokens: torch.Tensor | None = None  # [B, context], when a tokenizer was given (made off the model thread)
    # --image-decode device: per sample, its JPEG bytes (decoded on the device) or its PIL-made CLIP input
    parts: list[bytes | torch.Tensor] | None = None
    positions: list[int] | None = None  # each sample's index in the tar, for error-row order
    empty_flags: list[bool] | None = None  # per sample: its caption was missing in the source


def prepare_batches(
    url: str,
    preprocess,
    batch_size: int,
    latents: str,
    latent_px: int,
    errors: list[dict],
    tokenizer=None,
    device_jpegs: bool = False,
    pin_memory: bool = False,
) -> Iterator[Batch]:
    """Decode and preprocess in tar order; unusable samples go to ``errors`` (with their tar index, ``pos``).

    ``pin_memory`` (CUDA) puts the CLIP input in page-locked memory, so its copy to the device does not block.
    With ``device_jpegs`` JPEG samples are passed on undecoded for `assemble_images`; every
    other sample is decoded by PIL here, as without it.
    """
    buf: list[tuple[Sample, Image.Image | None, int]] = []
    seen: set[str] = set()
    for pos, sample in enumerate(read_tar(url)):
        if sample.key in seen:
            errors.append(
                {
                    "key": sample.key,
                    "reason": "duplicate key: an earlier sample of this shard has it",
                    "pos": pos,
                }
            )
            continue
        seen.add(sample.key)
        on_device = (
            device_jpegs and sample.problem is None and sample.caption is not None and is_jpeg(sample.image)
        )
        if on_device and latents == "none":
            img, reason = None, None  # decoded later, on the device
        else:  # latents are always made from the PIL decode, so they do not depend on --image-decode
            img, reason = decode(sample)
            if img is None:
                errors.append({"key": sample.key, "reason": reason, "pos": pos})
                continue
        buf.append((sample, img, pos))
        if len(buf) == batch_size:
            yield _batch(buf, preprocess, latents, latent_px, tokenizer, device_jpegs, pin_memory)
            buf = []
    if buf:
        yield _batch(buf, preprocess, latents, latent_px, tokenizer, device_jpegs, pin_memory)


def _batch(buf, preprocess, latents: str, latent_px: int, tokenizer, device_jpegs: bool, pin: bool) -> Batch:
    parts = [
        s.image if device_jpegs and is_jpeg(s.image) else preprocess(img) for s, img, _ in buf
    ]  # bytes for the device decoder, else [3, H, W] CLIP input
    images = None if device_jpegs else torch.stack(parts)  # [B, 3, H, W]
    if pin and images is not None:
        images = images.pin_memory()
    lat = None
    if latents != "none":
        px = np.stack(
            [np.asarray(ImageOps.fit(img, (latent_px, latent_px), Image.BICUBIC)) for _, img, _ in buf]
        )
        lat = px.transpose(0, 3, 1, 2)  # [B, H, W, 3] -> [B, 3, H, W] uint8
        if latents == "vae":
            lat = torch.from_numpy(lat).float() / 127.5 - 1.0
    captions = [s.caption for s, _, _ in buf]
    return Batch(
        [s.key for s, _, _ in buf],
        captions,
        [s.meta for s, _, _ in buf],
        images,
        lat,
        sum(s.empty_caption for s, _, _ in buf),
        tokens=tokenizer(captions) if tokenizer is not None else None,
        parts=parts if device_jpegs else None,
        positions=[p for _, _, p in buf],
        empty_flags=[s.empty_caption for s, _, _ in buf],
    )


def assemble_images(b: Batch, preprocess, tensor_preprocess, device: str, errors: list[dict]) -> Batch:
    """The CLIP input of a ``--image-decode device`` batch on ``device``: its JPEGs decoded there in one call.

    A JPEG the device decoder refuses is decoded by PIL instead; one PIL cannot read either becomes an error
    row (with its reason) and leaves the batch, so rows stay aligned. Returns the batch with ``images`` set.
    """
    from pipeline.image_input import decode_jpegs

    jpeg_at = [i for i, p in enumerate(b.parts) if isinstance(p, bytes)]
    decoded = decode_jpegs([b.parts[i] for i in jpeg_at], device)
    ready: dict[int, torch.Tensor] = {}
    for i, t in zip(jpeg_at, decoded, strict=True):
        if t is not None:
            ready[i] = tensor_preprocess.one(t)
            continue
        img, reason = decode(Sample(b.keys[i], b.parts[i], b.captions[i], b.metas[i]))
        if img is None:
            errors.append({"key": b.keys[i], "reason": reason, "pos": b.positions[i]})
        else:
            ready[i] = preprocess(img).to(device)
    for i, p in enumerate(b.parts):
        if isinstance(p, torch.Tensor):
            ready[i] = p.to(device, non_blocking=True)
    keep = [i for i in range(len(b.keys)) if i in ready]
    if len(keep) == len(b.keys):
        b.images = torch.stack([ready[i] for i in keep])
        return b
    pick = torch.tensor(keep, dtype=torch.long)
    return Batch(
        [b.keys[i] for i in keep],
        [b.captions[i] for i in keep],
        [b.metas[i] for i in keep],
        torch.stack([ready[i] for i in keep]) if keep else torch.zeros(0),
        b.latent_input[keep] if b.latent_input is not None else None,
        sum(b.empty_flags[i] for i in keep),
        tokens=b.tokens[pick] if b.tokens is not None else None,
        positions=[b.positions[i] for i in keep],
        empty_flags=[b.empty_flags[i] for i in keep],
    )


def calibrate_latents(cfg, shards: list[str], device: str) -> dict | None:
    """Latent codec description for the manifest; for the vae codec, fit the uint8 range on the data.

    The range is fitted on the first ``calib_samples`` usable images, taken from the shards in order (the
    first shard may have none: img2dataset writes an empty tar when every row of a shard failed).
    """
    if cfg.latents == "none":
        return None
    if cfg.latents == "pixels":
        return store.pixels_latents(cfg.latent_size)
    from pipeline.encoders import load_vae, vae_encode

    vae = load_vae(cfg.vae, device)
    px = cfg.latent_size * vae.downsample
    xs, n = [], 0
    for url in shards:
        for batch in prepare_batches(url, lambda im: torch.zeros(1), cfg.batch_size, "vae", px, []):
            xs.append(vae_encode(vae, batch.latent_input).float().cpu().numpy())
            n += len(batch.keys)
            if n >= cfg.calib_samples:
                break
        if n >= cfg.calib_samples:
            break
    if not xs:
        raise UsageError(
            f"--latents vae: no decodable image with a caption in {len(shards)} shard(s) "
            "to fit the uint8 latent range on"
        )
    lo, hi = store.fit_quantization(np.concatenate(xs)[: cfg.calib_samples])
    log.info("vae latent range fitted on %d images: lo=%s hi=%s", min(n, cfg.calib_samples), lo, hi)
    return {
        "codec": "vae",
        "vae": cfg.vae,
        "scale": vae.scale,
        "image_size": px,
        "dtype": np.dtype(store.LATENT_DTYPE).name,
        "shape": [vae.channels, cfg.latent_size, cfg.latent_size],
        "lo": lo.tolist(),
        "hi": hi.tolist(),
        "fitted_on": min(n, cfg.calib_samples),
    }


def _column(values: list) -> pa.Array:
    """One metadata column; values of mixed or nested types that arrow cannot hold as one type (a hostile or
    inconsistent .json) are kept as their JSON text rather than failing the shard."""
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError):
        return pa.array(
            [v if v is None or isinstance(v, str) else json.dumps(v, default=str) for v in values]
        )


def _metadata(keys: list[str], captions: list[str], metas: list[dict]) -> pa.Table:
    first = ["key", "caption", "url", "width", "height"]
    rows = [
        {**{k: m.get(k) for k in first}, **m, "key": k, "caption": c}
        for k, c, m in zip(keys, captions, metas, strict=True)
    ]
    # Drop img2dataset's per-sample status columns: every stored row is a success by construction.
    names = [n for n in dict.fromkeys(n for r in rows for n in r) if n not in ("status", "error_message")]
    return pa.table({n: _column([r.get(n) for r in rows]) for n in names})


def warm_up(params: ShardParams) -> None:
    """Load the models a worker will use (cached per process)."""
    from pipeline.encoders import load_clip, load_vae

    if params.torch_threads:
        torch.set_num_threads(params.torch_threads)
    load_clip(params.clip, params.pretrained, params.device, params.seed)
    if params.latents == "vae":
        load_vae(params.vae, params.device)


def _threads(gen: Iterator, n: int) -> Iterator:
    """``gen``, with torch's intra-op threads set to ``n`` (0 = unchanged) in the thread that runs it: OpenMP
    keeps that setting per thread, so the models' thread count in the caller is left as it is."""
    if n:
        torch.set_num_threads(n)
    yield from gen


def embed_shard(url: str, params: ShardParams) -> dict:
    """Embed one shard and write it to the store; returns its done marker. Runs in a dask worker."""
    from pipeline.encoders import encode_image, encode_text, load_clip, load_vae, normalize, vae_encode

    if params.torch_threads:
        torch.set_num_threads(params.torch_threads)
    t0 = time.perf_counter()
    root, shard, device = params.out, store.shard_id_of(url), params.device
    store.remove_shard(root, shard)  # a partial shard from an interrupted run is redone from scratch
    clip = load_clip(params.clip, params.pretrained, device, params.seed)
    lp = params.latent_params
    vae = load_vae(params.vae, device) if params.latents == "vae" else None
    latent_px = lp["image_size"] if lp else 0
    errors: list[dict] = []
    out: dict[str, list] = {
        "img": [],
        "txt": [],
        "lat": [],
        "enc": [],
        "len": [],
        "key": [],
        "cap": [],
        "meta": [],
    }
    truncated, empty, mae = 0, 0, []
    device_jpegs = params.image_decode == "device"
    tensor_preprocess = TensorPreprocess.from_open_clip(clip.model) if device_jpegs else None
    if device_jpegs and tensor_preprocess is None:
        raise UsageError(
            f"--image-decode device: CLIP {params.clip}'s preprocessing has no tensor equivalent"
        )
    batches = prepare_batches(
        url,
        clip.preprocess,
        params.batch_size,
        params.latents,
        latent_px,
        errors,
        tokenizer=clip.tokenizer,  # tokenised beside the decoding, off the thread that runs the models
        device_jpegs=device_jpegs,
        pin_memory=device.startswith("cuda"),
    )
    cuda = device.startswith("cuda")
    for b in background(_threads(batches, DECODE_THREADS)):
        if device_jpegs:
            b = assemble_images(b, clip.preprocess, tensor_preprocess, device, errors)
            if not b.keys:
                continue
        tokens = b.tokens  # [B, context]
        truncated += int((tokens[:, -1] != 0).sum())  # the caption filled or overflowed the context
        with torch.autocast("cuda", dtype=torch.float16, enabled=cuda):
            images = b.images.to(device, non_blocking=True)
            out["img"].append(normalize(encode_image(clip, images)).half().cpu().numpy())
            txt, enc, lengths = encode_text(clip, tokens.to(device, non_blocking=True), params.text_encodings)
        out["txt"].append(normalize(txt).half().cpu().numpy())
        if enc is not None:
            out["enc"] += [enc[i, : lengths[i]].half().cpu().numpy() for i in range(len(b.keys))]
            out["len"].append(lengths.cpu().numpy())
        if vae is not None:
            x = vae_encode(vae, b.latent_input).float().cpu().numpy()
            q = store.quantize(x, lp["lo"], lp["hi"])
            mae.append(float(np.abs(store.dequantize(q, lp["lo"], lp["hi"]) - x).mean()))
            out["lat"].append(q)
        elif b.latent_input is not None:
            out["lat"].append(np.ascontiguousarray(b.latent_input))
        out["key"] += b.keys
        out["cap"] += b.captions
        out["meta"] += b.metas
        empty += b.empty_captions
    errors.sort(key=lambda e: e.pop("pos"))  # tar order, whichever thread found the problem
    recorded = download_record(url)
    if recorded is not None:
        present = set(out["key"]) | {e["key"] for e in errors}
        for key in sorted(set(recorded) - present):
            errors.append({"key": key, "reason": "downloaded (img2dataset record) but not in the tar"})
    marker = _write(root, shard, url, out, errors, truncated, mae, empty, recorded is not None)
    # Reported to the caller only (the marker on disk stays free of timings): for the summary and the bench.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gpu = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else 0.0
    return {
        **marker,
        "worker_peak_rss_mb": round(rss, 1),
        "gpu_peak_mb": round(gpu, 1),
        "seconds": round(time.perf_counter() - t0, 3),
    }


def _write(root, shard, url, out, errors, truncated, mae, empty, cross_checked) -> dict:
    rows = len(out["key"])
    arrays: dict[str, np.ndarray] = {}
    if rows:
        arrays["img_emb"] = np.concatenate(out["img"])
        arrays["text_emb"] = np.concatenate(out["txt"])
        if out["lat"]:
            arrays["latents"] = np.concatenate(out["lat"]).astype(store.LATENT_DTYPE)
        if out["enc"]:
            arrays["text_enc"] = np.concatenate(out["enc"])
            arrays["text_enc_offsets"] = np.concatenate([[0], np.cumsum(np.concatenate(out["len"]))]).astype(
                np.int64
            )
    tables = {
        "metadata": _metadata(out["key"], out["cap"], out["meta"]) if rows else None,
        "errors": pa.Table.from_pylist(
            errors, schema=pa.schema([("key", pa.string()), ("reason", pa.string())])
        ),
    }
    extra = {
        "source": url,
        "errors": len(errors),
        "truncated_captions": truncated,
        "empty_captions": empty,
        "checked_against_download_record": cross_checked,
        "latent_roundtrip_mae": round(float(np.mean(mae)), 6) if mae else None,
    }
    return store.write_shard(root, shard, arrays, tables, rows, extra)
