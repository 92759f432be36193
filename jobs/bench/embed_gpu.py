"""`unclip bench`, embed on a GPU (only when one is visible): `unclip embed --device cuda` end to end and inside
its shard tasks against the pure fp16 forward on the same GPU, for ViT-B-32 and ViT-L-14 at batch 256, with
JPEGs decoded on the device (``--image-decode device``, by one dask worker and, for ViT-B-32, by two and four
workers sharing the GPU, and with the towers compiled) and by PIL on the CPU (ViT-B-32); peak GPU memory, the
device, and where each run's time went (start-up, shard tasks, close; the tasks' phases).

The shards are written directly (8 x 1,024 samples of 256 px JPEGs): decode and resize cost per sample is what
matters here, and img2dataset is measured by the download stage.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from jobs.bench.harness import PY, alternate, measure, probe, ratio_figure

if TYPE_CHECKING:
    from jobs.bench.main import BenchConfig

BATCH = 256
# Each row's `unclip embed` flags. PIL decodes with --decode-threads' CUDA default, min(8, cores). Two workers
# on one GPU are two processes, each with its own decode thread and GIL: the first GPU run (an H200, 2026-12-04)
# embedded ~1,400 images/s in one worker's warm shard, far below the model, so that is the scaling to measure.
VARIANTS = {
    "device": "--image-decode device --workers 1",  # one worker, also on a host with several GPUs
    "pil": "--image-decode pil --workers 1",
    "device_2_workers": "--image-decode device --workers 2",
    "device_4_workers": "--image-decode device --workers 4",
    "device_compile": "--image-decode device --workers 1 --compile",
}
# The embed figures each row reports beside its ratios.
TIMINGS = (
    "startup_seconds",
    "tasks_seconds",
    "close_seconds",
    "samples_per_second_all_tasks",
    "task_phase_seconds",
)


def decodes(arch: str, only: str = "") -> tuple[str, ...]:
    """The rows for ``arch`` (every variant for ViT-B-32, device decode for the others), or those of ``only``
    (comma-separated) among them."""
    rows = tuple(VARIANTS) if arch == "ViT-B-32" else ("device",)
    return tuple(r for r in rows if r in only.split(",")) if only else rows


def gpu_name() -> str | None:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def write_jpeg_shards(root: Path, shards: int, per: int, size: int = 256) -> Path:
    """``shards`` tars of ``per`` distinct-looking JPEG samples with captions (procedural, seeded)."""
    import numpy as np
    from PIL import Image

    made = json.dumps({"shards": shards, "per": per, "size": size})
    if (root / "ok").exists() and (root / "ok").read_text() == made:
        return root
    # made with other sizes (a --quick run's 2 x 64 where 2 x 1,024 are asked), or cut short: made again
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for s in range(shards):
        with tarfile.open(root / f"{s:05d}.tar", "w") as tf:
            for i in range(per):
                px = rng.integers(0, 256, 3) + rng.integers(-50, 50, (size, size, 3))
                buf = io.BytesIO()
                Image.fromarray(px.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
                key = f"{s:05d}{i:04d}"
                cap = f"a photo of object {i} in shard {s}, seen from the left".encode()
                for ext, data in (
                    ("jpg", buf.getvalue()),
                    ("txt", cap),
                    ("json", json.dumps({"key": key}).encode()),
                ):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    (root / "ok").write_text(made)
    return root


def embed_run(shards: Path, out: Path, clip: str, decode: str) -> tuple[dict, float]:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [PY, "-m", "jobs.cli", "embed", "--shards", str(shards), "--out", str(out), "--clip", clip]
    cmd += f"--pretrained none --batch-size {BATCH} --device cuda {VARIANTS[decode]}".split()
    run = measure(cmd)
    return json.loads(run.stdout[run.stdout.index("{") :]), run.seconds


def probe_forward_gpu(clip: str, batch: int, batches: int, device: str = "cuda") -> dict:
    """Pure fp16 forward of both towers on the GPU: random pixels, fixed captions, synchronised timing.
    (``device`` cpu: the same in float32, for the dry run.)"""
    import torch

    from pipeline.encoders import encode_image, encode_text, load_clip

    cuda = device.startswith("cuda")
    c = load_clip(clip, "none", device, 0)
    size = c.preprocess.transforms[1].size
    images = torch.randn(batch, 3, *size, device=device)
    # on the host and pinned, as the shard tasks hand them over: the trimmed length is read without a device sync
    tokens = c.tokenizer([f"a photo of object {i} in shard 0, seen from the left" for i in range(batch)])
    tokens = tokens.pin_memory() if cuda else tokens
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16, enabled=cuda):
        for _ in range(3):  # warm-up: kernels, cuDNN/cuBLAS heuristics
            encode_image(c, images), encode_text(c, tokens)
        sync()
        t0 = time.perf_counter()
        for _ in range(batches):
            encode_image(c, images), encode_text(c, tokens)
        sync()
    return {
        "images_per_s": batches * batch / (time.perf_counter() - t0),
        "gpu_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else 0.0,
    }


# `probe_tasks`'s variants: (--image-decode, --batch-prep) of the shard tasks.
TASK_VARIANTS = {
    "device_inline": ("device", "inline"),
    "device_thread": ("device", "thread"),
    "pil_inline": ("pil", "inline"),
    "pil_thread": ("pil", "thread"),
}


def probe_tasks(
    clips: list[str],
    shards: str,
    out: str,
    device: str = "cuda",
    per_round: int = 2,
    rounds: int = 2,
    batch: int = BATCH,
    variants: tuple[str, ...] = tuple(TASK_VARIANTS),
    torch_threads: int = 0,
) -> dict:
    """Shard tasks in this one process (no dask: no cluster start-up or close to pay for), each of
    ``variants`` (of `TASK_VARIANTS`) on the same warm model, alternated round by round, against the pure
    forward (`probe_forward_gpu`) in the same process; for each of ``clips`` at ``batch``. The first round warms
    up (decoders, allocator, kernels) and is left out. Per variant: images/s inside the tasks, the ratio to the
    forward, and the last round's phases (`pipeline.embed_shard.PHASES`, summed over its shards)."""
    import statistics

    from pipeline.embed_shard import ShardParams
    from pipeline.embed_shard import embed_shard_or_fail as embed_shard

    tars = sorted(str(p) for p in Path(shards).glob("*.tar"))[:per_round]
    res: dict = {}
    for clip in clips:
        rates: dict[str, list[float]] = {v: [] for v in variants}
        phases: dict[str, dict] = {}
        forwards = []
        for r in range(rounds + 1):
            for v in variants if r % 2 == 0 else variants[::-1]:
                decode, prep = TASK_VARIANTS[v]
                store = Path(out, clip, v)
                shutil.rmtree(store, ignore_errors=True)
                store.mkdir(parents=True)
                params = ShardParams(
                    out=str(store), clip=clip, pretrained="none", seed=0, device=device,
                    batch_size=batch, latents="none", vae="", text_encodings=False, torch_threads=torch_threads,
                    latent_params=None, image_decode=decode, batch_prep=prep,
                )  # fmt: skip
                markers = [embed_shard(t, params) for t in tars]
                if r:
                    rates[v].append(sum(m["rows"] for m in markers) / sum(m["seconds"] for m in markers))
                    phases[v] = {
                        k: round(sum(m["phases"][k] for m in markers), 3) for k in markers[0]["phases"]
                    }
            if r:
                forwards.append(probe_forward_gpu(clip, batch, 20, device)["images_per_s"])
        forward = statistics.median(forwards)
        res[clip] = {
            "forward_images_per_s": forwards,
            **{
                v: {
                    "images_per_s": rates[v],
                    "vs_forward": round(statistics.median(rates[v]) / forward, 3),
                    "phases": phases[v],
                }
                for v in variants
            },
        }
    return res


