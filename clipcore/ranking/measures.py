"""Retrieval measures, shared by training validation, the retrieve stage, local scoring of
submissions and the competition scorer, so that all of them report the same numbers.

The competition scores a submission out of 1000 as 600*top1 + 300*top5 + 100*top10, where
topK is the share of queries with at least one correct gallery image among their first K.
"""
from __future__ import annotations

import numpy as np

SCORE_WEIGHTS = {1: 600.0, 5: 300.0, 10: 100.0}


def competition_score(hit_rates: dict[int, float]) -> float:
    """Score out of 1000 from the top-1/5/10 hit rates."""
    return sum(weight * hit_rates[k] for k, weight in SCORE_WEIGHTS.items())


def query_scores(query_labels, ranked_labels) -> np.ndarray:
    """(Q,) each query's own competition points (600 for a top-1 hit, +300 top-5, +100 top-10):
    their mean is retrieval_metrics' score; pairs of them compare two rankings query by query."""
    relevant = np.asarray(ranked_labels) == np.asarray(query_labels)[:, None]
    return sum(weight * relevant[:, :cut].any(axis=1) for cut, weight in SCORE_WEIGHTS.items())


def retrieval_metrics(query_labels, ranked_labels, n_relevant=None, k: int | None = None) -> dict:
    """All measures for one ranking.

    query_labels: (Q,) label of each query.
    ranked_labels: (Q, K) label of the gallery item at each rank, best first.
    n_relevant: (Q,) number of gallery items sharing each query's label (for mAP@k);
        when None, only what the ranking shows is known and AP is normalised by the hits.
    k: cut-off for precision@k and mAP@k (default: all K ranks).

    Returns top1, top5, top10 hit rates, score (0-1000), precision_at_k, map_at_k, k, queries.
    A rank list shorter than 10 counts what it has: a hit can't be beyond the list.
    """
    query_labels = np.asarray(query_labels)
    ranked_labels = np.asarray(ranked_labels)
    if ranked_labels.ndim != 2 or len(ranked_labels) != len(query_labels):
        raise ValueError("ranked_labels must be (queries, ranks) with one row per query")
    if len(query_labels) == 0:
        raise ValueError("no queries to measure")
    k = ranked_labels.shape[1] if k is None else min(k, ranked_labels.shape[1])
    relevant = ranked_labels == query_labels[:, None]
    hits = {cut: float(relevant[:, :cut].any(axis=1).mean()) for cut in SCORE_WEIGHTS}
    top = relevant[:, :k]
    precision_at_i = np.cumsum(top, axis=1) / np.arange(1, k + 1)
    if n_relevant is None:
        denominator = top.sum(axis=1)
    else:
        denominator = np.minimum(np.asarray(n_relevant), k)
    ap = np.divide((precision_at_i * top).sum(axis=1), denominator,
                   out=np.zeros(len(top)), where=denominator > 0)
    return {
        "top1": hits[1],
        "top5": hits[5],
        "top10": hits[10],
        "score": competition_score(hits),
        "precision_at_k": float(top.mean()),
        "map_at_k": float(ap.mean()),
        "k": int(k),
        "queries": int(len(query_labels)),
    }


def metrics_for_indices(query_labels, gallery_labels, indices, k: int | None = None) -> dict:
    """retrieval_metrics for a ranking given as gallery indices (Q, K)."""
    gallery_labels = np.asarray(gallery_labels)
    query_labels = np.asarray(query_labels)
    counts = dict(zip(*np.unique(gallery_labels, return_counts=True)))
    n_relevant = np.array([counts.get(label, 0) for label in query_labels])
    return retrieval_metrics(query_labels, gallery_labels[np.asarray(indices)], n_relevant, k)


def metrics_for_names(ranking: dict[str, list[str]], query_labels: dict[str, str],
                      gallery_labels: dict[str, str], k: int | None = None) -> dict:
    """retrieval_metrics for a ranking of file names (the competition's submission format).

    ranking maps each query file name to its ranked gallery file names; query_labels and
    gallery_labels map file names to classes (a missing name raises KeyError naming it).
    Lists are cut to the shortest list (or k).
    """
    if not ranking:
        raise ValueError("the ranking holds no queries")
    width = min(len(names) for names in ranking.values())
    width = width if k is None else min(width, k)
    queries = list(ranking)
    index = {name: i for i, name in enumerate(gallery_labels)}
    indices = [[index[name] for name in ranking[q][:width]] for q in queries]
    return metrics_for_indices([query_labels[q] for q in queries],
                               list(gallery_labels.values()), indices, width)
