"""Exact top-k search: hand-worked rankings for both metrics, brute-force agreement, ties
ordered by gallery index (also where a tie crosses the cut), exclude_self and bad input.
Approximate search (IVF, HNSW): exact when told to visit everything, valid ranked lists close
to exact otherwise, the same answer every time, short IVF lists, nlist from the gallery size."""
import faiss
import numpy as np
import pytest

from clipcore.errors import ClipcoreError
from clipcore.params import HnswParams, IvfParams
from clipcore.ranking import ann
from clipcore.ranking.search import top_k

# One query along x; gallery vectors of different lengths and directions.
QUERY = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
GALLERY = np.array([[10.0, 1.0],   # almost x, but long: best by angle, worst by distance
                    [1.0, 1.0],    # 45 degrees, short
                    [0.0, 3.0],    # along y
                    [-1.0, 0.0]],  # opposite x, short
                   dtype=np.float32)


@pytest.fixture(params=["direct", "blas-chunked"])
def faiss_path(request, monkeypatch):
    """FAISS computes small searches directly and large ones (queries x dimensions at or
    above its BLAS threshold) with BLAS products, which top_k splits over threads: make
    these small test searches take either path."""
    if request.param == "blas-chunked":
        monkeypatch.setattr(faiss.cvar, "distance_compute_blas_threshold", 0)
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(2)
        yield request.param
        faiss.omp_set_num_threads(threads)
    else:
        monkeypatch.setattr(faiss.cvar, "distance_compute_blas_threshold", 1 << 30)
        yield request.param


def brute_force(query, gallery, k, metric, exclude_self=False):
    """Rank every gallery row in float64 by (score, gallery index)."""
    query, gallery = query.astype(np.float64), gallery.astype(np.float64)
    if metric == "cosine":
        query = query / np.linalg.norm(query, axis=1, keepdims=True)
        gallery = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
        scores = query @ gallery.T
    else:
        scores = -((query[:, None, :] - gallery[None, :, :]) ** 2).sum(axis=2)
    if exclude_self:
        np.fill_diagonal(scores, -np.inf)
    return np.array([np.lexsort((np.arange(len(gallery)), -row))[:k] for row in scores])


def test_cosine_and_euclidean_disagree_and_both_are_right():
    # Cosine: q=x: 10/sqrt(101), 1/sqrt(2), 0, -1; q=y: 1/sqrt(101), 1/sqrt(2), 1, 0.
    assert top_k(QUERY, GALLERY, 4, "cosine").tolist() == [[0, 1, 2, 3], [2, 1, 0, 3]]
    # Squared distances: q=x: 82, 1, 10, 4; q=y: 100, 1, 4, 2.
    assert top_k(QUERY, GALLERY, 4, "euclidean").tolist() == [[1, 3, 2, 0], [1, 3, 2, 0]]


def test_result_is_int64_of_k_columns():
    result = top_k(QUERY, GALLERY, 2, "cosine")
    assert result.dtype == np.int64 and result.shape == (2, 2)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_matches_brute_force_on_random_vectors(metric, faiss_path):
    rng = np.random.default_rng(0)
    gallery = rng.standard_normal((3000, 24)).astype(np.float32)
    query = rng.standard_normal((61, 24)).astype(np.float32)
    for k in (1, 10, 57):
        assert (top_k(query, gallery, k, metric) == brute_force(query, gallery, k, metric)).all()


@pytest.mark.parametrize("queries", [1, 30])
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_tie_at_the_cut_keeps_the_lowest_gallery_indices(metric, queries, faiss_path):
    gallery = np.tile(np.array([[0.0, 1.0]], dtype=np.float32), (100, 1))
    gallery[[99, 5, 60, 7]] = [1.0, 0.0]
    query = np.tile(np.array([[1.0, 0.0]], dtype=np.float32), (queries, 1))
    # Four best (equal), then 96 tied rows of which the two lowest indices make the cut.
    expected = [5, 7, 60, 99, 0, 1]
    assert (top_k(query, gallery, 6, metric) == expected).all()


