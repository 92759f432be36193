"""CLIP (open_clip) and VAE (diffusers) loading for the embed stage and for sampling.

Real runs name an open_clip architecture with a pretrained tag or a local checkpoint, and a diffusers
AutoencoderKL by hub name or local folder. Offline (the demo and the tests) ``pretrained="none"`` builds the
architecture with random weights from a fixed seed. ``unclip-tiny`` is a small architecture registered from
``pipeline/clip_configs/`` so that the CPU demo runs in minutes; it is random and says so.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import weakref
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.errors import UsageError

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "clip_configs"
RANDOM = ("none", "random", "")


def resolve_device(device: str) -> str:
    """'auto' -> cuda when visible, else cpu; 'cuda' without a visible device, or 'cuda:N' beyond the visible
    ones, is a UsageError."""
    check_device_name(device)
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device == "cuda" and not count:
        raise UsageError("--device cuda but no CUDA device is visible; valid here: auto, cpu")
    if device.startswith("cuda:") and int(device[5:]) >= count:
        here = f"auto, cpu, cuda, cuda:0..cuda:{count - 1}" if count else "auto, cpu"
        raise UsageError(f"--device {device} but {count} CUDA device(s) are visible; valid here: {here}")
    return device


def check_device_name(device: str) -> None:
    """A UsageError unless ``device`` is auto, cpu, cuda or cuda:N (whether this host has it is not asked)."""
    if device not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:(0|[1-9][0-9]*)", device, re.ASCII):
        raise UsageError(f"unknown --device '{device}'; valid: auto, cpu, cuda, cuda:N")


def _open_clip():
    import open_clip

    if "unclip-tiny" not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_DIR)
    return open_clip


def is_path(pretrained: str) -> bool:
    return os.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors"))


_DIGESTS: dict[
    tuple, str
] = {}  # (path, inode, size, mtime, ctime) -> sha256: a file is hashed once per process


def checkpoint_sha256(pretrained: str) -> str | None:
    """The sha256 of a ``--pretrained`` checkpoint file, None for a tag or random weights. Stores and
    checkpoints record it beside the path: the same path may later hold other weights (a CLIP retrained in
    place), and the same weights another path (a moved folder)."""
    if pretrained.lower() in RANDOM or not is_path(pretrained) or not os.path.isfile(pretrained):
        return None
    return file_sha256(pretrained)


def file_sha256(path: str) -> str:
    """A file's sha256, hashed once per process while the file is unchanged (its inode, size and times)."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key not in _DIGESTS:
        from pipeline.store import sha256_of

        _DIGESTS[key] = sha256_of(path)
    return _DIGESTS[key]


def _check_checkpoint_file(path: str) -> None:
    """A local --pretrained file must read as a checkpoint (safetensors' header, or torch's archive mapped,
    not read: cheap for a GB file); checked here, before the store's manifest names it."""
    if path.endswith((".npz", ".npy")):  # big_vision weights, which open_clip reads with numpy: left to it
        return
    try:
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                f.keys()
        else:
            try:
                torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            except RuntimeError as e:
                if "mmap" not in str(e):  # an old-style (non-zip) file cannot be mapped: read it whole
                    raise
                torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        how = (
            "safetensors"
            if path.endswith(".safetensors")
            else "torch.load(weights_only=True) as open_clip does"
        )
        raise UsageError(
            f"--pretrained {path} cannot be read as a CLIP checkpoint: {how} failed ({type(e).__name__})"
        ) from e


def validate_clip(arch: str, pretrained: str, check_file: bool = True) -> None:
    """Fail early on an unknown architecture, a missing checkpoint file or an unknown pretrained tag."""
    oc = _open_clip()
    if arch not in oc.list_models():
        raise UsageError(f"unknown CLIP architecture '{arch}'; valid: {', '.join(oc.list_models())}")
    if pretrained.lower() in RANDOM:
        return
    if is_path(pretrained):
        if not os.path.isfile(pretrained):
            raise UsageError(f"CLIP checkpoint not found: {pretrained}")
        if check_file:  # the stages' own checks; load_clip (in every worker) reads it anyway
            _check_checkpoint_file(pretrained)
        return
    tags = oc.list_pretrained_tags_by_model(arch)
    if pretrained not in tags:
        raise UsageError(
            f"unknown pretrained tag '{pretrained}' for {arch}; valid: {', '.join(tags) or 'none'} "
            "(or a local checkpoint path, or 'none' for random weights)"
        )


