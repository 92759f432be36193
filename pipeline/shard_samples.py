"""Reading a webdataset shard for the embed stage: its samples in tar order, each decoded once, batched as
model inputs, with every unusable sample reported as an error row (never a misaligned row).

Samples that cannot be used: undecodable image, no image, no caption, a .json that is not an object, a key seen
earlier in the shard. `download_record` reads img2dataset's record of the shard (``NNNNN.parquet`` beside the
tar), so that samples it lists as downloaded but the tar lacks can be reported too.
"""

from __future__ import annotations

import collections
import functools
import io
import json
import logging
import math
import posixpath
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow as pa
import torch
from PIL import Image, ImageOps

from pipeline.errors import StageError, without_addresses
from pipeline.image_input import is_jpeg

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "bmp")  # a gif gives its first frame, as in img2dataset
# Longest side over shortest beyond which an image is an error row: resized to the model's input along its short
# side first (open_clip's Resize), a 1 x 3,000,000 banner asked for a 224 x 672 M image, and the MemoryError
# failed its whole shard. At 100:1 the resize stays under 15 MB (60 MB as float32 on a device), and the centre
# crop CLIP sees is already 1% of the picture.
MAX_ASPECT = 100


@dataclass
class Sample:
    key: str
    image: bytes | None
    caption: str | None
    meta: dict
    problem: str | None = None  # why the sample cannot be used, found while reading it
    empty_caption: bool = False  # the source had no caption (None/NaN): stored as "" and counted
    caption_not_utf8: bool = False  # its .txt was not UTF-8: kept with U+FFFD for the bad bytes, counted


class TarDamaged(StageError):
    """A tar that reads no further: cut off, damaged, or (a remote one) its connection lost."""


class _EndRecorded(tarfile.TarInfo):
    """TarInfo that notes on its TarFile why reading headers stopped. tarfile ends an archive quietly, past
    its first member, on the end-of-archive marker (a zero block) and equally on no bytes at all, a block cut
    short or a block that is no header: a tar cut off on or inside a header block read as whole, its last
    samples silently gone. Only the marker is a whole tar's end."""

    @classmethod
    def fromtarfile(cls, tf):
        try:
            return super().fromtarfile(tf)
        except tarfile.EOFHeaderError:
            tf.unclip_end = None
            raise
        except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError) as e:
            tf.unclip_end = f"it ends without the end-of-archive marker, cut off ({e})"
            raise
        except tarfile.InvalidHeaderError as e:
            tf.unclip_end = f"a block where a header should be is not one ({e})"
            raise


def tar_bytes(url: str) -> int | None:
    """The size of the tar at ``url`` (local or fsspec), or None where it cannot be asked: kept in the shard's
    done marker, so that `unclip validate` can tell a tar replaced since (a store copied away from a folder
    that was downloaded again) from a store whose rows no longer match their tar."""
    try:
        fs, path = fsspec.core.url_to_fs(url)
        return int(fs.size(path))
    except Exception:  # noqa: BLE001 - a size is a nicety; the read that follows reports a missing tar
        return None


def read_tar(url: str, local: str | None = None) -> Iterator[Sample]:
    """Samples in the tar's own order (img2dataset writes them in completion order; the key is the truth).
    ``local``: a whole local copy of ``url`` to read instead (`pipeline.readahead`); errors still name ``url``.

    As webdataset groups a tar: a sample's key is its members' path up to the first dot of the file name, the
    folder kept (``a/k00.jpg`` and ``b/k00.jpg`` are two samples), less a leading ``./``; members whose file
    name starts with a dot (macOS tar's ``._k00.jpg`` AppleDouble files) are no sample's and are skipped."""
    # a link member's part is None: a stream cannot seek back to its file
    current: dict[str, bytes | None] = {}
    key, members, skipped = None, 0, 0
    try:
        with (
            fsspec.open(local or url, "rb") as f,
            tarfile.open(fileobj=f, mode="r|*", tarinfo=_EndRecorded) as tf,
        ):
            for member in tf:
                link = member.islnk() or member.issym()
                if not (member.isfile() or link):
                    continue
                k, ext = _key_ext(member.name)
                if k is None:
                    skipped += 1
                    continue
                # A member the current sample already has starts a new sample with the same key (a duplicate).
                if key is not None and (k != key or ext.lower() in current):
                    yield _sample(key, current)
                    current = {}
                key = k
                current[ext.lower()] = None if link else tf.extractfile(member).read()
                members += 1
            if getattr(tf, "unclip_end", None):
                raise tarfile.ReadError(tf.unclip_end)
    except OSError as e:
        from pipeline.readahead import is_local

        if not is_local(url):  # a remote read: as before
            raise TarDamaged(f"{url} is truncated or damaged after {members} members ({e})") from None
        # The file, not its bytes: not there on this worker's host (a path only the submitting host sees), or a
        # read error (NFS's EIO, ESTALE). Not TarDamaged: that invited deleting a good shard, and is never
        # retried; this is (`--retries`), maybe on another worker.
        import socket

        raise StageError(
            f"{url} cannot be read on host {socket.gethostname()} after {members} members ({e}); every dask "
            "worker must see the shards at the same path"
        ) from None
    except (tarfile.TarError, EOFError) as e:
        # Nothing of the shard is written (its marker is written last): rerun once the tar is fixed.
        raise TarDamaged(f"{url} is truncated or damaged after {members} members ({e})") from None
    if key is not None:
        yield _sample(key, current)
    if skipped:
        log.info("%s: skipped %d hidden members (._* files), which are no sample's", url, skipped)


