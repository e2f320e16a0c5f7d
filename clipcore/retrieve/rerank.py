"""Re-ranking after the search: database-side augmentation (DBA), average / alpha query
expansion (AQE / alpha-QE, Radenovic et al. 2018) and k-reciprocal re-ranking (Zhong et al. 2017).

All three use the neighbourhood structure of the test set: a query's closest gallery images
are likely of its class, so adding them to the query (QE), smoothing every gallery image with
its own neighbours (DBA), or preferring gallery images that also have the query among their
neighbours (k-reciprocal) can correct a ranking. They raise mAP more reliably than top-1, and
top-1 is 600 of the competition's 1000 points: measure (bench/bench_levers.py).

QE and DBA call the same search as the plain ranking (whatever index retrieve uses), so they
cost one or two more searches. k-reciprocal computes the full (Nq+Ng)^2 distance matrix itself,
whatever the index: about 155 MB at its peak and 2 s per epoch here for the competition's ~3,000
test images, quadratic beyond; check_memory refuses what cannot fit.
"""
from __future__ import annotations

import os
import sys
from typing import Callable

import numpy as np

from clipcore.errors import ClipcoreError
from clipcore.params import RetrieveParams
from clipcore.ranking.search import unit_rows

# Peak memory of k_reciprocal_distances per (query + gallery)^2 pair, measured with tracemalloc
# at 1,000 to 3,000 images (17 to 20 bytes): the distances, their argpartition's copy and
# int64 indices, the neighbour weights and their local expansion.
KRECIPROCAL_BYTES_PER_PAIR = 20

# (query, gallery, k) -> (Q, k) gallery indices, best first: the stage's search.
Search = Callable[[np.ndarray, np.ndarray, int], np.ndarray]


def ranked(query: np.ndarray, gallery: np.ndarray, params: RetrieveParams,
           search: Search) -> np.ndarray:
    """(Q, top_k) gallery indices, best first, re-ranked as `params` says. With
    `rerank: none` and `dba_k: 0` this is exactly `search(query, gallery, top_k)`."""
    _check_sizes(params, len(query) + len(gallery), len(gallery))
    if params.dba_k:
        gallery = augment_database(gallery, params.dba_k, params.qe.alpha, search)
    if params.rerank == "aqe":
        query = expand_queries(query, gallery, params.qe.k, params.qe.alpha, search)
    if params.rerank == "kreciprocal":
        kr = params.kreciprocal
        distances = k_reciprocal_distances(query, gallery, kr.k1, kr.k2, kr.lambda_value,
                                           params.metric)
        # Stable sort: equal distances keep gallery order, as the plain search does.
        return np.argsort(distances, axis=1, kind="stable")[:, :params.top_k]
    return search(query, gallery, params.top_k)


def expand_queries(query: np.ndarray, gallery: np.ndarray, k: int, alpha: float,
                   search: Search) -> np.ndarray:
    """alpha-QE: each query plus its k nearest gallery vectors weighted by similarity^alpha
    (alpha 0: the plain average, AQE), renormalised."""
    return _expanded(unit_rows(query), unit_rows(gallery), search(query, gallery, k), alpha)


def augment_database(gallery: np.ndarray, k: int, alpha: float, search: Search) -> np.ndarray:
    """DBA: each gallery vector plus its k nearest other gallery vectors, weighted as in
    alpha-QE, renormalised."""
    # k + 1: a vector's first neighbour is itself (or an exact duplicate of it), which then
    # gets weight 1, as the query does in QE.
    neighbours = search(gallery, gallery, k + 1)
    unit = unit_rows(gallery)
    return unit_rows((_weights(unit, unit, neighbours, alpha)[..., None]
                        * unit[neighbours]).sum(axis=1))


def k_reciprocal_distances(query: np.ndarray, gallery: np.ndarray, k1: int, k2: int,
                           lam: float, metric: str) -> np.ndarray:
    """(Q, G) k-reciprocal re-ranking distances (lower is closer), as in the authors' code:
    lam * original distance + (1 - lam) * Jaccard distance of k-reciprocal neighbour sets."""
    n_query = len(query)
    vectors = np.concatenate([query, gallery]).astype(np.float32)
    if metric == "cosine":
        vectors = unit_rows(vectors)
    squared = (vectors * vectors).sum(axis=1)
    distance = np.maximum(squared[:, None] + squared[None, :] - 2 * vectors @ vectors.T, 0)
    # Each row scaled by its largest distance (the authors' normalisation).
    distance /= np.maximum(distance.max(axis=1, keepdims=True), np.finfo(np.float32).tiny)
    rank = _nearest(distance, max(k1, k2) + 1)
    half = int(np.around(k1 / 2))
    theirs = [set(r.tolist()) for r in _reciprocal_sets(rank, half)]
    weights = np.zeros_like(distance)
    for i, neighbours in enumerate(_reciprocal_sets(rank, k1)):
        mine = set(neighbours.tolist())
        expansion = set(mine)
        for candidate in mine:
            # Add a neighbour's own (k1/2)-reciprocal set when it mostly lies in ours.
            if len(theirs[candidate] & mine) > 2 / 3 * len(theirs[candidate]):
                expansion |= theirs[candidate]
        expansion = np.fromiter(expansion, dtype=np.int64)
        w = np.exp(-distance[i, expansion])
        weights[i, expansion] = w / w.sum()
    if k2 > 1:  # local query expansion of the neighbour weights
        weights = np.stack([weights[rank[i, :k2]].mean(axis=0) for i in range(len(weights))])
    shared = _shared_weight(weights, n_query)
    jaccard = 1 - shared / (2 - shared)
    final = (1 - lam) * jaccard + lam * distance[:n_query]
    return final[:, n_query:]


