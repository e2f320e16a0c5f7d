"""The shared measures on rankings whose answers are worked out by hand."""
import math

import numpy as np
import pytest

from clipcore.ranking.measures import (
    competition_score,
    metrics_for_indices,
    metrics_for_names,
    retrieval_metrics,
)


def test_score_weights_hit_rates_out_of_1000():
    assert competition_score({1: 1.0, 5: 1.0, 10: 1.0}) == 1000
    assert competition_score({1: 0.5, 5: 0.5, 10: 1.0}) == pytest.approx(300 + 150 + 100)


def test_hand_worked_ranking():
    # Query a: first hit at rank 1; query b: first hit at rank 6; query c: no hit in 10.
    ranked = [["a"] + ["x"] * 9,
              ["x"] * 5 + ["b"] + ["x"] * 4,
              ["x"] * 10]
    m = retrieval_metrics(["a", "b", "c"], ranked, n_relevant=[2, 1, 3])
    assert (m["top1"], m["top5"], m["top10"]) == pytest.approx((1 / 3, 1 / 3, 2 / 3))
    assert m["score"] == pytest.approx(600 / 3 + 300 / 3 + 100 * 2 / 3)
    assert m["precision_at_k"] == pytest.approx((1 + 1 + 0) / 30)
    # AP@10: a = (1/1)/min(10,2) = 0.5; b = (1/6)/1; c = 0.
    assert m["map_at_k"] == pytest.approx((0.5 + 1 / 6 + 0) / 3)
    assert (m["k"], m["queries"]) == (10, 3)


def test_cut_off_k_applies_to_precision_and_map_only():
    ranked = [["x", "a", "a"]]
    m = retrieval_metrics(["a"], ranked, n_relevant=[2], k=1)
    assert m["precision_at_k"] == 0 and m["map_at_k"] == 0
    assert m["top5"] == 1.0  # hit rates look at the whole list


def test_indices_and_names_agree():
    rng = np.random.default_rng(0)
    gallery_labels = rng.integers(0, 5, 40).astype(str)
    query_labels = rng.integers(0, 5, 12).astype(str)
    indices = np.stack([rng.permutation(40)[:10] for _ in range(12)])
    by_index = metrics_for_indices(query_labels, gallery_labels, indices)
    gallery_names = [f"g{i}.png" for i in range(40)]
    ranking = {f"q{i}.png": [gallery_names[j] for j in row] for i, row in enumerate(indices)}
    by_name = metrics_for_names(ranking, dict(zip(ranking, query_labels)),
                                dict(zip(gallery_names, gallery_labels)))
    assert by_name == by_index


def test_unknown_name_is_named():
    with pytest.raises(KeyError, match="g9"):
        metrics_for_names({"q": ["g9"]}, {"q": "1"}, {"g1": "1"})


def test_perfect_ranking_scores_1000_and_map_1():
    m = retrieval_metrics(["a", "b"], [["a"] * 10, ["b"] * 10], n_relevant=[10, 10])
    assert m["score"] == 1000 and math.isclose(m["map_at_k"], 1.0)
