"""The local competition scorer: a real HTTP server on 127.0.0.1 scoring the demo's test set."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import requests

from clipcore.errors import ClipcoreError
from clipcore.ranking.measures import metrics_for_names
from clipcore.submit.scorer import GroundTruth, make_server, read_labels, score_ranking
from clipcore.submit.submission import local_labels

REPO = Path(__file__).parents[2]


def random_ranking(truth: GroundTruth, seed: int = 0) -> dict[str, list[str]]:
    """Ten distinct gallery names per query in a seeded random order: some hits, many misses."""
    rng = np.random.default_rng(seed)
    gallery = sorted(truth.gallery)
    return {query: [gallery[i] for i in rng.permutation(len(gallery))[:10]]
            for query in sorted(truth.query)}


@pytest.fixture(scope="module")
def truth(prepared_demo) -> GroundTruth:
    root, _ = prepared_demo
    return read_labels(root / "test_labels.csv")


@pytest.fixture(scope="module")
def scorer_url(truth):
    server = make_server(truth, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()
    thread.join()


def test_both_body_styles_score_like_the_shared_measure_and_local_scoring(
        truth, scorer_url, prepared_demo):
    ranking = random_ranking(truth)
    body = {"groupname": "team", "images": ranking}
    expected = metrics_for_names(ranking, truth.query, truth.gallery)["score"]
    as_json = requests.post(scorer_url, json=body, timeout=10)
    as_raw_string = requests.post(scorer_url, json.dumps(body), timeout=10)  # no content type
    assert "json" not in as_raw_string.request.headers.get("Content-Type", "")
    for answer in (as_json, as_raw_string):
        assert answer.status_code == 200
        assert answer.json()["accuracy"] == pytest.approx(expected)
    # The manifests' labels (local scoring) and test_labels.csv (the scorer) tell one story.
    assert score_ranking(ranking, local_labels(prepared_demo[1])) == pytest.approx(expected)
    assert 0 < expected < 1000


def _without(mapping: dict, key: str) -> dict:
    return {k: v for k, v in mapping.items() if k != key}


def _first_query(images: dict, names: list) -> dict:
    first = next(iter(images))
    return {**images, first: names}


@pytest.mark.parametrize("break_body, reason", [
    (lambda body, g: b"{not json", "not valid JSON"),
    (lambda body, g: [body], "must be a JSON object"),
    (lambda body, g: _without(body, "groupname"), "groupname missing"),
    (lambda body, g: _without(body, "images"), "images missing"),
    (lambda body, g: {**body, "images": {**body["images"], "stranger.png": g[:10]}},
     "unknown query names: stranger.png"),
    (lambda body, g: {**body, "images": _first_query(body["images"], g[:11])},
     "expected 1 to 10 gallery names, got 11"),
    (lambda body, g: {**body, "images": _first_query(body["images"], [])},
     "expected 1 to 10 gallery names, got 0"),
    (lambda body, g: {**body, "images": _first_query(body["images"], g[:9] + ["nope.png"])},
     "unknown gallery names: nope.png"),
    (lambda body, g: {**body, "images": _first_query(body["images"], g[:9] + g[:1])},
     "gallery names listed twice: {g0}"),
    (lambda body, g: {**body, "images": dict(list(body["images"].items())[1:])},
     "missing 1 of"),
], ids=["not-json", "not-object", "no-groupname", "no-images", "unknown-query", "eleven-names",
        "no-names", "unknown-gallery", "duplicate", "missing-query"])
def test_malformed_submissions_get_400_with_a_plain_text_reason(truth, scorer_url, break_body,
                                                                reason):
    gallery = sorted(truth.gallery)
    body = break_body(copy.deepcopy({"groupname": "team", "images": random_ranking(truth)}),
                      gallery)
    data = body if isinstance(body, bytes) else json.dumps(body)
    answer = requests.post(scorer_url, data, timeout=10)
    assert answer.status_code == 400
    assert answer.headers["Content-Type"].startswith("text/plain")
    assert reason.format(g0=gallery[0]) in answer.text
    with pytest.raises(ValueError):  # like the real server, an error is not JSON
        json.loads(answer.text)


def test_shorter_lists_score_what_they_hold(truth, scorer_url):
    """retrieve.top_k below 10, or one list cut short: a hit can't be beyond a list's end.
    Before, anything but exactly 10 names was refused."""
    ranking = random_ranking(truth, seed=2)
    for i, query in enumerate(ranking):
        ranking[query] = ranking[query][:[10, 5, 1][i % 3]]
    hits = {k: np.mean([any(truth.gallery[name] == truth.query[query] for name in names[:k])
                        for query, names in ranking.items()]) for k in (1, 5, 10)}
    expected = 600 * hits[1] + 300 * hits[5] + 100 * hits[10]
    answer = requests.post(scorer_url, json={"groupname": "team", "images": ranking}, timeout=10)
    assert answer.status_code == 200 and answer.json()["accuracy"] == pytest.approx(expected)
    assert score_ranking(ranking, truth) == pytest.approx(expected)


def test_labels_file_with_wrong_columns_is_named(tmp_path):
    labels = tmp_path / "test_labels.csv"
    labels.write_text("file,label\na.png,1\n")
    with pytest.raises(ClipcoreError, match=f"{labels}: columns must be split,file,label"):
        read_labels(labels)


def test_command_line_scorer_on_a_free_port_answers(truth, prepared_demo):
    labels = prepared_demo[0] / "test_labels.csv"
    process = subprocess.Popen(
        [sys.executable, "-m", "clipcore.submit.scorer", "--labels", str(labels), "--port", "0"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        banner = process.stdout.readline()
        port = int(banner.split("http://127.0.0.1:")[1].split("/")[0])
        ranking = random_ranking(truth, seed=1)
        answer = requests.post(f"http://127.0.0.1:{port}/",
                               json.dumps({"groupname": "cli", "images": ranking}), timeout=10)
        expected = metrics_for_names(ranking, truth.query, truth.gallery)["score"]
        assert answer.json() == {"accuracy": pytest.approx(expected)}
    finally:
        process.terminate()
        _, log = process.communicate(timeout=10)
    assert "group 'cli': accuracy" in log  # one log line per request
