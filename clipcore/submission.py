"""Submitting every epoch's retrieval results: to the competition server, or scored locally.

With `submit.url` set, each results file is POSTed as `{"groupname": ..., "images": ranking}`
and the server's `accuracy` (older editions: `results`) is recorded. Connection failures,
timeouts and 5xx answers are retried with doubling backoff; a 4xx is the server refusing this
submission, so it is reported, not retried. With no url, the ranking is scored here with the
known test labels by the same rules as `clipcore.scorer`, so the number is the one a server
with those labels would give.

Nothing is lost: every answer a server gives (or the failure to get one) is appended to a history
file that is never rewritten; results the same server already scored for the same group are not
posted again unless `submit.force` is set (a real server may count every post). The CSV and
metrics describe the current results files and are rewritten (atomically) after every epoch;
the epochs that failed are named at the end.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
import re
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Mapping

import pandas as pd
import requests

from clipcore.errors import ClipcoreError
from clipcore.files import write_text_atomic
from clipcore.manifests import labels_by_name, read_manifest
from clipcore.params import SubmitParams
from clipcore.paths import epoch_files, epoch_of
from clipcore.scorer import COMPETITION_TOP_K, GroundTruth, InvalidSubmission, score_ranking

GROUPNAME_VARIABLE = "CLIPCORE_GROUPNAME"
LOCAL = "local"
CSV_COLUMNS = ["epoch", "accuracy", "source", "status", "submitted_at", "attempts"]
REUSED = "ok (earlier answer, not posted again; submit.force posts it)"
HISTORY_COLUMNS = ["submitted_at", "epoch", "accuracy", "source", "groupname", "status",
                   "attempts", "ranking_sha256"]
RESULTS_PATTERN = "retrieval_results_epoch_*.json"
MESSAGE_CHARS = 200  # how much of a server's error text a status keeps

Scorer = Callable[[dict], tuple[float, int]]  # ranking -> (accuracy, attempts)


class SubmitFailed(ClipcoreError):
    """One submission could not be scored; `attempts` requests were made."""

    def __init__(self, message: str, attempts: int):
        super().__init__(message)
        self.attempts = attempts


@dataclass(frozen=True)
class Outcome:
    epoch: int
    accuracy: float | None  # None: failed, or not scored (no labels and no server)
    status: str             # "ok", REUSED, "not scored: ..." or the error
    attempts: int           # HTTP requests made (0 when scored locally)
    failed: bool
    submitted_at: str = ""     # ISO time, UTC
    ranking_sha256: str = ""   # of the ranking as sent (the results file cut to ten names)


def group_name(configured: str, environ: Mapping[str, str] = os.environ) -> str:
    """The group name to submit under: CLIPCORE_GROUPNAME when set, else submit.groupname.
    The variable wins so a name can stay out of params.yaml and each teammate can use theirs."""
    return environ.get(GROUPNAME_VARIABLE, "").strip() or configured.strip()


def post_ranking(url: str, groupname: str, ranking: dict, timeout: float, retries: int,
                 backoff: float) -> tuple[float, int]:
    """POST one ranking; (accuracy, attempts). SubmitFailed once retries are spent or at once
    on a 4xx or an answer without an accuracy."""
    body = {"groupname": groupname, "images": ranking}
    for attempt in range(1, retries + 2):
        try:
            response = _post_within(url, body, timeout)
        except requests.Timeout:
            problem = f"no complete answer from {url} within {timeout:g} s"
        except requests.ConnectionError as exc:
            problem = f"cannot connect to {url} ({_reason(exc)})"
        except requests.RequestException as exc:  # a bad url, say: retrying will not help
            raise SubmitFailed(f"cannot post to {url} ({_reason(exc)})", attempt) from None
        else:
            if response.status_code < 400:
                return _accuracy(response, attempt), attempt
            problem = (f"HTTP {response.status_code} {response.reason} from {url}: "
                       f"{_first_line(response.text)}")
            if response.status_code < 500:  # the server refuses this submission
                raise SubmitFailed(problem, attempt)
        if attempt <= retries:
            delay = backoff * 2 ** (attempt - 1)
            print(f"  {problem}; retry {attempt} of {retries} in {delay:g} s", flush=True)
            time.sleep(delay)
    raise SubmitFailed(f"{problem} (gave up after {attempt} attempts)", attempt)


def _post_within(url: str, body: dict, timeout: float) -> requests.Response:
    """requests.post with `timeout` bounding the whole request. requests' own timeout bounds
    each socket read, so a server sending a byte now and then could hold a request for ever.
    The request runs in a daemon thread that is left behind (to finish or time out on its
    own) when the deadline passes."""
    done: dict = {}

    def send() -> None:
        try:
            done["response"] = requests.post(url, json=body, timeout=timeout)
        except Exception as exc:  # handed to the caller's thread
            done["error"] = exc

    worker = threading.Thread(target=send, name="submit-post", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise requests.Timeout(f"no complete answer within {timeout:g} s")
    if "error" in done:
        raise done["error"]
    return done["response"]


def _accuracy(response: requests.Response, attempt: int) -> float:
    try:
        data = response.json()
    except ValueError:
        raise SubmitFailed(f"answer from {response.url} is not JSON: "
                           f"{_first_line(response.text)}", attempt) from None
    value = data.get("accuracy", data.get("results")) if isinstance(data, dict) else None
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise SubmitFailed(f"answer from {response.url} holds no accuracy (nor results) "
                           f"number: {_first_line(response.text)}", attempt)
    return float(value)


def _first_line(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else "(empty body)"
    return line if len(line) <= MESSAGE_CHARS else line[:MESSAGE_CHARS] + "..."


def _reason(exc: Exception) -> str:
    """The OS-level cause buried in a requests exception ("[Errno 111] Connection refused")."""
    text = str(exc)
    found = re.search(r"\[Errno -?\d+\][^'\"()]*", text)
    return found.group(0).strip() if found else _first_line(text)


def read_ranking(path: Path) -> dict[str, list[str]]:
    """A results file: {query name: [gallery names, best first]}."""
    try:
        ranking = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ClipcoreError(f"{path}: cannot read results ({exc})") from None
    if not isinstance(ranking, dict) or not ranking or not all(
            isinstance(names, list) for names in ranking.values()):
        raise ClipcoreError(f"{path}: expected a non-empty object of query name -> "
                            f"[gallery names] (run `dvc repro retrieve`)")
    return ranking


def local_labels(prepared: Path) -> GroundTruth | None:
    """The test labels the manifests know, or None when any query or gallery label is unknown."""
    query = labels_by_name(read_manifest(prepared, "query"))
    gallery = labels_by_name(read_manifest(prepared, "gallery"))
    return None if query is None or gallery is None else GroundTruth(query, gallery)


def submit_all(submit: SubmitParams, results: Path, prepared: Path, csv_path: Path,
               metrics_path: Path, history_path: Path,
               environ: Mapping[str, str] = os.environ) -> list[Outcome]:
    """Submit or score every epoch's results file in epoch order, appending each server answer
    to the history and writing the CSV and metrics after each epoch; ClipcoreError at the end
    naming the epochs that failed."""
    try:
        files = epoch_files(results, RESULTS_PATTERN)
    except ValueError as exc:  # a stray file such as retrieval_results_epoch_best.json
        raise ClipcoreError(str(exc)) from None
    if not files:
        raise ClipcoreError(f"{results}: no {RESULTS_PATTERN} files (run `dvc repro retrieve`)")
    source, groupname, scorer = _scorer(submit, prepared, environ)
    append_history(history_path, [])  # an output DVC expects, even when no server is asked
    # Answers this server already gave this group, by the digest of the ranking sent.
    earlier = {} if source == LOCAL or submit.force else {
        entry["ranking_sha256"]: entry for entry in read_history(history_path)
        if entry.get("status") == "ok" and entry.get("source") == source
        and entry.get("groupname") == groupname}
    outcomes, rows = [], []
    for path in files:
        outcome = _submit_one(path, scorer, earlier)
        if outcome.attempts and outcome.status != REUSED:  # the server was asked just now
            append_history(history_path, [{"source": source, "groupname": groupname,
                                           **dataclasses.asdict(outcome)}])
        outcomes.append(outcome)
        rows.append({"epoch": outcome.epoch, "accuracy": outcome.accuracy, "source": source,
                     "status": outcome.status, "submitted_at": outcome.submitted_at,
                     "attempts": outcome.attempts})
        write_text_atomic(csv_path, pd.DataFrame(rows, columns=CSV_COLUMNS).to_csv(
            index=False, lineterminator="\n"))
        write_text_atomic(metrics_path, json.dumps(_metrics(outcomes), indent=2) + "\n")
        print(f"epoch {outcome.epoch}: {_summary(outcome, source)}", flush=True)
    failed = [outcome for outcome in outcomes if outcome.failed]
    if failed:
        raise ClipcoreError(f"failed epochs: {', '.join(str(o.epoch) for o in failed)} (first: "
                            f"{failed[0].status}); every epoch's status is in {csv_path}")
    return outcomes


def _scorer(submit: SubmitParams, prepared: Path,
            environ: Mapping[str, str]) -> tuple[str, str, Scorer | None]:
    """(source, group name, scorer) for the params: the server at submit.url, or the local test
    labels."""
    if submit.url:
        if not submit.url.startswith(("http://", "https://")):
            raise ClipcoreError(f"params: 'submit.url' must start with http:// or https://, "
                                f"got {submit.url!r}")
        groupname = group_name(submit.groupname, environ)
        if not groupname:
            raise ClipcoreError(f"params: 'submit.groupname' is empty and {GROUPNAME_VARIABLE} "
                                f"is not set; the server at {submit.url} needs a group name")
        return submit.url, groupname, lambda ranking: post_ranking(
            submit.url, groupname, ranking, submit.timeout, submit.retries, submit.backoff)
    labels = local_labels(prepared)
    if labels is None:
        print(f"test labels unknown in {prepared} and submit.url is empty: writing rows without "
              f"accuracy (set submit.url to score on the server)", flush=True)
        return LOCAL, "", None
    return LOCAL, "", lambda ranking: (score_ranking(ranking, labels), 0)


def _submit_one(path: Path, scorer: Scorer | None, earlier: dict[str, dict]) -> Outcome:
    """One epoch's outcome: the earlier answer to the same ranking, else a new one."""
    epoch, now = epoch_of(path), _now()
    try:
        # retrieve.top_k may exceed what the competition takes: it scores the first ten.
        ranking = {query: names[:COMPETITION_TOP_K] for query, names in read_ranking(path).items()}
        digest = ranking_digest(ranking)
        if digest in earlier:
            answer = earlier[digest]
            return Outcome(epoch, answer["accuracy"], REUSED, answer["attempts"], failed=False,
                           submitted_at=answer["submitted_at"], ranking_sha256=digest)
        if scorer is None:
            return Outcome(epoch, None, "not scored: test labels unknown", 0, False, now, digest)
        accuracy, attempts = scorer(ranking)
    except SubmitFailed as exc:
        return Outcome(epoch, None, str(exc), exc.attempts, True, now, digest)
    except InvalidSubmission as exc:  # what the scorer would answer with a 400
        return Outcome(epoch, None, f"local scoring refused {path}: {exc}", 0, True, now, digest)
    except ClipcoreError as exc:
        return Outcome(epoch, None, str(exc), 0, failed=True, submitted_at=now)
    return Outcome(epoch, accuracy, "ok", attempts, False, now, digest)


