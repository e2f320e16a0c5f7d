"""Re-ranking (retrieve.rerank, retrieve.dba_k) on cases small enough to compute by hand, and
through the retrieve stage: off is the plain search exactly."""
from __future__ import annotations

import contextlib
import json
import re

import numpy as np
import pytest

from clipcore import paths
from clipcore.data.manifests import labels_by_name, read_manifest
from clipcore.errors import ClipcoreError
from clipcore.params import ParamsError
from clipcore.ranking.search import top_k
from clipcore.retrieve.rerank import (
    _shared_weight,
    augment_database,
    check_memory,
    expand_queries,
    k_reciprocal_distances,
    ranked,
)
from clipcore.retrieve.retrieval import retrieve_all


def search(q, g, k):
    return top_k(q, g, k, "cosine")


def unit(*angles_degrees):
    radians = np.radians(angles_degrees)
    return np.stack([np.cos(radians), np.sin(radians)], axis=1).astype(np.float32)


# q = (1, 0); gallery g0 = (.8, .6), g1 = (.6, -.8), g2 = (.28, .96): cosines .8, .6, .28.
QUERY = np.array([[1.0, 0.0]], dtype=np.float32)
GALLERY = np.array([[0.8, 0.6], [0.6, -0.8], [0.28, 0.96]], dtype=np.float32)


def retrieve_params(params_factory, **overrides):
    return params_factory({f"retrieve.{k}": v for k, v in overrides.items()}).retrieve


def test_average_query_expansion_by_hand(params_factory):
    # AQE with k = 1: q' = (q + g0) / |q + g0| = (1.8, .6) / 1.8974 = (.9487, .3162);
    # cosines g0 .9487, g1 .5692 - .2530 = .3162, g2 .2656 + .3036 = .5692: g2 overtakes g1.
    expanded = expand_queries(QUERY, GALLERY, k=1, alpha=0.0, search=search)
    np.testing.assert_allclose(expanded, [[0.9487, 0.3162]], atol=1e-4)
    assert search(QUERY, GALLERY, 3).tolist() == [[0, 1, 2]]
    params = retrieve_params(params_factory, rerank="aqe", top_k=3, **{"qe.k": 1, "qe.alpha": 0.0})
    assert ranked(QUERY, GALLERY, params, search).tolist() == [[0, 2, 1]]


def test_alpha_query_expansion_weights_neighbours_by_similarity_power():
    # alpha 3, k = 2: q' ∝ q + .8^3 g0 + .6^3 g1 = (1 + .4096 + .1296, .3072 - .1728)
    expanded = expand_queries(QUERY, GALLERY, k=2, alpha=3.0, search=search)
    by_hand = np.array([1.5392, 0.1344])
    np.testing.assert_allclose(expanded[0], by_hand / np.linalg.norm(by_hand), atol=1e-4)


def test_database_side_augmentation_by_hand():
    # dba k = 1, alpha 0: every gallery vector averaged with its nearest other gallery vector.
    # g0's nearest is g2 (cos .8), g1's is g0 (cos 0), g2's is g0.
    augmented = augment_database(GALLERY, k=1, alpha=0.0, search=search)
    by_hand = np.array([[1.08, 1.56], [1.4, -0.2], [1.08, 1.56]])
    np.testing.assert_allclose(augmented, by_hand / np.linalg.norm(by_hand, axis=1, keepdims=True),
                               atol=1e-5)


