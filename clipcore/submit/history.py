"""The submission history: every ranking sent to a server, for which group, and what came back.

One CSV file, appended to and never rewritten, one row per request series (the first try and
its retries) and one more when an answer arrives after the timeout. It is how a later run knows
what not to send again: a ranking the same server already scored for the same group (its answer
is used again), and one whose request got no answer but may have reached the server (sent again
only when the user says so, with submit.force).
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import sys
from pathlib import Path
from typing import Mapping

from clipcore.errors import ClipcoreError
from clipcore.submit.scorer import is_score

COLUMNS = ["submitted_at", "epoch", "accuracy", "source", "groupname", "status", "attempts",
           "ranking_sha256"]
ANSWERED = "ok"
ANSWERED_LATE = "ok (answered after the timeout)"
UNANSWERED = "no answer"  # a status's first words: sent, and it may have reached the server


def ranking_digest(ranking: dict) -> str:
    """sha256 of a ranking, whatever the order of its queries."""
    text = json.dumps(ranking, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class History:
    """One server's and one group's part of the history file: what it answered to which ranking
    in earlier runs (none with `forget_earlier`, as submit.force asks); this run appends to it."""

    def __init__(self, path: Path, source: str, groupname: str, forget_earlier: bool = False):
        self.path, self.source, self.groupname = Path(path), source, groupname
        append_history(self.path, [])  # an output DVC expects, even when no server is asked
        self._earlier = [] if forget_earlier else [
            entry for entry in read_history(self.path)
            if entry["source"] == source and entry["groupname"] == groupname]

    def answer(self, digest: str) -> dict | None:
        """The latest valid answer to this ranking."""
        return next((entry for entry in reversed(self._earlier)
                     if entry["ranking_sha256"] == digest
                     and entry["status"] in (ANSWERED, ANSWERED_LATE)
                     and is_score(entry["accuracy"])), None)

    def unanswered(self, digest: str) -> dict | None:
        """The request of this ranking that may have reached the server unanswered, when that
        is the latest news of it (a failure since then, or an answer, supersedes it)."""
        latest = next((entry for entry in reversed(self._earlier)
                       if entry["ranking_sha256"] == digest), None)
        return latest if latest and latest["status"].startswith(UNANSWERED) else None

    def record(self, entry: Mapping) -> None:
        """Append one row (a mapping with the other COLUMNS) under this server and group; on
        disk before returning."""
        append_history(self.path, [{**entry, "source": self.source,
                                    "groupname": self.groupname}])


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


def append_history(path: Path, entries: list[Mapping]) -> None:
    """Add rows to the history (the header first when it is new), never rewriting what is
    there; on disk before returning."""
    path = Path(path)
    lines = io.StringIO()
    writer = csv.writer(lines, lineterminator="\n")
    for entry in entries:
        writer.writerow(["" if entry[c] is None else entry[c] for c in COLUMNS])
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a+b") as f:  # writes go to the end, whatever the position
            size = f.seek(0, os.SEEK_END)
            if not size:
                f.write((",".join(COLUMNS) + "\n").encode("utf-8"))
            else:
                f.seek(size - 1)
                if f.read(1) != b"\n":  # a row cut short by a crash
                    f.write(b"\n")
            f.write(lines.getvalue().encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise ClipcoreError(f"{path}: cannot append ({exc.strerror or exc})") from None
