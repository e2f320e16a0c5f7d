"""Every server answer kept and counted once (issue 28, items 3-5), against real HTTP(S) servers on
127.0.0.1: gateways that gave up, 429 with Retry-After, a history write that fails after the
server answered, a certificate the client refuses, a history saved by a spreadsheet, submit.url
written another way, the group name kept out of the history, concurrent runs, and the history
that older versions kept in the repository."""
from __future__ import annotations

import codecs
import os
import resource
import signal
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import REPO, write_params

from clipcore.errors import ClipcoreError
from clipcore.submit.history import (
    COLUMNS,
    HISTORY_VARIABLE,
    UNANSWERED,
    append_history,
    history_path,
    locked,
    read_history,
)
from clipcore.submit.submission import REUSED, submit_all
from tests.submit.test_submission import (
    REVERSED_RANKING,
    TINY_RANKING,
    ScriptedServer,
    history,
    params,
    run,
    serving,
    write_results,
)

HEADER = "submitted_at,epoch,accuracy,source,groupname,status,attempts,ranking_sha256"


def answers(tmp_path: Path) -> list[tuple]:
    """(epoch, accuracy, status) of the history's rows that hold an answer or a failure, not
    the rows written before a request went out."""
    return [(e["epoch"], e["accuracy"], e["status"]) for e in history(tmp_path)
            if e["attempts"]]


@pytest.mark.parametrize("code", [502, 504])
def test_a_gateway_that_gave_up_is_not_retried_nor_sent_again(tmp_path, code):
    """Before: retried like a 5xx, so the server behind the gateway scored one ranking four
    times in a run and once more on the rerun."""
    write_results(tmp_path / "results", {0: TINY_RANKING})
    scripted = ScriptedServer([(code, "upstream timed out")])
    with serving(scripted.server):
        with pytest.raises(ClipcoreError, match=rf"HTTP {code} .*may have reached the server"):
            run(tmp_path, params(scripted.url, retries=3))
        with pytest.raises(ClipcoreError, match="not sent again"):
            run(tmp_path, params(scripted.url, retries=3))
    assert len(scripted.requests) == 1
    assert answers(tmp_path)[-1][2].startswith(UNANSWERED)


def test_429_waits_as_long_as_retry_after_says_then_retries(tmp_path):
    """Before: a 429 was a 4xx, reported and never retried, Retry-After unread."""
    write_results(tmp_path / "results", {0: TINY_RANKING})
    scripted = ScriptedServer([(429, "slow down", {"Retry-After": "1"}),
                               (200, '{"accuracy": 321}')])
    with serving(scripted.server):
        started = time.monotonic()
        [outcome] = run(tmp_path, params(scripted.url, retries=2))  # backoff 0.01 s
        waited = time.monotonic() - started
    assert (outcome.accuracy, outcome.attempts, len(scripted.requests)) == (321.0, 2, 2)
    assert waited >= 1.0


def test_a_retry_after_longer_than_the_stage_should_wait_is_a_clear_failure(tmp_path):
    write_results(tmp_path / "results", {0: TINY_RANKING})
    scripted = ScriptedServer([(429, "quota spent", {"Retry-After": "7200"})])
    with serving(scripted.server):
        with pytest.raises(ClipcoreError, match="HTTP 429 .*try again in 7200 s"):
            run(tmp_path, params(scripted.url, retries=2))
    assert len(scripted.requests) == 1


def test_an_answer_the_history_cannot_store_is_printed_and_never_posted_again(tmp_path):
    """The history's file may not grow once the server has the post (a full disk, here the
    kernel's file size limit set on the stage's process at that moment: the same failed write).
    Before: the answer was neither printed nor stored and the next run posted again."""
    project = tmp_path / "project"
    store = tmp_path / "user" / "history.csv"
    write_results(project / "repository/results", {0: TINY_RANKING})
    stage: list[subprocess.Popen] = []

    def disk_full_once_posted():
        resource.prlimit(stage[0].pid, resource.RLIMIT_FSIZE,
                         (store.stat().st_size, resource.RLIM_INFINITY))
        return 200, '{"accuracy": 444}'

    scripted = ScriptedServer([disk_full_once_posted, (200, '{"accuracy": 1}')])
    env = {**os.environ, "PYTHONPATH": str(REPO), "CLIPCORE_SUBMIT_HISTORY": str(store),
           "CLIPCORE_GROUPNAME": "team"}
    with serving(scripted.server):
        write_params(project, {"submit.url": scripted.url, "submit.retries": 0})
        stage.append(subprocess.Popen(  # SIGXFSZ ignored: the write fails, the process lives
            [sys.executable, "-m", "stages.submit"], cwd=project, env=env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            preexec_fn=lambda: signal.signal(signal.SIGXFSZ, signal.SIG_IGN)))
        out = stage[0].communicate(timeout=60)[0]
        assert stage[0].returncode == 1, out
        assert "accuracy 444.00" in out and str(store) in out
        line = next(text for text in out.splitlines() if ",ok," in text).strip()

        again = subprocess.run([sys.executable, "-m", "stages.submit"], cwd=project, env=env,
                               capture_output=True, text=True)
        assert "not sent again" in again.stdout + again.stderr
        with open(store, "a", encoding="utf-8") as f:  # as the failed run says to
            f.write(line + "\n")
        last = subprocess.run([sys.executable, "-m", "stages.submit"], cwd=project, env=env,
                              capture_output=True, text=True)
    assert last.returncode == 0 and "accuracy 444.00" in last.stdout
    assert len(scripted.requests) == 1


