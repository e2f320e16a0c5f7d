"""Any edit of params.yaml is checked on the next `dvc repro`, with real dvc and git commands in a
temporary repo: a key no stage reads (a typo) stops the run at the first stage with one line
naming it, and a valid edit reruns nothing the edited key doesn't feed."""
from __future__ import annotations

import pytest
import yaml
from conftest import REPO
from dvc_project import dvc, new_project, set_params

pytestmark = pytest.mark.timeout(600)
STAGES = ["check_params", "demo", "prepare"]  # the cheap head of dvc.yaml: the rest follows prepare


def ran(output: str) -> list[str]:
    return [s for s in STAGES if f"Running stage '{s}'" in output]


def test_a_typo_in_params_yaml_stops_dvc_repro(tmp_path):
    project = new_project(tmp_path, {})
    pipeline = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    (project / "dvc.yaml").write_text(yaml.safe_dump({"stages": {s: pipeline[s] for s in STAGES}}))
    assert ran(dvc(project, "repro")) == STAGES
    valid = (project / "params.yaml").read_text()

    # Before: "Data and pipelines are up to date." (no stage tracked the key).
    for line, message in [
            ("sed: 7", "error: params.yaml: unknown key 'sed' (did you mean 'seed'?)"),
            ("train.epohcs: 3", "error: params.yaml: unknown key 'train.epohcs' (did you mean "
                                "'train.epochs'")]:
        (project / "params.yaml").write_text(valid + line + "\n")
        failed = dvc(project, "repro", fails=True)
        assert message in failed
        assert ran(failed) == ["check_params"]  # stopped before any stage that works
    assert ran(dvc(project, "repro", "prepare", fails=True)) == ["check_params"]

    # A valid edit is checked, and reruns no stage the key doesn't feed.
    (project / "params.yaml").write_text(valid)
    set_params(project, {"train.epochs": 3})
    assert ran(dvc(project, "repro")) == ["check_params"]
    assert ran(dvc(project, "repro")) == []
