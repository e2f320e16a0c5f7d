"""Fuse several models into one ranking: python -m clipcore.fuse --models A.pt B.pt [...]

Each member is a model file (any run's, seed's, backbone's: repository/all_weights/ or best/), or
the reserved name face-id: dlib's 128-d face-identity descriptor of each image's largest face
(pip install --no-deps -r requirements-face-id.txt; a model file named face-id is ./face-id).
Each member reads its own image root: data.root for whole images, data/cropped for face crops
(--image-roots, in the members' order; face-id finds the face itself: whole images). Every member
embeds the val, query and gallery images of data/prepared; the weights of the sum of their cosine
similarities are chosen on val (a grid, --step) unless --weights gives them; the test never
chooses. Writes ordinary retrieval results (query file -> ranked gallery files, the retrieve
stage's format) and prints each member's and the fusion's val score, and test score where the
test labels are known.
"""
from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Callable

import numpy as np

from clipcore import paths
from clipcore.data.manifests import labels_by_name, read_manifest
from clipcore.errors import ClipcoreError
from clipcore.files import write_text_atomic
from clipcore.params import load_params
from clipcore.ranking.measures import metrics_for_names
from clipcore.ranking.search import top_k
from clipcore.retrieve.fusion import choose_weights, embed_images, fused_vectors, val_score
from clipcore.stage import run_stage

SPLITS = ("val", "query", "gallery")
FACE_ID = "face-id"  # the reserved member name: a model file of that name is given as ./face-id


def arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m clipcore.fuse", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", required=True,
                        help=f"model files, or {FACE_ID} for dlib's face-identity descriptor")
    parser.add_argument("--image-roots", nargs="+", type=Path,
                        help="each member's image root (default: data.root for all)")
    parser.add_argument("--weights", nargs="+", type=float,
                        help="fixed weights, one per member (default: chosen on val)")
    parser.add_argument("--step", type=float, default=0.1, help="grid step of the val search")
    parser.add_argument("--out", type=Path, default=paths.REPOSITORY / "fusion" /
                        "retrieval_results.json", help="where the results go")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    return parser.parse_args(argv)


def embedders(models: list[str]) -> list[Callable[[list[Path], str], np.ndarray]]:
    """Each member's embedding of image files: a model file's, or face-id's descriptors. face-id's
    module is imported first: without the extra (dlib) the command stops before embedding."""
    if FACE_ID in models:
        from clipcore.retrieve.face_identity import face_descriptors

        def face_id(images: list[Path], desc: str) -> np.ndarray:
            described = face_descriptors(images, desc=desc)
            print(f"{FACE_ID}: no face found in {described.whole} of {len(images)} images (the "
                  f"whole image used as the face)")
            return described.vectors
    return [face_id if m == FACE_ID else partial(embed_images, Path(m)) for m in models]


def main(argv=None) -> None:
    args = arguments(argv)
    params = load_params(args.params)
    roots = args.image_roots or [Path(params.data.root)] * len(args.models)
    if len(roots) != len(args.models) or (args.weights and len(args.weights) != len(args.models)):
        raise ClipcoreError(f"--image-roots and --weights need one value per model "
                            f"({len(args.models)})")
    frames = {split: read_manifest(paths.PREPARED, split) for split in SPLITS}
    members = []  # per member: {split: embeddings}
    for model, root, embed in zip(args.models, roots, embedders(args.models)):
        images = [root / p for split in SPLITS for p in frames[split]["path"]]
        vectors = embed(images, desc=f"{Path(model).name} ({root})")
        cuts = [len(frames["val"]), len(frames["val"]) + len(frames["query"])]
        members.append(dict(zip(SPLITS, (vectors[:cuts[0]], vectors[cuts[0]:cuts[1]],
                                         vectors[cuts[1]:]))))
    labels = frames["val"]["label"].to_numpy()
    val = [m["val"] for m in members]
    for model, root, vectors in zip(args.models, roots, val):
        print(f"{model} on {root}: val score {val_score(vectors, labels):.1f}")
    if args.weights:
        weights, score = tuple(args.weights), val_score(fused_vectors(val, args.weights), labels)
    else:
        weights, score = choose_weights(val, labels, args.step)
    print(f"fusion weights {', '.join(f'{w:g}' for w in weights)}: val score {score:.1f}")
    query = fused_vectors([m["query"] for m in members], weights)
    gallery = fused_vectors([m["gallery"] for m in members], weights)
    names = {s: [PurePosixPath(p).name for p in frames[s]["path"]] for s in ("query", "gallery")}
    k = min(params.retrieve.top_k, len(gallery))
    ranked = top_k(query, gallery, k)
    results = {q: [names["gallery"][i] for i in row] for q, row in zip(names["query"], ranked)}
    write_text_atomic(args.out, json.dumps(results, indent=1))
    known = labels_by_name(frames["query"]), labels_by_name(frames["gallery"])
    if all(known):
        print(f"test score {metrics_for_names(results, *known)['score']:.1f} (reported, never "
              f"used to choose)")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_stage(main)
