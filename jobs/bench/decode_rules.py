"""The device check's decode-rules stage: one shard of good JPEGs among the files a device decoder must hand
to PIL, embedded through the shard task with ``--image-decode device`` and with ``pil``. The same promise
`tests/test_image_input.py` checks on the CPU, here on whatever device the check runs on."""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def write_rules_shard(tar: Path) -> Path:
    """Eight good JPEGs of two sizes, then a PNG, a CMYK JPEG, a JPEG cut short, garbage behind a JPEG magic."""

    def img(seed: int, size: tuple[int, int], fmt: str = "JPEG", mode: str = "RGB") -> bytes:
        rng = np.random.default_rng(seed)
        px = np.clip(rng.integers(0, 256, 3) + rng.integers(-60, 60, (size[1], size[0], 3)), 0, 255)
        buf = io.BytesIO()
        Image.fromarray(px.astype(np.uint8)).convert(mode).save(buf, format=fmt)
        return buf.getvalue()

    blobs = [img(i, (300, 200) if i % 2 else (180, 260)) for i in range(8)]
    blobs += [img(8, (200, 200), "PNG"), img(9, (200, 150), mode="CMYK"), img(10, (256, 256))[:500]]
    blobs += [b"\xff\xd8\xff" + b"not really" * 30]
    tar.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tar, "w") as tf:
        for i, b in enumerate(blobs):
            for ext, data in (("jpg", b), ("txt", f"sample {i}".encode()), ("json", b"{}")):
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return tar


def decode_rules_probe(tar: str, clip: str, device: str) -> dict:
    """``tar`` through `embed_shard` with both decoders (run in its own process by the device check)."""
    import pyarrow.parquet as pq

    from pipeline import store
    from pipeline.embed_shard import ShardParams
    from pipeline.embed_shard import embed_shard_or_fail as embed_shard

    outs, markers = {}, {}
    for decode in ("device", "pil"):
        out = Path(tar).parent / decode
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        markers[decode] = embed_shard(
            tar,
            ShardParams(
                out=str(out), clip=clip, pretrained="none", seed=0, device=device, batch_size=4,
                latents="none", vae="", text_encodings=False, torch_threads=0, latent_params=None,
                image_decode=decode,
            ),
        )  # fmt: skip
        outs[decode] = out
    keys = {d: store.read_metadata(o, "00000")["key"].to_pylist() for d, o in outs.items()}
    reasons = {d: pq.read_table(store.field_path(o, "errors", "00000")).to_pylist() for d, o in outs.items()}
    a, b = (store.open_array(outs[d], "img_emb", "00000").astype(np.float32) for d in ("device", "pil"))
    return {
        "rows": len(keys["device"]),
        "same_rows": keys["device"] == keys["pil"],
        "same_error_rows": reasons["device"] == reasons["pil"],
        "error_rows": len(reasons["device"]),
        "error_reasons": sorted({e["reason"] for e in reasons["device"]}),
        "min_cos_device_vs_pil": round(float((a * b).sum(-1).min()), 5) if len(a) == len(b) else None,
        "device_decode_fallbacks": markers["device"]["device_decode_fallbacks"],
    }
