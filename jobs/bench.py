"""`make bench` / `unclip bench`: each stage against its physical limit, side by side in one run.

Generates its own data under ``--out``/work (procedural images served on 127.0.0.1, synthetic stores) and
writes ``--out``/results.json and ``--out``/results.md. Every figure is a ratio of two measurements taken
alternately in the same run, repeated ``--repeats`` times (median and min..max), because shared machines are
noisy. Each measured command runs as its own process, so its peak RSS is its own.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from jobs.checkpoint import code_version
from jobs.http_server import serve_folder

PY = sys.executable


@dataclass
class BenchConfig:
    out: str = "bench"
    repeats: int = 3
    quick: bool = False  # tiny sizes: the smoke test's setting, figures not meaningful
    clip: str = (
        "ViT-B-32"  # the embed ratio's model (random weights), batch 64: the common CPU-feasible setting
    )
    stages: str = "download,embed,stream,prior,decoder"


def _measure(cmd: list[str], env: dict | None = None) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in MB of the process and its reaped children, stdout)."""
    with (
        tempfile.TemporaryFile("w+") as err,
        subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=err, text=True, env={**os.environ, **(env or {})}
        ) as proc,
    ):
        t0 = time.perf_counter()
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            tail = err.read().strip().splitlines()[-3:]
            raise RuntimeError(f"{' '.join(map(str, cmd[:6]))} ... exited {proc.returncode}: {tail}")
    return seconds, usage.ru_maxrss / 1024, out


def _ratio(ours: list[float], theirs: list[float], higher_is_better: bool = True) -> dict:
    r = [o / t for o, t in zip(ours, theirs)]
    return {
        "ours": ours,
        "theirs": theirs,
        "ratio_median": statistics.median(r),
        "ratio_min": min(r),
        "ratio_max": max(r),
        "repeats": len(r),
    }


# ---------------------------------------------------------------- download


def bench_download(cfg: BenchConfig, work: Path) -> dict:
    from pipeline import demo_data

    n = 64 if cfg.quick else 2000
    data = work / "dl_data"
    if not (data / "demo.parquet").exists():
        demo_data.run(demo_data.DemoDataConfig(out=str(data), n=n, size=64, seed=1))
    ours, theirs = [], []
    with serve_folder(str(data)) as base:
        from jobs.demo import served_urls

        urls = served_urls(data, base, work / "dl_urls.parquet")
        common = ["--processes", "2", "--threads", "16"]
        for i in range(cfg.repeats):
            for who in ("theirs", "ours"):  # alternate, so drifting machine load hits both alike
                out = work / f"dl_{who}_{i}"
                shutil.rmtree(out, ignore_errors=True)
                if who == "ours":
                    cmd = [
                        PY,
                        "-m",
                        "jobs.cli",
                        "download",
                        "--urls",
                        str(urls),
                        "--out",
                        str(out),
                        "--image-size",
                        "64",
                        "--samples-per-shard",
                        "500",
                        *common,
                    ]
                else:
                    cmd = [
                        str(Path(PY).parent / "img2dataset"),
                        "--url_list",
                        str(urls),
                        "--input_format",
                        "parquet",
                        "--url_col",
                        "url",
                        "--caption_col",
                        "caption",
                        "--output_format",
                        "webdataset",
                        "--output_folder",
                        str(out),
                        "--image_size",
                        "64",
                        "--resize_mode",
                        "center_crop",
                        "--number_sample_per_shard",
                        "500",
                        "--processes_count",
                        "2",
                        "--thread_count",
                        "16",
                        "--save_additional_columns",
                        "['background','shape1','color1','position1','shape2','color2','position2']",
                    ]
                seconds, _, _ = _measure(cmd, {"WANDB_MODE": "disabled", "NO_ALBUMENTATIONS_UPDATE": "1"})
                (ours if who == "ours" else theirs).append(seconds)
    r = _ratio(ours, theirs)
    return {
        "download_overhead": {
            **r,
            "unit": "seconds, ours / bare img2dataset",
            "images": n,
            "target": "<= 1.05",
            "met": r["ratio_median"] <= 1.05,
        }
    }


def _probe(name: str, **kw) -> list[str]:
    """A command that runs one measurement in a fresh process and prints its JSON result."""
    return [PY, "-m", "jobs.bench", "--probe", name, json.dumps(kw)]


def _probe_json(name: str, **kw) -> tuple[dict, float]:
    _, rss, out = _measure(_probe(name, **kw))
    return json.loads(out.strip().splitlines()[-1]), rss


# ---------------------------------------------------------------- embed


