"""Procedural captioned-image dataset for the CPU demo and the tests.

Writes ``OUT/images/00000.png ...`` and ``OUT/demo.parquet`` with columns ``url`` (path relative to OUT;
`jobs.serve` rewrites it to an http://127.0.0.1 address while it serves the folder), ``caption`` and the
attributes that the caption states (for evaluation). The caption determines the picture: background colour,
then one or two shapes, each with a colour and one of five positions. Deterministic for a seed.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw
from tqdm import tqdm

from pipeline.errors import UsageError
from pipeline.store import check_out_folder

log = logging.getLogger(__name__)

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 170),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
BACKGROUNDS = ("white", "black", "gray")
BACKGROUND_RGB = {"white": (250, 250, 250), "black": (10, 10, 10), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle", "diamond")
# Position name -> centre as a fraction of the image side.
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.27, 0.27),
    "top right": (0.73, 0.27),
    "bottom left": (0.27, 0.73),
    "bottom right": (0.73, 0.73),
    "center": (0.5, 0.5),
}
ATTRIBUTE_COLUMNS = ("background", "shape1", "color1", "position1", "shape2", "color2", "position2")


@dataclass
class DemoDataConfig:
    out: str  # folder for the PNG images and demo.parquet (paths, captions, attributes)
    n: int = 2000  # scenes to draw
    size: int = 64  # image side in pixels
    seed: int = 0  # the same seed draws the same scenes


def sample_attributes(rng: np.random.Generator) -> dict[str, str | None]:
    """Draw one scene: a background and one or two shapes at distinct positions, visible on it."""
    background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    n_shapes = 1 + int(rng.integers(2))
    positions = rng.permutation(len(POSITIONS))[:n_shapes]
    # A shape never takes the background's own colour, so it is always visible.
    palette = [c for c in COLORS if c != background]
    attrs: dict[str, str | None] = {"background": background}
    for i in range(2):
        if i < n_shapes:
            attrs[f"shape{i + 1}"] = SHAPES[rng.integers(len(SHAPES))]
            attrs[f"color{i + 1}"] = palette[rng.integers(len(palette))]
            attrs[f"position{i + 1}"] = list(POSITIONS)[positions[i]]
        else:
            attrs[f"shape{i + 1}"] = attrs[f"color{i + 1}"] = attrs[f"position{i + 1}"] = None
    return attrs


def caption_for(attrs: dict[str, str | None]) -> str:
    parts = [
        f"{_article(attrs[f'color{i}'])} {attrs[f'color{i}']} {attrs[f'shape{i}']} at the {attrs[f'position{i}']}"
        for i in (1, 2)
        if attrs[f"shape{i}"] is not None
    ]
    return f"{' and '.join(parts)} on a {attrs['background']} background".replace(
        "at the center", "in the center"
    )


def _article(word: str) -> str:
    """ "an orange", as the demo's prompts and any user write it (captions said "a orange" until 2026-12-05)."""
    return "an" if word[0] in "aeiou" else "a"


def draw(attrs: dict[str, str | None], size: int) -> Image.Image:
    img = Image.new("RGB", (size, size), BACKGROUND_RGB[attrs["background"]])
    d = ImageDraw.Draw(img)
    r = size * 0.2  # half the side of a shape's box: shapes at distinct positions never overlap
    for i in (1, 2):
        shape = attrs[f"shape{i}"]
        if shape is None:
            continue
        fx, fy = POSITIONS[attrs[f"position{i}"]]
        cx, cy, fill = fx * size, fy * size, COLORS[attrs[f"color{i}"]]
        if shape == "circle":
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif shape == "square":
            d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif shape == "triangle":
            d.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
        else:  # diamond
            d.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    return img


def broken_binding(attrs: dict[str, str | None], rng: np.random.Generator) -> dict[str, str | None]:
    """The same scene with its binding broken, for the demo CLIP's hard-negative captions: a two-shape scene
    gets, at even odds, its two colours swapped or its two shapes' positions swapped, a one-shape scene another
    position or another colour. Always a different picture: where a swap would draw the same one (two shapes of
    one colour, or the same shape and colour twice), the other swap or a new colour for the first shape."""
    a = dict(attrs)
    if a["shape2"] is not None:
        colors_differ, shapes_differ = a["color1"] != a["color2"], a["shape1"] != a["shape2"]
        if colors_differ and (rng.random() < 0.5 or not shapes_differ):
            a["color1"], a["color2"] = a["color2"], a["color1"]
        elif shapes_differ:
            a["position1"], a["position2"] = a["position2"], a["position1"]
        else:
            others = [c for c in COLORS if c not in (a["background"], a["color1"])]
            a["color1"] = others[rng.integers(len(others))]
    elif rng.random() < 0.5:
        others = [p for p in POSITIONS if p != a["position1"]]
        a["position1"] = others[rng.integers(len(others))]
    else:
        others = [c for c in COLORS if c not in (a["background"], a["color1"])]
        a["color1"] = others[rng.integers(len(others))]
    return a


