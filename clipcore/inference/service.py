"""The search service: FastAPI over the same calls as clipcore.query (TrainedModel.embed_images,
GalleryIndex.search), and one page to try it.

    GET  /                  the page: drop or pick an image, see its top-k gallery images
    GET  /health            model, gallery size, dimension, limits
    POST /search            multipart form: `image` (a file), `k` (optional) -> ranked names, scores
    GET  /thumbnail/{rank}  a gallery image by its position in the index (an integer)

No request names a file: thumbnails are addressed by position in the index's own list. Uploads
over `max_upload_bytes` get 413, undecodable images 400, k outside 1..max_k 422. At most
`workers` searches run at once; a request that waits longer than `queue_timeout_s` for a slot
gets 503 (uvicorn's limit_concurrency bounds open connections as well: clipcore.serve).
"""
from __future__ import annotations

import dataclasses
import io
import threading
import time
from functools import lru_cache
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, Response
from PIL import Image
from starlette.datastructures import UploadFile

from clipcore.data.images import UnreadableImage, load_rgb
from clipcore.inference.gallery_index import GalleryIndex
from clipcore.inference.loading import TrainedModel

PAGE = Path(__file__).with_name("static") / "search.html"
THUMBNAIL_PX = 160
FORM_OVERHEAD = 64 * 1024  # multipart boundaries and headers around the image


def create_app(trained: TrainedModel, index: GalleryIndex, *, max_upload_bytes: int = 10_000_000,
               max_k: int = 100, workers: int = 2, queue_timeout_s: float = 30.0) -> FastAPI:
    index.check_model(trained)
    app = FastAPI(title="clipcore search", docs_url=None, redoc_url=None)
    slots = threading.BoundedSemaphore(workers)
    largest_k = min(max_k, len(index.names))
    default_k = min(index.retrieve.top_k, largest_k)
    page = PAGE.read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse)
    def home() -> str:
        return page

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "model": trained.file.name, "model_sha256": trained.sha256,
                "gallery_size": len(index.names), "dimension": index.manifest["dimension"],
                "metric": index.retrieve.metric, "index": index.retrieve.index,
                "default_k": default_k, "max_k": largest_k, "max_upload_bytes": max_upload_bytes,
                "crop": trained.crop.describe()}

    @app.post("/search")
    async def search(request: Request) -> dict:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > max_upload_bytes + FORM_OVERHEAD:
            raise HTTPException(413, f"upload of {int(declared):,} bytes; the limit is "
                                     f"{max_upload_bytes:,} bytes per image")
        try:
            form = await request.form(max_files=1, max_fields=4)
        except Exception as exc:  # starlette: a body that is not a multipart form
            raise HTTPException(400, f"expected a multipart form with an `image` file ({exc})")
        upload = form.get("image")
        if not isinstance(upload, UploadFile):
            raise HTTPException(400, "expected a multipart form with an `image` file field")
        data = await upload.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            raise HTTPException(413, f"image over the limit of {max_upload_bytes:,} bytes")
        k = _k(form.get("k"), default_k, largest_k)
        return await run_in_threadpool(_search, data, k)

    def _search(data: bytes, k: int) -> dict:
        try:
            image = trained.decode(io.BytesIO(data))
        except UnreadableImage as exc:
            raise HTTPException(400, f"not a readable image ({str(exc).split(': ', 1)[-1]})")
        if not slots.acquire(timeout=queue_timeout_s):
            raise HTTPException(503, f"busy: {workers} searches running; try again")
        try:
            start = time.perf_counter()
            query = trained.embed_images([image])
            indices, scores = index.search(query, dataclasses.replace(index.retrieve, top_k=k))
            took = time.perf_counter() - start
        finally:
            slots.release()
        return {"k": k, "metric": index.retrieve.metric, "took_ms": round(took * 1000, 1),
                "results": [{"rank": rank, "name": index.names[i], "score": float(s),
                             "thumbnail": f"/thumbnail/{i}"}
                            for rank, (i, s) in enumerate(zip(indices[0], scores[0]), 1)]}

    @app.get("/thumbnail/{position}")
    def thumbnail(position: int) -> Response:
        if not 0 <= position < len(index.names):
            raise HTTPException(404, f"no gallery image at position {position} "
                                     f"(the gallery holds {len(index.names)})")
        return Response(_thumbnail(position), media_type="image/jpeg",
                        headers={"Cache-Control": "max-age=3600"})

    @lru_cache(maxsize=2048)
    def _thumbnail(position: int) -> bytes:
        try:
            image = load_rgb(index.images / index.names[position])
        except UnreadableImage as exc:
            raise HTTPException(404, f"gallery image unreadable now ({exc})")
        image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX), Image.Resampling.BICUBIC)
        out = io.BytesIO()
        image.save(out, "JPEG", quality=85)
        return out.getvalue()

    return app


def _k(value, default: int, largest: int) -> int:
    if value is None or value == "":
        return default
    if not str(value).strip().isdigit() or not 1 <= int(value) <= largest:
        raise HTTPException(422, f"k must be an integer from 1 to {largest}, got {value!r}")
    return int(value)
