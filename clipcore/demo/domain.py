"""A competition-shaped benchmark domain, generated: identities of coloured shapes, each drawn in
two renderings, with nuisance variation that pixel matching cannot see through.

The competition pairs real photos (queries) with AI-generated renders (gallery) of 921 identities
with 5 training images each. No face data can be had here, so an identity is a layout of three
coloured shapes (kind, colour, place, size), and each image of it is drawn

- "photo"-like: textured, lit background with faint clutter, jittered colours, a light gradient,
  a colour cast, sensor noise and blur;
- "render"-like: flat or two-tone background, flat fills in the renderer's own palette (hues
  shifted, saturated) with dark outlines, crisp;

both under a random pose (rotation, scale, shift: parts of the layout leave the crop). Training
images come in both renderings, named `photo_K.png` / `render_K.png` so that a validation can
tell the renderings apart; test queries are photos and the gallery renders, as on the server.

`write_domain` writes a data root in the competition layout with `test_labels.csv`, like
clipcore/demo/digits.py. Everything is a function of the seed: one seed, the same bytes.
"""
from __future__ import annotations

import colorsys
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from clipcore.demo.digits import clear_demo_folder, hex_name, write_test_labels
from clipcore.errors import ClipcoreError

RENDERINGS = ("photo", "render")
QUERY_RENDERING, GALLERY_RENDERING = RENDERINGS  # real photos query AI-generated renders
KINDS = ("circle", "square", "triangle", "diamond", "cross", "ring")
HUES = tuple(i / 8 for i in range(8))
PARTS = 3
RENDER_HUE_SHIFT = 0.07  # the renderer's palette is not the camera's
DRAW_SCALE = 3           # shapes are drawn this many times larger, then downsampled (anti-aliasing)
MAX_IDENTITIES = math.comb(len(KINDS) * len(HUES), PARTS)  # distinct sets of coloured shapes: 17,296


@dataclass(frozen=True)
class Part:
    kind: str
    hue: float
    x: float      # place in the identity's own frame, [-1, 1]
    y: float
    size: float   # radius, in the same units


Identity = tuple[Part, Part, Part]


