"""Search a gallery index (clipcore.index) for the nearest images to each query image.

    python -m clipcore.query --index DIR IMAGE... [--k 10] [--json] [--rerank aqe]

Query images are embedded with the model the index was built with (refused if the model file
changed), then ranked exactly as the retrieve stage ranks: same search, same re-ranking. Several
queries at once rank as retrieve ranks that set (k-reciprocal re-ranking looks at all of them).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from clipcore.data.images import IMAGE_SUFFIXES
from clipcore.errors import ClipcoreError
from clipcore.inference.gallery_index import load_index
from clipcore.inference.loading import load_trained
from clipcore.stage import run_stage


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m clipcore.query",
                                description=__doc__.split("\n")[0])
    p.add_argument("images", nargs="+", help="query image files, or folders of them")
    p.add_argument("--index", required=True, help="a folder written by clipcore.index")
    p.add_argument("--model", help="the model file (default: the one the index names)")
    p.add_argument("--k", type=int, help="results per query (default: the run's retrieve.top_k)")
    p.add_argument("--rerank", choices=("none", "aqe", "kreciprocal"),
                   help="re-ranking (default: the run's retrieve.rerank)")
    p.add_argument("--dba-k", type=int, help="database-side augmentation neighbours, 0: off "
                                             "(default: the run's retrieve.dba_k)")
    p.add_argument("--json", action="store_true",
                   help="print {query name: [gallery names]}, as retrieval_results_epoch_X.json")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    return p


def query_files(items: list[str]) -> list[Path]:
    files = []
    for item in map(Path, items):
        if item.is_dir():
            files += sorted(f for f in item.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        elif item.is_file():
            files.append(item)
        else:
            raise ClipcoreError(f"{item}: no such image file or folder")
    if not files:
        raise ClipcoreError(f"{', '.join(items)}: no image files")
    return files


def main() -> None:
    args = parser().parse_args()
    index = load_index(args.index)
    trained = load_trained(args.model or index.manifest["model"], args.device)
    index.check_model(trained)
    asked = {"top_k": args.k, "rerank": args.rerank, "dba_k": args.dba_k}
    params = dataclasses.replace(index.retrieve, **{k: v for k, v in asked.items() if v is not None})
    files = query_files(args.images)
    indices, scores = index.search(trained.embed_files(files, desc="query"), params)
    if args.json:
        print(json.dumps({f.name: [index.names[i] for i in row] for f, row in zip(files, indices)},
                         indent=1, ensure_ascii=False))
        return
    score = "cosine" if params.metric == "cosine" else "distance"
    for file, row, row_scores in zip(files, indices, scores):
        print(file)
        for rank, (i, s) in enumerate(zip(row, row_scores), 1):
            print(f"  {rank:3d}  {score} {s:.4f}  {index.names[i]}")


if __name__ == "__main__":
    run_stage(main)
