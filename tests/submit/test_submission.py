"""The submit stage's library call against real HTTP servers on 127.0.0.1: the local scorer, and
scripted servers that fail in the ways a competition server does."""
from __future__ import annotations

import json
import signal
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pytest

from clipcore.errors import ClipcoreError
from clipcore.params import SubmitParams
from clipcore.ranking.measures import metrics_for_names
from clipcore.submit.history import (
    ANSWERED_LATE,
    COLUMNS,
    SENDING,
    UNANSWERED,
    group_digest,
    ranking_digest,
    read_history,
)
from clipcore.submit.scorer import make_server
from clipcore.submit.submission import REUSED, group_name, local_labels, submit_all


class ScriptedServer:
    """Answers the n-th POST with script[n] (the last entry repeats) and records every request.
    An entry is (status, body text[, headers]); ("late", seconds, body text): wait, then answer
    200; or ("silent", seconds): wait, then hang up unanswered. A callable entry is called for
    the request and returns one of those."""

    def __init__(self, script: list[tuple]):
        self.script, self.requests = script, []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.requests.append({"headers": dict(self.headers), "body": json.loads(body)})
                entry = outer.script[min(len(outer.requests), len(outer.script)) - 1]
                status, text, *headers = entry() if callable(entry) else entry
                if status in ("silent", "late"):
                    time.sleep(text)
                    if status == "silent":
                        return
                    status, text = 200, headers.pop()
                data = text.encode()
                self.send_response(status)
                for name, value in (headers[0] if headers else {}).items():
                    self.send_header(name, value)
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


def history(tmp_path: Path, sending: bool = False) -> list[dict]:
    """The history's rows of what came back; with `sending`, also the row each request leaves
    before it goes out."""
    return [entry for entry in read_history(tmp_path / "submission_history.csv")
            if sending or entry["status"] != SENDING]


def table(tmp_path: Path) -> pd.DataFrame:
    return pd.read_csv(tmp_path / "submission_accuracy.csv")


def metrics(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "submission.json").read_text())


TINY_RANKING = {"q1.png": [f"g{i}.png" for i in range(10)]}
REVERSED_RANKING = {"q1.png": TINY_RANKING["q1.png"][::-1]}


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
                                 "best_on_server": {"epoch": 2, "accuracy": 1000.0}}
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


def test_server_going_down_keeps_results_and_earlier_rows(tmp_path):
    before = write_results(tmp_path / "results", {0: TINY_RANKING, 1: REVERSED_RANKING})
    scripted = ScriptedServer([(200, '{"accuracy": 400}')])
    with serving(scripted.server, one_shot=True):  # epoch 0 is scored, then the port closes
        with pytest.raises(ClipcoreError, match=r"failed epochs: 1 .*cannot connect"):
            run(tmp_path, params(scripted.url, retries=2))
    rows = table(tmp_path)
    assert list(rows["epoch"]) == [0, 1]
    assert (rows.loc[0, "accuracy"], rows.loc[0, "status"]) == (400, "ok")
    assert "gave up after 3 attempts" in rows.loc[1, "status"]
    assert list(rows["attempts"]) == [1, 3]
    assert metrics(tmp_path) == {"epochs": {"0": 400.0}, "best_on_server": {"epoch": 0, "accuracy": 400.0}}
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


@pytest.mark.parametrize("answer", ['{"accuracy": NaN}', '{"accuracy": 1e9}', '{"accuracy": -5}',
                                    '{"results": Infinity}'])
def test_an_answer_outside_0_to_1000_is_a_failure_and_posted_again_next_run(tmp_path, answer):
    """Before, NaN, 1e9 or -5 became the epoch's score and the ranking was never posted again."""
    write_results(tmp_path / "results", {0: TINY_RANKING})
    scripted = ScriptedServer([(200, answer), (200, '{"accuracy": 512}')])
    with serving(scripted.server):
        with pytest.raises(ClipcoreError, match=r"failed epochs: 0 .*outside 0\.\.1000"):
            run(tmp_path, params(scripted.url))
        assert metrics(tmp_path) == {"epochs": {}}
        [entry] = history(tmp_path)
        assert entry["accuracy"] is None and "outside 0..1000" in entry["status"]
        [outcome] = run(tmp_path, params(scripted.url))
    assert (outcome.accuracy, outcome.status, len(scripted.requests)) == (512.0, "ok", 2)


