"""CLIP image input made on the embedding device: JPEG bytes decoded in batches by `torchvision.io.decode_jpeg`
(nvJPEG on CUDA, libjpeg on CPU), then resize, centre crop and normalisation as tensor ops.

This is the ``--image-decode device`` path of the embed stage. It keeps a GPU fed where a CPU decoder would
starve it (clip-retrieval's "resizing bottlenecked" regime). It matches open_clip's PIL preprocessing up to
resampling arithmetic (bicubic with antialiasing on uint8 tensors vs PIL's bicubic filter): tested at cosine
>= 0.999 per image between the two paths' embeddings. Whatever it cannot take (PNG, GIF, WebP, CMYK or
corrupt JPEG) goes through the PIL path, sample by sample, so error rows stay exactly what they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

JPEG_MAGIC = b"\xff\xd8\xff"
IMAGE_DECODES = ("auto", "pil", "device")
_MODES = ("shortest", "squash")  # open_clip resize modes with an exact tensor equivalent here


def is_jpeg(data: bytes | None) -> bool:
    return data is not None and data[:3] == JPEG_MAGIC


@dataclass(frozen=True)
class TensorPreprocess:
    """open_clip's inference transform (Resize, CenterCrop, ToTensor, Normalize) on uint8 [3, H, W] tensors."""

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize_mode: str = "shortest"

    @classmethod
    def from_cfg(cls, cfg: dict) -> TensorPreprocess | None:
        """From open_clip's preprocess config (size, mean, std, interpolation, resize_mode), or None when that
        preprocessing has no tensor equivalent here."""
        if not tensor_preprocess_supported(cfg):
            return None
        size = cfg.get("size", 224)
        size = size[0] if isinstance(size, (tuple, list)) else size
        return cls(int(size), tuple(cfg["mean"]), tuple(cfg["std"]), cfg.get("resize_mode", "shortest"))

    @classmethod
    def from_open_clip(cls, model: torch.nn.Module) -> TensorPreprocess | None:
        from open_clip import get_model_preprocess_cfg

        return cls.from_cfg(get_model_preprocess_cfg(model))

    def one(self, img: torch.Tensor) -> torch.Tensor:
        """uint8 [3, H, W] (any device) -> float [3, S, S] normalised, on the same device."""
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2 import functional as TF

        s = self.size
        h, w = img.shape[-2:]
        if self.resize_mode == "squash":
            out = TF.resize(img, [s, s], InterpolationMode.BICUBIC, antialias=True)
        else:  # shortest side to s (as torchvision's Resize(int) on a PIL image), then centre crop
            short, long = (h, w) if h <= w else (w, h)
            new_long = int(s * long / short)
            size = [s, new_long] if h <= w else [new_long, s]
            out = TF.center_crop(TF.resize(img, size, InterpolationMode.BICUBIC, antialias=True), [s, s])
        x = out.float().div_(255.0)
        mean = torch.tensor(self.mean, device=x.device).view(3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(3, 1, 1)
        return (x - mean) / std

    def __call__(self, images: list[torch.Tensor]) -> torch.Tensor:
        """A list of uint8 [3, H, W] of any sizes -> [B, 3, S, S]."""
        return torch.stack([self.one(img) for img in images])


def tensor_preprocess_supported(cfg: dict) -> bool:
    size = cfg.get("size", 224)
    square = not isinstance(size, (tuple, list)) or size[0] == size[1]
    return (
        square
        and cfg.get("interpolation", "bicubic") == "bicubic"
        and cfg.get("resize_mode", "shortest") in _MODES
    )


def decode_jpegs(blobs: list[bytes], device: str) -> list[torch.Tensor | None]:
    """uint8 RGB [3, H, W] per blob on ``device``, None where the decoder refused it (fall back to PIL).

    One batched call first (nvJPEG decodes a list at once); if it fails, the blobs are tried one by one so that
    a single bad file costs only itself.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    if not blobs:
        return []
    data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    try:
        out = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        return [_rgb(t) for t in out]
    except (RuntimeError, ValueError):
        pass
    result: list[torch.Tensor | None] = []
    for d in data:
        try:
            result.append(_rgb(decode_jpeg(d, mode=ImageReadMode.RGB, device=device)))
        except (RuntimeError, ValueError):
            result.append(None)
    return result


def _rgb(t: torch.Tensor) -> torch.Tensor | None:
    return t if t.dim() == 3 and t.shape[0] == 3 and t.shape[1] > 0 and t.shape[2] > 0 else None


def resolve_image_decode(choice: str, device: str, latents: str, has_tensor_preprocess: bool) -> str:
    """'auto' -> 'device' on CUDA for embedding-only runs with a supported transform, else 'pil'.

    With latents the PIL decode is needed anyway (the latent input stays byte-identical to the PIL path), so
    auto keeps PIL there; ``device`` may still be asked for explicitly.
    """
    if choice != "auto":
        return choice  # an explicit "device" without a tensor equivalent is refused by `unclip embed` first
    return "device" if device.startswith("cuda") and latents == "none" and has_tensor_preprocess else "pil"
