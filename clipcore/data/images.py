"""Reading image files: one place that decodes, so that prepare's check and the DataLoaders
agree on what counts as readable."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class UnreadableImage(Exception):
    """A file that should be an image but does not decode."""


def load_rgb(path: str | Path) -> Image.Image:
    """Decode an image fully (not just its header), turned upright as its EXIF Orientation tag
    says (a phone stores its photos sideways with that tag), and convert to RGB."""
    try:
        with Image.open(path) as image:
            image.load()
            return _eight_bit(ImageOps.exif_transpose(image)).convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise UnreadableImage(f"{path}: {exc.__class__.__name__}: {exc}") from None


def _eight_bit(image: Image.Image) -> Image.Image:
    """16-bit greyscale (PNG, TIFF: modes I;16, I;16B...) as 8 bits, by its high byte: PIL's
    convert clips every value above 255, which leaves a 16-bit image two tones, 0 and 255."""
    if not image.mode.startswith("I;16"):
        return image
    return Image.fromarray((np.asarray(image) >> 8).astype(np.uint8))  # mode L


class ImageFiles:
    """Images from a list of paths, transformed; items are (tensor, position in the list).

    A map-style dataset for torch's DataLoader; it needs no torch import, so stages that only
    read images (prepare, retrieve's pictures) start without loading torch."""

    def __init__(self, paths: Sequence[str | Path], transform: Callable):
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        return self.transform(load_rgb(self.paths[index])), index
