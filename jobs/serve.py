"""A generated image folder served to img2dataset on 127.0.0.1: the demo and the benchmarks download it."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq


def served_urls(data_dir: Path, base_url: str, out: Path) -> Path:
    """Rewrite demo.parquet's relative paths as URLs on the local server."""
    table = pq.read_table(data_dir / "demo.parquet")
    urls = pc.binary_join_element_wise(pa.scalar(base_url + "/"), table["url"], "")
    table = table.set_column(table.schema.get_field_index("url"), "url", urls)
    pq.write_table(table, out)
    return out
