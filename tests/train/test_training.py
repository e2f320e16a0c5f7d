"""Training on the digits demo with the tiny open_clip model: it learns, a frozen backbone stays
untouched, runs repeat exactly, an interrupted run resumes to the same end, checkpoints hold
only what training changed.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import shutil
import sys

import pytest
import torch
from conftest import images_through_the_tower

from clipcore import paths
from clipcore.data.manifests import read_manifest
from clipcore.errors import ClipcoreError
from clipcore.model.checkpoint import load_file
from clipcore.model.factory import build_model
from clipcore.model.features import backbone_features
from clipcore.train.training import LOSS_SHOWN_EVERY, METRIC_COLUMNS, Trainer, train

TINY = {"model.name": "tiny", "model.pretrained": "none", "train.num_workers": 0}
# The tiny random backbone needs a brisker lr than the ViT-B/32 default to learn in 5 epochs.
LEARNING = {**TINY, "train.epochs": 5, "train.lr": 3e-3, "train.batch_size": 32,
            "train.freeze_backbone": False, "train.backbone_lr_scale": 1.0,
            "loss.text_targets": "learnable"}
FROZEN = {**TINY, "train.epochs": 3, "train.lr": 1e-2}
TIMING = ("seconds", "images_per_s")
CHANCE = 0.1  # precision@k of random rankings over 10 balanced classes


class Interrupt(Exception):
    pass


def stop_after(last: int):
    def on_epoch_end(epoch: int, row: dict) -> None:
        if epoch == last:
            raise Interrupt
    return on_epoch_end


def run(folder, params, data, on_epoch_end=None) -> list[dict]:
    folder.mkdir(parents=True, exist_ok=True)
    with contextlib.chdir(folder):
        return train(params, *data, on_epoch_end=on_epoch_end)


def params_replace(params, **train):
    return dataclasses.replace(params, train=dataclasses.replace(params.train, **train))


def same_numbers(a: list[dict], b: list[dict]) -> bool:
    """Metric rows equal apart from timing (NaN equal to NaN)."""
    def key(rows):
        return [[repr(row[c]) for c in METRIC_COLUMNS if c not in TIMING] for row in rows]
    return key(a) == key(b)


def model_files_equal(first, second, epochs: int) -> bool:
    for epoch in range(epochs + 1):
        a = load_file(first / paths.model_path(epoch))["state"]
        b = load_file(second / paths.model_path(epoch))["state"]
        if a.keys() != b.keys() or not all(torch.equal(a[k], b[k]) for k in a):
            return False
    return True




@contextlib.contextmanager
def host_reads():
    """Where clipcore's own code reads tensor values back to the host (.item(), .tolist()): on a
    GPU each such read waits for all the work queued before it."""
    reads = []
    with pytest.MonkeyPatch.context() as patch:
        for name in ("item", "tolist"):
            def reading(self, *args, _original=getattr(torch.Tensor, name), _name=name):
                caller = sys._getframe(1).f_globals.get("__name__", "")
                if caller.startswith("clipcore"):
                    reads.append(f"{caller} .{_name}()")
                return _original(self, *args)
            patch.setattr(torch.Tensor, name, reading)
        yield reads


@pytest.fixture(scope="module")
def learning_run(tmp_path_factory, params_factory, prepared_demo):
    params = params_factory(LEARNING)
    folder = tmp_path_factory.mktemp("learning")
    return folder, params, run(folder, params, prepared_demo)


@pytest.fixture(scope="module")
def frozen_run(tmp_path_factory, params_factory, prepared_demo):
    params = params_factory(FROZEN)
    folder = tmp_path_factory.mktemp("frozen")
    return folder, params, run(folder, params, prepared_demo)


def test_loss_falls_and_val_precision_rises_well_above_chance(learning_run):
    _, params, history = learning_run
    for row in history:
        print(f"epoch {row['epoch']}: train_loss {row['train_loss']:.4f} val_loss "
              f"{row['val_loss']:.4f} precision@{params.train.val_top_k} "
              f"{row['precision_at_k']:.3f} score {row['score']:.1f}")
    first, last = history[1], history[-1]
    assert last["train_loss"] < 0.75 * first["train_loss"]
    assert last["val_loss"] < 0.75 * history[0]["val_loss"]
    assert last["precision_at_k"] > 2.5 * CHANCE
    assert last["precision_at_k"] > history[0]["precision_at_k"] + 0.05


def test_outputs_per_epoch(learning_run):
    folder, params, history = learning_run
    epochs = list(range(params.train.epochs + 1))
    assert [row["epoch"] for row in history] == epochs
    assert all((folder / paths.model_path(e)).is_file() for e in epochs)
    assert [paths.epoch_of(p) for p in paths.epoch_files(folder / paths.CHECKPOINTS, "*.pth")] \
        == epochs[1:]
    with open(folder / paths.TRAINING_METRICS_CSV) as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(METRIC_COLUMNS)
    assert [int(r["epoch"]) for r in rows] == epochs
    assert rows[0]["train_loss"] == "" and float(rows[1]["train_loss"]) == history[1]["train_loss"]
    live = json.loads((folder / paths.TRAIN_LIVE / "metrics.json").read_text())
    assert live["step"] == params.train.epochs and live["score"] == history[-1]["score"]
    scores = (folder / paths.TRAIN_LIVE / "plots/metrics/score.tsv").read_text().splitlines()
    assert len(scores) == 1 + len(epochs)  # header + one line per epoch, epoch 0 included


def test_every_val_image_is_scored_as_a_query(frozen_run, prepared_demo):
    """The image split's val images query the training images too: none lacks a positive."""
    _, _, history = frozen_run
    n_val = len(read_manifest(prepared_demo[1], "val"))
    assert all(row["val_queries"] == n_val and row["val_unmatched"] == 0 for row in history)
    assert all(0 < row["score"] <= 1000 for row in history)


