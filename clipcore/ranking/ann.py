"""Approximate nearest-neighbour indexes (FAISS) for galleries too large to scan per query.

IVF (`IndexIVFFlat`): k-means splits the gallery into `nlist` lists; a query scans only the
`nprobe` lists whose centroids are nearest. HNSW (`IndexHNSWFlat`): a layered graph of
neighbours, walked from the top with a queue of `ef_search` candidates. Both keep the full
vectors, so the scores they return are exact; what they can miss is a true neighbour in a
list not visited or a part of the graph not walked. bench/bench_ann.py measures recall and
speed against exact search on 1M clustered vectors.

Both give the same answer for the same gallery on every run (tests/ranking/test_search.py): IVF's
k-means is seeded, and FAISS 1.15 built identical HNSW graphs on 1, 2 and 4 threads.
"""
from __future__ import annotations

import math

import faiss
import numpy as np

from clipcore.errors import ClipcoreError
from clipcore.params import HnswParams, IvfParams

# FAISS's k-means wants at least 39 training vectors per centroid (it warns below that).
MIN_VECTORS_PER_LIST = 39
# nlist = 4 sqrt(N): the low end of FAISS's guideline (4..16 sqrt(N)). More lists recall
# better for the same share of the gallery scanned, but k-means time grows with them.
LISTS_PER_SQRT_N = 4
# k-means trains on a seeded sample of this many vectors per list (FAISS's range 39..256):
# at 1M vectors and 4,000 lists, FAISS's default 256 would train on all of them, 4x as long.
TRAIN_VECTORS_PER_LIST = 64
KMEANS_SEED = 1234


def build(gallery: np.ndarray, metric: int, spec: IvfParams | HnswParams) -> faiss.Index:
    """An index over `gallery` (float32, C-contiguous) for the FAISS `metric`, ready to search."""
    if isinstance(spec, IvfParams):
        return _ivf(gallery, metric, spec)
    return _hnsw(gallery, metric, spec)


def list_count(gallery_size: int, nlist: int) -> int:
    """retrieve.ivf.nlist, or for 0 one chosen from the gallery size, checked trainable."""
    trainable = max(gallery_size // MIN_VECTORS_PER_LIST, 1)
    if nlist == 0:
        return max(1, min(round(LISTS_PER_SQRT_N * math.sqrt(gallery_size)), trainable))
    if nlist > trainable:
        raise ClipcoreError(
            f"retrieve.ivf.nlist={nlist} needs at least {nlist * MIN_VECTORS_PER_LIST:,} gallery "
            f"vectors to train ({MIN_VECTORS_PER_LIST} per list), the gallery has "
            f"{gallery_size:,}: lower it, or set 0 to choose it from the gallery size")
    return nlist


def _ivf(gallery: np.ndarray, metric: int, spec: IvfParams) -> faiss.Index:
    nlist = list_count(len(gallery), spec.nlist)
    if nlist == 1:
        # One list is the whole gallery, scanned in full: exact search, without a k-means that
        # splits nothing (and FAISS's warning about too few training points for it).
        index = faiss.IndexFlat(gallery.shape[1], metric)
        index.add(gallery)
        return index
    index = faiss.IndexIVFFlat(faiss.IndexFlat(gallery.shape[1], metric), gallery.shape[1],
                               nlist, metric)
    index.cp.seed = KMEANS_SEED
    index.cp.max_points_per_centroid = TRAIN_VECTORS_PER_LIST
    index.train(gallery)
    index.add(gallery)
    index.nprobe = min(spec.nprobe, nlist)
    return index


def _hnsw(gallery: np.ndarray, metric: int, spec: HnswParams) -> faiss.Index:
    index = faiss.IndexHNSWFlat(gallery.shape[1], spec.m, metric)
    index.hnsw.efConstruction = spec.ef_construction
    index.add(gallery)
    index.hnsw.efSearch = spec.ef_search
    return index