def bench(cfg: BenchConfig, work: Path) -> dict:
    name = gpu_name()
    if name is None:
        return {"embed_gpu": {"skipped": "no CUDA device visible", "unit": "GPU embed figures need a GPU"}}
    shards = write_jpeg_shards(
        work / "gpu_shards", shards=2 if cfg.quick else 8, per=256 if cfg.quick else 1024
    )
    out: dict = {}
    for arch in ("ViT-B-32",) if cfg.quick else [a for a in cfg.gpu_clips.split(",") if a]:
        if not decodes(arch, cfg.gpu_variants):  # none of the asked rows is this model's
            continue
        # each repeat: every decode path, then one pure forward (it does not depend on the decode path)
        runs, fwd = alternate(
            cfg.repeats,
            lambda i, a=arch: {
                d: embed_run(shards, work / f"gpu_store_{a}_{d}", a, d) for d in decodes(a, cfg.gpu_variants)
            },
            lambda i, a=arch: probe(probe_forward_gpu, clip=a, batch=BATCH, batches=20)[0],
        )
        forward = [f["images_per_s"] for f in fwd]
        for decode in decodes(arch, cfg.gpu_variants):
            mine = [r[decode] for r in runs]
            e2e = [s["rows"] / sec for s, sec in mine]
            in_task = [s["samples_per_second_in_tasks"] for s, _ in mine]
            together = [s.get("samples_per_second_all_tasks") for s, _ in mine]
            several = "workers" in decode  # their tasks run at once: the rate of all of them together counts
            rt = ratio_figure(together if several else in_task, forward)
            key = f"embed_gpu_{arch}_{decode}"
            out[f"{key}_in_tasks_vs_forward"] = {
                **rt,
                "unit": f"{name}: images/s inside the shard tasks"
                + (" (every worker's, from the first task's start to the last one's end)" if several else "")
                + f" / pure fp16 forward, {arch}, batch {BATCH}, {VARIANTS[decode]}",
                "target": ">= 0.9",
                "met": rt["ratio_median"] >= 0.9,
            }
            out[f"{key}_end_to_end"] = {
                **ratio_figure(e2e, forward),
                "unit": f"{name}: images/s end to end (start-up included) / pure forward",
                "images_per_s_in_tasks": in_task,
                **{t: [s.get(t) for s, _ in mine] for t in TIMINGS},
                "device_decode_fallbacks": [s.get("device_decode_fallbacks") for s, _ in mine],
                "embed_gpu_peak_mb": [s["gpu_peak_mb"] for s, _ in mine],
                "forward_gpu_peak_mb": [f["gpu_peak_mb"] for f in fwd],
            }
    return out
