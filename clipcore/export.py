"""Export a trained model's image embedding (tower, head, normalisation) to ONNX, and check it.

    python -m clipcore.export --model repository/best --out model.onnx [--check-images DIR]

With --check-images, up to --check-count images of DIR are embedded by torch and by onnxruntime,
and the lowest cosine between the two is printed (the export fails below --min-cosine).
"""
from __future__ import annotations

import argparse

import numpy as np

from clipcore.errors import ClipcoreError
from clipcore.inference.loading import load_trained
from clipcore.inference.onnx_export import export_onnx, onnx_embeddings
from clipcore.query import query_files
from clipcore.stage import run_stage


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m clipcore.export", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="repository/best",
                   help="a best/ folder or a model_epoch_X.pt file (default: %(default)s)")
    p.add_argument("--out", required=True, help="the .onnx file to write (and OUT.json beside it)")
    p.add_argument("--params", default="params.yaml",
                   help="embed settings for a model file without a summary.json (default: "
                        "%(default)s)")
    p.add_argument("--check-images", help="a folder of images to compare torch and ONNX on")
    p.add_argument("--check-count", type=int, default=64, help="(default: %(default)s)")
    p.add_argument("--min-cosine", type=float, default=0.9999, help="(default: %(default)s)")
    return p


def main() -> None:
    args = parser().parse_args()
    trained = load_trained(args.model, "cpu", args.params)
    sidecar = export_onnx(trained, args.out)
    print(f"wrote {args.out} ({sidecar['input']['shape']} -> {sidecar['output']['shape']}) "
          f"and {args.out}.json")
    if args.check_images:
        files = query_files([args.check_images])[:args.check_count]
        ours = trained.embed_files(files, desc="torch")
        theirs = onnx_embeddings(args.out, trained.model, files, crop=trained.crop)
        cosine = float(np.min((ours * theirs).sum(axis=1)))
        print(f"torch vs onnxruntime on {len(files)} images: lowest cosine {cosine:.6f}")
        if cosine < args.min_cosine:
            raise ClipcoreError(f"{args.out}: cosine {cosine:.6f} to torch is below "
                                f"--min-cosine {args.min_cosine}")


if __name__ == "__main__":
    run_stage(main)
