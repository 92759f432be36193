"""`unclip bench-anchors`, interoperability: a folder that clip-retrieval itself wrote goes through
`unclip adopt` -> `unclip validate` -> `unclip train-prior` (a few steps), each as its own command."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

NAME = "adopt: clip-retrieval's own output -> validate -> train-prior"


def check_adopt(clip: str, theirs: Path, work: Path, seed: int = 0) -> dict:
    """One check: adopt a copy of clip-retrieval's output folder (its random-weight `clip` model, drawn from
    ``seed`` as ours are), validate it, and train the tiny prior on it for 3 steps. Adopt checks the model
    against the folder's text embeddings with the random weights of seed 0: of another seed, unchecked."""
    folder, prior = work / "adopted_clip_retrieval", work / "adopted_prior"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(theirs, folder, ignore=shutil.ignore_patterns("stats"))
    cli = [sys.executable, "-m", "jobs.cli"]
    train = [*cli, "train-prior", "--data", str(folder), "--out", str(prior), "--preset", "tiny"]
    train += "--steps 3 --batch-size 16 --device cpu --eval-every 0 --val-fraction 0.1".split()
    unchecked = ["--check-clip", "0"] if seed else []
    steps = [
        ("adopt", [*cli, "adopt", str(folder), "--clip", clip, "--pretrained", "none"] + unchecked),
        ("validate", [*cli, "validate", str(folder)]),
        ("train-prior", train),
    ]
    shutil.rmtree(prior, ignore_errors=True)
    for name, cmd in steps:
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            tail = (res.stderr.strip().splitlines() or ["(no output)"])[-1]
            return {
                "name": NAME,
                "passed": False,
                "details": f"`unclip {name}` exited {res.returncode}: {tail}",
            }
    shards = sorted(p.name for p in (folder / "done").glob("*.json"))
    checked = "unchecked" if seed else "its --clip checked against the text embeddings"
    details = (
        f"adopted {len(shards)} shard(s) ({', '.join(shards)}; {checked}), validated, 3 train-prior steps"
    )
    return {"name": NAME, "passed": True, "details": details}