def test_an_impossible_score_in_an_older_history_is_not_reused(tmp_path):
    """A history written before answers were checked may hold "ok" rows with a NaN score."""
    write_results(tmp_path / "results", {0: TINY_RANKING})
    scripted = ScriptedServer([(200, '{"accuracy": 300}')])
    (tmp_path / "submission_history.csv").write_text(
        f"{','.join(COLUMNS)}\n2026-11-28T01:02:03+00:00,0,nan,{scripted.url},"
        f"{group_digest('team')},ok,1,{ranking_digest(TINY_RANKING)}\n")
    with serving(scripted.server):
        [outcome] = run(tmp_path, params(scripted.url))
    assert (outcome.accuracy, outcome.status, len(scripted.requests)) == (300.0, "ok", 1)


def test_a_redirect_is_refused_naming_the_new_location(tmp_path):
    """Before, the 302 was followed with a GET, and the stage reported "HTTP 501"."""
    write_results(tmp_path / "results", {0: TINY_RANKING})
    scripted = ScriptedServer([])
    moved = scripted.url + "submit/"
    scripted.script.append((302, "", {"Location": moved}))
    with serving(scripted.server):
        with pytest.raises(ClipcoreError, match=f"HTTP 302 .* redirects to {moved}: "
                                                f"set submit.url to it"):
            run(tmp_path, params(scripted.url))
    assert len(scripted.requests) == 1


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
    write_results(tmp_path / "results", {0: TINY_RANKING, 1: REVERSED_RANKING})
    scripted = ScriptedServer([(200, '{"accuracy": 400}'), (200, '{"accuracy": 500}')])
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

        forced = run(tmp_path, params(scripted.url, retries=0, force=True))
        assert len(scripted.requests) == 2  # force sends again only what got no answer
        assert [o.accuracy for o in forced] == [400.0, 500.0]
    entries = history(tmp_path)
    assert [(e["epoch"], e["accuracy"], e["status"]) for e in entries] == [
        (0, 400.0, "ok"), (1, 500.0, "ok")]
    assert entries[0]["ranking_sha256"] != entries[1]["ranking_sha256"]
    assert {e["source"] for e in entries} == {scripted.url}
    assert metrics(tmp_path) == {"epochs": {"0": 400.0, "1": 500.0},
                                 "best_on_server": {"epoch": 1, "accuracy": 500.0}}


def test_another_group_or_changed_results_are_posted(tmp_path):
    write_results(tmp_path / "results", {0: TINY_RANKING})
    scripted = ScriptedServer([(200, '{"accuracy": 100}')])
    with serving(scripted.server):
        run(tmp_path, params(scripted.url))
        run(tmp_path, params(scripted.url, groupname="other team"))
        write_results(tmp_path / "results", {0: REVERSED_RANKING})
        run(tmp_path, params(scripted.url))
    assert len(scripted.requests) == 3 and len(history(tmp_path)) == 3


def test_a_line_cut_by_a_crash_does_not_lose_the_history(tmp_path, capsys):
    write_results(tmp_path / "results", {0: TINY_RANKING})
    (tmp_path / "submission_history.csv").write_text(
        f"{','.join(COLUMNS)}\n2026-11-28T01:02:03+00:00,0,400")  # the rest never reached the disk
    scripted = ScriptedServer([(200, '{"accuracy": 100}')])
    with serving(scripted.server):
        run(tmp_path, params(scripted.url))
    assert [e["accuracy"] for e in history(tmp_path)] == [100.0]
    assert "line 2 is not a history entry, ignored" in capsys.readouterr().err


def test_each_distinct_ranking_is_posted_once_per_run(tmp_path):
    """embed.wise_ft_alpha 0 ranks every epoch as epoch 0: before, one run posted every epoch."""
    write_results(tmp_path / "results", {0: TINY_RANKING, 1: TINY_RANKING, 2: REVERSED_RANKING,
                                         3: TINY_RANKING})
    scripted = ScriptedServer([(200, '{"accuracy": 400}'), (200, '{"accuracy": 500}')])
    with serving(scripted.server):
        outcomes = run(tmp_path, params(scripted.url))
        assert [r["body"]["images"] for r in scripted.requests] == [TINY_RANKING,
                                                                    REVERSED_RANKING]
        assert [(o.epoch, o.accuracy) for o in outcomes] == [(0, 400), (1, 400), (2, 500),
                                                              (3, 400)]
        rows = table(tmp_path)
        assert rows.loc[1, "status"] == rows.loc[3, "status"] \
            == "ok (same ranking as epoch 0, not posted again)"
        assert rows.loc[1, "submitted_at"] == rows.loc[0, "submitted_at"]
    assert len(history(tmp_path)) == 2


