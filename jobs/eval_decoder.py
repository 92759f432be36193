"""`unclip eval-decoder`: how well the decoder's images carry their conditioning, on a store's held-out split.

For held-out samples it draws (a) reconstructions from the true image embeddings and, with ``--prior``, (b)
text -> prior -> decoder images from the stored captions' text embeddings, re-embeds them with the store's CLIP
and reports the mean cosine with the conditioning image embedding and top-1 retrieval of it within the batch,
beside a floor (random pairs) and a ceiling (the true images re-embedded). On the demo data (metadata with
the scene attributes) it also reads the pictures' colours back from pixels (`pipeline.demo_data`).
Reads a decoder checkpoint (and a prior's) and the store; writes ``eval_decoder.json`` and
``eval_decoder.png`` next to the decoder checkpoint (or under ``--out``).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from jobs import checkpoint
from jobs.render import latents_to_images, save_grid
from jobs.sample import (
    DEFAULT_STRENGTH,
    SampleConfig,
    attach_base,
    check_before_loading,
    check_guidance,
    check_strength,
    check_vae,
    decode,
    decode_steps,
    load_decoder,
    load_models,
    text_to_image,
    text_to_image_steps,
)
from jobs.train_loop import load_store_manifest
from pipeline import progress, store
from pipeline.demo_data import ATTRIBUTE_COLUMNS, attribute_accuracy
from pipeline.errors import UsageError
from pipeline.stream import Stream, StreamConfig, dequantize_torch

log = logging.getLogger(__name__)


@dataclass
class EvalDecoderConfig:
    decoder: str  # training --out folder, ckpt/ or step_* folder
    data: str  # the store it was trained on (its held-out split is used)
    prior: str = ""  # also evaluate text -> prior -> decoder with this prior
    max_samples: int = 128  # held-out samples evaluated (the first of the held-out split, in stream order)
    sampler: str = "dpm++"  # ddim or dpm++, as `unclip sample --sampler`
    prior_steps: int = 25  # as `unclip sample --prior-steps`
    decoder_steps: int = 25  # as `unclip sample --decoder-steps`
    prior_guidance: float | None = None  # default: the checkpoint's
    decoder_guidance: float | None = None  # default: the checkpoint's
    prior_candidates: int = 2  # as `unclip sample --prior-candidates`
    batch_size: int = 64  # images sampled and decoded at once, as `unclip sample --batch-size`
    seed: int = 0  # seeds every draw
    out: str = ""  # folder for eval_decoder.json / .png; default: the checkpoint folder
    device: str = "auto"  # auto (cuda if visible, else cpu), cuda, cuda:N or cpu
    base: str = ""  # a two-stage decoder's first stage (`unclip sample --base`)
    # with --base: the share of --decoder's steps that redraw its picture; unset = 0.5
    strength: float | None = None
    clip_pretrained: str = ""  # the store's CLIP checkpoint file, moved (`unclip sample --clip-pretrained`)
    vae: str = ""  # the store's VAE folder, moved (`unclip sample --vae`)


@torch.no_grad()
def clip_image_embeddings(clip, images: np.ndarray, batch: int = 64) -> torch.Tensor:
    """CLIP image embeddings [N, D] (L2-normalised, CPU) of uint8 pictures [N, H, W, 3]."""
    from PIL import Image

    from pipeline.encoders import encode_image

    out = []
    for s in range(0, len(images), batch):
        x = torch.stack([clip.preprocess(Image.fromarray(im)) for im in images[s : s + batch]])
        out.append(F.normalize(encode_image(clip, x.to(clip.device)).float(), dim=-1).cpu())
    return torch.cat(out)


def agreement(emb: torch.Tensor, cond: torch.Tensor) -> dict[str, float]:
    """Mean cosine of re-embedded pictures with their conditioning embeddings, and top-1 retrieval of the
    conditioning embedding among the batch's."""
    sims = emb @ cond.T  # [N, N]
    return {
        "cos": sims.diag().mean().item(),
        "top1": (sims.argmax(1) == torch.arange(len(emb))).float().mean().item(),
    }


def _held_out(cfg: EvalDecoderConfig, fields: tuple[str, ...]) -> tuple[dict, list[dict]]:
    """Up to max_samples held-out rows: tensors and metadata rows, in the stream's order (shards in order,
    each shard's rows by key)."""
    full = checkpoint.read_meta(checkpoint.resolve(cfg.decoder))
    manifest = load_store_manifest(cfg.data)  # checked against the decoder in `run`, before the models load
    meta = full["config"]
    stream = Stream(
        StreamConfig(
            cfg.data,
            fields=fields,
            batch_size=cfg.max_samples,
            split="val",
            val_fraction=meta["val_fraction"],
            split_seed=meta["split_seed"],
        )
    )
    checkpoint.warn_if_other_split(full, stream.order)
    if stream.num_samples == 0:
        raise UsageError(f"the held-out split of {cfg.data} is empty; nothing to evaluate on")
    with contextlib.closing(stream.torch_batches("cpu")) as batches:  # its prefetch thread stops here
        b = next(batches)
    tables: dict[str, list[dict]] = {}
    rows = []
    for s, r in zip(b["shard"].tolist(), b["row"].tolist()):
        shard = stream.store.shards[s][0]
        if shard not in tables:
            tables[shard] = store.read_metadata(cfg.data, shard).to_pylist()
        rows.append(tables[shard][r])
    own = manifest["latents"]  # --data's own range (another store of the same VAE fits its own)
    b["latents"] = dequantize_torch(b["latents"], own["lo"], own["hi"])
    return b, rows


