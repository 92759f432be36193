"""`make bench` / `unclip bench`: each stage against its physical limit, side by side in one run.

Generates its own data under ``--out``/work (procedural images served on 127.0.0.1, synthetic stores) and
writes ``--out``/results.json and ``--out``/results.md. Every figure is a ratio of two measurements taken
alternately in the same run, repeated ``--repeats`` times (median and min..max), because shared machines are
noisy. Each measured command runs as its own process, so its peak RSS is its own.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from jobs.bench import decoder, download, embed, embed_gpu, prior, stream
from jobs.bench.harness import git_commit, machine_line, table, write_report
from pipeline.errors import UsageError

STAGES = {
    "download": download.bench,
    "embed": embed.bench,
    "embed_gpu": embed_gpu.bench,  # only where a CUDA device is visible; a "skipped" row elsewhere
    "stream": stream.bench,
    "prior": prior.bench,
    "decoder": decoder.bench,
}


@dataclass
class BenchConfig:
    out: str = field(default="bench", metadata={"help": "results.json, results.md and work/ go here"})
    repeats: int = field(default=3, metadata={"help": "alternated pairs per ratio (median, min..max)"})
    quick: bool = field(
        default=False, metadata={"help": "tiny sizes: the smoke test's setting, not meaningful"}
    )
    clip: str = field(
        default="ViT-B-32",
        metadata={
            "help": "the embed ratio's model (random weights), batch 64: the common CPU-feasible setting"
        },
    )
    stages: str = field(
        default=",".join(STAGES), metadata={"help": f"comma-separated, of {', '.join(STAGES)}"}
    )
    gpu_clips: str = field(
        default="ViT-B-32,ViT-L-14",
        metadata={"help": "the embed_gpu stage's models (comma-separated; random weights, batch 256)"},
    )
    gpu_variants: str = field(
        default="",
        metadata={
            "help": "the embed_gpu stage's rows for each model (comma-separated; default: all of them)"
        },
    )


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, list):
        return ", ".join(_cell(x) for x in v)
    if isinstance(v, dict):
        return "; ".join(f"{k} {_cell(x)}" for k, x in v.items())
    return str(v)


def markdown(results: dict) -> str:
    rows = []
    for name, r in results["results"].items():
        if "ratio_median" in r:
            val = f"{r['ratio_median']:.3f} ({r['ratio_min']:.3f}..{r['ratio_max']:.3f})"
        else:
            val = "; ".join(f"{k} {_cell(v)}" for k, v in r.items() if k not in ("unit",))
        met = {True: "yes", False: "**no**"}.get(r.get("met"), "")
        rows.append([name, val, str(r.get("target", "")), met, str(r.get("unit", ""))])
    lines = [
        f"Machine: {results['machine']}; {results['date']}; commit {results['commit']}; "
        f"{results['repeats']} repeats (median, min..max).",
        "",
        *table(["figure", "result", "target", "met", "what is measured"], rows),
    ]
    return "\n".join(lines) + "\n"


def run(cfg: BenchConfig) -> dict:
    names = cfg.stages.split(",")
    for name in names:
        if name not in STAGES:
            raise UsageError(f"unknown bench stage '{name}'; valid: {', '.join(STAGES)}")
    if cfg.repeats < 1:
        raise UsageError(f"--repeats must be >= 1 (got {cfg.repeats})")
    out = Path(cfg.out)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    for name in names:
        print(f"[bench] {name} ...", flush=True)
        t0 = time.perf_counter()
        results.update(STAGES[name](cfg, work))
        print(f"[bench] {name} done in {time.perf_counter() - t0:.0f} s", flush=True)
    report = {
        "machine": machine_line(),
        "date": time.strftime("%Y-%m-%d"),
        "commit": git_commit()[:10] + ("-dirty" if git_commit().endswith("-dirty") else ""),
        "repeats": cfg.repeats,
        "config": asdict(cfg),
        "results": results,
    }
    j, md = write_report(out, "results", report, markdown(report), json_newline=False)
    print(markdown(report))
    return {"results": str(j), "table": str(md)}
