"""The validation protocol: how the val images measure retrieval during training.

By default (`data.val_queries: ""`) each val image is a query. Its gallery is every other val
image and, when the val images share classes with the training images (the image split), every
training image too: with few images per class (the competition has 5), a class often gives one
val image or none, and only the training images of its class can be its positives. Under the
class split the held-out classes query each other, as unseen identities do on the competition's
server.

With `data.val_queries` set (an fnmatch pattern on the file name, such as `photo_*`), validation
is drawn as the competition's test is: only the val images whose name matches are queries, and
the gallery holds the val images whose name does not match (and, when the training images join
it, only the training images whose name does not match). A photo query is then ranked against
renders only, as on the server.

A query whose class has no other image in its gallery can't score anything: it is left out of
the measures and counted (`val_unmatched`), never scored 0. `val_queries` and `val_unmatched`
count query images only.
"""
from __future__ import annotations

from fnmatch import fnmatchcase
from pathlib import Path

import numpy as np

from clipcore.errors import ClipcoreError
from clipcore.ranking.measures import query_scores, retrieval_metrics
from clipcore.ranking.search import top_k

# A distractor's label: the labels are coded from 0 beside it, so no query ever shares it.
DISTRACTOR = -1


def train_joins_gallery(val_labels, train_labels) -> bool:
    """Whether the training images join the val gallery: they share classes with val (the
    image split; under the class split they don't)."""
    return bool(len(train_labels)) and bool(np.isin(val_labels, train_labels).any())


def query_rows(paths, pattern: str) -> np.ndarray | None:
    """Which of these images are in the queries' rendering: a boolean mask of the files whose
    base name matches `data.val_queries` (case-sensitive fnmatch); None when the pattern is
    empty (every val image is a query, the gallery takes every image)."""
    if not pattern:
        return None
    return np.array([fnmatchcase(Path(path).name, pattern) for path in paths], dtype=bool)


def query_masks(val_paths, train_paths, pattern: str) -> tuple[np.ndarray | None,
                                                                np.ndarray | None]:
    """The `query_rows` masks of the val and the training images, drawn once per run (the splits
    never change). Stops before any training work when `data.val_queries` leaves validation no
    query or no gallery among the val images. No val images at all (`data.val_fraction: 0`) is a
    run without validation, as without the pattern."""
    rows = query_rows(val_paths, pattern)
    if rows is not None:
        check_query_rows(rows, f"{pattern!r} matches", (
            "the pattern is on the file name, e.g. photo_*; empty: every val image queries",
            "the gallery is the val images whose name does not match"))
    return rows, query_rows(train_paths, pattern)


def check_query_rows(rows: np.ndarray, said: str, why: tuple[str, str]) -> None:
    """One line naming data.val_queries when `rows` (which val images query) leaves validation no
    query or no gallery; `said`: how the setting picked them, `why`: a hint for each case."""
    matched = int(np.sum(rows))
    if len(rows) and matched == 0:
        raise ClipcoreError(f"params: 'data.val_queries' {said} none of the {len(rows)} val "
                            f"images: no val query ({why[0]})")
    if len(rows) and matched == len(rows):
        raise ClipcoreError(f"params: 'data.val_queries' {said} all {len(rows)} val images: no "
                            f"val gallery ({why[1]})")


def validation_metrics(val: np.ndarray, val_labels: np.ndarray, k: int,
                       train: np.ndarray | None = None,
                       train_labels: np.ndarray | None = None,
                       query_mask: np.ndarray | None = None,
                       train_query_mask: np.ndarray | None = None,
                       distractors: np.ndarray | None = None) -> dict:
    """retrieval_metrics of the val queries (those with a positive), plus `val_queries` (how many
    were scored) and `val_unmatched` (how many had no positive). `train`/`train_labels`: the
    training images' embeddings and labels, joining the gallery when they share val classes.

    query_mask: None, every val row queries all the others (the mixed protocol); a boolean mask
    over the val rows (`query_rows`), only those rows query, against the other val rows.
    train_query_mask: with `query_mask`, the training rows in the queries' rendering
    (`query_rows`): they stay out of the gallery (None: every training row may join it).
    distractors: embeddings that join the gallery as no class's images (data.val_distractors):
    they can only push a query's matches down its ranking, never be one.
    """
    val_labels = np.asarray(val_labels)
    if distractors is not None:
        # As codes from 0 (ranking compares labels only), so that DISTRACTOR is no query's label.
        val_labels, train_labels = _codes(val_labels, train_labels)
    joins = train is not None and train_joins_gallery(val_labels, train_labels)
    train_rows = slice(None)
    if query_mask is None:
        # The val images are the gallery's first rows: none retrieves itself.
        query, query_labels, gallery, gallery_labels = val, val_labels, [val], [val_labels]
    else:
        query_mask = np.asarray(query_mask, dtype=bool)
        query, query_labels = val[query_mask], val_labels[query_mask]
        gallery, gallery_labels = [val[~query_mask]], [val_labels[~query_mask]]
        if train_query_mask is not None:
            train_rows = ~np.asarray(train_query_mask, dtype=bool)
    if joins:
        gallery.append(train[train_rows])
        gallery_labels.append(np.asarray(train_labels)[train_rows])
    if distractors is not None:
        gallery.append(distractors)
        gallery_labels.append(np.full(len(distractors), DISTRACTOR))
    gallery, gallery_labels = np.concatenate(gallery), np.concatenate(gallery_labels)
    exclude_self = query_mask is None
    # A query's positives are the other images of its class in the gallery (never itself).
    positives = _same_label(query_labels, gallery_labels) - int(exclude_self)
    matched = positives > 0
    result = {"val_queries": int(matched.sum()), "val_unmatched": int((~matched).sum())}
    if not matched.any():
        return result
    # top-10 feeds the score even when k is smaller
    ranks = min(max(k, 10), len(gallery) - int(exclude_self))
    found = top_k(query, gallery, ranks, metric="cosine", exclude_self=exclude_self)[matched]
    result.update(retrieval_metrics(query_labels[matched], gallery_labels[found],
                                    n_relevant=positives[matched], k=k))
    # Per query, in a fixed order: the base comparison pairs two epochs' (clipcore.report.best).
    result["query_scores"] = query_scores(query_labels[matched], gallery_labels[found]).tolist()
    return result


def _codes(val_labels: np.ndarray, train_labels) -> tuple[np.ndarray, np.ndarray | None]:
    both = val_labels if train_labels is None else np.concatenate([val_labels, train_labels])
    codes = np.unique(both, return_inverse=True)[1].reshape(-1)
    return codes[:len(val_labels)], None if train_labels is None else codes[len(val_labels):]


def _same_label(query_labels: np.ndarray, gallery_labels: np.ndarray) -> np.ndarray:
    """(Q,) how many gallery images share each query's label (0 for a class it lacks)."""
    classes, counts = np.unique(gallery_labels, return_counts=True)
    if not len(classes):
        return np.zeros(len(query_labels), dtype=np.int64)
    at = np.minimum(np.searchsorted(classes, query_labels), len(classes) - 1)
    return np.where(classes[at] == query_labels, counts[at], 0)
