"""The largest face of an image and its crop (MTCNN, from facenet-pytorch 2.5.3).

Why MTCNN: it is what the competition's best entries cropped with (FaceNet on MTCNN crops, 970),
its weights ship in the wheel (offline), and it gives five landmarks, so crops can be levelled on
the eyes. scikit-image's LBP cascade and OpenCV's Haar cascades ship too but find frontal faces
only and give no landmarks; dlib's HOG detector needs dlib (a large optional build).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image

from clipcore.errors import ClipcoreError

REQUIREMENTS = "requirements-face.txt"
DETECT_SIDE = 480        # images are detected at this longer side: equal sizes batch, big ones speed up
MIN_SCORE = 0.9          # MTCNN's own threshold for its last net is 0.7; below 0.9 we saw non-faces


@dataclass(frozen=True)
class Face:
    box: tuple[float, float, float, float]  # left, top, right, bottom in the image's pixels
    score: float
    eyes: tuple[tuple[float, float], tuple[float, float]] | None  # left, right eye (x, y)

    @property
    def angle(self) -> float:
        """Degrees the face is tilted (the eye line against the horizontal), 0 without landmarks."""
        if self.eyes is None:
            return 0.0
        (lx, ly), (rx, ry) = self.eyes
        return math.degrees(math.atan2(ry - ly, rx - lx))


def load_detector(device: str = "cpu"):
    """facenet-pytorch's MTCNN, or one line naming the extra requirements file."""
    try:
        from facenet_pytorch import MTCNN
    except ImportError:
        raise ClipcoreError(f"data.crop face needs facenet-pytorch: pip install --no-deps -r "
                            f"{REQUIREMENTS}") from None
    return MTCNN(keep_all=True, device=device)


def largest_faces(detector, images: Sequence[Image.Image], batch_size: int = 16) -> list[Face | None]:
    """Each image's largest face scoring at least MIN_SCORE, None where there is none. Images are
    resized to DETECT_SIDE and detected in batches of equal sizes."""
    scaled = [_for_detection(image) for image in images]
    found: list[Face | None] = [None] * len(images)
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, (small, _) in enumerate(scaled):
        by_size.setdefault(small.size, []).append(i)
    for rows in by_size.values():
        for start in range(0, len(rows), batch_size):
            batch = rows[start:start + batch_size]
            boxes, scores, points = detector.detect([scaled[i][0] for i in batch], landmarks=True)
            for i, b, s, p in zip(batch, boxes, scores, points):
                found[i] = _largest(b, s, p, scaled[i][1])
    return found


def crop_face(image: Image.Image, face: Face, margin: float) -> Image.Image:
    """A square around the face, widened by `margin` times its size on each side, levelled on the
    eyes (turned about the face's centre), clipped to the image."""
    left, top, right, bottom = face.box
    cx, cy = (left + right) / 2, (top + bottom) / 2
    half = max(right - left, bottom - top) * (0.5 + margin)
    if face.angle:
        image = image.rotate(face.angle, resample=Image.Resampling.BILINEAR, center=(cx, cy))
    box = (max(0, round(cx - half)), max(0, round(cy - half)),
           min(image.width, round(cx + half)), min(image.height, round(cy + half)))
    return image.crop(box)


def _for_detection(image: Image.Image) -> tuple[Image.Image, float]:
    """The image at DETECT_SIDE on its longer side, and the factor back to its own pixels."""
    factor = DETECT_SIDE / max(image.size)
    size = (max(1, round(image.width * factor)), max(1, round(image.height * factor)))
    return image.convert("RGB").resize(size, Image.Resampling.BILINEAR), 1 / factor


def _largest(boxes, scores, points, back: float) -> Face | None:
    if boxes is None:  # facenet-pytorch's "no face"; under numpy 2 the rest are object arrays
        return None
    boxes, scores = np.asarray(boxes.tolist(), float), np.asarray(scores.tolist(), float)
    keep = np.flatnonzero(scores >= MIN_SCORE)
    if keep.size == 0:
        return None
    areas = (boxes[keep, 2] - boxes[keep, 0]) * (boxes[keep, 3] - boxes[keep, 1])
    best = keep[int(np.argmax(areas))]
    box = tuple(float(v) * back for v in boxes[best])
    eyes = None
    if points is not None:
        marks = np.asarray(points[best].tolist(), float) * back
        eyes = ((float(marks[0, 0]), float(marks[0, 1])), (float(marks[1, 0]), float(marks[1, 1])))
    return Face(box, float(scores[best]), eyes)
