"""Index a folder of images with a trained model, for clipcore.query and clipcore.serve.

    python -m clipcore.index --model repository/best --images DIR --out DIR
"""
from __future__ import annotations

import argparse
import time

from clipcore.inference.gallery_index import build_index
from clipcore.inference.loading import load_trained
from clipcore.stage import run_stage


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m clipcore.index", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="repository/best",
                   help="a best/ folder (model.pt + summary.json) or a model_epoch_X.pt file "
                        "(default: %(default)s)")
    p.add_argument("--images", required=True, help="the folder of images to index (recursive)")
    p.add_argument("--out", required=True, help="the index folder to write")
    p.add_argument("--params", default="params.yaml",
                   help="embed/retrieve settings for a model file without a summary.json beside "
                        "it (default: %(default)s)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    return p


def main() -> None:
    args = parser().parse_args()
    trained = load_trained(args.model, args.device, args.params)
    start = time.perf_counter()
    index = build_index(trained, args.images, args.out)
    took = time.perf_counter() - start
    print(f"indexed {len(index.names)} images ({index.manifest['dimension']}-d, "
          f"{index.retrieve.metric}, {index.retrieve.index}) with {trained.file} on "
          f"{trained.crop.describe()} in {took:.1f} s "
          f"({len(index.names) / took:.1f} images/s) into {args.out}")


if __name__ == "__main__":
    run_stage(main)