def _key_ext(name: str) -> tuple[str | None, str]:
    """(sample key, extension) of a tar member's path; (None, "") for a member that is no sample's. A name
    whose bytes are not UTF-8 (tarfile keeps them as surrogates, which no parquet column takes) keeps them as
    ``\\xNN`` text: the same key whenever the tar is read."""
    name = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    while name.startswith("./"):
        name = name[2:]
    folder, _, base = name.rpartition("/")
    if base.startswith(".") or not base:
        return None, ""
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext


def _sample(key: str, parts: dict[str, bytes | None]) -> Sample:
    links = sorted(e for e, data in parts.items() if data is None)
    if links:  # an error row, not a sample that vanished
        return Sample(
            key, None, None, {}, f"tar member {key}.{links[0]} is a link, which is not read: store the file"
        )
    image = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
    caption, not_utf8 = None, False
    if "txt" in parts:
        try:
            caption = parts["txt"].decode("utf-8")
        except UnicodeDecodeError:
            caption, not_utf8 = parts["txt"].decode("utf-8", errors="replace"), True
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
    return Sample(key, image, caption, meta, problem, empty, not_utf8)


def _grey_levels(img: Image.Image) -> tuple[np.ndarray, float]:
    """A 16- or 32-bit grey image's values and the value of white. PIL's mode "I" (int32) holds both: a TIFF
    names its bits (tag 258) and whether they are signed (tag 339 = 2); an unsigned 32-bit one is read into
    int32, so its upper half is taken back from the wrapped negatives. Other formats open as "I" only for
    16-bit data (PNG, PGM in older Pillow)."""
    arr = np.asarray(img)
    if img.mode != "I":
        return arr.astype(np.float64), 65535.0
    tags = getattr(img, "tag_v2", None) or {}

    def first(tag: int, default: int) -> int:
        v = tags.get(tag, default)
        return int(v[0] if isinstance(v, tuple) else v)

    bits, signed = first(258, 16), first(339, 1) == 2
    if bits == 32 and not signed and arr.dtype == np.int32:
        arr = arr.view(np.uint32)
    return arr.astype(np.float64), float(2 ** (bits - 1 if signed else bits) - 1)


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB, with 16- and 32-bit grey scaled to 8 bits (PIL's own convert clips them, which turns a 16-bit
    PNG nearly white)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr, white = _grey_levels(img)
        grey = np.rint(arr / (white / 255.0))
        img = Image.fromarray(np.clip(grey, 0, 255).astype(np.uint8), "L")
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
        if (why := aspect_problem(*img.size)) is not None:  # from the header, before the pixels are decoded
            return None, why
        img.load()
        return _to_rgb(img), None
    except Exception as e:  # PIL raises many kinds for corrupt data
        # PIL names the BytesIO by address ("<_io.BytesIO object at 0x7f..>"): error rows must not vary by run
        why = without_addresses(str(e))
        return None, f"cannot decode image: {type(e).__name__}: {why}"


def aspect_problem(width: int, height: int) -> str | None:
    """Why a ``width`` x ``height`` image is not embedded (`MAX_ASPECT`), or None. The same rule on every decode
    path, so --image-decode pil and device give the same error rows."""
    if min(width, height) < 1 or max(width, height) > MAX_ASPECT * min(width, height):
        return f"image is {width} x {height}: sides beyond {MAX_ASPECT}:1 are not embedded"
    return None