def run(cfg: EvalDecoderConfig) -> dict:
    from models.samplers import SAMPLERS
    from pipeline.encoders import resolve_device

    for name in ("max_samples", "prior_steps", "decoder_steps", "prior_candidates", "batch_size"):
        if getattr(cfg, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(cfg, name)})")
    if cfg.sampler not in SAMPLERS:
        raise UsageError(f"unknown --sampler '{cfg.sampler}'; valid: {', '.join(SAMPLERS)}")
    check_guidance(cfg)
    check_strength(cfg.strength, cfg.base)
    if cfg.base and cfg.strength is None:
        cfg = replace(cfg, strength=DEFAULT_STRENGTH)  # what it samples with, as its report records it
    # The step evaluated, resolved once: a training still going may name a newer one in `latest` meanwhile,
    # and the report went into that step's folder with this one's figures.
    cfg = replace(cfg, decoder=str(checkpoint.resolve(cfg.decoder)))
    if cfg.out:
        store.check_out_folder(cfg.out)  # a file, or under one: refused before the work
        ours = _is_report(Path(cfg.out))  # a rerun replaces its own report, no other file
        for name in ("eval_decoder.json", "eval_decoder.png"):
            store.check_out_file(
                Path(cfg.out) / name, "--out", lambda _: ours, "an earlier eval-decoder report"
            )
    else:  # the default, the checkpoint's folder, which may be shared and read-only
        decoder = checkpoint.resolve(cfg.decoder)
        checkpoint.default_out_writable(
            lambda: store.check_out_folder(decoder, flag="eval-decoder's report folder")
        )
    check_before_loading(cfg.prior, cfg.decoder, cfg.base, cfg.prior_steps, cfg.decoder_steps)
    # the store fits the decoder (its CLIP, its latents): refused before the models load too
    checkpoint.check_store(
        checkpoint.read_meta(cfg.decoder), load_store_manifest(cfg.data), cfg.data, latents=True
    )
    device = resolve_device(cfg.device)
    sc = SampleConfig(
        prior=cfg.prior or cfg.decoder,
        decoder=cfg.decoder,
        sampler=cfg.sampler,
        prior_steps=cfg.prior_steps,
        decoder_steps=cfg.decoder_steps,
        prior_guidance=cfg.prior_guidance,
        decoder_guidance=cfg.decoder_guidance,
        prior_candidates=cfg.prior_candidates,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        vae=cfg.vae,
        base=cfg.base,
        strength=cfg.strength,
    )
    m = (
        load_models(cfg.prior, cfg.decoder, device, cfg.clip_pretrained)
        if cfg.prior
        else _decoder_only(cfg.decoder, device, cfg.clip_pretrained)
    )
    m = attach_base(m, cfg.base)
    check_vae(m, cfg.vae)
    codec = m.decoder_meta["store"]["latents"]
    b, rows = _held_out(cfg, ("img_emb", "latents"))
    gen = torch.Generator().manual_seed(cfg.seed)
    cond = F.normalize(b["img_emb"].float(), dim=-1)
    # in --batch-size chunks, as text -> image is: --max-samples at once could exceed a GPU's memory
    chunks = range(0, len(cond), sc.batch_size)
    true_img = np.concatenate(
        [latents_to_images(b["latents"][s : s + sc.batch_size], codec, device, cfg.vae) for s in chunks]
    )
    total = len(chunks) * decode_steps(m, sc) + (text_to_image_steps(m, sc, len(rows)) if cfg.prior else 0)
    with progress.bar(total=total, desc="eval-decoder", unit="step") as bar:
        step = lambda: bar.update(1)  # noqa: E731
        recon = torch.cat([decode(m, cond[s : s + sc.batch_size].to(device), sc, gen, step) for s in chunks])
        # drawn second from the one generator, as before the bar
        t2i_img = text_to_image(m, [r["caption"] for r in rows], sc, gen, step)[0] if cfg.prior else None
    recon_img = np.concatenate(
        [latents_to_images(recon[s : s + sc.batch_size], codec, device, cfg.vae) for s in chunks]
    )
    true_emb = clip_image_embeddings(m.clip, true_img)
    recon_emb = clip_image_embeddings(m.clip, recon_img)
    report: dict = {
        "settings": asdict(cfg),
        "samples": len(rows),
        "decoder_step": m.decoder_meta["step"],
        "base_step": m.base_meta["step"] if m.base_meta else None,
        "reconstruction": agreement(recon_emb, cond),
        "ceiling_true_images": agreement(true_emb, cond),
        "floor_random_pairs": {
            "cos": (recon_emb * cond.roll(1, 0)).sum(-1).mean().item(),
            "top1": 1 / len(rows),
        },
    }
    grids = [true_img[:8], recon_img[:8]]
    attrs = rows if all(c in rows[0] for c in ATTRIBUTE_COLUMNS) else None
    if attrs:
        report["attributes"] = {
            "true_images": attribute_accuracy(true_img, attrs),
            "reconstruction": attribute_accuracy(recon_img, attrs),
        }
    if cfg.prior:
        report["text_to_image"] = agreement(clip_image_embeddings(m.clip, t2i_img), cond)
        report["prior_step"] = m.prior_meta["step"]
        grids.append(t2i_img[:8])
        if attrs:
            report["attributes"]["text_to_image"] = attribute_accuracy(t2i_img, attrs)
    cols = len(grids[0])
    # a decoder trained at a lower --resolution draws smaller pictures than the store's: each row at the true
    # images' size (nearest), built before anything is written
    size = true_img.shape[1:3]
    grid = np.concatenate([_at_size(g[:cols], size) for g in grids])
    if cfg.out:
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        writing = contextlib.nullcontext()
    else:
        out = checkpoint.resolve(cfg.decoder)
        writing = checkpoint.writing_beside(out, "eval_decoder.json", lambda: print(format_table(report)))
    with writing:  # into the checkpoint's folder: never made again if a running training pruned it
        # the report first: a run killed between the two leaves its own report, which its rerun replaces
        store.write_json(out / "eval_decoder.json", report, make_parent=bool(cfg.out))
        save_grid(grid, out / "eval_decoder.png", cols=cols, make_parent=bool(cfg.out))
    report["written"] = str(out / "eval_decoder.json")
    return report


