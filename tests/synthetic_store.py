"""Stores written through `pipeline.store` without running CLIP: for stream and trainer tests.

Each sample has a discrete "scene" (one of ``n_classes``); its text embedding and image embedding are two
different random functions of the scene plus noise, so a prior has a real mapping to learn and the raw text
embedding is useless for retrieval (the two towers are not aligned).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipeline import store


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_store(
    root,
    rows_per_shard: list[int],
    dim: int = 32,
    n_classes: int = 64,
    text_enc_width: int = 0,
    seed: int = 0,
    noise: float = 0.05,
    latent_size: int = 0,
    clip_arch: str = "synthetic",
) -> dict:
    """``latent_size`` > 0 adds ``pixels`` latents: each scene is a solid colour of its own, so a decoder has
    a colour to recover from the image embedding. ``clip_arch`` names the CLIP in the manifest (an open_clip
    architecture with random weights lets `unclip sample` load it)."""
    rng = np.random.default_rng(seed)
    img_proto, txt_proto = rng.normal(size=(n_classes, dim)), rng.normal(size=(n_classes, dim))
    tok_proto = rng.normal(size=(n_classes, 12, max(text_enc_width, 1)))
    manifest = store.Manifest.new(
        {"synthetic": True},
        store.ClipInfo(clip_arch, "none", dim, random_init=True),
        text_enc_width=text_enc_width,
        latents=store.pixels_latents(latent_size) if latent_size else None,
    )
    # Own generator: the other arrays stay what they were before latents existed.
    colours = np.random.default_rng([seed, 1]).integers(0, 256, size=(n_classes, 3), dtype=np.uint8)
    store.write_manifest(root, manifest)
    for i, n in enumerate(rows_per_shard):
        shard = f"{i:05d}"
        cls = rng.integers(n_classes, size=n)
        arrays = {
            "img_emb": _unit(img_proto[cls] + noise * rng.normal(size=(n, dim))).astype(np.float16),
            "text_emb": _unit(txt_proto[cls] + noise * rng.normal(size=(n, dim))).astype(np.float16),
        }
        if latent_size and n:
            arrays["latents"] = np.broadcast_to(
                colours[cls][:, :, None, None], (n, 3, latent_size, latent_size)
            ).copy()
        if text_enc_width and n:
            lengths = 3 + cls % 10
            arrays["text_enc"] = np.concatenate([tok_proto[c, :L] for c, L in zip(cls, lengths)]).astype(
                np.float16
            )
            arrays["text_enc_offsets"] = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        meta = pa.table(
            {
                "key": [f"{shard}{j:04d}" for j in range(n)],
                "caption": [f"scene {c}" for c in cls],
                "scene": cls.astype(np.int64),
            }
        )
        store.write_shard(
            root,
            shard,
            arrays if n else {},
            {"metadata": meta, "errors": None},
            n,
            {
                "source": f"synthetic/{shard}.tar",
                "errors": 0,
                "truncated_captions": 0,
                "latent_roundtrip_mae": None,
            },
        )
    manifest.shards = [{"shard": s, "rows": r} for s, r in store.shard_rows(root)]
    store.write_manifest(root, manifest)
    return manifest.to_json()