def reachable_or_refuse(what: str, host: str, hint: str, probe_timeout: float) -> None:
    """Weights not in the local cache: a UsageError unless ``host`` answers within ``probe_timeout`` seconds
    (offline, huggingface_hub would retry for about a minute per process)."""
    import socket

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        raise UsageError(f"{what} not cached and HF_HUB_OFFLINE is set; {hint}")
    try:
        socket.create_connection((host, 443), timeout=probe_timeout).close()
    except OSError as e:
        raise UsageError(f"{what} not cached and {host} cannot be reached ({e}); {hint}") from e


def ensure_pretrained(arch: str, pretrained: str, probe_timeout: float = 5.0) -> None:
    """Make a pretrained tag's weights available locally, or fail in one line, fast.

    Cached weights are used as they are. Otherwise the hub's host is probed once (a few seconds) before
    downloading: unreachable, huggingface_hub would retry for about a minute per process. Paths and random
    weights need nothing."""
    if pretrained.lower() in RANDOM or is_path(pretrained):
        return
    from urllib.parse import urlparse

    from open_clip.pretrained import download_pretrained, get_pretrained_cfg

    cfg = get_pretrained_cfg(arch, pretrained)
    hint = "pass a local checkpoint with --pretrained PATH, or --pretrained none for random weights"
    if hub := cfg.get("hf_hub"):
        from huggingface_hub import try_to_load_from_cache

        for filename in ("open_clip_pytorch_model.bin", "open_clip_model.safetensors"):
            if isinstance(try_to_load_from_cache(hub.rstrip("/"), filename), str):
                return
        host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    else:
        host = urlparse(cfg.get("url", "")).hostname
    reachable_or_refuse(f"CLIP weights {arch}/{pretrained} are", host, hint, probe_timeout)
    try:
        download_pretrained(cfg)
    except Exception as e:  # network or hub errors come in many types
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UsageError(f"cannot fetch CLIP weights {arch}/{pretrained}: {first}; {hint}") from e


@dataclass
class Clip:
    model: torch.nn.Module
    preprocess: object  # PIL image -> [3, H, W] tensor
    tokenizer: object
    dim: int
    context_length: int
    text_width: int
    device: torch.device
    # torch.compile'd image tower and text transformer (`compiled`), which encode_image / encode_text then use
    compiled_towers: dict | None = None


def compiled(clip: Clip) -> Clip:
    """``clip`` whose image tower and (causal) text transformer run through ``torch.compile``, with dynamic shapes
    (batch sizes ramp and the last batch of a shard is short; caption lengths vary), so a run compiles each once
    instead of once a shape. The cached model itself is not changed: other users of `load_clip` keep eager mode.
    Compiling happens on the first call (a worker's warm-up), not here."""
    return replace(clip, compiled_towers=_compile_towers(clip.model))


@lru_cache(maxsize=2)
def _compile_towers(model: torch.nn.Module) -> dict:
    text = _text_module(model)
    return {
        "visual": torch.compile(model.visual, dynamic=True),
        "transformer": torch.compile(text.transformer, dynamic=True) if text is not None else None,
    }


@dataclass
class ClipDims:
    dim: int
    context_length: int
    text_width: int


def clip_dims(arch: str) -> ClipDims:
    """Embedding size, context length and text width of an architecture, read from its config."""
    cfg = _open_clip().get_model_config(arch)
    text = cfg.get("text_cfg", {})
    return ClipDims(
        dim=cfg["embed_dim"], context_length=text.get("context_length", 77), text_width=text.get("width", 0)
    )


def load_clip(arch: str, pretrained: str, device: str, seed: int = 0, weights: str = "") -> Clip:
    """The model in eval mode on ``device``; cached per process so that a dask worker loads it once.
    ``weights`` (a checkpoint file's sha256) is part of the cache's key only: a long-lived worker (``--scheduler``)
    loads a file rewritten at the same path again instead of embedding with the weights it read before."""
    return _load_clip(arch, pretrained, device, seed, weights)  # every argument given: one key per model


