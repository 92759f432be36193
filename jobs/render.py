"""Latents -> pictures: dequantised store latents or decoder samples to uint8 RGB, and labelled PNG grids.

The store's latent codec says how: ``pixels`` latents are the image itself in [-1, 1]; ``vae`` latents are an
AutoencoderKL's posterior mean times its scaling factor, decoded by that VAE (`pipeline.encoders.vae_decode`).
"""

from __future__ import annotations

import io
import logging
import textwrap
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from pipeline import store
from pipeline.errors import UsageError

log = logging.getLogger(__name__)


def vae_source(codec: dict, vae: str = "", fix: str = "") -> tuple[str, str | None]:
    """(where, sha256): the VAE a store's ``vae`` latents were made with, at the store's ``--vae`` or at ``vae``
    (``--vae``: that folder, moved), checked against the sha256 the store recorded (a hub name not cached here
    is fetched first). Another VAE at that path (one fine-tuned and saved over it) would decode every image
    wrong without a word. A UsageError says what to do (``fix``: the command's own advice, where it has no
    ``--vae``); a store made before the digest was recorded is taken by its path."""
    from pipeline.encoders import vae_sha256

    path, want = vae or codec["vae"], codec.get("sha256")
    got = vae_sha256(path, fetch=bool(want))
    if want:
        digest = f" (sha256 {want[:12]}...)"
        if got is None:
            raise UsageError(
                f"the VAE the store's latents were made with{digest} is not at {path} on this machine; "
                + (fix or "put that folder back there, or pass its new place with --vae")
            )
        if got != want:
            raise UsageError(
                f"the VAE at {path} (sha256 {got[:12]}...) is not the one the store's latents were made "
                f"with{digest}; " + (fix or "pass that VAE's folder with --vae")
            )
    elif vae and vae != codec["vae"]:
        log.warning(
            "--vae %s: the store recorded no sha256 of its VAE (%s) to check it by", vae, codec["vae"]
        )
    return path, got


@torch.no_grad()
def latents_to_images(latents: torch.Tensor, codec: dict, device: str = "cpu", vae: str = "") -> np.ndarray:
    """uint8 [B, H, W, 3] from model-scale latents [B, C, h, w] of the store's codec (manifest["latents"]);
    ``vae``: the store's VAE folder, moved (`vae_source`)."""
    if codec["codec"] == "pixels":
        x = latents.float()  # [B, 3, h, w] in [-1, 1]
    elif codec["codec"] == "vae":
        from pipeline.encoders import load_vae, vae_decode

        path, digest = vae_source(codec, vae)
        x = vae_decode(load_vae(path, device, weights=digest or ""), latents.float()).float()  # [B, 3, H, W]
    else:
        raise UsageError(f"unknown latent codec '{codec['codec']}'; valid: pixels, vae")
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # [B, 3, H, W]
    return x.permute(0, 2, 3, 1).cpu().numpy()  # [B, H, W, 3]


def save_grid(
    images: np.ndarray,
    path: str | Path,
    cols: int,
    labels: list[str] | None = None,
    scale: int = 2,
    label_lines: int = 3,
    make_parent: bool = True,
) -> Path:
    """Write images uint8 [N, H, W, 3] as a PNG grid of ``cols`` columns, each upscaled ``scale`` times
    (nearest), with an optional caption under each one; atomically (temporary name, then rename). Without
    ``make_parent`` a folder that is gone is a FileNotFoundError."""
    n, h, w, _ = images.shape
    h, w = h * scale, w * scale
    font = ImageFont.load_default()
    chars = max(8, w // 6)  # the default bitmap font is about 6 px a character
    label_h = 11 * label_lines + 4 if labels else 0
    rows = (n + cols - 1) // cols
    canvas = Image.new("RGB", (cols * (w + 4) + 4, rows * (h + label_h + 4) + 4), "white")
    draw = ImageDraw.Draw(canvas)
    for i in range(n):
        x0, y0 = 4 + (i % cols) * (w + 4), 4 + (i // cols) * (h + label_h + 4)
        canvas.paste(Image.fromarray(images[i]).resize((w, h), Image.NEAREST), (x0, y0))
        if labels:
            lines = textwrap.wrap(labels[i], chars)[:label_lines]
            draw.multiline_text((x0, y0 + h + 2), "\n".join(lines), fill="black", font=font, spacing=1)
    path, png = Path(path), io.BytesIO()
    canvas.save(png, format="PNG")
    store.atomic_write(path, png.getvalue(), make_parent)
    return path
