"""Queries and gallery images cropped as the model's training images were: a model trained with
data.crop face saw its images' largest faces (the crop stage), so inference crops the same way,
with the same margin, and keeps an image with no face whole, as the stage does.

Where the setting is read, first found wins: the model file's own record (train writes it, and
best/model.pt keeps it), then the summary.json beside it (best writes the run's data params; one
from before the crop stage has no crop keys: none), then the params file (a model file with
neither, as for its embed settings).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from PIL import Image

from clipcore.crop.cropping import as_written, face_or_whole
from clipcore.crop.faces import load_detector
from clipcore.data.images import UnreadableImage, load_rgb
from clipcore.errors import ClipcoreError

CROPS = ("none", "face")


@dataclass
class ImageCrop:
    crop: str                # none | face
    margin: float            # data.crop_margin
    source: str              # where the setting was read
    detector: object = None  # MTCNN, loaded where crop is face

    def describe(self) -> str:
        if self.crop == "none":
            return f"whole images (data.crop none, from {self.source})"
        return f"face crops (data.crop face, margin {self.margin:g}, from {self.source})"

    def images(self, images: Sequence[Image.Image]) -> list[Image.Image]:
        """Decoded RGB images (the service's uploads) as the model is to see them."""
        if self.crop == "none":
            return list(images)
        return [crop for crop, _ in face_or_whole(self.detector, list(images), self.margin)]

    def files(self, files: Sequence[Path],
              least_size: Callable[[int, int], tuple[int, int]] | None = None) -> list[Image.Image]:
        """Image files decoded and cropped as the embed stage reads the crop stage's files: a
        large JPEG at the reduced scale `least_size` allows (the model's transform's, as its
        loaders decode files), the detector seeing the whole image."""
        try:
            if self.crop == "none":
                return [load_rgb(file, least_size) for file in files]
            pairs = face_or_whole(self.detector, [load_rgb(file) for file in files], self.margin)
            # What the embed stage decodes: the crop stage's file of each face crop, or its copy
            # of a faceless image's file.
            return [load_rgb(file, least_size) if face is None
                    else as_written(crop, Path(file).suffix, least_size)
                    for file, (crop, face) in zip(files, pairs)]
        except UnreadableImage as exc:
            raise ClipcoreError(str(exc)) from None


def image_crop(file: Path, recorded: dict | None, run_data: dict, run_source: str) -> ImageCrop:
    """The crop the model file was trained with: its own record, else `run_data` (the data
    params of the summary.json beside it or of the params file, read from `run_source`), with
    the detector loaded: one line naming the extra requirements file where it is not installed."""
    # Data params without crop keys are from before the crop stage: whole images.
    crop = (_checked(recorded, str(file)) if recorded is not None
            else _checked({"crop": "none", "crop_margin": 0.0, **run_data}, run_source))
    if crop.crop == "face":
        try:
            crop.detector = load_detector()
        except ClipcoreError as exc:
            raise ClipcoreError(f"{file}: trained on face crops (from {crop.source}): {exc}") from None
    return crop


def _checked(record: dict, source: str) -> ImageCrop:
    crop, margin = record.get("crop"), record.get("crop_margin")
    if crop not in CROPS or isinstance(margin, bool) or not isinstance(margin, (int, float)) \
            or not 0 <= margin <= 2:
        raise ClipcoreError(f"{source}: damaged crop record (data.crop {crop!r}, data.crop_margin "
                            f"{margin!r}; expected one of {', '.join(CROPS)} and 0 to 2)")
    return ImageCrop(crop, float(margin), source)
