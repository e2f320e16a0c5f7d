"""`python -m clipcore.report.compare` on real experiment output: a sweep of 2 configurations x 2 seeds
of the tiny model queued with `dvc exp run --queue` in a temporary git repo and run with
`dvc exp run --run-all`; the numbers it prints are checked against each experiment's own files
in its git commit; and a second repo of two commits where a user meets it after some work."""
from __future__ import annotations

import csv
import io
import json
import math
import re
import statistics
import subprocess
import sys

import pytest
import yaml
from conftest import REPO
from dvc_project import SMOKE, dvc, git, new_project, run, set_params
from scipy import stats

from clipcore.report.compare import mean_ci
from clipcore.report.experiments import exp_show

# One epoch, the smallest demo images, no pictures: the stages up to retrieve are what compare reads.
SWEEP = {**SMOKE, "train.epochs": 1, "demo.image_size": 8, "retrieve.picture_queries": 0}
HEADS = ("mlp", "residual")  # configurations whose epoch 0 differs too

pytestmark = pytest.mark.timeout(900)  # real dvc runs: minutes on a busy 2-core machine


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = new_project(tmp_path_factory.mktemp("sweep"), SWEEP)
    dvc(root, "exp", "run", "retrieve", "--queue", "-S", "seed=1,2", "-S",
        f"model.head={','.join(HEADS)}")
    dvc(root, "exp", "run", "--run-all")
    return root


def expected_rows(root) -> dict[str, list[dict]]:
    """Per head kind, each experiment's val score and test score at its val-picked epoch, read from the
    files its commit holds (not from dvc exp show)."""
    by_head: dict[str, list[dict]] = {}
    for rev in git(root, "for-each-ref", "--format=%(objectname)", "refs/exps").split():
        params = yaml.safe_load(git(root, "show", f"{rev}:params.yaml"))
        rows = list(csv.DictReader(io.StringIO(
            git(root, "show", f"{rev}:repository/metrics/training_metrics.csv"))))
        best = max(rows, key=lambda row: (float(row["score"]), -int(row["epoch"])))
        test = json.loads(git(root, "show", f"{rev}:repository/metrics/retrieval.json"))
        by_head.setdefault(params["model"]["head"], []).append(
            {"seed": params["seed"], "epoch": int(best["epoch"]), "val": float(best["score"]),
             "test": test["epochs"][best["epoch"]]["score"]})
    return by_head


def tables(lines: list[str]) -> list[dict[str, list[str]]]:
    """The printed tables (blocks between blank lines), each as {row label: cells}."""
    blocks = "\n".join(lines).split("\n\n")
    return [{cells[0]: cells[1:] for cells in (re.split(r"\s{2,}", line.strip())
                                               for line in block.splitlines())}
            for block in blocks[1:-1]]


def interval(values: list[float]) -> str:
    half = stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return f"{statistics.fmean(values):.1f} ± {half:.1f}"


def test_compare_prints_each_configurations_mean_and_t_interval(sweep):
    out = run(sweep, sys.executable, "-m", "clipcore.report.compare")
    expected = expected_rows(sweep)
    assert sorted(expected) == sorted(HEADS) and all(len(v) == 2 for v in expected.values())
    assert "4 experiments, 2 configuration(s) differing in model.head:" in out
    lines = out.splitlines()
    names = {}
    for head in HEADS:
        line = next(line for line in lines if line.endswith(f"model.head={head}"))
        assert "(n=2; seeds 1, 2):" in line
        names[head] = line.split()[0]
    table = tables(lines)[0]
    columns = table["mean ± 95% CI"]
    for head in HEADS:
        column = columns.index(names[head])
        for label, key in (("val score", "val"), ("test score", "test")):
            assert table[label][column] == interval([row[key] for row in expected[head]])
        epochs = [row["epoch"] for row in expected[head]]
        assert table["val-picked epoch"][column].startswith(f"{statistics.fmean(epochs):.1f} ± ")


def test_the_other_configuration_is_compared_with_a_seed_by_seed(sweep):
    """What a user deciding between two recipes needs: the difference on the same seeds (the
    same split and init), with its interval, from each experiment's own files."""
    out = run(sweep, sys.executable, "-m", "clipcore.report.compare")
    expected = expected_rows(sweep)
    lines = out.splitlines()
    names = {head: next(line for line in lines if line.endswith(f"model.head={head}")).split()[0]
             for head in HEADS}
    reference = next(head for head in HEADS if names[head] == "A")
    other = next(head for head in HEADS if head != reference)
    assert names[other] == "B"
    table = tables(lines)[1]
    assert table["minus A, by seed"] == ["B"]
    for label, key in (("val score", "val"), ("test score", "test")):
        by_seed = {head: {row["seed"]: row[key] for row in expected[head]} for head in HEADS}
        differences = [by_seed[other][seed] - by_seed[reference][seed] for seed in (1, 2)]
        half = (stats.t.ppf(0.975, 1) * statistics.stdev(differences)
                / math.sqrt(len(differences)))
        assert table[label] == [f"{statistics.fmean(differences):+.1f} ± {half:.1f} (n=2)"]