def test_k_reciprocal_by_hand():
    """1-D points, Euclidean: q = 0, g0 = 1, g1 = -1.1, g2 = 1.5; k1 = 2, k2 = 1, lambda .3.

    Squared distances scaled by each row's maximum give the original distances, q's row:
    0, .4444, .5378, 1. The 2-reciprocal sets (self included): R(q) = {q, g0, g1},
    R(g0) = {g0, g2, q}, R(g1) = {g1, q}, R(g2) = {g2, g0} (g0 is q's nearest, but g0 prefers
    g2; g1 has q as its nearest). No set grows in the 1-reciprocal expansion. Weights
    exp(-d) normalised over each set: V(q) = (.4494, .2882, .2625, 0), V(g0) = (.2907, .3647,
    0, .3446), V(g1) = (.4554, 0, .5446, 0), V(g2) = (0, .4908, 0, .5092). Summed minima with
    V(q): g0 .5789, g1 .7119, g2 .2882; Jaccard 1 - m / (2 - m): .5926, .4473, .8316; final
    .7 * Jaccard + .3 * original: g0 .5482, g1 .4744, g2 .8821. So g1, the query's reciprocal
    neighbour, overtakes g0, the nearest point.
    """
    query = np.array([[0.0]], dtype=np.float32)
    gallery = np.array([[1.0], [-1.1], [1.5]], dtype=np.float32)
    distances = k_reciprocal_distances(query, gallery, k1=2, k2=1, lam=0.3, metric="euclidean")
    np.testing.assert_allclose(distances, [[0.5482, 0.4744, 0.8821]], atol=2e-4)
    # lambda 1: the original distances alone, so the plain ranking.
    plain = k_reciprocal_distances(query, gallery, k1=2, k2=1, lam=1.0, metric="euclidean")
    np.testing.assert_allclose(plain, [[0.4444, 0.5378, 1.0]], atol=2e-4)


