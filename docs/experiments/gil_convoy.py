"""Why a GPU embed worker prepares its batches inline (`pipeline.embed_shard.input_inline`): a loop of small torch
ops (as a GPU forward is: each op a kernel launch, each letting go of the GIL and taking it back) run alone and
then beside one Python thread that only tokenises captions with open_clip's tokenizer.

    .venv/bin/python docs/experiments/gil_convoy.py

Measured on the 2-core VM (2026-12-04, two runs): 378-394k ops/s alone, 4.9-9.3k beside the tokenising thread
(0.012-0.025 of it), and no better with a 0.5 ms switch interval (0.023); the tokenising thread kept ~2/3 of
its own speed.
"""

from __future__ import annotations

import sys
import threading
import time

import torch

from pipeline.encoders import _open_clip


def ops_per_second(x: torch.Tensor, seconds: float = 1.0) -> float:
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(100):
            x.add(1.0)
        n += 100
    return n / (time.perf_counter() - t0)


def main() -> None:
    tok = _open_clip().get_tokenizer("ViT-B-32")
    captions = [f"a photo of object {i} in shard 0, seen from the left" for i in range(256)]
    torch.set_num_threads(1)
    x = torch.zeros(8)
    for interval in (0.005, 0.0005):
        sys.setswitchinterval(interval)
        alone = ops_per_second(x)
        stop, done = threading.Event(), [0]

        def tokenise(stop=stop, done=done) -> None:
            while not stop.is_set():
                tok(captions)
                done[0] += len(captions)

        t = threading.Thread(target=tokenise)
        t.start()
        time.sleep(0.2)
        beside = ops_per_second(x)
        stop.set()
        t.join()
        print(
            f"switch interval {interval * 1000:g} ms: {alone:,.0f} ops/s alone, {beside:,.0f} beside a "
            f"tokenising thread ({beside / alone:.3f})"
        )


if __name__ == "__main__":
    main()
