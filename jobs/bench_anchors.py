"""`make bench-anchors`: this project's stages side by side with the tools users would otherwise pick.

The reference tools ("anchors") whose pins clash with ours run in their own venv, ``.venv-anchors``
(clip-retrieval, dalle2-pytorch), through the small scripts in ``bench/anchors/``; embedding-reader is in our
own dev extra. Everything runs on data this module makes itself, in the same run, alternating ours and
theirs for every repeat, because the machines are shared and noisy:

1. data: `pipeline.demo_data` images, served on 127.0.0.1 (`jobs.http_server`), downloaded into webdataset
   shards by `pipeline.download` (img2dataset);
2. embed: ``unclip embed`` against ``clip-retrieval inference`` on those shards, same open_clip architecture
   with random weights, same batch size, both timed end to end as subprocesses (images/s);
3. stream: `pipeline.stream.Stream` against `EmbeddingReader` over the store that step 2 wrote
   ((image, text) embedding pairs/s);
4. train-prior: an AdamW step of `models.prior.DiffusionPrior` against dalle2-pytorch's `DiffusionPrior` at
   the same width, depth, heads, batch and embedding size, both conditioned on the text embedding only
   (samples/s and peak RSS, each in its own process);
5. interoperability: embedding-reader and DALLE2-pytorch's prior loader (`get_reader` / `make_splits`) read
   our store, and what they yield is compared with the store row by row.

Writes ``bench/anchors.json`` and ``bench/anchors.md`` and prints the table. Generated data lives under
``bench/work/anchors/`` (ignored by git). Exit code 1 if an interoperability check fails or a part could not
run; a target that is not met is reported, not an error.

    .venv/bin/python -m jobs.bench_anchors                 # everything (make bench-anchors)
    .venv/bin/python -m jobs.bench_anchors --parts stream,interop --n 256
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from jobs.bench import random_store as make_scale_store  # one writer of random stores for both benches

ROOT = Path(__file__).resolve().parent.parent
ANCHOR_SCRIPTS = ROOT / "bench" / "anchors"
PARTS = ("embed", "stream", "prior", "decoder", "interop")
TARGETS = {"embed": 1.5, "stream": 5.0, "prior": 3.0}


@dataclass
class AnchorsConfig:
    out: str = "bench"  # anchors.json and anchors.md are written here
    work: str = "bench/work/anchors"  # generated images, shards and stores
    anchors_python: str = ".venv-anchors/bin/python"
    parts: str = ",".join(PARTS)
    store: str = ""  # read this store in the stream / interop parts instead of generating data (smoke test)
    repeats: int = 2  # ours/theirs pairs for embed and train-prior; stream uses stream_repeats
    seed: int = 0
    # data + embed
    n: int = 256
    image_size: int = 224
    samples_per_shard: int = 128
    clip: str = "ViT-B-32"  # exists in open_clip 3.x (ours) and 2.x (clip-retrieval's pin)
    embed_batch: int = 64
    # stream
    stream_batch: int = 64
    stream_epochs: int = 50
    stream_repeats: int = 3
    # a second, larger store (random 512-d rows written through pipeline.store): at 256 rows both readers'
    # per-pass set-up dominates; this shows the per-row rates. 0 shards = skip
    scale_shards: int = 8
    scale_rows_per_shard: int = 8192
    scale_epochs: int = 1
    # train-prior: dalle2-pytorch takes ~15 s a batch-16 step on a 2-core CPU (its padded text sequence)
    prior_batch: int = 16
    prior_warmup: int = 1
    prior_steps: int = 2
    ours_prior_warmup: int = 2
    ours_prior_steps: int = 10
    dalle2_max_text_len: int = 256  # dalle2-pytorch's default
    extra_max_text_len: int = 77  # one more informational dalle2 run at CLIP's context length; 0 = skip


# ---------------------------------------------------------------- helpers


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(WANDB_MODE="disabled", NO_ALBUMENTATIONS_UPDATE="1", PYTHONUNBUFFERED="1")
    env.setdefault("TQDM_MININTERVAL", "5")
    return env


def run_timed(cmd: list[str], log_path: Path, cwd: Path = ROOT, timeout: float = 1200) -> dict:
    """Run ``cmd`` to completion: wall seconds, exit code, stdout; stderr (and stdout) go to ``log_path``.
    A command still running after ``timeout`` s is killed with its process group (rc -9)."""
    import signal

    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            cmd, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True
        )
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the command and the workers it started, nothing else
            out, _ = proc.communicate()
            log.write(f"\n[anchors] killed after {timeout:.0f} s\n")
        seconds = time.perf_counter() - t0
        log.write(out)
    return {
        "seconds": seconds,
        "rc": proc.returncode,
        "stdout": out,
        "log": str(log_path),
        "load_avg_1m_after": round(os.getloadavg()[0], 2),  # other work on this shared machine during the run
    }


def _last_json(text: str) -> dict:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError("no JSON line in the output")


def _check_rc(res: dict, what: str) -> None:
    if res["rc"] != 0:
        tail = Path(res["log"]).read_text().strip().splitlines()[-15:]
        raise RuntimeError(f"{what} exited {res['rc']} (log {res['log']}):\n" + "\n".join(tail))


def spread(values: list[float]) -> dict:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "values": values,
    }


def comparison(
    name: str,
    ours: list[float],
    theirs: list[float],
    units: str,
    target: float | None,
    higher_is_better: bool = True,
    notes: str = "",
) -> dict:
    """Ratios per repeat (ours/theirs for rates, theirs/ours for costs: >1 always means ours is better)."""
    ratios = [(o / t if higher_is_better else t / o) for o, t in zip(ours, theirs)]
    r = spread(ratios)
    return {
        "name": name,
        "ours": spread(ours),
        "theirs": spread(theirs),
        "units": units,
        "ratio": r,
        "ratio_meaning": "ours / theirs" if higher_is_better else "theirs / ours (lower is better)",
        "repeats": len(ratios),
        "target": target,
        "met": None if target is None else r["median"] >= target,
        "notes": notes,
    }


def concat_field(root: Path, field: str) -> np.ndarray:
    """Every done shard's rows of one .npy field, in shard order (the order embedding-reader uses)."""
    from pipeline import store

    arrays = [store.open_array(root, field, s) for s, n in store.shard_rows(root) if n > 0]
    return np.concatenate(arrays)


