"""The CRC-32 check that every model file and checkpoint read goes through: what it adds to
reading a file, against torch.load alone. Goal: the check reads >= 1 GB/s (under 1.5 s for an
unfrozen ViT-B/32 checkpoint), small next to the epoch that wrote the file.

    python bench/bench_integrity.py              # 350 MB: an unfrozen ViT-B/32 model file
    python bench/bench_integrity.py --mb 1400    # an unfrozen ViT-B/32 checkpoint

Writes the file in a temporary folder; prints the best of 3 timings and the ratio.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from clipcore.model.checkpoint import check_archive, load_file, save_atomic  # noqa: E402


def best_of(runs: int, action) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=350, help="file size in MB")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model_epoch_1.pt"
        tensors = {f"t{i}": torch.rand(2_500_000) for i in range(max(1, args.mb // 10))}
        save_atomic({"state": tensors}, path)
        del tensors
        size = path.stat().st_size / 1e6
        bare = best_of(3, lambda: torch.load(path, weights_only=True))
        check = best_of(3, lambda: check_archive(path))
        checked = best_of(3, lambda: load_file(path))
    print(f"{size:.0f} MB file (page cache warm): torch.load {bare:.3f} s, CRC check alone "
          f"{check:.3f} s ({size / 1e3 / check:.1f} GB/s), load_file (check + load) "
          f"{checked:.3f} s = {checked / bare:.2f}x the bare load")


if __name__ == "__main__":
    main()
