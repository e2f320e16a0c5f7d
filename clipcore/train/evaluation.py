"""Each epoch's validation: val_loss over fixed batches of the val images, and retrieval with each
val image (or each one `data.val_queries` names) as a query, against a gallery that
`data.val_distractors` may crowd (the protocol: clipcore.train.validation, validation_plan)."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from clipcore.model.factory import FineTunedCLIP
from clipcore.train.splits import BackboneFeatures, Split
from clipcore.train.validation import train_joins_gallery, validation_metrics
from clipcore.train.validation_plan import ValidationPlan

# k: the cut-off precision@k and mAP@k were measured at, train.val_top_k or, where that is beyond
# the val gallery, the gallery's size (for the stage's label; not a CSV column).
VALIDATION_COLUMNS = ("top1", "top5", "top10", "score", "precision_at_k", "map_at_k", "k",
                      "val_queries", "val_unmatched")
BatchLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (embeddings, labels) -> loss


@torch.no_grad()
def evaluate(model: FineTunedCLIP, features: BackboneFeatures, val: Split, train: Split,
             batch_loss: BatchLoss, val_order: torch.Tensor, batch_size: int, k: int,
             plan: ValidationPlan) -> dict:
    """val_loss and the VALIDATION_COLUMNS the val images measure (none without val images), with
    the model as it is (the caller sets eval mode). plan: which val and training images are in
    the queries' rendering (None: every val image queries) and the distractors."""
    if not len(val.paths):
        return {}
    embeddings = model.embed_features(features(val)).float()
    row = {"val_loss": _val_loss(embeddings, val.labels, batch_loss, val_order, batch_size)}
    val_labels, train_labels = val.labels.cpu().numpy(), train.labels.cpu().numpy()

    def embed(split: Split) -> np.ndarray:
        return model.embed_features(features(split)).float().cpu().numpy()

    joins = train_joins_gallery(val_labels, train_labels)
    gallery = embed(train) if joins else None
    distractors = None
    if plan.distractors == "test_gallery":
        distractors = embed(plan.test_gallery)
    elif plan.distractors == "train_others" and not joins:  # joined, they are in the gallery
        # Out of the gallery as the joining training images are: not in the queries' rendering.
        rows = slice(None) if plan.masks[1] is None else ~plan.masks[1]
        distractors = embed(train)[rows]
    measures = validation_metrics(embeddings.cpu().numpy(), val_labels, k, gallery, train_labels,
                                  query_mask=plan.masks[0], train_query_mask=plan.masks[1],
                                  distractors=distractors)
    row.update({key: float(measures[key]) for key in VALIDATION_COLUMNS if key in measures})
    if "query_scores" in measures:  # each val query's points, for the paired base comparison
        row["query_scores"] = measures["query_scores"]
    return row


def revisited_splits(val: Split, train: Split, plan: ValidationPlan) -> set[str]:
    """The splits whose images every epoch's validation (`evaluate`) takes through the image
    tower: with a backbone that trains, the ones whose decoded pixels are worth keeping."""
    if not len(val.paths):
        return set()
    joins = train_joins_gallery(val.labels.cpu().numpy(), train.labels.cpu().numpy())
    return {"val", *(["train"] if joins or plan.distractors == "train_others" else []),
            *(["test_gallery"] if plan.distractors == "test_gallery" else [])}


def _val_loss(embeddings: torch.Tensor, labels: torch.Tensor, batch_loss: BatchLoss,
              order: torch.Tensor, batch_size: int) -> float:
    # Summed on the device and read once: a read per batch would make a GPU wait on the host.
    total = torch.zeros((), dtype=torch.float64, device=embeddings.device)
    # The order on the device in one copy: a host index per batch would be a wait per batch.
    for index in order.to(embeddings.device).split(batch_size):
        total += batch_loss(embeddings[index], labels[index]).double() * len(index)
    return total.item() / len(labels)
