"""Using a tiny trained run's best model: the gallery index and queries give retrieve's results,
another model is refused, the service answers on loopback as the library does, and the ONNX
export embeds as torch does."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import uvicorn

from clipcore import paths
from clipcore.data.manifests import read_manifest
from clipcore.errors import ClipcoreError
from clipcore.files import file_sha256
from clipcore.inference import gallery_index
from clipcore.inference.gallery_index import build_index, load_index
from clipcore.inference.loading import load_trained
from clipcore.inference.onnx_export import export_onnx, onnx_embeddings
from clipcore.inference.service import create_app
from clipcore.ranking.search import top_k
from clipcore.report.best import write_best
from clipcore.retrieve.embedding import embed_all
from clipcore.retrieve.retrieval import retrieve_all
from clipcore.train.training import train

REPO = Path(__file__).resolve().parents[2]
TINY = {"model.name": "tiny", "model.pretrained": "none", "train.num_workers": 0,
        "train.lr": 1e-2, "train.epochs": 1, "embed.num_workers": 0}


@pytest.fixture(scope="module")
def run(tmp_path_factory, params_factory, prepared_demo):
    folder = tmp_path_factory.mktemp("run")
    params = params_factory(TINY)
    with contextlib.chdir(folder):
        train(params, *prepared_demo)
        embed_all(params, *prepared_demo)
        retrieve_all(params.retrieve, *prepared_demo)
        write_best(params, prepared_demo[1])
    data_root, prepared = prepared_demo
    queries = [data_root / p for p in read_manifest(prepared, "query")["path"]]
    trained = load_trained(folder / paths.BEST, "cpu")
    index = build_index(trained, data_root / "test" / "gallery", folder / "index")
    return folder, trained, index, queries


def test_queries_give_retrieves_results(run):
    folder, trained, index, queries = run
    indices, scores = load_index(index.folder).search(trained.embed_files(queries))
    ours = {q.name: [index.names[i] for i in row] for q, row in zip(queries, indices)}
    assert ours == json.loads((folder / paths.BEST_RESULTS).read_text())
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # best first


def test_the_commands_index_and_query_give_retrieves_results(run, tmp_path):
    folder, _, index, queries = run
    def command(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                              cwd=folder, timeout=300,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
        assert done.returncode == 0, done.stderr
        return done.stdout
    command("clipcore.index", "--model", "repository/best", "--images", str(index.images),
            "--out", str(tmp_path / "index"), "--device", "cpu")
    results = json.loads(command("clipcore.query", "--index", str(tmp_path / "index"),
                                 "--json", str(queries[0].parent)))
    assert results == json.loads((folder / paths.BEST_RESULTS).read_text())


def test_an_index_refuses_another_model(run, tmp_path):
    folder, trained, index, _ = run
    other = tmp_path / "model.pt"
    epochs = [folder / paths.model_path(e) for e in (0, 1)]
    other.write_bytes(next(f for f in epochs if file_sha256(f) != trained.sha256).read_bytes())
    (tmp_path / "summary.json").write_bytes((folder / paths.BEST_SUMMARY).read_bytes())
    with pytest.raises(ClipcoreError, match="another model"):
        index.check_model(load_trained(other, "cpu"))


def test_an_interrupted_index_build_resumes_where_it_stopped(run, tmp_path, monkeypatch):
    _, trained, index, _ = run
    monkeypatch.setattr(gallery_index, "CHUNK", 100)  # 269 images: 3 chunks
    original, calls = trained.embed_files, []

    def lost_at_the_third_chunk(files, desc="embed"):
        calls.append(len(files))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(files, desc)

    monkeypatch.setattr(trained, "embed_files", lost_at_the_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        build_index(trained, index.images, tmp_path / "index")
    with pytest.raises(ClipcoreError, match="not a gallery index"):
        load_index(tmp_path / "index")  # no manifest: nothing half-built is searched
    resumed = build_index(trained, index.images, tmp_path / "index")
    assert calls == [100, 100, 69, 69]  # the rerun embedded the one missing chunk
    np.testing.assert_allclose(resumed.embeddings, index.embeddings, atol=1e-6)
    assert resumed.names == index.names and not (tmp_path / "index" / "partial").exists()


@pytest.fixture(scope="module")
def server(run):
    _, trained, index, _ = run
    app = create_app(trained, index, max_upload_bytes=200_000, max_k=20)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def test_service_search_equals_the_library_call(run, server):
    _, trained, index, queries = run
    health = requests.get(f"{server}/health", timeout=10).json()
    assert (health["gallery_size"], health["model_sha256"]) == (len(index.names), trained.sha256)
    with open(queries[0], "rb") as f:
        answer = requests.post(f"{server}/search", files={"image": f}, data={"k": "5"}, timeout=30)
    assert answer.status_code == 200
    got = [hit["name"] for hit in answer.json()["results"]]
    indices, _ = index.search(trained.embed_files(queries[:1]),
                              dataclasses.replace(index.retrieve, top_k=5))
    assert got == [index.names[i] for i in indices[0]]
    page = requests.get(server, timeout=10)
    assert page.status_code == 200 and "/search" in page.text
    thumb = requests.get(server + answer.json()["results"][0]["thumbnail"], timeout=10)
    assert thumb.status_code == 200 and thumb.content[:2] == b"\xff\xd8"


@pytest.mark.parametrize("files, data, status", [
    ({"image": ("x.png", b"not an image")}, {}, 400),
    ({"image": ("x.png", b"\0" * 300_000)}, {}, 413),
    (None, {"k": "0"}, 422),
    (None, {"k": "21"}, 422),
    ({}, {"k": "3"}, 400),
])
def test_service_bad_requests_get_clear_4xx(run, server, files, data, status):
    if files is None:
        files = {"image": ("q.png", run[3][0].read_bytes())}
    answer = requests.post(f"{server}/search", files=files or None, data=data, timeout=30)
    assert answer.status_code == status
    assert answer.json()["detail"]
    assert requests.get(f"{server}/thumbnail/99999", timeout=10).status_code == 404


def test_onnx_embeds_as_torch(run, tmp_path):
    _, trained, index, queries = run
    out = export_onnx(trained, tmp_path / "model.onnx") and tmp_path / "model.onnx"
    theirs = onnx_embeddings(out, trained.model, queries)
    ours = trained.embed_files(queries)
    assert (ours * theirs).sum(axis=1).min() >= 0.9999
    # The same top-10; a swap is allowed only between gallery images whose scores tie to
    # float precision (the barely trained tiny model puts many within 1e-7 of each other).
    theirs_top, ours_top = top_k(theirs, index.embeddings, 10), top_k(ours, index.embeddings, 10)
    scores = np.einsum("qd,gd->qg", ours, index.embeddings)
    rows = np.arange(len(queries))[:, None]
    np.testing.assert_allclose(scores[rows, theirs_top], scores[rows, ours_top], atol=1e-6)
    assert (theirs_top == ours_top).all(axis=1).mean() >= 0.95



@pytest.mark.parametrize("missing", ["onnx", "onnxruntime"])
def test_export_without_its_extra_install_says_what_to_install(run, tmp_path, monkeypatch, missing):
    _, trained, _, queries = run
    monkeypatch.setitem(sys.modules, missing, None)  # `import` then fails as when not installed
    with pytest.raises(ClipcoreError, match=f"needs {missing}.*requirements-export.txt"):
        export_onnx(trained, tmp_path / "model.onnx")
        onnx_embeddings(tmp_path / "model.onnx", trained.model, queries[:2])
