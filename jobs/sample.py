"""`unclip sample`: text -> image through CLIP's text tower, the prior and the decoder.

Reads a prior and a decoder checkpoint (EMA weights) and the CLIP model recorded in their checkpoints (the
training store's); writes ``--out`` (a PNG grid, one row per prompt, the prompt under each image) and a JSON
beside it with every setting, the seed and both checkpoints' steps.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from jobs import checkpoint
from jobs.render import latents_to_images, save_grid, vae_source
from models.samplers import steps_taken
from pipeline import progress, store
from pipeline.errors import UsageError
from pipeline.store import check_out_file, is_report

log = logging.getLogger(__name__)


@dataclass
class SampleConfig:
    prior: str  # training --out folder, ckpt/ folder or step_* folder of a prior
    decoder: str  # the same for a decoder
    prompt: list[str] = field(default_factory=list)  # one or more prompts
    prompts: str = ""  # a text file, one prompt per line (added to --prompt)
    n: int = 4  # images per prompt
    sampler: str = "dpm++"  # ddim or dpm++, for both models
    prior_steps: int = 25  # sampler steps of the prior
    decoder_steps: int = 25  # sampler steps of the decoder (and of --base)
    prior_guidance: float | None = None  # classifier-free guidance scale; default: the checkpoint's
    decoder_guidance: float | None = None  # the same for the decoder (and --base)
    seed: int = 0  # seeds every draw: the same seed and settings give the same grid
    batch_size: int = 64  # images sampled at once (the prior samples this x --prior-candidates embeddings)
    out: str = "samples.png"  # the PNG grid; its settings go to the .json beside it
    device: str = "auto"  # auto (cuda if visible, else cpu), cuda, cuda:N or cpu
    # A two-stage decoder's first stage: a low-resolution decoder (`train-decoder --resolution`) draws the
    # picture, and --decoder redraws it upsampled, image to image, over the last --strength of its steps.
    base: str = ""
    # with --base: the share of --decoder's steps that redraw its picture, (0, 1]; unset = 0.5
    strength: float | None = None
    # Of this many prior draws per image the one nearest (cosine) the prompt's text embedding is kept: DALL-E 2's
    # choice (n = 2, as DALLE2-pytorch's `num_samples_per_batch`); 1 = the first draw.
    prior_candidates: int = 2
    # the CLIP checkpoint file the training store was embedded with, where it lies now (default: where the
    # store recorded it); checked against the sha256 the store recorded
    clip_pretrained: str = ""
    # the VAE folder a vae-latent store was embedded with, where it lies now (default: where the store recorded
    # it); checked against the sha256 the store recorded
    vae: str = ""


@dataclass
class Models:
    """A prior and a decoder (EMA weights, eval mode), the CLIP they were trained with, and their metadata."""

    prior: torch.nn.Module
    decoder: torch.nn.Module
    clip: object
    prior_meta: dict
    decoder_meta: dict
    device: str
    base: torch.nn.Module | None = None  # a two-stage decoder's first stage
    base_meta: dict | None = None


def same_clip(a: dict, b: dict) -> bool:
    """Whether two checkpoints (their metadata) were trained with one CLIP: a checkpoint file by its content
    where both stores recorded its sha256 (the same file at two paths is one CLIP), else by its path or tag;
    and where both stores recorded a probe (`pipeline.encoders.clip_probe`), by what the model embeds too (one
    name under two open_clip versions or configs can be two models)."""
    from pipeline.encoders import probe_mismatch

    x, y = a["store"]["clip"], b["store"]["clip"]
    if (x["arch"], x["dim"], x.get("random_init")) != (y["arch"], y["dim"], y.get("random_init")):
        return False
    if x.get("probe") and y.get("probe") and probe_mismatch(x["probe"], y["probe"]):
        return False
    if x["random_init"]:
        return x.get("seed", 0) == y.get("seed", 0)
    if x.get("sha256") and y.get("sha256"):
        return x["sha256"] == y["sha256"]
    return x["pretrained"] == y["pretrained"]


def checkpoint_clip(meta: dict, device: str, pretrained: str = ""):
    """The CLIP a checkpoint was trained with, loaded on ``device`` from `clip_source`."""
    from pipeline.encoders import checkpoint_sha256, clip_probe, load_clip, probe_mismatch

    c = meta["store"]["clip"]
    path = clip_source(meta, pretrained)
    seed = c.get("seed", 0) if c["random_init"] else 0
    clip = load_clip(c["arch"], path, device, seed, weights=checkpoint_sha256(path) or "")
    if c.get("probe") and (how := probe_mismatch(clip_probe(clip), c["probe"], ("here", "for the store"))):
        raise UsageError(  # prompts would be embedded by another model than the one these models learnt from
            f"CLIP {c['arch']} ({path}) here is not the model these checkpoints were trained with: it embeds a "
            f"fixed probe otherwise ({how}); use the open_clip version and model config the store was made with"
        )
    return clip


def clip_source(meta: dict, pretrained: str = "") -> str:
    """Where the CLIP a checkpoint was trained with is loaded from: the training store's ``--pretrained``, or
    ``pretrained`` (``--clip-pretrained``: that checkpoint file, moved). A file is checked against the sha256
    the store recorded: other weights at that path (a CLIP retrained in place) would turn every prompt into an
    embedding the models never saw, and sample noise without a word. A UsageError says what to do."""
    from pipeline.encoders import checkpoint_sha256, is_path

    c = meta["store"]["clip"]
    if c["random_init"]:
        return c["pretrained"]  # random weights: the seed is the identity
    path, want = pretrained or c["pretrained"], c.get("sha256")
    if is_path(path):
        digest = f" (sha256 {want[:12]}...)" if want else ""
        if not os.path.isfile(path):
            raise UsageError(
                f"the CLIP checkpoint these models were trained with is not at {path}; put that file{digest} "
                "back there, or pass its new path with --clip-pretrained"
            )
        got = checkpoint_sha256(path)
        if want and got != want:
            raise UsageError(
                f"the CLIP checkpoint {path} (sha256 {got[:12]}...) is not the one these models were trained "
                f"with{digest}; pass that file with --clip-pretrained"
            )
        if pretrained and not want and os.path.abspath(pretrained) != os.path.abspath(c["pretrained"]):
            log.warning(
                "--clip-pretrained %s: the store recorded no sha256 of its CLIP checkpoint (%s) to check it by",
                pretrained,
                c["pretrained"],
            )
    elif pretrained and pretrained != c["pretrained"]:
        raise UsageError(
            f"--clip-pretrained {pretrained}: these models were trained with CLIP {c['arch']} "
            f"({c['pretrained']}); give a checkpoint file of those weights, or leave the flag out"
        )
    return path


def clip_name(meta: dict) -> str:
    """The CLIP a checkpoint was trained on, for messages: `ViT-B-32 (laion2b_s34b_b79k, 512-d)`."""
    c = meta["store"]["clip"]
    digest = f", sha256 {c['sha256'][:12]}..." if c.get("sha256") else ""
    if probe := c.get("probe"):  # what tells one name under two open_clip versions apart
        tag = hashlib.sha256(f"{probe.get('image')}{probe.get('text')}".encode()).hexdigest()[:8]
        digest += f", open_clip {probe.get('open_clip')}, probe {tag}"
    return f"{c['arch']} ({c.get('pretrained', 'none')}{digest}, {c['dim']}-d)"


def _ema_model(folder: Path, meta: dict, device: str) -> torch.nn.Module:
    """A checkpoint's network with its EMA weights, in eval mode."""
    model = checkpoint.build_model(folder, meta).to(device).eval()
    checkpoint.load_weights(model, folder / "ema.safetensors")
    return model


