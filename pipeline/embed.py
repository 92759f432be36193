"""Stage 2 — embed: webdataset shards -> the shard-aligned embedding store (`pipeline.store`).

Reads ``--shards`` (brace range, glob or folder of ``NNNNN.tar``; local or fsspec URLs). Writes the store
under ``--out``: CLIP image and text embeddings, metadata, optional uint8 latents and per-token text
encodings, per-shard error tables and done markers, ``manifest.json``, and ``logs/embed_summary.json``.

One dask task per shard (a LocalCluster by default, or ``--scheduler``). A shard with a done marker is
skipped; any other shard is redone from scratch, so a rerun after a crash ends byte-identical to a clean run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import fsspec
import numpy as np
from braceexpand import braceexpand

from pipeline import progress, store
from pipeline.embed_cluster import cluster_device, connect, task_resources, warm_workers
from pipeline.embed_shard import BATCH_PREPS
from pipeline.errors import StageError, UsageError
from pipeline.image_input import IMAGE_DECODES
from pipeline.store import LATENT_CODECS

log = logging.getLogger(__name__)

# Settings that change what the store holds: a store made with others is refused unless --overwrite.
IDENTITY = ("clip", "pretrained", "seed", "latents", "latent_size", "vae", "text_encodings")


@dataclass
class EmbedConfig:
    shards: str = field(metadata={"help": "brace range, glob or folder of webdataset .tar shards"})
    out: str = field(metadata={"help": "store folder"})
    clip: str = "ViT-B-32"  # open_clip architecture name (`open_clip.list_models()`), or unclip-tiny
    # 'none' = random weights (offline demo/tests); a tag such as laion2b_s34b_b79k, or a checkpoint path.
    pretrained: str = "laion2b_s34b_b79k"
    seed: int = 0  # seeds random CLIP weights, so every worker builds the same model
    batch_size: int = 0  # 0 = 256 on CUDA, 64 on CPU
    # cuda = every visible GPU, one per worker (embed_shard.worker_params); cuda:N = GPU N for every worker
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda (every visible GPU) or cuda:N"})
    # auto = JPEGs decoded on the GPU for embedding-only CUDA runs, PIL otherwise (pipeline.image_input)
    image_decode: str = field(default="auto", metadata={"choices": IMAGE_DECODES})
    # Latents for the decoder: none, pixels (the images themselves, resized) or vae (a diffusers VAE's, as uint8).
    latents: str = field(default="none", metadata={"choices": LATENT_CODECS})
    latent_size: int = 32  # the latents' side: pixels at this size, or VAE latents of images 8x as large
    vae: str = ""  # --latents vae: a diffusers AutoencoderKL by hub name or local folder
    text_encodings: bool = False  # also store per-token text encodings (for priors trained with them)
    # LocalCluster processes; 0 = one per visible GPU with --device cuda, else 1 (one uses every core via torch)
    workers: int = 0
    scheduler: str = ""  # a dask scheduler address (tcp://host:8786); default: a local cluster
    retries: int = 2  # times dask reruns a shard task that failed, before it is listed as failed
    torch_threads: int = 0  # 0 = cores / workers (dask otherwise pins workers to one thread)
    # one thread caps a PIL-decoded run at a few hundred images/s a worker; on CPU more take cores from the model
    decode_threads: int = field(
        default=0,
        metadata={"help": "samples PIL decodes at once in each worker; 0 = 1 on CPU, min(8, cores) on CUDA"},
    )
    # torch.compile the image tower and text transformer in each worker (compiled once, in its warm-up). Off by
    # default: on a 2-core CPU ViT-B-32 took 46 s to compile and ran no faster (1.00x); on a GPU see the bench.
    compile: bool = False
    # where each worker reads and prepares its batches: a background thread (auto on CPU), or its models'
    # thread between launches (auto on CUDA: a forward there is bound by Python, `embed_shard.input_inline`)
    batch_prep: str = field(default="auto", metadata={"choices": BATCH_PREPS})
    # shards each worker fetches while it embeds the current one (copied when remote, pre-read into the page
    # cache when local: `pipeline.readahead`); 0 = off
    read_ahead: int = 1
    overwrite: bool = False  # replace a store made with other settings (otherwise refused)
    calib_samples: int = 512  # images used to fit the uint8 latent range (vae codec)


def list_shards(pattern: str) -> list[str]:
    """Every .tar the pattern names, sorted by shard id; a UsageError if none, if a shard it names by name
    (not by a glob or a folder) does not exist, or if the pattern or its URL scheme cannot be read."""
    found: list[str] = []
    missing: list[str] = []
    try:
        for part in braceexpand(pattern):
            fs, path = fsspec.core.url_to_fs(part)
            proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
            prefix = "" if proto in ("file", "local") else f"{proto}://"
            if any(c in path for c in "*?["):
                found += [prefix + p for p in fs.glob(path)]
            elif fs.isdir(path):
                found += [prefix + p for p in fs.glob(path.rstrip("/") + "/*.tar")]
            elif fs.exists(path):
                found.append(os.path.abspath(path) if prefix == "" else part)  # workers may run elsewhere
            else:
                missing.append(part)
    except (ValueError, ImportError) as e:  # unbalanced braces, an unknown scheme, its fsspec backend missing
        raise UsageError(f"--shards {pattern}: {str(e).splitlines()[0]}") from None
    if missing:  # a shard named outright that is not there: a download not finished, or a typo, never skipped
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise UsageError(
            f"--shards {pattern} names {len(missing)} shard(s) that do not exist: {', '.join(missing[:3])}{more}; "
            "finish the download or name only the shards there (a glob or a folder takes what exists)"
        )
    shards = sorted({s for s in found if s.endswith(".tar")}, key=store.shard_id_of)
    if not shards:
        raise UsageError(f"no .tar shard matched --shards {pattern}")
    ids = [store.shard_id_of(s) for s in shards]
    if len(set(ids)) != len(ids):
        raise UsageError(
            f"--shards {pattern} matched two shards with the same name; shard names must be unique"
        )
    return shards


def _unfinished(url: str) -> bool:
    from pipeline.shard_samples import download_record

    try:
        download_record(url)
    except StageError:
        return True
    return False


def check_tar(url: str) -> None:
    try:
        with fsspec.open(url, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tf:
            tf.next()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise UsageError(f"unreadable tar {url}: {e}") from e


def validate(cfg: EmbedConfig) -> list[str]:
    from pipeline.encoders import (
        check_device_name,
        ensure_pretrained,
        resolve_device,
        validate_clip,
        validate_vae,
    )

    # each named by itself: one line for the first four flags did not say which was wrong
    for name, value, low, what in (
        ("batch-size", cfg.batch_size, 0, "0 = by device"),
        ("decode-threads", cfg.decode_threads, 0, "0 = by device"),
        ("workers", cfg.workers, 0, "0 = by device"),
        ("latent-size", cfg.latent_size, 1, "the latents' side in pixels"),
        ("torch-threads", cfg.torch_threads, 0, "0 = cores / workers"),
        ("retries", cfg.retries, 0, "reruns of a failed shard task"),
        ("calib-samples", cfg.calib_samples, 1, "images the uint8 latent range is fitted on"),
    ):
        if value < low:
            raise UsageError(f"--{name} must be >= {low} ({what}), not {value}")
    if cfg.read_ahead < 0:
        raise UsageError(
            f"--read-ahead must be >= 0 (shards fetched ahead per worker; 0 = off), not {cfg.read_ahead}"
        )
    if cfg.scheduler:
        check_device_name(cfg.device)  # the workers settle it (`embed_cluster.cluster_device`)
    else:
        resolve_device(cfg.device)  # a device this host lacks is refused before the shards are read
    if cfg.image_decode not in IMAGE_DECODES:
        raise UsageError(f"unknown --image-decode '{cfg.image_decode}'; valid: {', '.join(IMAGE_DECODES)}")
    if cfg.batch_prep not in BATCH_PREPS:
        raise UsageError(f"unknown --batch-prep '{cfg.batch_prep}'; valid: {', '.join(BATCH_PREPS)}")
    if cfg.latents not in LATENT_CODECS:
        raise UsageError(f"unknown --latents '{cfg.latents}'; valid: {', '.join(LATENT_CODECS)}")
    validate_clip(cfg.clip, cfg.pretrained)
    if cfg.image_decode == "device" and not _tensor_preprocess_supported(cfg):
        raise UsageError(
            f"--image-decode device: CLIP {cfg.clip}'s preprocessing (resize mode or interpolation) has no "
            "tensor equivalent; valid here: auto, pil"
        )
    if cfg.latents == "vae":
        validate_vae(cfg.vae)
    shards = list_shards(cfg.shards)
    is_store(Path(cfg.out))  # a file, or a folder of someone else's files, is refused before any work
    for s in shards:
        try:
            check_tar(s)
        except UsageError:
            if not _unfinished(s):
                raise
            # a shard img2dataset has not finished (a killed download's 0-byte tar), or whose record is
            # damaged: it fails alone at its task, saying which, as one whose tar reads does
            log.warning("%s cannot be read and its download record says why: its task will fail", s)
    ensure_pretrained(cfg.clip, cfg.pretrained)  # once here, not once per dask worker
    return shards


def is_store(root: Path) -> bool:
    """True for a store, False for a new or empty folder; a UsageError for anything else (never written to)."""
    try:
        return store.check_is_store_or_empty(root)
    except ValueError as e:
        raise UsageError(f"--out {e}; name a new or empty folder (--overwrite only replaces a store)") from e


def identity_of(cfg: EmbedConfig) -> dict:
    """The store's identity for this run: the IDENTITY settings, a --pretrained file's sha256 and, for
    --latents vae, the VAE's (`pipeline.encoders.vae_sha256`)."""
    from pipeline.encoders import checkpoint_sha256, vae_sha256

    identity = {k: getattr(cfg, k) for k in IDENTITY}
    if digest := checkpoint_sha256(cfg.pretrained):
        identity["pretrained_sha256"] = digest
    if cfg.latents == "vae" and (digest := vae_sha256(cfg.vae)):
        identity["vae_sha256"] = digest
    return identity


