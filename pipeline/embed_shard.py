"""The embed stage's per-shard work, run inside a dask worker: one pass over a tar -> one store shard.

The tar is read (`pipeline.shard_samples`), each image decoded once and the model inputs prepared batch by
batch, so that this overlaps the forward pass: on CPU in a background thread while the calling thread runs the
models; on a GPU in the calling thread itself, while the device runs the batch launched before
(`input_inline`).
Unusable samples become rows of the shard's error table, never misaligned rows. When img2dataset's record of
the shard (``NNNNN.parquet`` beside the tar) lists successful samples that the tar lacks (a tar cut short at a
member boundary still reads cleanly), each one becomes an error row too: a shorter shard is never silent.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import resource
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch

from pipeline import readahead, store
from pipeline.errors import StageError, UsageError
from pipeline.image_input import TensorPreprocess
from pipeline.prefetch import background
from pipeline.shard_samples import (
    Batch,
    TarDamaged,
    assemble_images,
    download_record,
    prepare_batches,
    tar_bytes,
)

log = logging.getLogger(__name__)

# torch threads of the decode thread. Its per-image tensor ops (ToTensor, Normalize, stacking) would otherwise
# start an OpenMP team of their own beside the one running the models: on a CPU that oversubscribes the cores,
# and each small op then waits for a descheduled thread (measured: 2.5 -> 47 ms an image on 2 busy cores).
DECODE_THREADS = 1


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
    decode_threads: int = 0  # 0 = by device, on the worker (`decode_threads`)
    compile: bool = False  # torch.compile the towers (`pipeline.encoders.compiled`)
    batch_prep: str = "auto"  # where batches are read and prepared: thread, inline or auto (`input_inline`)
    # the store's --pretrained file by content (manifest clip.sha256): each worker checks its copy against it
    pretrained_sha256: str | None = None
    vae_sha256: str | None = None  # the --vae folder's content, as the store recorded it
    run_token: str = ""  # the embed run's (`store.start_run`): checked before the shard's writes
    # the store's probe (manifest clip.probe, `pipeline.encoders.clip_probe`): each worker's model is compared
    # with it before its first shard; None until a run has recorded one
    clip_probe: dict | None = None

    def rounding(self) -> dict:
        """The settings outside the store's identity that still change its float bytes (batch composition, the
        device's arithmetic, the resize's, compiled kernels): kept in each shard's done marker, so that a
        resume with others can say so (`pipeline.embed.warn_mixed_rounding`)."""
        return {
            "device": "cuda" if self.device.startswith("cuda") else self.device,
            "batch_size": self.batch_size,
            "image_decode": self.image_decode,
            "compile": self.compile,
        }


def _sendable(fn):
    """``fn`` as a dask task: a RecursionError in it leaves as a StageError raised afresh, with a short traceback.
    Its own reaches the recursion limit, deeper than dask can pickle to send back: the client then never learnt
    the task had failed, and the run waited for it forever (seen with a worker preload that wrapped open_clip's
    model factory in itself)."""

    @functools.wraps(fn)
    def task(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RecursionError as e:
            message = f"{fn.__name__} on host {socket.gethostname()}: RecursionError: {e} (its traceback is in that worker's log)"
        raise StageError(message)  # outside the except: no context chained to the deep traceback

    return task


@_sendable
def calibrate_latents(cfg, shards: list[str], device: str) -> dict | None:
    """Latent codec description for the manifest; for the vae codec, fit the uint8 range on the data.

    The range is fitted on the first ``calib_samples`` usable images, taken from the shards in order (the
    first shard may have none: img2dataset writes an empty tar when every row of a shard failed).
    """
    if cfg.latents == "none":
        return None
    if cfg.latents == "pixels":
        return store.pixels_latents(cfg.latent_size)
    from pipeline.encoders import load_vae, vae_encode, vae_sha256

    digest = vae_sha256(cfg.vae)
    vae = load_vae(cfg.vae, device, weights=digest or "")
    digest = digest or vae_sha256(cfg.vae)  # a hub name is cached once loaded: its digest can be taken now
    px = cfg.latent_size * vae.downsample
    xs, n, first = [], 0, ""
    threads = decode_threads(cfg.decode_threads, device)
    for url in shards:
        try:  # a shard that cannot be read (unfinished, cut off) fails its own task later, not the whole run
            download_record(url)
            for batch in prepare_batches(
                url, lambda im: torch.zeros(1), cfg.batch_size, "vae", px, [], threads=threads
            ):
                xs.append(vae_encode(vae, batch.latent_input).float().cpu().numpy())
                n += len(batch.keys)
                if n >= cfg.calib_samples:
                    break
        except StageError as e:
            first = first or str(e)
            log.warning(
                "--latents vae: %s is passed over for the latent range (its task will fail): %s", url, e
            )
        if n >= cfg.calib_samples:
            break
    if not xs:
        # with --scheduler this runs on a worker, whose log alone held why (a shard it cannot see, say)
        raise UsageError(
            f"--latents vae: no decodable image with a caption in {len(shards)} shard(s) "
            "to fit the uint8 latent range on" + (f" (the first shard that failed: {first})" if first else "")
        )
    lo, hi = store.fit_quantization(np.concatenate(xs)[: cfg.calib_samples])
    log.info("vae latent range fitted on %d images: lo=%s hi=%s", min(n, cfg.calib_samples), lo, hi)
    codec = {
        "codec": "vae",
        "vae": cfg.vae,
        "scale": vae.scale,
        "image_size": px,
        "dtype": np.dtype(store.LATENT_DTYPE).name,
        "shape": [vae.channels, cfg.latent_size, cfg.latent_size],
        "lo": lo.tolist(),
        "hi": hi.tolist(),
        "fitted_on": min(n, cfg.calib_samples),
        **({"sha256": digest} if digest else {}),
    }
    if device.startswith("cuda"):  # this (the client) process is done with the GPU: leave it to the workers
        del vae
        load_vae.cache_clear()
        torch.cuda.empty_cache()
    return codec


def _column(values: list) -> pa.Array:
    """One metadata column; values of mixed or nested types that arrow cannot hold as one type, or parquet
    cannot write (an empty object), are kept as their JSON text rather than failing the shard (a hostile or
    inconsistent .json); text with a lone surrogate (a JSON escape such as "\\ud83d") keeps it as ``\\udNNN``."""
    try:
        column = pa.array(values)
        if _writable(column.type):
            return column
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError, UnicodeEncodeError):
        pass
    return pa.array([None if v is None else _text(v) for v in values], pa.string())


def _text(v) -> str:
    s = v if isinstance(v, str) else json.dumps(v, default=str)  # json.dumps escapes surrogates itself
    return s.encode("utf-8", "backslashreplace").decode("utf-8")


def _writable(t: pa.DataType) -> bool:
    """Whether parquet can write a column of type ``t``: no struct without fields, at any depth."""
    if pa.types.is_struct(t):
        return t.num_fields > 0 and all(_writable(t.field(i).type) for i in range(t.num_fields))
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return _writable(t.value_type)
    if pa.types.is_map(t):
        return _writable(t.key_type) and _writable(t.item_type)
    return True


def _metadata(keys: list[str], captions: list[str], metas: list[dict]) -> pa.Table:
    first = ["key", "caption", "url", "width", "height"]
    rows = [
        {**{k: m.get(k) for k in first}, **m, "key": k, "caption": c}
        for k, c, m in zip(keys, captions, metas, strict=True)
    ]
    # Drop img2dataset's per-sample status columns: every stored row is a success by construction.
    names = [n for n in dict.fromkeys(n for r in rows for n in r) if n not in ("status", "error_message")]
    return pa.table({n: _column([r.get(n) for r in rows]) for n in names})


@_sendable
def warm_up(params: ShardParams, gpu_slot: int | None = None) -> dict:
    """Build the models a worker will use (cached per process), warm the calling thread's torch state and
    pyarrow's lazy imports.

    `pipeline.embed` runs it as one task pinned to each worker, before the shards, so that it runs in the
    thread that then runs the worker's shard tasks: no shard pays these one-off costs. Measured in the first
    128-image shard (~8 s; ViT-B-32, 2 cores): 0.25 s for the thread's first forward, 0.65 s for pyarrow's
    first conversion of Python values (it imports pandas then). ``gpu_slot`` is the worker's place among the
    workers on its host (`worker_params`). Returns the worker's CLIP probe (`pipeline.encoders.clip_probe`), for
    the run to compare the workers' and record one in a store that has none yet."""
    if gpu_slot is not None:
        _process_state["gpu_slot"] = gpu_slot
    params = worker_params(params)
    if params.torch_threads:
        torch.set_num_threads(params.torch_threads)
    m = _models(params)
    _warm_this_thread(m)
    pa.array(["x"])
    return {**m.probe, "host": socket.gethostname()}


