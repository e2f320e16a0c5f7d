"""Realistic JPEGs for the speed checks, made here (no data set travels): smooth colour fields
with texture and sensor-like noise at JPEG quality 90, so decoding and resizing cost what a
camera photo's do (a flat or tiny image would decode many times faster). Two sizes: 250x250
(a face crop) and 1024x768 (a photo)."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from clipcore.data.manifests import prepare
from clipcore.params import parse_params

from .runs import repository_params

SIZES = {"250x250": (250, 250), "1024x768": (1024, 768)}
CLASSES = 8


def photo(size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    width, height = size

    def field(cells: tuple[int, int], amplitude: float) -> np.ndarray:
        grid = Image.fromarray((rng.random((*cells, 3)) * 255).astype(np.uint8))
        return np.asarray(grid.resize(size, Image.BICUBIC), dtype=np.float32) * amplitude

    pixels = (field((6, 8), 0.8) + field((max(1, height // 16), max(1, width // 16)), 0.25)
              + rng.normal(0, 6, (height, width, 3)))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_photos(folder: Path, size: str, count: int) -> Path:
    """`count` JPEGs of `size` in the competition layout under folder/demo (train/<class>/,
    test/query/, test/gallery/: 1/8 each to query and gallery) and their manifests under
    folder/prepared."""
    root = folder / "demo"
    targets = []
    for i in range(count):
        split = ("test/query" if i % 8 == 0 else "test/gallery" if i % 8 == 1 else
                 f"train/class_{i % CLASSES}")
        targets.append(root / split / f"photo_{i:05d}.jpg")
    for target in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor() as pool:
        list(pool.map(lambda it: photo(SIZES[size], it[0]).save(it[1], quality=90),
                      enumerate(targets)))
    params = parse_params(repository_params())
    prepare(root, folder / "prepared", params.data, params.seed)
    return folder
