"""An unfrozen tiny-model run decodes each image once per use: each training image once per epoch
(augmented) plus once for validation, each val image once, and in embed each query and gallery
image once over all the model files, on one model built once; the embeddings are those of a
fresh model on freshly decoded images, bit for bit, with the pixels in memory or on disk."""
from __future__ import annotations

import contextlib
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from clipcore import paths
from clipcore.data import images as image_files
from clipcore.data.manifests import read_manifest
from clipcore.model import checkpoint
from clipcore.model.checkpoint import load_model
from clipcore.model.features import backbone_features
from clipcore.model.pixel_cache import GIB
from clipcore.retrieve.embedding import embed_all
from clipcore.train.sampling import SeededImages
from clipcore.train.training import train

EPOCHS = 2
UNFROZEN = {"model.name": "tiny", "model.pretrained": "none", "train.num_workers": 0,
            "embed.num_workers": 0, "train.epochs": EPOCHS, "train.freeze_backbone": False,
            "train.lr": 1e-2, "train.backbone_lr_scale": 0.1, "data.val_split": "image"}


@contextlib.contextmanager
def counted(module, name: str):
    """How often `module.name` is called, by its first argument (load_rgb: the path)."""
    calls = Counter()
    original = getattr(module, name)

    def counting(first, *args, **kwargs):
        calls[str(first)] += 1
        return original(first, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(module, name, counting)
        yield calls


@contextlib.contextmanager
def augmented_decodes():
    """How often training's loader decodes each image (for an epoch's batches), by path."""
    calls = Counter()
    original = SeededImages.__getitem__

    def counting(self, key):
        calls[str(self.paths[key[0]])] += 1
        return original(self, key)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(SeededImages, "__getitem__", counting)
        yield calls


def manifest_paths(prepared_demo, *splits: str) -> list[str]:
    root, prepared = prepared_demo
    return [str(root / p) for split in splits for p in read_manifest(prepared, split)["path"]]


@pytest.fixture(scope="module")
def run(tmp_path_factory, params_factory, prepared_demo):
    folder = tmp_path_factory.mktemp("decode_once")
    params = params_factory(UNFROZEN)
    with contextlib.chdir(folder):
        with counted(image_files, "load_rgb") as training_decodes, \
                augmented_decodes() as augmented:
            train(params, *prepared_demo)
        with counted(image_files, "load_rgb") as embed_decodes, \
                counted(checkpoint, "build_model") as builds:
            report = embed_all(params, *prepared_demo)
        embedded = stored(report)
    return folder, params, (training_decodes, augmented), embed_decodes, builds, report, embedded


def test_training_decodes_each_image_once_per_use(run, prepared_demo):
    _, params, (decodes, augmented), *_ = run
    train_paths, val_paths = (manifest_paths(prepared_demo, s) for s in ("train", "val"))
    batch = params.train.batch_size
    # Each epoch's batches (a short last one dropped) decode their images once, augmented ...
    assert sum(augmented.values()) == EPOCHS * (len(train_paths) // batch * batch)
    # ... and validation, whose gallery holds the training images (image split), decodes the
    # training and val images once per run (before: once per epoch, and epoch 0).
    assert max(augmented.values()) <= EPOCHS
    assert all(decodes[p] == augmented[p] + 1 for p in train_paths)
    assert {decodes[p] for p in val_paths} == {1}
    assert sum(decodes.values()) == sum(augmented.values()) + len(train_paths) + len(val_paths)


def test_embed_decodes_each_image_once_and_builds_one_model(run, prepared_demo):
    _, _, _, decodes, builds, report, _ = run
    test_paths = manifest_paths(prepared_demo, "query", "gallery")
    assert report.backbone_passes == EPOCHS + 1  # epoch 0's and each trained epoch's
    assert {decodes[p] for p in test_paths} == {1} and sum(decodes.values()) == len(test_paths)
    assert sum(builds.values()) == 1  # not one CLIP per model file


def expected_embeddings(folder, params, prepared_demo, epoch: int) -> np.ndarray:
    """Epoch's query + gallery embeddings from a freshly built model, images freshly decoded."""
    model = load_model(folder / paths.model_path(epoch))
    images = [Path(p) for p in manifest_paths(prepared_demo, "query", "gallery")]
    features = backbone_features(model, images, batch_size=params.embed.batch_size,
                                 num_workers=0, desc="fresh")
    with torch.inference_mode():
        return model.embed_features(features).float().numpy()


def stored(report) -> list[np.ndarray]:
    return [np.concatenate([np.load(f)["query"], np.load(f)["gallery"]]) for f in report.files]


def test_embeddings_from_the_cache_are_those_without_it(run, prepared_demo):
    folder, params, *_, embedded = run
    for epoch, embeddings in enumerate(embedded):
        np.testing.assert_array_equal(
            embeddings, expected_embeddings(folder, params, prepared_demo, epoch))


def test_pixels_beyond_the_bound_on_disk_give_the_same_and_leave_nothing(
        run, params_factory, prepared_demo, capsys):
    folder, *_, embedded = run
    test_paths = manifest_paths(prepared_demo, "query", "gallery")
    model = load_model(folder / paths.model_path(0))
    row = model.preprocess_val(image_files.load_rgb(test_paths[0]))
    third = len(test_paths) // 3 * row.numel() * row.element_size() / GIB
    before = sorted(p.name for p in (folder / paths.REPOSITORY).iterdir())
    with contextlib.chdir(folder):
        on_disk = embed_all(params_factory({**UNFROZEN, "embed.pixel_cache_gib": third}),
                            *prepared_demo)
        assert len(on_disk.files) == len(embedded)
        for a, b in zip(embedded, stored(on_disk)):
            np.testing.assert_array_equal(a, b)
    assert f"of {len(test_paths)} images' pixels kept on disk" in capsys.readouterr().out
    assert sorted(p.name for p in (folder / paths.REPOSITORY).iterdir()) == before


def test_a_file_without_a_tower_after_one_with_gets_the_base_tower(run, tmp_path,
                                                                   prepared_demo):
    """The model is reused from file to file: a file that holds no tower must not embed with
    the tower the file before it loaded."""
    folder, params, *_, embedded = run
    weights = tmp_path / paths.ALL_WEIGHTS
    weights.mkdir(parents=True)
    for epoch, source in enumerate((0, 1, 0)):
        shutil.copy(folder / paths.model_path(source), tmp_path / paths.model_path(epoch))
    with contextlib.chdir(tmp_path), counted(checkpoint, "build_model") as builds:
        report = embed_all(params, *prepared_demo)
        again = stored(report)
    assert sum(builds.values()) == 2  # built anew for the third file
    for epoch, source in enumerate((0, 1, 0)):
        np.testing.assert_array_equal(again[epoch], embedded[source])