def concat_metadata(root: Path, columns: list[str]) -> dict[str, list]:
    import pyarrow as pa

    from pipeline import store

    tables = [store.read_metadata(root, s, columns) for s, n in store.shard_rows(root) if n > 0]
    table = pa.concat_tables(tables)
    return {c: table[c].to_pylist() for c in columns}


# ---------------------------------------------------------------- 1. data


def make_data(cfg: AnchorsConfig, work: Path) -> Path:
    """Procedural images -> local HTTP server -> img2dataset shards. Reused when already made alike."""
    from jobs.demo import served_urls
    from jobs.http_server import serve_folder
    from pipeline import demo_data, download

    shards = work / "shards"
    stamp = work / "data.json"
    want = {
        "n": cfg.n,
        "image_size": cfg.image_size,
        "samples_per_shard": cfg.samples_per_shard,
        "seed": cfg.seed,
    }
    if stamp.exists() and json.loads(stamp.read_text()) == want:
        print(f"[anchors] data: reusing {shards} ({cfg.n} images)")
        return shards
    for d in ("data", "shards", "store"):  # a store of earlier data must not be read as this data's
        shutil.rmtree(work / d, ignore_errors=True)  # img2dataset's overwrite mode is broken: start clean
    data = work / "data"
    print(f"[anchors] data: {cfg.n} procedural images at {cfg.image_size}px -> {data}")
    demo_data.run(demo_data.DemoDataConfig(out=str(data), n=cfg.n, size=cfg.image_size, seed=cfg.seed))
    with serve_folder(str(data)) as base:
        urls = served_urls(data, base, work / "urls.parquet")
        summary = download.run(
            download.DownloadConfig(
                urls=str(urls),
                out=str(shards),
                image_size=cfg.image_size,
                samples_per_shard=cfg.samples_per_shard,
                processes=2,
                threads=16,
            )
        )
    if summary["successes"] != cfg.n:
        raise RuntimeError(
            f"download: {summary['successes']} of {cfg.n} images ({summary['failures_by_reason']})"
        )
    print(f"[anchors] data: {summary['successes']} images in {summary['shards']['finished']} shards")
    stamp.write_text(json.dumps(want))
    return shards


def shard_list(shards: Path) -> list[Path]:
    return sorted(shards.glob("*.tar"))


# ---------------------------------------------------------------- 2. embed vs clip-retrieval


def embed_ours(cfg: AnchorsConfig, shards: Path, out: Path, log: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "jobs.cli", "embed", "--shards", str(shards), "--out", str(out)]
    cmd += ["--clip", cfg.clip, "--pretrained", "none", "--seed", str(cfg.seed)]
    cmd += ["--batch-size", str(cfg.embed_batch), "--device", "cpu"]
    res = run_timed(cmd, log)
    _check_rc(res, "unclip embed")
    summary = json.loads((out / "logs" / "embed_summary.json").read_text())
    rows = summary["rows"]
    return {
        **res,
        "rows": rows,
        "rate": rows / res["seconds"],
        "steady_rate": summary.get("samples_per_second_in_tasks"),
    }


