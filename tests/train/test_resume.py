"""Resuming never mixes two runs and never loses one: a changed setting stops the run naming
it, a damaged checkpoint is skipped only when it really is damaged, and nothing is deleted when
no checkpoint can be used. train.keep_checkpoints keeps the newest N."""
from __future__ import annotations

import dataclasses
import hashlib
import shutil
from pathlib import Path

import pytest
import torch
from conftest import default_params_dict, flip_bit, with_overrides
from tests.train.test_training import Interrupt, run, stop_after

from clipcore import paths
from clipcore.errors import ClipcoreError
from clipcore.params import parse_params
from clipcore.train.resume import (
    check_compatible,
    cuda_states_that_fit,
    restore_rng,
    rng_state,
    run_settings,
)

FROZEN = {"model.name": "tiny", "model.pretrained": "none", "train.num_workers": 0,
          "train.epochs": 2, "train.lr": 1e-2}
# What the README (Resuming) says may change on resume, plus what isn't training at all.
MAY_CHANGE = {"train.epochs", "train.resume", "train.num_workers", "train.device",
              "train.keep_checkpoints", "data.root"}
LATER_STAGES = ("demo.", "embed.", "retrieve.", "submit.")


def outputs(folder: Path) -> dict[str, str]:
    """sha256 of every model file and checkpoint."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for sub in (paths.ALL_WEIGHTS, paths.CHECKPOINTS) for p in (folder / sub).iterdir()}


@pytest.fixture(scope="module")
def stopped(tmp_path_factory, params_factory, prepared_demo):
    """A frozen run at lr 1e-2 stopped after epoch 1 of 2, and a whole one."""
    params = params_factory(FROZEN)
    folder = tmp_path_factory.mktemp("stopped")
    with pytest.raises(Interrupt):
        run(folder, params, prepared_demo, on_epoch_end=stop_after(1))
    whole = tmp_path_factory.mktemp("whole")
    return folder, whole, run(whole, params, prepared_demo)


def copy_run(source: Path, dest: Path) -> Path:
    for sub in (paths.ALL_WEIGHTS, paths.CHECKPOINTS):
        shutil.copytree(source / sub, dest / sub)
    return dest


def flat_keys(raw: dict, prefix: str = "") -> list[str]:
    return [path for key, value in raw.items() for path in (
        flat_keys(value, f"{prefix}{key}.") if isinstance(value, dict) else [prefix + key])]


def changed(value, field_choices):
    """Another valid value of the same type."""
    if value in ("auto", "all"):  # a count chosen at run time (all: every block): any count differs
        return 1
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value / 2 if value else 0.5
    if field_choices:
        return next(choice for choice in field_choices if choice != value)
    return value + " {name}"


def value_of(raw: dict, dotted: str):
    for key in dotted.split("."):
        raw = raw[key]
    return raw


def choices_of(params, dotted: str):
    *sections, name = dotted.split(".")
    owner = params
    for section in sections:
        owner = getattr(owner, section)
    field = next(f for f in dataclasses.fields(owner) if f.name == name)
    return field.metadata.get("choices") if field.metadata else None


@pytest.mark.parametrize("stopped_or_finished", ["stopped", "finished"])
def test_a_changed_setting_stops_the_resume_naming_it_and_deleting_nothing(
        stopped, tmp_path, params_factory, prepared_demo, stopped_or_finished):
    """Before, the new lr was ignored (the old schedule went on), and a finished run kept its
    old model files while the params said lr 1e-4."""
    folder, whole, _ = stopped
    copy = copy_run(folder if stopped_or_finished == "stopped" else whole, tmp_path / "run")
    before = outputs(copy)
    other = params_factory({**FROZEN, "train.lr": 1e-4, "train.batch_size": 32,
                            "train.resume": True})
    with pytest.raises(ClipcoreError) as error:
        run(copy, other, prepared_demo)
    message = str(error.value)
    assert "\n" not in message and "weights_epoch_" in message
    assert "train.batch_size=64, now 32" in message and "train.lr=0.01, now 0.0001" in message
    assert "set train.resume false" in message
    assert outputs(copy) == before


def test_the_same_settings_resume_and_epochs_may_grow(stopped, tmp_path, params_factory,
                                                      prepared_demo, capsys):
    folder, _, whole_history = stopped
    copy = copy_run(folder, tmp_path / "run")
    shutil.rmtree(copy / paths.ALL_WEIGHTS)  # as dvc repro does when all_weights isn't kept
    resumed = run(copy, params_factory({**FROZEN, "train.resume": True}), prepared_demo)
    assert [r["train_loss"] for r in resumed[1:]] == [r["train_loss"] for r in whole_history[1:]]
    longer = run(copy, params_factory({**FROZEN, "train.resume": True, "train.epochs": 3}),
                 prepared_demo)
    assert [r["epoch"] for r in longer] == [0, 1, 2, 3]
    assert [r["train_loss"] for r in longer[1:3]] == [r["train_loss"] for r in resumed[1:]]
    assert "train.epochs changed from 2 to 3" in capsys.readouterr().out


def test_every_training_setting_is_compared(prepared_demo):
    """Built from the params themselves: a key added to params.yaml later is covered too."""
    prepared = prepared_demo[1]
    raw = default_params_dict()
    params = parse_params(raw)
    stored = {"path": Path("weights_epoch_1.pth"), "base": {}, "signature":
              run_settings(params, prepared)}
    for key in flat_keys(raw):
        now = parse_params(with_overrides(raw, {key: changed(value_of(raw, key),
                                                             choices_of(params, key))}))
        if key in MAY_CHANGE or key.startswith(LATER_STAGES):
            check_compatible(stored, {}, run_settings(now, prepared))
        else:
            with pytest.raises(ClipcoreError, match=rf"made with {key}="):
                check_compatible(stored, {}, run_settings(now, prepared))


def test_another_data_split_is_refused(prepared_demo, params_factory, tmp_path):
    params = params_factory(FROZEN)
    stored = {"path": Path("weights_epoch_1.pth"), "base": {},
              "signature": run_settings(params, prepared_demo[1])}
    moved = shutil.copytree(prepared_demo[1], tmp_path / "prepared")
    (moved / "val.csv").write_text("path,label,caption\n")
    with pytest.raises(ClipcoreError, match=r"other data\.split \(the train/val manifests"):
        check_compatible(stored, {}, run_settings(params, moved))


def test_a_foreign_newest_checkpoint_stops_the_run(stopped, tmp_path, params_factory,
                                                  prepared_demo):
    """Before, any unreadable checkpoint counted as truncated: skipped, then the older used."""
    folder, whole, _ = stopped
    copy = copy_run(whole, tmp_path / "run")
    newest = copy / paths.checkpoint_path(2)
    newest.write_bytes((copy / paths.model_path(2)).read_bytes())  # a model file, not a checkpoint
    before = outputs(copy)
    with pytest.raises(ClipcoreError, match=r"weights_epoch_2\.pth: not a training checkpoint "
                                            r".*nothing was deleted"):
        run(copy, params_factory({**FROZEN, "train.resume": True}), prepared_demo)
    assert outputs(copy) == before


def test_when_no_checkpoint_loads_nothing_is_deleted(stopped, tmp_path, params_factory,
                                                     prepared_demo, capsys):
    """Before, train.resume started over and deleted every checkpoint and model file."""
    _, whole, _ = stopped
    copy = copy_run(whole, tmp_path / "run")
    for epoch in (1, 2):
        path = copy / paths.checkpoint_path(epoch)
        path.write_bytes(path.read_bytes()[:1000])  # cut short
    before = outputs(copy)
    with pytest.raises(ClipcoreError, match=r"checkpoints: none of the 2 checkpoints loads"):
        run(copy, params_factory({**FROZEN, "train.resume": True}), prepared_demo)
    assert outputs(copy) == before
    assert capsys.readouterr().err.count("damaged: truncated") == 2


def test_a_flipped_bit_in_the_newest_checkpoint_falls_back(stopped, tmp_path, params_factory,
                                                          prepared_demo, capsys):
    """Before, the changed tensor loaded silently and training went on from it."""
    _, whole, history = stopped
    copy = copy_run(whole, tmp_path / "run")
    flip_bit(copy / paths.checkpoint_path(2), "data/0")
    resumed = run(copy, params_factory({**FROZEN, "train.resume": True}), prepared_demo)
    captured = capsys.readouterr()
    assert f"warning: skipping {paths.checkpoint_path(2)}: damaged: CRC-32 check failed" \
        in captured.err
    assert f"removing {paths.checkpoint_path(2)}: epoch 2 trains again" in captured.out
    assert [r["train_loss"] for r in resumed[1:]] == [r["train_loss"] for r in history[1:]]


def test_keep_checkpoints_keeps_the_newest_and_every_model_file(tmp_path, params_factory,
                                                                prepared_demo):
    params = params_factory({**FROZEN, "train.epochs": 3, "train.keep_checkpoints": 2})
    run(tmp_path, params, prepared_demo)
    assert sorted(p.name for p in (tmp_path / paths.CHECKPOINTS).iterdir()) \
        == ["weights_epoch_2.pth", "weights_epoch_3.pth"]
    assert len(list((tmp_path / paths.ALL_WEIGHTS).iterdir())) == 4
    more = params_factory({**FROZEN, "train.epochs": 4, "train.keep_checkpoints": 1,
                           "train.resume": True})
    assert [r["epoch"] for r in run(tmp_path, more, prepared_demo)] == [0, 1, 2, 3, 4]
    assert [p.name for p in (tmp_path / paths.CHECKPOINTS).iterdir()] == ["weights_epoch_4.pth"]
    assert len(list((tmp_path / paths.ALL_WEIGHTS).iterdir())) == 5


def test_a_checkpoint_from_more_gpus_resumes_with_the_states_that_fit(capsys):
    generator = torch.Generator().manual_seed(3)
    saved = rng_state(generator)
    # As saved on a 2-GPU machine: one CUDA generator state per GPU (what is in them does not
    # matter here: on this machine none is restored).
    saved["cuda"] = [torch.full((16,), gpu, dtype=torch.uint8) for gpu in (0, 1)]
    expected = torch.rand(3)
    restore_rng(saved, torch.Generator())  # no GPU visible here
    assert torch.equal(torch.rand(3), expected)  # the CPU stream continues where it was
    assert "with 0 of the 2 GPUs' random states" in capsys.readouterr().out
    assert [s[0].item() for s in cuda_states_that_fit(saved["cuda"], 1)] == [0]
    assert cuda_states_that_fit(saved["cuda"], 4) == saved["cuda"]