def download_record(url: str) -> list[str] | None:
    """Keys img2dataset recorded as downloaded for this shard (``NNNNN.parquet`` beside ``NNNNN.tar``), or None
    when there is no such record (shards made by another tool) or it is not img2dataset's (no key/status columns).

    A shard img2dataset has not finished is a StageError, not a shard embedded short: img2dataset writes
    ``NNNNN_stats.json`` last, so a record (or our download's ``summary/download_settings.json``) without it is a
    download still running or killed, beside a tar that may end cleanly with samples missing. So is a record that
    exists but cannot be read (a kill leaves it empty)."""
    import pyarrow.parquet as pq

    if not url.endswith(".tar"):
        return None
    record = url[: -len(".tar")] + ".parquet"
    fs, path = fsspec.core.url_to_fs(record)
    stats_path = path[: -len(".parquet")] + "_stats.json"
    has_record = fs.exists(path)
    settings = posixpath.join(posixpath.dirname(path), "summary", "download_settings.json")
    if not fs.exists(stats_path) and (has_record or fs.exists(settings)):
        raise StageError(
            f"img2dataset has not finished {url} (no {posixpath.basename(stats_path)} beside it; it writes that last): "
            "rerun `unclip download` into its folder to finish it, then embed again (a download copied without "
            "its *_stats.json files: copy those too)"
        )
    if not has_record:
        return None
    try:
        with fs.open(path, "rb") as f:
            # ParquetFile, not pq.read_table: that imports pyarrow.dataset, 0.3 s of each worker's first shard.
            # It skips columns the file lacks instead of failing, hence the check below.
            table = pq.ParquetFile(f).read(columns=["key", "status"])
    except Exception as e:  # pyarrow raises its own kinds for empty, cut-off and foreign files
        why = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:100]}"
        if not isinstance(e, pa.ArrowException):  # permissions, a network error: not the file's content
            raise StageError(f"the download record {record} cannot be read ({why})") from None
        raise StageError(
            f"the download record {record} is damaged ({why}), so the tar beside it may lack samples: restore "
            "the record from its source, or move it aside to embed the tar unchecked"
        ) from None
    if table.column_names != ["key", "status"]:
        missing = ", ".join(sorted({"key", "status"} - set(table.column_names)))
        log.warning("the download record %s has no column %s: not cross-checked", record, missing)
        return None
    return [k for k, st in zip(table["key"].to_pylist(), table["status"].to_pylist()) if st == "success"]


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
    captions_not_utf8: int = 0
    not_utf8_flags: list[bool] | None = None  # per sample: its caption's bytes were not UTF-8
    # --image-decode device: JPEGs the device decoder refused or was not given (PIL took them)
    device_decode_fallbacks: int = 0


def batch_ramp(batch_size: int) -> Iterator[int]:
    """A shard's batch sizes, in order: they ramp up, doubling from ``batch_size // 8`` to ``batch_size``, so
    the models wait only for the first small batch to be decoded, not a full one. Measured (ViT-B-32, batch 64,
    2 cores, 128-sample shard): waiting for a full first batch was 0.24-0.30 s of a 7.6-9 s shard (3-4%); a
    CPU forward is as fast per image at batch 8 as at 64 (16-20 images/s at each). The split depends only on
    the tar, so a rerun splits a shard the same way and stores the same bytes."""
    size = max(1, batch_size // 8)
    while True:
        yield size
        size = min(batch_size, 2 * size)


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
    threads: int = 1,
    local: str | None = None,
) -> Iterator[Batch]:
    """Decode and preprocess in tar order, in batches ramping up to ``batch_size`` (`batch_ramp`);
    unusable samples go to ``errors`` (with their tar index, ``pos``).

    ``threads`` > 1 decodes that many samples at once (PIL releases the GIL while it decodes and resizes): a GPU
    run that decodes with PIL is otherwise bound by one core. Results are consumed in tar order, so batches,
    rows and error rows are the same for every thread count. ``pin_memory`` (CUDA) puts the CLIP input in
    page-locked memory, so its copy to the device does not block. With ``device_jpegs`` JPEG samples are passed
    on undecoded for `assemble_images`; every other sample is decoded by PIL here, as without it. ``local``: a
    local copy of the tar to read instead (`read_tar`).
    """
    buf: list[_Prepared] = []
    sizes = batch_ramp(batch_size)
    size = next(sizes)
    work = functools.partial(
        _prepare, preprocess=preprocess, latents=latents, latent_px=latent_px, device_jpegs=device_jpegs
    )
    # Only samples that need PIL go to the decode threads: the rest (JPEGs for the device decoder, samples that
    # are already errors) cost microseconds, less than handing them to a thread.
    needs_pil = functools.partial(_needs_pil, latents=latents, device_jpegs=device_jpegs)
    for (pos, sample, _), prepared in _in_order(work, _unique(read_tar(url, local)), threads, needs_pil):
        if isinstance(prepared, str):
            errors.append({"key": sample.key, "reason": prepared, "pos": pos})
            continue
        buf.append(prepared)
        if len(buf) == size:
            yield _batch(buf, preprocess, latents, tokenizer, device_jpegs, pin_memory)
            buf, size = [], next(sizes)
    if buf:
        yield _batch(buf, preprocess, latents, tokenizer, device_jpegs, pin_memory)