def worker_params(params: ShardParams) -> ShardParams:
    """``params`` on this worker's own GPU. ``--device cuda`` means every visible GPU: the worker given slot k
    (by `warm_up`) embeds on ``cuda:{k % device_count}``, so one worker per GPU on a host uses each GPU once,
    and a worker that sees a single GPU (CUDA_VISIBLE_DEVICES set per worker) uses that one. A worker that
    joined after the warm-up, or that dask restarted, claims the lowest slot free on its host at its first shard
    (`embed_cluster.claim_late_slot`); outside dask there is no slot and the device stays as it is. The chosen
    GPU is made the thread's current device too, for anything that does not name its device."""
    if params.device != "cuda":
        return params
    with _slot_lock:  # a worker's other task threads wait for its claim instead of starting on cuda:0
        if _process_state.get("gpu_slot") is None and not _process_state.get("late_slot_asked"):
            from pipeline.embed_cluster import claim_late_slot

            _process_state["gpu_slot"] = claim_late_slot(params.out)
            _process_state["late_slot_asked"] = True
        slot = _process_state.get("gpu_slot")
    if slot is None:
        return params
    count = torch.cuda.device_count()
    if not count:
        raise UsageError(f"--device cuda: a dask worker (slot {slot} on its host) sees no CUDA device")
    device = f"cuda:{slot % count}"
    torch.cuda.set_device(device)
    return dataclasses.replace(params, device=device)


