"""The DVC experiments that `python -m clipcore.report.compare` compares, read from
`dvc exp show --json` and each experiment's git commit, and HEAD's params.yaml beside them.

Not every param makes a different configuration: RUN_ONLY keys change how a run goes or where
its scores are sent, not what it ranks (two runs apart only in them are the same recipe).
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from clipcore import paths
from clipcore.errors import ClipcoreError
from clipcore.params import dotted
from clipcore.report.best import pick, read_training_metrics

SEED = "seed"
FINISHED = (None, "success")  # executor states of a finished experiment (None: run in place)
TRAIN_METRICS = "repository/metrics/train/metrics.json"
# Dotted keys (or their prefixes) that change no ranking: the server and the report, the
# pictures, loader workers, resuming and how many checkpoints stay.
RUN_ONLY = ("submit.", "report.", "retrieve.picture_queries", "train.num_workers",
            "embed.num_workers", "train.resume", "train.keep_checkpoints")


@dataclass(frozen=True)
class Experiment:
    name: str
    baseline: str             # the commit it hangs off (short hash)
    params: dict              # flat dotted keys, seed included
    val: dict                 # val metrics at the picked epoch, "epoch" included
    test: dict | None         # test metrics at that epoch; None: no test labels
    picked: bool              # False: training_metrics.csv unreadable, the last epoch shown


def is_recipe(key: str) -> bool:
    """Whether a dotted params key can change what a run ranks (RUN_ONLY: it cannot)."""
    return not key.startswith(RUN_ONLY)


def exp_show(repo: Path, all_commits: bool = False) -> list:
    command = [sys.executable, "-m", "dvc", "exp", "show", "--json"]
    done = subprocess.run(command + ["--all-commits"] * all_commits, cwd=repo,
                          capture_output=True, text=True)
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise ClipcoreError(f"dvc exp show --json failed in {repo}: {last}")
    return json.loads(done.stdout)


def finished(show: list) -> list[tuple[str, dict, dict]]:
    """(baseline short hash, experiment entry, its run) of every finished experiment."""
    return [(baseline.get("rev", "")[:7], experiment, experiment["revs"][0])
            for baseline in show for experiment in baseline.get("experiments") or []
            if _is_finished(experiment)]


def read_experiments(show: list, repo: Path) -> tuple[list[Experiment], list[str]]:
    """The finished experiments of `dvc exp show --json` output, and a line for each one left
    out (queued, running, failed)."""
    skipped = [f"{_name(experiment)}: {_state(experiment) or 'error'}, left out"
               for baseline in show for experiment in baseline.get("experiments") or []
               if not _is_finished(experiment)]
    found = [_experiment(_name(experiment), baseline, run["rev"], run["data"], repo)
             for baseline, experiment, run in finished(show)]
    return found, skipped


def head_params(repo: Path) -> dict | None:
    """HEAD's params.yaml as flat dotted keys; None when HEAD has none (or no commit)."""
    done = subprocess.run(["git", "show", "HEAD:./params.yaml"], cwd=repo, capture_output=True,
                          text=True)
    if done.returncode:
        return None
    try:
        return dotted(yaml.safe_load(done.stdout) or {})
    except yaml.YAMLError as exc:
        raise ClipcoreError(f"HEAD:params.yaml in {repo}: not YAML ({exc})") from None


def _is_finished(experiment: dict) -> bool:
    run = experiment["revs"][0]
    return _state(experiment) in FINISHED and not run.get("error") and bool(run.get("data"))


def _state(experiment: dict) -> str | None:
    return (experiment.get("executor") or {}).get("state")


def _name(experiment: dict) -> str:
    return experiment.get("name") or experiment["revs"][0]["rev"][:7]


def _experiment(name: str, baseline: str, rev: str, data: dict, repo: Path) -> Experiment:
    params = {}
    for file, content in data["params"].items():
        prefix = "" if file == "params.yaml" else f"{file}:"
        params.update(dotted(content.get("data", {}), prefix))
    metrics = {path: content.get("data") for path, content in data["metrics"].items()}
    retrieval = metrics.get(str(paths.RETRIEVAL_METRICS)) or {}
    test_by_epoch = {int(epoch): values for epoch, values in retrieval.get("epochs", {}).items()}
    rows = _training_rows(repo, rev)
    if rows is not None:
        val = next(row for row in rows if row["epoch"] == pick(rows).epoch)
    else:  # what exp show has: the last epoch's dvclive metrics
        last = metrics.get(TRAIN_METRICS) or {}
        val = {**last, "epoch": last.get("step", math.nan)}
    return Experiment(name, baseline, params, val, test_by_epoch.get(val["epoch"]),
                      picked=rows is not None)


def _training_rows(repo: Path, rev: str) -> list[dict] | None:
    """training_metrics.csv of an experiment's commit (a `cache: false` output: git holds it)."""
    done = subprocess.run(["git", "show", f"{rev}:./{paths.TRAINING_METRICS_CSV}"], cwd=repo,
                          capture_output=True, text=True)
    if done.returncode:
        return None
    with tempfile.TemporaryDirectory() as folder:
        table = Path(folder) / paths.TRAINING_METRICS_CSV.name
        table.write_text(done.stdout, encoding="utf-8")
        return read_training_metrics(table)
