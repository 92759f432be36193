"""`make bench-anchors`, interoperability: a folder that clip-retrieval itself wrote goes through
`unclip adopt` -> `unclip validate` -> `unclip train-prior` (a few steps), each as its own command."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path


def check_adopt(clip: str, theirs: Path, work: Path) -> dict:
    """One check: adopt a copy of clip-retrieval's output folder (its random-weight `clip` model), validate it,
    and train the tiny prior on it for 3 steps."""
    folder = work / "adopted_clip_retrieval"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(theirs, folder, ignore=shutil.ignore_patterns("stats"))
    cli = [sys.executable, "-m", "jobs.cli"]
    steps = [
        ("adopt", [*cli, "adopt", str(folder), "--clip", clip, "--pretrained", "none"]),
        ("validate", [*cli, "validate", str(folder)]),
        (
            "train-prior",
            [
                *cli,
                "train-prior",
                "--data",
                str(folder),
                "--out",
                str(work / "adopted_prior"),
                "--preset",
                "tiny",
            ]
            + [
                "--steps",
                "3",
                "--batch-size",
                "16",
                "--device",
                "cpu",
                "--eval-every",
                "0",
                "--val-fraction",
                "0.1",
            ],
        ),
    ]
    shutil.rmtree(work / "adopted_prior", ignore_errors=True)
    for name, cmd in steps:
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            tail = (res.stderr.strip().splitlines() or ["(no output)"])[-1]
            return _check(False, f"`unclip {name}` exited {res.returncode}: {tail}")
    shards = sorted(p.name for p in (folder / "done").glob("*.json"))
    return _check(
        True, f"adopted {len(shards)} shard(s) ({', '.join(shards)}), validated, 3 train-prior steps"
    )


def _check(passed: bool, details: str) -> dict:
    return {
        "name": "adopt: clip-retrieval's own output -> validate -> train-prior",
        "passed": passed,
        "details": details,
    }
