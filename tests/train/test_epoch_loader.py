"""The training loader made once per run: its workers start once and persist across the epochs,
each epoch still gets its own batches and augmentations, and the numbers are those of a run
without workers whose validation pixels sit in memory, also with them partly on disk; only the
splits that every validation revisits keep their pixels."""
from __future__ import annotations

import contextlib
import multiprocessing
from pathlib import Path

import pytest
import torch
from torch.utils.data import dataloader

from clipcore import paths
from clipcore.model.checkpoint import load_file
from clipcore.model.pixel_cache import GIB
from clipcore.train import sampling
from clipcore.train.evaluation import revisited_splits
from clipcore.train.splits import Split
from clipcore.train.training import METRIC_COLUMNS, train
from clipcore.train.validation_plan import ValidationPlan

EPOCHS = 3
UNFROZEN = {"model.name": "tiny", "model.pretrained": "none", "train.epochs": EPOCHS,
            "train.freeze_backbone": False, "train.lr": 1e-2, "train.backbone_lr_scale": 0.1,
            "train.num_workers": 0}


def numbers(history: list[dict]) -> list[list[str]]:
    return [[repr(row[c]) for c in METRIC_COLUMNS if c not in ("seconds", "images_per_s")]
            for row in history]


def model_state(folder, epoch: int) -> dict[str, torch.Tensor]:
    return load_file(folder / paths.model_path(epoch))["state"]


@contextlib.contextmanager
def worker_starts():
    """The datasets whose DataLoader started worker processes, once per start."""
    started = []
    original = dataloader._MultiProcessingDataLoaderIter.__init__

    def starting(self, loader):
        started.append(type(loader.dataset).__name__)
        original(self, loader)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dataloader._MultiProcessingDataLoaderIter, "__init__", starting)
        yield started


def test_persistent_workers_and_pixels_on_disk_give_the_same_run(tmp_path, params_factory,
                                                                 prepared_demo, capsys):
    plain = tmp_path / "plain"
    plain.mkdir()
    with contextlib.chdir(plain):
        expected = train(params_factory(UNFROZEN), *prepared_demo)
    # Workers decode; validation's pixels: 100 images' worth in memory (the tiny model's 32 px
    # float32 input; uint8 would hold 400), the rest of the 1,258 on disk.
    row_bytes = 3 * 32 * 32 * 4
    other = tmp_path / "workers"
    other.mkdir()
    made = []
    original = sampling.image_loader
    with contextlib.chdir(other), worker_starts() as started, \
            pytest.MonkeyPatch.context() as patch:
        patch.setattr(sampling, "image_loader", lambda *a, **k: made.append(1) or original(*a, **k))
        history = train(params_factory({**UNFROZEN, "train.num_workers": 2,
                                        "embed.pixel_cache_gib": 100 * row_bytes / GIB}),
                        *prepared_demo)
    assert "images' pixels kept on disk" in capsys.readouterr().out
    assert len(made) == 1 and started.count("SeededImages") == 1  # once for the 3 epochs
    assert not multiprocessing.active_children()  # the workers ended with the run
    assert numbers(history) == numbers(expected)
    for epoch in range(EPOCHS + 1):
        a, b = model_state(plain, epoch), model_state(other, epoch)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert numbers(history)[1] != numbers(history)[2]  # the epochs did differ
    assert not list((other / paths.REPOSITORY).glob("pixel_cache_*"))


def test_only_the_splits_every_validation_revisits_keep_their_pixels():
    """Kept pixels of images that one pass reads (the test queries of data.val_queries auto, the
    training images under the class split, where none join the gallery) would only take memory."""
    def split(name, labels):
        return Split(name, [Path(f"{name}_{i}.png") for i in range(len(labels))],
                     torch.tensor(labels))

    val, train_seen, train_unseen = split("val", [0, 1]), split("train", [0, 1, 2]), split(
        "train", [2, 3])
    assert revisited_splits(val, train_seen, ValidationPlan((None, None), "none")) == {
        "val", "train"}
    assert revisited_splits(val, train_unseen, ValidationPlan((None, None), "none")) == {"val"}
    assert revisited_splits(val, train_unseen, ValidationPlan((None, None), "train_others")) == {
        "val", "train"}
    auto = ValidationPlan((None, None), "test_gallery", test_query=split("test_query", [-1]),
                          test_gallery=split("test_gallery", [-1]))
    assert revisited_splits(val, train_unseen, auto) == {"val", "test_gallery"}
    assert revisited_splits(split("val", []), train_seen, auto) == set()
