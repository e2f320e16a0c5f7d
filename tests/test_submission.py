"""The submit stage's library call against real HTTP servers on 127.0.0.1: the local scorer, and
scripted servers that fail in the ways a competition server does."""
from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pytest

from clipcore.errors import ClipcoreError
from clipcore.measures import metrics_for_names
from clipcore.params import SubmitParams
from clipcore.scorer import make_server
from clipcore.submission import REUSED, group_name, local_labels, read_history, submit_all


class ScriptedServer:
    """Answers the n-th POST with script[n] (the last entry repeats) and records every request.
    An entry is (status, body text), or ("silent", seconds): wait, then hang up unanswered."""

    def __init__(self, script: list[tuple]):
        self.script, self.requests = script, []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.requests.append({"headers": dict(self.headers), "body": json.loads(body)})
                status, text = outer.script[min(len(outer.requests), len(outer.script)) - 1]
                if status == "silent":
                    time.sleep(text)
                    return
                data = text.encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:  # keep test output clean
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"


@contextmanager
def serving(server: ThreadingHTTPServer, one_shot: bool = False):
    """Run a server in a thread; one_shot: answer one request, then stop listening (the next
    connection is refused)."""
    def one_request() -> None:
        server.handle_request()
        server.server_close()
    thread = threading.Thread(target=one_request if one_shot else server.serve_forever,
                              **({} if one_shot else {"kwargs": {"poll_interval": 0.05}}))
    thread.start()
    try:
        yield server
    finally:
        if not one_shot:
            server.shutdown()
            server.server_close()
        thread.join()


def params(url: str = "", groupname: str = "team", retries: int = 2, timeout: float = 5.0,
           force: bool = False):
    return SubmitParams(url=url, groupname=groupname, timeout=timeout, retries=retries,
                        backoff=0.01, force=force)