def _is_demo_folder(folder: Path) -> bool:
    """Whether `folder` holds only what `run` writes (a run killed midway leaves images without the table)."""
    if not {p.name for p in folder.iterdir()} <= {"images", "demo.parquet", "demo.parquet.tmp"}:
        return False
    if (folder / "images").is_dir() and not all(
        re.fullmatch(r"\d{5,}\.png(\.tmp)?", p.name) for p in (folder / "images").iterdir()
    ):
        return False
    try:
        return not (folder / "demo.parquet").exists() or set(ATTRIBUTE_COLUMNS) <= set(
            pq.read_schema(folder / "demo.parquet").names
        )
    except (OSError, ValueError):
        return False


def run(cfg: DemoDataConfig) -> dict:
    """Write ``cfg.n`` images and ``demo.parquet`` into ``cfg.out``. Returns a small report."""
    if cfg.n < 1 or not 16 <= cfg.size <= 4096:
        raise UsageError(f"--n must be >= 1 and --size between 16 and 4096 (got n={cfg.n}, size={cfg.size})")
    out = Path(cfg.out)
    check_out_folder(
        out, _is_demo_folder, "a demo-data folder (demo.parquet with scene columns, images/NNNNN.png)"
    )
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    rows: dict[str, list] = {"url": [], "caption": [], **{c: [] for c in ATTRIBUTE_COLUMNS}}
    for i in tqdm(range(cfg.n), desc="demo-data", unit="img", mininterval=1.0):
        attrs = sample_attributes(rng)
        rel = f"images/{i:05d}.png"
        tmp = out / f"{rel}.tmp"
        draw(attrs, cfg.size).save(tmp, format="PNG")
        os.replace(tmp, out / rel)
        rows["url"].append(rel)
        rows["caption"].append(caption_for(attrs))
        for c in ATTRIBUTE_COLUMNS:
            rows[c].append(attrs[c])
    table = pa.table(rows)
    tmp = out / "demo.parquet.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, out / "demo.parquet")
    return {"rows": cfg.n, "parquet": str(out / "demo.parquet"), "images": str(out / "images")}


# ---------------------------------------------------------------- reading scenes back from pixels


