"""The DVC workflow end to end, with real dvc and git commands in a temporary copy of the repo:
dvc repro, a no-op second repro, targeted reruns, dvc exp run -S, dvc metrics diff / exp show,
versioned data and checkpoints through a local remote (push, pull, checkout), and the val-picked
model fetched as a DVC artifact from a second clone.

Uses the tiny model (`model.name=tiny`, `model.pretrained=none`), so it needs no network.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from docs_metrics import generic, quoted_metric_names, shown_metric_names
from dvc.api import artifacts_show
from dvc_project import SMOKE, digest, dvc, git, new_project, set_params

from clipcore.model.checkpoint import load_model

PIPELINE = ["check_params", "demo", "prepare", "crop", "train", "embed", "retrieve", "submit",
            "best", "report"]

pytestmark = pytest.mark.timeout(900)  # real dvc runs: several minutes on a busy 2-core machine


def md_columns(table: str) -> list[str]:
    return [cell.strip() for cell in table.strip().splitlines()[0].strip("|").split("|")]


def stages_run(output: str) -> list[str]:
    return [s for s in PIPELINE if f"Running stage '{s}'" in output]


def val_picked(project: Path) -> int:
    """The epoch with the highest val score in training_metrics.csv; ties: the earliest."""
    with open(project / "repository/metrics/training_metrics.csv", newline="") as f:
        rows = [(float(row["score"]), -int(row["epoch"])) for row in csv.DictReader(f)
                if row["score"]]  # the demo has a val split: scores exist
    return -max(rows)[1]


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    return new_project(tmp_path_factory.mktemp("project"), SMOKE)


@pytest.fixture(scope="module")
def remote(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dvc-remote")


def test_workflow(project: Path, remote: Path, tmp_path: Path):
    # 1. The whole pipeline, in DAG order.
    dag = dvc(project, "dag", "--mermaid")
    for before, after in zip(PIPELINE, PIPELINE[1:]):
        assert f"{before}" in dag and after in dag
    first = dvc(project, "repro")
    assert stages_run(first) == PIPELINE
    epochs = [0, 1, 2]
    for e in epochs:
        assert (project / f"repository/all_weights/model_epoch_{e}.pt").exists()
        assert (project / f"repository/embeddings/epoch_{e}.npz").exists()
        results = json.loads((project / f"repository/results/retrieval_results_epoch_{e}.json")
                             .read_text())
        assert results and all(len(names) == 10 for names in results.values())
        assert (project / f"repository/results/pictures/epoch_{e}.png").exists()
    for e in epochs[1:]:  # training checkpoints exist for trained epochs
        assert (project / f"repository/checkpoints/weights_epoch_{e}.pth").exists()
    submissions = (project / "repository/submission_accuracy.csv").read_text().splitlines()
    assert len(submissions) == 1 + len(epochs)
    retrieval = json.loads((project / "repository/metrics/retrieval.json").read_text())
    assert sorted(retrieval["epochs"]) == ["0", "1", "2"]
    # Every metric name that README.md and docs/ quote is one this run wrote.
    written = shown_metric_names(json.loads(dvc(project, "metrics", "show", "--json")))
    assert {name: pages for name, pages in quoted_metric_names().items()
            if generic(name) not in written} == {}

    # The best epoch: the highest val score of training_metrics.csv (ties: the earliest), its
    # model file and results copied, its val and test metrics in the summary; the report names it.
    best = val_picked(project)
    summary = json.loads((project / "repository/best/summary.json").read_text())
    assert summary["epoch"] == best and summary["test"] == retrieval["epochs"][str(best)]
    assert digest(project / "repository/best/model.pt") == \
        digest(project / f"repository/all_weights/model_epoch_{best}.pt")
    assert f'<b id="best-epoch">{best}</b>' in (project / "repository/report.html").read_text()

    # Scored locally: no server asked, no submission history (it is the user's, outside the
    # repository: docs/submission.md).
    assert not (project / "repository/submission_history.csv").exists()

    # 2. Nothing changed: nothing runs.
    assert stages_run(dvc(project, "repro")) == []
    assert "up to date" in dvc(project, "status")

    git(project, "add", "-A")
    git(project, "commit", "-qm", "run: 2 epochs")
    weights_2 = digest(project / "repository/all_weights/model_epoch_2.pt")

    # 3. A retrieve param reruns retrieve and the stages after it (submit, best, report) only; a
    # report param the report alone (no retraining); a train param reruns train onwards.
    # Every edit of params.yaml is checked first (check_params), and reruns nothing else for it.
    set_params(project, {"retrieve.top_k": 20})
    assert stages_run(dvc(project, "repro")) == ["check_params", "retrieve", "submit", "best",
                                                 "report"]
    set_params(project, {"report.worst_queries": 3})
    assert stages_run(dvc(project, "repro")) == ["check_params", "report"]
    set_params(project, {"retrieve.top_k": 10, "train.epochs": 3})
    assert stages_run(dvc(project, "repro")) == ["check_params", "train", "embed", "retrieve",
                                                 "submit", "best", "report"]
    git(project, "add", "-A")
    git(project, "commit", "-qm", "run: 3 epochs")

    # 4. An experiment from the committed baseline, compared with dvc metrics diff / exp show.
    exp = dvc(project, "exp", "run", "-S", "train.freeze_backbone=false")
    assert "train" in stages_run(exp)
    # The experiment's report names what it changed against the committed params.
    assert 'data-key="train.freeze_backbone"' in (project / "repository/report.html").read_text()
    diff = json.loads(dvc(project, "metrics", "diff", "--json"))
    retrieval_diff = diff["repository/metrics/retrieval.json"]
    assert "epochs.3.score" in retrieval_diff
    assert "old" in retrieval_diff["epochs.3.score"] and "new" in retrieval_diff["epochs.3.score"]
    show = json.loads(dvc(project, "exp", "show", "--json"))
    baseline = next((row for row in show if row.get("experiments")), None)
    assert baseline, "dvc exp show lists no experiment"
    experiment = baseline["experiments"][0]["revs"][0]
    for row, frozen in [(baseline, True), (experiment, False)]:
        data = row["data"]
        assert data["params"]["params.yaml"]["data"]["train"]["freeze_backbone"] is frozen
        scores = data["metrics"]["repository/metrics/retrieval.json"]["data"]["epochs"]
        assert sorted(scores) == ["0", "1", "2", "3"]  # accuracy by epoch for both runs
    # The README's narrow views: chosen columns, one metrics file.
    narrow = dvc(project, "exp", "show", "--md", "--drop", ".*", "--keep",
                 r"Experiment|train\.freeze_backbone|^epochs\.[0-9]+$")
    assert sorted(md_columns(narrow)) == ["Experiment", "epochs.0", "epochs.1", "epochs.2",
                                          "epochs.3", "train.freeze_backbone"]
    assert "epochs.3" in md_columns(dvc(project, "metrics", "show", "--md",
                                        "repository/metrics/submission.json"))
    git(project, "checkout", "--", ".")  # back to the committed baseline
    dvc(project, "checkout", "--force")

    # 4b. Resuming the baseline's checkpoints with another lr stops, naming the key, and keeps
    # them (before, it recorded the new lr and delivered the old model).
    kept = {p: digest(p) for p in (project / "repository/checkpoints").iterdir()}
    failed = dvc(project, "exp", "run", "-S", "train.lr=0.5", "-S", "train.resume=true",
                 fails=True)
    assert "error: repository/checkpoints/weights_epoch_3.pth: made with train.lr=" in failed
    assert {p: digest(p) for p in (project / "repository/checkpoints").iterdir()} == kept
    git(project, "checkout", "--", ".")
    dvc(project, "checkout", "--force")

    # 5. Versioned data and checkpoints: push, pull in a fresh clone, checkout an older commit.
    dvc(project, "remote", "add", "-d", "local", str(remote))
    git(project, "commit", "-qam", "local DVC remote")
    dvc(project, "push", "--all-commits")
    # The best model as a registered artifact version (an annotated GTO tag, what
    # `gto register best-model` writes), fetched from a second clone through the DVC remote.
    git(project, "tag", "-a", "best-model@v1.0.0", "-m", "val-picked model of the 3-epoch run")
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(project), str(clone))
    shown = artifacts_show("best-model", repo=str(clone))
    assert shown == {"rev": git(clone, "rev-parse", "HEAD").strip(), "path": "repository/best"}
    dvc(tmp_path, "artifacts", "get", str(clone), "best-model", "-o", str(tmp_path / "fetched"))
    fetched = tmp_path / "fetched"
    assert sorted(p.name for p in fetched.iterdir()) == ["model.pt", "retrieval_results.json",
                                                         "summary.json"]
    assert digest(fetched / "model.pt") == digest(project / "repository/best/model.pt")
    assert json.loads((fetched / "summary.json").read_text())["epoch"] == val_picked(project)
    assert load_model(fetched / "model.pt").embed_dim == 512  # a working model file
    dvc(clone, "pull")
    for name in ["data/demo/test_labels.csv", "data/prepared/train.csv",
                 "repository/all_weights/model_epoch_3.pt",
                 "repository/checkpoints/weights_epoch_3.pth",
                 "repository/results/retrieval_results_epoch_3.json"]:
        assert (clone / name).exists(), name
    assert "up to date" in dvc(clone, "status")
    assert stages_run(dvc(clone, "repro")) == []
    git(project, "checkout", "-q", "HEAD~2")  # the 2-epoch run, from the project's DVC cache
    dvc(project, "checkout", "--force")
    assert digest(project / "repository/all_weights/model_epoch_2.pt") == weights_2
    assert not (project / "repository/all_weights/model_epoch_3.pt").exists()
    assert not (project / "repository/checkpoints/weights_epoch_3.pth").exists()