def test_a_refused_ranking_is_not_sent_again_in_the_same_run(tmp_path):
    write_results(tmp_path / "results", {0: TINY_RANKING, 1: TINY_RANKING})
    scripted = ScriptedServer([(400, "unknown query q1.png")])
    with serving(scripted.server):
        with pytest.raises(ClipcoreError, match="failed epochs: 0, 1 .*unknown query q1.png"):
            run(tmp_path, params(scripted.url))
    assert len(scripted.requests) == 1
    assert table(tmp_path).loc[1, "status"].startswith("same ranking as epoch 0, not posted "
                                                       "again: HTTP 400")


def test_a_late_answer_is_recorded_and_the_request_not_sent_again(tmp_path, capsys):
    """Before, a request without an answer within submit.timeout was sent again at once (a
    server that counts posts counted two), and its answer, arriving later, was dropped."""
    write_results(tmp_path / "results", {0: TINY_RANKING})
    scripted = ScriptedServer([("late", 1.5, '{"accuracy": 7}')])
    with serving(scripted.server):
        [outcome] = run(tmp_path, params(scripted.url, timeout=1.0))
        assert len(scripted.requests) == 1
        assert (outcome.accuracy, outcome.status, outcome.attempts) == (7.0, ANSWERED_LATE, 1)
        [sent, late] = history(tmp_path)
        assert sent["accuracy"] is None and sent["status"].startswith(UNANSWERED)
        assert (late["accuracy"], late["status"]) == (7.0, ANSWERED_LATE)
        [again] = run(tmp_path, params(scripted.url, timeout=1.0))
    assert (again.accuracy, again.status, len(scripted.requests)) == (7.0, REUSED, 1)
    assert "epoch 0: late answer: accuracy 7.00" in capsys.readouterr().out


@pytest.mark.parametrize("silence", [0.05, 2.5], ids=["hung-up", "timed-out"])
def test_a_request_that_may_have_arrived_is_sent_again_only_with_force(tmp_path, silence):
    """A server closing the connection after the request, or silent past submit.timeout, may
    have counted it. Before, such a request was sent again at once."""
    before = write_results(tmp_path / "results", {0: TINY_RANKING})
    scripted = ScriptedServer([("silent", silence), (200, '{"accuracy": 9}')])
    with serving(scripted.server):
        with pytest.raises(ClipcoreError, match=r"failed epochs: 0 \(first: no answer from .* may "
                                                r"have reached the server.*submit\.force"):
            run(tmp_path, params(scripted.url, timeout=0.5, retries=3))
        assert len(scripted.requests) == 1
        with pytest.raises(ClipcoreError, match=r"not sent again: the request of .* got no "
                                                r"answer.*submit\.force"):
            run(tmp_path, params(scripted.url, timeout=0.5))
        assert len(scripted.requests) == 1
        [outcome] = run(tmp_path, params(scripted.url, force=True))
    assert (outcome.accuracy, len(scripted.requests)) == (9.0, 2)
    assert [e["status"][:len(UNANSWERED)] for e in history(tmp_path)] == [UNANSWERED, "ok"]
    assert {path: path.read_bytes() for path in before} == before


def test_ctrl_c_while_waiting_for_an_answer_is_recorded(tmp_path, ctrl_c_raises):
    """The stage stopped mid-request: before, no row was left and a rerun posted again."""
    write_results(tmp_path / "results", {0: TINY_RANKING})
    scripted = ScriptedServer([("silent", 1.5)])
    interrupt = threading.Timer(0.3, signal.pthread_kill,
                                (threading.main_thread().ident, signal.SIGINT))
    with serving(scripted.server):
        interrupt.start()
        with pytest.raises(KeyboardInterrupt):
            run(tmp_path, params(scripted.url, timeout=5.0))
    [entry] = history(tmp_path, sending=True)  # the row left before the request went out
    assert entry["status"].startswith(UNANSWERED)


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
            with pytest.raises(ClipcoreError, match=r"no answer from .* within 1 s"):
                run(tmp_path, params(dripping.url, timeout=1.0, retries=1))
            elapsed = time.monotonic() - started
    finally:
        dripping.stop.set()
    assert elapsed < 2 * 1.0 + 1.5  # the request, the wait for a late answer and some slack
    assert table(tmp_path).loc[0, "attempts"] == 1


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