@lru_cache(maxsize=2)
def _load_clip(arch: str, pretrained: str, device: str, seed: int, weights: str) -> Clip:
    oc = _open_clip()
    validate_clip(arch, pretrained, check_file=False)
    ensure_pretrained(arch, pretrained)
    random_init = pretrained.lower() in RANDOM
    torch.manual_seed(seed)  # random weights are the same in every process for a seed
    model, _, preprocess = oc.create_model_and_transforms(
        arch, pretrained=None if random_init else pretrained
    )
    if random_init:
        log.warning(
            "CLIP %s has RANDOM weights (seed %d): fine for the demo and tests, not for real data", arch, seed
        )
    model = model.to(device).eval()
    text = model if hasattr(model, "token_embedding") else getattr(model, "text", model)
    dims = clip_dims(arch)
    return Clip(
        model=model,
        preprocess=preprocess,
        tokenizer=oc.get_tokenizer(arch),
        dim=dims.dim,
        context_length=dims.context_length,
        text_width=dims.text_width or getattr(text, "width", 0),
        device=torch.device(device),
    )


def _text_module(model: torch.nn.Module) -> torch.nn.Module | None:
    """The module holding the text tower's parts, if it is the causal kind that may be trimmed."""
    text = model if hasattr(model, "token_embedding") else getattr(model, "text", None)
    needed = ("token_embedding", "positional_embedding", "transformer", "ln_final", "attn_mask")
    if (
        text is None
        or not all(hasattr(text, n) for n in needed)
        or getattr(text, "cls_emb", None) is not None
    ):
        return None
    if text.attn_mask is None or getattr(text, "text_pool_type", getattr(text, "pool_type", "")) not in (
        "argmax",
        "eos",
    ):
        return None
    return text


