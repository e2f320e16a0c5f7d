"""The submission history: every ranking sent to a server, for which group, and what came back.

One CSV file per user, outside the repository and every experiment (so `dvc exp apply`, `dvc
checkout` and queued runs, which each restore or copy the workspace, can't drop or fork it):
CLIPCORE_SUBMIT_HISTORY, else $XDG_DATA_HOME (~/.local/share)/clipcore/submission_history.csv.
Appended to and never rewritten, under a lock held from reading it to recording the answer, so
runs at once (queued experiments in parallel) post a ranking once. A row goes in before each
request ("sending") and one with what came back after it, so a run that stops or cannot write
the answer still leaves the news that the server may have the post. The group name is kept as a
salted sha256 only. It is how a later run knows what not to send again: a ranking the same server
already scored for the same group (its answer is used again), and one whose request got no answer
but may have reached the server (sent again only with submit.force).
"""
from __future__ import annotations

import csv
import fcntl
import hashlib
import hmac
import io
import json
import os
import secrets
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping
from urllib.parse import urlsplit

from clipcore.errors import ClipcoreError
from clipcore.submit.scorer import is_score

HISTORY_VARIABLE = "CLIPCORE_SUBMIT_HISTORY"
COLUMNS = ["submitted_at", "epoch", "accuracy", "source", "group_sha256", "status", "attempts",
           "ranking_sha256"]
ANSWERED = "ok"
ANSWERED_LATE = "ok (answered after the timeout)"
UNANSWERED = "no answer"  # a status's first words: sent, and it may have reached the server
SENDING = f"{UNANSWERED} recorded: sending (the run stopped, or could not write what came back)"
LOOPBACK = {"localhost", "127.0.0.1", "::1"}


def history_path(environ: Mapping[str, str] = os.environ) -> Path:
    """The user's history file: CLIPCORE_SUBMIT_HISTORY (absolute: queued experiments run in
    other folders), else under $XDG_DATA_HOME or ~/.local/share."""
    given = environ.get(HISTORY_VARIABLE, "").strip()
    if given:
        path = Path(given).expanduser()
        if not path.is_absolute():
            raise ClipcoreError(f"{HISTORY_VARIABLE}={given!r}: give an absolute path (queued "
                                f"experiments run in other folders)")
        return path
    data = environ.get("XDG_DATA_HOME", "").strip() or Path.home() / ".local" / "share"
    return Path(data) / "clipcore" / "submission_history.csv"


