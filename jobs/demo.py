"""`make demo`: every stage on the built-in procedural dataset, on one CPU machine, nothing from the internet.

Folders under ``--out`` (default ``demo_out/``): ``data/`` (generated images + demo.parquet), ``urls.parquet``
(the same rows with http://127.0.0.1 URLs), ``shards/`` (download), and the later stages' outputs.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from jobs.http_server import serve_folder
from jobs.serve import served_urls
from pipeline import demo_data, download, store
from pipeline.errors import StageError, UsageError

log = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    out: str = "demo_out"  # every stage's output goes under this folder; rerun to resume
    # Scenes to draw. With 4,000, text -> image shape colour at its stated position is 0.85-0.87 against 0.76 with
    # 2,000 (the prior and both decoder stages generalise from twice the scenes at the same steps), ~25 s more
    # download and embed.
    n: int = 4000
    # Image side in pixels: 64 keeps the CPU demo fast and the shapes recognisable.
    size: int = 64
    seed: int = 0  # seeds the scenes, the demo CLIP, every trainer and the sampling
    samples_per_shard: int = 500  # download's shard size
    # Contrastive steps for the demo CLIP (~4.3 min on 2 cores with its hard negatives, ~3.5 without). The demo
    # CLIP is what limits the prior's retrieval: at 150 steps a third of held-out images had another image at cosine > 0.99 (prior top-1 0.69),
    # at 400 top-1 was 0.88, at 800 0.97 with class-token pooling and 0.99-1.0 with unclip-tiny's mean pooling;
    # 0.95 with the cosine decay, which put more of each shape's position into the image embedding.
    clip_steps: int = 800
    prior_steps: int = 1500  # train-prior steps (tiny preset, batch 64)
    decoder_steps: int = 1000  # train-decoder steps of the second stage (tiny preset)
    decoder_batch_size: int = 32  # train-decoder's batch size (second stage)
    eval_samples: int = 256  # held-out samples for eval-decoder (4,000 scenes hold out ~230: all of them)
    # Guidance 2 on the decoder: CLIP top-1 of its reconstructions 0.39 -> 0.53 on the demo (1 vs 2; 4 adds little)
    decoder_guidance: float = 2.0
    # Training steps of the decoder's first stage (`tiny-base` at 8 x 8, batch 64; 0 = `tiny` alone): it
    # decides which colour goes where, which `tiny` alone does not learn in 1,000 steps (README, section 5,
    # "Two stages").
    base_steps: int = 2000
    strength: float = 0.5  # the share of `tiny`'s steps that redraw the base's upsampled picture


# Drawn from the demo's caption grammar; none is guaranteed to be in the training set.
DEMO_PROMPTS = (
    "a red circle in the center on a white background",
    "a blue square at the top left on a black background",
    "a yellow triangle at the bottom right on a gray background",
    "a green diamond at the top right on a white background",
    "a purple circle at the bottom left and an orange square at the top right on a gray background",
    "a white square in the center on a black background",
    "a black circle at the top left and a red triangle at the bottom right on a white background",
    "an orange diamond in the center on a black background",
)


@contextmanager
def _timed(stages: dict[str, float], name: str) -> Iterator[None]:
    """Adds the wall seconds of the block to stages[name] (a rerun that skips finished work records its own)."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        stages[name] = round(stages.get(name, 0.0) + time.perf_counter() - t0, 1)


SETTINGS = "demo_settings.json"
CLIP_CKPT = "clip/unclip-tiny-demo.pt"  # the demo CLIP, in --out


def check_settings(cfg: DemoConfig) -> None:
    """A rerun continues the demo only with the settings that started it (kept in ``--out/demo_settings.json``):
    the stages resume from what exists, so other ones would be silently ignored (a demo CLIP of other steps kept)
    or mixed in (scenes of another seed downloaded beside the first's)."""
    path = Path(cfg.out) / SETTINGS
    mine = {k: v for k, v in asdict(cfg).items() if k != "out"}
    if not path.exists():
        if Path(cfg.out).is_dir() and store.entries(cfg.out) and not (Path(cfg.out) / "data").is_dir():
            raise UsageError(
                f"--out {cfg.out} is not empty and is not a demo folder; choose a new or empty folder"
            )
        store.write_json(path, mine)
        return
    try:
        before = store.read_json(path)
    except (OSError, ValueError) as e:
        raise UsageError(
            f"{path} cannot be read ({e}); remove it to continue the demo with these settings"
        ) from e
    diff = sorted(k for k in mine if before.get(k) != mine[k])
    if diff:
        was = ", ".join(f"--{k.replace('_', '-')} {before.get(k)}" for k in diff)
        raise UsageError(
            f"{cfg.out} holds a demo run with {was}; rerun with those to continue it, or give another --out"
        )