def decode_threads(asked: int, device: str) -> int:
    """PIL decode threads of a shard task: as asked, else 1 on CPU (the models' threads use every core: on 2
    cores they ran ~5% slower beside one decode thread, and decoding between forwards on 2 threads was no
    better) and min(8, the cores this process may use) on CUDA, per worker (several GPU workers on one host
    each take that many)."""
    if asked:
        return asked
    if not device.startswith("cuda"):
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return min(8, cores or 1)


def _threads(gen: Iterator, n: int) -> Iterator:
    """``gen``, with torch's intra-op threads set to ``n`` (0 = unchanged) in the thread that runs it: OpenMP
    keeps that setting per thread, so the models' thread count in the caller is left as it is."""
    if n:
        torch.set_num_threads(n)
    yield from gen


@dataclass
class _Models:
    clip: object
    vae: object | None
    tensor_preprocess: TensorPreprocess | None  # --image-decode device
    device: str
    probe: dict  # the CLIP's (`pipeline.encoders.clip_probe`)


@dataclass
class _Rows:
    """What a shard's batches have produced so far, in tar order."""

    out: dict[str, list] = field(
        default_factory=lambda: {k: [] for k in ("img", "txt", "lat", "enc", "len", "key", "cap", "meta")}
    )
    truncated: int = 0
    empty: int = 0
    not_utf8: int = 0
    device_decode_fallbacks: int = 0  # reported with the timings, not in the done marker
    mae: list[float] = field(default_factory=list)


_thread_state = threading.local()
# "tasks": shards embedded by this process so far (its first is reported apart: a worker's first shard can pay
# one-off costs that a run of thousands of shards pays once); "gpu_slot": this worker's place on its host
# (`warm_up`, `worker_params`).
_process_state: dict = {"tasks": 0, "gpu_slot": None}
_slot_lock = threading.Lock()


def _warm_this_thread(m: _Models) -> None:
    """One tiny forward of each tower in the calling thread, once per thread, before the shard's decode thread
    starts. Measured in a dask worker (ViT-B-32, 2 cores): without it the first shard of every run embedded at
    ~10 images/s and later ones at ~18, and a warm-up forward in any other thread (``client.run``) did not help;
    with it the first shard runs at full speed. The cost is ~0.1 s once per worker thread."""
    from pipeline.encoders import encode_image, encode_text

    warm = warm_key(m.clip)
    if getattr(_thread_state, "warm", None) == warm:
        return
    size = m.tensor_preprocess.size if m.tensor_preprocess else _clip_input_size(m.clip)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16, enabled=m.device.startswith("cuda")):
        encode_image(m.clip, torch.zeros(2, 3, size, size, device=m.device))
        # 3 captions of 2 tokens: compiled towers (dynamic shapes) would otherwise assume batch == length
        encode_text(m.clip, m.clip.tokenizer(["", "", ""]).to(m.device))
    _thread_state.warm = warm


