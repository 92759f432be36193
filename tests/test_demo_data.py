"""The demo dataset: deterministic for a seed, and the caption states what is drawn."""

import hashlib

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from pipeline.demo_data import BACKGROUND_RGB, COLORS, POSITIONS, DemoDataConfig, run


def digest(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    run(DemoDataConfig(out=str(tmp_path / "a"), n=40, size=32, seed=3))
    run(DemoDataConfig(out=str(tmp_path / "b"), n=40, size=32, seed=3))
    run(DemoDataConfig(out=str(tmp_path / "c"), n=40, size=32, seed=4))
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert digest(tmp_path / "a") != digest(tmp_path / "c")


def test_captions_match_attributes_and_pixels(tmp_path):
    run(DemoDataConfig(out=str(tmp_path), n=200, size=64, seed=0))
    rows = pq.read_table(tmp_path / "demo.parquet").to_pylist()
    assert len(rows) == 200 and len({r["caption"] for r in rows}) > 150
    two = 0
    for r in rows:
        img = np.asarray(Image.open(tmp_path / r["url"]))
        assert img[0, 0].tolist() == list(BACKGROUND_RGB[r["background"]])  # corners stay background
        assert r["caption"].endswith(f"on a {r['background']} background")
        for i in (1, 2):
            if r[f"shape{i}"] is None:
                continue
            two += i == 2
            phrase = f"a {r[f'color{i}']} {r[f'shape{i}']} " + (
                "in the center" if r[f"position{i}"] == "center" else f"at the {r[f'position{i}']}"
            )
            assert phrase in r["caption"]
            fx, fy = POSITIONS[r[f"position{i}"]]
            # Every shape covers its own centre pixel, in its colour.
            assert img[int(fy * 64), int(fx * 64)].tolist() == list(COLORS[r[f"color{i}"]])
    assert 50 < two < 150  # both one- and two-shape scenes occur


def test_attributes_read_back_from_pixels():
    """Drawn scenes read back exactly at 32 px; pictures paired with other scenes' captions score near chance."""
    from pipeline.demo_data import attribute_accuracy, draw, sample_attributes

    rng = np.random.default_rng(1)
    attrs = [sample_attributes(rng) for _ in range(200)]
    images = np.stack([np.asarray(draw(a, 32)) for a in attrs])
    exact = attribute_accuracy(images, attrs)
    assert exact["background_accuracy"] == 1.0 and exact["shape_color_accuracy"] == 1.0
    assert exact["shape_color_anywhere_accuracy"] == 1.0 and 0.1 < exact["shape_color_anywhere_chance"] < 0.4
    shuffled = attribute_accuracy(np.roll(images, 1, axis=0), attrs)
    assert shuffled["background_accuracy"] < 0.6 and shuffled["shape_color_accuracy"] < 0.3
    assert shuffled["shape_color_anywhere_accuracy"] < 0.4
    assert exact["background_chance"] == 1 / 3
