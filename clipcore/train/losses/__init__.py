"""The training loss that `loss.name` picks, built by one call (as open_clip's `create_loss`):
today's CLIP loss against per-class text targets (clipcore.train.losses.clip), or a pytorch-metric-learning
loss on the image embeddings and their class labels.

Every loss is called as `loss(embeddings, labels, rows)` on the whole batch's unit embeddings
(gathered from every process) and returns this process's share of the batch loss, the shares
summing to the loss one process computes on the whole batch (rows: this process's rows, None
with one process). Its parameters are what it trains besides the model's head and backbone:
- clip: the temperature and the text targets (or text head), trained with the head;
- arcface, subcenter_arcface, cosface (classifier losses): a weight per class (per sub-centre),
  each image scored against them alone, so each process scores its own rows. The class weights
  train in an optimizer group of their own (`loss.<name>.class_lr_scale`);
- supcon, triplet, multi_similarity (pair losses): nothing; they compare the batch's images
  with one another, so each process computes the whole gathered batch's loss and takes the
  share of it its rows hold. They need same-class images in each batch (clipcore.params refuses
  them without `train.sampler: class_balanced`).
"""
from __future__ import annotations

import torch
from pytorch_metric_learning import losses, miners
from torch import nn

from clipcore.model.factory import FineTunedCLIP
from clipcore.params import PAIR_LOSSES, LossParams, Params
from clipcore.train.losses.clip import RetrievalClipLoss, text_targets


class ClipObjective(nn.Module):
    """The CLIP loss (clipcore.train.losses.clip) of each image against its class's text target, at the
    model's learnable temperature."""
    class_lr_scale = None  # its parameters train with the head

    def __init__(self, targets: nn.Module, logit_scale: nn.Parameter, same_class_positives: bool):
        super().__init__()
        self.targets = targets
        self.logit_scale = logit_scale  # the model's own parameter, shared: it trains with the loss
        self.clip = RetrievalClipLoss(same_class_positives)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor,
                rows: slice | None = None) -> torch.Tensor:
        return self.clip(embeddings, self.targets(labels), labels, self.logit_scale, rows=rows)


class MetricLoss(nn.Module):
    """A pytorch-metric-learning loss, with the miner that picks its pairs or triplets (None:
    all of them), as this process's share of the batch loss. class_lr_scale: a classifier
    loss's, whose class weights train at train.lr times it; None for a pair loss."""

    def __init__(self, loss: nn.Module, miner: nn.Module | None, class_lr_scale: float | None):
        super().__init__()
        self.loss, self.miner = loss, miner
        self.class_lr_scale = class_lr_scale

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor,
                rows: slice | None = None) -> torch.Tensor:
        share = 1.0 if rows is None else (rows.stop - rows.start) / len(labels)
        if rows is not None and self.class_lr_scale is not None:
            # A classifier loss scores each image alone: the mean over this process's rows.
            embeddings, labels = embeddings[rows], labels[rows]
        pairs = None if self.miner is None else self.miner(embeddings, labels)
        return self.loss(embeddings, labels, pairs) * share


def create_loss(params: Params, model: FineTunedCLIP, captions: list[str]) -> nn.Module:
    """The `loss.name` loss for classes with these captions (the class ids index them) and
    the model's embeddings. Draws random class weights (and a text head's init) from torch's
    global random stream: the run's seed."""
    loss = params.loss
    if loss.name == "clip":
        # Each class's caption through the text tower once per run, not per step.
        targets = text_targets(loss.text_targets, model.caption_embeddings(captions),
                               params.model.dropout)
        return ClipObjective(targets, model.clip.logit_scale, loss.same_class_positives)
    # The temperature is the CLIP loss's: other losses leave it be (and DDP, which waits for a
    # gradient of every parameter that requires one, must not wait for it).
    model.clip.logit_scale.requires_grad_(False)
    if loss.name in PAIR_LOSSES:
        return MetricLoss(*_PAIR[loss.name](loss), class_lr_scale=None)
    return MetricLoss(_CLASSIFIER[loss.name](loss, len(captions), model.embed_dim), None,
                      class_lr_scale=getattr(loss, loss.name).class_lr_scale)


def _arcface(loss: LossParams, classes: int, dim: int) -> nn.Module:
    return losses.ArcFaceLoss(classes, dim, margin=loss.arcface.margin, scale=loss.arcface.scale)


def _subcenter_arcface(loss: LossParams, classes: int, dim: int) -> nn.Module:
    p = loss.subcenter_arcface
    return losses.SubCenterArcFaceLoss(num_classes=classes, embedding_size=dim, margin=p.margin,
                                       scale=p.scale, sub_centers=p.sub_centers)


def _cosface(loss: LossParams, classes: int, dim: int) -> nn.Module:
    return losses.CosFaceLoss(classes, dim, margin=loss.cosface.margin, scale=loss.cosface.scale)


def _supcon(loss: LossParams) -> tuple[nn.Module, None]:
    return losses.SupConLoss(temperature=loss.supcon.temperature), None


def _triplet(loss: LossParams) -> tuple[nn.Module, nn.Module]:
    p = loss.triplet
    return (losses.TripletMarginLoss(margin=p.margin),
            miners.TripletMarginMiner(margin=p.margin, type_of_triplets=p.miner))


def _multi_similarity(loss: LossParams) -> tuple[nn.Module, nn.Module]:
    p = loss.multi_similarity
    return (losses.MultiSimilarityLoss(alpha=p.alpha, beta=p.beta, base=p.base),
            miners.MultiSimilarityMiner(epsilon=p.epsilon))


_CLASSIFIER = {"arcface": _arcface, "subcenter_arcface": _subcenter_arcface, "cosface": _cosface}
_PAIR = {"supcon": _supcon, "triplet": _triplet, "multi_similarity": _multi_similarity}