@pytest.mark.parametrize("frozen", [True, False])
def test_backbone_changes_only_when_unfrozen(params_factory, prepared_demo, frozen):
    """...and the backbone features an epoch validates with are those of the backbone as it is:
    kept from the start when frozen, computed again once it trained."""
    params = params_factory({**LEARNING, "train.freeze_backbone": frozen, "train.num_workers": 0})
    trainer = Trainer(params, *prepared_demo)
    trainer.start()
    base_features = trainer.features(trainer.val_split)
    before = {k: v.clone() for k, v in trainer.model.clip.state_dict().items()}
    head = trainer.model.head.linear.weight.clone()
    trainer.train_epoch(1)
    validated = trainer.features(trainer.val_split)  # what the epoch's validation used
    if frozen:
        assert validated is base_features  # one pass for the whole run
    else:
        now = backbone_features(trainer.model, trainer.val_split.paths, batch_size=64,
                                num_workers=0, desc="check")
        assert not torch.equal(validated, base_features) and torch.equal(validated, now)
    after = trainer.model.clip.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert not torch.equal(head, trainer.model.head.linear.weight)
    assert "logit_scale" in changed
    visual = {k for k in changed if k.startswith("visual.")}
    if frozen:
        assert changed == {"logit_scale"}  # every backbone tensor bit-identical
    else:
        assert visual and changed == visual | {"logit_scale"}  # the text tower never trains


def test_same_seed_same_metrics_and_weights(frozen_run, tmp_path, params_factory, prepared_demo):
    folder, params, history = frozen_run
    again = run(tmp_path / "again", params, prepared_demo)
    assert same_numbers(history, again)
    assert model_files_equal(folder, tmp_path / "again", params.train.epochs)
    other_seed = run(tmp_path / "seed", params_factory({**FROZEN, "seed": 7}), prepared_demo)
    assert not same_numbers(history, other_seed)  # the seed does reach the run


@pytest.mark.parametrize("overrides", [
    FROZEN, {**LEARNING, "train.epochs": 2, "train.num_workers": 2}], ids=["frozen", "unfrozen"])
def test_interrupted_run_resumes_to_the_same_end(overrides, tmp_path, params_factory,
                                                 prepared_demo):
    """The unfrozen case draws augmentations while two DataLoader workers decode, and resumes
    with none (train.num_workers may change on resume). Before, that ended with other weights
    (each worker drew augmentations from its own seed), and the resumed run passed every
    training image through the image tower for starting statistics that the checkpoint's
    then replaced."""
    params = params_factory(overrides)
    whole, interrupted = tmp_path / "whole", tmp_path / "interrupted"
    tower_after_epoch = []
    with images_through_the_tower() as tower:
        history = run(whole, params, prepared_demo,
                      on_epoch_end=lambda epoch, row: tower_after_epoch.append(sum(tower)))
    with pytest.raises(Interrupt):
        run(interrupted, params, prepared_demo, on_epoch_end=stop_after(1))
    assert [p.name for p in (interrupted / paths.CHECKPOINTS).iterdir()] == ["weights_epoch_1.pth"]
    shutil.rmtree(interrupted / paths.ALL_WEIGHTS)  # as dvc repro does before the stage runs
    with images_through_the_tower() as tower:
        resumed = run(interrupted, params_replace(params, resume=True, num_workers=0),
                      prepared_demo)
    assert same_numbers(history, resumed)
    assert model_files_equal(whole, interrupted, params.train.epochs)  # epoch 0's rewritten too
    if not params.train.freeze_backbone:  # (frozen, the epochs reuse features computed once)
        print(f"images through the image tower: resumed run {sum(tower)}, the uninterrupted "
              f"run's last epoch {tower_after_epoch[-1] - tower_after_epoch[-2]}")
        assert sum(tower) == tower_after_epoch[-1] - tower_after_epoch[-2]