def test_one_seed_gives_no_interval_and_unfinished_runs_are_named(sweep, tmp_path):
    dvc(sweep, "exp", "run", "--queue", "-S", "seed=3", "--name", "still-queued")
    show = exp_show(sweep)
    baseline = next(entry for entry in show if entry.get("experiments"))
    mlp = [e for e in baseline["experiments"] if e["name"] != "still-queued"
           and e["revs"][0]["data"]["params"]["params.yaml"]["data"]["model"]["head"] == "mlp"]
    baseline["experiments"].remove(mlp[0])  # that configuration keeps one seed
    saved = tmp_path / "exps.json"
    saved.write_text(json.dumps(show))
    out = run(sweep, sys.executable, "-m", "clipcore.report.compare", "--show-json", str(saved))
    assert "3 experiments" in out
    assert re.search(r"\(n=1; seeds \d\): model\.head=mlp\n", out)
    assert "(n=1)" in out and "n=1: no interval" in out
    assert "still-queued: queued, left out" in out


def test_mean_ci_is_the_student_t_interval():
    mean, half = mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    assert mean_ci([5.0]) == (5.0, None)


def test_outside_a_dvc_project_or_with_a_bad_file_it_stops_with_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "clipcore.report.compare", "--repo", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr.startswith(f"error: dvc exp show --json failed in {tmp_path}: ")
    assert len(done.stderr.strip().splitlines()) == 1
    (tmp_path / "exps.json").write_text("not json")
    done = subprocess.run([sys.executable, "-m", "clipcore.report.compare", "--show-json",
                           str(tmp_path / "exps.json")], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr.startswith(f"error: {tmp_path / 'exps.json'}: cannot read dvc exp show")


# Where a user meets compare after some work: experiments hanging off an earlier commit, a
# committed `submit.url`, a seed run again, an uncommitted params change that queued runs took
# with them, and mAP@k at different k. Real `dvc exp run --queue` runs:
#     commit 1 (the tests' params)            E1: seed 1
#     commit 2 (+ submit.url), HEAD           E2: seed 1, E3: seed 2,
#                                             E4: seed 2 queued with retrieve.top_k 20 uncommitted
URL = "http://127.0.0.1:9/"


def compare(root, *args: str) -> str:
    return run(root, sys.executable, "-m", "clipcore.report.compare", *args)


@pytest.fixture(scope="module")
def commits(tmp_path_factory):
    root = new_project(tmp_path_factory.mktemp("commits"), SWEEP)
    dvc(root, "exp", "run", "retrieve", "--queue", "-S", "seed=1")
    dvc(root, "exp", "run", "--run-all")
    set_params(root, {"submit.url": URL})
    git(root, "commit", "-qam", "the server's address")
    before = compare(root)  # E1 hangs off the first commit now
    for seed in (1, 2):
        dvc(root, "exp", "run", "retrieve", "--queue", "-S", f"seed={seed}")
    set_params(root, {"retrieve.top_k": 20})  # not committed: the next queued run takes it
    dvc(root, "exp", "run", "retrieve", "--queue", "-S", "seed=2")
    set_params(root, {"retrieve.top_k": 10})
    dvc(root, "exp", "run", "--run-all")
    return root, before


def test_experiments_of_an_earlier_commit_are_pointed_to(commits):
    _, before = commits
    assert "no finished experiments" in before
    assert "1 finished experiment(s) of earlier commits left out: add -A" in before


def test_across_commits_the_server_address_is_no_configuration_and_a_seed_counts_once(commits):
    root, _ = commits
    out = compare(root, "-A")
    head, first = (git(root, "rev-parse", "--short=7", rev).strip() for rev in ("HEAD", "HEAD~1"))
    assert (f"3 experiments (of 2 commits: {', '.join(sorted([head, first]))}), 2 configuration(s)"
            f" differing in retrieve.top_k:") in out
    assert re.search(r"A \(n=2; seeds 1, 2\): retrieve\.top_k=10\n", out)
    assert re.search(r"B \(n=1; seeds 2\): retrieve\.top_k=20\n", out)
    assert "not counted as configurations (they change no ranking): submit.url" in out
    assert re.search(r"seed 1 ran 2 times with the same params \(\S+, \S+\): counted once", out)


def test_the_header_names_every_param_that_differs_from_head(commits):
    root, _ = commits
    out = compare(root)
    assert "3 experiments, 2 configuration(s) differing in retrieve.top_k:" in out
    assert "params that differ from HEAD's params.yaml (queued runs take the workspace's" in out
    assert "  retrieve.top_k: 20 in 1 of 3 (HEAD: 10)\n" in out
    assert "submit.url" not in out  # every run here had HEAD's
    assert '  submit.url: "" in 1 of 4 (HEAD: "http://127.0.0.1:9/")' in compare(root, "-A")


def test_map_at_different_k_carries_its_k(commits):
    root, _ = commits
    lines = compare(root).splitlines()
    table = tables(lines)[0]
    test_map = table["test map@k"]
    assert [cell.rsplit(" ", 1)[-1] for cell in test_map] == ["@10", "@20"]
    assert not any("@" in cell for cell in table["val map@k"])  # train.val_top_k: the same
    assert any(line.startswith("@N: the k of that mAP@k") for line in lines)