def load_decoder(path: str, device: str, flag: str = "--decoder") -> tuple[torch.nn.Module, dict]:
    """A decoder checkpoint's EMA weights, in eval mode, and its metadata."""
    folder, meta = checkpoint.open_task(path, "decoder", flag)
    return _ema_model(folder, meta, device), meta


DEFAULT_STRENGTH = 0.5


def check_strength(strength: float | None, base: str) -> None:
    """--strength is --base's: given without it, it would change nothing."""
    if strength is None:
        return
    if not base:
        raise UsageError(
            "--strength is the share of the decoder's steps that redraw --base's picture; pass --base DIR with "
            "it, or leave it out"
        )
    if not 0.0 < strength <= 1.0:
        raise UsageError(f"--strength must be in (0, 1] (the share of the decoder's steps), got {strength}")


def check_guidance(cfg) -> None:
    """Classifier-free guidance scales: >= 0 (0 = unconditional, 1 = none, None = the checkpoint's)."""
    for name in ("prior_guidance", "decoder_guidance", "guidance_scale"):
        v = getattr(cfg, name, None)
        if v is not None and not (v >= 0 and math.isfinite(v)):
            raise UsageError(f"--{name.replace('_', '-')} must be >= 0 (1 = no guidance), got {v}")


def attach_base(m: Models, base: str) -> Models:
    """`m` with the first stage of a two-stage decoder, checked to fit the decoder: the same CLIP and latent
    codec, and a latent side that divides the decoder's."""
    if not base:
        return m
    b, bm = load_decoder(base, m.device, "--base")
    if not same_clip(bm, m.decoder_meta):
        raise UsageError(
            f"--base was trained on CLIP {clip_name(bm)} embeddings and --decoder on "
            f"{clip_name(m.decoder_meta)}; train both on the same store"
        )
    lo, hi = b.cfg, m.decoder.cfg
    codec_b, codec_d = bm["store"]["latents"], m.decoder_meta["store"]["latents"]
    if codec_b.get("sha256") and codec_d.get("sha256") and codec_b["sha256"] != codec_d["sha256"]:
        raise UsageError(
            f"--base was trained on latents of the VAE with sha256 {codec_b['sha256'][:12]}... and --decoder on "
            f"another one's ({codec_d['sha256'][:12]}...); train both on the same store"
        )
    codec_b, codec_d = ({k: v for k, v in c.items() if k != "sha256"} for c in (codec_b, codec_d))
    if codec_b != codec_d or lo.latent_channels != hi.latent_channels or hi.latent_size % lo.latent_size:
        raise UsageError(
            f"--base makes {lo.latent_channels}x{lo.latent_size}x{lo.latent_size} {codec_b['codec']} latents, "
            f"which do not upsample to --decoder's {hi.latent_channels}x{hi.latent_size}x{hi.latent_size} "
            f"{codec_d['codec']} latents; train the base on the decoder's store with --resolution"
        )
    m.base, m.base_meta = b, bm
    return m


