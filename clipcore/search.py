"""Exact top-k search over a gallery with FAISS: cosine (inner product of L2-normalised
vectors) or Euclidean (L2 distance). Ties are broken by gallery index, so results are
deterministic."""
from __future__ import annotations

import faiss
import numpy as np

from clipcore.errors import ClipcoreError

METRICS = ("cosine", "euclidean")


def top_k(query: np.ndarray, gallery: np.ndarray, k: int, metric: str = "cosine",
          exclude_self: bool = False) -> np.ndarray:
    """Indices (Q, k) of the k nearest gallery rows for each query row, best first.

    exclude_self: query and gallery are the same set; a row never retrieves itself.
    """
    if metric not in METRICS:
        raise ClipcoreError(f"retrieve.metric must be one of {', '.join(METRICS)}, got {metric!r}")
    available = len(gallery) - (1 if exclude_self else 0)
    if k > available:
        raise ClipcoreError(f"retrieve.top_k={k} but the gallery holds only {available} images")
    query = np.ascontiguousarray(query, dtype=np.float32)
    gallery = np.ascontiguousarray(gallery, dtype=np.float32)
    if metric == "cosine":
        query, gallery = _normalised(query), _normalised(gallery)
        index = faiss.IndexFlatIP(gallery.shape[1])
    else:
        index = faiss.IndexFlatL2(gallery.shape[1])
    index.add(gallery)
    extra = 1 if exclude_self else 0
    scores, indices = index.search(query, k + extra)
    if metric == "euclidean":
        scores = -scores
    if exclude_self:
        own = indices == np.arange(len(query))[:, None]
        # Drop each row's own index (or, if it fell outside the list, the last entry).
        own[~own.any(axis=1), -1] = True
        keep = ~own
        indices = indices[keep].reshape(len(query), k)
        scores = scores[keep].reshape(len(query), k)
    # Stable order: higher score first, then lower gallery index.
    order = _tie_order(scores, indices)
    return np.take_along_axis(indices, order, axis=1)


def _tie_order(scores: np.ndarray, indices: np.ndarray) -> np.ndarray:
    return np.array([np.lexsort((i, -s)) for s, i in zip(scores, indices)]).reshape(scores.shape)


def _normalised(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)