def _unique(samples: Iterator[Sample]) -> Iterator[tuple[int, Sample, bool]]:
    """(tar index, sample, whether an earlier sample of the shard has its key)."""
    seen: set[str] = set()
    for pos, sample in enumerate(samples):
        yield pos, sample, sample.key in seen
        seen.add(sample.key)


def _in_order(fn, items: Iterator[tuple], threads: int, slow=None) -> Iterator[tuple[tuple, object]]:
    """(item, ``fn(*item)``) in the items' order, ``threads`` of them computed at once, a bounded number
    (4 per thread) ahead. With ``slow``, only items for which ``slow(*item)`` is true go to the threads; the
    others are computed here, in order, and handed on as soon as everything before them is."""
    if threads <= 1:
        for item in items:
            yield item, fn(*item)
        return
    from concurrent.futures import Future, ThreadPoolExecutor

    def here(item) -> Future:
        fut: Future = Future()
        try:  # raised at the item's own place in the order, as from the pool
            fut.set_result(fn(*item))
        except Exception as e:
            fut.set_exception(e)
        return fut

    Image.init()  # PIL loads its format plugins lazily, and not thread-safely: load them all before the pool
    window: collections.deque = collections.deque()
    # No torch.set_num_threads in the pool's threads: it would also set the process-wide default, which a thread
    # that has not run torch yet (the models' thread in a fresh worker) then takes. The pool runs PIL's work;
    # torch runs there only for a transform `clip_part` cannot split.
    with ThreadPoolExecutor(threads) as pool:
        try:
            for item in items:
                inline = slow is not None and not slow(*item)
                window.append((item, here(item) if inline else pool.submit(fn, *item)))
                while window and (len(window) >= 4 * threads or window[0][1].done()):
                    item0, fut = window.popleft()
                    yield item0, fut.result()
            while window:
                item0, fut = window.popleft()
                yield item0, fut.result()
        finally:  # a consumer that stops early: the queued samples are not decoded
            for _, fut in window:
                fut.cancel()


@dataclass
class _Prepared:
    sample: Sample
    pos: int
    clip: bytes | Image.Image | torch.Tensor  # JPEG bytes (device decode), a `clip_part`
    latent: np.ndarray | None  # uint8 [s, s, 3]


def _undecoded(sample: Sample, latents: str, device_jpegs: bool) -> bool:
    """A usable JPEG whose only decode is the device decoder's (`assemble_images`)."""
    return (
        device_jpegs
        and latents == "none"
        and sample.problem is None
        and sample.caption is not None
        and is_jpeg(sample.image)
    )


def _needs_pil(pos: int, sample: Sample, dup: bool, latents: str, device_jpegs: bool) -> bool:
    """Whether `_prepare` will open the image with PIL (the rest is cheap: see `decode`'s early returns)."""
    if dup or sample.problem is not None or sample.image is None or sample.caption is None:
        return False
    return not _undecoded(sample, latents, device_jpegs)


def _prepare(
    pos: int, sample: Sample, dup: bool, preprocess, latents: str, latent_px: int, device_jpegs: bool
):
    """One sample's share of the batch (`_Prepared`), or why it cannot be used. Runs in any thread."""
    if dup:
        return "duplicate key: an earlier sample of this shard has it"
    jpeg = device_jpegs and is_jpeg(sample.image)
    if _undecoded(sample, latents, device_jpegs):
        return _Prepared(sample, pos, sample.image, None)  # decoded later, on the device
    img, reason = decode(sample)  # latents are always made from the PIL decode, whatever --image-decode
    if img is None:
        return reason
    try:  # one image that cannot be resized (memory, an odd mode) is its own error row, not its shard's failure
        lat = None
        if latents != "none":
            lat = np.asarray(ImageOps.fit(img, (latent_px, latent_px), Image.BICUBIC))
        return _Prepared(sample, pos, sample.image if jpeg else clip_part(img, preprocess), lat)
    except Exception as e:
        return f"cannot preprocess image: {type(e).__name__}: {e}"