def _embed_data(cfg: BenchConfig, work: Path) -> Path:
    """4 shards of procedural 256 px images, downloaded through img2dataset from 127.0.0.1."""
    from jobs.demo import served_urls
    from pipeline import demo_data, download

    shards = work / "emb_shards"
    per = 16 if cfg.quick else 128
    if (shards / "summary/download_summary.json").exists():
        return shards
    data = work / "emb_data"
    demo_data.run(demo_data.DemoDataConfig(out=str(data), n=4 * per, size=256, seed=2))
    with serve_folder(str(data)) as base:
        urls = served_urls(data, base, work / "emb_urls.parquet")
        download.run(
            download.DownloadConfig(
                urls=str(urls),
                out=str(shards),
                image_size=256,
                samples_per_shard=per,
                processes=2,
                threads=16,
            )
        )
    return shards


def _embed_cmd(shards: str, out: Path, clip: str) -> list[str]:
    return [
        PY,
        "-m",
        "jobs.cli",
        "embed",
        "--shards",
        shards,
        "--out",
        str(out),
        "--clip",
        clip,
        "--pretrained",
        "none",
        "--batch-size",
        "64",
        "--device",
        "cpu",
    ]


def bench_embed(cfg: BenchConfig, work: Path) -> dict:
    shards = _embed_data(cfg, work)
    clip = "unclip-tiny" if cfg.quick else cfg.clip
    two = str(shards / "{00000..00001}.tar")
    e2e, in_task, fwd, fwd_full, rss = [], [], [], [], []
    for i in range(cfg.repeats):
        out = work / f"emb_store_{i}"
        shutil.rmtree(out, ignore_errors=True)
        seconds, _, stdout = _measure(_embed_cmd(two, out, clip))
        summary = json.loads(stdout[stdout.index("{") :])
        e2e.append(summary["rows"] / seconds)
        in_task.append(summary["samples_per_second_in_tasks"])
        rss.append(summary["worker_peak_rss_mb"])
        f, _ = _probe_json("forward", clip=clip, store=str(out), batch=64)
        fwd.append(f["images_per_s"])
        fwd_full.append(f["images_per_s_full_context"])
    doubling = {}
    for n in ("00001", "00003"):  # 2 shards, then 4: the worker's peak RSS should not follow the data
        out = work / f"emb_rss_{n}"
        shutil.rmtree(out, ignore_errors=True)
        _, _, stdout = _measure(_embed_cmd(str(shards / f"{{00000..{n}}}.tar"), out, "unclip-tiny"))
        doubling[f"{int(n) + 1}_shards"] = json.loads(stdout[stdout.index("{") :])["worker_peak_rss_mb"]
    r, rt = _ratio(e2e, fwd), _ratio(in_task, fwd)
    return {
        "embed_vs_forward": {
            **r,
            "unit": f"images/s end to end (dask + model start-up included) / pure forward, {clip}, batch 64",
            "target": ">= 0.9",
            "met": r["ratio_median"] >= 0.9,
        },
        "embed_in_tasks_vs_forward": {
            **rt,
            "unit": "images/s inside the shard tasks / pure forward",
            "target": ">= 0.9",
            "met": rt["ratio_median"] >= 0.9,
        },
        "embed_trimmed_vs_full_context_forward": {
            **_ratio(fwd, fwd_full),
            "unit": "pure forward images/s, text tower trimmed to the batch's longest caption / 77 tokens",
        },
        "embed_peak_rss": {"worker_peak_rss_mb": rss, "doubling_unclip_tiny_mb": doubling},
    }


def probe_forward(clip: str, store: str, batch: int) -> dict:
    """Pure model forward on pre-made tensors: the same captions the store holds, random pixels."""
    import pyarrow.parquet as pq
    import torch

    from pipeline.encoders import encode_image, encode_text, load_clip

    torch.set_num_threads(os.cpu_count())
    c = load_clip(clip, "none", "cpu", 0)
    caps = [
        c
        for p in sorted(Path(store, "metadata").glob("*.parquet"))
        for c in pq.read_table(p, columns=["caption"])["caption"].to_pylist()
    ]
    batch = min(batch, len(caps))
    size = c.preprocess.transforms[1].size if hasattr(c.preprocess, "transforms") else (224, 224)
    images = torch.randn(batch, 3, *size)
    batches = [c.tokenizer(caps[i : i + batch]) for i in range(0, len(caps) - batch + 1, batch)]
    res = {}
    for name, fn in (
        ("images_per_s", lambda t: encode_text(c, t)),
        ("images_per_s_full_context", lambda t: c.model.encode_text(t)),
    ):
        with torch.no_grad():
            encode_image(c, images[:2]), fn(batches[0][:2])  # warm-up
            t0 = time.perf_counter()
            for tok in batches:
                encode_image(c, images[: len(tok)])
                fn(tok)
        res[name] = len(batches) * batch / (time.perf_counter() - t0)
    return res


