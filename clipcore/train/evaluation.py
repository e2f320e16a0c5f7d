"""Each epoch's validation: val_loss over fixed batches of the val images, and retrieval with each
val image (or each one `data.val_queries` names) as a query (the protocol: clipcore.train.validation)."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from clipcore.model.factory import FineTunedCLIP
from clipcore.train.splits import BackboneFeatures, Split
from clipcore.train.validation import train_joins_gallery, validation_metrics

# k: the cut-off precision@k and mAP@k were measured at, train.val_top_k or, where that is beyond
# the val gallery, the gallery's size (for the stage's label; not a CSV column).
VALIDATION_COLUMNS = ("top1", "top5", "top10", "score", "precision_at_k", "map_at_k", "k",
                      "val_queries", "val_unmatched")
BatchLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (embeddings, labels) -> loss


@torch.no_grad()
def evaluate(model: FineTunedCLIP, features: BackboneFeatures, val: Split, train: Split,
             batch_loss: BatchLoss, val_order: torch.Tensor, batch_size: int, k: int,
             query_masks: tuple[np.ndarray | None, np.ndarray | None]) -> dict:
    """val_loss and the VALIDATION_COLUMNS the val images measure (none without val images), with
    the model as it is (the caller sets eval mode). query_masks: which val and training images
    are in the queries' rendering (clipcore.train.validation.query_masks; None: every val image
    queries)."""
    if not len(val.paths):
        return {}
    embeddings = model.embed_features(features(val)).float()
    row = {"val_loss": _val_loss(embeddings, val.labels, batch_loss, val_order, batch_size)}
    val_labels, train_labels = val.labels.cpu().numpy(), train.labels.cpu().numpy()
    gallery = (model.embed_features(features(train)).float().cpu().numpy()
               if train_joins_gallery(val_labels, train_labels) else None)
    measures = validation_metrics(embeddings.cpu().numpy(), val_labels, k, gallery, train_labels,
                                  query_mask=query_masks[0], train_query_mask=query_masks[1])
    row.update({key: float(measures[key]) for key in VALIDATION_COLUMNS if key in measures})
    if "query_scores" in measures:  # each val query's points, for the paired base comparison
        row["query_scores"] = measures["query_scores"]
    return row


def _val_loss(embeddings: torch.Tensor, labels: torch.Tensor, batch_loss: BatchLoss,
              order: torch.Tensor, batch_size: int) -> float:
    # Summed on the device and read once: a read per batch would make a GPU wait on the host.
    total = torch.zeros((), dtype=torch.float64, device=embeddings.device)
    # The order on the device in one copy: a host index per batch would be a wait per batch.
    for index in order.to(embeddings.device).split(batch_size):
        total += batch_loss(embeddings[index], labels[index]).double() * len(index)
    return total.item() / len(labels)
