"""The CLIP contrastive loss for retrieval, and the per-class text targets it pulls images towards.

Images of one class share one caption, so a batch holds several identical text rows. The plain CLIP
loss (arange targets) treats those duplicates as negatives and cannot fall below ln(k) with k images
of a class in the batch. With `same_class_positives` every same-class pair counts as a positive.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RetrievalClipLoss(nn.Module):
    """Symmetric cross-entropy between image embeddings and their class text embeddings."""

    def __init__(self, same_class_positives: bool = True):
        super().__init__()
        self.same_class_positives = same_class_positives

    def forward(self, image_emb: torch.Tensor, text_emb: torch.Tensor, labels: torch.Tensor,
                logit_scale: torch.Tensor) -> torch.Tensor:
        """image_emb, text_emb: (B, D) L2-normalised; labels: (B,) class ids; logit_scale: log of
        the inverse temperature (a scalar tensor, as open_clip's CLIP.logit_scale)."""
        logits = logit_scale.exp() * image_emb @ text_emb.T
        if self.same_class_positives:
            positives = labels[:, None] == labels[None, :]  # symmetric, diagonal always set
            return (_multi_positive_ce(logits, positives) + _multi_positive_ce(logits.T, positives)) / 2
        targets = torch.arange(len(labels), device=logits.device)
        return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def _multi_positive_ce(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -log(sum of the row's softmax over its positive columns).

    Unlike cross-entropy against soft targets (bounded below by the targets' entropy, ln k), this
    reaches 0 when all probability sits on the positives, in any proportion among them.
    """
    on_positives = logits.masked_fill(~positives, float("-inf")).logsumexp(dim=1)
    return (logits.logsumexp(dim=1) - on_positives).mean()


class TextTargets(nn.Module):
    """One text embedding per class: frozen text-tower output, or a parameter trained with the head.

    Numeric class names give near-identical captions ("class number 3" vs "4"); learnable targets
    start there and move apart as the head trains.
    """

    def __init__(self, initial: torch.Tensor, learnable: bool):
        super().__init__()
        initial = F.normalize(initial.detach().float(), dim=-1)  # a new tensor: no clone needed
        if learnable:
            self.targets = nn.Parameter(initial)
        else:
            self.register_buffer("targets", initial)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        """(B, D) normalised target rows for class ids `labels`."""
        return F.normalize(self.targets[labels], dim=-1)