def warm_key(clip) -> tuple:
    """What a thread is warm for: the model, eager or compiled (compiled towers warm up, and compile, apart)."""
    return id(clip.model), clip.compiled_towers is not None


def _clip_input_size(clip) -> int:
    size = getattr(clip.model.visual, "image_size", 224)
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def _check_copy(flag: str, path: str, got: str | None, want: str, what: str) -> None:
    """This worker's copy of a ``--pretrained`` file or ``--vae`` folder is the one the store was made with."""
    if got != want:
        mine = f"has sha256 {got[:12]}..." if got else "is not there"
        raise StageError(
            f"{flag} {path} on dask worker host {socket.gethostname()} {mine}; the store was made with sha256 "
            f"{want[:12]}...; give every worker the same {what}"
        )


def _models(params: ShardParams) -> _Models:
    from pipeline.encoders import (
        checkpoint_sha256,
        clip_probe,
        compiled,
        load_clip,
        load_vae,
        probe_mismatch,
        vae_sha256,
    )

    if want := params.pretrained_sha256:  # a node with another file at that path would mix two models' rows
        _check_copy(
            "--pretrained", params.pretrained, checkpoint_sha256(params.pretrained), want, "checkpoint file"
        )
    clip = load_clip(params.clip, params.pretrained, params.device, params.seed, weights=want or "")
    probe = clip_probe(clip)
    if params.clip_probe and (how := probe_mismatch(probe, params.clip_probe)):
        raise UsageError(  # another open_clip or config than the store's would mix two models' embeddings
            f"CLIP {params.clip} ({params.pretrained}) on host {socket.gethostname()} is not the model that made "
            f"the store at {params.out}: it embeds a fixed probe otherwise ({how}); embed with the open_clip "
            "and model config the store was made with, or, to embed the whole store again with this one, move "
            f"{params.out} away first"
        )
    if params.compile:
        clip = compiled(clip)
    vae = None
    if params.latents == "vae":
        if want := params.vae_sha256:  # as for --pretrained: one VAE's latents in the whole store
            _check_copy("--vae", params.vae, vae_sha256(params.vae, fetch=True), want, "VAE")
        vae = load_vae(params.vae, params.device, weights=want or "")
    tp = None
    if params.image_decode == "device":
        tp = TensorPreprocess.from_open_clip(clip.model)
        if tp is None:
            raise UsageError(
                f"--image-decode device: CLIP {params.clip}'s preprocessing has no tensor equivalent"
            )
    return _Models(clip, vae, tp, params.device, probe)


@dataclass
class _Launched:
    """A batch's model outputs, queued on the device (`_launch`) and not yet copied back (`_collect`)."""

    batch: Batch
    img: torch.Tensor
    txt: torch.Tensor
    enc: torch.Tensor | None
    lengths: torch.Tensor | None
    lat: torch.Tensor | None


def _launch(b: Batch, m: _Models, params: ShardParams) -> _Launched:
    """The models on batch ``b``. On a GPU nothing here waits for them (the captions are trimmed by lengths
    read from the host's tokens), so the caller can prepare the next batch while they run."""
    from pipeline.encoders import encode_image, encode_text, normalize, vae_encode

    dev = m.device
    with torch.autocast("cuda", dtype=torch.float16, enabled=dev.startswith("cuda")):
        img = normalize(encode_image(m.clip, b.images.to(dev, non_blocking=True))).half()
        txt, enc, lengths = encode_text(m.clip, b.tokens, params.text_encodings)
    lat = vae_encode(m.vae, b.latent_input) if m.vae is not None else None
    return _Launched(b, img, normalize(txt).half(), enc, lengths, lat)