def test_k_reciprocal_ranking_and_local_expansion(params_factory):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 8))
    gallery = np.repeat(centres, 5, axis=0) + 0.3 * rng.normal(size=(20, 8))
    query = centres + 0.3 * rng.normal(size=(4, 8))
    params = retrieve_params(params_factory, rerank="kreciprocal", top_k=5,
                             **{"kreciprocal.k1": 6, "kreciprocal.k2": 3})
    indices = ranked(query, gallery, params, search)
    distances = k_reciprocal_distances(query, gallery, 6, 3, 0.3, "cosine")
    assert indices.shape == (4, 5)
    np.testing.assert_array_equal(indices, np.argsort(distances, axis=1, kind="stable")[:, :5])
    # Well-separated clusters: every query's five are its own cluster's five.
    assert (indices // 5 == np.arange(4)[:, None]).all()


def test_off_is_the_plain_search(params_factory):
    rng = np.random.default_rng(1)
    query, gallery = rng.normal(size=(7, 5)), rng.normal(size=(30, 5))
    params = retrieve_params(params_factory)
    assert params.rerank == "none" and params.dba_k == 0
    np.testing.assert_array_equal(ranked(query, gallery, params, search),
                                  search(query, gallery, params.top_k))


@pytest.mark.parametrize("overrides, key", [
    ({"rerank": "aqe", "qe.k": 4}, "retrieve.qe.k"),
    ({"dba_k": 3}, "retrieve.dba_k"),
    ({"rerank": "kreciprocal", "kreciprocal.k1": 6}, "retrieve.kreciprocal.k1"),
])
def test_neighbourhoods_larger_than_the_data_name_the_key(params_factory, overrides, key):
    params = retrieve_params(params_factory, top_k=2, **overrides)
    with pytest.raises(ClipcoreError, match=key.replace(".", r"\.")):
        ranked(QUERY, GALLERY, params, search)


def test_query_expansion_needs_cosine(params_factory):
    with pytest.raises(ParamsError, match="retrieve.metric: cosine"):
        retrieve_params(params_factory, rerank="aqe", metric="euclidean")
    with pytest.raises(ParamsError, match="retrieve.dba_k"):
        retrieve_params(params_factory, dba_k=2, metric="euclidean")
    assert retrieve_params(params_factory, rerank="kreciprocal", metric="euclidean")


def test_retrieve_stage_reranks_every_epoch(tmp_path, params_factory, prepared_demo):
    """The stage's results follow retrieve.rerank; embeddings made to cluster by class."""
    data_root, prepared = prepared_demo
    names, vectors = {}, {}
    rng = np.random.default_rng(2)
    centres = rng.normal(size=(10, 16))
    for split in ("query", "gallery"):
        labels = labels_by_name(read_manifest(prepared, split))
        names[split] = list(labels)
        digits = np.array([int(label) for label in labels.values()])
        vectors[split] = centres[digits] + 1.2 * rng.normal(size=(len(digits), 16))
    with contextlib.chdir(tmp_path):
        paths.EMBEDDINGS.mkdir(parents=True)
        np.savez(paths.embeddings_path(0), query=vectors["query"], gallery=vectors["gallery"],
                 query_names=np.array(names["query"]), gallery_names=np.array(names["gallery"]))
        scores = {}
        for rerank in ("none", "aqe", "kreciprocal"):
            params = retrieve_params(params_factory, rerank=rerank, picture_queries=0)
            report = retrieve_all(params, data_root, prepared)
            scores[rerank] = report.metrics[0]
            results = json.loads(paths.results_path(0).read_text())
            assert list(results) == names["query"]
            expected = ranked(vectors["query"], vectors["gallery"], params, search)
            assert list(results.values()) == [[names["gallery"][i] for i in row]
                                              for row in expected]
    assert scores["aqe"]["map_at_k"] != scores["none"]["map_at_k"]
    assert scores["kreciprocal"]["map_at_k"] != scores["none"]["map_at_k"]


def test_sparse_jaccard_overlap_equals_the_dense_sum_of_minima():
    rng = np.random.default_rng(3)
    weights = rng.random((12, 12)).astype(np.float32) * (rng.random((12, 12)) < 0.3)
    weights[np.arange(12), np.arange(12)] = 0.5  # every point weighs itself, as in re-ranking
    dense = np.stack([np.minimum(weights[i], weights).sum(axis=1) for i in range(5)])
    np.testing.assert_allclose(_shared_weight(weights, 5), dense, rtol=1e-6)


def test_k_reciprocal_beyond_this_machines_memory_is_refused(params_factory):
    """It holds several (queries + gallery)^2 matrices: 2M test images would need 80 TB."""
    params = retrieve_params(params_factory, rerank="kreciprocal")
    with pytest.raises(ClipcoreError, match=r"^retrieve\.rerank kreciprocal compares all "
                                            r"2,000,000 query and gallery images pairwise: "
                                            r"about 80,000\.0 GB, more than the [\d,.]+ GB "
                                            r"this machine has; use rerank aqe or none$"):
        check_memory(params, 1_000_000, 1_000_000)
    check_memory(params, 1_500, 1_500)  # the competition's size: about 0.2 GB


@pytest.mark.parametrize("index", ["hnsw", "ivf"])
def test_k_reciprocal_with_an_approximate_index_says_it_searches_exactly(
        tmp_path, params_factory, prepared_demo, index, capsys):
    """Before, retrieve.index hnsw|ivf was silently ignored by k-reciprocal re-ranking."""
    data_root, prepared = prepared_demo
    frames = {split: read_manifest(prepared, split) for split in ("query", "gallery")}
    rng = np.random.default_rng(0)
    with contextlib.chdir(tmp_path):
        paths.EMBEDDINGS.mkdir(parents=True)
        for epoch in (0, 1):
            np.savez(paths.embeddings_path(epoch),
                     **{split: rng.normal(size=(len(frame), 8)) for split, frame in frames.items()},
                     **{f"{split}_names": np.array([p.rsplit("/", 1)[-1] for p in frame["path"]])
                        for split, frame in frames.items()})
        retrieve_all(retrieve_params(params_factory, rerank="kreciprocal", index=index,
                                     picture_queries=0), data_root, prepared)
    n = sum(len(frame) for frame in frames.values())
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1  # once, not once per epoch
    assert re.fullmatch(
        rf"warning: retrieve\.rerank kreciprocal ranks by exact distances between all {n} query "
        rf"and gallery images, whatever retrieve\.index \({index}\) says: about \d+ MB here, "
        rf"growing with the square of that number", warnings[0])