def token_lengths(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Tokens up to and including the end-of-text token, per caption. [B] int64."""
    text = _text_module(model)
    pool = (
        getattr(text, "text_pool_type", getattr(text, "pool_type", "argmax"))
        if text is not None
        else "argmax"
    )
    if pool == "eos":
        eos = getattr(text, "text_eos_id", getattr(text, "eos_id", None))
        return (tokens == eos).int().argmax(dim=-1) + 1
    return tokens.argmax(dim=-1) + 1


@torch.no_grad()
def encode_text(clip: Clip, tokens: torch.Tensor, with_tokens: bool = False):
    """CLIP text embeddings [B, D] (unnormalised), and optionally per-token encodings [B, L, W] with lengths.

    The text tower is causal and pools at the end-of-text token, so positions after the longest caption's
    end-of-text token cannot change any output: the batch runs on ``tokens[:, :L]`` only, which gives the
    same embeddings as the full 77-token context at a fraction of the cost for short captions.
    """
    if _text_module(clip.model) is None:
        if with_tokens:
            raise UsageError(
                "--text-encodings needs a causal text tower (open_clip CLIP with argmax/eos pooling)"
            )
        return clip.model.encode_text(tokens.to(clip.device, non_blocking=True)), None, None
    transformer = (clip.compiled_towers or {}).get("transformer")
    return trimmed_text_forward(clip.model, tokens, with_tokens, transformer)


def trimmed_text_forward(
    model: torch.nn.Module, tokens: torch.Tensor, with_tokens: bool = False, transformer=None
):
    """`encode_text`'s forward on a causal text tower, differentiable (the demo CLIP trains through it);
    ``transformer``, if given, stands in for the tower's own (its compiled form).

    ``tokens`` may be on the host while the model is on a GPU (the embed stage's are): the trimmed length is
    then read without waiting for the GPU, so the text tower is queued behind the image tower instead of
    after it has finished."""
    text = _text_module(model)
    n = int(token_lengths(model, tokens).max())  # a device sync only if the tokens are on a GPU
    # the whole (pinned, contiguous) tensor is copied and trimmed there: a pageable or strided copy may sync
    tokens = tokens.to(text.token_embedding.weight.device, non_blocking=True)[:, :n]  # [B, n]
    lengths = token_lengths(model, tokens)  # the same: each end-of-text token lies within the first n
    cast = text.transformer.get_cast_dtype() if hasattr(text.transformer, "get_cast_dtype") else torch.float32
    x = text.token_embedding(tokens).to(cast)  # [B, n, W]
    x = x + text.positional_embedding[:n].to(cast)
    run = transformer if transformer is not None else text.transformer
    x = run(x, attn_mask=text.attn_mask[:n, :n])
    x = text.ln_final(x)  # [B, n, W]
    pooled = x[torch.arange(x.shape[0], device=x.device), lengths - 1]  # [B, W] at end-of-text
    proj = text.text_projection
    if proj is not None:
        pooled = proj(pooled) if isinstance(proj, torch.nn.Linear) else pooled @ proj
    return pooled, (x if with_tokens else None), lengths


@torch.no_grad()
def encode_image(clip: Clip, images: torch.Tensor) -> torch.Tensor:
    if clip.compiled_towers:  # open_clip's encode_image (unnormalised) is its visual tower's forward
        return clip.compiled_towers["visual"](images)
    return clip.model.encode_image(images)


def normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1)


# ---------------------------------------------------------------- probe
# What a model of a store embeds a fixed synthetic image and caption as: the same arch, weights and
# settings can still give another model under another open_clip (random weights drawn in another order, a
# changed config or activation), and a store whose shards two such models embedded mixes two embedding spaces
# that no check of names or files notices. The probe is recorded in the manifest (``clip.probe``) and every
# model that embeds into the store is compared with it. One model on two devices or precisions agrees far
# beyond PROBE_MIN_COSINE (measured on random ViT-B-32 and ViT-L-14: fp16 and bf16 autocast against fp32,
# cosine >= 0.99992); random weights of two seeds give |cosine| < 0.1.
PROBE_INPUT = 2  # the version of the probe's inputs below: probes of other inputs are not compared
PROBE_CAPTION = "a probe of a CLIP model's weights"
PROBE_MIN_COSINE = 0.999
_probes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {(device, preprocess): probe}


def clip_probe(clip: Clip) -> dict:
    """``clip``'s probe (cached per model and device): its unit image and text embeddings of the fixed inputs,
    as float16 bytes in base64, with the versions of the code that computed them (to name in a mismatch)."""
    done = _probes.setdefault(clip.model, {})
    key = (str(clip.device), id(clip.preprocess))
    if key not in done:
        from PIL import Image

        # 320 x 240 colour ramps, through the model's own preprocessing (resize, crop, mean and std are the
        # model's as much as its weights are: another open_clip's config for a tag changes them too)
        x, y = np.meshgrid(np.linspace(0, 1, 320), np.linspace(0, 1, 240))
        rgb = np.stack([x, y, (x * y) ** 0.5], axis=-1)
        image = clip.preprocess(Image.fromarray((rgb * 255).round().astype(np.uint8), "RGB"))
        cuda = clip.device.type == "cuda"
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16, enabled=cuda):
            img = clip.model.encode_image(image[None].to(clip.device))
            txt = clip.model.encode_text(clip.tokenizer([PROBE_CAPTION]).to(clip.device))
        done[key] = {
            "input": PROBE_INPUT,
            "image": _b64(normalize(img)[0]),
            "text": _b64(normalize(txt)[0]),
            "open_clip": _version("open_clip_torch"),
            "torch": torch.__version__,
            "device": clip.device.type,
        }
    return dict(done[key])


def _b64(x: torch.Tensor) -> str:
    return base64.b64encode(x.detach().half().cpu().numpy().astype("<f2").tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(base64.b64decode(s), dtype="<f2").astype(np.float32))


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def probe_cosines(a: dict, b: dict) -> dict[str, float]:
    """The cosine of two probes' embeddings, by tower ("image", "text"); NaN for embeddings of other widths."""
    cos = {}
    for tower in ("image", "text"):
        x, y = _unb64(a[tower]), _unb64(b[tower])
        cos[tower] = float(F.cosine_similarity(x, y, dim=0)) if x.shape == y.shape else float("nan")
    return cos


def probe_mismatch(mine: dict, theirs: dict, labels: tuple[str, str] = ("here", "the store's")) -> str | None:
    """None when two probes are of one model (or of other inputs, which cannot be compared); else the
    cosines and the versions that computed each (named by ``labels``) that say how they differ, for a message."""
    if mine.get("input") != theirs.get("input"):
        return None
    cos = probe_cosines(mine, theirs)
    if all(c >= PROBE_MIN_COSINE for c in cos.values()):  # NaN (other widths) fails too
        return None
    versions = "; ".join(
        f"open_clip {p.get('open_clip')} and torch {p.get('torch')} {label}"
        for p, label in zip((mine, theirs), labels, strict=True)
    )
    return f"image cosine {cos['image']:.4f}, text {cos['text']:.4f}, where one model gives >= {PROBE_MIN_COSINE}; {versions}"


# ---------------------------------------------------------------- VAE


@dataclass
class Vae:
    model: torch.nn.Module
    scale: float  # diffusers' scaling_factor: latents are stored as mean * scale
    downsample: int
    channels: int
    device: torch.device


# owner/name, as the Hugging Face hub spells a model
HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def validate_vae(name_or_path: str, probe_timeout: float = 5.0) -> None:
    """``--vae``: a local folder, or a hub name (``stabilityai/sd-vae-ft-mse``) that is cached or whose host
    answers (fast, in one line: unreachable, huggingface_hub would retry for about a minute per process)."""
    if not name_or_path:
        raise UsageError("--latents vae needs --vae NAME_OR_PATH (a diffusers AutoencoderKL)")
    if os.path.isdir(name_or_path):
        missing = "config.json" if not os.path.isfile(os.path.join(name_or_path, "config.json")) else None
        if missing is None and len(vae_files(name_or_path)) < 2:
            missing = f"weights ({' or '.join(n for n in VAE_WEIGHTS if 'index' not in n)})"
        if missing:
            raise UsageError(
                f"--vae {name_or_path} holds no {missing}: not a diffusers AutoencoderKL folder (one that "
                "AutoencoderKL.save_pretrained wrote), or a hub name such as stabilityai/sd-vae-ft-mse"
            )
        return
    if not HUB_NAME.fullmatch(name_or_path):
        raise UsageError(
            f"VAE folder not found: {name_or_path} (--vae is a diffusers AutoencoderKL folder or a hub name such "
            "as stabilityai/sd-vae-ft-mse)"
        )
    from urllib.parse import urlparse

    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name_or_path, "config.json"), str):
        return
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    reachable_or_refuse(f"VAE {name_or_path} is", host, "pass a local folder with --vae PATH", probe_timeout)