def check_vae(m: Models, vae: str) -> None:
    """The decoder's VAE (a vae-latent store's) is there and the one it was trained on, before any sampling
    (`jobs.render.vae_source`); ``--vae`` with a decoder of another codec is refused."""
    codec = m.decoder_meta["store"]["latents"]
    if codec["codec"] == "vae":
        vae_source(codec, vae)
    elif vae:
        raise UsageError(
            f"--vae {vae}: the decoder was trained on '{codec['codec']}' latents, which need no VAE"
        )


def check_before_loading(prior: str, decoder: str, base: str, prior_steps: int, decoder_steps: int) -> None:
    """What the checkpoints' metadata alone can refuse, before any network or CLIP is built (those loads log
    lines that a refusal would follow, and take seconds): a checkpoint of another task, and ``--prior-steps`` /
    ``--decoder-steps`` beyond a network's training schedule (`models.samplers.check_steps`), refused here, not
    as NaN images or a traceback."""
    from models.samplers import check_steps as within

    named = [("--prior-steps", prior_steps, prior, "prior", "--prior")] if prior else []
    named.append(("--decoder-steps", decoder_steps, decoder, "decoder", "--decoder"))
    if base:
        named.append(("--decoder-steps", decoder_steps, base, "decoder", "--base"))
    for steps_flag, steps, path, task, flag in named:
        _, meta = checkpoint.open_task(path, task, flag)
        try:  # the schedule the network is built with (its configs' default: 1000)
            within(steps, int((meta.get("model") or {}).get("timesteps", 1000)), steps_flag)
        except ValueError as e:
            raise UsageError(str(e)) from None


@torch.no_grad()
def decode(
    m: Models, emb: torch.Tensor, cfg: SampleConfig, gen: torch.Generator, on_step=None
) -> torch.Tensor:
    """Latents [B, C, H, W] for image embeddings [B, D]: the decoder alone, or the base's picture upsampled
    (bilinear) and redrawn by the decoder over the last `cfg.strength` of its steps. `on_step` is called after
    each network step (`decode_steps` of them)."""
    kw = dict(
        steps=cfg.decoder_steps,
        sampler=cfg.sampler,
        guidance_scale=cfg.decoder_guidance,
        generator=gen,
        on_step=on_step,
    )
    if m.base is None:
        return m.decoder.sample(emb, **kw)
    return two_stage(m.base, m.decoder, emb, _strength(cfg), **kw)


def _strength(cfg: SampleConfig) -> float:
    return DEFAULT_STRENGTH if cfg.strength is None else cfg.strength


def decode_steps(m: Models, cfg: SampleConfig) -> int:
    """The network steps `decode` takes for a batch: the decoder's, or the base's and the decoder's share."""
    if m.base is None:
        return cfg.decoder_steps
    return cfg.decoder_steps + steps_taken(cfg.decoder_steps, _strength(cfg))


def text_to_image_steps(m: Models, cfg: SampleConfig, images: int) -> int:
    """The network steps `text_to_image` takes for ``images`` pictures (a progress bar's total)."""
    return math.ceil(images / cfg.batch_size) * (cfg.prior_steps + decode_steps(m, cfg))