def _finished(stage: str, report: dict, out: Path) -> None:
    """A stage that reported a failure (its ``exit_code``, as the command would exit) stops the demo there:
    the later stages would otherwise train on what a cut download or a failed shard left."""
    code = int(report.get("exit_code", 0) or 0)
    if code == 130:
        raise KeyboardInterrupt
    if code:
        raise StageError(
            f"the demo's {stage} stage did not finish (exit {code}, above); rerun `unclip demo --out {out}` "
            "to continue once what it names is fixed"
        )


def check_values(cfg: DemoConfig) -> None:
    """Every value before anything is written: each stage checked its own only when it was reached, after the
    settings were kept (which then refused the corrected rerun) and maybe after an hour of the stages before,
    naming the stage's flag (--steps) rather than the demo's (--prior-steps)."""
    at_least = {
        "n": 1,
        "samples_per_shard": 1,
        "clip_steps": 1,
        "prior_steps": 1,
        "decoder_steps": 1,
        "decoder_batch_size": 1,
        "eval_samples": 1,
        "base_steps": 0,
    }
    for name, low in at_least.items():
        if getattr(cfg, name) < low:
            raise UsageError(f"--{name.replace('_', '-')} must be >= {low} (got {getattr(cfg, name)})")
    if not 16 <= cfg.size <= 4096:
        raise UsageError(f"--size must be between 16 and 4096 pixels (got {cfg.size})")
    if not cfg.decoder_guidance >= 0 or cfg.decoder_guidance == float("inf"):
        raise UsageError(f"--decoder-guidance must be >= 0 (1 = no guidance), got {cfg.decoder_guidance}")
    if cfg.base_steps and not 0.0 < cfg.strength <= 1.0:
        raise UsageError(
            f"--strength must be in (0, 1] (the share of the decoder's steps), got {cfg.strength}"
        )


def run(cfg: DemoConfig) -> dict:
    check_values(cfg)
    with store.hold_folder(cfg.out):  # a second demo into this folder meanwhile is refused, not mixed in
        return _run(cfg)


def _run(cfg: DemoConfig) -> dict:
    t0 = time.perf_counter()
    out = Path(cfg.out)
    data_dir = out / "data"
    stages: dict[str, float] = {}
    check_settings(cfg)
    print(f"[demo] 1/9 demo-data: {cfg.n} procedural images at {cfg.size}px (seed {cfg.seed}) -> {data_dir}")
    with _timed(stages, "demo_data"):
        demo_data.run(demo_data.DemoDataConfig(out=str(data_dir), n=cfg.n, size=cfg.size, seed=cfg.seed))
    with serve_folder(str(data_dir)) as base_url, _timed(stages, "download"):
        print(f"[demo] 2/9 download: serving {data_dir} at {base_url} for img2dataset -> {out / 'shards'}")
        urls = served_urls(data_dir, base_url, out / "urls.parquet")
        summary = download.run(
            download.DownloadConfig(
                urls=str(urls),
                out=str(out / "shards"),
                image_size=cfg.size,
                samples_per_shard=cfg.samples_per_shard,
                processes=2,
                threads=16,
            )
        )
    print_download_summary(summary)
    _finished("download", summary, out)
    report = {"download": summary}
    report.update(_later_stages(cfg, out, data_dir, stages))
    report.update(_decoder_stages(cfg, out, stages))
    report["seconds"] = round(time.perf_counter() - t0, 1)
    report["stage_seconds"] = stages
    summary_json = _summary(report)
    store.write_json(out / "summary.json", {"summary": summary_json, "stages": report})
    print(format_summary(summary_json))
    return report


