"""`make demo`: every stage on the built-in procedural dataset, on one CPU machine, nothing from the internet.

Folders under ``--out`` (default ``demo_out/``): ``data/`` (generated images + demo.parquet), ``urls.parquet``
(the same rows with http://127.0.0.1 URLs), ``shards/`` (download), and the later stages' outputs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jobs.http_server import serve_folder
from pipeline import demo_data, download

log = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    out: str = "demo_out"
    n: int = 2000
    # 64 px keeps the CPU demo fast; the shapes stay recognisable.
    size: int = 64
    seed: int = 0
    samples_per_shard: int = 500
    clip_steps: int = 150  # contrastive steps for the demo CLIP (about a minute on 2 cores)
    prior_steps: int = 1500


def served_urls(data_dir: Path, base_url: str, out: Path) -> Path:
    """Rewrite demo.parquet's relative paths as URLs on the local server."""
    table = pq.read_table(data_dir / "demo.parquet")
    urls = pc.binary_join_element_wise(pa.scalar(base_url + "/"), table["url"], "")
    table = table.set_column(table.schema.get_field_index("url"), "url", urls)
    pq.write_table(table, out)
    return out


def run(cfg: DemoConfig) -> dict:
    out = Path(cfg.out)
    data_dir = out / "data"
    print(f"[demo] 1/6 demo-data: {cfg.n} procedural images at {cfg.size}px (seed {cfg.seed}) -> {data_dir}")
    demo_data.run(demo_data.DemoDataConfig(out=str(data_dir), n=cfg.n, size=cfg.size, seed=cfg.seed))
    with serve_folder(str(data_dir)) as base_url:
        print(f"[demo] 2/6 download: serving {data_dir} at {base_url} for img2dataset -> {out / 'shards'}")
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
    report = {"download": summary}
    report.update(_later_stages(cfg, out, data_dir))
    return report


def _later_stages(cfg: DemoConfig, out: Path, data_dir: Path) -> dict:
    from jobs import demo_clip, eval_prior, train_prior
    from pipeline import embed, validate

    ckpt = out / "clip" / "unclip-tiny-demo.pt"
    print(
        f"[demo] 3/6 demo CLIP: unclip-tiny (random init, seed {cfg.seed}) trained {cfg.clip_steps} steps "
        f"on the demo captions -> {ckpt} (offline stand-in for a pretrained CLIP)"
    )
    demo_clip.run(
        demo_clip.DemoClipConfig(
            data=str(data_dir), out=str(ckpt), steps=cfg.clip_steps, batch_size=128, seed=cfg.seed
        )
    )
    store_dir = out / "store"
    print(f"[demo] 4/6 embed: {out / 'shards'} -> {store_dir} (CLIP embeddings + 32 px pixels latents)")
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
    print(
        f"embed: {emb['rows']} rows in {emb['done']} shards, {emb['errors']} error rows, "
        f"{emb['samples_per_second']} samples/s this run"
    )
    val = validate.run(validate.ValidateConfig(store=str(store_dir)))
    validate.print_report(val)
    print(f"[demo] 5/6 train-prior: tiny preset, {cfg.prior_steps} steps -> {out / 'prior'}")
    tp = train_prior.main(
        train_prior.TrainPriorConfig(
            data=str(store_dir),
            out=str(out / "prior"),
            steps=cfg.prior_steps,
            eval_every=0,
            save_every=500,
            resume=True,
            lr=1e-3,
            warmup_steps=50,
            device="cpu",
        )
    )
    print(f"train-prior: final loss {tp['final_loss']:.4f}, {tp['samples_per_s']} samples/s")
    print("[demo] 6/6 eval-prior on the held-out split (EMA weights)")
    ev = eval_prior.run(
        eval_prior.EvalPriorConfig(ckpt=str(out / "prior"), data=str(store_dir), device="cpu")
    )
    return {"embed": emb, "validate": val, "train_prior": tp, "eval_prior": ev}


def print_download_summary(s: dict) -> None:
    print(
        f"download: {s['successes']}/{s['rows']} images in {s['shards']['finished']}/{s['shards']['expected']} "
        f"shards, {s['failures']} failed, {s['images_per_second']} images/s this run ({s['seconds']} s)"
    )
    for reason, n in s["failures_by_reason"].items():
        print(f"  {n:>6}  {reason}")
