"""A local stand-in for the competition's scoring server, for dry runs of the submit stage.

    python -m clipcore.submit.scorer --labels data/demo/test_labels.csv --port 8000

It speaks the competition's protocol: a POST whose body is the JSON
`{"groupname": ..., "images": {query_name: [gallery_name, ...], ...}}`, read from the raw body
whatever the content type (teams send it both as `json=` and as a bare `json.dumps` string),
answered with 200 `{"accuracy": x}` (0-1000, the shared measure), or 400 and a plain-text
reason, not JSON, like the real server. The same rules decide local scoring in the submit
stage, so a dry run, a local score and the scorer agree.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from clipcore import paths
from clipcore.data.manifests import read_labels_table
from clipcore.errors import ClipcoreError
from clipcore.ranking.measures import SCORE_WEIGHTS, metrics_for_names
from clipcore.stage import run_stage

COMPETITION_TOP_K = 10  # the competition scores ten gallery names per query
MAX_ACCURACY = sum(SCORE_WEIGHTS.values())  # every query's first name right
SHOWN_NAMES = 3         # names quoted in a reason before "and N more"


class InvalidSubmission(ValueError):
    """Why a submission cannot be scored; the scorer's 400 answer."""


@dataclass(frozen=True)
class GroundTruth:
    query: dict[str, str]    # query file name -> class
    gallery: dict[str, str]  # gallery file name -> class


def read_labels(path: str | Path) -> GroundTruth:
    """The classes of the test images from a `test_labels.csv` (columns split,file,label)."""
    path = Path(path)
    if not path.is_file():
        raise ClipcoreError(f"{path}: labels file not found (run `dvc repro demo`, "
                            f"or give --labels)")
    table = read_labels_table(path)
    bad = table[~table["split"].isin(["query", "gallery"]) | (table["label"] == "")
                | table.duplicated(["split", "file"])]
    if len(bad):
        raise ClipcoreError(f"{path}: line {bad.index[0] + 2}: split must be query or gallery, "
                            f"the label non-empty and each file listed once")
    labels = {split: dict(zip(rows["file"], rows["label"]))
              for split, rows in table.groupby("split")}
    if not labels.get("query") or not labels.get("gallery"):
        raise ClipcoreError(f"{path}: needs rows for both query and gallery images")
    return GroundTruth(query=labels["query"], gallery=labels["gallery"])


def parse_body(body: bytes) -> tuple[str, dict]:
    """(groupname, images) from a raw request body."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidSubmission(f"body is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise InvalidSubmission("body must be a JSON object with groupname and images")
    groupname, images = data.get("groupname"), data.get("images")
    if not isinstance(groupname, str) or not groupname.strip():
        raise InvalidSubmission("groupname missing or empty")
    if not isinstance(images, dict):
        raise InvalidSubmission("images missing or not an object of query name -> gallery names")
    return groupname, images


def score_ranking(ranking: dict, labels: GroundTruth, top_k: int = COMPETITION_TOP_K) -> float:
    """The accuracy (0-1000) of a ranking of every query; InvalidSubmission when malformed.

    A list may be shorter than top_k (retrieve.top_k below 10): it scores what it holds, a hit
    can't be beyond its end."""
    unknown = [query for query in ranking if query not in labels.query]
    if unknown:
        raise InvalidSubmission(f"unknown query names: {_some(unknown)}")
    for query, names in ranking.items():
        if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
            raise InvalidSubmission(f"query {query}: expected a list of gallery names")
        if not 1 <= len(names) <= top_k:
            raise InvalidSubmission(f"query {query}: expected 1 to {top_k} gallery names, "
                                    f"got {len(names)}")
        strangers = [name for name in names if name not in labels.gallery]
        if strangers:
            raise InvalidSubmission(f"query {query}: unknown gallery names: {_some(strangers)}")
        if len(set(names)) != len(names):
            twice = sorted({name for name in names if names.count(name) > 1})
            raise InvalidSubmission(f"query {query}: gallery names listed twice: {_some(twice)}")
    missing = [query for query in labels.query if query not in ranking]
    if missing:
        raise InvalidSubmission(f"missing {len(missing)} of {len(labels.query)} queries: "
                                f"{_some(missing)}")
    # The shared measure cuts every list to the shortest: score lists of each length apart.
    by_length: dict[int, dict] = {}
    for query, names in ranking.items():
        by_length.setdefault(len(names), {})[query] = names
    scores = {length: metrics_for_names(part, labels.query, labels.gallery, top_k)["score"]
              for length, part in by_length.items()}
    if len(scores) == 1:
        return scores.popitem()[1]
    return sum(scores[n] * len(part) for n, part in by_length.items()) / len(ranking)


def is_score(value: object) -> bool:
    """Whether a number can be a competition score (NaN, 1e9 or -5 can't)."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and 0 <= value <= MAX_ACCURACY)


def _some(names: list[str]) -> str:
    shown = ", ".join(names[:SHOWN_NAMES])
    return shown + (f" and {len(names) - SHOWN_NAMES} more" if len(names) > SHOWN_NAMES else "")


def make_server(labels: GroundTruth, host: str = "127.0.0.1", port: int = 0,
                top_k: int = COMPETITION_TOP_K) -> ThreadingHTTPServer:
    """A scoring server bound to (host, port); run it with serve_forever(), in a thread if need be.
    Port 0 picks a free port: read it from `server.server_address[1]`."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = self.headers.get("Content-Length", "0")
            body = self.rfile.read(int(length)) if length.isdigit() else b""  # b"": invalid JSON
            try:
                groupname, images = parse_body(body)
                accuracy = score_ranking(images, labels, top_k)
            except InvalidSubmission as exc:
                self._answer(400, "text/plain; charset=utf-8", str(exc), f"rejected: {exc}")
                return
            self._answer(200, "application/json", json.dumps({"accuracy": accuracy}),
                         f"group {groupname!r}: accuracy {accuracy:.2f}")

        def _answer(self, status: int, content_type: str, text: str, log: str) -> None:
            self.log_message("POST %s %d %s", self.path, status, log)  # the one line per request
            data = text.encode()
            self.send_response_only(status)  # send_response would log a second line
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return ThreadingHTTPServer((host, port), Handler)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m clipcore.submit.scorer",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--labels", default=str(paths.DEMO_ROOT / paths.DEMO_LABELS),
                        help="test_labels.csv with columns split,file,label (default: %(default)s)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000,
                        help="0 picks a free port (default: %(default)s)")
    parser.add_argument("--top-k", type=int, default=COMPETITION_TOP_K,
                        help="most gallery names scored per query (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.top_k < 1:
        parser.error("--top-k must be at least 1")
    labels = read_labels(args.labels)
    try:
        server = make_server(labels, args.host, args.port, args.top_k)
    except OSError as exc:
        raise ClipcoreError(f"--host {args.host} --port {args.port}: cannot listen "
                            f"({exc.strerror or exc})") from None
    host, port = server.server_address[:2]
    print(f"scoring {len(labels.query)} queries against {len(labels.gallery)} gallery images "
          f"at http://{host}:{port}/ (Ctrl-C stops)", flush=True)
    with server:
        server.serve_forever()


if __name__ == "__main__":
    run_stage(main)