def _later_stages(cfg: DemoConfig, out: Path, data_dir: Path, stages: dict[str, float]) -> dict:
    from jobs import demo_clip, eval_prior, train_prior
    from pipeline import embed, validate

    ckpt = out / CLIP_CKPT
    print(
        f"[demo] 3/9 demo CLIP: unclip-tiny (random init, seed {cfg.seed}) trained {cfg.clip_steps} steps "
        f"on the demo captions -> {ckpt} (offline stand-in for a pretrained CLIP)"
    )
    with _timed(stages, "demo_clip"):
        demo_clip.run(
            demo_clip.DemoClipConfig(
                data=str(data_dir), out=str(ckpt), steps=cfg.clip_steps, batch_size=128, seed=cfg.seed
            )
        )
    store_dir = out / "store"
    print(f"[demo] 4/9 embed: {out / 'shards'} -> {store_dir} (CLIP embeddings + 32 px pixels latents)")
    with _timed(stages, "embed"):
        emb = embed.run(
            embed.EmbedConfig(
                shards=str(out / "shards"),
                out=str(store_dir),
                clip="unclip-tiny",
                pretrained=str(ckpt.resolve()),
                latents="pixels",
                latent_size=32,
                device="cpu",
                text_encodings=True,
            )
        )
    speed = emb["samples_per_second"]  # None when every shard was done already
    print(
        f"embed: {emb['rows']} rows in {emb['done']} shards, {emb['errors']} error rows, "
        + (f"{speed} samples/s this run" if speed is not None else "every shard done already")
    )
    _finished("embed", emb, out)
    with _timed(stages, "validate"):
        val = validate.run(validate.ValidateConfig(store=str(store_dir)))
    validate.print_report(val)
    _finished("validate", val, out)
    print(f"[demo] 5/9 train-prior: tiny preset, {cfg.prior_steps} steps -> {out / 'prior'}")
    with _timed(stages, "train_prior"):
        tp = train_prior.main(
            train_prior.TrainPriorConfig(
                data=str(store_dir),
                out=str(out / "prior"),
                steps=cfg.prior_steps,
                eval_every=0,
                save_every=500,
                resume=_trained_before(out / "prior"),
                lr=1e-3,
                warmup_steps=50,
                seed=cfg.seed,
                device="cpu",
            )
        )
    print(_trained("train-prior", tp))
    print("[demo] 6/9 eval-prior on the held-out split (EMA weights)")
    with _timed(stages, "eval_prior"):
        ev = eval_prior.run(
            eval_prior.EvalPriorConfig(ckpt=str(out / "prior"), data=str(store_dir), device="cpu")
        )
    return {"embed": emb, "validate": val, "train_prior": tp, "eval_prior": ev}


def _trained_before(folder: Path) -> bool:
    """Whether a training stage's folder holds a checkpoint to --resume from: a fresh run without --resume
    says nothing (with it, the trainer warns that there is no checkpoint), a rerun continues."""
    from jobs.train_loop import ckpt_dir

    return (ckpt_dir(folder) / "latest").exists()


def _trained(label: str, r: dict) -> str:
    """One line on a training stage; a rerun that found it finished says so instead of a loss it did not see."""
    if r["start_step"] >= r["steps"]:
        return f"{label}: already trained to step {r['steps']} (checkpoint in {r['ckpt']})"
    return f"{label}: final loss {r['final_loss']:.4f}, {r['samples_per_s']} samples/s"


def _decoder_stages(cfg: DemoConfig, out: Path, stages: dict[str, float]) -> dict:
    from jobs import eval_decoder, sample, train_decoder

    store_dir = out / "store"

    def train(folder: Path, steps: int, batch_size: int, **preset: object) -> dict:
        """A demo decoder stage: lr 1e-3 with 100 warmup steps, EMA 0.995, one evaluation at the end."""
        return train_decoder.main(
            train_decoder.TrainDecoderConfig(
                data=str(store_dir),
                out=str(folder),
                steps=steps,
                batch_size=batch_size,
                eval_every=steps,
                save_every=500,
                resume=_trained_before(folder),
                lr=1e-3,
                warmup_steps=100,
                ema_decay=0.995,
                seed=cfg.seed,
                device="cpu",
                **preset,
            )
        )

    print(f"[demo] 7/9 train-decoder: tiny preset, {cfg.decoder_steps} steps -> {out / 'decoder'}")
    with _timed(stages, "train_decoder"):
        td = train(out / "decoder", cfg.decoder_steps, cfg.decoder_batch_size)
    print(_trained("train-decoder", td))
    base = str(out / "base") if cfg.base_steps else ""
    if base:
        print(
            f"[demo] 7/9 train-decoder, first stage: tiny-base preset at 8 x 8, {cfg.base_steps} steps -> {base}"
        )
        with _timed(stages, "train_base"):
            tb = train(out / "base", cfg.base_steps, 64, preset="tiny-base", resolution=8)
        print(_trained("train-decoder (base)", tb))
    print(f"[demo] 8/9 sample: {len(DEMO_PROMPTS)} prompts x 4 -> {out / 'samples.png'}")
    with _timed(stages, "sample"):
        sm = sample.run(
            sample.SampleConfig(
                prior=str(out / "prior"),
                decoder=str(out / "decoder"),
                prompt=list(DEMO_PROMPTS),
                n=4,
                decoder_guidance=cfg.decoder_guidance,
                base=base,
                strength=cfg.strength if base else None,
                seed=cfg.seed,
                out=str(out / "samples.png"),
                device="cpu",
                clip_pretrained=str(out / CLIP_CKPT),  # where it is now, if the folder was moved since
            )
        )
    sample.print_report(sm)
    print("[demo] 9/9 eval-decoder: reconstruction and text -> image on the held-out split")
    with _timed(stages, "eval_decoder"):
        ed = eval_decoder.run(
            eval_decoder.EvalDecoderConfig(
                decoder=str(out / "decoder"),
                data=str(store_dir),
                prior=str(out / "prior"),
                max_samples=cfg.eval_samples,
                decoder_guidance=cfg.decoder_guidance,
                base=base,
                strength=cfg.strength if base else None,
                seed=cfg.seed,
                out=str(out),
                device="cpu",
                clip_pretrained=str(out / CLIP_CKPT),
            )
        )
    eval_decoder.print_report(ed)
    shutil.copyfile(out / "decoder" / "reconstructions.png", out / "reconstructions.png")
    for name in ("prior", "decoder"):
        if (out / name / "loss.png").exists():
            shutil.copyfile(out / name / "loss.png", out / f"loss_{name}.png")
    return {"train_decoder": td, "sample": sm, "eval_decoder": ed}


