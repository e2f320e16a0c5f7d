"""The face-identity member of a fusion: dlib's 128-d face descriptor of each image's largest face
(a ResNet trained for face identity, 99.38% on LFW), from dlib-bin and face_recognition_models
(requirements-face-id.txt, never in the core install: dlib is C++, wheels for some Pythons only).

A face is found by dlib's HOG detector, whose window is 80 x 80 px: an image where none is found is
searched again upsampled 2x, then 4x (while its longer side stays within UPSAMPLED_SIDE), so the
25 px faces of LFW are found. Where none is found even so, the whole image is the face box (the
descriptor of whatever it shows) and it is counted. The 5-point landmarks align the face before
the descriptor; num_jitters 0, so a descriptor is deterministic. Importing this module without
the extra stops with one line naming requirements-face-id.txt.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from clipcore.data.images import load_rgb
from clipcore.errors import ClipcoreError

REQUIREMENTS = "requirements-face-id.txt"
MAX_UPSAMPLE = 2        # 4x: finds 88 of LFW's 100 25 px faces; 8x-32x find no more, 5-90x slower
UPSAMPLED_SIDE = 1024   # no upsampling past this longer side: a face that small there is no face
DIM = 128


def _models_folder() -> Path:
    # face_recognition_models' own location helpers import pkg_resources, which setuptools >= 81
    # no longer ships: its files are found beside the package instead, without importing it.
    spec = importlib.util.find_spec("face_recognition_models")
    return Path(next(iter(spec.submodule_search_locations))) / "models" if spec else Path("-")


try:
    import dlib
except ImportError:
    dlib = None
MODELS = _models_folder()
if dlib is None or not (MODELS / "dlib_face_recognition_resnet_model_v1.dat").is_file():
    raise ClipcoreError(f"the face-id member needs dlib and its models: pip install --no-deps -r "
                        f"{REQUIREMENTS}")


@dataclass(frozen=True)
class Descriptors:
    vectors: np.ndarray    # (N, 128) float32, unit rows
    found: np.ndarray      # (N,) bool: False where no face was found and the whole image was used

    @property
    def whole(self) -> int:
        return int((~self.found).sum())


class FaceIdentity:
    """dlib's HOG detector, 5-point landmarks and ResNet descriptor, loaded once."""

    def __init__(self):
        self.detector = dlib.get_frontal_face_detector()
        self.landmarks = dlib.shape_predictor(str(MODELS / "shape_predictor_5_face_landmarks.dat"))
        self.model = dlib.face_recognition_model_v1(
            str(MODELS / "dlib_face_recognition_resnet_model_v1.dat"))

    def largest_face(self, image: np.ndarray):
        """The largest face's box, upsampling as needed, or None where there is none."""
        height, width = image.shape[:2]
        for upsample in range(MAX_UPSAMPLE + 1):
            if upsample and max(height, width) << upsample > UPSAMPLED_SIDE:
                break
            boxes = self.detector(image, upsample)
            if len(boxes):
                return max(boxes, key=lambda box: box.area())
        return None

    def describe(self, images: Sequence[np.ndarray]) -> Descriptors:
        """Descriptors of RGB uint8 arrays (one batch through the ResNet)."""
        images = [np.ascontiguousarray(image, dtype=np.uint8) for image in images]
        boxes = [self.largest_face(image) for image in images]
        found = np.array([box is not None for box in boxes], bool)
        shapes = []
        for image, box in zip(images, boxes):
            if box is None:  # no face: the whole image is the box
                box = dlib.rectangle(0, 0, image.shape[1] - 1, image.shape[0] - 1)
            shapes.append(dlib.full_object_detections([self.landmarks(image, box)]))
        rows = self.model.compute_face_descriptor(images, shapes, num_jitters=0)
        vectors = np.array([np.array(row[0]) for row in rows], np.float32).reshape(-1, DIM)
        return Descriptors(vectors / np.linalg.norm(vectors, axis=1, keepdims=True), found)


def face_descriptors(files: Sequence[Path], batch_size: int = 32, desc: str = "face-id",
                     identity: FaceIdentity | None = None) -> Descriptors:
    """The unit descriptors of image files' largest faces, decoded and described a batch at a
    time (memory stays flat on a large gallery)."""
    identity = identity or FaceIdentity()
    parts = [Descriptors(np.zeros((0, DIM), np.float32), np.zeros(0, bool))]
    with tqdm(total=len(files), desc=desc, unit="img") as bar:
        for start in range(0, len(files), batch_size):
            chunk = files[start:start + batch_size]
            parts.append(identity.describe([np.asarray(load_rgb(f)) for f in chunk]))
            bar.update(len(chunk))
    return Descriptors(np.concatenate([p.vectors for p in parts]),
                       np.concatenate([p.found for p in parts]))
