"""`python -m clipcore.report.compare` where a user meets it after some work: experiments hanging
off an earlier commit, a committed `submit.url`, a seed run again, an uncommitted params change
that queued runs took with them, and mAP@k at different k. Real `dvc exp run --queue` runs of the
tiny model in a temporary git repo:

    commit 1 (the tests' params)            E1: seed 1
    commit 2 (+ submit.url), HEAD           E2: seed 1, E3: seed 2,
                                            E4: seed 2 queued with retrieve.top_k 20 uncommitted
"""
from __future__ import annotations

import re
import sys

import pytest
from dvc_project import dvc, git, new_project, run, set_params
from test_compare import SWEEP, tables

URL = "http://127.0.0.1:9/"
pytestmark = pytest.mark.timeout(900)  # real dvc runs: minutes on a busy 2-core machine


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