def _collect(f: _Launched, params: ShardParams, acc: _Rows) -> None:
    """A launched batch's outputs copied back (on a GPU this waits for them) and added to ``acc``."""
    out, lp, b = acc.out, params.latent_params, f.batch
    acc.truncated += int((b.tokens[:, -1] != 0).sum())  # the caption filled or overflowed the context
    out["img"].append(f.img.cpu().numpy())
    out["txt"].append(f.txt.cpu().numpy())
    if f.enc is not None:
        # each row's own tokens, back to back, in one copy (not one a row: on a GPU each copy syncs)
        own = torch.arange(f.enc.shape[1], device=f.enc.device) < f.lengths[:, None]  # [B, n]
        out["enc"].append(f.enc[own].half().cpu().numpy())
        out["len"].append(f.lengths.cpu().numpy())
    if f.lat is not None:
        x = f.lat.float().cpu().numpy()
        q = store.quantize(x, lp["lo"], lp["hi"])
        acc.mae.append(float(np.abs(store.dequantize(q, lp["lo"], lp["hi"]) - x).mean()))
        out["lat"].append(q)
    elif b.latent_input is not None:
        out["lat"].append(np.ascontiguousarray(b.latent_input))
    out["key"] += b.keys
    out["cap"] += b.captions
    out["meta"] += b.metas
    acc.empty += b.empty_captions
    acc.not_utf8 += b.captions_not_utf8


def embed_shard_or_fail(url: str, params: ShardParams) -> dict:
    """`embed_shard` for callers that take its marker as it is (the benches): a shard it refuses raises."""
    res = embed_shard(url, params)
    if "failed" in res:
        raise StageError(res["failed"].removeprefix("StageError: "))
    return res


@_sendable
def embed_shard(url: str, params: ShardParams) -> dict:
    """Embed one shard and write it to the store; returns its done marker, or ``{"failed": reason}`` for a
    shard no retry can embed (its download not finished, its record damaged). Runs in a dask worker."""
    params = worker_params(params)
    if params.torch_threads:
        torch.set_num_threads(params.torch_threads)
    t0 = time.perf_counter()
    root, shard, device = params.out, store.shard_id_of(url), params.device
    try:  # a task of a run that has ended, or a worker that cannot see the store: not a byte written
        store.check_run(root, params.run_token)
    except store.Superseded as e:
        return {"failed": f"StageError: {e}"}
    store.remove_shard(root, shard)  # a partial shard from an interrupted run is redone from scratch
    try:  # before the work: an unfinished download fails the shard at once
        recorded = download_record(url)
    except StageError as e:  # no retry can finish a download or mend its record: failed once, in one line
        return {"failed": f"{type(e).__name__}: {e}"}
    m = _models(params)
    _warm_this_thread(m)
    cuda, lp = device.startswith("cuda"), params.latent_params
    errors: list[dict] = []
    local, read_ahead = readahead.take(root, url)  # `embed --read-ahead`: a copy of the tar fetched already
    size = os.path.getsize(local) if local else tar_bytes(url)
    batches = prepare_batches(
        url,
        m.clip.preprocess,
        params.batch_size,
        params.latents,
        lp["image_size"] if lp else 0,
        errors,
        tokenizer=m.clip.tokenizer,  # tokenised where the batches are prepared (`input_inline`)
        device_jpegs=m.tensor_preprocess is not None,
        pin_memory=cuda,
        threads=decode_threads(params.decode_threads, params.device),
        local=local,
    )
    acc = _Rows()
    # Where the task's time goes (reported, not stored): the next batch (waiting for the decode thread's, or
    # on a GPU reading and preparing it in this thread), decoding on the device, the models (on CUDA their
    # launch and the wait for the copy back), writing the shard.
    phases = dict.fromkeys(PHASES, 0.0)
    tick = time.perf_counter()
    phases["setup"] = tick - t0
    inline = input_inline(params)
    source = batches if inline else background(_threads(batches, DECODE_THREADS))
    launched: _Launched | None = None  # inline: the batch the device runs while this thread reads the next
    try:
        for b in source:
            tick = _lap(phases, "input_wait", tick)
            if launched is not None:
                _collect(launched, params, acc)
                launched = None
                tick = _lap(phases, "models", tick)
            if m.tensor_preprocess is not None:
                b = assemble_images(b, m.clip.preprocess, m.tensor_preprocess, device, errors)
                acc.device_decode_fallbacks += b.device_decode_fallbacks  # a batch left empty counts too
                if cuda:  # the decode's kernels are timed here, not under the models that would wait for them
                    torch.cuda.synchronize(device)
                tick = _lap(phases, "device_decode", tick)
            if b.keys:
                launched = _launch(b, m, params)
                if not inline:
                    _collect(launched, params, acc)
                    launched = None
            tick = _lap(phases, "models", tick)
        tick = _lap(phases, "input_wait", tick)  # the end of the tar (trailing error samples)
        if launched is not None:
            _collect(launched, params, acc)
            tick = _lap(phases, "models", tick)
    except TarDamaged as e:
        if not readahead.is_local(url):  # a remote read may only have lost its connection: dask retries it
            raise
        return {"failed": f"StageError: {e}"}  # a local file's damage: no retry mends it (failed once)
    finally:  # now, not when the traceback of a failed shard is dropped: the decode threads stop, the tar closes
        source.close()
        readahead.release(local)
    errors.sort(key=lambda e: e.pop("pos"))  # tar order, whichever thread found the problem
    if recorded is not None:
        present = set(acc.out["key"]) | {e["key"] for e in errors}
        for key in sorted(set(recorded) - present):
            errors.append({"key": key, "reason": "downloaded (img2dataset record) but not in the tar"})
    try:
        marker = _write(
            root, shard, url, acc, errors, recorded is not None, params.rounding(), params.run_token, size
        )
    except store.Superseded as e:  # the run ended (a Ctrl-C) while this task worked: the store is not its
        return {"failed": f"StageError: {e}"}
    _lap(phases, "write", tick)
    # Reported to the caller only (the marker on disk stays free of timings): for the summary and the bench.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gpu = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else 0.0
    first = not _process_state["tasks"]
    _process_state["tasks"] += 1
    return {
        **marker,
        "worker_peak_rss_mb": round(rss, 1),
        "gpu_peak_mb": round(gpu, 1),
        "seconds": round(time.perf_counter() - t0, 3),
        "first_in_process": first,
        "device_decode_fallbacks": acc.device_decode_fallbacks,
        "phases": {k: round(v, 4) for k, v in phases.items()},
        "batch_prep": "inline" if inline else "thread",
        "read_ahead": read_ahead,
    }


