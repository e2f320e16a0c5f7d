"""params.yaml validation: every failure mode names its dotted key in one line, and a stage
with a broken params.yaml stops before writing anything."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import yaml
from conftest import REPO, default_params_dict, with_overrides

from clipcore.params import ParamsError, load_params, parse_params


def key_paths(raw: dict, prefix: str = "") -> set[str]:
    return {path for key, value in raw.items() for path in (
        key_paths(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key})}


def test_repo_params_load_and_the_tests_params_have_its_keys():
    """The tests use tests/params.yaml, not the workspace file that `dvc exp run -S` rewrites;
    its values may differ, its keys may not."""
    params = load_params(REPO / "params.yaml")
    assert params.data.val_split in ("image", "class")
    workspace = yaml.safe_load((REPO / "params.yaml").read_text())
    assert key_paths(default_params_dict()) == key_paths(workspace), \
        "tests/params.yaml and params.yaml must hold the same keys"


def test_a_float_written_without_a_dot_is_a_number(tmp_path):
    """PyYAML reads `lr: 1e-3` as the string "1e-3" (YAML 1.1 wants 1.0e-3); it means 0.001."""
    text = re.sub(r"(?m)^  lr: .*$", "  lr: 1e-3", yaml.safe_dump(default_params_dict()))
    assert "\n  lr: 1e-3\n" in text
    (tmp_path / "params.yaml").write_text(text)
    assert load_params(tmp_path / "params.yaml").train.lr == 0.001
    with pytest.raises(ParamsError, match=r"'train.lr' must be a number, got str 'fast'"):
        parse_params(with_overrides(default_params_dict(), {"train.lr": "fast"}))
    with pytest.raises(ParamsError, match=r"'train.epochs' must be an integer, got str '1e1'"):
        parse_params(with_overrides(default_params_dict(), {"train.epochs": "1e1"}))


def test_overrides_reach_the_typed_params(params_factory):
    params = params_factory({"train.epochs": 2, "data.val_split": "class", "seed": 7})
    assert (params.train.epochs, params.data.val_split, params.seed) == (2, "class", 7)
    assert isinstance(params.data.val_fraction, float)


def without(dotted: str) -> dict:
    raw = default_params_dict()
    *sections, key = dotted.split(".")
    target = raw
    for section in sections:
        target = target[section]
    del target[key]
    return raw


@pytest.mark.parametrize("raw, key", [
    (with_overrides(default_params_dict(), {"learning_rate": 0.1}), "'learning_rate'"),
    (with_overrides(default_params_dict(), {"train.epoch": 3}), "'train.epoch'"),
    (without("seed"), "'seed'"),
    (without("retrieve.top_k"), "'retrieve.top_k'"),
    (with_overrides(default_params_dict(), {"train.epochs": "5"}), "'train.epochs'"),
    (with_overrides(default_params_dict(), {"train.augment": 1}), "'train.augment'"),
    (with_overrides(default_params_dict(), {"retrieve.top_k": True}), "'retrieve.top_k'"),
    (with_overrides(default_params_dict(), {"train.epochs": -1}), "'train.epochs'"),
    (with_overrides(default_params_dict(), {"data.val_fraction": 1.0}), "'data.val_fraction'"),
    (with_overrides(default_params_dict(), {"data.val_split": "folder"}), "'data.val_split'"),
    (with_overrides(default_params_dict(), {"retrieve.metric": "dot"}), "'retrieve.metric'"),
    (with_overrides(default_params_dict(), {"train": [1, 2]}), "train must be a mapping"),
    (with_overrides(default_params_dict(), {"data.caption_template": "a photo"}),
     "'data.caption_template' must contain {name}"),
    (with_overrides(default_params_dict(), {"model.head": "linear"}), "'model.head'"),
    (with_overrides(default_params_dict(), {"train.optimizer": "sgd"}), "'train.optimizer'"),
    (with_overrides(default_params_dict(), {"train.schedule": "step"}), "'train.schedule'"),
    (with_overrides(default_params_dict(), {"train.clamp_temperature": "no"}),
     "'train.clamp_temperature'"),
    (with_overrides(default_params_dict(), {"loss.text_targets": "head"}),
     "'loss.target_init' must be caption with 'loss.text_targets: head'"),
    (with_overrides(default_params_dict(), {"model.head": "mlp", "embed.wise_ft_alpha": 0.5}),
     "'embed.wise_ft_alpha' must be 1.0 with 'model.head: mlp'"),
    (with_overrides(default_params_dict(), {"seed": 2**32}), "'seed' must be < 4294967296"),
    (with_overrides(default_params_dict(), {"submit.timeout": float("inf")}),
     "'submit.timeout' must be a finite number, got inf"),
    (with_overrides(default_params_dict(), {"train.lr": float("nan")}), "'train.lr'"),
], ids=["unknown-top", "unknown-nested", "missing-top", "missing-nested", "string-for-int",
        "int-for-bool", "bool-for-int", "negative-epochs", "val-fraction-1", "bad-val-split",
        "bad-metric", "section-not-mapping", "template-without-name", "bad-head",
        "bad-optimizer", "bad-schedule", "string-for-clamp", "text-head-with-class-mean",
        "wise-ft-with-mlp-head", "seed-over-32-bits", "infinite-timeout", "nan-lr"])
def test_each_mistake_is_one_line_naming_the_key(raw, key):
    with pytest.raises(ParamsError) as caught:
        parse_params(raw)
    message = str(caught.value)
    assert key in message and "\n" not in message


@pytest.mark.parametrize("line, message", [
    ("sed: 7", "unknown key 'sed' (did you mean 'seed'?)"),
    ("train.epohcs: 3", "unknown key 'train.epohcs' (did you mean 'train.epochs', write "
                        "'epochs:' under train:?)"),
    ("train.epochs: 3", "'train.epochs' is one key named with dots to YAML: write 'epochs:' "
                        "under train:"),
    ("color: red", "unknown key 'color' (expected one of: seed, data, demo,"),
])
def test_an_unknown_key_names_the_nearest_known_one(tmp_path, line, message):
    """A line added to params.yaml as a newcomer writes it: a typo, or a dotted key that YAML
    reads as one name."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(default_params_dict()) + line + "\n")
    with pytest.raises(ParamsError) as caught:
        load_params(tmp_path / "params.yaml")
    assert str(caught.value).startswith(f"{tmp_path / 'params.yaml'}: {message}")
    with pytest.raises(ParamsError, match=r"unknown key 'loss.arcface.margn' \(did you mean "
                                          r"'loss.arcface.margin'\?\)"):
        parse_params(with_overrides(default_params_dict(), {"loss.arcface.margn": 0.5}))


def test_invalid_yaml_and_missing_file_name_the_file(tmp_path):
    broken = tmp_path / "params.yaml"
    broken.write_text("train:\n  epochs: [1,\n")
    with pytest.raises(ParamsError, match="params.yaml: not valid YAML") as caught:
        load_params(broken)
    assert "\n" not in str(caught.value)
    with pytest.raises(ParamsError, match="nothing.yaml: file not found"):
        load_params(tmp_path / "nothing.yaml")


def test_stage_with_bad_params_exits_1_with_one_line_and_writes_nothing(tmp_path):
    for package in ("clipcore", "stages"):
        (tmp_path / package).symlink_to(REPO / package)
    raw = with_overrides(default_params_dict(), {"data.val_fraction": 1.5})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    done = subprocess.run([sys.executable, "-m", "stages.prepare"], cwd=tmp_path,
                          capture_output=True, text=True,
                          env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        "error: params.yaml: 'data.val_fraction' must be < 1.0, got 1.5"]
    assert not (tmp_path / "data").exists()
