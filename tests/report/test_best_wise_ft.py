"""With WiSE-FT (embed.wise_ft_alpha < 1) the best model is the mixed model that made the best
results: ranked again from repository/best/model.pt alone, or through load_trained, the queries
get best/retrieval_results.json exactly (mixed once, never twice)."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path, PurePosixPath

import pytest
import torch

from clipcore import paths
from clipcore.data.manifests import read_manifest
from clipcore.errors import ClipcoreError
from clipcore.inference.loading import load_trained
from clipcore.model.checkpoint import load_model
from clipcore.model.features import backbone_features
from clipcore.ranking.search import top_k
from clipcore.report.best import read_summary, write_best
from clipcore.retrieve.embedding import embed_all, embedding_model
from clipcore.retrieve.retrieval import retrieve_all
from clipcore.train.training import train

TINY = {"model.name": "tiny", "model.pretrained": "none", "train.num_workers": 0,
        "train.lr": 3e-2, "train.epochs": 1,
        "embed.num_workers": 0, "embed.wise_ft_alpha": 0.5}


@pytest.fixture(scope="module")
def run(tmp_path_factory, params_factory, prepared_demo):
    folder = tmp_path_factory.mktemp("wise_ft_run")
    params = params_factory(TINY)
    with contextlib.chdir(folder):
        train(params, *prepared_demo)
        embed_all(params, *prepared_demo)
        retrieve_all(params.retrieve, *prepared_demo)
        write_best(params, prepared_demo[1])
    return folder, prepared_demo


def rankings(embed, data_root: Path, prepared: Path) -> dict:
    """Each query's top 10 gallery names, cosine, with `embed(image files)` -> unit rows."""
    files = {split: [data_root / p for p in read_manifest(prepared, split)["path"]]
             for split in ("query", "gallery")}
    query, gallery = embed(files["query"]), embed(files["gallery"])
    names = [PurePosixPath(p).name for p in files["gallery"]]
    return {q.name: [names[i] for i in row]
            for q, row in zip(files["query"], top_k(query, gallery, 10, "cosine"))}


def test_the_best_model_file_alone_ranks_as_the_best_results(run):
    folder, (data_root, prepared) = run
    model = load_model(folder / paths.BEST_MODEL)  # what a user of the artifact loads

    def embed(images):
        features = backbone_features(model, images, batch_size=64, num_workers=0,
                                     desc="best model")
        with torch.inference_mode():
            return model.embed_features(features).float().numpy()

    expected = json.loads((folder / paths.BEST_RESULTS).read_text())
    summary = read_summary(folder / paths.BEST_SUMMARY)
    assert summary["epoch"] == 1  # a fine-tuned epoch: at epoch 0 mixing changes nothing
    assert rankings(embed, data_root, prepared) == expected
    assert read_summary(folder / paths.BEST_SUMMARY)["made_from"]["wise_ft_alpha"] == 0.5


def test_load_trained_does_not_mix_the_best_model_twice(run):
    folder, (data_root, prepared) = run
    trained = load_trained(folder / paths.BEST, "cpu")
    expected = json.loads((folder / paths.BEST_RESULTS).read_text())
    assert rankings(trained.embed_files, data_root, prepared) == expected


def test_a_mixed_model_file_is_not_mixed_at_another_alpha(run):
    folder, _ = run
    with pytest.raises(ClipcoreError, match="already WiSE-FT mixed at alpha 0.5"):
        embedding_model(folder / paths.BEST_MODEL, 0.3, torch.device("cpu"))