def test_many_exact_ties_match_brute_force(faiss_path):
    # Small integer vectors: exact arithmetic, ties everywhere, also across the cut.
    rng = np.random.default_rng(1)
    for _ in range(40):
        gallery = rng.integers(-2, 3, (int(rng.integers(5, 80)), 3)).astype(np.float32)
        query = rng.integers(-2, 3, (int(rng.integers(1, 40)), 3)).astype(np.float32)
        k = int(rng.integers(1, len(gallery) + 1))
        expected = brute_force(query, gallery, k, "euclidean")
        assert (top_k(query, gallery, k, "euclidean") == expected).all()


def test_same_call_same_answer():
    gallery = np.ones((50, 8), dtype=np.float32)
    first = top_k(gallery[:25], gallery, 10)
    assert (first == top_k(gallery[:25], gallery, 10)).all()
    assert (first == np.arange(10)).all()


def test_exclude_self_skips_only_the_query_itself():
    gallery = np.array([[1, 0], [0, 1], [1, 1], [1, 0]], dtype=np.float32)  # rows 0 and 3 equal
    result = top_k(gallery, gallery, 2, "euclidean", exclude_self=True)
    # Row 0's twin (3) comes first; row 3's twin (0) too; then the nearest other (2).
    assert result.tolist() == [[3, 2], [2, 0], [0, 1], [0, 2]]
    assert (result == brute_force(gallery, gallery, 2, "euclidean", exclude_self=True)).all()


def test_exclude_self_when_ties_push_self_off_the_list():
    # Six equal rows: row 3's first k + 1 = 3 by (distance, index) are 0, 1, 2 without itself.
    gallery = np.zeros((6, 2), dtype=np.float32)
    result = top_k(gallery, gallery, 2, "euclidean", exclude_self=True)
    assert result.tolist() == [[1, 2], [0, 2], [0, 1], [0, 1], [0, 1], [0, 1]]


def test_top_k_larger_than_gallery_names_param_and_size():
    with pytest.raises(ClipcoreError, match=r"retrieve\.top_k=5 .*\(4 images\)"):
        top_k(QUERY, GALLERY, 5)
    with pytest.raises(ClipcoreError, match=r"retrieve\.top_k=4 .*\(3 images besides"):
        top_k(GALLERY, GALLERY, 4, exclude_self=True)


def test_bad_input_is_one_clear_line():
    with pytest.raises(ClipcoreError, match="query vectors have 3 dimensions but gallery .* 2"):
        top_k(np.ones((1, 3)), GALLERY, 1)
    with pytest.raises(ClipcoreError, match="retrieve.metric must be one of cosine, euclidean"):
        top_k(QUERY, GALLERY, 1, "manhattan")
    with pytest.raises(ClipcoreError, match="gallery vectors hold NaN"):
        top_k(QUERY, np.full((3, 2), np.nan), 1)
    with pytest.raises(ClipcoreError, match="2-D array"):
        top_k(np.ones(2), GALLERY, 1)


# Approximate indexes (clipcore.ranking.ann), built on clustered vectors as embeddings are.

def clustered(rows: int, dim: int = 32, clusters: int = 40, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    points = centres[rng.integers(0, clusters, rows)] + 0.5 * rng.standard_normal((rows, dim))
    return points.astype(np.float32)


GALLERY_3K, QUERY_3K = clustered(3000), clustered(200, seed=1)
IVF = IvfParams(nlist=0, nprobe=4)
HNSW = HnswParams(m=16, ef_construction=40, ef_search=32)


def overlap(found: np.ndarray, expected: np.ndarray) -> float:
    """Mean share of each exact top-k list that the approximate list holds."""
    return np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found, expected)])


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_index_that_visits_everything_equals_exact_search(metric):
    everything = [IvfParams(nlist=0, nprobe=10_000), HnswParams(m=32, ef_construction=200,
                                                                ef_search=3000)]
    expected = brute_force(QUERY_3K, GALLERY_3K, 10, metric)
    for index in everything:
        assert (top_k(QUERY_3K, GALLERY_3K, 10, metric, index=index) == expected).all()