def clip_part(img: Image.Image, preprocess) -> Image.Image | torch.Tensor:
    """The per-image share of ``preprocess`` (any thread): where the transform ends in ToTensor and Normalize,
    as open_clip's does, the image after the steps before those (an RGB image of the model's input size);
    otherwise, or if those steps leave another mode, ``preprocess(img)`` itself. `clip_batch` does the rest."""
    steps = getattr(preprocess, "transforms", None)
    if steps and len(steps) >= 3 and _tensor_tail(steps[-2], steps[-1]):
        head = img
        for t in steps[:-2]:
            head = t(head)
        if isinstance(head, Image.Image) and head.mode == "RGB":
            return head
    return preprocess(img)


def clip_batch(parts: list[Image.Image | torch.Tensor], preprocess) -> torch.Tensor:
    """[B, 3, H, W] from `clip_part`s, bitwise what stacking ``preprocess(img)`` gives.

    Each image's uint8 pixels go straight into the batch tensor and are scaled and normalised there in place,
    by ToTensor's and Normalize's float32 operations in their order (/ 255, - mean, / std): no float tensor
    per image, no stacking copy. Measured on 256 px images (ViT-B-32's transform, one thread): ~1.5 instead
    of ~1.9 ms an image, of the ~3.7 ms the decode thread spends on each."""
    if all(isinstance(p, torch.Tensor) for p in parts):
        return torch.stack(parts)
    norm = preprocess.transforms[-1]
    w, h = next(p.size for p in parts if isinstance(p, Image.Image))
    out = torch.empty((len(parts), 3, h, w), dtype=torch.get_default_dtype())
    mean, std = _as_column(norm.mean, out), _as_column(norm.std, out)
    for i, p in enumerate(parts):
        if isinstance(p, torch.Tensor):
            if p.shape != out.shape[1:]:  # copy_ would broadcast where stacking fails
                raise RuntimeError(
                    f"CLIP inputs of two shapes in one batch: {tuple(p.shape)} and {tuple(out.shape[1:])}"
                )
            out[i].copy_(p)
            continue
        if p.size != (w, h):
            raise RuntimeError(f"CLIP inputs of two sizes in one batch: {p.size} and {(w, h)}")
        px = torch.frombuffer(bytearray(p.tobytes()), dtype=torch.uint8).view(h, w, 3).permute(2, 0, 1)
        out[i].copy_(px).div_(255).sub_(mean).div_(std)  # uint8 -> float32 is exact
    return out


def clip_inputs(images: list[Image.Image], preprocess) -> torch.Tensor:
    """``preprocess`` of each image, stacked: [B, 3, H, W] (`clip_part` then `clip_batch`)."""
    return clip_batch([clip_part(img, preprocess) for img in images], preprocess)


def _as_column(v, like: torch.Tensor) -> torch.Tensor:
    """Normalize's mean or std as torchvision applies it: a [C, 1, 1] tensor of the image's dtype."""
    return torch.as_tensor(v, dtype=like.dtype).view(-1, 1, 1)


def _tensor_tail(to_tensor, normalize) -> bool:
    """ToTensor (or open_clip's MaybeToTensor, the same for a PIL image) then a Normalize, exactly these types."""
    from open_clip.transform import MaybeToTensor
    from torchvision import transforms as T

    return type(to_tensor) in (T.ToTensor, MaybeToTensor) and type(normalize) is T.Normalize


