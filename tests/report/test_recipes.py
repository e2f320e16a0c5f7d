"""The seed's recipe as params (clipcore.report.recipes.SEED_RECIPE): its mlp head and random init, Adam
with coupled L2, no schedule, an unclamped temperature, a text head that trains; model files that
rebuild the right head; resume refusing a change of any of these keys."""
from __future__ import annotations

import contextlib
import dataclasses
import math

import pytest
import torch
from conftest import REPO

from clipcore import paths
from clipcore.errors import ClipcoreError
from clipcore.model.checkpoint import (
    inference_state,
    load_model,
    save_atomic,
    save_model,
)
from clipcore.model.factory import MAX_LOGIT_SCALE, MlpHead, ResidualHead, build_model
from clipcore.report.recipes import SEED_RECIPE, dvc_overrides
from clipcore.train.losses import create_loss
from clipcore.train.resume import check_compatible, run_settings
from clipcore.train.training import Trainer, lr_schedule, make_optimizer, train

TINY = {"model.name": "tiny", "model.pretrained": "none", "train.num_workers": 0}
SEED_TINY = {**SEED_RECIPE, **TINY}
NEW_KEYS = {"model.head": "mlp", "train.optimizer": "adam", "train.schedule": "constant",
            "train.clamp_temperature": False, "loss.text_targets": "frozen"}


@pytest.fixture(scope="module")
def seed_params(params_factory):
    return params_factory(SEED_TINY)


def test_the_recipe_is_valid_params_and_a_dvc_override_list(params_factory, seed_params):
    assert (seed_params.model.head, seed_params.train.optimizer, seed_params.train.schedule,
            seed_params.train.clamp_temperature, seed_params.loss.text_targets) \
        == ("mlp", "adam", "constant", False, "head")
    assert "train.clamp_temperature=false" in dvc_overrides(SEED_RECIPE)
    assert "train.weight_decay=0.0001" in dvc_overrides(SEED_RECIPE)
    defaults = params_factory()
    assert (defaults.model.head, defaults.train.optimizer, defaults.train.schedule,
            defaults.train.clamp_temperature) == ("residual", "adamw", "cosine", True)


def test_the_docs_give_the_recipe_as_one_dvc_exp_run_line():
    page = (REPO / "docs/model-and-loss.md").read_text()
    command = page[page.index("dvc exp run -S model.head=mlp"):]
    command = command[:command.index("```")].replace("\\\n", " ")
    assert command.split()[4::2] == dvc_overrides(SEED_RECIPE)


def test_mlp_head_is_linear_gelu_dropout_with_a_seeded_random_init(seed_params):
    """Epoch 0 of the seed's recipe is a random head, not zero-shot CLIP; the run's seed draws it."""
    torch.manual_seed(1)
    model = build_model(seed_params.model).eval()
    torch.manual_seed(1)
    again = build_model(seed_params.model)
    torch.manual_seed(2)
    other = build_model(seed_params.model)
    head = model.head
    assert isinstance(head, MlpHead) and head.dropout.p == 0.3
    assert head.linear.weight.shape == (seed_params.model.embed_dim, 512)  # tiny: 512 features
    assert torch.equal(head.linear.weight, again.head.linear.weight)
    assert not torch.equal(head.linear.weight, other.head.linear.weight)
    features = torch.randn(64, 512)
    assert torch.allclose(head(features), torch.nn.functional.gelu(head.linear(features)))
    head.train()
    dropped = (head(features) == 0).float().mean().item()
    assert 0.2 < dropped < 0.4  # dropout on every output feature: none passes untouched
    residual = build_model(dataclasses.replace(seed_params.model, head="residual")).eval()
    assert isinstance(residual.head, ResidualHead)
    assert torch.allclose(residual.head(features), features)  # identity: zero-shot at epoch 0
    assert not torch.allclose(model.embed_features(features), residual.embed_features(features))


def test_model_files_carry_the_head_kind(seed_params, tmp_path):
    torch.manual_seed(3)
    model = build_model(seed_params.model).eval()
    save_model(model, tmp_path / "mlp.pt", backbone_trained=False, epoch=1)
    loaded = load_model(tmp_path / "mlp.pt")
    features = torch.randn(4, 512)
    assert isinstance(loaded.head, MlpHead)
    assert torch.equal(loaded.embed_features(features), model.embed_features(features))
    # The same tensor names under another head kind: the file's kind decides.
    state = inference_state(model, backbone_trained=False)
    assert state["model"]["head"] == "mlp"
    state["model"]["head"] = "residual"
    save_atomic(state, tmp_path / "relabelled.pt")
    relabelled = load_model(tmp_path / "relabelled.pt")
    assert isinstance(relabelled.head, ResidualHead)
    assert not torch.allclose(relabelled.embed_features(features), model.embed_features(features))


