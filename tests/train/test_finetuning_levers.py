"""The fine-tuning levers of issue 29 on the tiny model (2 blocks): each at its off value runs as
before, partial unfreezing trains exactly the blocks named, layer decay's per-block lrs, the EMA
(its update, its use in validation and model files, its resume) and LP-FT's head-only epochs.
"""
from __future__ import annotations

import shutil

import pytest
import torch
from test_training import LEARNING, Interrupt, model_files_equal, run, same_numbers, stop_after

from clipcore import paths
from clipcore.errors import ClipcoreError
from clipcore.model.checkpoint import load_file
from clipcore.params import ParamsError
from clipcore.train.ema import WeightAverage
from clipcore.train.training import Trainer, make_optimizer
from clipcore.train.unfreezing import tower_layers

SHORT = {**LEARNING, "train.epochs": 2, "train.num_workers": 0}
OFF = {"train.unlocked_blocks": "all", "train.layer_decay": 1.0, "train.ema": 0.0,
       "train.frozen_epochs": 0}
STEM = ("conv1.", "class_embedding", "positional_embedding", "ln_pre.")


def changed_visual(before: dict, model) -> set[str]:
    after = model.clip.visual.state_dict()
    return {name for name in before if not torch.equal(before[name], after[name])}


def test_levers_at_their_off_values_run_exactly_as_without_them(tmp_path, params_factory,
                                                                 prepared_demo):
    without = run(tmp_path / "without", params_factory(SHORT), prepared_demo)
    off = run(tmp_path / "off", params_factory({**SHORT, **OFF}), prepared_demo)
    assert same_numbers(without, off)
    assert model_files_equal(tmp_path / "without", tmp_path / "off", 2)
    trainer = Trainer(params_factory({**SHORT, **OFF}), *prepared_demo)
    # One matrix group and one no-decay group per part, as before the levers came.
    assert len(trainer.optimizer.param_groups) == 4


def test_unlocked_blocks_trains_exactly_the_last_blocks(params_factory, prepared_demo):
    trainer = Trainer(params_factory({**SHORT, "train.unlocked_blocks": 1}), *prepared_demo)
    trainer.start()
    before = {k: v.clone() for k, v in trainer.model.clip.visual.state_dict().items()}
    trainer.train_epoch(1)
    visual = dict(trainer.model.clip.visual.named_parameters())
    lower = [n for n in visual if n.startswith(("transformer.resblocks.0.", *STEM))]
    upper = [n for n in visual if n.startswith("transformer.resblocks.1.")]
    assert lower and upper
    assert all(visual[n].grad is None for n in lower)  # never in a backward pass
    assert all(visual[n].grad is not None for n in upper)
    changed = changed_visual(before, trainer.model)
    assert not changed & set(lower)  # bit-identical
    assert set(upper) <= changed


def test_unlocked_blocks_beyond_the_tower_is_one_clear_error(params_factory, prepared_demo):
    with pytest.raises(ClipcoreError, match="unlocked_blocks: 3, but tiny's image tower has 2"):
        Trainer(params_factory({**SHORT, "train.unlocked_blocks": 3}), *prepared_demo)


def test_freeze_backbone_keeps_its_meaning_whatever_unlocked_blocks_says(params_factory,
                                                                         prepared_demo):
    trainer = Trainer(params_factory({**SHORT, "train.freeze_backbone": True,
                                      "train.unlocked_blocks": 1}), *prepared_demo)
    assert trainer.frozen
    assert not any(p.requires_grad for p in trainer.model.clip.visual.parameters())


