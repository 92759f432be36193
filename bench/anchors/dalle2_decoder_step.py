"""Training steps of dalle2-pytorch's `Unet` + `Decoder` on random 32 px images (runs inside .venv-anchors).

The decoder is conditioned on a CLIP image embedding only (no text encodings), as ours is. Times ``--steps``
AdamW steps (zero_grad, loss, backward, gradient clipping at 1.0, step) after ``--warmup`` untimed ones, on
CPU. Prints one JSON line: per-step seconds, samples/s, parameter count, torch threads and peak RSS.

    python bench/anchors/dalle2_decoder_step.py --dim 32 --batch 32
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--dim-mults", default="1,2,4")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--emb-dim", type=int, default=512)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()

    import torch
    from dalle2_pytorch import Decoder, Unet

    torch.manual_seed(a.seed)
    unet = Unet(
        dim=a.dim,
        image_embed_dim=a.emb_dim,
        channels=3,
        dim_mults=tuple(int(x) for x in a.dim_mults.split(",")),
        cond_on_text_encodings=False,
    )
    decoder = Decoder(
        unet=unet, image_size=a.image_size, timesteps=1000, image_cond_drop_prob=0.1, text_cond_drop_prob=0.5
    ).train()
    opt = torch.optim.AdamW(decoder.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(a.seed)
    images = torch.rand(a.batch, 3, a.image_size, a.image_size, generator=gen)  # dalle2 takes [0, 1] images
    emb = torch.nn.functional.normalize(torch.randn(a.batch, a.emb_dim, generator=gen), dim=-1)
    times = []
    for i in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = decoder(images, image_embed=emb)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(decoder.parameters(), 1.0)
        opt.step()
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
    print(
        json.dumps(
            {
                "impl": "dalle2-pytorch",
                "step_seconds": times,
                "samples_per_s": a.batch / statistics.median(times),
                "params": sum(p.numel() for p in unet.parameters()),
                "torch_threads": torch.get_num_threads(),
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "config": vars(a),
            }
        )
    )


if __name__ == "__main__":
    main()