def _one_step_with_zero_loss_gradient(params) -> torch.Tensor:
    """How far one optimizer step moves the head's weights when only weight decay pulls."""
    torch.manual_seed(0)
    model = build_model(params.model)
    optimizer = make_optimizer(model, create_loss(params, model, ["0", "1", "2"]), params.train)
    weight = model.head.linear.weight
    before = weight.detach().clone()
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            parameter.grad = torch.zeros_like(parameter)
    optimizer.step()
    return (weight.detach() - before).abs() / before.abs()


def test_adam_adds_weight_decay_to_the_gradient_adamw_decouples_it(params_factory):
    """Adam (the seed's) normalises the L2 term like any gradient: each weight moves by about lr,
    whatever its size. AdamW shrinks each weight by lr * weight_decay of itself."""
    overrides = {**TINY, "model.head": "mlp", "train.lr": 1e-3, "train.weight_decay": 1e-2}
    adam = params_factory({**overrides, "train.optimizer": "adam"})
    adamw = params_factory({**overrides, "train.optimizer": "adamw"})
    for params, kind in ((adam, torch.optim.Adam), (adamw, torch.optim.AdamW)):
        model = build_model(params.model)
        assert type(make_optimizer(model, create_loss(params, model, ["0"]), params.train)) is kind
    adamw_shrink = _one_step_with_zero_loss_gradient(adamw)
    assert torch.allclose(adamw_shrink, torch.full_like(adamw_shrink, 1e-3 * 1e-2), rtol=0.02)
    adam_shrink = _one_step_with_zero_loss_gradient(adam)
    assert adam_shrink.median() > 100 * adamw_shrink.median()


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_constant_schedule_keeps_the_lr_after_the_warmup(schedule):
    parameter = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.Adam([parameter], lr=0.1)
    scheduler = lr_schedule(optimizer, total_steps=10, warmup_fraction=0.2, schedule=schedule)
    lrs = []
    for _ in range(10):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:2] == pytest.approx([0.05, 0.1])
    if schedule == "constant":
        assert lrs[2:] == pytest.approx([0.1] * 8)
    else:
        assert lrs[2] == pytest.approx(0.1) and lrs[-1] < 0.01
    no_warmup = lr_schedule(torch.optim.Adam([parameter], lr=0.1), 10, 0.0, "constant")
    assert no_warmup.get_last_lr() == [0.1]  # the seed's: no schedule at all


@pytest.mark.parametrize("clamp", [False, True], ids=["seed-unclamped", "clamped"])
def test_seed_recipe_trains_its_text_head_and_leaves_the_temperature_unclamped(
        clamp, params_factory, prepared_demo, tmp_path):
    params = params_factory({**SEED_TINY, "train.clamp_temperature": clamp})
    with contextlib.chdir(tmp_path):
        trainer = Trainer(params, *prepared_demo)
        with torch.no_grad():
            trainer.model.clip.logit_scale.fill_(5.0)  # above ln(100), as a long run may drive it
        captions = trainer.loss.targets.targets.clone()
        text_weight = trainer.loss.targets.head.linear.weight.detach().clone()
        trainer.train_epoch(1)
    scale = trainer.model.clip.logit_scale.item()
    if clamp:
        assert scale <= MAX_LOGIT_SCALE + 1e-6
    else:
        assert scale > math.log(100) + 0.3  # Adam at lr 1e-4 moved it by at most a few 1e-3
        assert torch.equal(trainer.loss.targets.targets, captions)  # the caption embeddings stay
        assert not torch.allclose(trainer.loss.targets.head.linear.weight, text_weight)
        assert not trainer.loss.targets.training  # validation ran with the text head's dropout off


def test_epoch_0_of_an_mlp_head_says_it_is_a_random_head(seed_params, prepared_demo, tmp_path,
                                                         capsys):
    params = dataclasses.replace(seed_params, train=dataclasses.replace(seed_params.train,
                                                                         epochs=0))
    with contextlib.chdir(tmp_path):
        history = train(params, *prepared_demo)
        model = load_model(paths.model_path(0))
    assert "epoch 0 is the base model under a random mlp head" in capsys.readouterr().out
    assert isinstance(model.head, MlpHead) and history[0]["epoch"] == 0


@pytest.mark.parametrize("key", sorted(NEW_KEYS))
def test_resume_refuses_a_change_of_a_recipe_key(key, params_factory, prepared_demo):
    _, prepared = prepared_demo
    base = {**TINY, "loss.target_init": "caption"}
    before = params_factory(base)
    after = params_factory({**base, key: NEW_KEYS[key]})
    checkpoint = {"path": "weights_epoch_1.pth", "base": {},
                  "signature": run_settings(before, prepared)}
    with pytest.raises(ClipcoreError, match=rf"made with {key}=.*, now .*set train\.resume false"):
        check_compatible(checkpoint, {}, run_settings(after, prepared))


def test_every_training_key_of_the_recipe_is_part_of_the_resume_signature(seed_params,
                                                                           prepared_demo):
    settings = run_settings(seed_params, prepared_demo[1])
    for key in SEED_RECIPE:
        if not key.startswith("data."):  # the data split is compared by the manifests' digest
            assert key in settings, key
