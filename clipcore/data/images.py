"""Reading image files: one place that decodes, so that prepare's check and the DataLoaders
agree on what counts as readable."""
from __future__ import annotations

from pathlib import Path
from typing import BinaryIO, Callable, Sequence

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class UnreadableImage(Exception):
    """A file that should be an image but does not decode."""


def load_rgb(path: str | Path | BinaryIO,
             least_size: Callable[[int, int], tuple[int, int]] | None = None) -> Image.Image:
    """Decode an image fully (not just its header), turned upright as its EXIF Orientation tag
    says (a phone stores its photos sideways with that tag), and convert to RGB.

    `least_size`: (width, height) of the upright image -> the smallest (width, height) the
    decoded image may have (clipcore.data.pixels' transforms say what their resize needs). A
    JPEG at least twice that in both sides decodes at a reduced scale (PIL's draft mode: 1/2,
    1/4 or 1/8, done in the JPEG decoder, so a large photo decodes several times faster), never
    below it; other images decode in full."""
    try:
        with Image.open(path) as image:
            if least_size is not None and image.format in ("JPEG", "MPO"):  # MPO: a phone's JPEG
                _draft(image, least_size)
            image.load()
            upright = _eight_bit(ImageOps.exif_transpose(image))  # a copy: the file may close
            return upright if upright.mode == "RGB" else upright.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise UnreadableImage(f"{path}: {exc.__class__.__name__}: {exc}") from None


def _draft(image: Image.Image, least_size: Callable[[int, int], tuple[int, int]]) -> None:
    # Orientations 5 to 8 turn the image a quarter: the file's width is the upright height.
    sideways = image.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8)
    width, height = image.size[::-1] if sideways else image.size
    least = least_size(width, height)
    least = least[::-1] if sideways else least
    if image.size[0] >= 2 * least[0] and image.size[1] >= 2 * least[1]:
        # PIL picks the largest scale that keeps both sides at least `least`.
        image.draft("RGB", least)


def _eight_bit(image: Image.Image) -> Image.Image:
    """16-bit greyscale (PNG, TIFF: modes I;16, I;16B...) as 8 bits, by its high byte: PIL's
    convert clips every value above 255, which leaves a 16-bit image two tones, 0 and 255."""
    if not image.mode.startswith("I;16"):
        return image
    return Image.fromarray((np.asarray(image) >> 8).astype(np.uint8))  # mode L


class ImageFiles:
    """Images from a list of paths, transformed; items are (tensor, position in the list).

    A map-style dataset for torch's DataLoader; it needs no torch import, so stages that only
    read images (prepare, retrieve's pictures) start without loading torch. A transform with a
    `least_size` method (clipcore.data.pixels') lets a large JPEG decode at a reduced scale."""

    def __init__(self, paths: Sequence[str | Path], transform: Callable):
        self.paths = list(paths)
        self.transform = transform
        self.least_size = getattr(transform, "least_size", None)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        return self.transform(load_rgb(self.paths[index], self.least_size)), index
