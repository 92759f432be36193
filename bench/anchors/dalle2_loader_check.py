"""Read one of our stores with DALLE2-pytorch's prior data loader (runs inside .venv-anchors).

Uses `dalle2_pytorch.dataloaders.get_reader` and `make_splits` exactly as its prior trainer does, both ways:

- text-embedding pairs (``text_conditioned=False``): ``img_emb/`` and ``text_emb/`` through two npy
  EmbeddingReaders, yielding (image embedding, text embedding) batches;
- caption conditioned (``text_conditioned=True``): ``img_emb/`` with ``metadata/`` (parquet_npy, column
  ``caption``), yielding (image embedding, CLIP-tokenized caption) batches.

Every batch of the train, eval and test splits is collected in order and saved to ``--out`` (.npz: img, txt,
img_tc, tokens); one JSON line on stdout gives the split sizes. The caller compares them with the store.

    python bench/anchors/dalle2_loader_check.py --store STORE --out loader.npz --batch 32
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np


def collect(loaders):
    firsts, seconds, sizes = [], [], []
    for loader in loaders:
        n = 0
        for a, b in loader:
            firsts.append(a.numpy())
            seconds.append(b.numpy())
            n += len(a)
        sizes.append(n)
    return np.concatenate(firsts), np.concatenate(seconds), sizes


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--store", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--train-split", type=float, default=0.8)
    p.add_argument("--eval-split", type=float, default=0.1)
    a = p.parse_args()

    from dalle2_pytorch.dataloaders import get_reader, make_splits

    img_url = os.path.join(a.store, "img_emb")
    txt_url = os.path.join(a.store, "text_emb")
    meta_url = os.path.join(a.store, "metadata")

    image_reader, text_reader = get_reader(text_conditioned=False, img_url=img_url, txt_url=txt_url)
    count = int(image_reader.count)
    splits = make_splits(
        text_conditioned=False,
        batch_size=a.batch,
        num_data_points=count,
        train_split=a.train_split,
        eval_split=a.eval_split,
        image_reader=image_reader,
        text_reader=text_reader,
    )
    img, txt, sizes = collect(splits)

    tc_reader = get_reader(text_conditioned=True, img_url=img_url, meta_url=meta_url)
    tc_splits = make_splits(
        text_conditioned=True,
        batch_size=a.batch,
        num_data_points=int(tc_reader.count),
        train_split=a.train_split,
        eval_split=a.eval_split,
        image_reader=tc_reader,
    )
    img_tc, tokens, tc_sizes = collect(tc_splits)

    np.savez(a.out, img=img, txt=txt, img_tc=img_tc, tokens=tokens)
    print(
        json.dumps(
            {
                "reader_count": count,
                "text_reader_count": int(text_reader.count),
                "caption_reader_count": int(tc_reader.count),
                "split_sizes": sizes,
                "caption_split_sizes": tc_sizes,
                "dimension": int(image_reader.dimension),
            }
        )
    )


if __name__ == "__main__":
    main()
