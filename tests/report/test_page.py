"""The best stage (the val-picked epoch in repository/best/) and the report stage (one
self-contained HTML page), on a hand-made run whose answers are worked out by hand: metrics
written by the train and retrieve stages' own writers, real image files, real manifests."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml
from conftest import default_params_dict, with_overrides, write_params
from PIL import Image

from clipcore import paths
from clipcore.errors import ClipcoreError
from clipcore.ranking.measures import metrics_for_names
from clipcore.report.best import RULE_NO_VAL, RULE_VAL, pick, write_best
from clipcore.report.page import write_report
from clipcore.retrieve.retrieval import write_metrics
from clipcore.train.run_files import METRIC_COLUMNS, write_metrics_csv

REPO = Path(__file__).resolve().parents[2]
QUERIES = {"q0.png": "A", "q1.png": "A", "q2.png": "B", "q3.png": "C", "q4.png": "A"}
GALLERY = {"g0.png": "A", "g1.png": "A", "g2.png": "B", "g3.png": "B", "g4.png": "C",
           "g5.png": "C"}
# Epoch 1, the val-picked one. First right match / right matches, worked out by hand:
#   q0 A: B C A -> rank 3, 1 | q1 A: A A B -> 1, 2 | q2 B: C C A -> none, 0
#   q3 C: B C C -> 2, 2      | q4 A: B A A -> 2, 2
# Most wrong first: q2 (none), q0 (rank 3), q3 and q4 (rank 2, 2 hits: results order), q1.
# First matches of another class: A -> B twice (q0, q4), B -> C (q2), C -> B (q3).
BEST_RANKING = {"q0.png": ["g2.png", "g4.png", "g0.png"], "q1.png": ["g0.png", "g1.png", "g2.png"],
                "q2.png": ["g4.png", "g5.png", "g0.png"], "q3.png": ["g2.png", "g4.png", "g5.png"],
                "q4.png": ["g3.png", "g0.png", "g1.png"]}
PERFECT = {"q0.png": ["g0.png", "g1.png", "g2.png"], "q1.png": ["g1.png", "g0.png", "g2.png"],
           "q2.png": ["g2.png", "g3.png", "g0.png"], "q3.png": ["g4.png", "g5.png", "g0.png"],
           "q4.png": ["g0.png", "g1.png", "g3.png"]}
RANKINGS = {0: BEST_RANKING, 1: BEST_RANKING, 2: PERFECT, 3: BEST_RANKING}
# Val scores: epochs 1 and 2 tie at the top, so the earlier (1) is picked, although epoch 2 is
# perfect on the test split: test labels never pick.
VAL_SCORES = {0: 400.0, 1: 700.0, 2: 700.0, 3: 650.0}
WORST_ORDER = ["q2.png", "q0.png", "q3.png", "q4.png", "q1.png"]
CONFUSIONS = [("A|B", 2), ("B|C", 1), ("C|B", 1)]


def metric_row(epoch: int, score: float) -> dict:
    row = {column: 0.25 + epoch / 10 for column in METRIC_COLUMNS}
    return {**row, "epoch": epoch, "score": score, "top1": score / 1000,
            "train_loss": math.nan if epoch == 0 else 2.0 - epoch / 4}


def write_run(root: Path, labelled: bool = True, val_scores: dict = VAL_SCORES) -> None:
    """What the stages before `best` leave: manifests, test images, model files, results,
    training_metrics.csv and retrieval.json (by the train and retrieve stages' writers)."""
    colours = {"A": (200, 30, 30), "B": (30, 200, 30), "C": (30, 30, 200)}
    for split, names in (("query", QUERIES), ("gallery", GALLERY)):
        rows = ["path,label,caption"]
        for name, label in names.items():
            image = root / "data" / "root" / "test" / split / name
            image.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (40, 30), colours[label]).save(image)
            rows.append(f"test/{split}/{name},{label if labelled else ''},")
        (paths.PREPARED).mkdir(parents=True, exist_ok=True)
        (paths.PREPARED / f"{split}.csv").write_text("\n".join(rows) + "\n")
    (paths.PREPARED / "train.csv").write_text("path,label,caption\ntrain/A/a.png,A,a photo\n")
    paths.ALL_WEIGHTS.mkdir(parents=True)
    for epoch, ranking in RANKINGS.items():
        paths.model_path(epoch).write_bytes(f"model file of epoch {epoch}".encode())
        paths.results_path(epoch).parent.mkdir(parents=True, exist_ok=True)
        paths.results_path(epoch).write_text(json.dumps(ranking))
    write_metrics_csv([metric_row(e, s) for e, s in val_scores.items()],
                      paths.TRAINING_METRICS_CSV)
    test = {e: metrics_for_names(r, QUERIES, GALLERY) for e, r in RANKINGS.items()}
    write_metrics(test if labelled else {}, 2 if labelled else None)


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    write_run(tmp_path)
    return tmp_path