def _at_size(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 [N, H, W, 3] pictures scaled to ``size`` (nearest), or as they are when already that size."""
    if tuple(images.shape[1:3]) == tuple(size):
        return images
    x = F.interpolate(torch.from_numpy(images).permute(0, 3, 1, 2).float(), size=tuple(size), mode="nearest")
    return x.round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _is_report(folder: Path) -> bool:
    return store.is_report(folder / "eval_decoder.json", "samples", "decoder_step")


def print_report(report: dict) -> None:
    print(format_table(report))
    print(f"written: {report['written']} and eval_decoder.png (true / reconstructed / text-to-image rows)")


def _decoder_only(decoder: str, device: str, clip_pretrained: str = ""):
    """The decoder and its CLIP, without a prior."""
    from jobs.sample import Models, checkpoint_clip

    d, meta = load_decoder(decoder, device)
    return Models(None, d, checkpoint_clip(meta, device, clip_pretrained), {}, meta, device)


def _fmt(v: float | None) -> str:
    return f"{v:8.3f}" if v is not None else f"{'-':>8}"


def format_table(r: dict) -> str:
    lines = [
        f"eval-decoder on {r['samples']} held-out samples (CLIP re-embedding vs the conditioning embedding)"
    ]
    lines.append(f"  {'':34} {'cos':>7} {'top-1':>7}")
    names = [
        ("reconstruction", "reconstruction from image emb"),
        ("text_to_image", "text -> prior -> decoder"),
        ("ceiling_true_images", "ceiling: true images"),
        ("floor_random_pairs", "floor: random pairs"),
    ]
    for key, label in names:
        if key in r:
            lines.append(f"  {label:34} {r[key]['cos']:7.3f} {r[key]['top1']:7.3f}")
    if "attributes" in r:
        a = r["attributes"]
        lines.append(
            f"  {'attribute accuracy (from pixels)':34} {'bg':>7} {'shape':>7} {'anywhere':>9} "
            f"{'1 shape':>8} {'2 shapes':>8} {'grain':>7}"
        )
        for key in ("true_images", "reconstruction", "text_to_image"):
            if key in a:
                kinds = " ".join(
                    _fmt(a[key].get(f"shape_color_accuracy_{k}")) for k in ("one_shape", "two_shapes")
                )
                lines.append(
                    f"  {key.replace('_', ' '):34} {a[key]['background_accuracy']:7.3f} "
                    f"{a[key]['shape_color_accuracy']:7.3f} {a[key]['shape_color_anywhere_accuracy']:9.3f} {kinds} "
                    f"{a[key]['background_grain']:7.2f}"
                )
        ch = a["true_images"]
        lines.append(
            f"  {'chance':34} {ch['background_chance']:7.3f} {ch['shape_color_chance']:7.3f} "
            f"{ch['shape_color_anywhere_chance']:9.3f}"
        )
        if ch.get("two_color_pairs"):  # where two-shape scenes go wrong: swapped or merged colours
            label = f"two-shape scenes, 2 colours ({ch['two_color_pairs']})"
            lines.append(f"  {label:34} {'right':>7} {'swapped':>7} {'merged':>9}")
            for key in ("reconstruction", "text_to_image"):
                if key in a:
                    lines.append(
                        f"  {key.replace('_', ' '):34} {a[key]['pairs_both_right']:7.3f} "
                        f"{a[key]['pairs_swapped']:7.3f} {a[key]['pairs_merged']:9.3f}"
                    )
    return "\n".join(lines)