# ---------------------------------------------------------------- stream


def random_store(root: Path, shards: int, rows: int, dim: int = 512, seed: int = 0) -> Path:
    """A store of random unit rows (float16, ``dim``) with key/caption metadata, written by `pipeline.store`
    like the embed stage writes one. Reused when it exists with the same shape."""
    import pyarrow as pa

    from pipeline import store

    want = {"shards": shards, "rows": rows, "dim": dim, "seed": seed}
    stamp = root / "scale.json"
    if stamp.exists() and json.loads(stamp.read_text()) == want:
        return root
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(seed)
    manifest = store.Manifest.new(
        {"bench_scale_store": want}, store.ClipInfo("random", "none", dim, random_init=True)
    )
    store.write_manifest(root, manifest)
    for i in range(shards):
        sid = f"{i:05d}"
        arrays = {}
        for f in ("img_emb", "text_emb"):
            x = rng.standard_normal((rows, dim), dtype=np.float32)
            arrays[f] = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)
        meta = pa.table(
            {"key": [f"{sid}{j:05d}" for j in range(rows)], "caption": [f"row {j}" for j in range(rows)]}
        )
        store.write_shard(
            root, sid, arrays, {"metadata": meta, "errors": None}, rows, {"source": f"random/{sid}"}
        )
    manifest.shards = [{"shard": s, "rows": n} for s, n in store.shard_rows(root)]
    store.write_manifest(root, manifest)
    stamp.write_text(json.dumps(want))
    return root


def probe_mmap(store: str) -> dict:
    """Plain sequential np.load(mmap_mode="r") of every img_emb and text_emb file: the bandwidth bound."""
    from pipeline import store as fmt

    t0, pairs = time.perf_counter(), 0
    for sid, n in fmt.shard_rows(store):
        for field in ("img_emb", "text_emb"):
            np.array(fmt.open_array(store, field, sid))
        pairs += n
    return {"pairs_per_s": pairs / (time.perf_counter() - t0)}


def probe_stream(store: str, batch: int) -> dict:
    from pipeline.stream import Stream, StreamConfig

    s = Stream(StreamConfig(store, batch_size=batch, split="train", val_fraction=0.0))  # shuffled
    it = s.torch_batches("cpu")
    next(it)  # thread start-up
    t0, pairs = time.perf_counter(), 0
    for _ in range(s.steps_per_epoch - 1):
        pairs += len(next(it)["img_emb"])
    return {"pairs_per_s": pairs / (time.perf_counter() - t0)}


def bench_stream(cfg: BenchConfig, work: Path) -> dict:
    shards, rows = (4, 2048) if cfg.quick else (32, 8192)  # 4 shuffle blocks of 8 shards
    one = random_store(work / "stream_1x", shards, rows, 512)
    two = random_store(work / "stream_2x", 2 * shards, rows, 512)
    _probe_json("mmap", store=str(two))  # warm the page cache: both sides then read from memory
    ours, base, rss = [], [], {}
    for _ in range(cfg.repeats):
        b, _ = _probe_json("mmap", store=str(one))
        o, rss["1x"] = _probe_json("stream", store=str(one), batch=4096)
        base.append(b["pairs_per_s"])
        ours.append(o["pairs_per_s"])
    _, rss["2x"] = _probe_json("stream", store=str(two), batch=4096)
    r = _ratio(ours, base)
    mb = shards * rows * 512 * 2 * 2 / 2**20
    return {
        "stream_vs_mmap": {
            **r,
            "unit": f"pairs/s (512-d float16 pairs, batch 4096, shuffled) / sequential "
            f"np.load(mmap) bandwidth, {mb:.0f} MB store",
            "target": ">= 0.5",
            "met": r["ratio_median"] >= 0.5,
        },
        "stream_peak_rss_mb": {**rss, "store_mb_1x": round(mb), "store_mb_2x": round(2 * mb)},
    }


# ---------------------------------------------------------------- prior


def probe_prior(preset: str, batch: int, steps: int, sample_prompts: int, sample_steps: int) -> dict:
    import torch

    from models.prior import DiffusionPrior, prior_config

    torch.manual_seed(0)
    prior = DiffusionPrior(prior_config(preset, emb_dim=512 if preset != "tiny" else 64, text_enc_dim=0))
    opt = torch.optim.AdamW(prior.parameters(), lr=1e-4)
    d = prior.cfg.emb_dim
    img, txt = torch.randn(batch, d), torch.randn(batch, d)

    def step():
        loss = prior.loss(img, txt)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    train = batch * steps / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    with torch.no_grad():
        prior.sample(torch.randn(sample_prompts, d), steps=sample_steps)
    return {"train_samples_per_s": train, "sample_seconds": time.perf_counter() - t0}