def vae_folder(name_or_path: str) -> str | None:
    """The folder diffusers loads ``--vae`` from: the folder itself, or a hub name's cached snapshot; None when
    neither is on this machine (a hub name not downloaded yet)."""
    if os.path.isdir(name_or_path):
        return name_or_path
    if name_or_path and HUB_NAME.fullmatch(name_or_path):
        from huggingface_hub import try_to_load_from_cache

        config = try_to_load_from_cache(name_or_path, "config.json")
        if isinstance(config, str):
            return os.path.dirname(config)
    return None


# the weights diffusers (0.42) loads a model folder from, in its order of preference: a sharded safetensors
# checkpoint's index, the single safetensors file, then torch's pickle
VAE_WEIGHTS = (
    "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.bin",
)


def vae_files(folder: str) -> list[str]:
    """The files of ``folder`` diffusers builds the VAE from: ``config.json`` and the weights it prefers (a
    sharded checkpoint's index and the shards it names); not the other copies a hub snapshot may hold. Only
    ``config.json`` when the folder holds no weights."""
    for name in VAE_WEIGHTS:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            shards = []
            if name.endswith(".index.json"):
                try:
                    with open(path) as f:
                        shards = sorted(set(json.load(f)["weight_map"].values()))
                except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                    raise UsageError(f"the VAE's {path} is damaged ({type(e).__name__}: {e})") from e
            return ["config.json", name, *shards]
    return ["config.json"]


