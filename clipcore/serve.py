"""Serve a gallery index (clipcore.index) over HTTP: a search page, POST /search, GET /health.

    python -m clipcore.serve --index DIR [--host 127.0.0.1] [--port 8000]

Binds to loopback unless --host says otherwise: the service has no authentication.
"""
from __future__ import annotations

import argparse

import uvicorn

from clipcore.inference.gallery_index import load_index
from clipcore.inference.loading import load_trained
from clipcore.inference.service import create_app
from clipcore.stage import run_stage


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m clipcore.serve", description=__doc__.split("\n")[0])
    p.add_argument("--index", required=True, help="a folder written by clipcore.index")
    p.add_argument("--model", help="the model file (default: the one the index names)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="(default: %(default)s)")
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="(default: %(default)s)")
    p.add_argument("--max-k", type=int, default=100, help="(default: %(default)s)")
    p.add_argument("--workers", type=int, default=2,
                   help="searches that run at once; more wait (default: %(default)s)")
    p.add_argument("--max-connections", type=int, default=64,
                   help="open connections before uvicorn answers 503 (default: %(default)s)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    return p


def main() -> None:
    args = parser().parse_args()
    index = load_index(args.index)
    trained = load_trained(args.model or index.manifest["model"], args.device)
    app = create_app(trained, index, max_upload_bytes=int(args.max_upload_mb * 1e6),
                     max_k=args.max_k, workers=args.workers)
    print(f"serving {len(index.names)} gallery images on http://{args.host}:{args.port}/ "
          f"(Ctrl-C stops)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, limit_concurrency=args.max_connections,
                log_level="warning")


if __name__ == "__main__":
    run_stage(main)