# settings whose content the identity may record beside them: (the digest's key, what the setting names)
DIGESTED = {"pretrained": ("pretrained_sha256", "checkpoint"), "vae": ("vae_sha256", "VAE")}


def identity_diff(old: dict, new: dict) -> list[str]:
    """The settings in which a store's identity (``old``) and this run's (``new``) differ, each as
    ``name: the store's value``. A --pretrained file (or --vae folder) is the same one wherever it lies now when
    both record its sha256 (a moved folder), and another one when its content changed at the same path. A
    store made before the digest was recorded is compared by path alone."""
    diff = []
    latents = old.get("latents") if old.get("latents") == new.get("latents") else None
    unused = {"none": ("latent_size", "vae"), "pixels": ("vae",)}.get(latents, ())
    for k in IDENTITY:
        if k in unused:  # a setting of latents the store has none of (--latent-size with --latents none)
            continue
        key, what = DIGESTED.get(k, (None, None))
        then, now = (old.get(key), new.get(key)) if key else (None, None)
        if then and now:
            if then != now:
                moved = "" if old.get(k) == new.get(k) else f" (then at {old.get(k)})"
                diff.append(
                    f"{k}: another {what}{moved}: the store's had sha256 {then[:12]}..., {new.get(k)} "
                    f"has {now[:12]}..."
                )
        elif old.get(k) != new.get(k):
            diff.append(f"{k}: {old.get(k)}")
    return diff