def _nearest(distance: np.ndarray, width: int) -> np.ndarray:
    """Each row's `width` nearest columns, nearest first (equal distances: lower index first)."""
    width = min(width, distance.shape[1])
    part = np.argpartition(distance, width - 1, axis=1)[:, :width]
    order = np.lexsort((part, np.take_along_axis(distance, part, 1)), axis=1)
    return np.take_along_axis(part, order, 1)


def _reciprocal_sets(rank: np.ndarray, k: int) -> list[np.ndarray]:
    """Each point's k-reciprocal neighbours (itself included): those of its k nearest that
    have it among their own k nearest."""
    forward = rank[:, :k + 1]
    mutual = (rank[forward, :k + 1] == np.arange(len(rank))[:, None, None]).any(axis=2)
    return [row[keep] for row, keep in zip(forward, mutual)]


def _shared_weight(weights: np.ndarray, rows: int) -> np.ndarray:
    """(rows, N): sum over c of min(weights[i, c], weights[j, c]) for the first `rows` points i
    and every point j, visiting only non-zero weights (each row has a few dozen)."""
    columns, members = np.nonzero(weights.T)  # by column: the points with weight there
    values = weights[members, columns]
    starts = np.searchsorted(columns, np.arange(weights.shape[1] + 1))
    shared = np.empty((rows, len(weights)), dtype=np.float32)
    for i in range(rows):
        support = np.flatnonzero(weights[i])
        lengths = starts[support + 1] - starts[support]
        # The positions of all entries of the support's columns, column after column.
        first = np.repeat(starts[support] - np.cumsum(lengths) + lengths, lengths)
        at = first + np.arange(lengths.sum())
        own = np.repeat(weights[i, support], lengths)
        shared[i] = np.bincount(members[at], np.minimum(values[at], own), len(weights))
    return shared


def _expanded(query: np.ndarray, gallery: np.ndarray, neighbours: np.ndarray,
              alpha: float) -> np.ndarray:
    """Each query row (weight 1) plus its neighbours weighted by similarity^alpha, renormalised."""
    weighted = (_weights(query, gallery, neighbours, alpha)[..., None]
                * gallery[neighbours]).sum(axis=1)
    return unit_rows(query + weighted)


def _weights(query: np.ndarray, gallery: np.ndarray, neighbours: np.ndarray,
             alpha: float) -> np.ndarray:
    similarity = np.einsum("qd,qkd->qk", query, gallery[neighbours])
    # Negative similarities count as 0 (alpha-QE's convention); 0^0 = 1 makes alpha 0 AQE.
    return np.power(np.maximum(similarity, 0), alpha)


def check_memory(params: RetrieveParams, n_query: int, n_gallery: int) -> None:
    """k-reciprocal's memory, before any search: refused beyond this machine's memory (better
    than the kernel killing the stage halfway), named when retrieve.index promised a gallery
    too large to scan exactly, which k-reciprocal does regardless."""
    if params.rerank != "kreciprocal":
        return
    n_all = n_query + n_gallery
    need = KRECIPROCAL_BYTES_PER_PAIR * n_all ** 2
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > memory:
        raise ClipcoreError(f"retrieve.rerank kreciprocal compares all {n_all:,} query and "
                            f"gallery images pairwise: about {_amount(need)}, more than the "
                            f"{_amount(memory)} this machine has; use rerank aqe or none")
    if params.index != "exact":
        print(f"warning: retrieve.rerank kreciprocal ranks by exact distances between all "
              f"{n_all:,} query and gallery images, whatever retrieve.index ({params.index}) "
              f"says: about {_amount(need)} here, growing with the square of that number",
              file=sys.stderr)


def _amount(n_bytes: int) -> str:
    return f"{n_bytes / 1e9:,.1f} GB" if n_bytes >= 1e9 else f"{n_bytes / 1e6:,.0f} MB"


def _check_sizes(params: RetrieveParams, n_all: int, n_gallery: int) -> None:
    if params.dba_k and params.dba_k >= n_gallery:
        raise ClipcoreError(f"retrieve.dba_k={params.dba_k} must be below the gallery size "
                            f"({n_gallery} images)")
    if params.rerank == "aqe" and params.qe.k > n_gallery:
        raise ClipcoreError(f"retrieve.qe.k={params.qe.k} exceeds the gallery size "
                            f"({n_gallery} images)")
    if params.rerank == "kreciprocal" and params.top_k > n_gallery:
        raise ClipcoreError(f"retrieve.top_k={params.top_k} must not exceed the gallery size "
                            f"({n_gallery} images)")
    kr = params.kreciprocal
    if params.rerank == "kreciprocal" and max(kr.k1, kr.k2) >= n_all:
        raise ClipcoreError(f"retrieve.kreciprocal.k1={kr.k1} and k2={kr.k2} must be "
                            f"below the number of query and gallery images ({n_all})")