class Page(HTMLParser):
    """The parsed report: every start tag with its attributes, and the visible text."""

    def __init__(self, text: str):
        super().__init__()
        self.tags, self.text = [], []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)

    def find(self, tag: str, **attrs) -> list[dict]:
        return [a for t, a in self.tags if t == tag
                and all(a.get(k.replace("_", "-")) == v for k, v in attrs.items())]

    def having(self, tag: str, attr: str) -> list[dict]:
        return [a for t, a in self.tags if t == tag and attr in a]


def test_val_score_picks_ties_go_to_the_earliest_and_no_val_takes_the_last():
    rows = [{"epoch": e, "score": s} for e, s in [(0, 300.0), (1, math.nan), (2, 500.0),
                                                  (3, 500.0), (4, 420.0)]]
    assert pick(rows).epoch == 2 and pick(rows).rule == RULE_VAL
    no_val = [{"epoch": e, "score": math.nan} for e in range(4)]
    assert pick(no_val).epoch == 3 and pick(no_val).rule == RULE_NO_VAL


def test_best_holds_the_val_picked_model_results_and_what_made_them(project, params_factory):
    params = params_factory({"train.lr": 0.5})
    summary = write_best(params)
    assert summary == json.loads(paths.BEST_SUMMARY.read_text())
    assert summary["epoch"] == 1 and summary["picked_by"] == RULE_VAL
    assert paths.BEST_MODEL.read_bytes() == paths.model_path(1).read_bytes()
    assert json.loads(paths.BEST_RESULTS.read_text()) == BEST_RANKING
    assert summary["val"]["score"] == 700.0 and summary["val"]["val_loss"] == pytest.approx(0.35)
    retrieval = json.loads(paths.RETRIEVAL_METRICS.read_text())
    assert retrieval["best_on_test"]["epoch"] == 2  # the test-picked epoch is another one
    assert summary["test"] == retrieval["epochs"]["1"]
    assert summary["params"]["train"]["lr"] == 0.5 and summary["params"]["seed"] == 42
    assert set(summary["params"]) == {"seed", "data", "model", "train", "loss", "embed",
                                      "retrieve"}
    assert set(summary["data"]["manifests_sha256"]) == {"gallery.csv", "query.csv", "train.csv"}


def test_without_val_metrics_the_last_epoch_is_kept_and_the_summary_says_so(
        tmp_path, monkeypatch, params_factory):
    monkeypatch.chdir(tmp_path)
    write_run(tmp_path, val_scores={e: math.nan for e in RANKINGS})
    summary = write_best(params_factory())
    assert summary["epoch"] == 3 and summary["picked_by"] == RULE_NO_VAL
    assert summary["val"]["score"] is None  # no NaN in JSON


def test_a_missing_model_file_is_named_and_the_previous_best_kept(project, params_factory):
    write_best(params_factory())
    before = {p.name: p.read_bytes() for p in paths.BEST.iterdir()}
    paths.model_path(1).unlink()
    with pytest.raises(ClipcoreError, match=r"model_epoch_1\.pt: not found for the best epoch 1 "
                                            r"\(run `dvc repro train`\)"):
        write_best(params_factory())
    assert {p.name: p.read_bytes() for p in paths.BEST.iterdir()} == before


