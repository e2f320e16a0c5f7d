"""What prepare's per-file sha256 (the manifests' sha256 column, compared on resume) adds to the
image check prepare runs anyway, on a competition-sized set: 21,000 JPEGs of about 100 KB.
The candidates: sha256 of the bytes, or a stat (size + mtime) that a copy or checkout changes
without changing the pixels.

    python bench/bench_digest.py                  # 21,000 files
    python bench/bench_digest.py --files 2100     # a tenth, quicker

Writes the files in a temporary folder (about 2 GB for 21,000) and times each pass over them
with prepare's thread pool, page cache warm (as right after a copy or a first pass).
"""
from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from clipcore.files import file_sha256  # noqa: E402
from clipcore.data.manifests import _inspect, _problem  # noqa: E402

DISTINCT = 64  # images encoded; the files cycle through them (timing does not depend on it)


def jpeg(rng: np.random.Generator) -> bytes:
    """About 100 KB: a 500x500 smooth gradient with noise, quality 90."""
    y, x = np.mgrid[0:500, 0:500]
    base = np.stack([x * 0.5, y * 0.5, (x + y) * 0.25], axis=-1)
    pixels = np.clip(base + rng.normal(0, 14, base.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def timed(files: list[Path], check) -> float:
    started = time.perf_counter()
    with ThreadPoolExecutor() as pool:  # as prepare runs its check
        list(pool.map(check, files))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=21_000)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    images = [jpeg(rng) for _ in range(DISTINCT)]
    with tempfile.TemporaryDirectory() as tmp:
        files = [Path(tmp) / f"{i:05d}.jpg" for i in range(args.files)]
        for i, path in enumerate(files):
            path.write_bytes(images[i % DISTINCT])
        mb = sum(len(images[i % DISTINCT]) for i in range(args.files)) / 1e6
        timed(files, file_sha256)  # warm the page cache
        passes = {"decode (prepare before)": _problem, "decode + sha256 (prepare now)": _inspect,
                  "sha256 alone": file_sha256, "stat alone": lambda p: p.stat()}
        seconds = {name: timed(files, check) for name, check in passes.items()}
    print(f"{args.files:,} files, {mb:,.0f} MB, {mb * 1e3 / args.files:.0f} KB each, "
          f"page cache warm:")
    for name, s in seconds.items():
        print(f"  {name:30s} {s:7.2f} s  {s / args.files * 1e3:6.3f} ms/file")
    before, now = seconds["decode (prepare before)"], seconds["decode + sha256 (prepare now)"]
    print(f"sha256 adds {now - before:+.2f} s to prepare's check ({(now / before - 1) * 100:+.1f}%)"
          f"; stat would save at most {seconds['sha256 alone'] - seconds['stat alone']:.2f} s")


if __name__ == "__main__":
    main()