def identities(count: int, seed: int) -> list[Identity]:
    """`count` identities, all different in which coloured shapes they hold (their sets of
    (kind, hue) differ), so no two can be told apart only by pose or rendering."""
    if count > MAX_IDENTITIES:  # the draw below would look for a new set for ever
        raise ClipcoreError(f"the generated domain has at most {MAX_IDENTITIES:,} identities "
                            f"({PARTS} of {len(KINDS)} shapes x {len(HUES)} colours), asked for "
                            f"{count:,}")
    rng = np.random.default_rng([seed, 0])
    seen, found = set(), []
    while len(found) < count:
        pairs = rng.choice(len(KINDS) * len(HUES), size=PARTS, replace=False)
        signature = frozenset(int(p) for p in pairs)
        if signature in seen:
            continue
        seen.add(signature)
        angles = rng.uniform(0, 2 * math.pi) + np.arange(PARTS) * 2 * math.pi / PARTS \
            + rng.uniform(-0.5, 0.5, PARTS)
        radii = rng.uniform(0.25, 0.55, PARTS)
        found.append(tuple(
            Part(KINDS[p // len(HUES)], HUES[p % len(HUES)], float(r * math.cos(a)),
                 float(r * math.sin(a)), float(rng.uniform(0.22, 0.36)))
            for p, a, r in zip(pairs, angles, radii)))
    return found


def draw(identity: Identity, rendering: str, rng: np.random.Generator, size: int) -> Image.Image:
    """One RGB image of an identity in a rendering, under a pose, light and background drawn
    from rng."""
    if rendering not in RENDERINGS:
        raise ValueError(f"rendering must be one of {RENDERINGS}, got {rendering!r}")
    photo = rendering == "photo"
    big = size * DRAW_SCALE
    canvas = Image.fromarray(background(rng, big, photo))
    pen = ImageDraw.Draw(canvas)
    angle = rng.uniform(-math.pi / 4, math.pi / 4)
    scale = big * 0.5 * rng.uniform(0.6, 0.95)
    centre = big / 2 + rng.uniform(-0.18, 0.18, 2) * big
    if photo:  # faint clutter behind the identity, as a photo's scene
        for _ in range(rng.integers(0, 3)):
            _shape(pen, KINDS[rng.integers(len(KINDS))], rng.uniform(0, big, 2),
                   rng.uniform(0.05, 0.1) * big, rng.uniform(0, math.pi),
                   _rgb(rng.uniform(), rng.uniform(0.05, 0.2), rng.uniform(0.4, 0.8)), None)
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    outline = None if photo else (20, 20, 20)
    for part in identity:
        where = centre + scale * rotation @ np.array([part.x, part.y])
        if photo:
            colour = _rgb(part.hue + rng.uniform(-0.03, 0.03), rng.uniform(0.55, 0.9),
                          rng.uniform(0.6, 0.95))
        else:
            colour = _rgb(part.hue + RENDER_HUE_SHIFT, 1.0, 0.95)
        _shape(pen, part.kind, where, part.size * scale, angle, colour, outline)
    image = canvas.resize((size, size), Image.Resampling.BILINEAR)
    return photo_finish(image, rng) if photo else image


def write_domain(out: Path, train_ids, test_ids, seed: int, *, train_images: int = 5,
                 queries: int = 2, gallery: int = 2, size: int = 32,
                 renderings: tuple[str, ...] = RENDERINGS) -> None:
    """A data root: train/<id>/{photo,render}_K.png (`train_images` per identity, taking the
    `renderings` in turns, photos first by default), test/query/ (`queries` photos of each test
    identity) and test/gallery/ (`gallery` renders), UUID-named, and test_labels.csv.

    Identities are numbered: the same number is the same identity in every root written with
    this seed. Test images are drawn after an identity's training images, so test identities that
    also train (closed set) give new images, never copies.
    """
    out = Path(out)
    clear_demo_folder(out)
    train_ids, test_ids = list(train_ids), list(test_ids)
    table = identities(max(train_ids + test_ids) + 1, seed)
    names = random.Random(seed)
    images, labels = [], []  # (relative path, identity, rendering, image number); label rows
    for number in train_ids:
        for k in range(train_images):
            rendering = renderings[k % len(renderings)]
            images.append((f"train/{_folder(number)}/{rendering}_{k}.png", number, rendering, k))
    for number in test_ids:
        for split, rendering, count, first in (
                ("query", QUERY_RENDERING, queries, train_images),
                ("gallery", GALLERY_RENDERING, gallery, train_images + queries)):
            for k in range(first, first + count):
                name = f"{hex_name(names)}.png"
                images.append((f"test/{split}/{name}", number, rendering, k))
                labels.append((split, name, _folder(number)))
    write_test_labels(out, labels)
    for relative, number, rendering, k in images:
        target = out / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng([seed, 2, number, k])
        draw(table[number], rendering, rng, size).save(target)


def rendering_of(path: str) -> str | None:
    """The rendering a training file's name tells ("photo_3.png" -> "photo"), or None."""
    stem = Path(path).name.split("_")[0]
    return stem if stem in RENDERINGS else None


def _folder(number: int) -> str:
    return f"{number:04d}"


def _rgb(hue: float, saturation: float, value: float) -> tuple[int, int, int]:
    return tuple(round(255 * c) for c in colorsys.hsv_to_rgb(hue % 1.0, saturation, value))


def background(rng: np.random.Generator, big: int, photo: bool) -> np.ndarray:
    """(big, big, 3) uint8: photos a smooth random texture around a random colour; renders a
    flat colour or a two-tone gradient."""
    base = np.array(_rgb(rng.uniform(), rng.uniform(0.05, 0.4), rng.uniform(0.35, 0.9)), float)
    if photo:
        coarse = rng.normal(0, 15, (4, 4, 3))
        texture = np.asarray(Image.fromarray(np.uint8(np.clip(coarse + 128, 0, 255)))
                             .resize((big, big), Image.Resampling.BICUBIC), float) - 128
        return np.uint8(np.clip(base + texture, 0, 255))
    other = np.array(_rgb(rng.uniform(), rng.uniform(0.05, 0.3), rng.uniform(0.6, 1.0)), float)
    mix = np.linspace(0, 1, big)[:, None, None] * rng.integers(0, 2)
    return np.uint8(np.broadcast_to(base * (1 - mix) + other * mix, (big, big, 3)))


def _shape(pen: ImageDraw.ImageDraw, kind: str, centre, radius: float, angle: float,
           colour, outline) -> None:
    x, y = centre
    width = DRAW_SCALE if outline else 0
    if kind in ("circle", "ring"):
        box = (x - radius, y - radius, x + radius, y + radius)
        if kind == "circle":
            pen.ellipse(box, fill=colour, outline=outline, width=width)
        else:
            pen.ellipse(box, outline=colour, width=max(2, round(radius * 0.45)))
        return
    corners = {"square": [(1, 1), (-1, 1), (-1, -1), (1, -1)],
               "diamond": [(1.2, 0), (0, 0.8), (-1.2, 0), (0, -0.8)],
               "triangle": [(math.cos(a), math.sin(a)) for a in (-math.pi / 2, math.pi / 6,
                                                                 5 * math.pi / 6)],
               "cross": [(0.35, 1), (-0.35, 1), (-0.35, 0.35), (-1, 0.35), (-1, -0.35),
                         (-0.35, -0.35), (-0.35, -1), (0.35, -1), (0.35, -0.35), (1, -0.35),
                         (1, 0.35), (0.35, 0.35)]}[kind]
    cos, sin = math.cos(angle), math.sin(angle)
    pen.polygon([(x + radius * (cx * cos - cy * sin), y + radius * (cx * sin + cy * cos))
                 for cx, cy in corners], fill=colour, outline=outline, width=width)


def photo_finish(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """What a camera adds: a light gradient, a colour cast, sensor noise, a little blur."""
    pixels = np.asarray(image, float)
    size = pixels.shape[0]
    direction = rng.normal(size=2)
    ramp = (np.arange(size)[:, None] * direction[0] + np.arange(size)[None, :] * direction[1])
    ramp = (ramp - ramp.mean()) / (np.abs(ramp).max() + 1e-9)
    light = rng.uniform(0.7, 1.2) * (1 + rng.uniform(0.1, 0.4) * ramp)
    cast = rng.uniform(0.85, 1.15, 3)
    pixels = pixels * light[..., None] * cast + rng.normal(0, 6, pixels.shape)
    image = Image.fromarray(np.uint8(np.clip(pixels, 0, 255)))
    return image.filter(ImageFilter.GaussianBlur(rng.uniform(0.2, 0.7)))