@pytest.fixture(scope="module")
def untrusted_https(tmp_path_factory):
    """An HTTPS server on 127.0.0.1 with a self-signed certificate no client trusts."""
    folder = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-keyout", folder / "key.pem",
                    "-out", folder / "cert.pem"], check=True, capture_output=True)
    scripted = ScriptedServer([(200, '{"accuracy": 5}')])
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(folder / "cert.pem", folder / "key.pem")
    scripted.server.socket = context.wrap_socket(scripted.server.socket, server_side=True)
    scripted.url = scripted.url.replace("http://", "https://")
    with serving(scripted.server):
        yield scripted


def test_a_refused_certificate_means_nothing_was_sent(tmp_path, untrusted_https):
    """Before: recorded as 'may have reached the server', and later runs refused to send."""
    write_results(tmp_path / "results", {0: TINY_RANKING})
    for _ in range(2):
        with pytest.raises(ClipcoreError, match="certificate.*nothing was sent"):
            run(tmp_path, params(untrusted_https.url, retries=3))
    assert untrusted_https.requests == []
    assert not any(status.startswith(UNANSWERED) for *_, status in answers(tmp_path))


def test_force_sends_again_only_what_got_no_answer(tmp_path):
    """Before: submit.force, the only way past a request without an answer, also re-posted
    every ranking the server had already scored."""
    write_results(tmp_path / "results", {0: TINY_RANKING, 1: REVERSED_RANKING})
    scripted = ScriptedServer([(200, '{"accuracy": 400}'), ("silent", 0.05),
                               (200, '{"accuracy": 500}')])
    with serving(scripted.server):
        with pytest.raises(ClipcoreError, match="failed epochs: 1"):
            run(tmp_path, params(scripted.url))
        outcomes = run(tmp_path, params(scripted.url, force=True))
    assert [(o.accuracy, o.status) for o in outcomes] == [(400.0, REUSED), (500.0, "ok")]
    assert [r["body"]["images"] for r in scripted.requests] == [TINY_RANKING, REVERSED_RANKING,
                                                                REVERSED_RANKING]


def test_a_history_saved_with_a_bom_is_read(tmp_path):
    """A spreadsheet's "CSV UTF-8" starts with a BOM. Before: KeyError: 'submitted_at'."""
    write_results(tmp_path / "results", {0: TINY_RANKING})
    scripted = ScriptedServer([(200, '{"accuracy": 250}')])
    with serving(scripted.server):
        run(tmp_path, params(scripted.url))
        path = tmp_path / "submission_history.csv"
        path.write_bytes(codecs.BOM_UTF8 + path.read_bytes().replace(b"\n", b"\r\n"))
        [outcome] = run(tmp_path, params(scripted.url))
    assert (outcome.accuracy, outcome.status, len(scripted.requests)) == (250.0, REUSED, 1)


def test_the_same_server_written_another_way_is_not_posted_again(tmp_path):
    """Before: a trailing slash or localhost for 127.0.0.1 re-posted everything."""
    write_results(tmp_path / "results", {0: TINY_RANKING})
    scripted = ScriptedServer([(200, '{"accuracy": 250}')])
    port = scripted.server.server_address[1]
    with serving(scripted.server):
        for url in (f"http://127.0.0.1:{port}/", f"http://127.0.0.1:{port}",
                    f"HTTP://LOCALHOST:{port}/"):
            [outcome] = run(tmp_path, params(url))
            assert outcome.accuracy == 250.0
    assert len(scripted.requests) == 1