def _batch(buf: list[_Prepared], preprocess, latents: str, tokenizer, device_jpegs: bool, pin: bool) -> Batch:
    parts = [p.clip for p in buf]
    if device_jpegs:  # bytes for the device decoder, else [3, H, W] CLIP input
        parts = [p if isinstance(p, (bytes, torch.Tensor)) else clip_batch([p], preprocess)[0] for p in parts]
        images = None
    else:
        parts, images = None, clip_batch(parts, preprocess)  # [B, 3, H, W]
    if pin and images is not None:
        images = images.pin_memory()
    lat = None
    if latents != "none":
        lat = np.stack([p.latent for p in buf]).transpose(0, 3, 1, 2)  # [B, H, W, 3] -> [B, 3, H, W] uint8
        if latents == "vae":
            lat = torch.from_numpy(lat).float() / 127.5 - 1.0
            lat = lat.pin_memory() if pin else lat
    samples = [p.sample for p in buf]
    captions = [s.caption for s in samples]
    tokens = tokenizer(captions) if tokenizer is not None else None
    return Batch(
        [s.key for s in samples],
        captions,
        [s.meta for s in samples],
        images,
        lat,
        sum(s.empty_caption for s in samples),
        tokens=tokens.pin_memory() if pin and tokens is not None else tokens,
        parts=parts,
        positions=[p.pos for p in buf],
        empty_flags=[s.empty_caption for s in samples],
        captions_not_utf8=sum(s.caption_not_utf8 for s in samples),
        not_utf8_flags=[s.caption_not_utf8 for s in samples],
    )


def assemble_images(b: Batch, preprocess, tensor_preprocess, device: str, errors: list[dict]) -> Batch:
    """The CLIP input of a ``--image-decode device`` batch on ``device``: its JPEGs decoded there in one call.

    A JPEG the device decoder refuses is decoded by PIL instead; one PIL cannot read either becomes an error
    row (with its reason) and leaves the batch, so rows stay aligned. Returns the batch with ``images`` set.
    """
    from pipeline.image_input import decode_jpegs

    jpeg_at = [i for i, p in enumerate(b.parts) if isinstance(p, bytes)]
    decoded = decode_jpegs([b.parts[i] for i in jpeg_at], device)
    on_device, refused = [], []
    for i, t in zip(jpeg_at, decoded, strict=True):
        # Refused, or a size `decode` refuses from the header (beyond MAX_ASPECT, or PIL's decompression-bomb
        # limit): handed to `decode`, so both paths give such an image the same error row.
        h, w = (t.shape[-2], t.shape[-1]) if t is not None else (0, 0)
        if t is None or aspect_problem(w, h) is not None or h * w > 2 * (Image.MAX_IMAGE_PIXELS or h * w):
            refused.append(i)
        else:
            on_device.append((i, t))
    ready: dict[int, torch.Tensor] = dict(
        zip([i for i, _ in on_device], tensor_preprocess.many([t for _, t in on_device]), strict=True)
    )
    for i in refused:
        img, reason = decode(Sample(b.keys[i], b.parts[i], b.captions[i], b.metas[i]))
        if img is None:
            errors.append({"key": b.keys[i], "reason": reason, "pos": b.positions[i]})
            continue
        try:
            part = preprocess(img)
        except Exception as e:  # as in `_prepare`: this image's error row, not the shard's failure
            why = f"cannot preprocess image: {type(e).__name__}: {e}"
            errors.append({"key": b.keys[i], "reason": why, "pos": b.positions[i]})
            continue
        ready[i] = part.to(device)
    for i, p in enumerate(b.parts):
        if isinstance(p, torch.Tensor):
            ready[i] = p.to(device, non_blocking=True)
    keep = [i for i in range(len(b.keys)) if i in ready]
    if len(keep) == len(b.keys):
        b.images = torch.stack([ready[i] for i in keep])
        b.device_decode_fallbacks = len(refused)
        return b
    pick = torch.tensor(keep, dtype=torch.long)
    return Batch(
        [b.keys[i] for i in keep],
        [b.captions[i] for i in keep],
        [b.metas[i] for i in keep],
        torch.stack([ready[i] for i in keep]) if keep else torch.zeros(0),
        _pinned_like(b.latent_input[keep], b.latent_input) if b.latent_input is not None else None,
        sum(b.empty_flags[i] for i in keep),
        tokens=_pinned_like(b.tokens[pick], b.tokens) if b.tokens is not None else None,
        positions=[b.positions[i] for i in keep],
        empty_flags=[b.empty_flags[i] for i in keep],
        captions_not_utf8=sum(b.not_utf8_flags[i] for i in keep),
        not_utf8_flags=[b.not_utf8_flags[i] for i in keep],
        device_decode_fallbacks=len(refused),
    )


def _pinned_like(x, like):
    """``x`` in page-locked memory if ``like`` is (a batch's rows picked out of a pinned tensor)."""
    return x.pin_memory() if isinstance(like, torch.Tensor) and like.is_pinned() else x