def two_stage(base, decoder, emb: torch.Tensor, strength: float, **kw) -> torch.Tensor:
    """The base's latents for `emb` [B, D], upsampled (bilinear) to the decoder's size and redrawn by the decoder
    over the last `strength` of its steps. `kw`: steps, sampler, guidance_scale, generator for both stages."""
    low = base.sample(emb, **kw)  # [B, C, h, w]
    size = decoder.cfg.latent_size
    init = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    return decoder.sample(emb, init=init, strength=strength, **kw)


def load_models(prior: str, decoder: str, device: str, clip_pretrained: str = "") -> Models:
    """Both checkpoints, checked to share one CLIP model, and that CLIP (`checkpoint_clip`)."""
    pf, pm = checkpoint.open_task(prior, "prior")
    df, dm = checkpoint.open_task(decoder, "decoder")
    if not same_clip(pm, dm):
        raise UsageError(
            f"the prior was trained on CLIP {clip_name(pm)} embeddings and the decoder on {clip_name(dm)}; "
            "train both on stores embedded with the same CLIP"
        )
    p, d = _ema_model(pf, pm, device), _ema_model(df, dm, device)
    # checked against whichever store recorded the file's digest (`same_clip` compared them by path otherwise)
    clip = checkpoint_clip(pm if pm["store"]["clip"].get("sha256") else dm, device, clip_pretrained)
    if clip.dim != pm["store"]["clip"]["dim"]:
        raise UsageError(
            f"CLIP {pm['store']['clip']['arch']} gives {clip.dim}-d embeddings but the checkpoints were trained on "
            f"{pm['store']['clip']['dim']}-d ones; the store's manifest names another CLIP than it was made with"
        )
    return Models(p, d, clip, pm, dm, device)


@torch.no_grad()
def text_conditions(clip, prompts: list[str], with_tokens: bool) -> tuple:
    """(text_emb [B, D] L2-normalised, text_enc [B, L, W] or None, mask [B, L] or None), as the store has them."""
    from pipeline.encoders import encode_text, normalize

    tokens = clip.tokenizer(prompts).to(clip.device)
    emb, enc, lengths = encode_text(clip, tokens, with_tokens=with_tokens)
    if not with_tokens:
        return normalize(emb), None, None
    mask = torch.arange(enc.shape[1], device=enc.device)[None, :] < lengths[:, None]  # [B, L]
    return normalize(emb), enc.float(), mask


@torch.no_grad()
def prior_embeddings(
    m: Models, prompts: list[str], cfg: SampleConfig, gen: torch.Generator, on_step=None
) -> torch.Tensor:
    """Image embeddings [B, D] from the prior for `prompts`: of `cfg.prior_candidates` draws per prompt, the one
    with the highest cosine to the prompt's text embedding."""
    k = cfg.prior_candidates
    txt, enc, mask = text_conditions(m.clip, prompts, bool(m.prior_meta["config"].get("text_encodings")))

    def rep(t: torch.Tensor | None) -> torch.Tensor | None:  # each prompt's rows k times, in a row
        return t if t is None or k == 1 else t.repeat_interleave(k, 0)

    emb = m.prior.sample(
        rep(txt),
        rep(enc),
        rep(mask),
        steps=cfg.prior_steps,
        guidance_scale=cfg.prior_guidance,
        sampler=cfg.sampler,
        generator=gen,
        on_step=on_step,
    )
    if k == 1:
        return emb
    emb = emb.view(len(prompts), k, -1)  # [B, K, D]
    best = torch.einsum("bkd,bd->bk", F.normalize(emb.float(), dim=-1), txt.float()).argmax(1)  # [B]
    return emb[torch.arange(len(prompts), device=emb.device), best]


@torch.no_grad()
def text_to_image(
    m: Models, prompts: list[str], cfg: SampleConfig, gen: torch.Generator, on_step=None
) -> tuple:
    """(uint8 images [B, H, W, 3], image embeddings [B, D]) for `prompts` (one image each), batched; `on_step`
    is called after each network step (`text_to_image_steps` of them)."""
    images, embs = [], []
    for s in range(0, len(prompts), cfg.batch_size):
        emb = prior_embeddings(m, prompts[s : s + cfg.batch_size], cfg, gen, on_step)
        lat = decode(m, emb, cfg, gen, on_step)
        images.append(latents_to_images(lat, m.decoder_meta["store"]["latents"], m.device, cfg.vae))
        embs.append(emb.cpu())
    return np.concatenate(images), torch.cat(embs)


