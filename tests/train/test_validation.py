"""The validation protocol on the competition's shape (5 images per identity): every val query
can find a positive, perfect embeddings score 1000, and queries without any positive are counted,
not scored 0."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import write_params
from tests.data.test_manifests import make_root, run

from clipcore import paths
from clipcore.data.manifests import read_manifest
from clipcore.train.validation import validation_metrics

REPO = Path(__file__).resolve().parents[2]


def perfect_embeddings(labels) -> np.ndarray:
    """One orthogonal direction per class: every same-class image is a perfect match."""
    classes = sorted(set(labels))
    return np.eye(len(classes), dtype=np.float32)[[classes.index(label) for label in labels]]


def split_of(tmp_path, params_factory, **data):
    root = make_root(tmp_path, {f"{c:03d}": 5 for c in range(40)})
    out, _ = run(root, params_factory({f"data.{key}": value for key, value in data.items()}).data)
    return read_manifest(out, "train")["label"].to_numpy(), read_manifest(out, "val")["label"].to_numpy()


def measure(train, val, embeddings=perfect_embeddings) -> dict:
    vectors = embeddings(list(val) + list(train))
    return validation_metrics(vectors[:len(val)], val, 10, vectors[len(val):], train)


@pytest.mark.parametrize("split", ["image", "class"])
def test_five_images_per_class_every_val_query_has_a_positive(tmp_path, params_factory, split):
    train, val = split_of(tmp_path, params_factory, val_split=split, val_fraction=0.15)
    assert len(val) >= 20
    measures = measure(train, val)
    assert measures["val_unmatched"] == 0 and measures["val_queries"] == len(val)
    assert measures["score"] == 1000.0 and measures["map_at_k"] == 1.0


def test_image_split_val_queries_find_their_class_among_the_training_images(tmp_path,
                                                                            params_factory):
    """With 0.15 of 5 images, each class gives at most one val image: its only positives are the
    training images of its class."""
    train, val = split_of(tmp_path, params_factory, val_split="image", val_fraction=0.15)
    assert len(set(val)) == len(val)
    measures = measure(train, val)
    assert measures["score"] == 1000.0
    assert validation_metrics(perfect_embeddings(val), val, 10)["val_queries"] == 0  # val alone


def test_random_embeddings_score_far_below_perfect(tmp_path, params_factory):
    train, val = split_of(tmp_path, params_factory, val_split="image", val_fraction=0.15)
    rng = np.random.default_rng(0)
    measures = measure(train, val, lambda labels: rng.normal(size=(len(labels), 16)).astype(np.float32))
    assert measures["score"] < 500


def test_queries_without_a_positive_are_counted_not_scored():
    val = np.array(["a", "a", "lonely"])
    vectors = perfect_embeddings(val)
    measures = validation_metrics(vectors, val, 10)
    assert measures["val_queries"] == 2 and measures["val_unmatched"] == 1
    assert measures["score"] == 1000.0 and measures["queries"] == 2


def test_no_query_with_a_positive_gives_counts_only():
    measures = validation_metrics(perfect_embeddings(["a", "b"]), np.array(["a", "b"]), 10)
    assert measures == {"val_queries": 0, "val_unmatched": 2}


def test_a_val_top_k_beyond_the_gallery_is_labelled_with_what_was_measured(tmp_path, prepared_demo):
    """Before: train.val_top_k 100000 printed "val precision@100000" for a measure taken at the
    val gallery's size."""
    root, prepared = prepared_demo
    shutil.copytree(prepared, tmp_path / paths.PREPARED)
    write_params(tmp_path, {"model.name": "tiny", "model.pretrained": "none", "train.epochs": 0,
                            "train.num_workers": 0, "train.val_top_k": 100_000,
                            "data.root": str(root), "data.val_split": "image"})
    done = subprocess.run([sys.executable, "-m", "stages.train"], cwd=tmp_path, text=True,
                          capture_output=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    # Image split: the training images join the val gallery; a query never retrieves itself.
    gallery = sum(len(read_manifest(prepared, split)) for split in ("train", "val")) - 1
    assert f"val precision@{gallery} " in done.stdout
    assert "train.val_top_k=100000 is beyond the val gallery" in done.stdout
    assert "precision@100000" not in done.stdout
