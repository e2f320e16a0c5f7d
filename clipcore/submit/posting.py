"""Posting one ranking to the competition server, and what its answer means.

A POST is tried again (after a doubling backoff) only where it provably did not reach the
server or the server took nothing: the connection was refused or never made, the server answered
500 or 503, or 429 (too many requests; a Retry-After is honoured). A request that may have
reached the server, with no complete answer within the timeout, a connection closed before the
answer, or a 502 / 504 (a gateway gave up waiting on a server that may still score it), is not
sent again: the caller hears Unanswered, and may still collect the answer if it comes late. A
certificate the client refuses stops the request before anything is sent: a failure, not
retried. A redirect, another 4xx, an answer that is not JSON or that holds no score in 0..1000
is the server's word on this submission: a failure, not retried.
"""
from __future__ import annotations

import re
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as Deadline
from email.utils import parsedate_to_datetime
from urllib.parse import urljoin

import requests
import urllib3

from clipcore.errors import ClipcoreError
from clipcore.submit.history import UNANSWERED
from clipcore.submit.scorer import MAX_ACCURACY, is_score

FORCE_HINT = "set submit.force: true to send it again"
MESSAGE_CHARS = 200  # how much of a server's error text a status keeps
GATEWAY_GAVE_UP = (502, 504)  # the server behind the gateway may have the post
TRY_LATER = (429, 500, 503)   # the server took nothing
LONGEST_WAIT = 300.0  # seconds a Retry-After may ask for; longer: fail now, rerun later


class SubmitFailed(ClipcoreError):
    """One submission could not be scored; `attempts` requests were made."""

    def __init__(self, message: str, attempts: int):
        super().__init__(message)
        self.attempts = attempts


class TryLater(SubmitFailed):
    """A 429, 500 or 503: the server took nothing; worth another try, not before `wait`
    seconds (its Retry-After) when it said so."""

    def __init__(self, message: str, attempts: int, wait: float = 0.0):
        super().__init__(message, attempts)
        self.wait = wait


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
        wait = 0.0
        try:
            return read_answer(request.result(timeout), attempt), attempt
        except Deadline:
            raise Unanswered(f"{UNANSWERED} from {url} within {timeout:g} s", attempt,
                             request) from None
        except TryLater as exc:
            problem, wait = str(exc), exc.wait
        except requests.exceptions.SSLError as exc:
            if not _refused_certificate(exc):
                raise Unanswered(f"{UNANSWERED} from {url}, TLS failed ({_reason(exc)})",
                                 attempt, None) from None
            raise SubmitFailed(f"the certificate of {url} was refused, so nothing was sent "
                               f"({_reason(exc)})", attempt) from None
        except (requests.ConnectionError, requests.Timeout,
                requests.exceptions.ChunkedEncodingError) as exc:
            if not _never_connected(exc):
                raise Unanswered(f"{UNANSWERED} from {url}, the connection broke "
                                 f"({_reason(exc)})", attempt, None) from None
            problem = f"cannot connect to {url} ({_reason(exc)})"
        except requests.RequestException as exc:  # a bad url, say: retrying will not help
            raise SubmitFailed(f"cannot post to {url} ({_reason(exc)})", attempt) from None
        if wait > LONGEST_WAIT:
            raise SubmitFailed(f"{problem}: the server says to try again in {wait:g} s; rerun "
                               f"then", attempt)
        if attempt <= retries:
            delay = max(backoff * 2 ** (attempt - 1), wait)
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
    """The score in a server's answer; SubmitFailed (TryLater for
    a 429 or 5xx, Unanswered for a 502 or 504) when it has none."""
    code, url = response.status_code, response.url
    if response.is_redirect:
        where = urljoin(url, response.headers["Location"])
        raise SubmitFailed(f"HTTP {code} {response.reason} from {url} redirects to {where}: "
                           f"set submit.url to it if that is the server", attempt)
    if code >= 300:
        problem = f"HTTP {code} {response.reason} from {url}: {_first_line(response.text)}"
        if code in GATEWAY_GAVE_UP:
            raise Unanswered(f"{UNANSWERED} from the server behind a gateway: {problem}",
                             attempt, None)
        if code in TRY_LATER or code >= 500:
            raise TryLater(problem, attempt, _retry_after(response.headers.get("Retry-After")))
        raise SubmitFailed(problem, attempt)
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


def _retry_after(value: str | None) -> float:
    """Seconds a Retry-After header asks to wait (a number or an HTTP date); 0 when none."""
    if not value:
        return 0.0
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return 0.0


def _refused_certificate(exc: requests.exceptions.SSLError) -> bool:
    """Whether TLS failed on the certificate (untrusted, expired, another host's): that is
    checked in the handshake, before any of the request is sent. requests keeps only the text
    of the ssl error."""
    return "CERTIFICATE_VERIFY_FAILED" in str(exc)


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