@pytest.mark.parametrize("index", [IVF, HNSW], ids=["ivf", "hnsw"])
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_approximate_lists_are_valid_ranked_and_close_to_exact(index, metric):
    found = top_k(QUERY_3K, GALLERY_3K, 10, metric, index=index)
    assert found.dtype == np.int64 and found.shape == (200, 10)
    assert all(len(set(row)) == 10 for row in found) and (found >= 0).all()
    q = QUERY_3K.astype(np.float64)
    g = GALLERY_3K.astype(np.float64)[found]
    if metric == "cosine":
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        g = g / np.linalg.norm(g, axis=2, keepdims=True)
        scores = (q[:, None, :] * g).sum(-1)
    else:
        scores = -((q[:, None, :] - g) ** 2).sum(-1)
    assert (np.diff(scores, axis=1) <= 1e-5).all()  # best first
    # IVF visits 4 of 76 lists here, HNSW keeps 32 candidates: they find most, not all.
    assert 0.7 <= overlap(found, brute_force(QUERY_3K, GALLERY_3K, 10, metric)) < 1.0


@pytest.mark.parametrize("index", [IVF, HNSW], ids=["ivf", "hnsw"])
def test_approximate_search_gives_the_same_answer_every_time(index):
    first = top_k(QUERY_3K, GALLERY_3K, 10, index=index)
    again = top_k(QUERY_3K.copy(), GALLERY_3K.copy(), 10, index=index)
    assert (first == again).all()


def test_ivf_lists_too_short_for_k_fall_back_to_exact_search():
    # Two clusters, 80 vectors near +x and 40 near -x; a query near -x with nprobe 1 visits
    # only the 40-vector list, fewer than k = 50: that query is searched exactly.
    rng = np.random.default_rng(2)
    gallery = np.concatenate([[10, 0] + rng.standard_normal((80, 2)),
                              [-10, 0] + rng.standard_normal((40, 2))]).astype(np.float32)
    query = np.array([[-10.0, 0.5], [10.0, 0.5]], dtype=np.float32)
    found = top_k(query, gallery, 50, "euclidean", index=IvfParams(nlist=2, nprobe=1))
    assert (found[0] == brute_force(query[:1], gallery, 50, "euclidean")).all()
    assert (found >= 0).all()


@pytest.mark.parametrize("index", [IVF, HNSW], ids=["ivf", "hnsw"])
def test_exclude_self_with_an_approximate_index(index):
    found = top_k(GALLERY_3K[:500], GALLERY_3K[:500], 5, index=index, exclude_self=True)
    assert found.shape == (500, 5)
    assert not (found == np.arange(500)[:, None]).any()


def test_nlist_zero_is_chosen_from_the_gallery_size():
    assert ann.list_count(1_000_000, 0) == 4000            # 4 sqrt(N)
    assert ann.list_count(269, 0) == 6                     # the demo: >= 39 vectors a list
    assert ann.list_count(10, 0) == 1
    assert ann.list_count(1_000_000, 1024) == 1024         # as set


def test_nlist_too_large_to_train_names_the_param_and_sizes():
    with pytest.raises(ClipcoreError, match=r"retrieve\.ivf\.nlist=100 needs at least 3,900 "
                                            r"gallery vectors .* the gallery has 3,000"):
        top_k(QUERY_3K, GALLERY_3K, 10, index=IvfParams(nlist=100, nprobe=8))


@pytest.mark.parametrize("nlist", [0, 1])
def test_a_gallery_too_small_for_two_lists_is_searched_without_a_faiss_warning(nlist, capfd):
    """Before: FAISS printed `WARNING clustering 12 points to 1 centroids` on stderr, for
    a k-means that cannot split anything: one list is the whole gallery, scanned exactly."""
    gallery, query = GALLERY_3K[:12], QUERY_3K[:3]
    found = top_k(query, gallery, 5, index=IvfParams(nlist=nlist, nprobe=1))
    assert (found == brute_force(query, gallery, 5, "cosine")).all()
    assert capfd.readouterr().err == ""
