"""`unclip bench --quick`: every stage's measurement runs at tiny sizes and the report holds real numbers."""

import json
import math

from jobs.bench import BenchConfig, markdown, run


def test_bench_quick_writes_ratios_and_table(tmp_path):
    run(BenchConfig(out=str(tmp_path), repeats=1, quick=True))
    report = json.loads((tmp_path / "results.json").read_text())
    r = report["results"]
    for name in ("download_overhead", "embed_vs_forward", "embed_in_tasks_vs_forward", "stream_vs_mmap"):
        assert (
            r[name]["repeats"] == 1 and r[name]["ratio_median"] > 0 and math.isfinite(r[name]["ratio_median"])
        )
        assert r[name]["ratio_median"] == r[name]["ours"][0] / r[name]["theirs"][0]
        assert r[name]["met"] in (True, False)
    assert r["prior_train"]["median"] > 0 and r["prior_sample"]["median"] > 0
    assert set(r["prior_peak_rss_mb"]) == {"1x", "2x"} and all(
        v > 50 for v in r["prior_peak_rss_mb"].values()
    )
    assert set(r["embed_peak_rss"]["doubling_unclip_tiny_mb"]) == {"2_shards", "4_shards"}
    table = (tmp_path / "results.md").read_text()
    assert table == markdown(report) and "| stream_vs_mmap |" in table and report["commit"] in table
