"""Latents -> pictures: dequantised store latents or decoder samples to uint8 RGB, and labelled PNG grids.

The store's latent codec says how: ``pixels`` latents are the image itself in [-1, 1]; ``vae`` latents are an
AutoencoderKL's posterior mean times its scaling factor, decoded by that VAE (`pipeline.encoders.vae_decode`).
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from pipeline.errors import UsageError


@torch.no_grad()
def latents_to_images(latents: torch.Tensor, codec: dict, device: str = "cpu") -> np.ndarray:
    """uint8 [B, H, W, 3] from model-scale latents [B, C, h, w] of the store's codec (manifest["latents"])."""
    if codec["codec"] == "pixels":
        x = latents.float()  # [B, 3, h, w] in [-1, 1]
    elif codec["codec"] == "vae":
        from pipeline.encoders import load_vae, vae_decode

        x = vae_decode(load_vae(codec["vae"], device), latents.float()).float()  # [B, 3, H, W]
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
) -> Path:
    """Write images uint8 [N, H, W, 3] as a PNG grid of ``cols`` columns, each upscaled ``scale`` times
    (nearest), with an optional caption under each one; atomically (temporary name, then rename)."""
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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    canvas.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path