def write_results(folder: Path, rankings: dict[int, object]) -> dict[Path, bytes]:
    """retrieval_results_epoch_X.json for each epoch; returns each file's bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    for epoch, ranking in rankings.items():
        text = ranking if isinstance(ranking, str) else json.dumps(ranking)
        (folder / f"retrieval_results_epoch_{epoch}.json").write_text(text)
    return {path: path.read_bytes() for path in folder.iterdir()}


def run(tmp_path: Path, submit: SubmitParams, prepared: Path | None = None, environ=None):
    return submit_all(submit, tmp_path / "results", prepared or tmp_path / "prepared",
                      tmp_path / "submission_accuracy.csv", tmp_path / "submission.json",
                      tmp_path / "submission_history.csv",
                      environ={} if environ is None else environ)


def history(tmp_path: Path) -> list[dict]:
    return read_history(tmp_path / "submission_history.csv")


def table(tmp_path: Path) -> pd.DataFrame:
    return pd.read_csv(tmp_path / "submission_accuracy.csv")


def metrics(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "submission.json").read_text())


TINY_RANKING = {"q1.png": [f"g{i}.png" for i in range(10)]}


@pytest.fixture(scope="module")
def demo_rankings(prepared_demo):
    """Epoch 0: a poor ranking (each query's list shifted to other queries' neighbours);
    epoch 2: a perfect one; epoch 10 sorts after 2."""
    labels = local_labels(prepared_demo[1])
    by_class: dict[str, list[str]] = {}
    for name, label in sorted(labels.gallery.items()):
        by_class.setdefault(label, []).append(name)
    perfect = {q: by_class[label][:10] for q, label in sorted(labels.query.items())}
    queries = list(perfect)
    poor = {q: perfect[queries[(i + 1) % len(queries)]] for i, q in enumerate(queries)}
    return labels, {0: poor, 2: perfect, 10: poor}


def test_local_scoring_uses_the_shared_measure_in_epoch_order(tmp_path, prepared_demo,
                                                             demo_rankings, capsys):
    labels, rankings = demo_rankings
    write_results(tmp_path / "results", rankings)
    outcomes = run(tmp_path, params(), prepared_demo[1])
    poor = metrics_for_names(rankings[0], labels.query, labels.gallery)["score"]
    rows = table(tmp_path)
    assert list(rows["epoch"]) == [0, 2, 10]
    assert list(rows["accuracy"]) == pytest.approx([poor, 1000, poor])
    assert set(rows["source"]) == {"local"} and set(rows["status"]) == {"ok"}
    assert list(rows["attempts"]) == [0, 0, 0]
    assert [o.accuracy for o in outcomes] == list(rows["accuracy"])
    assert metrics(tmp_path) == {"epochs": {"0": pytest.approx(poor), "2": 1000.0,
                                            "10": pytest.approx(poor)},
                                 "best": {"epoch": 2, "accuracy": 1000.0}}
    assert capsys.readouterr().out.count("(local)") == 3  # one line per epoch


def test_server_and_local_scoring_agree(tmp_path, prepared_demo, demo_rankings):
    labels, rankings = demo_rankings
    write_results(tmp_path / "results", rankings)
    run(tmp_path, params(), prepared_demo[1])
    local = table(tmp_path)
    with serving(make_server(labels)) as server:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        run(tmp_path, params(url))
    remote = table(tmp_path)
    assert list(remote["accuracy"]) == pytest.approx(list(local["accuracy"]))
    assert set(remote["source"]) == {url} and list(remote["attempts"]) == [1, 1, 1]


def test_longer_lists_are_cut_to_the_ten_the_competition_scores(tmp_path):
    longer = {"q1.png": [f"g{i}.png" for i in range(15)]}
    write_results(tmp_path / "results", {0: longer})
    scripted = ScriptedServer([(200, '{"accuracy": 100}')])
    with serving(scripted.server):
        run(tmp_path, params(scripted.url))
    assert scripted.requests[0]["body"]["images"] == TINY_RANKING


def test_5xx_answers_are_retried_until_one_succeeds(tmp_path):
    write_results(tmp_path / "results", {0: TINY_RANKING})
    scripted = ScriptedServer([(500, "busy"), (503, "still busy"), (200, '{"accuracy": 512.5}')])
    with serving(scripted.server):
        [outcome] = run(tmp_path, params(scripted.url, retries=3))
    assert (outcome.accuracy, outcome.attempts, outcome.status) == (512.5, 3, "ok")
    assert len(scripted.requests) == 3
    sent = scripted.requests[0]
    assert sent["headers"]["Content-Type"] == "application/json"
    assert sent["body"] == {"groupname": "team", "images": TINY_RANKING}


def test_timeouts_are_retried(tmp_path):
    write_results(tmp_path / "results", {0: TINY_RANKING})
    scripted = ScriptedServer([("silent", 0.6), (200, '{"accuracy": 7}')])
    with serving(scripted.server):
        [outcome] = run(tmp_path, params(scripted.url, timeout=0.2))
    assert (outcome.accuracy, outcome.attempts) == (7.0, 2)


def test_server_going_down_keeps_results_and_earlier_rows(tmp_path):
    before = write_results(tmp_path / "results", {0: TINY_RANKING, 1: TINY_RANKING})
    scripted = ScriptedServer([(200, '{"accuracy": 400}')])
    with serving(scripted.server, one_shot=True):  # epoch 0 is scored, then the port closes
        with pytest.raises(ClipcoreError, match=r"failed epochs: 1 .*cannot connect"):
            run(tmp_path, params(scripted.url, retries=2))
    rows = table(tmp_path)
    assert list(rows["epoch"]) == [0, 1]
    assert (rows.loc[0, "accuracy"], rows.loc[0, "status"]) == (400, "ok")
    assert "gave up after 3 attempts" in rows.loc[1, "status"]
    assert list(rows["attempts"]) == [1, 3]
    assert metrics(tmp_path) == {"epochs": {"0": 400.0}, "best": {"epoch": 0, "accuracy": 400.0}}
    assert {path: path.read_bytes() for path in before} == before


def test_a_4xx_is_not_retried_and_its_first_line_is_shown(tmp_path):
    write_results(tmp_path / "results", {0: TINY_RANKING})
    scripted = ScriptedServer([(400, "unknown query q1.png\nTraceback (most recent call last)")])
    with serving(scripted.server):
        with pytest.raises(ClipcoreError, match="HTTP 400 Bad Request .*: unknown query q1.png"):
            run(tmp_path, params(scripted.url, retries=3))
    assert len(scripted.requests) == 1
    status = table(tmp_path).loc[0, "status"]
    assert "unknown query q1.png" in status and "Traceback" not in status


@pytest.mark.parametrize("answer, problem", [
    ("<html>Thanks!</html>", "is not JSON: <html>Thanks!</html>"),
    ('{"score": 3}', r'holds no accuracy \(nor results\) number: {"score": 3}'),
], ids=["not-json", "no-accuracy"])
def test_an_answer_without_an_accuracy_is_a_clear_error(tmp_path, answer, problem):
    write_results(tmp_path / "results", {0: TINY_RANKING})
    scripted = ScriptedServer([(200, answer)])
    with serving(scripted.server):
        with pytest.raises(ClipcoreError, match=problem):
            run(tmp_path, params(scripted.url))
    assert len(scripted.requests) == 1


def test_older_editions_results_key_is_accepted(tmp_path):
    write_results(tmp_path / "results", {0: TINY_RANKING})
    scripted = ScriptedServer([(200, '{"results": 345.6}')])
    with serving(scripted.server):
        [outcome] = run(tmp_path, params(scripted.url))
    assert outcome.accuracy == 345.6


def test_group_name_from_the_environment_wins(tmp_path):
    write_results(tmp_path / "results", {0: TINY_RANKING})
    scripted = ScriptedServer([(200, '{"accuracy": 1}')])
    with serving(scripted.server):
        run(tmp_path, params(scripted.url, groupname="in-params"),
            environ={"CLIPCORE_GROUPNAME": "from-env"})
    assert scripted.requests[0]["body"]["groupname"] == "from-env"
    assert group_name("in-params", {"CLIPCORE_GROUPNAME": ""}) == "in-params"


def test_empty_group_name_with_a_url_stops_before_any_request(tmp_path):
    write_results(tmp_path / "results", {0: TINY_RANKING})
    scripted = ScriptedServer([(200, '{"accuracy": 1}')])
    with serving(scripted.server):
        with pytest.raises(ClipcoreError, match="submit.groupname.*CLIPCORE_GROUPNAME"):
            run(tmp_path, params(scripted.url, groupname=""))
    assert scripted.requests == []
    assert not (tmp_path / "submission_accuracy.csv").exists()


def test_no_results_files_says_to_run_retrieve(tmp_path):
    (tmp_path / "results").mkdir()
    with pytest.raises(ClipcoreError, match=r"dvc repro retrieve"):
        run(tmp_path, params())


def test_unknown_labels_give_rows_without_accuracy_and_a_broken_file_fails_alone(tmp_path,
                                                                                 capsys):
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    for split, name in (("query", "q1.png"), ("gallery", "g1.png")):
        (prepared / f"{split}.csv").write_text(f"path,label,caption\ntest/{split}/{name},,\n")
    write_results(tmp_path / "results", {0: TINY_RANKING, 1: "{broken", 2: TINY_RANKING})
    with pytest.raises(ClipcoreError, match=r"failed epochs: 1 .*retrieval_results_epoch_1.json"):
        run(tmp_path, params())
    rows = table(tmp_path)
    assert list(rows["epoch"]) == [0, 1, 2]
    assert rows["accuracy"].isna().all()
    assert rows.loc[0, "status"] == rows.loc[2, "status"] == "not scored: test labels unknown"
    assert metrics(tmp_path) == {"epochs": {}}
    assert "test labels unknown" in capsys.readouterr().out


def test_every_answer_is_kept_and_a_scored_ranking_is_not_posted_again(tmp_path, capsys):
    """Before, each run replaced the CSV: a failed resubmission wiped the earlier scores, and
    every rerun posted every epoch again."""
    reversed_ranking = {"q1.png": TINY_RANKING["q1.png"][::-1]}
    write_results(tmp_path / "results", {0: TINY_RANKING, 1: reversed_ranking})
    scripted = ScriptedServer([(200, '{"accuracy": 400}'), (200, '{"accuracy": 500}'),
                               (503, "down for maintenance")])
    with serving(scripted.server):
        run(tmp_path, params(scripted.url))
        assert [(e["epoch"], e["accuracy"], e["status"]) for e in history(tmp_path)] \
            == [(0, 400.0, "ok"), (1, 500.0, "ok")]
        first = table(tmp_path)

        again = run(tmp_path, params(scripted.url))  # same server, group and rankings
        assert len(scripted.requests) == 2
        assert [(o.accuracy, o.status) for o in again] == [(400.0, REUSED), (500.0, REUSED)]
        assert list(table(tmp_path)["submitted_at"]) == list(first["submitted_at"])
        assert "not posted again" in capsys.readouterr().out

        with pytest.raises(ClipcoreError, match="failed epochs: 0, 1"):
            run(tmp_path, params(scripted.url, retries=0, force=True))
        assert len(scripted.requests) == 4
    entries = history(tmp_path)
    assert [(e["epoch"], e["accuracy"], e["status"][:8]) for e in entries] == [
        (0, 400.0, "ok"), (1, 500.0, "ok"), (0, None, "HTTP 503"), (1, None, "HTTP 503")]
    assert entries[0]["ranking_sha256"] == entries[2]["ranking_sha256"]
    assert entries[0]["ranking_sha256"] != entries[1]["ranking_sha256"]
    assert {(e["source"], e["groupname"]) for e in entries} == {(scripted.url, "team")}
    assert table(tmp_path)["accuracy"].isna().all()  # the CSV shows this run: both failed
    assert metrics(tmp_path) == {"epochs": {}}


def test_another_group_or_changed_results_are_posted(tmp_path):
    write_results(tmp_path / "results", {0: TINY_RANKING})
    scripted = ScriptedServer([(200, '{"accuracy": 100}')])
    with serving(scripted.server):
        run(tmp_path, params(scripted.url))
        run(tmp_path, params(scripted.url, groupname="other team"))
        write_results(tmp_path / "results", {0: {"q1.png": TINY_RANKING["q1.png"][::-1]}})
        run(tmp_path, params(scripted.url))
    assert len(scripted.requests) == 3 and len(history(tmp_path)) == 3


def test_a_line_cut_by_a_crash_does_not_lose_the_history(tmp_path, capsys):
    write_results(tmp_path / "results", {0: TINY_RANKING})
    (tmp_path / "submission_history.csv").write_text(
        "submitted_at,epoch,accuracy,source,groupname,status,attempts,ranking_sha256\n"
        "2026-11-28T01:02:03+00:00,0,400")  # the rest never reached the disk
    scripted = ScriptedServer([(200, '{"accuracy": 100}')])
    with serving(scripted.server):
        run(tmp_path, params(scripted.url))
    assert [e["accuracy"] for e in history(tmp_path)] == [100.0]
    assert "line 2 is not a history entry, ignored" in capsys.readouterr().err


class DrippingServer:
    """Sends a complete, valid answer one byte at a time, `gap` seconds apart: every single
    read is quick, the whole answer is slow."""

    def __init__(self, gap: float):
        self.stop = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                body = b'{"accuracy": 999}'
                answer = (b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body)) + body
                for i in range(len(answer)):
                    if outer.stop.wait(gap):
                        return
                    self.wfile.write(answer[i:i + 1])
                    self.wfile.flush()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"


def test_timeout_bounds_the_whole_request(tmp_path):
    """Before, `timeout` bounded each read: this answer took 55 x 0.2 s = 11 s and counted."""
    write_results(tmp_path / "results", {0: TINY_RANKING})
    dripping = DrippingServer(gap=0.2)
    started = time.monotonic()
    try:
        with serving(dripping.server):
            with pytest.raises(ClipcoreError, match=r"no complete answer from .* within 1 s "
                                                    r"\(gave up after 2 attempts\)"):
                run(tmp_path, params(dripping.url, timeout=1.0, retries=1))
            elapsed = time.monotonic() - started
    finally:
        dripping.stop.set()
    assert elapsed < 2 * 1.0 + 1.5  # two attempts of one second, the backoff and some slack
    assert table(tmp_path).loc[0, "attempts"] == 2


def test_lists_shorter_than_ten_score_what_they_hold(tmp_path, prepared_demo, demo_rankings):
    """retrieve.top_k 5: before, every epoch failed at local scoring ("expected exactly 10")."""
    labels, rankings = demo_rankings
    five = {query: names[:5] for query, names in rankings[0].items()}
    write_results(tmp_path / "results", {0: five})
    [outcome] = run(tmp_path, params(), prepared_demo[1])
    expected = metrics_for_names(five, labels.query, labels.gallery)["score"]
    assert outcome.status == "ok" and outcome.accuracy == pytest.approx(expected)
    with serving(make_server(labels)) as server:
        [posted] = run(tmp_path, params(f"http://127.0.0.1:{server.server_address[1]}/"))
    assert posted.accuracy == pytest.approx(expected)
