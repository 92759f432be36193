"""The benchmarks: `unclip bench` (`jobs.bench.main`: each stage against its physical limit, one module per
stage) and `unclip bench-anchors` (`jobs.bench.anchors`: ours against the tools users would otherwise pick,
one `anchor_*` module per comparison), both on `jobs.bench.harness` and the data of `jobs.bench.data`."""

from jobs.bench.data import random_store

__all__ = ["random_store"]
