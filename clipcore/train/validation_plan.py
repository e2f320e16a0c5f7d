"""What validation ranks against what, drawn once per run: which val (and training) images query
(`data.val_queries`: a file-name pattern, or auto) and which images of no val class join the val
gallery as distractors (`data.val_distractors`).

Distractors: a validation gallery of ~30 held-out identities predicts the small gallery it sees,
not the test's ~300 (issue 29). `train_others` adds the training images of the classes not in
val (under the image split every training image is in the gallery already, so it adds none);
`test_gallery` adds the unlabelled test gallery. Either way a distractor is no class's image: it
can push a query's match down its ranking, never be one.

`data.val_queries: auto`, for file names that don't tell the queries' rendering (the
competition's are UUIDs): the unlabelled test images do, by where they sit. A logistic
regression (scikit-learn, class-balanced, on L2-normalised backbone features of the base model)
learns test query (1) against test gallery (0), and the val and training images it calls queries
are then treated as a `photo_*` pattern's matches are.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from clipcore.data.manifests import read_manifest
from clipcore.errors import ClipcoreError
from clipcore.params import DataParams
from clipcore.train.splits import Split
from clipcore.train.validation import DISTRACTOR, check_query_rows, query_masks

AUTO = "auto"
Masks = tuple[np.ndarray | None, np.ndarray | None]  # which val, which training images query


@dataclass
class ValidationPlan:
    masks: Masks
    distractors: str  # data.val_distractors
    test_query: Split | None = None  # auto's class 1
    test_gallery: Split | None = None  # auto's class 0; test_gallery's distractors


def plan_validation(data: DataParams, val: Split, train: Split, data_root: Path, prepared: Path,
                    device: torch.device) -> ValidationPlan:
    """The plan, with every check that needs no model (a pattern leaving no query or gallery, no
    test images to learn from or to distract with), so that a bad setting stops the run before
    the model is built. auto's masks come later, from the model's features (`learn_queries`)."""
    auto = data.val_queries == AUTO
    plan = ValidationPlan((None, None) if auto else
                          query_masks(val.paths, train.paths, data.val_queries), data.val_distractors)
    if auto and len(val.paths):
        plan.test_query = test_split(data_root, prepared, "query", "data.val_queries: auto", device)
    if (auto and len(val.paths)) or data.val_distractors == "test_gallery":
        why = "data.val_queries: auto" if auto else "data.val_distractors: test_gallery"
        plan.test_gallery = test_split(data_root, prepared, "gallery", why, device)
    return plan


def test_split(data_root: Path, prepared: Path, name: str, why: str,
               device: torch.device) -> Split:
    """The unlabelled test query or gallery images, as a split of distractors (label DISTRACTOR)."""
    frame = read_manifest(prepared, name)
    if not len(frame):
        raise ClipcoreError(f"{Path(prepared) / f'{name}.csv'}: no test {name} images, which "
                            f"params '{why}' needs (set it back to its default, or add test images)")
    return Split(f"test_{name}", [Path(data_root) / p for p in frame["path"]],
                 torch.full((len(frame),), DISTRACTOR, dtype=torch.long, device=device))


def learn_queries(plan: ValidationPlan, features, val: Split, train: Split) -> None:
    """auto: the val and training masks from a query-vs-gallery classifier of the test images'
    features (`features`: the run's BackboneFeatures, called before any training step, so of the
    base model). Stops, naming data.val_queries, when it leaves validation no query or gallery."""
    if plan.test_query is None:
        return
    classifier = rendering_classifier(features(plan.test_query), features(plan.test_gallery))
    rows = predicted_queries(classifier, features(val))
    check_query_rows(rows, "auto (a classifier of the test's query vs gallery images) takes", (
        "the val images look like the test gallery; set a file-name pattern instead",
        "the val images look like the test queries; set a file-name pattern instead"))
    plan.masks = rows, predicted_queries(classifier, features(train))


def rendering_classifier(query_features, gallery_features) -> LogisticRegression:
    """Test query images (1) against test gallery images (0); balanced, as the two sets' sizes
    need not be the val split's."""
    x = np.concatenate([_normalised(query_features), _normalised(gallery_features)])
    y = np.r_[np.ones(len(query_features)), np.zeros(len(gallery_features))]
    return LogisticRegression(class_weight="balanced", max_iter=1000).fit(x, y)


def predicted_queries(classifier: LogisticRegression, features) -> np.ndarray:
    """Which of these images the classifier calls queries (a boolean mask)."""
    if not len(features):
        return np.zeros(0, dtype=bool)
    return classifier.predict(_normalised(features)).astype(bool)


def _normalised(features) -> np.ndarray:
    x = torch.as_tensor(features).float().cpu().numpy()
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