def test_an_epoch_reads_losses_from_the_device_once_not_every_step(params_factory,
                                                                   prepared_demo):
    """Before, each training step and each val_loss batch read its loss back (.item()): on a GPU
    a wait for the device every step."""
    trainer = Trainer(params_factory({**FROZEN, "train.batch_size": 16}), *prepared_demo)
    trainer.start()
    with host_reads() as reads:
        trainer.train_epoch(1)
    steps = len(trainer.batches)
    print(f"{steps} steps, {len(reads)} reads: {reads}")
    assert steps > 2 * LOSS_SHOWN_EVERY
    # The progress bar's loss every LOSS_SHOWN_EVERY steps and at the end; train_loss; val_loss.
    assert len(reads) <= steps // LOSS_SHOWN_EVERY + 3


@contextlib.contextmanager
def host_to_device_copies():
    """Where clipcore.train makes a tensor from host data (torch.tensor, torch.as_tensor) or
    copies one with a blocking .to(): on a GPU each is a copy the host waits for (and indexing a
    device tensor with a host index makes one too), so per training step they would stall it."""
    copies = []
    with pytest.MonkeyPatch.context() as patch:
        for name in ("tensor", "as_tensor"):
            def making(*args, _original=getattr(torch, name), _name=name, **kwargs):
                caller = sys._getframe(1).f_globals.get("__name__", "")
                if caller.startswith("clipcore.train"):
                    copies.append(f"{caller} torch.{_name}()")
                return _original(*args, **kwargs)
            patch.setattr(torch, name, making)

        def moving(self, *args, _original=torch.Tensor.to, **kwargs):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith("clipcore.train") and not kwargs.get("non_blocking"):
                copies.append(f"{caller} .to()")
            return _original(self, *args, **kwargs)
        patch.setattr(torch.Tensor, "to", moving)
        yield copies


@pytest.mark.parametrize("frozen", [True, False], ids=["frozen", "unfrozen"])
def test_a_training_step_waits_for_no_host_copy(params_factory, prepared_demo, frozen):
    """Before, every step copied its image positions to the device and waited (frozen: indexing
    the stored features with a host index, then the labels with a blocking .to()); now the
    epoch's positions go in one copy (frozen) or come pinned from the loader (unfrozen), and
    val_loss copies its batch order once, not per batch."""
    trainer = Trainer(params_factory({**FROZEN, "train.batch_size": 16,
                                      "train.freeze_backbone": frozen}), *prepared_demo)
    trainer.start()
    with host_to_device_copies() as copies:
        trainer.train_epoch(1)
    steps = len(trainer.batches)
    print(f"{steps} steps, {len(copies)} host-to-device copies: {copies}")
    assert steps > 10
    # Once per epoch: the frozen epoch's positions; validation's val_loss order.
    assert len(copies) <= 2


def test_damaged_newest_checkpoint_falls_back(frozen_run, tmp_path, prepared_demo, capsys):
    folder, params, history = frozen_run
    shutil.copytree(folder / paths.CHECKPOINTS, tmp_path / paths.CHECKPOINTS)
    newest = tmp_path / paths.checkpoint_path(params.train.epochs)
    newest.write_bytes(newest.read_bytes()[:1000])  # a run killed mid-write (before atomic saves)
    resumed = run(tmp_path, params_replace(params, resume=True), prepared_demo)
    err = capsys.readouterr().err
    assert f"warning: skipping {paths.checkpoint_path(params.train.epochs)}" in err
    assert same_numbers(history, resumed)


def test_resume_refuses_a_checkpoint_of_other_shapes(frozen_run, tmp_path, params_factory,
                                                     prepared_demo):
    folder, _, _ = frozen_run
    shutil.copytree(folder / paths.CHECKPOINTS, tmp_path / paths.CHECKPOINTS)
    wider = params_factory({**FROZEN, "model.embed_dim": 640, "train.resume": True})
    with pytest.raises(ClipcoreError, match=r"weights_epoch_3\.pth: made with model\.embed_dim"
                                            r"=512, now 640; set train\.resume false"):
        run(tmp_path, wider, prepared_demo)


