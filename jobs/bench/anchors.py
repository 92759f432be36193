"""`make bench-anchors` / `unclip bench-anchors`: this project's stages side by side with the tools users
would otherwise pick.

The reference tools ("anchors") whose pins clash with ours run in their own venv, ``.venv-anchors``
(clip-retrieval, dalle2-pytorch), through the small scripts in ``bench/anchors/``; embedding-reader is in our
own dev extra. Everything runs on data made here, in the same run, alternating ours and theirs for every
repeat, because the machines are shared and noisy:

1. data: `pipeline.demo_data` images, served on 127.0.0.1, downloaded into webdataset shards by
   `pipeline.download` (img2dataset);
2. embed vs clip-retrieval (`jobs.bench.anchor_embed`, with the adopt check, `jobs.bench.anchor_adopt`);
3. stream vs EmbeddingReader (`jobs.bench.anchor_stream`);
4. train-prior vs dalle2-pytorch's `DiffusionPrior` (`jobs.bench.anchor_prior`);
5. train-decoder vs dalle2-pytorch's `Unet` decoder (`jobs.bench.anchor_decoder`);
6. interoperability: embedding-reader and DALLE2-pytorch's prior loader read our store
   (`jobs.bench.anchor_interop`).

Writes ``bench/anchors.json`` and ``bench/anchors.md`` and prints the table. Generated data lives under
``bench/work/anchors/`` (ignored by git). Exit code 1 if an interoperability check fails or a part could not
run; a target that is not met is reported, not an error.

    unclip bench-anchors                                  # everything (make bench-anchors)
    unclip bench-anchors --parts stream,interop --n 256
"""

from __future__ import annotations

import datetime as dt
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from jobs.bench import anchor_decoder, anchor_embed, anchor_interop, anchor_prior, anchor_stream
from jobs.bench.data import image_shards
from jobs.bench.harness import ROOT, git_commit, machine, table, versions, write_report
from pipeline.errors import UsageError

PARTS = ("embed", "stream", "prior", "decoder", "interop")