def _prompts(cfg: SampleConfig) -> list[str]:
    blank = [i for i, p in enumerate(cfg.prompt, 1) if not p.strip()]
    # an empty caption is a real condition to CLIP, not "no condition": likely an unset shell variable
    if blank:
        raise UsageError(
            f"--prompt {blank[0]} of {len(cfg.prompt)} is empty: give the text to draw (blank lines in --prompts "
            "files are skipped)"
        )
    prompts = list(cfg.prompt)
    if cfg.prompts:
        try:
            prompts += [line.strip() for line in Path(cfg.prompts).read_text().splitlines() if line.strip()]
        except OSError as e:
            raise UsageError(f"cannot read --prompts {cfg.prompts}: {e.strerror}") from e
        except UnicodeDecodeError as e:
            raise UsageError(
                f"--prompts {cfg.prompts} is not UTF-8 text (byte {e.start}): one prompt a line"
            ) from e
    if not prompts:
        raise UsageError("no prompt: give --prompt TEXT [TEXT ...] or --prompts FILE (one per line)")
    return prompts


def validate(cfg: SampleConfig) -> list[str]:
    from models.samplers import SAMPLERS

    if cfg.sampler not in SAMPLERS:
        raise UsageError(f"unknown --sampler '{cfg.sampler}'; valid: {', '.join(SAMPLERS)}")
    for name in ("n", "prior_steps", "decoder_steps", "batch_size", "prior_candidates"):
        if getattr(cfg, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    check_strength(cfg.strength, cfg.base)
    if cfg.base and cfg.strength is None:
        cfg.strength = DEFAULT_STRENGTH  # as its settings record it
    check_guidance(cfg)
    if not cfg.out.lower().endswith(".png"):
        raise UsageError(f"--out {cfg.out} must name a .png file")
    settings = Path(cfg.out).with_suffix(".json")
    check_out_file(
        cfg.out,
        ours=lambda _: is_sample_report(settings),
        what=f"an earlier grid of ours (no {settings.name} of ours beside it)",
    )
    check_out_file(
        settings, f"--out {cfg.out}'s settings file", is_sample_report, "one `unclip sample` wrote"
    )
    return _prompts(cfg)


def run(cfg: SampleConfig) -> dict:
    from pipeline.encoders import resolve_device

    prompts = validate(cfg)
    check_before_loading(cfg.prior, cfg.decoder, cfg.base, cfg.prior_steps, cfg.decoder_steps)
    device = resolve_device(cfg.device)
    m = attach_base(load_models(cfg.prior, cfg.decoder, device, cfg.clip_pretrained), cfg.base)
    check_vae(m, cfg.vae)
    gen = torch.Generator().manual_seed(cfg.seed)
    t0 = time.perf_counter()
    repeated = [p for p in prompts for _ in range(cfg.n)]
    total = text_to_image_steps(m, cfg, len(repeated))
    with progress.bar(total=total, desc="sample", unit="step") as bar:
        images, _ = text_to_image(m, repeated, cfg, gen, lambda: bar.update(1))
    seconds = time.perf_counter() - t0
    # At least 128 px a picture, so that a caption fits in 5 lines under it.
    scale = max(1, 128 // images.shape[2])
    out = save_grid(images, cfg.out, cols=cfg.n, labels=repeated, scale=scale, label_lines=5)
    report = {
        "out": str(out),
        "prompts": prompts,
        "images": len(images),
        "seconds": round(seconds, 2),
        "settings": asdict(cfg),
        "device": device,
        "prior_step": m.prior_meta["step"],
        "decoder_step": m.decoder_meta["step"],
        "base_step": m.base_meta["step"] if m.base_meta else None,
        "clip": m.prior_meta["store"]["clip"],
        "guidance": {
            "prior": m.prior.cfg.guidance_scale if cfg.prior_guidance is None else cfg.prior_guidance,
            "decoder": m.decoder.cfg.guidance_scale if cfg.decoder_guidance is None else cfg.decoder_guidance,
        },
    }
    store.write_json(out.with_suffix(".json"), json.loads(json.dumps(report, default=str)))
    return report


def is_sample_report(path: Path) -> bool:
    """The settings .json that `run` writes beside its grid (the grid may then be replaced too)."""
    return is_report(path, "out", "prompts", "images", "settings")


def print_report(report: dict) -> None:
    print(
        f"sample: {report['images']} images for {len(report['prompts'])} prompt(s) in {report['seconds']} s "
        f"-> {report['out']} (settings in {Path(report['out']).with_suffix('.json')})"
    )