def ranking_digest(ranking: dict) -> str:
    """sha256 of a ranking, whatever the order of its queries."""
    text = json.dumps(ranking, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def group_digest(name: str, salt: str = "") -> str:
    """'salt:sha256(salt, name)', a fresh random salt unless given: the file never holds the
    name, and equal names don't look equal in it."""
    salt = salt or secrets.token_hex(8)
    return f"{salt}:{hashlib.sha256(f'{salt}:{name}'.encode('utf-8')).hexdigest()}"


def is_group(digest: str, name: str) -> bool:
    return hmac.compare_digest(group_digest(name, digest.partition(":")[0] or "-"), digest)


def server_key(url: str) -> str:
    """One server however its url is written: case, default port, trailing slash, and localhost
    / 127.0.0.1 / ::1 (one machine) don't matter; the path and query do."""
    parts = urlsplit(url.strip())
    try:
        port = parts.port
    except ValueError:  # not a url the stage would post to: compared as written
        return url
    scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
    port = port or {"http": 80, "https": 443}.get(scheme)
    query = f"?{parts.query}" if parts.query else ""
    return f"{scheme}://{'loopback' if host in LOOPBACK else host}:{port}" \
           f"{parts.path.rstrip('/')}{query}"


class History:
    """One server's and one group's part of the history file. `turn()` holds the file's lock
    and reads what the server answered to which ranking so far; `record` appends a row."""

    def __init__(self, path: Path, source: str, groupname: str):
        self.path, self.source, self.groupname = Path(path), source, groupname
        self._earlier: list[dict] = []

    @contextmanager
    def turn(self) -> Iterator[History]:
        """Hold the lock (other runs wait) and read the latest history."""
        with locked(self.path):
            key = server_key(self.source)
            self._earlier = [entry for entry in read_history(self.path)
                             if server_key(entry["source"]) == key
                             and is_group(entry.get("group_sha256", ""), self.groupname)]
            yield self

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

    def row(self, entry: Mapping) -> dict:
        """A row of this server and group (the name as a salted digest) from the other COLUMNS."""
        return {**entry, "source": self.source, "group_sha256": group_digest(self.groupname)}

    def record(self, row: Mapping) -> None:
        """Append one row made by `row`, under the lock; on disk before returning."""
        append_history(self.path, [row])


_held = threading.local()  # .held: the lock files this thread holds (locked() nests)


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` for writers and readers that decide from it (a .lock file
    beside it; flock, released when the process ends however it ends). Taken again by the
    thread that holds it (a turn that records), it is already held."""
    lock = Path(f"{path}.lock")
    held = _held.__dict__.setdefault("held", set())
    if os.path.abspath(lock) in held:
        yield
        return
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        handle = open(lock, "a")
    except OSError as exc:
        raise ClipcoreError(f"{lock}: cannot open the history's lock ({exc.strerror or exc})") \
            from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another run using {path}", flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        held.add(os.path.abspath(lock))
        try:
            yield
        finally:
            held.discard(os.path.abspath(lock))


def read_history(path: Path) -> list[dict]:
    """Every entry of a submission history, typed (a BOM and CRLF line ends, as spreadsheets
    save, are fine); a row cut short by a crash is skipped with a warning."""
    if not Path(path).is_file():
        return []
    entries = []
    with open(path, newline="", encoding="utf-8-sig") as f:
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


def csv_line(row: Mapping) -> str:
    """One row as the history writes it."""
    lines = io.StringIO()
    csv.writer(lines, lineterminator="\n").writerow(
        ["" if row[c] is None else row[c] for c in COLUMNS])
    return lines.getvalue()


def append_history(path: Path, rows: list[Mapping]) -> None:
    """Add rows to the history (the header first when it is new), never rewriting what is
    there; on disk before returning. A write that fails (a full disk) is taken back whole.
    Under the lock: two runs creating the file at once would each see it empty and write a
    header."""
    path = Path(path)
    with locked(path):
        _append(path, "".join(csv_line(row) for row in rows).encode("utf-8"))


def _append(path: Path, text: bytes) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as exc:
        raise ClipcoreError(f"{path}: cannot append ({exc.strerror or exc})") from None
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        if not size:
            text = (",".join(COLUMNS) + "\n").encode("utf-8") + text
        elif os.pread(fd, 1, size - 1) not in (b"\n", b"\r"):  # a row cut short by a crash
            text = b"\n" + text
        try:
            while text:  # a write may take part of it
                text = text[os.write(fd, text):]
            os.fsync(fd)
        except OSError as exc:
            os.ftruncate(fd, size)  # no half row for the next reader
            raise ClipcoreError(f"{path}: cannot append ({exc.strerror or exc})") from None
    finally:
        os.close(fd)


LEGACY_SAME = ["submitted_at", "epoch", "source", "status", "attempts", "ranking_sha256"]


def merge_legacy(legacy: Path, path: Path) -> int:
    """Append to the history the rows of one older versions kept in the repository (group names
    in plain text) that it lacks, the names digested; how many. Run again (an old experiment
    applied brings the file back), it adds nothing."""
    old = [entry for entry in read_history(legacy) if "groupname" in entry]
    if not old:
        return 0
    with locked(path):
        have = read_history(path)
        new = [{**entry, "group_sha256": group_digest(entry["groupname"])} for entry in old
               if not any(all(str(entry[c]) == str(kept[c]) for c in LEGACY_SAME)
                          and is_group(kept["group_sha256"], entry["groupname"])
                          for kept in have)]
        if new:
            append_history(path, new)
    return len(new)
