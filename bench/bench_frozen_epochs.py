"""Frozen-backbone training: epoch 1 (one backbone pass over the train images) against the
later epochs (the head on stored features). Goal: a later epoch costs <= 2% of epoch 1.

    python bench/bench_frozen_epochs.py                              # tiny model, whole demo
    python bench/bench_frozen_epochs.py --model ViT-B-32 --images 400 # random-init ViT-B/32

Runs in a temporary folder on the digits demo; prints the per-epoch seconds and the ratio.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench_embed import demo_data, smoke_params  # noqa: E402  (same folder)
from clipcore.train.training import train  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="open_clip model name (random init)")
    parser.add_argument("--images", type=int, default=0, help="train+val images (0: all)")
    parser.add_argument("--epochs", type=int, default=6)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root, prepared = demo_data(Path(tmp), {"train": args.images, "val": args.images // 6})
        params = smoke_params(args.model, {"train.epochs": args.epochs,
                                           "train.freeze_backbone": True})
        os.chdir(tmp)
        history = train(params, root, prepared)
    seconds = [row["seconds"] for row in history]
    later = statistics.mean(seconds[2:])
    print(f"model {args.model}, {args.epochs} epochs; seconds per epoch: "
          + ", ".join(f"{s:.3f}" for s in seconds))
    print(f"epoch 1 (backbone pass over the train images + head): {seconds[1]:.2f} s; "
          f"later epochs (head on stored features): mean {later:.3f} s; "
          f"ratio later / epoch 1 = {later / seconds[1]:.2%} (goal <= 2%)")


if __name__ == "__main__":
    main()