def ranking_digest(ranking: dict) -> str:
    """sha256 of a ranking, whatever the order of its queries."""
    text = json.dumps(ranking, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def read_history(path: Path) -> list[dict]:
    """Every entry of a submission history, typed; a row cut short by a crash is skipped with
    a warning."""
    if not Path(path).is_file():
        return []
    entries = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        for row in reader:
            try:
                if None in row or None in row.values():  # too many or too few fields
                    raise ValueError
                entries.append({**row, "epoch": int(row["epoch"]),
                                "accuracy": float(row["accuracy"]) if row["accuracy"] else None,
                                "attempts": int(row["attempts"])})
            except ValueError:
                print(f"warning: {path}: line {reader.line_num} is not a history entry, "
                      f"ignored", file=sys.stderr)
    return entries


def append_history(path: Path, entries: list[dict]) -> None:
    """Add rows to the history (the header first when it is new), never rewriting what is
    there; on disk before returning."""
    path = Path(path)
    lines = io.StringIO()
    writer = csv.writer(lines, lineterminator="\n")
    for entry in entries:
        writer.writerow(["" if entry[c] is None else entry[c] for c in HISTORY_COLUMNS])
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a+b") as f:  # writes go to the end, whatever the position
            size = f.seek(0, os.SEEK_END)
            if not size:
                f.write((",".join(HISTORY_COLUMNS) + "\n").encode("utf-8"))
            else:
                f.seek(size - 1)
                if f.read(1) != b"\n":  # a row cut short by a crash
                    f.write(b"\n")
            f.write(lines.getvalue().encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise ClipcoreError(f"{path}: cannot append ({exc.strerror or exc})") from None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _summary(outcome: Outcome, source: str) -> str:
    if outcome.accuracy is None:
        return outcome.status
    if outcome.status == REUSED:
        return (f"accuracy {outcome.accuracy:.2f} ({source} answered {outcome.submitted_at}; "
                f"same ranking, not posted again)")
    retried = f", {outcome.attempts} attempts" if outcome.attempts > 1 else ""
    return f"accuracy {outcome.accuracy:.2f} ({source}{retried})"


def _metrics(outcomes: list[Outcome]) -> dict:
    """For `dvc metrics show`: every scored epoch's accuracy and the best (earliest on ties)."""
    scored = [o for o in outcomes if o.accuracy is not None]
    metrics: dict = {"epochs": {str(o.epoch): o.accuracy for o in scored}}
    if scored:
        best = max(scored, key=lambda o: o.accuracy)  # max keeps the first of equals
        metrics["best"] = {"epoch": best.epoch, "accuracy": best.accuracy}
    return metrics
