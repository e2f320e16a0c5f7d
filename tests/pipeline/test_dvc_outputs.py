"""What a failed stage under real DVC leaves behind: DVC deletes a stage's outputs before running
it unless they persist, and an uncached output (metrics, plots: committed with git) cannot be
restored by `dvc checkout`. Every uncached output persists, and the stage rewrites it, so a
stage that stops (a refused resume, a bad param) leaves the last run's files as they were.
"""
from __future__ import annotations

import pytest
import yaml
from dvc_project import REPO, SMOKE, digest, dvc, git, new_project

# Uncached outputs of the stages the failures below stop in: only git could bring them back.
UNCACHED = ["repository/metrics/training_metrics.csv", "repository/metrics/train/metrics.json",
            "repository/metrics/retrieval.json", "repository/metrics/retrieval_by_epoch.csv"]

pytestmark = pytest.mark.timeout(900)  # real dvc runs: minutes on a busy 2-core machine


def test_every_uncached_output_persists():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        for out in stage.get("outs", []):
            if isinstance(out, dict):
                (path, flags), = out.items()
                if flags.get("cache") is False:
                    assert flags.get("persist") is True, f"{name}: {path}"


def test_a_failed_stage_keeps_the_last_runs_outputs(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    new_project(project, {**SMOKE, "train.epochs": 1})
    dvc(project, "repro", "submit")
    git(project, "add", "-A")
    git(project, "commit", "-qm", "a run")
    kept = {path: digest(project / path) for path in UNCACHED}

    # Before: DVC had deleted training_metrics.csv and metrics/train/ by the time the resume
    # was refused with "nothing was deleted".
    failed = dvc(project, "exp", "run", "-S", "train.lr=0.5", "-S", "train.resume=true",
                 fails=True)
    assert "made with train.lr=" in failed and "nothing was deleted" in failed
    assert {path: digest(project / path) for path in kept} == kept
    # A failed `dvc exp run -S` leaves its values in params.yaml: the next run would inherit
    # them until git restores the file (docs: Experiments).
    changed = yaml.safe_load((project / "params.yaml").read_text())["train"]
    assert (changed["lr"], changed["resume"]) == (0.5, True)
    git(project, "checkout", "--", "params.yaml")

    # Before: retrieval.json and retrieval_by_epoch.csv were gone.
    failed = dvc(project, "exp", "run", "-S", "retrieve.rerank=bogus", fails=True)
    assert "retrieve.rerank" in failed
    assert {path: digest(project / path) for path in kept} == kept