def test_report_shows_the_metrics_files_best_epoch_mistakes_and_changed_params(
        project, params_factory):
    params = params_factory({"train.lr": 0.5, "report.worst_queries": 4})
    write_best(params)
    committed = default_params_dict()
    committed["train"]["weight_decay"] = "1e-1"  # PyYAML reads `1e-1` as a string; stages: 0.1
    write_report(params.report, project / "data" / "root", committed=("abc1234", committed))
    text = paths.REPORT.read_text()
    page = Page(text)
    assert len(text) < 60_000  # 5 queries: thumbnails of 64 px, a few kB each

    # Self-contained: no script, no stylesheet link, every image inline.
    assert not [t for t, _ in page.tags if t in {"script", "link", "iframe", "object"}]
    sources = [a["src"] for a in page.having("img", "src")]
    assert sources and all(s.startswith("data:image/") for s in sources)

    # Charts: one point per epoch and series, valued as in the metrics files; best marked.
    test = {int(e): m for e, m in json.loads(paths.RETRIEVAL_METRICS.read_text())["epochs"].items()}
    for series, expected in [("val score", VAL_SCORES),
                             ("test score", {e: m["score"] for e, m in test.items()}),
                             ("test top-1", {e: m["top1"] for e, m in test.items()})]:
        points = {int(a["data-epoch"]): float(a["data-value"])
                  for a in page.find("circle", data_series=series)}
        assert points == pytest.approx(expected), series
    train_loss = page.find("circle", data_series="train loss")
    assert {int(a["data-epoch"]) for a in train_loss} == {1, 2, 3}  # epoch 0 trains nothing
    assert [a["data-best-epoch"] for a in page.having("line", "data-best-epoch")] == ["1"] * 3
    assert [a["data-epoch"] for a in page.find("tr", **{"class": "best"})] == ["1"]
    assert "Best epoch" in "".join(page.text) and "<b id=\"best-epoch\">1</b>" in text

    # The worst queries of epoch 1, most wrong first, frames right/wrong by class.
    rows = page.having("div", "data-query")
    assert [r["data-query"] for r in rows] == WORST_ORDER[:4]
    assert [r["data-first-right"] for r in rows] == ["", "3", "2", "2"]
    kinds = [a["class"].split()[1] for a in page.find("img") if "tile" in a.get("class", "")]
    assert kinds[:8] == ["query", "wrong", "wrong", "wrong", "query", "wrong", "wrong", "right"]
    assert "4 of 5 queries have a wrong first match; 1 have no right match" in text
    assert [(a["data-pair"], int(a["data-count"])) for a in page.having("tr", "data-pair")] \
        == CONFUSIONS

    # Params: only train.lr differs from the committed file (its "1e-1" is this run's 0.1 once
    # read as the stages read it; report.* is not part of what made the model).
    assert [a["data-key"] for a in page.having("tr", "data-key")] == ["train.lr"]
    assert "abc1234" in text


def test_report_without_test_labels_says_so_and_keeps_the_val_side(
        tmp_path, monkeypatch, params_factory):
    monkeypatch.chdir(tmp_path)
    write_run(tmp_path, labelled=False)
    params = params_factory()
    write_best(params)
    write_report(params.report, tmp_path / "data" / "root", committed=None)
    text = paths.REPORT.read_text()
    page = Page(text)
    assert "test labels unknown" in text and "The test labels are unknown here" in text
    assert not page.find("circle", data_series="test score")
    assert len(page.find("circle", data_series="val score")) == 4
    assert not page.having("div", "data-query") and "No committed params.yaml" in text


def test_stale_best_results_are_named_and_the_report_kept(project, params_factory):
    params = params_factory()
    write_best(params)
    write_report(params.report, project / "data" / "root")
    before = paths.REPORT.read_bytes()
    paths.BEST_RESULTS.write_text(json.dumps({**BEST_RANKING, "q9.png": ["g0.png"]}))
    with pytest.raises(ClipcoreError, match=r"retrieval_results\.json: q9\.png is in no manifest "
                                            r"of data/prepared \(stale results: run `dvc repro`\)"):
        write_report(params.report, project / "data" / "root")
    assert paths.REPORT.read_bytes() == before


def test_a_negative_worst_queries_names_the_param(params_factory):
    with pytest.raises(ClipcoreError, match=r"'report\.worst_queries' must be >= 0, got -1"):
        params_factory({"report.worst_queries": -1})


def stage(name: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", f"stages.{name}"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_stages_compare_with_the_params_committed_in_git(project):
    write_params(project, {"data.root": "data/root"})
    for args in (["init", "-q"], ["add", "params.yaml"],
                 ["-c", "user.name=t", "-c", "user.email=t@t.invalid", "commit", "-qm", "p"]):
        subprocess.run(["git", *args], cwd=project, check=True)
    raw = yaml.safe_load((project / "params.yaml").read_text())
    (project / "params.yaml").write_text(yaml.safe_dump(
        with_overrides(raw, {"retrieve.metric": "euclidean"}), sort_keys=False))
    done = stage("best", project)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("best epoch 1 (highest val score")
    done = stage("report", project)
    assert done.returncode == 0, done.stderr
    assert "wrote repository/report.html" in done.stdout
    page = Page(paths.REPORT.read_text())
    assert [a["data-key"] for a in page.having("tr", "data-key")] == ["retrieve.metric"]
    assert len(page.having("div", "data-query")) == len(QUERIES)  # 12 asked, 5 exist

    paths.TRAINING_METRICS_CSV.unlink()
    done = stage("best", project)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip() == (f"error: {paths.TRAINING_METRICS_CSV}: not found "
                                   f"(run `dvc repro train`)")


def test_a_query_listed_as_a_match_is_named(project, params_factory):
    """Before: KeyError: 'q1.png' (the page looked the match up among the gallery's labels)."""
    params = params_factory()
    write_best(params)
    paths.BEST_RESULTS.write_text(json.dumps({**BEST_RANKING, "q0.png": ["q1.png", "g0.png"]}))
    with pytest.raises(ClipcoreError, match=r"retrieval_results\.json: q1\.png, a query, is listed "
                                            r"as a match of q0\.png; matches are gallery images"):
        write_report(params.report, project / "data" / "root")
