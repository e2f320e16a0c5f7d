"""Drive the search service's page in headless Chromium (Debian's `chromium` package): open it,
pick a query image in its file input as a user would, wait for the top-k thumbnails, save a
screenshot, and check that every result image loaded. The service runs as users start it
(`python -m clipcore.serve`); Chromium is driven over the DevTools protocol
(pip install -r requirements-bench.txt) with every outside host name failing to resolve.

    python bench/check_search_page.py [--index DIR --query IMAGE] [--out bench/out/search.png]

Without --index it trains the tiny model on the digits demo in a temporary folder first.
"""
from __future__ import annotations

import argparse
import base64
import itertools
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from check_report import CHROMIUM_FLAGS  # noqa: E402
from inference_run import finished_run  # noqa: E402


class DevTools:
    """The few DevTools protocol calls this check needs, over one page's websocket."""

    def __init__(self, ws_url: str):
        import websocket  # requirements-bench.txt

        self.socket = websocket.create_connection(ws_url, timeout=60, suppress_origin=True)
        self.ids = itertools.count(1)

    def call(self, method: str, **params) -> dict:
        call_id = next(self.ids)
        self.socket.send(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:  # events arrive in between: skip them
            message = json.loads(self.socket.recv())
            if message.get("id") == call_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def evaluate(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression,
                         returnByValue=True)["result"].get("value")

    def wait_for(self, expression: str, seconds: float = 60):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if value := self.evaluate(expression):
                return value
            time.sleep(0.1)
        raise TimeoutError(f"the page never got to: {expression}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, process: subprocess.Popen) -> None:
    for _ in range(600):
        if process.poll() is not None:
            sys.exit(f"the service stopped (exit {process.returncode})")
        try:
            if requests.get(f"{url}/health", timeout=1).ok:
                return
        except requests.ConnectionError:
            time.sleep(0.1)
    sys.exit(f"{url}: the service did not answer in 60 s")


# check_report's offline flags, loopback excepted: the service is there.
FLAGS = [f"{flag}, EXCLUDE 127.0.0.1" if flag.startswith("--host-resolver-rules") else flag
         for flag in CHROMIUM_FLAGS]


def open_page(chromium: str, profile: Path, url: str) -> tuple[subprocess.Popen, DevTools]:
    browser = subprocess.Popen([chromium, *FLAGS, f"--user-data-dir={profile}",
                                "--remote-debugging-port=0", "--remote-allow-origins=*",
                                "about:blank"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    port_file = profile / "DevToolsActivePort"
    for _ in range(300):
        if port_file.is_file() and port_file.read_text().strip():
            break
        time.sleep(0.1)
    port = port_file.read_text().split()[0]
    page = next(t for t in requests.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
                if t["type"] == "page")
    tools = DevTools(page["webSocketDebuggerUrl"])
    tools.call("Page.enable")
    tools.call("Page.navigate", url=url)
    return browser, tools


def check(index: Path, query: Path, out: Path) -> None:
    chromium = shutil.which("chromium") or sys.exit("chromium not found: apt-get install -y chromium")
    url = f"http://127.0.0.1:{free_port()}"
    service = subprocess.Popen([sys.executable, "-m", "clipcore.serve", "--index", str(index),
                                "--port", url.rsplit(":", 1)[1], "--device", "cpu"], cwd=REPO)
    try:
        wait_until_up(url, service)
        with tempfile.TemporaryDirectory() as profile:
            browser, tools = open_page(chromium, Path(profile), url)
            try:
                health = tools.wait_for("document.getElementById('health').textContent"
                                        ".startsWith('model') && document.getElementById('health')"
                                        ".textContent")
                start = time.perf_counter()
                root = tools.call("DOM.getDocument")["root"]["nodeId"]
                picker = tools.call("DOM.querySelector", nodeId=root, selector="#file")["nodeId"]
                tools.call("DOM.setFileInputFiles", nodeId=picker, files=[str(query.resolve())])
                shown = tools.wait_for(
                    "(() => { const imgs = [...document.querySelectorAll('#results img')];"
                    " return imgs.length > 0 && imgs.every(i => i.complete) && imgs.length; })()")
                took = time.perf_counter() - start
                broken = tools.evaluate("[...document.querySelectorAll('#results img')]"
                                        ".filter(i => i.naturalWidth === 0).length")
                status = tools.evaluate("document.getElementById('status').textContent")
                shot = tools.call("Page.captureScreenshot", format="png")["data"]
            finally:
                browser.terminate()
                browser.wait(30)
    finally:
        service.terminate()
        service.wait(30)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(base64.b64decode(shot))
    print(f"page header: {health}")
    print(f"picked {query.name}: {shown} results shown in {took:.2f} s ({status}); "
          f"{broken} thumbnails failed to load")
    print(f"screenshot: {out}")
    if broken or not shown:
        sys.exit("the page did not show its results")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=Path, help="a folder written by clipcore.index")
    parser.add_argument("--query", type=Path, help="the image to pick (with --index)")
    parser.add_argument("--out", type=Path, default=REPO / "bench/out/search.png")
    args = parser.parse_args()
    if args.index:
        if not args.query:
            parser.error("--index needs --query")
        check(args.index, args.query, args.out.resolve())
        return
    with tempfile.TemporaryDirectory() as tmp:
        from clipcore.inference.gallery_index import build_index
        from clipcore.inference.loading import load_trained

        best, gallery, queries = finished_run(Path(tmp))
        build_index(load_trained(best, "cpu"), gallery, Path(tmp) / "index")
        check(Path(tmp) / "index", queries[0], args.out.resolve())


if __name__ == "__main__":
    main()
