"""Training steps of dalle2-pytorch's `DiffusionPrior` on random embeddings (runs inside .venv-anchors).

Builds `DiffusionPriorNetwork` + `DiffusionPrior` at the given width/depth/heads, conditioned on the text
embedding only (``condition_on_text_encodings=False``, no text encodings passed), and times ``--steps``
AdamW steps (zero_grad, loss, backward, gradient clipping at 1.0, step) after ``--warmup`` untimed ones, on
CPU. Prints one JSON line: per-step seconds, samples/s, parameter count, torch threads and this process's
peak RSS.

    python bench/anchors/dalle2_prior_step.py --dim 512 --depth 6 --heads 8 --dim-head 64 --batch 64
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dim", type=int, default=512)  # = CLIP embedding size: dalle2 requires net.dim == it
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dim-head", type=int, default=64)
    p.add_argument("--ff-mult", type=int, default=4)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--cond-drop-prob", type=float, default=0.1)
    p.add_argument("--timesteps", type=int, default=1000)
    p.add_argument("--max-text-len", type=int, default=256)  # dalle2-pytorch's default
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--weight-decay", type=float, default=6e-2)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()

    import torch
    import torch.nn.functional as F
    from dalle2_pytorch import DiffusionPrior, DiffusionPriorNetwork

    torch.manual_seed(a.seed)
    net = DiffusionPriorNetwork(
        dim=a.dim,
        depth=a.depth,
        dim_head=a.dim_head,
        heads=a.heads,
        ff_mult=a.ff_mult,
        attn_dropout=a.dropout,
        ff_dropout=a.dropout,
        num_timesteps=a.timesteps,
        max_text_len=a.max_text_len,
    )
    prior = DiffusionPrior(
        net=net,
        image_embed_dim=a.dim,
        timesteps=a.timesteps,
        cond_drop_prob=a.cond_drop_prob,
        condition_on_text_encodings=False,
    ).train()
    opt = torch.optim.AdamW(prior.parameters(), lr=a.lr, weight_decay=a.weight_decay)
    gen = torch.Generator().manual_seed(a.seed)
    img = F.normalize(torch.randn(a.batch, a.dim, generator=gen), dim=-1)
    txt = F.normalize(torch.randn(a.batch, a.dim, generator=gen), dim=-1)

    times, losses = [], []
    for i in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = prior(text_embed=txt, image_embed=img.clone())  # it scales image_embed in place
        loss.backward()
        torch.nn.utils.clip_grad_norm_(prior.parameters(), 1.0)
        opt.step()
        dt = time.perf_counter() - t0
        losses.append(float(loss.detach()))
        if i >= a.warmup:
            times.append(dt)
        print(
            f"[anchor] dalle2 prior step {i} ({'warm-up' if i < a.warmup else 'timed'}): {dt:.2f} s",
            file=sys.stderr,
            flush=True,
        )
    med = statistics.median(times)
    print(
        json.dumps(
            {
                "impl": "dalle2-pytorch",
                "step_seconds": times,
                "samples_per_s": a.batch / med,
                "params": sum(p.numel() for p in prior.parameters()),
                "losses": losses,
                "torch_threads": torch.get_num_threads(),
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "config": vars(a),
            }
        )
    )


if __name__ == "__main__":
    main()