def _nearest(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    names = list(palette)
    dist = ((np.asarray([palette[n] for n in names], dtype=np.float32) - rgb) ** 2).sum(-1)
    return names[int(dist.argmin())]


def read_scene(image: np.ndarray) -> dict[str, str]:
    """The background colour and the colour at each named position of a uint8 [H, W, 3] picture, each the
    nearest palette colour to the median of a small patch (border patches for the background: no shape
    reaches within 7% of the border)."""
    h, w, _ = image.shape
    m = max(1, h // 16)
    border = np.concatenate(
        [image[:m, :m], image[:m, -m:], image[-m:, :m], image[-m:, -m:], image[:m, w // 2 - m : w // 2 + m]],
        axis=1,
    ).reshape(-1, 3)
    scene = {"background": _nearest(np.median(border, 0), BACKGROUND_RGB)}
    shape_palette = {**COLORS, "gray": BACKGROUND_RGB["gray"]}  # reading the background colour is a miss
    for name, (fx, fy) in POSITIONS.items():
        cx, cy = int(fx * w), int(fy * h)
        patch = image[cy - m : cy + m + 1, cx - m : cx + m + 1].reshape(-1, 3)
        scene[name] = _nearest(np.median(patch, 0), shape_palette)
    return scene


def _scores(scenes: list[dict], attrs: list[dict]) -> tuple[int, int, int, int]:
    """(background hits, shape-colour hits at the stated position, hits anywhere, shapes)."""
    bg, at, anywhere, shapes = 0, 0, 0, 0
    for scene, a in zip(scenes, attrs):
        bg += scene["background"] == a["background"]
        seen = {scene[p] for p in POSITIONS}
        for i in (1, 2):
            if a.get(f"shape{i}"):
                shapes += 1
                at += scene[a[f"position{i}"]] == a[f"color{i}"]
                anywhere += a[f"color{i}"] in seen
    return bg, at, anywhere, shapes


def pair_outcomes(scenes: list[dict], attrs: list[dict]) -> dict[str, float | int | None]:
    """How the two shapes of a two-colour scene come out, read at their stated positions: both right, swapped
    (each shape's colour at the other's place), merged (one of the two colours at both places), or otherwise
    (a shape missing or a third colour). Scenes whose two shapes share a colour are left out: there, a swap is
    invisible and a merge is right. Fractions of `two_color_pairs` (None where there are none)."""
    counts = {"both_right": 0, "swapped": 0, "merged": 0}
    n = 0
    for scene, a in zip(scenes, attrs):
        if not a.get("shape2") or a["color1"] == a["color2"]:
            continue
        n += 1
        got1, got2 = scene[a["position1"]], scene[a["position2"]]
        if (got1, got2) == (a["color1"], a["color2"]):
            counts["both_right"] += 1
        elif (got1, got2) == (a["color2"], a["color1"]):
            counts["swapped"] += 1
        elif got1 == got2 and got1 in (a["color1"], a["color2"]):
            counts["merged"] += 1
    return {"two_color_pairs": n, **{f"pairs_{k}": (v / n if n else None) for k, v in counts.items()}}


def background_grain(images: np.ndarray, attrs: list[dict], margin: int = 1) -> float:
    """Pixel noise on flat background, in 0-255 levels: per picture, the mean absolute deviation of its
    background pixels from their own median (all channels), averaged over pictures. Background pixels are those
    the caption's own drawing at the picture's size leaves as background, less a `margin`-pixel band around each
    shape, so that blurred or misplaced edges are not counted as grain. A drawn scene scores 0; the demo
    decoder's residual sampling noise shows here (issue 8's "grainy samples")."""
    out = []
    for img, a in zip(images, attrs):
        true = np.asarray(draw(a, img.shape[0]))  # [H, W, 3]
        bg = np.all(true == np.asarray(BACKGROUND_RGB[a["background"]], dtype=true.dtype), axis=-1)  # [H, W]
        padded = np.pad(bg, margin, mode="edge")
        h, w = bg.shape
        for dy in range(2 * margin + 1):
            for dx in range(2 * margin + 1):
                bg = bg & padded[dy : dy + h, dx : dx + w]
        px = img[bg].astype(np.float32)  # [N, 3]
        if len(px):  # a picture with no background left to read is skipped, not counted as noiseless
            out.append(float(np.abs(px - np.median(px, axis=0)).mean()))
    return float(np.mean(out)) if out else 0.0


def attribute_accuracy(images: np.ndarray, attrs: list[dict]) -> dict[str, float]:
    """How often the pictures show what their captions state: background colour, each shape's colour at its
    stated position, and each shape's colour at any of the five positions. Chance levels: uniform guessing for
    the first two (3 backgrounds, 7 shape colours); for "anywhere", the same pictures scored against other
    pictures' captions (it depends on how many colours a picture holds). The colour at the stated position is
    also given for one-shape and two-shape scenes apart (None where there are none): two shapes are where a
    decoder swaps or merges colours; `pair_outcomes` says which, for two-shape scenes of two colours.
    `background_grain` (levels, not an accuracy) is the pixel noise on the flat background."""
    scenes = [read_scene(img) for img in images]
    bg, at, anywhere, shapes = _scores(scenes, attrs)
    shifted = _scores(scenes, attrs[1:] + attrs[:1])  # each picture against the next picture's caption
    other = shifted[2] if len(attrs) > 1 else 0
    n = max(1, shapes)
    by_kind = {}
    for kind, two in (("one_shape", False), ("two_shapes", True)):
        idx = [i for i, a in enumerate(attrs) if bool(a.get("shape2")) == two]
        hits, seen = _scores([scenes[i] for i in idx], [attrs[i] for i in idx])[1::2]
        by_kind[f"shape_color_accuracy_{kind}"] = hits / seen if seen else None
        by_kind[f"images_{kind}"] = len(idx)
    return {
        "background_accuracy": bg / max(1, len(attrs)),
        "shape_color_accuracy": at / n,
        "shape_color_anywhere_accuracy": anywhere / n,
        **by_kind,
        "background_chance": 1 / len(BACKGROUNDS),
        "shape_color_chance": 1 / (len(COLORS) - 1),
        "shape_color_anywhere_chance": other / max(1, shifted[3]),
        "images": len(attrs),
        **pair_outcomes(scenes, attrs),
        "background_grain": background_grain(images, attrs),
    }
