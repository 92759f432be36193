"""How much of each scene's layout a demo CLIP's embeddings hold: an MLP probe reads the colour at each of the
five positions (or "empty") from the image embeddings of fresh procedural scenes, trained on 1,600 / 4,000 /
8,000 of them and scored on 1,000 others, over all shapes and over one- and two-shape scenes apart.

    .venv/bin/python docs/experiments/probe_demo_clip.py demo_out/clip/unclip-tiny-demo.pt

docs/demo_experiments.md's "Measured on 2026-12-02" figures come from this script (about 2 minutes on 2 cores).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

from pipeline import demo_data as dd
from pipeline.encoders import load_clip

POSITIONS, COLORS = list(dd.POSITIONS), list(dd.COLORS)
EMPTY = len(COLORS)  # the class of a position without a shape


def embed(ckpt: str, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """Unit image and text embeddings [n, D] of n fresh scenes drawn with `seed`, and their attributes."""
    torch.manual_seed(0)
    clip = load_clip("unclip-tiny", ckpt, "cpu", 0)
    model = clip.model.eval()
    rng = np.random.default_rng(seed)
    attrs = [dd.sample_attributes(rng) for _ in range(n)]
    images = torch.stack([clip.preprocess(dd.draw(a, 64)) for a in attrs])
    tokens = clip.tokenizer([dd.caption_for(a) for a in attrs])
    with torch.no_grad():
        img = torch.cat(
            [F.normalize(model.encode_image(images[i : i + 500]), dim=-1) for i in range(0, n, 500)]
        )
        txt = torch.cat(
            [F.normalize(model.encode_text(tokens[i : i + 500]), dim=-1) for i in range(0, n, 500)]
        )
    return img, txt, attrs


def labels(attrs: list[dict]) -> torch.Tensor:
    """[n, 5] colour index at each position, EMPTY where no shape stands."""
    y = torch.full((len(attrs), len(POSITIONS)), EMPTY, dtype=torch.long)
    for i, a in enumerate(attrs):
        for k in (1, 2):
            if a[f"shape{k}"]:
                y[i, POSITIONS.index(a[f"position{k}"])] = COLORS.index(a[f"color{k}"])
    return y


def probe(
    x: torch.Tensor, y: torch.Tensor, two: torch.Tensor, n_train: int, n_test: int
) -> tuple[float, ...]:
    """Accuracy over the shapes of the last n_test scenes (all, one-shape scenes, two-shape scenes) of an MLP
    trained for 300 epochs on the first n_train."""
    torch.manual_seed(0)
    k = EMPTY + 1
    net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 512), torch.nn.GELU(), torch.nn.Linear(512, 5 * k))
    opt = torch.optim.AdamW(net.parameters(), 1e-3, weight_decay=1e-2)
    for _ in range(300):
        perm = torch.randperm(n_train)
        for j in range(0, n_train, 256):
            idx = perm[j : j + 256]
            loss = F.cross_entropy(net(x[idx]).view(-1, k), y[idx].view(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        pred = net(x[-n_test:]).view(-1, 5, k).argmax(-1)
    yt = y[-n_test:]
    has = yt < EMPTY
    hit = (pred == yt) & has
    pair = two[-n_test:, None].expand_as(has)
    return tuple((hit[m].sum() / has[m].sum()).item() for m in (has, ~pair, pair))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="a demo CLIP checkpoint (demo_out/clip/unclip-tiny-demo.pt)")
    ap.add_argument("--scenes", type=int, default=9000, help="fresh scenes; the last 1,000 are held out")
    ap.add_argument("--seed", type=int, default=123)
    a = ap.parse_args()
    img, txt, attrs = embed(a.checkpoint, a.scenes, a.seed)
    y, two = labels(attrs), torch.tensor([s["shape2"] is not None for s in attrs])
    for n_train in (1600, 4000, 8000):
        if n_train <= a.scenes - 1000:
            acc = probe(img, y, two, n_train, 1000)
            print(f"image embeddings, probe trained on {n_train}: all / one-shape / two-shape", _fmt(acc))
    print(
        "text embeddings, probe trained on 1600: all / one-shape / two-shape",
        _fmt(probe(txt, y, two, 1600, 1000)),
    )


def _fmt(acc: tuple[float, ...]) -> str:
    return " / ".join(f"{v:.3f}" for v in acc)


if __name__ == "__main__":
    main()