def embed_theirs(cfg: AnchorsConfig, tars: list[Path], out: Path, log: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    ids = [t.stem for t in tars]
    dataset = str(tars[0].parent / ("{" + ",".join(ids) + "}.tar")) if len(ids) > 1 else str(tars[0])
    cmd = [cfg.anchors_python, str(ANCHOR_SCRIPTS / "clip_retrieval_random.py"), "inference"]
    cmd += ["--input_dataset", dataset, "--output_folder", str(out), "--input_format", "webdataset"]
    cmd += ["--clip_model", f"open_clip:{cfg.clip}", "--batch_size", str(cfg.embed_batch)]
    # one DataLoader worker per shard at most: clip-retrieval hangs with more workers than shards
    cmd += ["--num_prepro_workers", str(min(len(tars), os.cpu_count() or 1)), "--enable_metadata", "False"]
    cmd += ["--wds_number_file_per_input_file", str(cfg.samples_per_shard)]
    res = run_timed(cmd, log)
    _check_rc(res, "clip-retrieval inference")
    rows = sum(np.load(p, mmap_mode="r").shape[0] for p in (out / "img_emb").glob("*.npy"))
    # clip-retrieval's own stats: its runner loop (reading, inference, writing), after model load and warm-up
    stats = [json.loads(p.read_text()) for p in (out / "stats").glob("*.json")]
    loop = sum(st.get("total_duration", 0.0) for st in stats)
    steady = sum(st.get("sample_count", 0) for st in stats) / loop if loop > 0 else None
    return {**res, "rows": rows, "rate": rows / res["seconds"], "steady_rate": steady}


def embedding_agreement(ours: Path, theirs: Path) -> dict:
    """Cosine between our and clip-retrieval's embeddings of the same keys (1.0 = the same model and inputs)."""
    import pyarrow.parquet as pq

    keys = concat_metadata(ours, ["key"])["key"]
    o_img, o_txt = (
        concat_field(ours, "img_emb").astype(np.float32),
        concat_field(ours, "text_emb").astype(np.float32),
    )
    t_img = np.concatenate([np.load(p) for p in sorted((theirs / "img_emb").glob("*.npy"))]).astype(
        np.float32
    )
    t_txt = np.concatenate([np.load(p) for p in sorted((theirs / "text_emb").glob("*.npy"))]).astype(
        np.float32
    )
    t_keys = []
    for p in sorted((theirs / "metadata").glob("*.parquet")):
        t_keys += pq.read_table(p, columns=["image_path"])["image_path"].to_pylist()
    pos = {k: i for i, k in enumerate(t_keys)}
    idx = np.array([pos[k] for k in keys])
    cos_img = (o_img * t_img[idx]).sum(1)
    cos_txt = (o_txt * t_txt[idx]).sum(1)
    return {
        "rows_matched": int(len(idx)),
        "image_cos_min": float(cos_img.min()),
        "image_cos_mean": float(cos_img.mean()),
        "text_cos_min": float(cos_txt.min()),
        "text_cos_mean": float(cos_txt.mean()),
    }


def bench_embed(cfg: AnchorsConfig, work: Path, shards: Path) -> tuple[list[dict], list[dict]]:
    """Alternating ours / clip-retrieval runs; the first of ours stays as the store the later parts read.
    Returns the comparisons and a check that both embedded the same rows with the same model."""
    tars = shard_list(shards)
    ours_rates, theirs_rates, ours_steady, theirs_steady, runs = [], [], [], [], []
    first_store = work / "store"
    for r in range(cfg.repeats):
        o = embed_ours(
            cfg, shards, first_store if r == 0 else work / "embed_ours", work / "logs" / f"embed_ours_{r}.log"
        )
        t = embed_theirs(cfg, tars, work / "embed_theirs", work / "logs" / f"embed_theirs_{r}.log")
        if o["rows"] != cfg.n or t["rows"] != cfg.n:
            raise RuntimeError(f"embed rows: ours {o['rows']}, clip-retrieval {t['rows']}, expected {cfg.n}")
        print(
            f"[anchors] embed repeat {r + 1}/{cfg.repeats}: ours {o['seconds']:.1f} s ({o['rate']:.2f} img/s), "
            f"clip-retrieval {t['seconds']:.1f} s ({t['rate']:.2f} img/s)"
        )
        ours_rates.append(o["rate"])
        theirs_rates.append(t["rate"])
        if o["steady_rate"] and t["steady_rate"]:
            ours_steady.append(o["steady_rate"])
            theirs_steady.append(t["steady_rate"])
        runs.append(
            {
                k: {f: x[f] for f in ("seconds", "rows", "rate", "steady_rate", "load_avg_1m_after")}
                for k, x in (("ours", o), ("theirs", t))
            }
        )
    agree = embedding_agreement(first_store, work / "embed_theirs")
    comp = comparison(
        "embed vs clip-retrieval inference",
        ours_rates,
        theirs_rates,
        "images/s",
        TARGETS["embed"],
        notes=(
            f"{cfg.n} images ({len(tars)} shards x {cfg.samples_per_shard}, {cfg.image_size}px JPEG), "
            f"open_clip {cfg.clip} random weights, batch {cfg.embed_batch}, CPU; image + text embeddings; "
            "wall time of each command from start to exit (imports, model creation, dask / DataLoader start-up "
            f"included); clip-retrieval with {min(len(tars), os.cpu_count() or 1)} prepro workers. "
            f"Embedding agreement ours vs theirs: image cos mean {agree['image_cos_mean']:.4f}, "
            f"text cos mean {agree['text_cos_mean']:.4f}; 1-min load average after each run, ours "
            f"{[x['ours']['load_avg_1m_after'] for x in runs]}, clip-retrieval "
            f"{[x['theirs']['load_avg_1m_after'] for x in runs]}"
        ),
    )
    comp["runs"] = runs
    comp["agreement"] = agree
    comps = [comp]
    if len(ours_steady) == cfg.repeats:
        comps.append(
            comparison(
                "embed vs clip-retrieval, past start-up (informational)",
                ours_steady,
                theirs_steady,
                "images/s",
                None,
                notes=(
                    "same runs; ours: rows / time inside the dask shard tasks (first task includes model "
                    "creation), theirs: rows / clip-retrieval's runner loop from its stats (model creation and "
                    "its 2-batch warm-up excluded)"
                ),
            )
        )
    same = {
        "name": "same work: our embeddings vs clip-retrieval's, row by row (by key)",
        "passed": bool(
            agree["rows_matched"] == cfg.n and min(agree["image_cos_min"], agree["text_cos_min"]) > 0.99
        ),
        "details": (
            f"{agree['rows_matched']} keys matched; cosine image min {agree['image_cos_min']:.5f}, text min "
            f"{agree['text_cos_min']:.5f} (same random weights from the seed, same preprocessing)"
        ),
        "rows": agree["rows_matched"],
    }
    from jobs.bench_anchors_adopt import check_adopt

    return comps, [same, check_adopt(cfg.clip, work / "embed_theirs", work)]


# ---------------------------------------------------------------- 3. stream vs embedding-reader


def stream_pass_ours(store_root: Path, batch: int, epochs: int) -> tuple[int, float]:
    from pipeline.stream import Stream, StreamConfig

    t0 = time.perf_counter()
    s = Stream(
        StreamConfig(
            str(store_root), fields=("img_emb", "text_emb"), batch_size=batch, split="train", val_fraction=0.0
        )
    )
    n, it = 0, s.torch_batches("cpu")
    for _ in range(epochs * s.steps_per_epoch):
        b = next(it)
        if len(b["img_emb"]) != len(b["text_emb"]):
            raise RuntimeError(
                f"stream paired {len(b['img_emb'])} image rows with {len(b['text_emb'])} text rows"
            )
        n += len(b["img_emb"])
    it.close()
    return n, time.perf_counter() - t0


def stream_pass_theirs(store_root: Path, batch: int, epochs: int) -> tuple[int, float]:
    """Pairs as DALLE2-pytorch's prior loader makes them: an image reader (here with the metadata keys,
    parquet_npy) zipped with a text-embedding reader; each epoch one call over every row."""
    from embedding_reader import EmbeddingReader

    t0 = time.perf_counter()
    with open(os.devnull, "w") as null, contextlib.redirect_stderr(null):  # its header scan's progress bars
        img_reader = EmbeddingReader(
            str(store_root / "img_emb"),
            file_format="parquet_npy",
            meta_columns=["key"],
            metadata_folder=str(store_root / "metadata"),
        )
        txt_reader = EmbeddingReader(str(store_root / "text_emb"), file_format="npy")
    n = 0
    for _ in range(epochs):
        pairs = zip(
            img_reader(batch_size=batch, show_progress=False),
            txt_reader(batch_size=batch, show_progress=False),
        )
        for (img, _meta), (txt, _) in pairs:
            if len(img) != len(txt):
                raise RuntimeError(f"embedding-reader paired {len(img)} image rows with {len(txt)} text rows")
            n += len(img)
    return n, time.perf_counter() - t0


def stream_comparison(name: str, store_root: Path, batch: int, epochs: int, repeats: int, notes: str) -> dict:
    """Pairs/s of both readers over ``epochs`` passes of the store. Ours serves whole batches of an endless
    shuffled order (``steps_per_epoch`` a pass); embedding-reader ends each pass with a partial batch."""
    from pipeline import store

    rows = sum(n for _, n in store.shard_rows(store_root))
    want_ours, want_theirs = epochs * (rows // batch) * batch, epochs * rows
    ours, theirs = [], []
    stream_pass_ours(store_root, batch, 1)  # page cache and imports warm for both
    stream_pass_theirs(store_root, batch, 1)
    for r in range(repeats):
        n_o, s_o = stream_pass_ours(store_root, batch, epochs)
        n_t, s_t = stream_pass_theirs(store_root, batch, epochs)
        if n_o != want_ours or n_t != want_theirs:
            raise RuntimeError(
                f"pairs delivered: stream {n_o} (expected {want_ours}), embedding-reader {n_t} (expected {want_theirs})"
            )
        print(
            f"[anchors] {name} repeat {r + 1}/{repeats}: ours {n_o / s_o:,.0f} pairs/s, "
            f"embedding-reader {n_t / s_t:,.0f} pairs/s ({n_o:,} pairs each)"
        )
        ours.append(n_o / s_o)
        theirs.append(n_t / s_t)
    return comparison(name, ours, theirs, "pairs/s", TARGETS["stream"], notes=notes)


def bench_stream(cfg: AnchorsConfig, store_root: Path, work: Path) -> list[dict]:
    from pipeline import store

    how = (
        "ours: Stream.torch_batches (shuffled train split, val_fraction 0), theirs: EmbeddingReader parquet_npy "
        "(img_emb + metadata key) zipped with npy (text_emb), as DALLE2-pytorch's prior loader pairs them; "
        "in-process, opening included, page cache warm"
    )
    rows = sum(n for _, n in store.shard_rows(store_root))
    comps = [
        stream_comparison(
            "stream vs EmbeddingReader",
            store_root,
            cfg.stream_batch,
            cfg.stream_epochs,
            cfg.stream_repeats,
            f"(img_emb, text_emb) pairs of the embed store ({rows} rows, 512-d float16), batch "
            f"{cfg.stream_batch}, {cfg.stream_epochs} passes; {how}. At this size each pass is dominated by "
            "embedding-reader's per-call set-up (a thread pool and a pandas piece table per call)",
        )
    ]
    if cfg.scale_shards:
        big = make_scale_store(
            work / "scale_store", cfg.scale_shards, cfg.scale_rows_per_shard, seed=cfg.seed
        )
        n = cfg.scale_shards * cfg.scale_rows_per_shard
        comps.append(
            stream_comparison(
                "stream vs EmbeddingReader, larger store",
                big,
                cfg.stream_batch,
                cfg.scale_epochs,
                cfg.stream_repeats,
                f"same readers on a {n:,}-row store ({cfg.scale_shards} shards x {cfg.scale_rows_per_shard}, "
                f"random 512-d float16 rows written by pipeline.store), batch {cfg.stream_batch}, "
                f"{cfg.scale_epochs} pass; {how}",
            )
        )
    return comps


# ---------------------------------------------------------------- 4. train-prior vs dalle2-pytorch


def our_prior_config(**overrides):
    """The vit-b-32 preset conditioned on the text embedding only (no per-token encodings), as compared."""
    from models.prior import prior_config

    return prior_config("vit-b-32", **{"emb_dim": 512, "text_enc_dim": 0, **overrides})


def prior_worker(args: dict) -> dict:
    """Our side of the train-prior comparison, in its own process: AdamW steps on random embeddings.
    ``args``: batch, warmup, steps, seed, and optional ``overrides`` of the prior config (tests only)."""
    import torch
    import torch.nn.functional as F

    from models.prior import DiffusionPrior

    torch.manual_seed(args["seed"])
    cfg = our_prior_config(**args.get("overrides", {}))
    model = DiffusionPrior(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=6e-2)
    gen = torch.Generator().manual_seed(args["seed"])
    img = F.normalize(torch.randn(args["batch"], cfg.emb_dim, generator=gen), dim=-1)
    txt = F.normalize(torch.randn(args["batch"], cfg.emb_dim, generator=gen), dim=-1)
    times, losses = [], []
    for i in range(args["warmup"] + args["steps"]):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = model.loss(img, txt)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        dt_ = time.perf_counter() - t0
        losses.append(float(loss.detach()))
        if i >= args["warmup"]:
            times.append(dt_)
    return {
        "impl": "unclip-pipeline",
        "step_seconds": times,
        "samples_per_s": args["batch"] / statistics.median(times),
        "params": sum(p.numel() for p in model.parameters()),
        "losses": losses,
        "torch_threads": torch.get_num_threads(),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "config": {**args, **asdict(cfg)},
    }


def prior_ours(cfg: AnchorsConfig, log: Path) -> dict:
    args = {
        "batch": cfg.prior_batch,
        "warmup": cfg.ours_prior_warmup,
        "steps": cfg.ours_prior_steps,
        "seed": cfg.seed,
    }
    res = run_timed([sys.executable, "-m", "jobs.bench_anchors", "--prior-worker", json.dumps(args)], log)
    _check_rc(res, "our prior step")
    return {**_last_json(res["stdout"]), "load_avg_1m_after": res["load_avg_1m_after"]}


def prior_theirs(cfg: AnchorsConfig, log: Path, max_text_len: int) -> dict:
    pc = our_prior_config()
    cmd = [cfg.anchors_python, str(ANCHOR_SCRIPTS / "dalle2_prior_step.py")]
    cmd += ["--dim", str(pc.dim), "--depth", str(pc.depth), "--heads", str(pc.heads)]
    cmd += ["--dim-head", str(pc.head_dim or pc.dim // pc.heads), "--ff-mult", str(pc.ff_mult)]
    cmd += ["--dropout", str(pc.dropout), "--cond-drop-prob", str(pc.cond_drop_prob)]
    cmd += ["--timesteps", str(pc.timesteps), "--max-text-len", str(max_text_len)]
    cmd += [
        "--batch",
        str(cfg.prior_batch),
        "--warmup",
        str(cfg.prior_warmup),
        "--steps",
        str(cfg.prior_steps),
    ]
    cmd += ["--seed", str(cfg.seed)]
    res = run_timed(cmd, log)
    _check_rc(res, "dalle2-pytorch prior step")
    return {**_last_json(res["stdout"]), "load_avg_1m_after": res["load_avg_1m_after"]}


def bench_prior(cfg: AnchorsConfig, work: Path) -> list[dict]:
    pc = our_prior_config()
    if pc.dim != pc.emb_dim:
        raise RuntimeError("dalle2-pytorch's prior needs width == embedding size")
    ours, theirs = [], []
    for r in range(cfg.repeats):
        o = prior_ours(cfg, work / "logs" / f"prior_ours_{r}.log")
        t = prior_theirs(cfg, work / "logs" / f"prior_theirs_{r}.log", cfg.dalle2_max_text_len)
        print(
            f"[anchors] train-prior repeat {r + 1}/{cfg.repeats}: ours {o['samples_per_s']:,.0f} samples/s "
            f"({o['peak_rss_mb']:,.0f} MB), dalle2-pytorch {t['samples_per_s']:,.2f} samples/s "
            f"({t['peak_rss_mb']:,.0f} MB)"
        )
        ours.append(o)
        theirs.append(t)
    shape = (
        f"width {pc.dim}, depth {pc.depth}, {pc.heads} heads x {pc.head_dim}, ff x{pc.ff_mult}, dropout "
        f"{pc.dropout}, embeddings {pc.emb_dim}, batch {cfg.prior_batch}, conditioned on the text embedding only, "
        f"AdamW + grad clip, CPU; params ours {ours[0]['params']:,}, dalle2 {theirs[0]['params']:,}"
    )
    comps = [
        comparison(
            "train-prior step vs dalle2-pytorch DiffusionPrior",
            [o["samples_per_s"] for o in ours],
            [t["samples_per_s"] for t in theirs],
            "samples/s",
            TARGETS["prior"],
            notes=(
                f"{shape}; dalle2 max_text_len {cfg.dalle2_max_text_len} (its default: it attends over that many "
                f"padded text positions even without text encodings); median of {cfg.ours_prior_steps} (ours) / "
                f"{cfg.prior_steps} (dalle2) steps after {cfg.ours_prior_warmup} / {cfg.prior_warmup} warm-up; "
                "our small per-step ops slow down several-fold when other processes hold the cores (2 torch "
                "threads on 2 shared cores): 1-min load average after each run, ours "
                f"{[o['load_avg_1m_after'] for o in ours]}, dalle2 {[t['load_avg_1m_after'] for t in theirs]}"
            ),
        ),
        comparison(
            "train-prior peak RSS vs dalle2-pytorch",
            [o["peak_rss_mb"] for o in ours],
            [t["peak_rss_mb"] for t in theirs],
            "MB",
            None,
            higher_is_better=False,
            notes="peak RSS of each process (ru_maxrss), same runs as above",
        ),
    ]
    comps[0]["runs"] = {"ours": ours, "theirs": theirs}
    if cfg.extra_max_text_len:
        ours_x, theirs_x = [], []
        for r in range(cfg.repeats):
            o = prior_ours(cfg, work / "logs" / f"prior_ours_short_{r}.log")
            t = prior_theirs(cfg, work / "logs" / f"prior_theirs_short_{r}.log", cfg.extra_max_text_len)
            print(
                f"[anchors] train-prior, dalle2 max_text_len {cfg.extra_max_text_len}, repeat {r + 1}/{cfg.repeats}: "
                f"ours {o['samples_per_s']:,.1f}, dalle2-pytorch {t['samples_per_s']:,.2f} samples/s"
            )
            ours_x.append(o)
            theirs_x.append(t)
        extra = comparison(
            f"train-prior step vs dalle2-pytorch, its max_text_len={cfg.extra_max_text_len} (informational)",
            [o["samples_per_s"] for o in ours_x],
            [t["samples_per_s"] for t in theirs_x],
            "samples/s",
            None,
            notes=(
                f"{shape}; dalle2 padded to CLIP's context length instead of its default; 1-min load average "
                f"after each run, ours {[o['load_avg_1m_after'] for o in ours_x]}, dalle2 "
                f"{[t['load_avg_1m_after'] for t in theirs_x]}"
            ),
        )
        extra["runs"] = {"ours": ours_x, "theirs": theirs_x}
        comps.append(extra)
    return comps


# ---------------------------------------------------------------- 5. interoperability


def check_embedding_reader(store_root: Path) -> list[dict]:
    """embedding-reader (parquet_npy) reads our img_emb/ and text_emb/ with metadata: rows, values, keys."""
    from embedding_reader import EmbeddingReader

    meta = concat_metadata(store_root, ["key", "caption"])
    checks = []
    for field in ("img_emb", "text_emb"):
        name = f"embedding-reader parquet_npy reads {field}/ + metadata/"
        want = concat_field(store_root, field).astype(np.float32)
        try:
            reader = EmbeddingReader(
                str(store_root / field),
                file_format="parquet_npy",
                meta_columns=["key", "caption"],
                metadata_folder=str(store_root / "metadata"),
            )
            embs, keys, captions = [], [], []
            for emb, m in reader(batch_size=max(1, min(100, reader.count // 3)), show_progress=False):
                embs.append(emb)
                keys += m["key"].tolist()
                captions += m["caption"].tolist()
            got = np.concatenate(embs)
        except Exception as e:  # it cannot read the store: that is the check failing, not the benchmark
            checks.append(
                {
                    "name": name,
                    "passed": False,
                    "details": f"embedding-reader raised {type(e).__name__}: {e}",
                    "rows": 0,
                }
            )
            continue
        same = got.shape == want.shape and np.array_equal(got, want)
        passed = (
            int(reader.count) == len(want) == len(got)
            and reader.dimension == want.shape[1]
            and same
            and keys == meta["key"]
            and captions == meta["caption"]
        )
        checks.append(
            {
                "name": name,
                "passed": bool(passed),
                "details": (
                    f"{int(reader.count)} rows (store {len(want)}), dim {reader.dimension}, embeddings "
                    f"{'equal' if same else 'DIFFER'}, keys {'match' if keys == meta['key'] else 'DIFFER'}, "
                    f"captions {'match' if captions == meta['caption'] else 'DIFFER'}"
                ),
                "rows": int(reader.count),
            }
        )
    return checks


def check_dalle2_loader(cfg: AnchorsConfig, store_root: Path, work: Path) -> list[dict]:
    """DALLE2-pytorch's get_reader/make_splits (in .venv-anchors) read our store; compare with the store."""
    import open_clip

    out = work / "dalle2_loader.npz"
    out.unlink(missing_ok=True)
    cmd = [cfg.anchors_python, str(ANCHOR_SCRIPTS / "dalle2_loader_check.py"), "--store", str(store_root)]
    cmd += ["--out", str(out), "--batch", "32"]
    res = run_timed(cmd, work / "logs" / "dalle2_loader.log")
    _check_rc(res, "dalle2-pytorch prior loader")
    info = _last_json(res["stdout"])
    got = np.load(out)
    img = concat_field(store_root, "img_emb").astype(np.float32)
    txt = concat_field(store_root, "text_emb").astype(np.float32)
    captions = concat_metadata(store_root, ["caption"])["caption"]
    tokens = open_clip.tokenize(captions).numpy()
    n = len(img)
    pairs_ok = (
        got["img"].shape == img.shape and np.array_equal(got["img"], img) and np.array_equal(got["txt"], txt)
    )
    tc_ok = (
        got["img_tc"].shape == img.shape
        and np.array_equal(got["img_tc"], img)
        and got["tokens"].shape == tokens.shape
        and np.array_equal(got["tokens"], tokens)
    )
    return [
        {
            "name": "DALLE2-pytorch get_reader/make_splits: img_emb/ + text_emb/ pairs",
            "passed": bool(pairs_ok and sum(info["split_sizes"]) == n),
            "details": (
                f"train/eval/test {'/'.join(map(str, info['split_sizes']))} of {n} rows; image and text "
                f"embeddings {'equal to the store' if pairs_ok else 'DIFFER from the store'}"
            ),
            "rows": int(sum(info["split_sizes"])),
        },
        {
            "name": "DALLE2-pytorch get_reader/make_splits: img_emb/ + metadata/ captions",
            "passed": bool(tc_ok and sum(info["caption_split_sizes"]) == n),
            "details": (
                f"train/eval/test {'/'.join(map(str, info['caption_split_sizes']))} of {n} rows; image "
                f"embeddings {'equal' if tc_ok else 'DIFFER'}; its CLIP tokens of the captions "
                f"{'equal' if tc_ok else 'DIFFER from'} open_clip's tokens of our metadata captions"
            ),
            "rows": int(sum(info["caption_split_sizes"])),
        },
    ]


# ---------------------------------------------------------------- report


def _git_commit() -> str:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "") if sha else "unknown"
    except OSError:
        return "unknown"


def _versions(anchors_python: str | None) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    def ours(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    out = {
        "ours": {p: ours(p) for p in ("torch", "open_clip_torch", "numpy", "embedding-reader", "img2dataset")}
    }
    if anchors_python and os.path.exists(anchors_python):
        code = (
            "import json; from importlib.metadata import version as v; "
            "print(json.dumps({p: v(p) for p in ('clip-retrieval', 'dalle2-pytorch', 'open_clip_torch', 'torch', "
            "'numpy', 'pyarrow', 'embedding-reader')}))"
        )
        r = subprocess.run([anchors_python, "-c", code], capture_output=True, text=True)
        out["anchors"] = json.loads(r.stdout) if r.returncode == 0 else {"error": r.stderr.strip()[-300:]}
    return out


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def _fmt(v: float) -> str:
    if v >= 100:
        return f"{v:,.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"Machine: {m['platform']}, {m['cpu_count']} CPUs ({m['processor']}), Python {m['python']}, "
        f"load average at start {m['load_avg_at_start'][0]}. Date {report['date']}, commit {report['commit']}.",
        "",
        "| comparison | ours | theirs | units | ratio median (min–max) | repeats | target | met |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in report["comparisons"]:
        r = c["ratio"]
        lines.append(
            f"| {c['name']} | {_fmt(c['ours']['median'])} | {_fmt(c['theirs']['median'])} | {c['units']} | "
            f"{_fmt(r['median'])}× ({_fmt(r['min'])}–{_fmt(r['max'])}) | {c['repeats']} | "
            f"{'≥ ' + str(c['target']) + '×' if c['target'] is not None else '—'} | "
            f"{'—' if c['met'] is None else ('yes' if c['met'] else 'NO')} |"
        )
    if report["checks"]:
        lines += ["", "| interoperability check | result | details |", "|---|---|---|"]
        for ch in report["checks"]:
            lines.append(f"| {ch['name']} | {'pass' if ch['passed'] else 'FAIL'} | {ch['details']} |")
    if report["failures"]:
        lines += ["", "Could not run:"]
        lines += [f"- {f['part']}: {f['error'].splitlines()[0]}" for f in report["failures"]]
    lines += ["", "Notes:"]
    lines += [f"- {c['name']}: {c['notes']}" for c in report["comparisons"] if c.get("notes")]
    v = report.get("versions", {})
    if v:
        lines.append(
            "- versions: ours "
            + ", ".join(f"{k} {x}" for k, x in v.get("ours", {}).items())
            + "; anchors "
            + ", ".join(f"{k} {x}" for k, x in v.get("anchors", {}).items())
        )
    return "\n".join(lines) + "\n"


def write_report(report: dict, out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    j, md = out / "anchors.json", out / "anchors.md"
    j.write_text(json.dumps(report, indent=2, default=str) + "\n")
    md.write_text("# Benchmarks against the reference tools (`make bench-anchors`)\n\n" + markdown(report))
    return j, md


# ---------------------------------------------------------------- main


def run(cfg: AnchorsConfig) -> dict:
    start = time.perf_counter()
    parts = [p.strip() for p in cfg.parts.split(",") if p.strip()]
    bad = [p for p in parts if p not in PARTS]
    if bad:
        raise SystemExit(f"unknown part(s) {bad}; valid: {', '.join(PARTS)}")
    work = (ROOT / cfg.work).resolve() if not os.path.isabs(cfg.work) else Path(cfg.work)
    work.mkdir(parents=True, exist_ok=True)
    if not os.path.isabs(cfg.anchors_python):
        cfg.anchors_python = str(ROOT / cfg.anchors_python)
    anchors_ok = os.path.exists(cfg.anchors_python)
    report = {
        "machine": machine(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": _git_commit(),
        "config": asdict(cfg),
        "comparisons": [],
        "checks": [],
        "failures": [],
    }

    def attempt(part: str, fn):
        try:
            return fn()
        except Exception as e:  # one part failing must not lose the others' figures
            traceback.print_exc()
            report["failures"].append({"part": part, "error": f"{type(e).__name__}: {e}"})
            return None

    def need_anchors(part: str) -> bool:
        if not anchors_ok:
            report["failures"].append(
                {
                    "part": part,
                    "error": f"{cfg.anchors_python} not found: run `make bench-anchors` to create it",
                }
            )
        return anchors_ok

    if cfg.store:  # an existing store for the stream and interoperability parts (the smoke test's way)
        store_root, shards = Path(cfg.store).resolve(), None
        if "embed" in parts:
            report["failures"].append(
                {"part": "embed", "error": "--store given: embed needs the generated shards"}
            )
    else:
        store_root = work / "store"
        shards = attempt("data", lambda: make_data(cfg, work)) if set(parts) - {"prior", "decoder"} else None
    if shards is not None:
        if "embed" in parts and need_anchors("embed"):
            comps, checks = attempt("embed", lambda: bench_embed(cfg, work, shards)) or ([], [])
            report["comparisons"] += comps
            report["checks"] += checks
        if not (store_root / "manifest.json").exists() and {"stream", "interop"} & set(parts):
            print("[anchors] store: embedding the shards once for the stream and interoperability parts")
            attempt("store", lambda: embed_ours(cfg, shards, store_root, work / "logs" / "embed_store.log"))
    have_store = (store_root / "manifest.json").exists()
    if {"stream", "interop"} & set(parts) and not have_store and not report["failures"]:
        report["failures"].append({"part": "store", "error": f"no store at {store_root}"})
    if "stream" in parts and have_store:
        report["comparisons"] += attempt("stream", lambda: bench_stream(cfg, store_root, work)) or []
    if "prior" in parts and need_anchors("prior"):
        report["comparisons"] += attempt("prior", lambda: bench_prior(cfg, work)) or []
    if "decoder" in parts and need_anchors("decoder"):
        from jobs.bench_anchors_decoder import bench_decoder

        report["comparisons"] += attempt("decoder", lambda: bench_decoder(cfg, work)) or []
    if "interop" in parts and have_store:
        report["checks"] += (
            attempt("interop: embedding-reader", lambda: check_embedding_reader(store_root)) or []
        )
        if need_anchors("interop: dalle2-pytorch loader"):
            report["checks"] += (
                attempt("interop: dalle2-pytorch loader", lambda: check_dalle2_loader(cfg, store_root, work))
                or []
            )
    report["machine"]["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    report["versions"] = _versions(cfg.anchors_python if anchors_ok else None)
    report["seconds"] = round(time.perf_counter() - start, 1)
    j, md = write_report(report, ROOT / cfg.out if not os.path.isabs(cfg.out) else Path(cfg.out))
    print()
    print(markdown(report))
    print(f"[anchors] wrote {j} and {md} in {report['seconds']} s")
    report["exit_code"] = 1 if report["failures"] or not all(c["passed"] for c in report["checks"]) else 0
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.bench_anchors", description=__doc__.split("\n\n")[0])
    for f in fields(AnchorsConfig):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    p.add_argument("--prior-worker", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.prior_worker:
        print(json.dumps(prior_worker(json.loads(a.prior_worker))))
        return 0
    cfg = AnchorsConfig(**{f.name: getattr(a, f.name) for f in fields(AnchorsConfig)})
    return run(cfg)["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
