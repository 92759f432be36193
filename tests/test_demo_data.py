"""The demo dataset: deterministic for a seed, and the caption states what is drawn."""

import hashlib

import numpy as np
import pyarrow.parquet as pq
import pytest
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
            article = "an" if r[f"color{i}"] == "orange" else "a"  # "an orange", grammatical as prompts are
            phrase = f"{article} {r[f'color{i}']} {r[f'shape{i}']} " + (
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


def test_attribute_accuracy_splits_one_and_two_shape_scenes():
    """Swapping the two shapes' colours in every two-shape picture drops only the two-shape figure to zero,
    while 'anywhere' still counts both colours as present."""
    from pipeline.demo_data import attribute_accuracy, draw, sample_attributes

    rng = np.random.default_rng(2)
    attrs = [sample_attributes(rng) for _ in range(120)]
    two = [a for a in attrs if a.get("shape2") and a["color1"] != a["color2"]]
    one = [a for a in attrs if not a.get("shape2")]
    assert len(two) > 10 and len(one) > 10
    swapped = [{**a, "color1": a["color2"], "color2": a["color1"]} for a in two]
    images = np.stack([np.asarray(draw(a, 32)) for a in one + swapped])
    r = attribute_accuracy(images, one + two)
    assert r["shape_color_accuracy_one_shape"] == 1.0 and r["images_one_shape"] == len(one)
    assert r["shape_color_accuracy_two_shapes"] == 0.0 and r["images_two_shapes"] == len(two)
    assert r["shape_color_anywhere_accuracy"] == 1.0
    assert r["shape_color_accuracy"] == len(one) / (len(one) + 2 * len(two))
    assert attribute_accuracy(images[: len(one)], one)["shape_color_accuracy_two_shapes"] is None


def test_pair_outcomes_tell_swapped_from_merged_two_shape_scenes():
    """Two-colour two-shape scenes drawn as captioned read 'both right'; with the colours swapped, 'swapped';
    with the first colour at both places, 'merged' (half of them) and a third colour 'neither'; one-shape scenes
    and same-colour pairs are not counted."""
    from pipeline.demo_data import COLORS, attribute_accuracy, draw, sample_attributes

    rng = np.random.default_rng(4)
    attrs = [sample_attributes(rng) for _ in range(200)]
    two = [a for a in attrs if a.get("shape2") and a["color1"] != a["color2"]]
    same = [{**a, "color2": a["color1"]} for a in two[:5]]
    one = [a for a in attrs if not a.get("shape2")][:10]
    assert len(two) > 20

    def third(a):  # a visible colour that is neither shape's
        return next(c for c in COLORS if c not in (a["color1"], a["color2"], a["background"]))

    half = len(two) // 2
    drawn = {
        "right": two,
        "swapped": [{**a, "color1": a["color2"], "color2": a["color1"]} for a in two],
        "merged": [{**a, "color2": a["color1"]} for a in two[:half]]
        + [{**a, "color2": third(a)} for a in two[half:]],
    }
    for kind, scenes in drawn.items():
        images = np.stack([np.asarray(draw(a, 32)) for a in one + same + scenes])
        r = attribute_accuracy(images, one + same + two)
        assert r["two_color_pairs"] == len(two)
        expect = {"right": (1.0, 0.0, 0.0), "swapped": (0.0, 1.0, 0.0), "merged": (0.0, 0.0, half / len(two))}
        got = (r["pairs_both_right"], r["pairs_swapped"], r["pairs_merged"])
        assert got == expect[kind], (kind, got)
    assert attribute_accuracy(np.stack([np.asarray(draw(a, 32)) for a in one]), one)["pairs_swapped"] is None


def test_eval_decoder_table_shows_the_pair_outcomes():
    from jobs.eval_decoder import format_table
    from pipeline.demo_data import attribute_accuracy, draw, sample_attributes

    rng = np.random.default_rng(5)
    attrs = [a for a in (sample_attributes(rng) for _ in range(80)) if a.get("shape2")]
    attrs = [a for a in attrs if a["color1"] != a["color2"]]
    true = np.stack([np.asarray(draw(a, 32)) for a in attrs])
    swapped = np.stack(
        [np.asarray(draw({**a, "color1": a["color2"], "color2": a["color1"]}, 32)) for a in attrs]
    )
    agree = {"cos": 0.5, "top1": 0.5}
    report = {
        "samples": len(attrs),
        "reconstruction": agree,
        "text_to_image": agree,
        "attributes": {
            "true_images": attribute_accuracy(true, attrs),
            "reconstruction": attribute_accuracy(true, attrs),
            "text_to_image": attribute_accuracy(swapped, attrs),
        },
    }
    lines = format_table(report).splitlines()
    head = next(i for i, line in enumerate(lines) if "two-shape scenes, 2 colours" in line)
    assert f"({len(attrs)})" in lines[head] and lines[head].split()[-3:] == ["right", "swapped", "merged"]
    assert lines[head + 1].split()[-3:] == ["1.000", "0.000", "0.000"]  # reconstruction: as drawn
    assert lines[head + 2].split()[-3:] == ["0.000", "1.000", "0.000"]  # text -> image: every pair swapped


def test_background_grain_measures_noise_on_the_background_only():
    """Drawn scenes score 0; uniform noise of +-20 levels reads as its mean absolute size (~10.2); noise on the
    shapes alone (background untouched) still reads 0."""
    from pipeline.demo_data import attribute_accuracy, background_grain, draw, sample_attributes

    rng = np.random.default_rng(3)
    attrs = [{**sample_attributes(rng), "background": "gray"} for _ in range(40)]  # 128: no clipping at +-20
    images = np.stack([np.asarray(draw(a, 32)) for a in attrs])
    assert background_grain(images, attrs) == 0.0
    noisy = (images.astype(np.int64) + rng.integers(-20, 21, size=images.shape)).clip(0, 255).astype(np.uint8)
    grain = background_grain(noisy, attrs)
    assert abs(grain - 420 / 41) < 0.5  # E|U{-20..20}| = 2 * (1 + ... + 20) / 41
    on_background = np.all(images == 128, axis=-1, keepdims=True)
    assert background_grain(np.where(on_background, images, noisy), attrs) == 0.0
    assert attribute_accuracy(noisy, attrs)["background_grain"] == grain


def test_broken_binding_always_draws_another_picture_and_swaps_two_colours():
    """The demo CLIP's hard negatives: never the same picture as the scene; a two-shape scene of two colours and
    two shapes has its colours or its positions swapped, nothing else changed."""
    from pipeline.demo_data import broken_binding, draw, sample_attributes

    rng = np.random.default_rng(5)
    swaps = 0
    for _ in range(400):
        a = sample_attributes(rng)
        b = broken_binding(a, rng)
        assert b["background"] == a["background"]
        assert not np.array_equal(np.asarray(draw(a, 32)), np.asarray(draw(b, 32))), (a, b)
        if a["shape2"] and a["color1"] != a["color2"] and a["shape1"] != a["shape2"]:
            colors = (b["color1"], b["color2"]) == (a["color2"], a["color1"])
            positions = (b["position1"], b["position2"]) == (a["position2"], a["position1"])
            assert colors != positions and {b["shape1"], b["shape2"]} == {a["shape1"], a["shape2"]}
            swaps += colors
    # two same-colour, same-shape scenes are rare; both swap kinds occur
    assert 20 < swaps < 120
    # same picture otherwise: a scene of two identical shapes in one colour gets a new colour
    same = {"background": "white", "shape1": "circle", "color1": "red", "position1": "center",
            "shape2": "circle", "color2": "red", "position2": "top left"}  # fmt: skip
    b = broken_binding(same, rng)
    assert b["color1"] not in ("red", "white") and b["color2"] == "red"


@pytest.mark.parametrize("size", ["8", "100000"])
def test_a_picture_size_out_of_range_is_refused_before_anything_is_written(size, tmp_path, capsys):
    # 100000 px a side was taken, and the process was killed for memory, leaving an empty images/ behind
    from jobs.cli import main

    assert main(["demo-data", "--out", str(tmp_path / "dd"), "--n", "1", "--size", size]) == 2
    assert "--size between 16 and 4096" in capsys.readouterr().err and not (tmp_path / "dd").exists()
