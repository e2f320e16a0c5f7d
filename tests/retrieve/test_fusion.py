"""Fusion of several embeddings of the same images: the weighted sum of cosines, a weight of 1
on one member ranking exactly as that member alone, weights chosen on val, and the command on
real tiny model files over the digits demo."""
from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
import torch
from conftest import write_params

from clipcore import fuse, paths
from clipcore.data.manifests import read_manifest
from clipcore.model.checkpoint import save_model
from clipcore.model.factory import build_model
from clipcore.ranking.search import top_k, unit_rows
from clipcore.retrieve.fusion import (
    choose_weights,
    embed_images,
    fused_vectors,
    val_score,
    weight_grid,
)

TINY = {"model.name": "tiny", "model.pretrained": "none", "embed.num_workers": 0}


def clustered(labels: np.ndarray, informative: np.ndarray, seed: int, dim: int = 16) -> np.ndarray:
    """Vectors near their class's centre for the classes in `informative`, noise for the rest."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(labels.max() + 1, dim))
    noise = rng.normal(size=(len(labels), dim))
    return np.where(np.isin(labels, informative)[:, None], centres[labels] + 0.3 * noise, noise)


def test_fused_cosine_is_the_weighted_sum_of_the_members_cosines():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(30, 8)), rng.normal(size=(40, 8))  # query, gallery: one backbone
    b = rng.normal(size=(30, 5)), rng.normal(size=(40, 5))  # and another
    fused_q, fused_g = (fused_vectors([a[i], b[i]], [0.7, 0.3]) for i in (0, 1))
    expected = 0.7 * unit_rows(a[0]) @ unit_rows(a[1]).T + 0.3 * unit_rows(b[0]) @ unit_rows(b[1]).T
    np.testing.assert_allclose(fused_q @ fused_g.T, expected, atol=1e-5)


def test_one_weight_at_1_ranks_as_that_member_alone():
    labels = np.repeat(np.arange(20), 4)
    a, b = clustered(labels, np.arange(20), 1), clustered(labels, np.arange(20), 2)
    alone = top_k(a[:40], a[40:], 10)
    assert np.array_equal(top_k(fused_vectors([a[:40], b[:40]], [1, 0]),
                                fused_vectors([a[40:], b[40:]], [1, 0]), 10), alone)
    assert val_score(fused_vectors([a, b], [1, 0]), labels) == val_score(a, labels)


def test_weights_are_chosen_on_val_and_complementary_members_gain():
    labels = np.repeat(np.arange(40), 3)
    first, second = clustered(labels, np.arange(20), 3), clustered(labels, np.arange(20, 40), 4)
    weights, score = choose_weights([first, second], labels, step=0.25)
    assert weights == (0.5, 0.5)  # each knows half the classes: both count
    assert score > max(val_score(first, labels), val_score(second, labels)) + 100
    noise = np.random.default_rng(5).normal(size=first.shape)
    useful = clustered(labels, np.arange(40), 6)
    assert choose_weights([useful, noise], labels, step=0.25)[0][0] >= 0.75
    assert len(weight_grid(3, 0.1)) == 66 and all(abs(sum(w) - 1) < 1e-9 for w in weight_grid(3, 0.1))


def test_fuse_command_writes_results_ranked_as_one_member_alone(tmp_path, prepared_demo,
                                                                capsys):
    root, prepared = prepared_demo
    shutil.copytree(prepared, tmp_path / paths.PREPARED)
    write_params(tmp_path, {**TINY, "data.root": str(root)})
    with contextlib.chdir(tmp_path):
        params = fuse.load_params()
        for seed in (0, 1):  # two untrained tiny models: different random towers
            torch.manual_seed(seed)
            save_model(build_model(params.model), Path(f"m{seed}.pt"), backbone_trained=True,
                       epoch=0)
        fuse.main(["--models", "m0.pt", "m1.pt", "--weights", "1", "0", "--out", "alone.json"])
        fuse.main(["--models", "m0.pt", "m1.pt", "--step", "0.5", "--out", "fused.json"])
        alone = json.loads(Path("alone.json").read_text())
        fused = json.loads(Path("fused.json").read_text())
        val, query, gallery = (read_manifest(paths.PREPARED, s)["path"]
                               for s in ("val", "query", "gallery"))
        # the command's own batches (val, query, gallery), so tied distances tie the same way
        vectors = embed_images(Path("m0.pt"), [root / p for p in (*val, *query, *gallery)])
    names = [PurePosixPath(p).name for p in gallery]
    ranked = top_k(*np.split(vectors[len(val):], [len(query)]), 10)
    assert alone == {PurePosixPath(q).name: [names[i] for i in row] for q, row in zip(query, ranked)}
    assert sorted(fused) == sorted(alone) and all(len(v) == 10 for v in fused.values())
    printed = capsys.readouterr().out
    assert "fusion weights 1, 0: val score" in printed and "test score" in printed