def _f(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class AnchorsConfig:
    out: str = _f("bench", "anchors.json and anchors.md are written here")
    work: str = _f("bench/work/anchors", "generated images, shards and stores")
    anchors_python: str = _f(".venv-anchors/bin/python", "python of the venv holding the reference tools")
    parts: str = _f(",".join(PARTS), f"comma-separated, of {', '.join(PARTS)}")
    store: str = _f("", "read this store in the stream / interop parts instead of generating data")
    repeats: int = _f(2, "ours/theirs pairs for embed, train-prior and train-decoder")
    seed: int = _f(0, "seed of the data and of both sides' models")
    n: int = _f(256, "procedural images for the embed part")
    image_size: int = _f(224, "their size in px")
    samples_per_shard: int = _f(128, "images per webdataset shard")
    clip: str = _f("ViT-B-32", "open_clip model, random weights (exists in open_clip 3.x and 2.x)")
    embed_batch: int = _f(64, "batch size of both embedders")
    stream_batch: int = _f(64, "batch size of both readers")
    stream_epochs: int = _f(50, "passes over the embed store per repeat")
    stream_repeats: int = _f(3, "ours/theirs pairs for the stream part")
    # a second, larger store (random 512-d rows written through pipeline.store): at 256 rows both readers'
    # per-pass set-up dominates; this shows the per-row rates
    scale_shards: int = _f(8, "shards of the larger random store (0 = skip it)")
    scale_rows_per_shard: int = _f(8192, "rows per shard of the larger store")
    scale_epochs: int = _f(1, "passes over the larger store per repeat")
    # train-prior: dalle2-pytorch takes ~15 s a batch-16 step on a 2-core CPU (its padded text sequence)
    prior_batch: int = _f(16, "train-prior batch size, both sides")
    prior_warmup: int = _f(1, "dalle2-pytorch's warm-up steps")
    prior_steps: int = _f(2, "dalle2-pytorch's timed steps")
    ours_prior_warmup: int = _f(2, "our warm-up steps")
    ours_prior_steps: int = _f(10, "our timed steps")
    dalle2_max_text_len: int = _f(256, "dalle2-pytorch's max_text_len (its default)")
    extra_max_text_len: int = _f(77, "one more informational dalle2 run at this max_text_len (0 = skip)")


def _under_root(path: str, resolve: bool = True) -> Path:
    if os.path.isabs(path):
        return Path(path)
    return (ROOT / path).resolve() if resolve else ROOT / path


class _Parts:
    """The report being filled, and running each part so that one failing keeps the others' figures."""

    def __init__(self, cfg: AnchorsConfig, report: dict):
        self.cfg, self.report = cfg, report
        self.anchors_ok = os.path.exists(cfg.anchors_python)

    def fail(self, part: str, error: str) -> None:
        self.report["failures"].append({"part": part, "error": error})

    def attempt(self, part: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as e:
            traceback.print_exc()
            self.fail(part, f"{type(e).__name__}: {e}")
            return None

    def need_anchors(self, part: str) -> bool:
        if not self.anchors_ok:
            self.fail(part, f"{self.cfg.anchors_python} not found: run `make bench-anchors` to create it")
        return self.anchors_ok


def make_data(cfg: AnchorsConfig, work: Path) -> Path:
    """Procedural images -> local HTTP server -> img2dataset shards. Reused when already made alike; a store
    of earlier data is removed with them, so that it is not read as this data's."""
    shards, summary = image_shards(
        work, "", cfg.n, cfg.image_size, cfg.samples_per_shard, cfg.seed, stale=(work / "store",)
    )
    if summary is None:
        print(f"[anchors] data: reusing {shards} ({cfg.n} images)")
        return shards
    if summary["successes"] != cfg.n:
        raise RuntimeError(
            f"download: {summary['successes']} of {cfg.n} images ({summary['failures_by_reason']})"
        )
    print(f"[anchors] data: {summary['successes']} images in {summary['shards']['finished']} shards")
    return shards


def _embed_and_store(p: _Parts, parts: list[str], work: Path) -> Path:
    """The data, the embed part, and the store the stream and interop parts read; returns the store's root."""
    cfg, report = p.cfg, p.report
    if cfg.store:  # an existing store for the stream and interoperability parts (the smoke test's way)
        if "embed" in parts:
            p.fail("embed", "--store given: embed needs the generated shards")
        return Path(cfg.store).resolve()
    store_root = work / "store"
    if not set(parts) - {"prior", "decoder"}:
        return store_root
    shards = p.attempt("data", lambda: make_data(cfg, work))
    if shards is None:
        return store_root
    if "embed" in parts and p.need_anchors("embed"):
        comps, checks = p.attempt("embed", lambda: anchor_embed.bench(cfg, work, shards)) or ([], [])
        report["comparisons"] += comps
        report["checks"] += checks
    if not (store_root / "manifest.json").exists() and {"stream", "interop"} & set(parts):
        print("[anchors] store: embedding the shards once for the stream and interoperability parts")
        log = work / "logs" / "embed_store.log"
        p.attempt("store", lambda: anchor_embed.embed_ours(cfg, shards, store_root, log))
    return store_root


def _measure_parts(p: _Parts, parts: list[str], work: Path, store_root: Path) -> None:
    cfg, report = p.cfg, p.report
    have_store = (store_root / "manifest.json").exists()
    if {"stream", "interop"} & set(parts) and not have_store and not report["failures"]:
        p.fail("store", f"no store at {store_root}")
    if "stream" in parts and have_store:
        report["comparisons"] += p.attempt("stream", lambda: anchor_stream.bench(cfg, store_root, work)) or []
    if "prior" in parts and p.need_anchors("prior"):
        report["comparisons"] += p.attempt("prior", lambda: anchor_prior.bench(cfg, work)) or []
    if "decoder" in parts and p.need_anchors("decoder"):
        report["comparisons"] += p.attempt("decoder", lambda: anchor_decoder.bench(cfg, work)) or []
    if "interop" in parts and have_store:
        er, loader = "interop: embedding-reader", "interop: dalle2-pytorch loader"
        report["checks"] += p.attempt(er, lambda: anchor_interop.check_embedding_reader(store_root)) or []
        if p.need_anchors(loader):
            check = lambda: anchor_interop.check_dalle2_loader(cfg, store_root, work)  # noqa: E731
            report["checks"] += p.attempt(loader, check) or []


def run(cfg: AnchorsConfig) -> dict:
    start = time.perf_counter()
    parts = [p.strip() for p in cfg.parts.split(",") if p.strip()]
    bad = [p for p in parts if p not in PARTS]
    if bad:
        raise UsageError(f"unknown part(s) {', '.join(bad)}; valid: {', '.join(PARTS)}")
    work = _under_root(cfg.work)
    work.mkdir(parents=True, exist_ok=True)
    cfg.anchors_python = str(_under_root(cfg.anchors_python, resolve=False))  # a venv's python is a link
    report = {
        "machine": machine(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "config": asdict(cfg),
        "comparisons": [],
        "checks": [],
        "failures": [],
    }
    p = _Parts(cfg, report)
    _measure_parts(p, parts, work, _embed_and_store(p, parts, work))
    report["machine"]["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    report["versions"] = versions(cfg.anchors_python if p.anchors_ok else None)
    report["seconds"] = round(time.perf_counter() - start, 1)
    title = "# Benchmarks against the reference tools (`make bench-anchors`)\n\n"
    write_report(_under_root(cfg.out, resolve=False), "anchors", report, title + markdown(report))
    report["exit_code"] = 1 if report["failures"] or not all(c["passed"] for c in report["checks"]) else 0
    return report


def print_report(report: dict) -> None:
    """`unclip bench-anchors`' output: the table, and where it was written."""
    out = _under_root(report["config"]["out"], resolve=False)
    print()
    print(markdown(report))
    print(f"[anchors] wrote {out / 'anchors.json'} and {out / 'anchors.md'} in {report['seconds']} s")


def _num(v: float) -> str:
    if v >= 100:
        return f"{v:,.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def _comparison_row(c: dict) -> list[str]:
    r = c["ratio"]
    return [
        c["name"],
        _num(c["ours"]["median"]),
        _num(c["theirs"]["median"]),
        c["units"],
        f"{_num(r['median'])}× ({_num(r['min'])}–{_num(r['max'])})",
        str(c["repeats"]),
        "≥ " + str(c["target"]) + "×" if c["target"] is not None else "—",
        "—" if c["met"] is None else ("yes" if c["met"] else "NO"),
    ]


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"Machine: {m['platform']}, {m['cpu_count']} CPUs ({m['processor']}), Python {m['python']}, "
        f"load average at start {m['load_avg_at_start'][0]}. Date {report['date']}, commit {report['commit']}.",
        "",
        *table(
            [
                "comparison",
                "ours (median)",
                "theirs (median)",
                "units",
                "ratio: median of the repeats' (min–max)",
                "repeats",
                "target",
                "met",
            ],
            [_comparison_row(c) for c in report["comparisons"]],
        ),
        "",
        "Each repeat runs ours and theirs side by side and takes their ratio; the ratio column is the median of "
        "those, which need not be the ratio of the two medians beside it (a shared machine's load moves both "
        "sides of one repeat together, and the per-repeat ratio cancels it).",
    ]
    if report["checks"]:
        rows = [[ch["name"], "pass" if ch["passed"] else "FAIL", ch["details"]] for ch in report["checks"]]
        lines += ["", *table(["interoperability check", "result", "details"], rows)]
    if report["failures"]:
        lines += ["", "Could not run:"]
        lines += [f"- {f['part']}: {f['error'].splitlines()[0]}" for f in report["failures"]]
    lines += ["", "Notes:"]
    lines += [f"- {c['name']}: {c['notes']}" for c in report["comparisons"] if c.get("notes")]
    v = report.get("versions", {})
    if v:
        lines.append(
            "- versions: ours "
            + ", ".join(f"{k} {x}" for k, x in v.get("ours", {}).items())
            + "; anchors "
            + ", ".join(f"{k} {x}" for k, x in v.get("anchors", {}).items())
        )
    return "\n".join(lines) + "\n"
