"""The inference batch (embed.batch_size): the batches of embed's and training's backbone-feature
passes, which change no feature beyond float rounding."""
from __future__ import annotations

import torch
from conftest import images_through_the_tower

from clipcore.data.manifests import read_manifest
from clipcore.model.factory import build_model
from clipcore.model.features import backbone_features
from clipcore.train.training import Trainer

TINY = {"model.name": "tiny", "model.pretrained": "none", "train.num_workers": 0}


def test_the_inference_batch_changes_no_feature(params_factory, prepared_demo):
    root, prepared = prepared_demo
    images = [root / p for p in read_manifest(prepared, "val")["path"]]
    model = build_model(params_factory(TINY).model)
    one_batch = backbone_features(model, images, batch_size=len(images), num_workers=0,
                                  desc="features")
    small_batches = backbone_features(model, images, batch_size=7, num_workers=0,
                                      desc="features")
    assert len(images) > 7 and one_batch.shape == small_batches.shape
    print(f"{len(images)} images, largest difference "
          f"{(one_batch - small_batches).abs().max().item():.2e}")
    assert torch.allclose(one_batch, small_batches, rtol=1e-5, atol=1e-6)


def test_training_feature_passes_take_the_inference_batch(params_factory, prepared_demo):
    """A frozen run's features and validation go through the tower in embed.batch_size
    batches, not train.batch_size ones."""
    trainer = Trainer(params_factory({**TINY, "train.batch_size": 8, "embed.batch_size": 40,
                                      "train.standardize_features": True}), *prepared_demo)
    with images_through_the_tower() as seen:
        trainer.start()  # the training images' features, then epoch 0's validation
    assert len(seen) > 2 and max(seen) == 40
