"""Top-k search over a gallery with FAISS: cosine (inner product of L2-normalised vectors)
or Euclidean (L2 distance); exact by default, or through an approximate index (clipcore.ranking.ann)
for galleries too large to scan for every query.

`faiss.knn` runs the same exhaustive search as IndexFlatIP / IndexFlatL2 (blocked BLAS
products, a heap per query) straight on the gallery array, without copying it into an index.
Large query sets are split across threads that each run FAISS single-threaded: FAISS's own
OpenMP threads meet at a barrier after every gallery block, which costs 2x on a busy
machine (bench/bench_search.py).

Results equal a brute-force ranking by (score, gallery index): equal scores are ordered by
gallery index, including at the cut, where FAISS's heap would otherwise pick among tied
candidates by the order it met them. Approximate results are ordered the same way among the
candidates the index found.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import faiss
import numpy as np

from clipcore.errors import ClipcoreError
from clipcore.params import HnswParams, IvfParams, RetrieveParams
from clipcore.ranking import ann

METRICS = ("cosine", "euclidean")


def index_spec(params: RetrieveParams) -> IvfParams | HnswParams | None:
    """The approximate index `retrieve.index` names, with its knobs; None for exact search."""
    return {"ivf": params.ivf, "hnsw": params.hnsw}.get(params.index)


def top_k(query: np.ndarray, gallery: np.ndarray, k: int, metric: str = "cosine",
          exclude_self: bool = False,
          index: IvfParams | HnswParams | faiss.Index | None = None) -> np.ndarray:
    """Indices (Q, k) int64 of the k nearest gallery rows for each query row, best first.

    exclude_self: the queries are the gallery's first rows (often the whole gallery); query row i
        never retrieves gallery row i.
    index: None searches exactly; IvfParams or HnswParams build that FAISS index on the
    gallery and search it; a built faiss.Index (of this gallery, unit rows for cosine: a saved
    gallery index) is searched as it is.
    """
    query, gallery = _checked(query, "query"), _checked(gallery, "gallery")
    if metric not in METRICS:
        raise ClipcoreError(f"retrieve.metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if query.shape[1] != gallery.shape[1]:
        raise ClipcoreError(f"query vectors have {query.shape[1]} dimensions but gallery vectors "
                            f"{gallery.shape[1]}: they must come from the same model")
    if exclude_self and len(query) > len(gallery):
        raise ClipcoreError(f"exclude_self needs the queries to be the gallery's first rows, got "
                            f"{len(query)} queries and {len(gallery)} gallery vectors")
    available = len(gallery) - int(exclude_self)
    if not 1 <= k <= available:
        raise ClipcoreError(f"retrieve.top_k={k} must be between 1 and the gallery size "
                            f"({available} images{' besides the query' if exclude_self else ''})")
    if metric == "cosine":
        query, gallery = unit_rows(query), unit_rows(gallery)
    faiss_metric = faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2
    # Higher is better for both: inner products as they are, squared distances negated.
    sign = 1.0 if metric == "cosine" else -1.0

    def search(rows: np.ndarray, n: int):
        scores, indices = _knn(rows, gallery, n, faiss_metric)
        return scores * sign, indices

    width = k + int(exclude_self)
    if index is None:
        indices = _ranked(search, query, width, len(gallery))
    else:
        built = index if isinstance(index, faiss.Index) else ann.build(gallery, faiss_metric, index)
        indices = ranked_by_index(built, query, width, metric)
        # IVF: the lists visited may hold fewer than `width` vectors; search those rows exactly.
        short = (indices < 0).any(axis=1)
        if short.any():
            indices[short] = _ranked(search, query[short], width, len(gallery))
    if exclude_self:
        own = indices == np.arange(len(query))[:, None]
        own[~own.any(axis=1), -1] = True  # not in the list: the list is one longer than needed
        indices = indices[~own].reshape(len(query), k)
    return indices


def ranked_by_index(index: faiss.Index, query: np.ndarray, width: int, metric: str) -> np.ndarray:
    """The first `width` candidates per query that a built FAISS index finds, in (score,
    gallery index) order as exact search ranks them; -1 where it found fewer."""
    sign = 1.0 if metric == "cosine" else -1.0

    def search(rows: np.ndarray, n: int):
        scores, indices = index.search(rows, n)
        scores = scores * sign
        scores[indices < 0] = np.nan  # nothing found there: no score, never part of a tie
        return scores, indices

    return _ranked(search, query, width, index.ntotal)


def _ranked(search, query: np.ndarray, width: int, gallery_size: int) -> np.ndarray:
    """The first `width` gallery indices of each row in (score, index) order.

    One extra candidate shows whether a tie crosses the cut; only those rows are searched
    again, ever wider, until the tied group ends inside the list (or the list is the gallery).
    """
    fetch = min(width + 1, gallery_size)
    scores, indices = _sorted(*search(query, fetch))
    open_rows = np.flatnonzero(_tie_at_cut(scores, width))
    while open_rows.size:
        fetch = min(2 * fetch, gallery_size)
        more_scores, more_indices = _sorted(*search(query[open_rows], fetch))
        done = ~_tie_at_cut(more_scores, width) | (fetch == gallery_size)
        indices[open_rows[done], :width] = more_indices[done, :width]
        open_rows = open_rows[~done]
    return np.ascontiguousarray(indices[:, :width])


def _knn(query: np.ndarray, gallery: np.ndarray, n: int, metric: int):
    """faiss.knn, in query chunks side by side when there are enough queries for each chunk
    to take FAISS's BLAS path (it needs queries x dimensions >= its BLAS threshold)."""
    rows_for_blas = -(-faiss.cvar.distance_compute_blas_threshold // query.shape[1])
    chunks = min(faiss.omp_get_max_threads(), len(query) // max(rows_for_blas, 1))
    if chunks < 2:
        return faiss.knn(query, gallery, n, metric=metric)

    def single_threaded(rows: np.ndarray):
        faiss.omp_set_num_threads(1)  # for this worker thread only
        return faiss.knn(rows, gallery, n, metric=metric)

    with ThreadPoolExecutor(chunks) as pool:
        parts = list(pool.map(single_threaded, np.array_split(query, chunks)))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _sorted(scores: np.ndarray, indices: np.ndarray):
    order = np.lexsort((indices, -scores), axis=-1)  # score first, then gallery index
    return np.take_along_axis(scores, order, 1), np.take_along_axis(indices, order, 1)


def _tie_at_cut(scores: np.ndarray, width: int) -> np.ndarray:
    """Rows whose last kept score equals the last fetched one (the tie may run further)."""
    if scores.shape[1] <= width:
        return np.zeros(len(scores), dtype=bool)
    return scores[:, width - 1] == scores[:, -1]


def _checked(vectors: np.ndarray, name: str) -> np.ndarray:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise ClipcoreError(f"{name} vectors must be a 2-D array (rows, dimensions), "
                            f"got shape {vectors.shape}")
    if not np.isfinite(vectors).all():
        raise ClipcoreError(f"{name} vectors hold NaN or infinite values (a diverged model?)")
    return vectors


def unit_rows(x: np.ndarray) -> np.ndarray:
    """A float32 copy of `x` with every row scaled to length 1 (a zero row stays zero): the
    vectors cosine search compares."""
    # A copy: normalize_L2 works in place and the caller's array stays as it was.
    x = np.array(x, dtype=np.float32, order="C")
    faiss.normalize_L2(x)
    return x