def test_fresh_run_clears_stale_epochs(frozen_run, tmp_path, params_factory, prepared_demo):
    folder, _, _ = frozen_run
    for source in (paths.checkpoint_path(3), paths.model_path(3)):
        (tmp_path / source).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(folder / source, tmp_path / source.with_name(source.name.replace("3", "9")))
    run(tmp_path, params_factory({**FROZEN, "train.epochs": 1}), prepared_demo)
    assert sorted(p.name for p in (tmp_path / paths.ALL_WEIGHTS).iterdir()) \
        == ["model_epoch_0.pt", "model_epoch_1.pt"]
    assert [p.name for p in (tmp_path / paths.CHECKPOINTS).iterdir()] == ["weights_epoch_1.pth"]


def test_empty_val_split_skips_metrics(tmp_path, params_factory, prepared_demo):
    root, prepared = prepared_demo
    no_val = tmp_path / "prepared"
    shutil.copytree(prepared, no_val)
    (no_val / "val.csv").write_text("path,label,caption\n")
    history = run(tmp_path, params_factory({**FROZEN, "train.epochs": 1}), (root, no_val))
    assert history[1]["train_loss"] > 0
    assert all(row["precision_at_k"] != row["precision_at_k"] for row in history)  # NaN
    live = json.loads((tmp_path / paths.TRAIN_LIVE / "metrics.json").read_text())
    assert "train_loss" in live and "score" not in live


def test_numeric_captions_only_learnable_targets_learn(tmp_path, params_factory, prepared_demo):
    """'a photo of class number 3' and '... 4' embed close together. With the backbone frozen
    the head alone can't pull images of such classes apart; learnable targets move apart."""
    numeric = {**FROZEN, "train.epochs": 10, "loss.target_init": "caption"}
    runs = {targets: run(tmp_path / targets,
                         params_factory({**numeric, "loss.text_targets": targets}), prepared_demo)
            for targets in ("frozen", "learnable")}
    for targets, history in runs.items():
        print(f"text targets {targets:9}: val_loss {history[0]['val_loss']:.4f} -> "
              f"{history[-1]['val_loss']:.4f}, precision@10 {history[0]['precision_at_k']:.3f} -> "
              f"{history[-1]['precision_at_k']:.3f}")
    frozen, learnable = runs["frozen"][-1], runs["learnable"][-1]
    assert learnable["val_loss"] < frozen["val_loss"] - 0.1
    assert learnable["precision_at_k"] > frozen["precision_at_k"] + 0.02
    assert learnable["precision_at_k"] > runs["learnable"][0]["precision_at_k"] + 0.02

    params = params_factory(numeric)
    start = build_model(params.model).caption_embeddings(
        [f"a photo of class number {n}" for n in range(10)])
    end = load_file(tmp_path / "learnable" / paths.checkpoint_path(10))["loss"]["targets.targets"]
    end = torch.nn.functional.normalize(end, dim=-1)
    off_diagonal = ~torch.eye(10, dtype=torch.bool)
    before, after = (start @ start.T)[off_diagonal].mean(), (end @ end.T)[off_diagonal].mean()
    print(f"mean cosine between class targets: {before:.3f} at start, {after:.3f} after training")
    assert after < before - 0.05


def test_frozen_checkpoints_hold_no_backbone(frozen_run, learning_run):
    frozen_folder, _, _ = frozen_run
    unfrozen_folder, _, _ = learning_run
    frozen = load_file(frozen_folder / paths.checkpoint_path(1))
    unfrozen = load_file(unfrozen_folder / paths.checkpoint_path(1))
    assert not any(k.startswith("clip.visual.") for k in frozen["state"])
    visual = [v for k, v in unfrozen["state"].items() if k.startswith("clip.visual.")]
    visual_bytes = sum(v.numel() * v.element_size() for v in visual)
    sizes = {name: (folder / paths.checkpoint_path(1)).stat().st_size
             for name, folder in (("frozen", frozen_folder), ("unfrozen", unfrozen_folder))}
    models = {name: (folder / paths.model_path(1)).stat().st_size
              for name, folder in (("frozen", frozen_folder), ("unfrozen", unfrozen_folder))}
    print(f"checkpoint bytes {sizes}, model file bytes {models}, tiny visual tower {visual_bytes}")
    # The visual tower, plus its two AdamW moments, is what the frozen files leave out.
    assert sizes["unfrozen"] - sizes["frozen"] > 2.5 * visual_bytes
    assert models["unfrozen"] - models["frozen"] > 0.9 * visual_bytes
    assert models["frozen"] < 1.1 * 512 * 513 * 4  # the head, and little else