def test_the_group_name_is_not_written_to_the_history(tmp_path):
    write_results(tmp_path / "results", {0: TINY_RANKING})
    scripted = ScriptedServer([(200, '{"accuracy": 250}')])
    with serving(scripted.server):
        run(tmp_path, params(scripted.url, groupname=""), environ={"CLIPCORE_GROUPNAME": "x7q"})
        [again] = run(tmp_path, params(scripted.url, groupname="x7q"))
        run(tmp_path, params(scripted.url, groupname="someone else"))
    assert again.status == REUSED and len(scripted.requests) == 2
    assert "x7q" not in (tmp_path / "submission_history.csv").read_text()


def test_concurrent_runs_post_a_ranking_once(tmp_path):
    """Two runs (queued experiments run in parallel) on one history: one posts, the other
    waits for its turn and uses the answer."""
    write_results(tmp_path / "results", {0: TINY_RANKING})
    scripted = ScriptedServer([("late", 0.5, '{"accuracy": 42}')])
    outcomes: list = []
    with serving(scripted.server):
        threads = [threading.Thread(target=lambda: outcomes.extend(
            run(tmp_path, params(scripted.url)))) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert sorted(o.accuracy for o in outcomes) == [42.0, 42.0]
    assert len(scripted.requests) == 1
    assert read_history(tmp_path / "submission_history.csv")[0]["epoch"] == 0  # one header


def test_the_history_an_older_version_kept_in_the_repository_is_merged_once(tmp_path, capsys):
    """Answers recorded before the history moved out of the repository are not posted again."""
    write_results(tmp_path / "results", {0: TINY_RANKING})
    scripted = ScriptedServer([(200, '{"accuracy": 250}')])
    with serving(scripted.server):
        run(tmp_path, params(scripted.url))
        store = tmp_path / "submission_history.csv"
        legacy = tmp_path / "repository-history.csv"
        entry = read_history(store)[-1]
        legacy.write_text(f"{HEADER}\n{entry['submitted_at']},0,250.0,{scripted.url},team,ok,1,"
                          f"{entry['ranking_sha256']}\n")
        store.unlink()
        for _ in range(2):
            [outcome] = submit_again_with_legacy(tmp_path, scripted.url, legacy)
            assert outcome.status == REUSED
    assert len(scripted.requests) == 1 and len(answers(tmp_path)) == 1
    assert "git rm" in capsys.readouterr().out


def submit_again_with_legacy(tmp_path: Path, url: str, legacy: Path):
    return submit_all(params(url), tmp_path / "results", tmp_path / "prepared",
                      tmp_path / "submission_accuracy.csv", tmp_path / "submission.json",
                      tmp_path / "submission_history.csv", environ={}, legacy_history=legacy)


def test_the_history_is_the_users_and_its_path_must_be_absolute(tmp_path):
    assert history_path({"XDG_DATA_HOME": str(tmp_path)}) == \
        tmp_path / "clipcore" / "submission_history.csv"
    assert history_path({HISTORY_VARIABLE: str(tmp_path / "h.csv")}) == tmp_path / "h.csv"
    with pytest.raises(ClipcoreError, match="CLIPCORE_SUBMIT_HISTORY='h.csv': give an absolute"):
        history_path({HISTORY_VARIABLE: "h.csv"})



def test_a_new_history_gets_its_header_under_the_lock(tmp_path):
    """Before: append_history wrote without the lock, so two runs creating the file at once could
    each see it empty and write a header (the second then read as a broken entry on every run).
    Now a writer waits for the lock, and the first row's header goes in under it."""
    path = tmp_path / "submission_history.csv"
    row = {"submitted_at": "2026-12-07T10:00:00+00:00", "epoch": 0, "accuracy": 42.0,
           "source": "http://127.0.0.1:1/", "group_sha256": "", "status": "ok", "attempts": 1,
           "ranking_sha256": "0" * 64}
    writers = [threading.Thread(target=append_history, args=(path, [{**row, "epoch": epoch}]))
               for epoch in (1, 2)]
    with locked(path):  # another run's turn
        for writer in writers:
            writer.start()
        time.sleep(0.5)
        assert not path.exists()  # both wait for the lock
        append_history(path, [row])  # the holder records (the lock nests for it)
    for writer in writers:
        writer.join(timeout=30)
    lines = path.read_text().splitlines()
    assert lines[0] == ",".join(COLUMNS) and len(lines) == 4
    assert sorted(entry["epoch"] for entry in read_history(path)) == [0, 1, 2]
