"""The submission history across the DVC operations the docs recommend, with real dvc and git
commands in a temporary repo holding only the submit stage (as dvc.yaml defines it) and a real
HTTP server on 127.0.0.1 that counts every post: queued experiments, `dvc exp apply`, `dvc
checkout`, a forced rerun. Every answer is kept, every ranking is posted once, and the group name
given only in CLIPCORE_GROUPNAME reaches no file git tracks."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.dvc_project import REPO, dvc, git, new_project
from tests.submit.test_submission import (
    REVERSED_RANKING,
    TINY_RANKING,
    ScriptedServer,
    serving,
    write_results,
)

pytestmark = pytest.mark.timeout(600)
SECRET = "team-kept-out-of-git"


def submit_only_project(root: Path, url: str) -> Path:
    """The project with dvc.yaml cut to its submit stage, two epochs of results and submit.url
    set, committed."""
    project = new_project(root, {"submit.url": url})
    pipeline = yaml.safe_load((REPO / "dvc.yaml").read_text())
    stage = pipeline["stages"]["submit"]
    (project / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"submit": stage}}))
    for dep in stage["deps"]:
        if not (project / dep).exists():  # an upstream stage's output: a placeholder here
            (project / dep).mkdir(parents=True)
            (project / dep / "placeholder.txt").write_text("upstream output\n")
            git(project, "add", "-f", dep)  # ignored where DVC tracks it
    write_results(project / "repository/results", {0: TINY_RANKING, 1: REVERSED_RANKING})
    git(project, "add", "-A")
    git(project, "commit", "-qm", "submit-only pipeline with two epochs of results")
    return project


def tracked_text(project: Path) -> str:
    """Every file of every commit git holds, experiments included."""
    refs = git(project, "for-each-ref", "--format=%(objectname)").split()
    found = subprocess.run(["git", "grep", "-I", "-l", SECRET, *refs], cwd=project,
                           capture_output=True, text=True)
    return found.stdout


def test_queued_runs_apply_and_checkout_keep_every_answer_posted_once(tmp_path, monkeypatch):
    """Before: each queued experiment posted both rankings again from its own copy of the
    history (6 POSTs for 2 rankings), `dvc exp apply` replaced the workspace's history with the
    experiment's, and the group name was committed in every experiment's history."""
    history = tmp_path / "user-data" / "submission_history.csv"
    monkeypatch.setenv("CLIPCORE_SUBMIT_HISTORY", str(history))
    monkeypatch.setenv("CLIPCORE_GROUPNAME", SECRET)
    scripted = ScriptedServer([(200, '{"accuracy": 400}'), (200, '{"accuracy": 500}')])
    with serving(scripted.server):
        project = submit_only_project(tmp_path / "project", scripted.url)
        # Two experiments queued from the commit, before anything was submitted.
        dvc(project, "exp", "run", "--queue", "-S", "submit.retries=1", "--name", "retries-1")
        dvc(project, "exp", "run", "--queue", "-S", "submit.retries=2", "--name", "retries-2")
        dvc(project, "repro")  # the workspace posts both rankings, answers uncommitted
        assert len(scripted.requests) == 2

        dvc(project, "exp", "run", "--run-all")
        assert "Failed" not in dvc(project, "queue", "status")
        assert len(scripted.requests) == 2, "a queued run posted a ranking already scored"

        dvc(project, "exp", "apply", "retries-1")
        dvc(project, "checkout", "--force")
        dvc(project, "repro", "-f")
        assert len(scripted.requests) == 2, "a rerun after apply/checkout posted again"

    accuracy = json.loads((project / "repository/metrics/submission.json").read_text())
    assert accuracy["epochs"] == {"0": 400.0, "1": 500.0}
    answered = [line for line in history.read_text().splitlines() if ",ok," in line]
    assert len(answered) == 2  # each answer once, kept outside every experiment
    assert SECRET not in history.read_text()
    assert tracked_text(project) == "", "the group name is in a file git tracks"
    leaked = subprocess.run(["grep", "-rIl", "--exclude-dir=.git", SECRET, str(project)],
                            capture_output=True, text=True).stdout
    assert leaked == ""
