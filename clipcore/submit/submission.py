"""Submitting every epoch's retrieval results: to the competition server, or scored locally.

With `submit.url` set, each distinct ranking is POSTed once as `{"groupname": ..., "images":
ranking}` (clipcore.submit.posting) and what the server answered goes into the user's history
(clipcore.submit.history), shared by every run and experiment. Epochs that rank alike (WiSE-FT at
alpha 0 ranks every epoch as epoch 0) share that one post; a ranking this server already scored
for the group is never posted again (its answer is used), and one whose request may have reached
it unanswered is not sent again unless `submit.force` is set (a real server may count every
post). An answer that comes after the timeout is still recorded: the stage waits one more
`submit.timeout` for it at the end. With no url, the ranking is scored here with the known test
labels by the same rules as `clipcore.submit.scorer`, so the number is the one a server with
those labels would give; the history is not touched.

The CSV and metrics describe the current results files and are rewritten (atomically) after
every epoch; the epochs that failed are named at the end.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as Deadline
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Mapping

import pandas as pd

from clipcore.data.manifests import labels_by_name, read_manifest
from clipcore.errors import ClipcoreError
from clipcore.files import write_text_atomic
from clipcore.params import SubmitParams
from clipcore.paths import epoch_files, epoch_of
from clipcore.submit.history import (
    ANSWERED,
    ANSWERED_LATE,
    SENDING,
    History,
    csv_line,
    merge_legacy,
    ranking_digest,
)
from clipcore.submit.posting import (
    FORCE_HINT,
    SubmitFailed,
    Unanswered,
    post_ranking,
    read_answer,
)
from clipcore.submit.scorer import (
    COMPETITION_TOP_K,
    GroundTruth,
    InvalidSubmission,
    score_ranking,
)

GROUPNAME_VARIABLE = "CLIPCORE_GROUPNAME"
LOCAL = "local"
CSV_COLUMNS = ["epoch", "accuracy", "source", "status", "submitted_at", "attempts"]
REUSED = "ok (earlier answer, not posted again)"
RESULTS_PATTERN = "retrieval_results_epoch_*.json"

Scorer = Callable[[dict], tuple[float, int]]  # ranking -> (accuracy, attempts)


@dataclass(frozen=True)
class Outcome:
    epoch: int
    accuracy: float | None  # None: failed, or not scored (no labels and no server)
    status: str             # ANSWERED, a reuse, "not scored: ..." or the error
    attempts: int           # HTTP requests made (0 when scored locally)
    failed: bool
    submitted_at: str = ""     # ISO time, UTC
    ranking_sha256: str = ""   # of the ranking as sent (the results file cut to ten names)


def group_name(configured: str, environ: Mapping[str, str] = os.environ) -> str:
    """The group name to submit under: CLIPCORE_GROUPNAME when set, else submit.groupname.
    The variable wins so a name can stay out of params.yaml and each teammate can use theirs."""
    return environ.get(GROUPNAME_VARIABLE, "").strip() or configured.strip()


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
               environ: Mapping[str, str] = os.environ,
               legacy_history: Path | None = None) -> list[Outcome]:
    """Submit or score every epoch's results file in epoch order, appending each server answer
    to the history and writing the CSV and metrics after each epoch; ClipcoreError at the end
    naming the epochs that failed. A `legacy_history` (where older versions kept it, in the
    repository) is merged into the history first."""
    if legacy_history and Path(legacy_history).is_file():
        merged = merge_legacy(legacy_history, history_path)
        print(f"note: the submission history is now {history_path}, outside git and every "
              f"experiment; {merged} new rows merged from {legacy_history}, which is no longer "
              f"written and holds group names in plain text: `git rm {legacy_history}`",
              flush=True)
    try:
        files = epoch_files(results, RESULTS_PATTERN)
    except ValueError as exc:  # a stray file such as retrieval_results_epoch_best.json
        raise ClipcoreError(str(exc)) from None
    if not files:
        raise ClipcoreError(f"{results}: no {RESULTS_PATTERN} files (run `dvc repro retrieve`)")
    source, groupname, scorer = _scorer(submit, prepared, environ)
    if source != LOCAL:
        print(f"submission history: {history_path}", flush=True)
    run = _Run(source, scorer, History(history_path, source, groupname), submit.force,
               csv_path, metrics_path)
    for path in files:
        run.add(path)
        run.collect_late_answers(wait=0.0)
    run.collect_late_answers(wait=submit.timeout)
    failed = [outcome for outcome in run.outcomes if outcome.failed]
    if failed:
        raise ClipcoreError(f"failed epochs: {', '.join(str(o.epoch) for o in failed)} (first: "
                            f"{failed[0].status}); every epoch's status is in {csv_path}")
    return run.outcomes


def _scorer(submit: SubmitParams, prepared: Path,
            environ: Mapping[str, str]) -> tuple[str, str, Scorer | None]:
    """(source, group name, scorer) for the params: the server at submit.url, or the local test
    labels."""
    if submit.url:
        if not submit.url.lower().startswith(("http://", "https://")):
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


class _Run:
    """One run's outcomes, epoch by epoch: each ranking asked once, the requests still out."""

    def __init__(self, source: str, scorer: Scorer | None, history: History, force: bool,
                 csv_path: Path, metrics_path: Path):
        self.source, self.scorer, self.history, self.force = source, scorer, history, force
        self.csv_path, self.metrics_path = csv_path, metrics_path
        self.outcomes: list[Outcome] = []
        self.asked: dict[str, Outcome] = {}    # the server's outcome of each ranking, by digest
        self.pending: dict[str, Future] = {}   # requests an answer may still come to, by digest

    def add(self, path: Path) -> None:
        """Submit (or score) one epoch's results file, then write the tables."""
        outcome = self._outcome(path)
        self.outcomes.append(outcome)
        self._write()
        print(f"epoch {outcome.epoch}: {_summary(outcome, self.source)}", flush=True)

    def _outcome(self, path: Path) -> Outcome:
        epoch = epoch_of(path)
        try:
            # retrieve.top_k may exceed what the competition takes: it scores the first ten.
            ranking = {query: names[:COMPETITION_TOP_K]
                       for query, names in read_ranking(path).items()}
        except ClipcoreError as exc:
            return Outcome(epoch, None, str(exc), 0, failed=True, submitted_at=_now())
        digest = ranking_digest(ranking)
        if self.source == LOCAL:
            return self._score_here(path, epoch, ranking, digest)
        if digest in self.asked:
            return _same_as(self.asked[digest], epoch)
        with self.history.turn():  # other runs wait: one posts, the others use its answer
            self.asked[digest] = self._ask(epoch, ranking, digest)
        return self.asked[digest]

    def _score_here(self, path: Path, epoch: int, ranking: dict, digest: str) -> Outcome:
        if self.scorer is None:
            return Outcome(epoch, None, "not scored: test labels unknown", 0, False, _now(),
                           digest)
        try:
            accuracy, _ = self.scorer(ranking)
        except InvalidSubmission as exc:  # what the scorer would answer with a 400
            return Outcome(epoch, None, f"local scoring refused {path}: {exc}", 0, True, _now(),
                           digest)
        return Outcome(epoch, accuracy, ANSWERED, 0, False, _now(), digest)

    def _ask(self, epoch: int, ranking: dict, digest: str) -> Outcome:
        """The history's answer to this ranking, else the server's, recorded in the history:
        a row before the request (the news that the server may have it, whatever happens
        next), one with what came back after it."""
        earlier = self.history.answer(digest)
        if earlier:
            return Outcome(epoch, earlier["accuracy"], REUSED, earlier["attempts"], False,
                           earlier["submitted_at"], digest)
        sent = None if self.force else self.history.unanswered(digest)
        if sent:
            return Outcome(epoch, None, f"not sent again: the request of {sent['submitted_at']} "
                           f"(epoch {sent['epoch']}) got no answer and may have reached the "
                           f"server ({FORCE_HINT})", 0, True, _now(), digest)
        now = _now()
        try:
            self.history.record(self.history.row(dataclasses.asdict(
                Outcome(epoch, None, SENDING, 0, True, now, digest))))
        except ClipcoreError as exc:
            return Outcome(epoch, None, f"not sent: {exc}", 0, True, now, digest)
        try:
            accuracy, attempts = self.scorer(ranking)
        except SubmitFailed as exc:
            outcome = Outcome(epoch, None, str(exc), exc.attempts, True, now, digest)
            if isinstance(exc, Unanswered) and exc.request:
                self.pending[digest] = exc.request
        else:
            outcome = Outcome(epoch, accuracy, ANSWERED, attempts, False, now, digest)
        return self._keep(outcome)

    def _keep(self, outcome: Outcome) -> Outcome:
        """Record what the server said; when the history can't take it (a full disk), print
        the row to add and fail the epoch: the server's word is never lost unsaid."""
        row = self.history.row(dataclasses.asdict(outcome))
        try:
            self.history.record(row)
        except ClipcoreError as exc:
            print(f"epoch {outcome.epoch}: {_summary(outcome, self.source)}; {exc}: add this "
                  f"line to {self.history.path} when it can be written, or the next run won't "
                  f"know the answer:\n{csv_line(row)}", end="", flush=True)
            return dataclasses.replace(outcome, failed=True, status=f"{outcome.status}, but "
                                       f"not in the history (the line to add is in the output)")
        return outcome

    def collect_late_answers(self, wait: float) -> None:
        """Record the answers that came after the timeout, waiting up to `wait` seconds in all
        for those still out."""
        if wait and self.pending:
            epochs = ", ".join(str(self.asked[digest].epoch) for digest in self.pending)
            print(f"waiting up to {wait:g} s for late answers (epochs {epochs})", flush=True)
        deadline = time.monotonic() + wait
        for digest, request in list(self.pending.items()):
            try:
                error = request.exception(max(0.0, deadline - time.monotonic()))
            except Deadline:
                continue
            del self.pending[digest]
            if error is None:
                self._record_late(digest, request.result())

    def _record_late(self, digest: str, response) -> None:
        first = self.asked[digest]
        try:
            late = dataclasses.replace(first, accuracy=read_answer(response, first.attempts),
                                       status=ANSWERED_LATE, failed=False)
        except SubmitFailed as exc:
            late = dataclasses.replace(first, status=f"late answer: {exc}")
        late = self._keep(late)
        self.asked[digest] = late
        self.outcomes = [late if o.epoch == first.epoch else
                         _same_as(late, o.epoch) if o.ranking_sha256 == digest else o
                         for o in self.outcomes]
        self._write()
        print(f"epoch {late.epoch}: late answer: {_summary(late, self.source)}", flush=True)

    def _write(self) -> None:
        rows = [{"epoch": o.epoch, "accuracy": o.accuracy, "source": self.source,
                 "status": o.status, "submitted_at": o.submitted_at, "attempts": o.attempts}
                for o in self.outcomes]
        write_text_atomic(self.csv_path, pd.DataFrame(rows, columns=CSV_COLUMNS).to_csv(
            index=False, lineterminator="\n"))
        write_text_atomic(self.metrics_path, json.dumps(_metrics(self.outcomes), indent=2)
                          + "\n")