def reusable_store(cfg: EmbedConfig) -> dict | None:
    """The manifest of the store at ``--out`` when this run continues it; None for a new store or one that
    --overwrite replaces; a UsageError for a store made with other settings."""
    root = Path(cfg.out)
    identity = identity_of(cfg)
    if is_store(root) and store.is_adopted(root):
        # Its done markers list the user's own files: --overwrite would delete the embeddings it adopted.
        raise UsageError(
            f"--out {root} is a folder adopted with `unclip adopt`: its embeddings are your files, which embed "
            "never writes over or deletes, even with --overwrite; give another --out"
        )
    if not is_store(root):
        return None
    if cfg.overwrite:  # replaces a store made with other settings, even one whose manifest does not read
        try:
            old = store.load_manifest(root)
        except (UsageError, OSError):
            if any(_adopted_marker(root, s) for s in store.done_shards(root)):  # its manifest damaged
                raise UsageError(
                    f"--out {root} holds done markers of `unclip adopt` (its manifest.json does not read): its "
                    "embeddings are your files, which embed never writes over or deletes; give another --out"
                ) from None
            return None
        if not isinstance(old.get("identity"), dict) or identity_diff(old["identity"], identity):
            return None
        # Made with these settings (say the same command, rerun after a Ctrl-C): continued, not wiped
        log.info(
            "--overwrite: %s was made with these settings; continuing it (delete it to start over)", root
        )
        return old
    old = store.load_manifest(root)
    if diff := identity_diff(old.get("identity") or {}, identity):
        raise UsageError(
            f"{root} holds a store made with other settings ({'; '.join(diff)}); "
            "use another --out or pass --overwrite"
        )
    return old


def _adopted_marker(root: Path, shard: str) -> bool:
    try:
        return store.read_done(root, shard).get("source") == "adopted"
    except (OSError, ValueError, UsageError):
        return False


