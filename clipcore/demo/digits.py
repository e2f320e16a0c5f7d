"""A demo data root in the competition layout, made from scikit-learn's bundled digits.

The 1,797 real 8x8 digit scans ship inside scikit-learn, so the whole pipeline runs offline
and in minutes. Class folders are named "0".."9" like the competition's numbered identity
folders, and test files get UUID-style names that do not reveal their class.
"""
from __future__ import annotations

import csv
import random
import shutil
import uuid
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from tqdm import tqdm

from clipcore import paths
from clipcore.errors import ClipcoreError
from clipcore.params import DemoParams

DIGIT_MAX = 16  # load_digits pixel values run from 0 to 16


def write_demo(out: Path, demo: DemoParams, seed: int, digits_kept=range(10)) -> None:
    """Write train/<digit>/, test/query/, test/gallery/ and test_labels.csv under `out`, for the
    digits in `digits_kept` (all ten by default; bench/bench_accuracy.py splits them)."""
    out = Path(out)
    clear_demo_folder(out)
    digits = load_digits()
    rng = random.Random(seed)
    files, labels = [], []  # (relative path, image index); (split, file, label)
    for label in digits_kept:
        indices = [int(i) for i in np.flatnonzero(digits.target == label)]
        rng.shuffle(indices)
        n_test, n_query = _test_counts(len(indices), demo)
        for position, index in enumerate(indices):
            if position >= n_test:
                files.append((f"train/{label}/digit_{index:04d}.png", index))
                continue
            split = "query" if position < n_query else "gallery"
            name = f"{hex_name(rng)}.png"
            files.append((f"test/{split}/{name}", index))
            labels.append((split, name, str(label)))
    write_test_labels(out, labels)
    for relative, index in tqdm(files, desc="demo images", unit="img"):
        target = out / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        _digit_image(digits.images[index], demo.image_size).save(target)


def write_test_labels(out: Path, labels: list[tuple[str, str, str]]) -> None:
    """out/test_labels.csv from (split, file, label) rows. Written before any image: it also
    marks the folder as generated, so a run interrupted while writing images leaves a folder
    the next run may clear."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / paths.DEMO_LABELS, "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["split", "file", "label"])
        writer.writerows(sorted(labels))


def clear_demo_folder(out: Path) -> None:
    """Remove a stale generated tree (demo or domain), but never a folder that is not one (it
    may hold real data)."""
    if not out.exists():
        return
    if out.is_dir() and (not any(out.iterdir()) or (out / paths.DEMO_LABELS).is_file()):
        shutil.rmtree(out)
        return
    raise ClipcoreError(f"{out}: exists and is not a demo data folder (no {paths.DEMO_LABELS}); "
                        f"move it away or write the demo elsewhere")


def _test_counts(n: int, demo: DemoParams) -> tuple[int, int]:
    """How many of a class's n images go to test, and how many of those become queries.

    Every class keeps at least one image in each of train, query and gallery.
    """
    n_test = min(max(2, round(n * demo.test_fraction)), n - 1)
    n_query = min(max(1, round(n_test * demo.query_fraction)), n_test - 1)
    return n_test, n_query


def hex_name(rng: random.Random) -> str:
    return uuid.UUID(int=rng.getrandbits(128), version=4).hex


def _digit_image(pixels: np.ndarray, size: int) -> Image.Image:
    gray = Image.fromarray(np.round(pixels * (255 / DIGIT_MAX)).astype(np.uint8))
    return gray.resize((size, size), Image.Resampling.BILINEAR).convert("RGB")