def _same_as(first: Outcome, epoch: int) -> Outcome:
    """An epoch whose ranking an earlier epoch of this run sent: that epoch's outcome, marked."""
    note = f"same ranking as epoch {first.epoch}, not posted again"
    status = f"{note}: {first.status}" if first.failed else f"ok ({note})"
    return dataclasses.replace(first, epoch=epoch, status=status)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _summary(outcome: Outcome, source: str) -> str:
    if outcome.accuracy is None:
        return outcome.status
    if outcome.status == REUSED:
        return (f"accuracy {outcome.accuracy:.2f} ({source} answered {outcome.submitted_at}; "
                f"same ranking, not posted again)")
    if outcome.status == ANSWERED:
        retried = f", {outcome.attempts} attempts" if outcome.attempts > 1 else ""
        return f"accuracy {outcome.accuracy:.2f} ({source}{retried})"
    return f"accuracy {outcome.accuracy:.2f}, {outcome.status}"


def _metrics(outcomes: list[Outcome]) -> dict:
    """For `dvc metrics show`: every scored epoch's accuracy and the highest (earliest on ties),
    as `best_on_server`: the server's test picked it, an upper bound (repository/best is the
    val-picked epoch)."""
    scored = [o for o in outcomes if o.accuracy is not None]
    metrics: dict = {"epochs": {str(o.epoch): o.accuracy for o in scored}}
    if scored:
        best = max(scored, key=lambda o: o.accuracy)  # max keeps the first of equals
        metrics["best_on_server"] = {"epoch": best.epoch, "accuracy": best.accuracy}
    return metrics