def prepare_store(cfg: EmbedConfig, shards: list[str], device: str, client=None) -> dict:
    """Check an existing store is compatible (or wipe it with --overwrite); return the manifest to use.
    With a ``client`` (``--scheduler``) the vae codec's range is fitted on a worker, on the workers' device."""
    root = Path(cfg.out)
    identity = identity_of(cfg)
    old = reusable_store(cfg)
    if old is not None:
        return old
    from pipeline.embed_shard import calibrate_latents
    from pipeline.encoders import clip_dims

    clip = clip_dims(cfg.clip)  # from the architecture's config: no model is built in this process
    if client is not None and cfg.latents == "vae":
        resources = task_resources(cfg, device)
        try:
            latents = client.submit(
                calibrate_latents, for_workers(cfg), shards, device, resources=resources, pure=False
            ).result()
            latents["vae"] = cfg.vae  # the manifest keeps --vae as typed, as a run without --scheduler does
        except UsageError:
            raise
        except Exception as e:  # e.g. a --vae folder this host has and the worker does not
            raise UsageError(
                f"--latents vae: fitting the latent range on a dask worker failed: {type(e).__name__}: {e}"
            ) from e
    else:
        latents = calibrate_latents(cfg, shards, device)  # may still refuse: before anything is removed
    if latents and latents["codec"] == "vae":  # what workers and `unclip sample` check the VAE against: the
        # digest taken as the range was fitted (on a worker with --scheduler), else this host's
        mine, fitted = identity.get("vae_sha256"), latents.get("sha256")
        if mine and fitted and mine != fitted:
            raise UsageError(
                f"--vae {cfg.vae}: this host's copy has sha256 {mine[:12]}..., the dask worker that fitted the "
                f"latent range has {fitted[:12]}...; give every host the same VAE"
            )
        if digest := fitted or mine:
            identity["vae_sha256"] = latents["sha256"] = digest
    manifest = store.Manifest.new(
        identity,
        store.ClipInfo(
            arch=cfg.clip,
            pretrained=cfg.pretrained,
            dim=clip.dim,
            context_length=clip.context_length,
            random_init=cfg.pretrained.lower() in ("none", "random", ""),
            sha256=identity.get("pretrained_sha256"),
        ),
        text_enc_width=clip.text_width if cfg.text_encodings else 0,
        latents=latents,
    ).to_json()
    if cfg.overwrite and is_store(root):
        removed = store.wipe(root, new_manifest=manifest)  # the new manifest replaces the old: always a store
        log.info("--overwrite: removed %d files this project wrote in %s", len(removed), root)
    else:
        store.write_json(root / store.MANIFEST, manifest)
    return manifest


def run(cfg: EmbedConfig) -> dict:
    """Validate, list shards, skip done ones, embed the rest on dask, write the manifest and summary."""
    shards = validate(cfg)
    cfg.out = os.path.abspath(cfg.out)  # dask workers may have another working directory
    with store.hold_folder(cfg.out):  # one embed run writes a store at a time
        # ... and its shard tasks write only while it runs (`store.check_run`): a task still running on a
        # worker of an existing scheduler when the command ends (a Ctrl-C) writes nothing after it
        token = store.start_run(cfg.out)
        try:
            return _embed(cfg, shards, token)
        finally:
            store.end_run(cfg.out, token)


def _embed(cfg: EmbedConfig, shards: list[str], token: str = "") -> dict:
    from pipeline.encoders import resolve_device

    # With --scheduler the workers settle the device, so connect first, unless there is nothing to do (a
    # finished store reruns without its scheduler, and a store with other settings is refused before).
    reused = reusable_store(cfg)
    pending = reused is None or not all(store.is_done(cfg.out, store.shard_id_of(s)) for s in shards)
    client = cluster = None
    start, rows, failed, stats = time.perf_counter(), 0, {}, {}
    try:
        if cfg.scheduler and pending:
            client, cluster = connect(cfg)
            device = cluster_device(client, cfg.device)
        else:
            device = resolve_device(cfg.device) if not cfg.scheduler else "cpu"  # cpu: nothing runs
        cfg = dataclasses.replace(
            cfg,
            batch_size=cfg.batch_size or (256 if device.startswith("cuda") else 64),
            workers=cfg.workers or local_workers(device),
        )
        manifest = reused if reused is not None else prepare_store(cfg, shards, device, client)
        todo = [s for s in shards if not store.is_done(cfg.out, store.shard_id_of(s))]
        log.info(
            "embed: %d shards, %d already done, %d to do", len(shards), len(shards) - len(todo), len(todo)
        )
        if todo:
            params = dataclasses.replace(shard_params(cfg, device, manifest), run_token=token)
            pending_set = set(todo)
            warn_mixed_rounding(cfg.out, [s for s in shards if s not in pending_set], params.rounding())
            start = time.perf_counter()  # a LocalCluster's start-up counts, as the user waits for it
            if client is None:
                client, cluster = connect(cfg)
            rows, failed, stats = _map(client, todo, params, cfg, start, manifest)
    finally:
        closing = time.perf_counter()
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()
        if stats:  # shards ran: the close is this run's too
            stats["close_seconds"] = time.perf_counter() - closing
    seconds = time.perf_counter() - start
    return _finish(cfg, manifest, shards, rows, seconds, failed, stats)


