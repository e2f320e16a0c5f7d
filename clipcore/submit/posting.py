"""Posting one ranking to the competition server, and what its answer means.

A POST is tried again (after a doubling backoff) only where it provably did not reach the
server: the connection was refused or never made, or the server answered 5xx. A request that
may have reached it, with no complete answer within the timeout or a connection closed before
the answer, is not sent again: the caller hears Unanswered, and may still collect the answer
if it comes late. A redirect, a 4xx, an answer that is not JSON or that holds no score in
0..1000 is the server's word on this submission: a failure, not retried.
"""
from __future__ import annotations

import re
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as Deadline
from urllib.parse import urljoin

import requests
import urllib3

from clipcore.errors import ClipcoreError
from clipcore.submit.history import UNANSWERED
from clipcore.submit.scorer import MAX_ACCURACY, is_score

FORCE_HINT = "set submit.force: true to send it again"
MESSAGE_CHARS = 200  # how much of a server's error text a status keeps


class SubmitFailed(ClipcoreError):
    """One submission could not be scored; `attempts` requests were made."""

    def __init__(self, message: str, attempts: int):
        super().__init__(message)
        self.attempts = attempts


class ServerError(SubmitFailed):
    """A 5xx answer: the server failed and took nothing; worth another try."""


class Unanswered(SubmitFailed):
    """No answer came, but the request may have reached the server. `request` is the one
    still out, when an answer may yet come (None when the connection is gone)."""

    def __init__(self, message: str, attempts: int, request: Future | None):
        super().__init__(f"{message}: it may have reached the server, so it was not sent again "
                         f"({FORCE_HINT})", attempts)
        self.request = request


def post_ranking(url: str, groupname: str, ranking: dict, timeout: float, retries: int,
                 backoff: float) -> tuple[float, int]:
    """POST one ranking; (accuracy, attempts). Unanswered or SubmitFailed when no score came."""
    body = {"groupname": groupname, "images": ranking}
    for attempt in range(1, retries + 2):
        request = send(url, body, timeout)
        try:
            return read_answer(request.result(timeout), attempt), attempt
        except Deadline:
            raise Unanswered(f"{UNANSWERED} from {url} within {timeout:g} s", attempt,
                             request) from None
        except ServerError as exc:
            problem = str(exc)
        except (requests.ConnectionError, requests.Timeout,
                requests.exceptions.ChunkedEncodingError) as exc:
            if not _never_connected(exc):
                raise Unanswered(f"{UNANSWERED} from {url}, the connection broke "
                                 f"({_reason(exc)})", attempt, None) from None
            problem = f"cannot connect to {url} ({_reason(exc)})"
        except requests.RequestException as exc:  # a bad url, say: retrying will not help
            raise SubmitFailed(f"cannot post to {url} ({_reason(exc)})", attempt) from None
        if attempt <= retries:
            delay = backoff * 2 ** (attempt - 1)
            print(f"  {problem}; retry {attempt} of {retries} in {delay:g} s", flush=True)
            time.sleep(delay)
    raise SubmitFailed(f"{problem} (gave up after {attempt} attempts)", attempt)


def send(url: str, body: dict, timeout: float) -> Future:
    """Start the POST in a thread; the Future gets its response or its error. The caller waits
    on the Future with its deadline (requests' own timeout would bound each socket read, not
    the whole answer), and can still collect an answer that comes after it: so only connecting
    has a timeout here. A daemon thread: a request still out doesn't keep the process alive.
    Redirects are not followed: requests would turn the POST into a GET."""
    request: Future = Future()

    def post() -> None:
        try:
            request.set_result(requests.post(url, json=body, timeout=(timeout, None),
                                             allow_redirects=False))
        except Exception as exc:  # handed to the waiting thread
            request.set_exception(exc)

    threading.Thread(target=post, name="submit-post", daemon=True).start()
    return request


def read_answer(response: requests.Response, attempt: int) -> float:
    """The score in a server's answer; SubmitFailed (ServerError for a 5xx) when it has none."""
    code, url = response.status_code, response.url
    if response.is_redirect:
        where = urljoin(url, response.headers["Location"])
        raise SubmitFailed(f"HTTP {code} {response.reason} from {url} redirects to {where}: "
                           f"set submit.url to it if that is the server", attempt)
    if code >= 300:
        error = ServerError if code >= 500 else SubmitFailed
        raise error(f"HTTP {code} {response.reason} from {url}: {_first_line(response.text)}",
                    attempt)
    try:
        data = response.json()
    except ValueError:
        raise SubmitFailed(f"answer from {url} is not JSON: {_first_line(response.text)}",
                           attempt) from None
    key = "results" if isinstance(data, dict) and "accuracy" not in data else "accuracy"
    value = data.get(key) if isinstance(data, dict) else None
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise SubmitFailed(f"answer from {url} holds no accuracy (nor results) number: "
                           f"{_first_line(response.text)}", attempt)
    if not is_score(value):
        raise SubmitFailed(f"answer from {url}: {key} {value!r} is outside 0..{MAX_ACCURACY:g}, "
                           f"not a score: {_first_line(response.text)}", attempt)
    return float(value)


def _never_connected(exc: requests.RequestException) -> bool:
    """Whether the request provably never left: no connection was made (refused, no route,
    the host unknown or silent). A connection that broke later may have carried it."""
    reason = getattr(exc.args[0] if exc.args else None, "reason", None)
    return (isinstance(exc, requests.ConnectTimeout)
            or isinstance(reason, urllib3.exceptions.ConnectTimeoutError))


def _first_line(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else "(empty body)"
    return line if len(line) <= MESSAGE_CHARS else line[:MESSAGE_CHARS] + "..."


def _reason(exc: Exception) -> str:
    """The OS-level cause buried in a requests exception ("[Errno 111] Connection refused")."""
    text = str(exc)
    found = re.search(r"\[Errno -?\d+\][^'\"()]*", text)
    return found.group(0).strip() if found else _first_line(text)
