"""The crop stage: every image of the manifests cropped to its largest face, once.

data/cropped/ mirrors data.root: each manifest image under its own relative path, so the stages
that read pixels (train, embed, report) take data/cropped/ as their image root (paths.image_root) and
the manifests stay as prepare wrote them. An image with no face is copied whole and listed in
crop_report.csv (one row per image: split, path, face found, score, box, eye-line angle). With
data.crop none the folder holds an empty report only: every stage reads data.root as before.
"""
from __future__ import annotations

import io
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd
from PIL import Image
from tqdm import tqdm

from clipcore import paths
from clipcore.crop.faces import Face, crop_face, largest_faces, load_detector
from clipcore.data.images import load_rgb
from clipcore.data.manifests import read_manifest
from clipcore.files import write_text_atomic
from clipcore.params import DataParams

SPLITS = ("train", "val", "query", "gallery")
REPORT_COLUMNS = ["split", "path", "face", "score", "left", "top", "right", "bottom", "angle"]
CHUNK = 64               # images decoded and detected at a time (memory stays flat)
JPEG_QUALITY = 95
JPEG_SUFFIXES = (".jpg", ".jpeg")


@dataclass(frozen=True)
class CropReport:
    faces: dict[str, int]      # images cropped to a face, per split
    whole: dict[str, int]      # images with no face, kept whole, per split

    def summary(self) -> str:
        if not any(self.faces.values()) and not any(self.whole.values()):
            return f"data.crop none: no crops; the stages read data.root ({paths.CROP_REPORT} empty)"
        counts = ", ".join(f"{split} {self.faces[split]}/{self.faces[split] + self.whole[split]}"
                           for split in SPLITS)
        return (f"cropped to a face: {counts}; the others kept whole, listed in "
                f"{paths.CROP_REPORT}")


def crop_all(data: DataParams, prepared: Path = paths.PREPARED, out: Path = paths.CROPPED,
             detector=None) -> CropReport:
    """Write out/<path> for every manifest image and out/crop_report.csv."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    if data.crop == "face":
        detector = detector or load_detector()
        for split in SPLITS:
            rows += _crop_split(split, read_manifest(prepared, split)["path"].tolist(),
                                Path(data.root), out, data.crop_margin, detector)
    report = pd.DataFrame(rows, columns=REPORT_COLUMNS)
    write_text_atomic(out / paths.CROP_REPORT.name,
                      report.to_csv(index=False, lineterminator="\n", float_format="%.2f"))
    return CropReport(faces={s: int(report["face"][report["split"] == s].sum()) for s in SPLITS},
                      whole={s: int((report["face"][report["split"] == s] == 0).sum())
                             for s in SPLITS})


def _crop_split(split: str, relative: list[str], root: Path, out: Path, margin: float,
                detector) -> list[list]:
    rows = []
    with tqdm(total=len(relative), desc=f"crop {split}", unit="img") as bar:
        for start in range(0, len(relative), CHUNK):
            chunk = relative[start:start + CHUNK]
            images = [load_rgb(root / p) for p in chunk]
            for path, (crop, face) in zip(chunk, face_or_whole(detector, images, margin)):
                target = out / path
                target.parent.mkdir(parents=True, exist_ok=True)
                if face is None:
                    shutil.copyfile(root / path, target)
                    rows.append([split, path, 0, 0.0, None, None, None, None, None])
                    continue
                crop.save(target, **_save_options(target.suffix))
                rows.append([split, path, 1, face.score, *face.box, face.angle])
            bar.update(len(chunk))
    return rows


def face_or_whole(detector, images: list[Image.Image], margin: float
                  ) -> list[tuple[Image.Image, Face | None]]:
    """Each image's face crop and its face, or the image itself and None where there is none."""
    return [(image if face is None else crop_face(image, face, margin), face)
            for image, face in zip(images, largest_faces(detector, images))]


def as_written(crop: Image.Image, suffix: str,
               least_size: Callable[[int, int], tuple[int, int]] | None = None) -> Image.Image:
    """A crop as decoding the file the stage writes for it gives it back: a JPEG's loses what
    JPEG_QUALITY loses (inference embeds the crops the model trained on, pixel for pixel), and
    decodes at the reduced scale `least_size` allows, as the model's loaders decode the file
    (clipcore.data.images.load_rgb)."""
    if suffix.lower() not in JPEG_SUFFIXES:
        return crop
    encoded = io.BytesIO()
    crop.save(encoded, format="JPEG", **_save_options(suffix))
    encoded.seek(0)
    return load_rgb(encoded, least_size)


def _save_options(suffix: str) -> dict:
    return {"quality": JPEG_QUALITY} if suffix.lower() in JPEG_SUFFIXES else {}
