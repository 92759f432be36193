"""`unclip export`: a trained decoder as a diffusers `KandinskyV22Pipeline` folder that loads offline with
`DiffusionPipeline.from_pretrained(OUT/decoder)`.

What is written under ``OUT/decoder/``:
- ``unet/``: the decoder's EMA UNet, as is (it is a diffusers `UNet2DConditionModel` in Kandinsky 2.2's form);
- ``scheduler/``: the scheduler our `ddim` sampler steps with (`DPMSolverMultistepScheduler` at first order,
  which is DDIM; cosine schedule, trailing spacing, v-prediction, no clipping), so the pipeline and
  `unclip sample --sampler ddim` take the same steps;
- ``movq/``: for the ``vae`` codec, a `VQModel` holding the store's VAE decoder. The UNet generates latents at
  the store's scale (the VAE posterior mean x its scaling factor, as dequantised from uint8 for training), and
  `VQModel.decode(x, force_not_quantize=True)` runs ``decoder(post_quant_conv(x))``; dividing the
  ``post_quant_conv`` weights by the scaling factor makes that equal `AutoencoderKL.decode(x / scale)` exactly.
  The VQModel's encoder is not the VAE's (a KL encoder's mean/log-variance head has no VQ equivalent): the
  pipeline never encodes, and the exported movq is for decoding only.
  For the ``pixels`` codec there is no movq equivalent (the UNet works on space-to-depth folded pixels):
  the export is refused with a line that says so.

The negative image embedding of the pipeline is zeros (what the decoder was trained to treat as
"unconditional"), and image embeddings should be L2-normalised as the store's are.
``--prior`` writes ``OUT/prior/``, a `KandinskyV22PriorPipeline` (`jobs.export_prior` says how and what is exact).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from jobs import checkpoint
from pipeline.errors import UsageError

log = logging.getLogger(__name__)


@dataclass
class ExportConfig:
    out: str = field(metadata={"help": "output folder; the pipelines go to OUT/prior and OUT/decoder"})
    decoder: str = field(default="", metadata={"help": "decoder training folder, ckpt/ or step_* folder"})
    prior: str = field(default="", metadata={"help": "prior training folder, ckpt/ or step_* folder"})
    overwrite: bool = False  # replace existing OUT/prior or OUT/decoder folders
    # --prior: the store's CLIP checkpoint file, moved (`unclip sample --clip-pretrained`)
    clip_pretrained: str = ""
    vae: str = ""  # --decoder: the store's VAE folder, moved (`unclip sample --vae`)


def scheduler_for_export(num_train_timesteps: int):
    from models.samplers import make_scheduler

    return make_scheduler("ddim", "v_prediction", num_train_timesteps)


def _vq_model(VQModel, c) -> torch.nn.Module:
    return VQModel(
        in_channels=c.in_channels,
        out_channels=c.out_channels,
        down_block_types=tuple(c.down_block_types),
        up_block_types=tuple(c.up_block_types),
        block_out_channels=tuple(c.block_out_channels),
        layers_per_block=c.layers_per_block,
        act_fn=c.act_fn,
        latent_channels=c.latent_channels,
        sample_size=c.sample_size,
        num_vq_embeddings=256,  # unused: the pipeline decodes with force_not_quantize=True
        norm_num_groups=c.norm_num_groups,
        vq_embed_dim=c.latent_channels,
        scaling_factor=c.scaling_factor,
        norm_type="group",
        # a VAE without the mid-block attention (SD-style VAEs have it) had a movq with it: a KeyError
        mid_block_add_attention=c.get("mid_block_add_attention", True),
    )


def movq_from_vae(vae) -> torch.nn.Module:
    """A diffusers VQModel whose ``decode(x, force_not_quantize=True)`` equals ``vae.decode(x / scale)`` for an
    `AutoencoderKL` ``vae`` (its decoder and post_quant_conv, the scale folded into the latter)."""
    from diffusers import VQModel

    c = vae.config
    if not c.get("use_post_quant_conv", True):
        raise UsageError(
            "this VAE has no post_quant_conv to fold its scaling factor into; it cannot be exported"
        )
    # The parts a VQModel has and the VAE does not (its encoder, the codebook) are drawn at random: seeded here,
    # so that an export is the same bytes every time (a rerun's export used to differ with the caller's RNG state)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        movq = _vq_model(VQModel, c)
    state = movq.state_dict()
    src = vae.state_dict()
    for k in state:
        if k.startswith("decoder."):
            state[k] = src[k].clone()
    scale = float(c.scaling_factor)
    state["post_quant_conv.weight"] = src["post_quant_conv.weight"] / scale
    state["post_quant_conv.bias"] = src["post_quant_conv.bias"].clone()
    movq.load_state_dict(state)
    return movq.eval()


def decoder_pipeline(folder: Path, meta: dict, vae: str = "") -> tuple:
    """(the `KandinskyV22Pipeline`, its unclip_export.json note, the report's figures) of a decoder checkpoint
    folder, in memory: every check and load that can fail runs before anything is written."""
    from diffusers import KandinskyV22Pipeline

    from jobs.render import vae_source
    from pipeline.encoders import load_vae

    codec = meta["store"]["latents"]
    decoder = checkpoint.build_model(folder, meta).eval()
    checkpoint.load_weights(decoder, folder / "ema.safetensors")
    path, digest = vae_source(codec, vae)
    vae = load_vae(path, "cpu", weights=digest or "")
    movq = movq_from_vae(vae.model if hasattr(vae, "model") else vae)
    pipe = KandinskyV22Pipeline(
        unet=decoder.unet, scheduler=scheduler_for_export(decoder.cfg.timesteps), movq=movq
    )
    note = {
        "source_checkpoint": str(folder.resolve()),
        "step": meta["step"],
        "clip": meta["store"]["clip"],
        "latents": codec,
        "negative_image_embeds": "zeros",
        "image_embeds": "L2-normalised CLIP image embeddings",
    }
    return (
        pipe,
        note,
        {"decoder_step": meta["step"], "unet_parameters": sum(p.numel() for p in decoder.unet.parameters())},
    )


def write_pipeline(pipe, note: dict, out: Path) -> None:
    """``pipe.save_pretrained`` into ``out`` with its note, atomically: written beside it, then swapped in; an
    earlier export there is moved aside first and removed last, so a kill at any point leaves either export
    whole (or the new one in place and the old one's leftovers under a dot name, removed by the next run)."""
    tmp, old = out.with_name(f".{out.name}.tmp"), out.with_name(f".{out.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    pipe.save_pretrained(tmp)
    (tmp / "unclip_export.json").write_text(json.dumps(note, indent=2))
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def _target(cfg: ExportConfig, name: str, folder: Path, meta: dict) -> Path:
    from pipeline.store import check_out_folder

    check_out_folder(cfg.out)  # a file or a path under one (OUT's other files stay)
    out = Path(cfg.out) / name
    old = out.with_name(f".{name}.old")
    if old.is_dir() and not old.is_symlink() and not os.path.lexists(out):
        # a kill between `write_pipeline`'s two renames: the earlier export goes back first
        os.replace(old, out)
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise UsageError(
            f"{out} is a {'link' if out.is_symlink() else 'file'}, and the export writes a folder there; "
            "choose another --out"
        )
    if not out.exists():
        return out
    note = _export_note(out)
    if note is None:
        # --overwrite deletes the folder: only ever one this command wrote (never a training run or user files).
        raise UsageError(
            f"{out} exists and is not an earlier export (no readable unclip_export.json in it); --overwrite "
            "replaces only exports: choose another --out"
        )
    same = note.get("source_checkpoint") == str(folder.resolve()) and note.get("step") == meta["step"]
    if not same and not cfg.overwrite:
        # The same checkpoint's export is redone without asking: an interrupted export's rerun (its other
        # folder already in place) is the same command, as the interrupt message says.
        raise UsageError(
            f"{out} exists (an export of {note.get('source_checkpoint')} step {note.get('step')}); pass "
            "--overwrite to replace it"
        )
    return out


def _check_partner(cfg: ExportConfig, meta: dict) -> None:
    """One of the pair exported into an OUT that already holds the other: they must share a CLIP, as a pair
    exported in one command must (the prior's image embeddings are what the decoder is conditioned on)."""
    from jobs.sample import clip_name, same_clip

    other = "prior" if meta["task"] == "decoder" else "decoder"
    note = _export_note(Path(cfg.out) / other)
    if note is None or not isinstance(note.get("clip"), dict):
        return
    partner = {"store": {"clip": note["clip"]}}
    try:
        same, theirs = same_clip(meta, partner), clip_name(partner)
    except KeyError:  # a note of another version: nothing to compare
        return
    if not same:
        raise UsageError(
            f"{Path(cfg.out) / other} is an export of a {other} trained on CLIP {theirs}, and this "
            f"{meta['task']} was trained on {clip_name(meta)}: the pair would not work together; export both in "
            "one command (with --overwrite), or into another --out"
        )


def _export_note(out: Path) -> dict | None:
    try:
        note = json.loads((out / "unclip_export.json").read_text())
    except (OSError, ValueError):
        return None
    return note if isinstance(note, dict) else None


def run(cfg: ExportConfig) -> dict:
    try:
        import transformers  # noqa: F401  (diffusers only exposes the Kandinsky pipelines with it)
    except ImportError:
        raise UsageError("unclip export needs transformers: pip install -e '.[export]'") from None
    if not cfg.prior and not cfg.decoder:
        raise UsageError("unclip export needs --prior DIR, --decoder DIR or both")
    if cfg.vae and not cfg.decoder:
        raise UsageError(
            f"--vae {cfg.vae}: the VAE is the decoder's; pass --decoder DIR with it, or leave it out"
        )
    if cfg.clip_pretrained and not cfg.prior:
        raise UsageError(
            f"--clip-pretrained {cfg.clip_pretrained}: the CLIP is the prior's (the decoder's pipeline has "
            "none); pass --prior DIR with it, or leave it out"
        )
    from pipeline.store import hold_folder

    # Held from the first look at OUT's folders (the restore of an export a kill left aside included) to the
    # last write: two exports into one OUT would share its temp folders. A refusal leaves OUT as it was.
    with hold_folder(cfg.out):
        return _export(cfg)


def _export(cfg: ExportConfig) -> dict:
    jobs = []
    if cfg.decoder:
        folder, meta = checkpoint.open_task(cfg.decoder, "decoder")
        codec = (meta.get("store") or {}).get("latents") or {}
        if codec.get("codec") != "vae":
            raise UsageError(
                f"the decoder was trained on the '{codec.get('codec')}' latent codec; only 'vae' decoders export "
                "to KandinskyV22Pipeline (its movq decodes VAE latents; pixels folded space-to-depth have no movq)"
            )
        fold = int((meta.get("model") or {}).get("space_to_depth", 1))
        if (
            fold != 1
        ):  # the pipeline hands its UNet the latents as they are: it would get 4 channels, not 4 f^2
            raise UsageError(
                f"the decoder folds {fold} x {fold} latent blocks into channels (space_to_depth {fold}, as the "
                "tiny preset does on VAE latents), which KandinskyV22Pipeline cannot do; export a decoder trained "
                "without it (presets tiny-base, b32, base, large)"
            )
        from jobs.render import vae_source

        vae_source(codec, cfg.vae)  # its VAE is there and the same, before anything is written
        to_pipeline = functools.partial(decoder_pipeline, vae=cfg.vae)
        jobs.append((to_pipeline, folder, meta, _target(cfg, "decoder", folder, meta)))
    if cfg.prior:
        from jobs.export_prior import exportable, prior_pipeline
        from models.prior import PriorConfig
        from pipeline.encoders import clip_dims

        folder, meta = checkpoint.open_task(cfg.prior, "prior")
        try:
            prior_cfg = PriorConfig(**meta["model"])
        except (KeyError, TypeError, ValueError) as e:  # another version's config: one line, as everywhere
            raise checkpoint.unbuildable(folder, meta, e) from e
        why = exportable(prior_cfg, clip_dims(meta["store"]["clip"]["arch"]).context_length)
        if why:
            raise UsageError("this prior cannot be exported to PriorTransformer: " + "; ".join(why))
        from jobs.sample import clip_source

        clip_source(
            meta, cfg.clip_pretrained
        )  # its CLIP file is there and the same, before anything is written
        to_pipeline = functools.partial(prior_pipeline, clip_pretrained=cfg.clip_pretrained)
        jobs.append((to_pipeline, folder, meta, _target(cfg, "prior", folder, meta)))
    if len(jobs) == 2:
        from jobs.sample import clip_name, same_clip

        if not same_clip(jobs[0][2], jobs[1][2]):
            raise UsageError(
                f"the decoder was trained on CLIP {clip_name(jobs[0][2])} embeddings and the prior on "
                f"{clip_name(jobs[1][2])}; export a pair trained with the same CLIP"
            )
    elif jobs:
        _check_partner(cfg, jobs[0][2])
    report = {}
    # Both pipelines are built before either is written: a prior that fails to load or convert never leaves
    # the decoder it was to be paired with written alone (with --overwrite, beside another CLIP's prior).
    built = [(build(folder, meta), meta, out) for build, folder, meta, out in jobs]
    for (pipe, note, figures), meta, out in built:
        write_pipeline(pipe, note, out)
        report.update({meta["task"]: str(out), **figures})
        print(
            f"export: {meta['task']} step {meta['step']} -> {out} "
            "(load with DiffusionPipeline.from_pretrained)"
        )
    return report
