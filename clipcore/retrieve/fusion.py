"""Fusion: rank with a weighted sum of the cosine similarities of several embeddings of the same
queries and gallery (several runs or seeds: an ensemble; several backbones; whole image and face
crop), as the competition's best entries fused FaceNet and CLIP.

sum_i w_i cos(q_i, g_i) is the inner product of the concatenations of sqrt(w_i) * unit(x_i), whose
norms are all sqrt(sum w_i): so the fused ranking is an ordinary cosine search over those
concatenated vectors (`fused_vectors`), through the same top_k (exact or FAISS) as any epoch's,
and a weight of 1 on one member and 0 on the others ranks exactly as that member alone (members
at weight 0 are left out).
Weights are chosen on validation only (`choose_weights`): every val image queries the others.
"""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from clipcore.errors import ClipcoreError
from clipcore.model.checkpoint import load_model_file
from clipcore.model.factory import FineTunedCLIP
from clipcore.model.features import backbone_features
from clipcore.ranking.measures import retrieval_metrics
from clipcore.ranking.search import top_k, unit_rows


def fused_vectors(parts: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """The members' vectors of the same images, each unit-normalised and scaled by sqrt(weight),
    side by side: their cosine search ranks by the weighted sum of the members' cosines."""
    if len(parts) != len(weights) or not parts:
        raise ClipcoreError(f"fusion: {len(parts)} embeddings for {len(weights)} weights")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ClipcoreError(f"fusion weights must be >= 0 and not all 0, got {list(weights)}")
    rows = {len(p) for p in parts}
    if len(rows) != 1:
        raise ClipcoreError(f"fusion: the members embed different image counts {sorted(rows)}")
    used = [(np.asarray(p, np.float32), w) for p, w in zip(parts, weights) if w > 0]
    if len(used) == 1:  # one member: its own vectors, so that it ranks exactly as it does alone
        return used[0][0]
    return np.concatenate([np.sqrt(w) * unit_rows(p) for p, w in used], axis=1)


def weight_grid(members: int, step: float) -> list[tuple[float, ...]]:
    """Every weighting of the members in multiples of `step` summing to 1 (a simplex grid)."""
    if members == 1:
        return [(1.0,)]
    n = round(1 / step)
    return [tuple(c / n for c in combo) for combo in itertools.product(range(n + 1), repeat=members)
            if sum(combo) == n]


def val_score(vectors: np.ndarray, labels: Sequence[str], k: int = 10) -> float:
    """The competition score of the val images, each querying all the others (itself excluded);
    images alone in their class don't query."""
    labels = np.asarray(labels)
    ranked = top_k(vectors, vectors, min(k, len(vectors) - 1), exclude_self=True)
    classes, counts = np.unique(labels, return_counts=True)
    others = dict(zip(classes, counts - 1))
    positives = np.array([others[label] for label in labels])
    keep = positives > 0
    if not keep.any():
        raise ClipcoreError("fusion: no val class has two images, so no weights can be chosen")
    return retrieval_metrics(labels[keep], labels[ranked[keep]], positives[keep], k)["score"]


def choose_weights(val_parts: Sequence[np.ndarray], labels: Sequence[str], step: float = 0.1,
                   k: int = 10) -> tuple[tuple[float, ...], float]:
    """The grid weighting with the highest val score (ties: the first in grid order), and it."""
    best = None
    for weights in weight_grid(len(val_parts), step):
        score = val_score(fused_vectors(val_parts, weights), labels, k)
        if best is None or score > best[1]:
            best = (weights, score)
    return best


def embed_images(model_file: Path | FineTunedCLIP, images: Sequence[Path], device: str = "cpu",
                 batch_size: int = 64, desc: str = "") -> np.ndarray:
    """A model's (or model file's) embeddings of the images (num_workers 0: a fusion run is
    small)."""
    if isinstance(model_file, FineTunedCLIP):
        model = model_file.eval()
    else:
        model, _ = load_model_file(model_file, device)
    features = backbone_features(model, list(images), batch_size=batch_size, num_workers=0,
                                 desc=desc or getattr(model_file, "name", "model"))
    with torch.inference_mode():
        return model.embed_features(features).float().cpu().numpy()
