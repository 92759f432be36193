"""CLIP image input made on the embedding device: JPEG bytes decoded in batches by `torchvision.io.decode_jpeg`
(nvJPEG on CUDA, libjpeg on CPU), then resize, centre crop and normalisation as tensor ops.

This is the ``--image-decode device`` path of the embed stage. It keeps a GPU fed where a CPU decoder would
starve it (clip-retrieval's "resizing bottlenecked" regime). It matches open_clip's PIL preprocessing up to
resampling arithmetic (bicubic with antialiasing on uint8 tensors vs PIL's bicubic filter): tested at cosine
>= 0.999 per image between the two paths' embeddings. Whatever it cannot take (PNG, GIF, WebP, CMYK or
corrupt JPEG) goes through the PIL path, sample by sample, so error rows stay exactly what they are.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

JPEG_MAGIC = b"\xff\xd8\xff"
JPEG_END = b"\xff\xd9"
# Pixels resized in one call (~0.8 GB of float32 RGB at most): a batch of 256 same-size 12 MP photos would
# otherwise need ~37 GB at once.
RESIZE_PIXELS = 64 * 2**20
IMAGE_DECODES = ("auto", "pil", "device")
_MODES = ("shortest", "squash")  # open_clip resize modes with an exact tensor equivalent here


def is_jpeg(data: bytes | None) -> bool:
    return data is not None and data[:3] == JPEG_MAGIC


def is_complete_jpeg(data: bytes) -> bool:
    """A JPEG whose last marker (past any zero padding) is end-of-image. nvJPEG reads the header up front and
    may fill a cut-off file's missing rows instead of failing where libjpeg (PIL) fails, so only complete files
    go to the device decoder; the rest take the PIL path, which keeps their error rows what they were."""
    return data.rstrip(b"\x00")[-2:] == JPEG_END


@functools.lru_cache(maxsize=16)
def _stats(mean: tuple[float, ...], std: tuple[float, ...], device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """mean and std as [3, 1, 1] tensors on ``device``, made once (a host-to-device copy syncs the stream)."""
    return (
        torch.tensor(mean, device=device).view(3, 1, 1),
        torch.tensor(std, device=device).view(3, 1, 1),
    )


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

    def resized(self, img: torch.Tensor) -> torch.Tensor:
        """uint8 [3, H, W] or [B, 3, H, W] (one size) -> uint8 [..., 3, S, S]: resize then centre crop."""
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2 import functional as TF

        s = self.size
        h, w = img.shape[-2:]
        if self.resize_mode == "squash":
            return TF.resize(img, [s, s], InterpolationMode.BICUBIC, antialias=True)
        # shortest side to s (as torchvision's Resize(int) on a PIL image), then centre crop
        short, long = (h, w) if h <= w else (w, h)
        new_long = int(s * long / short)
        size = [s, new_long] if h <= w else [new_long, s]
        return TF.center_crop(TF.resize(img, size, InterpolationMode.BICUBIC, antialias=True), [s, s])

    def normalized(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 [..., 3, S, S] -> float, normalised with the model's mean and std, on the same device."""
        mean, std = _stats(self.mean, self.std, str(x.device))
        return (x.float().div_(255.0) - mean) / std

    def one(self, img: torch.Tensor) -> torch.Tensor:
        """uint8 [3, H, W] (any device) -> float [3, S, S] normalised, on the same device."""
        return self.normalized(self.resized(img))

    def many(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        """`one` of each image, with the images of one size resized together (a few kernels a batch on a GPU,
        not a few an image); the same values as `one` image by image."""
        out: list[torch.Tensor | None] = [None] * len(images)
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, img in enumerate(images):
            by_size.setdefault(tuple(img.shape[-2:]), []).append(i)
        for (h, w), same in by_size.items():
            step = max(1, RESIZE_PIXELS // (h * w))  # the resize works in float32: bound each call's memory
            for k in range(0, len(same), step):
                idx = same[k : k + step]
                x = self.normalized(self.resized(torch.stack([images[i] for i in idx])))
                for i, t in zip(idx, x, strict=True):
                    out[i] = t
        return out

    def __call__(self, images: list[torch.Tensor]) -> torch.Tensor:
        """A list of uint8 [3, H, W] of any sizes -> [B, 3, S, S]."""
        return torch.stack(self.many(images))


def tensor_preprocess_supported(cfg: dict) -> bool:
    size = cfg.get("size", 224)
    square = not isinstance(size, (tuple, list)) or size[0] == size[1]
    return (
        square
        and cfg.get("interpolation", "bicubic") == "bicubic"
        and cfg.get("resize_mode", "shortest") in _MODES
    )


def decode_jpegs(blobs: list[bytes], device: str) -> list[torch.Tensor | None]:
    """uint8 RGB [3, H, W] per blob on ``device``, None where the decoder refused it or it is not a complete
    JPEG (`is_complete_jpeg`): those fall back to PIL.

    One batched call first (nvJPEG decodes a list at once); if it fails, the blobs are tried one by one so that
    a single bad file costs only itself. The first refusal in a process is logged with the decoder's reason:
    a device decoder that refuses everything would otherwise just look slow.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    if not blobs:
        return []
    if device.startswith("cuda"):
        # torchvision decodes on its own stream into new memory without waiting for ours: let ours drain first
        torch.cuda.current_stream(device).synchronize()
    take = [i for i, b in enumerate(blobs) if is_complete_jpeg(b)]
    data = [torch.frombuffer(bytearray(blobs[i]), dtype=torch.uint8) for i in take]
    result: list[torch.Tensor | None] = [None] * len(blobs)
    try:
        out = decode_jpeg(data, mode=ImageReadMode.RGB, device=device) if data else []
        for i, t in zip(take, out, strict=True):
            result[i] = _rgb(t)
        return result
    except (RuntimeError, ValueError) as e:
        _log_first_refusal(e, device)
    for i, d in zip(take, data, strict=True):
        try:
            result[i] = _rgb(decode_jpeg(d, mode=ImageReadMode.RGB, device=device))
        except (RuntimeError, ValueError) as e:
            _log_first_refusal(e, device)
    return result


_refusals = {"logged": False}


def _log_first_refusal(e: Exception, device: str) -> None:
    if not _refusals["logged"]:
        _refusals["logged"] = True
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        log.warning("the %s JPEG decoder refused a file (%s); such files go through PIL", device, first)


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