def bench_prior(cfg: BenchConfig, work: Path) -> dict:
    preset = "tiny" if cfg.quick else "vit-b-32"
    kw = dict(
        preset=preset,
        batch=64,
        steps=3 if cfg.quick else 10,
        sample_prompts=64,
        sample_steps=4 if cfg.quick else 64,
    )
    runs = [_probe_json("prior", **kw) for _ in range(cfg.repeats)]
    train = [r["train_samples_per_s"] for r, _ in runs]
    sample = [r["sample_seconds"] for r, _ in runs]
    rss = {}
    for tag, shards in (("1x", 4), ("2x", 8)):  # the trainer over a store twice as large
        data = random_store(work / f"prior_{tag}", shards, 2048, 64)
        out = work / f"prior_run_{tag}"
        shutil.rmtree(out, ignore_errors=True)
        _, rss[tag], _ = _measure(
            [
                PY,
                "-m",
                "jobs.cli",
                "train-prior",
                "--data",
                str(data),
                "--out",
                str(out),
                "--steps",
                "20",
                "--eval-every",
                "0",
                "--batch-size",
                "64",
            ]
        )
    return {
        "prior_train": {
            "samples_per_s": train,
            "median": statistics.median(train),
            "preset": preset,
            "batch": 64,
            "unit": "train-step samples/s on CPU",
        },
        "prior_sample": {
            "seconds": sample,
            "median": statistics.median(sample),
            "prompts": 64,
            "ddim_steps": kw["sample_steps"],
            "unit": "seconds to sample 64 prompts",
        },
        "prior_peak_rss_mb": rss,
    }


# ---------------------------------------------------------------- report


def bench_decoder(cfg: BenchConfig, work: Path) -> dict:
    from jobs.bench_decoder import bench_decoder as run_decoder

    return run_decoder(cfg, work)


STAGES = {
    "download": bench_download,
    "embed": bench_embed,
    "stream": bench_stream,
    "prior": bench_prior,
    "decoder": bench_decoder,
}


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, list):
        return ", ".join(_fmt(x) for x in v)
    if isinstance(v, dict):
        return "; ".join(f"{k} {_fmt(x)}" for k, x in v.items())
    return str(v)


def markdown(results: dict) -> str:
    lines = [
        f"Machine: {results['machine']}; {results['date']}; commit {results['commit']}; "
        f"{results['repeats']} repeats (median, min..max).",
        "",
        "| figure | result | target | met | what is measured |",
        "|---|---|---|---|---|",
    ]
    for name, r in results["results"].items():
        if "ratio_median" in r:
            val = f"{r['ratio_median']:.3f} ({r['ratio_min']:.3f}..{r['ratio_max']:.3f})"
        else:
            val = "; ".join(f"{k} {_fmt(v)}" for k, v in r.items() if k not in ("unit",))
        met = {True: "yes", False: "**no**"}.get(r.get("met"), "")
        lines.append(f"| {name} | {val} | {r.get('target', '')} | {met} | {r.get('unit', '')} |")
    return "\n".join(lines) + "\n"


def run(cfg: BenchConfig) -> dict:
    out = Path(cfg.out)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    for name in cfg.stages.split(","):
        if name not in STAGES:
            from pipeline.errors import UsageError

            raise UsageError(f"unknown bench stage '{name}'; valid: {', '.join(STAGES)}")
        print(f"[bench] {name} ...", flush=True)
        t0 = time.perf_counter()
        results.update(STAGES[name](cfg, work))
        print(f"[bench] {name} done in {time.perf_counter() - t0:.0f} s", flush=True)
    report = {
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"),
        "commit": (code_version()["git_commit"] or "unknown")[:10],
        "repeats": cfg.repeats,
        "config": asdict(cfg),
        "results": results,
    }
    (out / "results.json").write_text(json.dumps(report, indent=2))
    (out / "results.md").write_text(markdown(report))
    print(markdown(report))
    return {"results": str(out / "results.json"), "table": str(out / "results.md")}


def probe_decoder(**kw) -> dict:
    from jobs.bench_decoder import probe_decoder as probe

    return probe(**kw)


PROBES = {
    "forward": probe_forward,
    "mmap": probe_mmap,
    "stream": probe_stream,
    "prior": probe_prior,
    "decoder": probe_decoder,
}

if __name__ == "__main__":  # `python -m jobs.bench --probe NAME JSON`: one measurement in a fresh process
    if len(sys.argv) == 4 and sys.argv[1] == "--probe":
        print(json.dumps(PROBES[sys.argv[2]](**json.loads(sys.argv[3]))))
    else:
        sys.exit("usage: python -m jobs.bench --probe NAME JSON (run the benchmark with `unclip bench`)")
