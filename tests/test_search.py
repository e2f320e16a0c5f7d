"""Exact top-k search: hand-worked rankings for both metrics, brute-force agreement, ties
ordered by gallery index (also where a tie crosses the cut), exclude_self and bad input."""
import faiss
import numpy as np
import pytest

from clipcore.errors import ClipcoreError
from clipcore.search import top_k

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
