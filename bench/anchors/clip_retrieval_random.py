"""`clip-retrieval inference` with a randomly initialised open_clip model (runs inside .venv-anchors).

clip-retrieval always loads pretrained weights (`all_clip.load_open_clip` looks the architecture's default
tag up and downloads it), which this offline machine cannot do. This wrapper replaces that one loader, for
the ``open_clip:`` prefix only, by the same `open_clip.create_model_and_transforms` call with
``pretrained=None`` after ``torch.manual_seed(SEED)``, wrapped in all_clip's own `OpenClipWrapper`. Nothing
else is changed: the command line is clip-retrieval's own, e.g.

    python bench/anchors/clip_retrieval_random.py inference --input_dataset 'shards/{00000..00001}.tar' \
        --output_folder out --input_format webdataset --clip_model open_clip:ViT-B-32 --batch_size 64 \
        --num_prepro_workers 2 --enable_metadata False

Environment: ``ANCHOR_CLIP_SEED`` (default 0). The patched loader prints one line saying the weights are
random, like our embed stage does.
"""

from __future__ import annotations

import os
import sys


def _random_open_clip(clip_model, use_jit=True, device="cuda", clip_cache_path=None):
    import open_clip
    import torch
    from all_clip.open_clip import OpenClipWrapper

    arch = clip_model.split("/")[0]
    seed = int(os.environ.get("ANCHOR_CLIP_SEED", "0"))
    torch.manual_seed(seed)
    model, _, preprocess = open_clip.create_model_and_transforms(
        arch, pretrained=None, device=device, jit=use_jit, cache_dir=clip_cache_path
    )
    print(
        f"[anchor] open_clip {arch} with RANDOM weights (seed {seed}), open_clip {open_clip.__version__}",
        flush=True,
    )
    model = OpenClipWrapper(inner_model=model, device=device)
    model.to(device=device)
    return model, preprocess, open_clip.get_tokenizer(arch)


def patch() -> None:
    import all_clip.main
    import all_clip.open_clip

    all_clip.open_clip.load_open_clip = _random_open_clip
    all_clip.main._CLIP_REGISTRY["open_clip:"] = _random_open_clip  # the registry holds the function itself


if __name__ == "__main__":
    patch()
    from clip_retrieval.cli import main

    sys.argv[0] = "clip-retrieval"
    main()
