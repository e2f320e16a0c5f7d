"""A finished run to try the trained-model commands on, for bench_inference.py and
check_search_page.py: the digits demo trained a few epochs with the tiny model (or ViT-B-32,
random init) in `folder`, through the stages' own functions, best/ written as `dvc repro` does.
Returns the best/ folder, the test gallery folder and the test query files."""
from __future__ import annotations

import contextlib
from pathlib import Path

from bench_embed import demo_data, smoke_params
from clipcore import paths
from clipcore.data.manifests import read_manifest
from clipcore.report.best import write_best
from clipcore.retrieve.embedding import embed_all
from clipcore.retrieve.retrieval import retrieve_all
from clipcore.train.training import train


def finished_run(folder: Path, model: str = "tiny", epochs: int = 3) -> tuple[Path, Path, list[Path]]:
    params = smoke_params(model, {"train.epochs": epochs, "train.lr": 1e-2 if model == "tiny"
                                  else 1e-4, "train.num_workers": 0, "embed.num_workers": 0})
    root, prepared = demo_data(folder, {})
    with contextlib.chdir(folder):
        train(params, root, prepared)
        embed_all(params, root, prepared)
        retrieve_all(params.retrieve, root, prepared)
        write_best(params, prepared)
    queries = [root / p for p in read_manifest(prepared, "query")["path"]]
    return folder / paths.BEST, root / "test" / "gallery", queries