def warn_mixed_rounding(root: str, done: list[str], mine: dict) -> list[str]:
    """Warn (and return the lines) when the store's finished shards were embedded with other batch size,
    device, image decode or --compile than this run: accepted, as none is part of the store's identity, but its
    new shards then differ from an uninterrupted run's by float rounding, which a byte-identical resume needs
    to know. Markers written before they recorded it say nothing and are left out."""
    seen: dict[str, set] = {}
    for shard in done:
        try:
            theirs = store.read_done(root, store.shard_id_of(shard)).get("embedded_with")
        except (OSError, ValueError, UsageError):
            continue  # the run itself names a damaged marker where it matters
        for k, v in (theirs or {}).items():
            if k in mine and v != mine[k]:
                seen.setdefault(k, set()).add(json.dumps(v))
    lines = [
        f"--{k.replace('_', '-')}: the store's finished shards were embedded with {' / '.join(sorted(v))}, "
        f"this run's with {json.dumps(mine[k])}"
        for k, v in seen.items()
    ]
    if lines:
        log.warning(
            "embed: resuming %s with other settings than its finished shards (%s): the new shards differ from an "
            "uninterrupted run's by float rounding (cosine >= 0.999), so the store is not byte-identical to one "
            "made in one go; rerun with the first settings for that",
            root,
            "; ".join(lines),
        )
    return lines


def local_workers(device: str) -> int:
    """``--workers 0``'s LocalCluster size: one worker per visible GPU for ``--device cuda`` (every visible GPU,
    one per worker: `pipeline.embed_shard.worker_params`), else one (a CPU worker uses every core through torch;
    ``cuda:N`` pins every worker to one GPU)."""
    if device != "cuda":
        return 1
    import torch

    return max(1, torch.cuda.device_count())


def for_workers(cfg: EmbedConfig) -> EmbedConfig:
    """``cfg`` with a ``--pretrained`` file or ``--vae`` folder that exists here named by its absolute path, as
    the shards and ``--out`` are: dask workers may run in another working directory. The store's identity keeps
    them as typed (a rerun from the same folder with the same flags continues the store)."""
    from pipeline.encoders import is_path

    here = {}
    # a tag is left alone, as open_clip reads it; diffusers loads a folder of that name before the hub's model
    if is_path(cfg.pretrained) and os.path.isfile(cfg.pretrained):
        here["pretrained"] = os.path.abspath(cfg.pretrained)
    if cfg.vae and os.path.isdir(cfg.vae):
        here["vae"] = os.path.abspath(cfg.vae)
    return dataclasses.replace(cfg, **here)


