"""Where a demo decoder's shape colours come from, and whether it fits its training scenes better than new ones.

Runs `unclip eval-decoder`'s reconstruction scoring (no prior) on a demo store four times: on the held-out split
as trained; with the cross-attention tokens computed from the zero embedding (the timestep-embedding path, the
ResNets' scale and shift, keeps the real one); with that timestep-embedding path fed zeros instead (the tokens
keep the real one); and on 128 scenes of the training split. It prints one line each: the shape colour at its
stated position (all, two-shape scenes), colour anywhere, background, CLIP top-1, and the two-colour pair
outcomes (both right / swapped / merged).

    .venv/bin/python docs/experiments/decoder_paths.py demo_out/decoder demo_out/store

docs/demo_experiments.md's "Measured on 2026-12-04" ablation and training-split figures come from this script
(about 40 seconds on 2 cores for the `tiny` decoder).
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile

import torch

from jobs import eval_decoder
from models import decoder as decoder_model


@contextlib.contextmanager
def zero_input(path: str):
    """While active, every decoder built feeds the zero embedding to one conditioning path of its UNet:
    "tokens" (`encoder_hid_proj`, the cross-attention tokens) or "film" (`add_embedding`, added to the timestep
    embedding); "" changes nothing."""
    original = decoder_model.DiffusionDecoder.__init__

    def init(self, cfg):
        original(self, cfg)
        if path:
            module = {"tokens": self.unet.encoder_hid_proj, "film": self.unet.add_embedding}[path]
            forward = module.forward
            module.forward = lambda emb: forward(torch.zeros_like(emb))

    decoder_model.DiffusionDecoder.__init__ = init
    try:
        yield
    finally:
        decoder_model.DiffusionDecoder.__init__ = original


@contextlib.contextmanager
def split(name: str):
    """While active, eval-decoder reads `name` ("train" or "val") instead of the held-out split."""
    original = eval_decoder.StreamConfig

    def config(*args, **kwargs):
        return original(*args, **{**kwargs, "split": name})

    eval_decoder.StreamConfig = config
    try:
        yield
    finally:
        eval_decoder.StreamConfig = original


def score(decoder: str, data: str, samples: int) -> str:
    with tempfile.TemporaryDirectory() as out:
        r = eval_decoder.run(
            eval_decoder.EvalDecoderConfig(
                decoder=decoder, data=data, max_samples=samples, decoder_guidance=2.0, device="cpu", out=out
            )
        )
    a = r["attributes"]["reconstruction"]
    pairs = " / ".join(f"{a[f'pairs_{k}']:.3f}" for k in ("both_right", "swapped", "merged"))
    return (
        f"at position {a['shape_color_accuracy']:.3f} (two shapes {a['shape_color_accuracy_two_shapes']:.3f}), "
        f"anywhere {a['shape_color_anywhere_accuracy']:.3f}, background {a['background_accuracy']:.3f}, "
        f"CLIP top-1 {r['reconstruction']['top1']:.3f}, pairs right / swapped / merged {pairs} "
        f"of {a['two_color_pairs']}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("decoder", help="a train-decoder run folder or checkpoint")
    ap.add_argument("store", help="the demo store it was trained on")
    ap.add_argument("--samples", type=int, default=128)
    args = ap.parse_args()
    runs = [
        ("held out, as trained", "", "val"),
        ("held out, tokens from zeros", "tokens", "val"),
        ("held out, FiLM path from zeros", "film", "val"),
        ("training scenes, as trained", "", "train"),
    ]
    for label, path, which in runs:
        with zero_input(path), split(which):
            print(f"{label:32} {score(args.decoder, args.store, args.samples)}", flush=True)


if __name__ == "__main__":
    main()
