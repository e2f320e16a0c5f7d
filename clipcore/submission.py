"""Submitting every epoch's retrieval results: to the competition server, or scored locally.

With `submit.url` set, each results file is POSTed as `{"groupname": ..., "images": ranking}`
and the server's `accuracy` (older editions: `results`) is recorded. Connection failures,
timeouts and 5xx answers are retried with doubling backoff; a 4xx is the server refusing this
submission, so it is reported, not retried. With no url, the ranking is scored here with the
known test labels by the same rules as `clipcore.scorer`, so the number is the one a server
with those labels would give.

Nothing is lost on a failure: results files are only read, the CSV and metrics are rewritten
(atomically) after every epoch, and the epochs that failed are named at the end.
"""
from __future__ import annotations

import json
import os
import re
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
    status: str             # "ok", "not scored: ..." or the error
    attempts: int           # HTTP requests made (0 when scored locally)
    failed: bool


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
            response = requests.post(url, json=body, timeout=timeout)
        except requests.Timeout:
            problem = f"no answer from {url} within {timeout:g} s"
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
               metrics_path: Path, environ: Mapping[str, str] = os.environ) -> list[Outcome]:
    """Submit or score every epoch's results file in epoch order, writing the CSV and metrics
    after each; ClipcoreError at the end naming the epochs that failed."""
    try:
        files = epoch_files(results, RESULTS_PATTERN)
    except ValueError as exc:  # a stray file such as retrieval_results_epoch_best.json
        raise ClipcoreError(str(exc)) from None
    if not files:
        raise ClipcoreError(f"{results}: no {RESULTS_PATTERN} files (run `dvc repro retrieve`)")
    source, scorer = _scorer(submit, prepared, environ)
    outcomes, rows = [], []
    for path in files:
        outcome = _submit_one(path, scorer)
        outcomes.append(outcome)
        rows.append({"epoch": outcome.epoch, "accuracy": outcome.accuracy, "source": source,
                     "status": outcome.status,
                     "submitted_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
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
            environ: Mapping[str, str]) -> tuple[str, Scorer | None]:
    """(source, scorer) for the params: the server at submit.url, or the local test labels."""
    if submit.url:
        if not submit.url.startswith(("http://", "https://")):
            raise ClipcoreError(f"params: 'submit.url' must start with http:// or https://, "
                                f"got {submit.url!r}")
        groupname = group_name(submit.groupname, environ)
        if not groupname:
            raise ClipcoreError(f"params: 'submit.groupname' is empty and {GROUPNAME_VARIABLE} "
                                f"is not set; the server at {submit.url} needs a group name")
        return submit.url, lambda ranking: post_ranking(
            submit.url, groupname, ranking, submit.timeout, submit.retries, submit.backoff)
    labels = local_labels(prepared)
    if labels is None:
        print(f"test labels unknown in {prepared} and submit.url is empty: writing rows without "
              f"accuracy (set submit.url to score on the server)", flush=True)
        return LOCAL, None
    return LOCAL, lambda ranking: (score_ranking(ranking, labels), 0)


def _submit_one(path: Path, scorer: Scorer | None) -> Outcome:
    epoch = epoch_of(path)
    try:
        # retrieve.top_k may exceed what the competition takes: it scores the first ten.
        ranking = {query: names[:COMPETITION_TOP_K] for query, names in read_ranking(path).items()}
        if scorer is None:
            return Outcome(epoch, None, "not scored: test labels unknown", 0, failed=False)
        accuracy, attempts = scorer(ranking)
    except SubmitFailed as exc:
        return Outcome(epoch, None, str(exc), exc.attempts, failed=True)
    except InvalidSubmission as exc:  # what the scorer would answer with a 400
        return Outcome(epoch, None, f"local scoring refused {path}: {exc}", 0, failed=True)
    except ClipcoreError as exc:
        return Outcome(epoch, None, str(exc), 0, failed=True)
    return Outcome(epoch, accuracy, "ok", attempts, failed=False)


def _summary(outcome: Outcome, source: str) -> str:
    if outcome.accuracy is None:
        return outcome.status
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
