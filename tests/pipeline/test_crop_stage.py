"""The crop stage under real dvc in a temporary git repo: it runs between prepare and train, and
a second repro with the same params does nothing."""
from __future__ import annotations

import pandas as pd
import pytest
from conftest import write_face_root
from dvc_project import SMOKE, dvc, new_project
from test_workflow import stages_run

from clipcore import paths

pytest.importorskip("facenet_pytorch")
pytestmark = pytest.mark.timeout(600)


def test_crop_stage_runs_once_and_a_rerun_does_nothing(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    write_face_root(project / "data/faces")
    new_project(project, {**SMOKE, "data.root": "data/faces", "data.crop": "face",
                          "data.val_fraction": 0.0})
    first = dvc(project, "repro", "crop")
    assert stages_run(first) == ["check_params", "prepare", "crop"]
    report = pd.read_csv(project / paths.CROP_REPORT)
    assert report.groupby("split")["face"].sum().to_dict() == {"gallery": 2, "query": 2, "train": 4}
    assert stages_run(dvc(project, "repro", "crop")) == []
    assert "train" in dvc(project, "dag", "--mermaid").split("crop", 1)[1]  # train after crop