def test_layer_decay_gives_each_block_its_lr(params_factory, prepared_demo):
    params = params_factory({**SHORT, "train.layer_decay": 0.5, "train.lr": 1e-3,
                             "train.backbone_lr_scale": 0.1})
    trainer = Trainer(params, *prepared_demo)
    optimizer = make_optimizer(trainer.model, trainer.loss, params.train)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    stem, block0, block1, top = tower_layers(trainer.model.clip.visual)
    backbone = 1e-3 * 0.1
    assert {lr_of[id(p)] for p in top} == {lr_of[id(p)] for p in block1} == {backbone}
    assert [lr_of[id(p)] for p in block0] == pytest.approx([backbone * 0.5] * len(block0))
    assert [lr_of[id(p)] for p in stem] == pytest.approx([backbone * 0.25] * len(stem))
    assert {lr_of[id(p)] for p in trainer.model.head.parameters()} == {1e-3}


def test_ema_update_follows_its_ramped_decay():
    layer = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        layer.weight.fill_(0.0)
    average = WeightAverage(layer, decay=0.9)
    expected = torch.zeros_like(layer.weight)
    for step in range(1, 30):
        with torch.no_grad():
            layer.weight.add_(1.0)
        average.update()
        decay = min(0.9, (1 + step) / (10 + step))
        expected = decay * expected + (1 - decay) * layer.weight.detach()
    assert torch.allclose(average.average["weight"], expected)
    with average.applied():
        assert torch.allclose(layer.weight, expected)
    assert torch.all(layer.weight == 29.0)  # the training weights are back


def test_ema_is_what_validation_and_model_files_use_and_it_resumes(tmp_path, params_factory,
                                                                   prepared_demo):
    params = params_factory({**SHORT, "train.ema": 0.9})
    plain = run(tmp_path / "plain", params_factory(SHORT), prepared_demo)
    whole = run(tmp_path / "whole", params, prepared_demo)
    assert not same_numbers(plain, whole)  # validation sees the average
    assert not model_files_equal(tmp_path / "plain", tmp_path / "whole", 2)
    checkpoint = load_file(tmp_path / "whole" / paths.checkpoint_path(2))
    raw = checkpoint["ema"]["raw"]
    assert any(not torch.equal(raw[k], checkpoint["state"][k]) for k in raw)  # average != raw
    with pytest.raises(Interrupt):
        run(tmp_path / "cut", params, prepared_demo, on_epoch_end=stop_after(1))
    shutil.rmtree(tmp_path / "cut" / paths.ALL_WEIGHTS)
    resumed = run(tmp_path / "cut", params_factory({**SHORT, "train.ema": 0.9,
                                                    "train.resume": True}), prepared_demo)
    assert same_numbers(whole, resumed)
    assert model_files_equal(tmp_path / "whole", tmp_path / "cut", 2)


def test_frozen_epochs_train_the_head_alone_first_and_resume_in_their_phase(
        tmp_path, params_factory, prepared_demo):
    overrides = {**SHORT, "train.epochs": 3, "train.frozen_epochs": 1}
    whole = run(tmp_path / "whole", params_factory(overrides), prepared_demo)
    files = [load_file(tmp_path / "whole" / paths.model_path(e)) for e in range(4)]
    assert [f["backbone_trained"] for f in files] == [False, False, True, True]
    epoch1 = load_file(tmp_path / "whole" / paths.checkpoint_path(1))["state"]
    assert not any(k.startswith("clip.visual.") for k in epoch1)  # the tower still the base's
    with pytest.raises(Interrupt):  # stopped inside the head-only phase
        run(tmp_path / "cut", params_factory(overrides), prepared_demo,
            on_epoch_end=stop_after(1))
    shutil.rmtree(tmp_path / "cut" / paths.ALL_WEIGHTS)
    resumed = run(tmp_path / "cut", params_factory({**overrides, "train.resume": True}),
                  prepared_demo)
    assert same_numbers(whole, resumed)
    assert model_files_equal(tmp_path / "whole", tmp_path / "cut", 3)


def test_frozen_epochs_that_never_unlock_are_refused(params_factory):
    with pytest.raises(ParamsError, match="'train.frozen_epochs' \\(2\\) must be below "
                                          "'train.epochs' \\(2\\)"):
        params_factory({**SHORT, "train.frozen_epochs": 2})
