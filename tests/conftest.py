"""Shared fixtures: params from the repo's params.yaml with overrides, and the digits demo
written and prepared once per test session."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from clipcore.demo import write_demo
from clipcore.manifests import prepare
from clipcore.params import Params, parse_params

REPO = Path(__file__).parents[1]


def repo_params_dict() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def with_overrides(raw: dict, overrides: dict | None) -> dict:
    """A copy of a params dict with dotted keys ("train.epochs": 2) set."""
    raw = copy.deepcopy(raw)
    for dotted, value in (overrides or {}).items():
        *sections, key = dotted.split(".")
        target = raw
        for section in sections:
            target = target[section]
        target[key] = value
    return raw


@pytest.fixture(autouse=True)
def no_proxy_for_loopback(monkeypatch):
    """A proxy configured in the environment must not intercept the tests' loopback servers."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


@pytest.fixture(scope="session")
def params_factory():
    """make(overrides) -> Params: the repo's params.yaml with dotted-key overrides."""
    raw = repo_params_dict()

    def make(overrides: dict | None = None) -> Params:
        return parse_params(with_overrides(raw, overrides))
    return make


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory, params_factory) -> Path:
    params = params_factory()
    root = tmp_path_factory.mktemp("demo") / "data"
    write_demo(root, params.demo, params.seed)
    return root


@pytest.fixture(scope="session")
def prepared_demo(demo_root, tmp_path_factory, params_factory) -> tuple[Path, Path]:
    params = params_factory({"data.val_split": "image"})
    prepared = tmp_path_factory.mktemp("prepared")
    prepare(demo_root, prepared, params.data, params.seed)
    return demo_root, prepared