def _summary(r: dict) -> dict:
    ep, ed = r["eval_prior"], r["eval_decoder"]
    attrs = ed.get("attributes", {})
    return {
        "demo_seconds": r["seconds"],
        **{f"seconds_{name}": sec for name, sec in r.get("stage_seconds", {}).items()},
        "prior_top1_retrieval": ep["top1_pred"],
        "text_embedding_top1_retrieval": ep["top1_text"],
        "prior_cos_pred_image": ep["sim_pred_image"],
        "decoder_recon_clip_cos": ed["reconstruction"]["cos"],
        "decoder_recon_clip_top1": ed["reconstruction"]["top1"],
        "text_to_image_clip_cos": ed["text_to_image"]["cos"],
        "text_to_image_clip_top1": ed["text_to_image"]["top1"],
        "ceiling_clip_cos": ed["ceiling_true_images"]["cos"],
        "floor_clip_cos": ed["floor_random_pairs"]["cos"],
        **{
            f"{k}_{m}": attrs[k][f"{m}_accuracy"]
            for k in ("true_images", "reconstruction", "text_to_image")
            if k in attrs
            for m in ("background", "shape_color", "shape_color_anywhere")
        },
        **{
            f"{k}_shape_color_{kind}": attrs[k].get(f"shape_color_accuracy_{kind}")
            for k in ("reconstruction", "text_to_image")
            if k in attrs
            for kind in ("one_shape", "two_shapes")
        },
        # Two-shape scenes of two colours: both right, colours swapped, one colour at both places.
        **{
            f"{k}_pairs_{m}": attrs[k].get(f"pairs_{m}")
            for k in ("reconstruction", "text_to_image")
            if k in attrs
            for m in ("both_right", "swapped", "merged")
        },
        # Pixel noise on the flat background, 0-255 levels (the samples' grain; a drawn scene scores 0).
        **{
            f"{k}_background_grain": attrs[k]["background_grain"]
            for k in ("true_images", "reconstruction", "text_to_image")
            if k in attrs
        },
        "background_chance": attrs.get("true_images", {}).get("background_chance"),
        "shape_color_chance": attrs.get("true_images", {}).get("shape_color_chance"),
        "shape_color_anywhere_chance": attrs.get("true_images", {}).get("shape_color_anywhere_chance"),
        "eval_samples": ed["samples"],
        "prior_eval_samples": ep["samples"],
    }


def _cell(v: object) -> str:
    if v is None:  # e.g. a held-out split with no two-shape scenes: nothing to score
        return "- (no such samples)"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def format_summary(s: dict) -> str:
    width = max(len(k) for k in s)
    rows = [f"  {k:<{width}}  {_cell(v)}" for k, v in s.items()]
    return "\n".join(["[demo] summary (also in summary.json)", *rows])


REASONS_SHOWN = 10  # failure kinds printed; the download's summary file keeps more


def print_download_summary(s: dict) -> None:
    if s["complete"] and s["shards"].get("downloaded_this_run") == 0:
        this_run = "none downloaded this run (every shard was finished before)"
    else:
        this_run = f"{s['images_per_second']} images/s this run ({s['seconds']} s)"
    print(
        f"download: {s['successes']}/{s['rows']} images in {s['shards']['finished']}/{s['shards']['expected']} "
        f"shards, {s['failures']} failed, {this_run}"
    )
    reasons = list(s["failures_by_reason"].items())
    for reason, n in reasons[:REASONS_SHOWN]:
        print(f"  {n:>6}  {reason}")
    if len(reasons) > REASONS_SHOWN:
        rest = sum(n for _, n in reasons[REASONS_SHOWN:])
        print(f"  {rest:>6}  ... {len(reasons) - REASONS_SHOWN} more kinds (summary/download_summary.json)")
