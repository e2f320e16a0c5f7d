"""Face detection before CLIP (the crop stage's MTCNN): detection rate and speed on the real
photos scikit-image ships (requirements-face.txt).

- lfw_subset: 100 LFW faces and 100 non-face patches, 25 x 25 px (upscaled to the detection size);
- astronaut, camera: 512 px portraits; coffee, chelsea (a cat), rocket, hubble_deep_field: no
  human face;
- speed: images/s of clipcore.crop.faces.largest_faces, batched (images of one size share a
  batch), against the same images one call each.

    OMP_NUM_THREADS=1 python bench/bench_faces.py [--repeat 3]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from skimage import data

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clipcore.crop.faces import largest_faces, load_detector  # noqa: E402

PORTRAITS = ("astronaut", "camera")
NO_FACE = ("coffee", "chelsea", "rocket", "hubble_deep_field")


def photos(names) -> list[Image.Image]:
    return [Image.fromarray(getattr(data, n)()).convert("RGB") for n in names]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="timed passes (the best is shown)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    detector = load_detector()
    lfw = [Image.fromarray((a * 255).astype(np.uint8)).convert("RGB") for a in data.lfw_subset()]
    faces, patches = lfw[:100], lfw[100:]
    found = largest_faces(detector, faces)
    false = largest_faces(detector, patches)
    print(f"lfw_subset faces found: {sum(f is not None for f in found)}/100; non-face patches "
          f"with a 'face': {sum(f is not None for f in false)}/100")
    for name, face in zip(PORTRAITS + NO_FACE, largest_faces(detector, photos(PORTRAITS + NO_FACE))):
        print(f"{name}: " + (f"face, score {face.score:.3f}, eye line {face.angle:+.1f} deg"
                             if face else "no face"))
    images = lfw[:64]
    batched, single = [], []
    for _ in range(args.repeat):
        start = time.perf_counter()
        largest_faces(detector, images)
        batched.append(time.perf_counter() - start)
        start = time.perf_counter()
        for image in images:
            largest_faces(detector, [image])
        single.append(time.perf_counter() - start)
    b, s = len(images) / min(batched), len(images) / min(single)
    print(f"speed, {len(images)} images at the detection size, 1 thread: batched {b:.1f} "
          f"images/s, one at a time {s:.1f} images/s ({b / s:.2f}x)")


if __name__ == "__main__":
    main()
