"""What the trained-model commands cost: index build images/s (cold, and a rebuild), one-image
query latency (p50, p95) through the library call clipcore.query makes and through the search
service over loopback HTTP, and the ONNX export's agreement with torch on the demo's queries.

    python bench/bench_inference.py                     # the tiny model, trained 3 epochs
    python bench/bench_inference.py --model ViT-B-32    # random init: the real model's speed

Runs on the digits demo in a temporary folder (train, embed, retrieve and best by the stages'
own functions), on the CPU.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests
import torch
import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from inference_run import finished_run  # noqa: E402
from clipcore.data.images import load_rgb  # noqa: E402
from clipcore.inference.gallery_index import build_index  # noqa: E402
from clipcore.inference.loading import load_trained  # noqa: E402
from clipcore.inference.onnx_export import export_onnx, onnx_embeddings  # noqa: E402
from clipcore.inference.service import create_app  # noqa: E402
from clipcore.ranking.search import top_k  # noqa: E402


def percentiles(seconds: list[float]) -> str:
    ms = np.array(seconds) * 1000
    return f"p50 {np.percentile(ms, 50):.1f} ms, p95 {np.percentile(ms, 95):.1f} ms"


def serve(app) -> tuple[str, uvicorn.Server, threading.Thread]:
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    return f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}", server, thread


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="tiny (trained) or an open_clip name "
                                                        "(random init)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--queries", type=int, default=100, help="one-image queries timed")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        best, gallery, queries = finished_run(Path(tmp), args.model, args.epochs)
        trained = load_trained(best, "cpu")
        builds = []
        for _ in range(2):
            start = time.perf_counter()
            index = build_index(trained, gallery, Path(tmp) / "index")
            builds.append(time.perf_counter() - start)
        timed = queries[:args.queries]

        library = []  # what clipcore.query does for one file (its loader included)
        for file in timed:
            start = time.perf_counter()
            index.search(trained.embed_files([file], desc="query"))
            library.append(time.perf_counter() - start)

        url, server, thread = serve(create_app(trained, index))
        http = []
        with requests.Session() as session:
            for file in timed:
                data = file.read_bytes()
                start = time.perf_counter()
                answer = session.post(f"{url}/search", files={"image": (file.name, data)})
                http.append(time.perf_counter() - start)
                answer.raise_for_status()
        server.should_exit = True
        thread.join(10)

        onnx_file = Path(tmp) / "model.onnx"
        start = time.perf_counter()
        export_onnx(trained, onnx_file)
        export_s = time.perf_counter() - start
        theirs = onnx_embeddings(onnx_file, trained.model, queries)
        ours = trained.embed_files(queries, desc="torch")
        same = (top_k(theirs, index.embeddings, 10) == top_k(ours, index.embeddings, 10)).all(1)

    n = len(index.names)
    print(f"model {args.model} ({args.epochs} epochs), gallery {n} images, "
          f"{torch.get_num_threads()} torch threads, CPU")
    print(f"index build: {n / builds[0]:.0f} images/s cold ({builds[0]:.2f} s), "
          f"{n / builds[1]:.0f} images/s rebuild ({builds[1]:.2f} s)")
    print(f"one-image query, library call (embed_files + search): {percentiles(library)} "
          f"over {len(timed)} queries")
    print(f"one-image query, POST /search over loopback: {percentiles(http)}")
    print(f"ONNX export {export_s:.1f} s; on {len(queries)} queries lowest cosine to torch "
          f"{(ours * theirs).sum(1).min():.7f}, same top-10 for {same.mean():.1%}")


if __name__ == "__main__":
    main()
