"""The losses `loss.name` picks (clipcore.train.losses): each one lowers its own value when the tiny
model's head trains on the digits demo (two processes: tests/model/test_distributed.py); their knobs
are validated; pair losses are refused without class-balanced batches."""
from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import pytest
import torch

from clipcore import paths
from clipcore.errors import ClipcoreError
from clipcore.model.checkpoint import load_file
from clipcore.model.distributed import World
from clipcore.model.factory import build_model
from clipcore.params import LossParams, ParamsError
from clipcore.train.losses import create_loss
from clipcore.train.splits import BackboneFeatures, load_splits
from clipcore.train.training import METRIC_COLUMNS, make_optimizer, train

NAMES = dataclasses.fields(LossParams)[0].metadata["choices"]  # every loss.name value
TINY = {"model.name": "tiny", "model.pretrained": "none", "model.dropout": 0.0,
        "train.sampler": "class_balanced"}
PER_CLASS = 4


@pytest.fixture(scope="module")
def digits(prepared_demo, params_factory):
    """The tiny model's backbone features of the demo's training images, a class-balanced batch
    of them (every class, PER_CLASS images each), its class ids and the classes' captions."""
    root, prepared = prepared_demo
    params = params_factory(TINY)
    _, captions, train, _ = load_splits(root, prepared, torch.device("cpu"))
    torch.manual_seed(params.seed)
    model = build_model(params.model)
    features = BackboneFeatures(model, World(), batch_size=64, num_workers=0)(train)
    batch = torch.cat([torch.nonzero(train.labels == c).flatten()[:PER_CLASS]
                       for c in range(len(captions))])
    return features, batch, train.labels[batch], captions


def loss_before_and_after(params, features, batch, labels, captions, steps=20):
    """The loss on the batch before and after `steps` steps of the trainer's optimizer over the
    head and the loss's own parameters, the head's input standardised as in training."""
    torch.manual_seed(params.seed)
    model = build_model(params.model).eval()  # dropout 0: eval and train compute alike
    model.head.set_feature_stats(features)
    features = features[batch]
    loss = create_loss(params, model, captions)
    optimizer = make_optimizer(model, loss, params.train)
    values = []
    for _ in range(steps + 1):
        value = loss(model.embed_features(features), labels)
        values.append(value.item())
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
    return values[0], values[-1]


@pytest.mark.parametrize("name", NAMES)
def test_each_loss_lowers_its_value_as_the_head_trains(digits, params_factory, name):
    params = params_factory({**TINY, "loss.name": name, "train.lr": 1e-2})
    before, after = loss_before_and_after(params, *digits)
    print(f"{name}: {before:.4f} -> {after:.4f}")
    assert after < 0.8 * before


def test_classifier_losses_hold_class_weights_pair_losses_none(digits, params_factory):
    *_, captions = digits
    model = build_model(params_factory(TINY).model)
    shapes = {}
    for name in NAMES:
        loss = create_loss(params_factory({**TINY, "loss.name": name}), model, captions)
        shapes[name] = (None if loss.class_lr_scale is None
                        else [tuple(p.shape) for p in loss.parameters()])
    classes, dim = len(captions), model.embed_dim
    assert shapes == {"clip": None, "arcface": [(dim, classes)],
                      "subcenter_arcface": [(dim, 3 * classes)], "cosface": [(dim, classes)],
                      "supcon": None, "triplet": None, "multi_similarity": None}


def test_only_the_clip_loss_trains_the_temperature(digits, params_factory):
    *_, captions = digits
    for name in ("clip", "arcface", "triplet"):
        model = build_model(params_factory(TINY).model)
        loss = create_loss(params_factory({**TINY, "loss.name": name}), model, captions)
        trains = model.clip.logit_scale.requires_grad
        assert trains == (name == "clip"), name
        assert any(p is model.clip.logit_scale for p in loss.parameters()) == (name == "clip")


# --- in the trainer ----------------------------------------------------------------------------

RUN = {**TINY, "train.num_workers": 0, "train.epochs": 1, "train.lr": 1e-2,
       "train.batch_size": 40}  # 10 classes x 4
# What epoch 0 measures: the untouched model, whatever the loss (val_loss is the loss's own;
# NaN, as train_loss and lr there, compares equal through repr).
EPOCH_0 = [c for c in METRIC_COLUMNS if c not in ("val_loss", "seconds", "images_per_s")]


class Interrupt(Exception):
    pass


def stop_after_epoch_1(epoch: int, row: dict) -> None:
    if epoch == 1:
        raise Interrupt


def run(folder: Path, params, data, on_epoch_end=None) -> list[dict]:
    folder.mkdir(parents=True, exist_ok=True)
    with contextlib.chdir(folder):
        return train(params, *data, on_epoch_end=on_epoch_end)


@pytest.fixture(scope="module")
def clip_epoch_0(prepared_demo, params_factory, tmp_path_factory):
    params = params_factory({**RUN, "train.epochs": 0})
    return run(tmp_path_factory.mktemp("clip"), params, prepared_demo)[0]


@pytest.mark.parametrize("name, frozen", [("arcface", True), ("arcface", False),
                                          ("triplet", True), ("triplet", False)])
