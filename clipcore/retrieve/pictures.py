"""One picture per epoch of what retrieval returns: a row per query, the query image first,
then its best gallery matches, framed green where the class is right and red where it is
wrong (unframed when the test labels are unknown). Drawn with PIL alone."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from clipcore.data.images import UnreadableImage, load_rgb
from clipcore.files import write_atomic

THUMB = 80           # pixels per thumbnail, frame included
FRAME = 4            # frame width
GAP = 12             # between the query and its matches, and around the grid
CAPTION = 24         # height of the caption band
MAX_MATCHES = 10     # columns of matches at most, whatever retrieve.top_k is
BACKGROUND = (255, 255, 255)
UNREADABLE = (160, 160, 160)
QUERY_FRAME = (40, 90, 200)
RIGHT = (0, 170, 60)
WRONG = (220, 30, 30)


def picture_rows(n_queries: int, count: int) -> list[int]:
    """`count` query rows evenly spaced in manifest order (all when there are fewer): the
    same queries in every epoch's picture, so that the pictures compare."""
    if count >= n_queries:
        return list(range(n_queries))
    return [int(i) for i in np.linspace(0, n_queries - 1, count).round()]


def draw_grid(path: Path, caption: str, query_paths: Sequence[Path],
              ranked_paths: Sequence[Sequence[Path]], hits: np.ndarray | None) -> Path:
    """Write the PNG: row r = query_paths[r], then ranked_paths[r] (best first).

    hits[r, j]: whether match j of row r has the query's class; None when unknown.
    """
    columns = min(max((len(r) for r in ranked_paths), default=0), MAX_MATCHES)
    width = 2 * GAP + THUMB + GAP + columns * THUMB
    height = CAPTION + GAP + len(query_paths) * THUMB + GAP
    grid = Image.new("RGB", (width, height), BACKGROUND)
    ImageDraw.Draw(grid).text((GAP, CAPTION // 2), caption, fill=(0, 0, 0), anchor="lm",
                              font=ImageFont.load_default(size=14))
    for r, (query, ranked) in enumerate(zip(query_paths, ranked_paths)):
        top = CAPTION + GAP + r * THUMB
        grid.paste(_tile(query, QUERY_FRAME), (GAP, top))
        for j, match in enumerate(ranked[:columns]):
            frame = None if hits is None else (RIGHT if hits[r][j] else WRONG)
            grid.paste(_tile(match, frame), (2 * GAP + THUMB + j * THUMB, top))
    return write_atomic(path, lambda f: grid.save(f, format="PNG"))


def _tile(path: Path, frame: tuple[int, int, int] | None) -> Image.Image:
    """A THUMB-square tile: the image scaled to fit inside the frame (grey if unreadable)."""
    tile = Image.new("RGB", (THUMB, THUMB), frame or BACKGROUND)
    inner = THUMB - 2 * FRAME
    tile.paste(BACKGROUND, (FRAME, FRAME, FRAME + inner, FRAME + inner))
    try:
        image = ImageOps.contain(load_rgb(path), (inner, inner))
    except UnreadableImage:
        image = Image.new("RGB", (inner, inner), UNREADABLE)
    tile.paste(image, (FRAME + (inner - image.width) // 2, FRAME + (inner - image.height) // 2))
    return tile
