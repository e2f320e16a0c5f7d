"""The validation protocol: how the val images measure retrieval during training.

Each val image is a query. Its gallery is every other val image and, when the val images share
classes with the training images (the image split), every training image too: with few images
per class (the competition has 5), a class often gives one val image or none, and only the
training images of its class can be its positives. Under the class split the held-out classes
query each other, as unseen identities do on the competition's server.

A query whose class has no other image in its gallery can't score anything: it is left out of
the measures and counted (`val_unmatched`), never scored 0.
"""
from __future__ import annotations

import numpy as np

from clipcore.measures import retrieval_metrics
from clipcore.search import top_k


def train_joins_gallery(val_labels, train_labels) -> bool:
    """Whether the training images join the val gallery: they share classes with val (the
    image split; under the class split they don't)."""
    return bool(len(train_labels)) and bool(np.isin(val_labels, train_labels).any())


def validation_metrics(val: np.ndarray, val_labels: np.ndarray, k: int,
                       train: np.ndarray | None = None,
                       train_labels: np.ndarray | None = None) -> dict:
    """retrieval_metrics of the val queries (those with a positive), plus `val_queries` (how many
    were scored) and `val_unmatched` (how many had no positive). `train`/`train_labels`: the
    training images' embeddings and labels, joining the gallery when they share val classes."""
    val_labels = np.asarray(val_labels)
    gallery, gallery_labels = val, val_labels
    if train is not None and train_joins_gallery(val_labels, train_labels):
        gallery = np.concatenate([val, train])
        gallery_labels = np.concatenate([val_labels, np.asarray(train_labels)])
    classes, counts = np.unique(gallery_labels, return_counts=True)
    # A query's positives are the other images of its class in the gallery (never itself).
    positives = counts[np.searchsorted(classes, val_labels)] - 1
    matched = positives > 0
    result = {"val_queries": int(matched.sum()), "val_unmatched": int((~matched).sum())}
    if not matched.any():
        return result
    ranks = min(max(k, 10), len(gallery) - 1)  # top-10 feeds the score even when k is smaller
    # The val images are the gallery's first rows: none retrieves itself.
    found = top_k(val, gallery, ranks, metric="cosine", exclude_self=True)[matched]
    result.update(retrieval_metrics(val_labels[matched], gallery_labels[found],
                                    n_relevant=positives[matched], k=k))
    return result