def test_the_trainer_trains_with_the_loss_keeping_epoch_0_and_validation(
        name, frozen, clip_epoch_0, prepared_demo, params_factory, tmp_path):
    params = params_factory({**RUN, "loss.name": name, "train.freeze_backbone": frozen})
    history = run(tmp_path, params, prepared_demo)
    assert [repr(history[0][c]) for c in EPOCH_0] == [repr(clip_epoch_0[c]) for c in EPOCH_0]
    last = history[-1]
    print(f"{name}, frozen {frozen}: score {history[0]['score']:.1f} -> {last['score']:.1f}, "
          f"val_loss {history[0]['val_loss']:.4f} -> {last['val_loss']:.4f}")
    assert last["train_loss"] > 0 and last["val_loss"] < history[0]["val_loss"]
    assert all(0 <= last[c] <= 1 for c in ("top1", "top5", "top10", "map_at_k"))
    assert (tmp_path / paths.model_path(1)).exists()


def test_class_weights_train_at_their_own_lr_and_resume_exactly(prepared_demo, params_factory,
                                                                tmp_path):
    params = params_factory({**RUN, "loss.name": "arcface", "train.epochs": 2,
                             "train.schedule": "constant", "train.warmup_fraction": 0.0})
    whole = run(tmp_path / "whole", params, prepared_demo)
    with pytest.raises(Interrupt):
        run(tmp_path / "stopped", params, prepared_demo, on_epoch_end=stop_after_epoch_1)
    checkpoint = load_file(tmp_path / "stopped" / paths.checkpoint_path(1))
    assert checkpoint["loss"]["loss.W"].shape == (params.model.embed_dim, 10)
    assert [g["lr"] for g in checkpoint["optimizer"]["param_groups"]][-1] == pytest.approx(
        params.train.lr * params.loss.arcface.class_lr_scale)
    resumed = run(tmp_path / "stopped", dataclasses.replace(
        params, train=dataclasses.replace(params.train, resume=True)), prepared_demo)
    for column in ("train_loss", "val_loss", "score"):
        assert [r[column] for r in resumed[1:]] == [r[column] for r in whole[1:]], column


def test_resume_refuses_another_loss(prepared_demo, params_factory, tmp_path):
    params = params_factory({**RUN, "loss.name": "arcface", "train.epochs": 2})
    with pytest.raises(Interrupt):
        run(tmp_path, params, prepared_demo, on_epoch_end=stop_after_epoch_1)
    before = sorted(p.name for p in (tmp_path / paths.CHECKPOINTS).iterdir())
    other = params_factory({**RUN, "loss.name": "triplet", "train.epochs": 2,
                            "train.resume": True})
    with pytest.raises(ClipcoreError) as error:
        run(tmp_path, other, prepared_demo)
    message = str(error.value)
    assert "loss.name='arcface', now 'triplet'" in message and "\n" not in message
    assert sorted(p.name for p in (tmp_path / paths.CHECKPOINTS).iterdir()) == before


# --- params --------------------------------------------------------------------------------

@pytest.mark.parametrize("key, value, says", [
    ("loss.name", "softmax", "'loss.name' must be one of clip, arcface"),
    ("loss.cosface.class_lr_scale", 0, "'loss.cosface.class_lr_scale' must be > 0.0"),
    ("loss.arcface.margin", 0.5 * 180, "'loss.arcface.margin' must be < 90.0"),
    ("loss.subcenter_arcface.sub_centers", 0, "'loss.subcenter_arcface.sub_centers' must be >= 1"),
    ("loss.cosface.scale", "64", "'loss.cosface.scale' must be a number"),
    ("loss.supcon.temperature", 0.0, "'loss.supcon.temperature' must be > 0.0"),
    ("loss.triplet.miner", "batch_hard", "'loss.triplet.miner' must be one of semihard, hard"),
    ("loss.multi_similarity.base", 2.0, "'loss.multi_similarity.base' must be <= 1.0"),
])
def test_bad_loss_values_stop_with_one_line_naming_the_key(params_factory, key, value, says):
    with pytest.raises(ParamsError) as error:
        params_factory({key: value})
    message = str(error.value)
    assert says in message and "\n" not in message


@pytest.mark.parametrize("name", ["supcon", "triplet", "multi_similarity"])
def test_pair_losses_refuse_random_batches_saying_what_to_set(params_factory, name):
    with pytest.raises(ParamsError) as error:
        params_factory({"loss.name": name, "train.sampler": "random"})
    message = str(error.value)
    assert f"'loss.name: {name}'" in message and "'train.sampler: class_balanced'" in message
    assert "\n" not in message
    assert params_factory({"loss.name": name, "train.sampler": "class_balanced"}).loss.name == name


def test_other_losses_take_random_batches_and_ignore_same_class_positives(params_factory):
    arcface = params_factory({"loss.name": "arcface", "train.sampler": "random"})
    assert arcface.loss.name == "arcface"
    # same_class_positives is the CLIP loss's: a triplet run does not read it.
    params_factory({"loss.name": "triplet", "train.sampler": "class_balanced",
                    "loss.same_class_positives": False})