def shard_params(cfg: EmbedConfig, device: str, manifest: dict):
    """What every shard task of this run is sent (`pipeline.embed_shard.ShardParams`)."""
    from pipeline.embed_shard import ShardParams

    cfg = for_workers(cfg)
    return ShardParams(
        out=cfg.out,
        clip=cfg.clip,
        pretrained=cfg.pretrained,
        seed=cfg.seed,
        device=device,
        batch_size=cfg.batch_size,
        latents=cfg.latents,
        vae=cfg.vae,
        text_encodings=cfg.text_encodings,
        torch_threads=cfg.torch_threads
        or (0 if cfg.scheduler else max(1, (os.cpu_count() or 1) // (cfg.workers or local_workers(device)))),
        latent_params=manifest["latents"],
        image_decode=_image_decode(cfg, device),
        decode_threads=cfg.decode_threads,
        compile=cfg.compile,
        batch_prep=cfg.batch_prep,
        pretrained_sha256=(manifest.get("clip") or {}).get("sha256"),
        vae_sha256=(manifest.get("latents") or {}).get("sha256") if cfg.latents == "vae" else None,
        clip_probe=(manifest.get("clip") or {}).get("probe"),
    )


def settle_probe(root: str, manifest: dict, probes: dict[str, dict]) -> dict | None:
    """The CLIP probe (`pipeline.encoders.clip_probe`) this run's shard tasks compare their model with: the
    store's (the workers warmed up against it already), else, in a new store or one an older version made, the
    first warmed worker's once every other warmed worker agrees with it, recorded in the manifest before any
    shard is embedded. None only where no warm-up ran (`warm_workers` waits for a first worker; the tasks then
    compare nothing)."""
    from pipeline.encoders import probe_mismatch

    if known := manifest["clip"].get("probe"):
        return known
    if not probes:
        return None
    first, *others = sorted(probes)
    for w in others:
        if how := probe_mismatch(probes[w], probes[first], (f"on {w}", f"on {first}")):
            raise UsageError(
                f"dask workers {first} and {w} have other CLIP models: they embed a fixed probe otherwise ({how}); "
                "give every worker the same open_clip version and model config"
            )
    manifest["clip"]["probe"] = {k: v for k, v in probes[first].items() if k != "host"}
    store.write_json(Path(root) / store.MANIFEST, manifest)
    return manifest["clip"]["probe"]


def _tensor_preprocess_supported(cfg: EmbedConfig) -> bool:
    from pipeline.encoders import clip_preprocess_cfg
    from pipeline.image_input import tensor_preprocess_supported

    return tensor_preprocess_supported(clip_preprocess_cfg(cfg.clip, cfg.pretrained))


def _image_decode(cfg: EmbedConfig, device: str) -> str:
    from pipeline.image_input import resolve_image_decode

    return resolve_image_decode(cfg.image_decode, device, cfg.latents, _tensor_preprocess_supported(cfg))


def _map(
    client, todo: list[str], params, cfg: EmbedConfig, run_start: float, manifest: dict
) -> tuple[int, dict, dict]:
    from pipeline.readahead import ReadAhead, new_run, plugin_name

    resources = task_resources(cfg, params.device)
    probes = warm_workers(client, params, resources)  # a worker unlike the store's probe refused here
    params = dataclasses.replace(params, clip_probe=settle_probe(cfg.out, manifest, probes))
    run, name = new_run(), plugin_name(cfg.out)
    try:
        if cfg.read_ahead:  # before the tasks: a worker must see its next task arrive (`pipeline.readahead`)
            client.register_plugin(ReadAhead(run, cfg.out, todo, cfg.read_ahead), name=name)
        return _run_tasks(client, todo, params, cfg, run, run_start, resources)
    finally:
        if cfg.read_ahead:
            try:  # its teardown deletes any copy left (a failed shard's); a closing LocalCluster does too
                client.unregister_worker_plugin(name)
            except Exception as e:  # e.g. the scheduler has gone: nothing more to clean from here
                log.warning("could not remove the read-ahead plugin from the workers: %s", e)


def _run_tasks(
    client, todo: list[str], params, cfg: EmbedConfig, run: str, run_start: float, resources: dict | None
) -> tuple[int, dict, dict]:
    from dask.distributed import as_completed

    from pipeline.embed_shard import PHASES, embed_shard
    from pipeline.readahead import task_keys

    tasks_start = time.perf_counter()
    futures = client.map(
        embed_shard,
        todo,
        key=task_keys(run, len(todo)),
        params=params,
        retries=cfg.retries,
        resources=resources,
    )
    names = {f.key: s for f, s in zip(futures, todo, strict=True)}
    rows, failed = 0, {}
    stats = {
        "task_seconds": 0.0,
        "worker_peak_rss_mb": 0.0,
        "gpu_peak_mb": 0.0,
        "warm_rows": 0,
        "warm_seconds": 0.0,
        "device_decode_fallbacks": 0,
        # the LocalCluster's start (with --scheduler, connecting came earlier) and every worker's warm-up
        "startup_seconds": tasks_start - run_start,
        "phases": dict.fromkeys(PHASES, 0.0),
        "read_ahead": {},  # shards by how their bytes were read ahead (`pipeline.readahead.ReadAhead.take`)
    }

    def take(fut) -> None:
        nonlocal rows
        try:
            res = fut.result()
            if "failed" in res:  # refused by the task itself, not retried (`embed_shard`)
                failed[names[fut.key]] = res["failed"]
                log.error("shard %s failed: %s", names[fut.key], res["failed"])
                return
            rows += res["rows"]
            stats["task_seconds"] += res["seconds"]
            if not res["first_in_process"]:  # a worker's later shards: no one-off costs
                stats["warm_rows"] += res["rows"]
                stats["warm_seconds"] += res["seconds"]
            stats["worker_peak_rss_mb"] = max(stats["worker_peak_rss_mb"], res["worker_peak_rss_mb"])
            stats["gpu_peak_mb"] = max(stats["gpu_peak_mb"], res.get("gpu_peak_mb", 0.0))
            stats["device_decode_fallbacks"] += res.get("device_decode_fallbacks", 0)
            stats["batch_prep"] = res.get("batch_prep")
            how = res.get("read_ahead", "off")
            stats["read_ahead"][how] = stats["read_ahead"].get(how, 0) + 1
            for k, v in res.get("phases", {}).items():
                stats["phases"][k] = stats["phases"].get(k, 0.0) + v
        except UsageError:  # a worker unfit for this run (another CLIP model, no GPU) would fail every shard
            raise  # it took, quickly, and so empty the queue; the run stops, the shards done so far kept
        except Exception as e:  # after dask's retries: list it, keep going with the others
            failed[names[fut.key]] = f"{type(e).__name__}: {e}"
            log.error("shard %s failed: %s", names[fut.key], failed[names[fut.key]])

    with progress.bar(total=len(todo), desc="embed", unit="shard") as bar:
        for fut in as_completed(futures):
            take(fut)
            rate = {"samples_per_s": f"{rows / (time.perf_counter() - tasks_start):.1f}"}
            bar.set_postfix(rate | ({"failed": len(failed)} if failed else {}))
            bar.update(1)
    # A worker that dies (killed by the OOM killer, a crash in native code) fails every task it held, not only
    # the one that killed it: dask counts each of them against its allowed failures, and tasks that ask for a
    # GPU are all handed out at the start, so one bad shard could fail thousands it never ran with. Those go
    # again, one at a time per worker, so that a worker's death now counts only against the shard it ran.
    killed = [s for s in todo if failed.get(s, "").startswith("KilledWorker")]
    if killed:
        log.warning(
            "%d shard(s) failed because a dask worker died while it held them (%s); running each again, one "
            "shard per worker at a time, so that only a shard that kills its worker itself stays failed",
            len(killed),
            ", ".join(store.shard_id_of(s) for s in killed[:5]) + (", ..." if len(killed) > 5 else ""),
        )
        for s in killed:
            del failed[s]
        _one_per_worker(client, killed, params, cfg, resources, f"{run}-again", names, take)
    stats["tasks_seconds"] = time.perf_counter() - tasks_start
    return rows, failed, stats


def _one_per_worker(client, shards: list[str], params, cfg, resources, token: str, names: dict, take) -> None:
    """Run ``shards`` with at most one in flight per worker; each finished task goes to ``take``."""
    from dask.distributed import as_completed

    from pipeline.embed_cluster import able_workers, workers
    from pipeline.embed_shard import embed_shard

    window = max(1, len(able_workers(workers(client), resources)))  # the workers that can take a shard task
    pending, running = list(enumerate(shards)), as_completed()

    def submit() -> None:
        i, s = pending.pop(0)
        fut = client.submit(
            embed_shard, s, params=params, key=f"{token}-{i}", retries=cfg.retries, resources=resources
        )
        names[fut.key] = s
        running.add(fut)

    for _ in range(min(window, len(pending))):
        submit()
    with progress.bar(total=len(shards), desc="embed (again)", unit="shard") as bar:
        for fut in running:
            take(fut)
            bar.update(1)
            if pending:
                submit()


FAILED_SHOWN = 3  # failed shards named in the command's last line; the summary lists them all


def print_report(summary: dict) -> None:
    """The summary as JSON on stdout, as every command without a report of its own prints it, then one line on
    stderr that says how the run ended: after a run with failed shards, the last thing on the terminal had been
    the JSON's closing brace."""
    print(json.dumps(summary, indent=2, default=str))
    failed, done, total = summary["failed"], summary["done"], summary["shards"]
    # the whole run's time, the cluster's start included (the bar's rate is the shard tasks')
    this_run = f"{summary['rows_this_run']} rows this run in {summary['seconds_this_run']} s"
    where = Path(summary["out"]) / "logs" / "embed_summary.json"
    if failed:
        named = "; ".join(f"{store.shard_id_of(s)}: {why}" for s, why in list(failed.items())[:FAILED_SHOWN])
        more = f"; {len(failed) - FAILED_SHOWN} more in {where}" if len(failed) > FAILED_SHOWN else ""
        line = (
            f"embed: {len(failed)} of {total} shards failed, not stored ({named}{more}); {done} done "
            f"({this_run}): rerun the same command to retry the failed ones"
        )
    elif summary["errors"] and not summary["store_rows"]:  # e.g. the images are in a member embed cannot read
        reason = next(iter(summary["errors_by_reason"]), "unknown")
        line = (
            f"embed: {done} of {total} shards done, but every one of their {summary['errors']} rows is an error "
            f"row (commonest reason: {reason}): the store holds nothing to train on; {where}"
        )
    else:
        errors = f", {summary['errors']} error rows" if summary["errors"] else ""
        line = f"embed: {done} of {total} shards done, {summary['rows']} rows{errors} ({this_run}); {where}"
    print(line, file=sys.stderr)


def _rounded(x: float | None) -> float | None:
    return None if x is None else round(x, 2)


def _errors_by_reason(root: str, markers: list[dict]) -> dict[str, int]:
    """The shards' error rows counted by kind of reason, commonest first (their error tables, read only for
    shards that have error rows)."""
    import pyarrow.parquet as pq

    from pipeline.errors import by_kind

    counts: dict[str, int] = {}
    for m in markers:
        if not m.get("errors"):
            continue
        path = store.field_path(root, "errors", m["shard"])
        try:
            reasons = pq.read_table(path, columns=["reason"])["reason"]
        except Exception:  # pyarrow's kinds for a missing or damaged file: the count stays, not the reasons
            reasons = ["(error table unreadable: see `unclip validate`)"] * m["errors"]
        for reason in reasons:
            counts[str(reason)] = counts.get(str(reason), 0) + 1
    return by_kind(counts)


def _finish(
    cfg: EmbedConfig, manifest: dict, shards: list[str], rows: int, seconds: float, failed: dict, stats: dict
) -> dict:
    markers = [
        store.read_done(cfg.out, store.shard_id_of(s))
        for s in shards
        if store.is_done(cfg.out, store.shard_id_of(s))
    ]
    every = [store.read_done(cfg.out, s) for s in store.done_shards(cfg.out)]  # earlier runs' shards too
    manifest["shards"] = [{"shard": m["shard"], "rows": m["rows"], "source": m["source"]} for m in every]
    if store.load_manifest(cfg.out) != manifest:  # a rerun of a finished store modifies no file of the store
        store.write_json(Path(cfg.out) / store.MANIFEST, manifest)
    maes = [m["latent_roundtrip_mae"] for m in markers if m.get("latent_roundtrip_mae") is not None]
    summary = {
        "out": cfg.out,
        "shards": len(shards),
        "done": len(markers),
        "failed": failed,
        "rows": sum(m["rows"] for m in markers),
        "store_rows": sum(m["rows"] for m in every),  # earlier runs' shards too (another --shards pattern)
        "errors": sum(m["errors"] for m in markers),
        "errors_by_reason": _errors_by_reason(cfg.out, markers),
        "truncated_captions": sum(m["truncated_captions"] for m in markers),
        "empty_captions": sum(m.get("empty_captions", 0) for m in markers),
        "captions_not_utf8": sum(m.get("captions_not_utf8", 0) for m in markers),
        "shards_not_cross_checked": sum(not m.get("checked_against_download_record", True) for m in markers),
        "latent_roundtrip_mae": float(np.mean(maes)) if maes else None,
        "rows_this_run": rows,
        "seconds_this_run": round(seconds, 2),
        "samples_per_second": round(rows / seconds, 2) if rows and seconds > 0 else None,
        # Inside the shard tasks (model loaded, dask started): what the embedding itself sustains.
        "samples_per_second_in_tasks": round(rows / stats["task_seconds"], 2)
        if stats.get("task_seconds")
        else None,
        # The same over each worker's later shards only (None when every worker embedded one shard).
        "samples_per_second_in_warm_tasks": round(stats["warm_rows"] / stats["warm_seconds"], 2)
        if stats.get("warm_seconds")
        else None,
        "worker_peak_rss_mb": stats.get("worker_peak_rss_mb"),
        "gpu_peak_mb": stats.get("gpu_peak_mb") or None,
        # --image-decode device, this run: JPEGs its decoder refused or that were incomplete (PIL took them)
        "device_decode_fallbacks": stats.get("device_decode_fallbacks", 0),
        # Where this run's time went: starting the cluster and warming its workers, the shard tasks (from the
        # first submitted to the last finished, every worker at once), closing the cluster; and, summed over
        # the tasks, their phases (`pipeline.embed_shard.PHASES`).
        "startup_seconds": _rounded(stats.get("startup_seconds")),
        "tasks_seconds": _rounded(stats.get("tasks_seconds")),
        "close_seconds": _rounded(stats.get("close_seconds")),
        "samples_per_second_all_tasks": round(rows / stats["tasks_seconds"], 2)
        if rows and stats.get("tasks_seconds")
        else None,
        "task_phase_seconds": {k: round(v, 3) for k, v in stats.get("phases", {}).items()} or None,
        "batch_prep": stats.get("batch_prep"),  # resolved: thread or inline (`--batch-prep`)
        # this run's shards by how their bytes were read ahead: copy, page cache, abandoned, failed, none, off
        "read_ahead": stats.get("read_ahead") or None,
    }
    store.write_json(Path(cfg.out) / "logs" / "embed_summary.json", summary)
    if failed or (summary["errors"] and not summary["store_rows"]):  # the latter: nothing to train on
        summary["exit_code"] = 1
    for path in store.temp_files(cfg.out):
        path.unlink(missing_ok=True)  # temp files left by workers killed mid-write
    return summary