BATCH_PREPS = ("auto", "thread", "inline")


def input_inline(params: ShardParams) -> bool:
    """Whether a shard task prepares its batches in its own thread, between the models' launches, instead of
    in a background thread.

    On a GPU the models' thread is bound by Python: a forward is hundreds of small kernel launches, and torch
    lets go of the GIL around each. A background thread that reads the tar and tokenises holds the GIL for
    Python work, so after each launch the models' thread waits to get it back (a convoy). Measured on CPU with
    a launch-bound stand-in (a 12-layer, 64-wide CLIP at batch 256 and a 5 ms sleep for the device decoder,
    2026-12-04): the background thread took 0.62 s a 1,024-image shard, longer than the reading alone (0.20 s)
    and the models alone (0.24 s) one after the other. Inline, a launched batch runs on the GPU while the next
    one is read, so the overlap stays without the contention. On CPU the forward is large ops that let go of
    the GIL for milliseconds, so the background thread overlaps them well (`make bench`: >= 0.95 of the
    forward). ``params.batch_prep`` (``--batch-prep``) overrides the choice: thread, inline, or auto (by device)."""
    if params.batch_prep != "auto":
        return params.batch_prep == "inline"
    return params.device.startswith("cuda")


# A shard task's phases, in order (`embed_shard`): setup is the models' lookup and the download record.
PHASES = ("setup", "input_wait", "device_decode", "models", "write")


def _lap(phases: dict, name: str, since: float) -> float:
    now = time.perf_counter()
    phases[name] += now - since
    return now


def _write(
    root,
    shard,
    url,
    acc: _Rows,
    errors: list[dict],
    cross_checked: bool,
    rounding: dict,
    run_token: str = "",
    source_bytes: int | None = None,
) -> dict:
    out, mae = acc.out, acc.mae
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
        **({"source_bytes": source_bytes} if source_bytes is not None else {}),
        "errors": len(errors),
        "truncated_captions": acc.truncated,
        "empty_captions": acc.empty,
        "captions_not_utf8": acc.not_utf8,
        "checked_against_download_record": cross_checked,
        "latent_roundtrip_mae": round(float(np.mean(mae)), 6) if mae else None,
        "embedded_with": rounding,
    }
    fence = (lambda: store.check_run(root, run_token)) if run_token else None
    return store.write_shard(root, shard, arrays, tables, rows, extra, fence=fence)