def fetch_vae(name: str) -> str:
    """A hub name's config and weights into the local hub cache, as diffusers fetches them; the snapshot folder.
    Refused in one line when the hub is unreachable (`validate_vae`) or the download fails."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    validate_vae(name)
    try:
        config = hf_hub_download(name, "config.json")
        # diffusers' order: a sharded checkpoint's index (then each shard it names), else the single files
        for weights in VAE_WEIGHTS:
            try:
                got = hf_hub_download(name, weights)
            except EntryNotFoundError:
                continue
            if weights.endswith(".index.json"):
                for shard in vae_files(os.path.dirname(got))[2:]:
                    hf_hub_download(name, shard)
            break
    except Exception as e:
        # a mistyped or gated name, a server error, a timeout: huggingface_hub's and httpx's own exceptions
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UsageError(f"VAE {name}: fetching it from the hub failed ({type(e).__name__}: {first})") from e
    return os.path.dirname(config)


def vae_sha256(name_or_path: str, fetch: bool = False) -> str | None:
    """The VAE's content: one sha256 over the name and sha256 of each file it is built from (`vae_files`).
    Stores record it beside ``--vae``: a folder may later hold another VAE (one fine-tuned and saved over it),
    and the same VAE may move, or be a hub name's cached copy. None when the folder or its weights are not here
    (a download cut short leaves a cached config alone), unless ``fetch``: then a hub name is fetched first
    (`fetch_vae`)."""
    folder = vae_folder(name_or_path)
    hub = bool(name_or_path) and not os.path.isdir(name_or_path) and HUB_NAME.fullmatch(name_or_path)
    if fetch and hub and (folder is None or len(vae_files(folder)) == 1):
        folder = fetch_vae(name_or_path)
    if folder is None:
        return None
    files = [n for n in vae_files(folder) if os.path.isfile(os.path.join(folder, n))]
    if len(files) < 2:
        return None
    h = hashlib.sha256()
    for n in files:
        h.update(f"{n}\0{file_sha256(os.path.join(folder, n))}\n".encode())
    return h.hexdigest()


def load_vae(name_or_path: str, device: str, weights: str = "") -> Vae:
    """The VAE in eval mode on ``device``; cached per process. ``weights`` (its `vae_sha256`) is part of the
    cache's key only, so that a long-lived worker loads a folder rewritten in place again."""
    return _load_vae(name_or_path, device, weights)  # every argument given: one key per model


@lru_cache(maxsize=2)
def _load_vae(name_or_path: str, device: str, weights: str) -> Vae:
    from diffusers import AutoencoderKL
    from diffusers.utils import is_accelerate_available

    validate_vae(name_or_path)
    # diffusers' default (low_cpu_mem_usage) needs accelerate, which this project does not install; without
    # it diffusers falls back to the plain load anyway, after a five-line warning in every command's output
    lean = is_accelerate_available()
    vae = AutoencoderKL.from_pretrained(name_or_path, low_cpu_mem_usage=lean).to(device).eval()
    c = vae.config
    return Vae(
        model=vae,
        scale=float(c.scaling_factor),
        downsample=2 ** (len(c.block_out_channels) - 1),
        channels=int(c.latent_channels),
        device=torch.device(device),
    )


@torch.no_grad()
def vae_encode(vae: Vae, images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [-1, 1] -> latents [B, C, H/f, W/f]: the posterior mean (deterministic) times scale."""
    return vae.model.encode(images.to(vae.device, non_blocking=True)).latent_dist.mean * vae.scale


@torch.no_grad()
def vae_decode(vae: Vae, latents: torch.Tensor) -> torch.Tensor:
    return vae.model.decode(latents.to(vae.device) / vae.scale).sample


def clip_preprocess_cfg(arch: str, pretrained: str = "none") -> dict:
    """open_clip's image preprocessing for an architecture and weights tag, without building the model:
    its defaults, then the architecture's config, then the tag's (as open_clip's factory merges them)."""
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    oc = _open_clip()
    arch_cfg = oc.get_model_config(arch) or {}
    cfg = merge_preprocess_dict(asdict(PreprocessCfg()), arch_cfg.get("preprocess_cfg", {}))
    if pretrained.lower() not in RANDOM and not is_path(pretrained):
        cfg = merge_preprocess_dict(cfg, oc.get_pretrained_cfg(arch, pretrained) or {})
    cfg["size"] = arch_cfg.get("vision_cfg", {}).get("image_size", cfg["size"])
    return cfg


load_clip.cache_clear = _load_clip.cache_clear  # type: ignore[attr-defined]  # (the demo CLIP is trained in place)
load_vae.cache_clear = _load_vae.cache_clear  # type: ignore[attr-defined]
