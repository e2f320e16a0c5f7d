"""The CLIP contrastive loss for retrieval, and the per-class text targets it pulls images towards.

Images of one class share one caption, so a batch holds several identical text rows. The plain CLIP
loss (arange targets) treats those duplicates as negatives and cannot fall below ln(k) with k images
of a class in the batch. With `same_class_positives` every same-class pair counts as a positive.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clipcore.model.factory import MlpHead


class RetrievalClipLoss(nn.Module):
    """Symmetric cross-entropy between image embeddings and their class text embeddings."""

    def __init__(self, same_class_positives: bool = True):
        super().__init__()
        self.same_class_positives = same_class_positives

    def forward(self, image_emb: torch.Tensor, text_emb: torch.Tensor, labels: torch.Tensor,
                logit_scale: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
        """image_emb, text_emb: (B, D) L2-normalised; labels: (B,) class ids; logit_scale: log of
        the inverse temperature (a scalar tensor, as open_clip's CLIP.logit_scale).

        rows: with several processes, this process's rows of the gathered batch. The loss is then
        its share of the batch's loss: its images' and its texts' terms (open_clip's local loss)
        over the batch size, so the shares sum to the whole batch's loss. (The B x B logits cost
        little next to the image tower; computing them whole keeps one process's path as is.)"""
        logits = logit_scale.exp() * image_emb @ text_emb.T
        # This process's image rows and text rows (of logits.T); no rows: all, untouched.
        pick = (lambda t: t) if rows is None else (lambda t: t[rows])
        if self.same_class_positives:
            positives = pick(labels[:, None] == labels[None, :])  # symmetric, diagonal set
            loss = (_multi_positive_ce(pick(logits), positives)
                    + _multi_positive_ce(pick(logits.T), positives)) / 2
        else:
            targets = pick(torch.arange(len(labels), device=logits.device))
            loss = (F.cross_entropy(pick(logits), targets)
                    + F.cross_entropy(pick(logits.T), targets)) / 2
        return loss if rows is None else loss * (rows.stop - rows.start) / len(labels)


def _multi_positive_ce(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -log(sum of the row's softmax over its positive columns).

    Unlike cross-entropy against soft targets (bounded below by the targets' entropy, ln k), this
    reaches 0 when all probability sits on the positives, in any proportion among them.
    """
    on_positives = logits.masked_fill(~positives, float("-inf")).logsumexp(dim=1)
    return (logits.logsumexp(dim=1) - on_positives).mean()


class TextTargets(nn.Module):
    """One text embedding per class: frozen text-tower output, a parameter trained with the head,
    or (`head`) the frozen text-tower output through a text head trained with the image head.

    Numeric class names give near-identical captions ("class number 3" vs "4"); learnable targets
    start there and move apart as the head trains. A text head (the seed's) maps them anew at each
    step, its dropout drawn per batch row as when each image's caption went through it.
    """

    def __init__(self, initial: torch.Tensor, learnable: bool, head: nn.Module | None = None):
        super().__init__()
        initial = F.normalize(initial.detach().float(), dim=-1)  # a new tensor: no clone needed
        if learnable:
            self.targets = nn.Parameter(initial)
        else:
            self.register_buffer("targets", initial)
        self.head = head

    @torch.no_grad()
    def start_at_class_means(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        """Move each class's target to the mean direction of its images' (N, D) embeddings;
        classes without images (held out for validation) keep their caption's embedding.

        Why: numeric class names caption as near-identical texts that say nothing of the class,
        and pulling images towards such targets first scrambles the image space before the
        targets move apart; the class means already describe the classes as the images do."""
        sums = torch.zeros_like(self.targets).index_add_(0, labels, embeddings.to(self.targets))
        present = torch.bincount(labels, minlength=len(self.targets)) > 0
        self.targets[present] = F.normalize(sums[present], dim=-1)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        """(B, D) normalised target rows for class ids `labels`."""
        rows = self.targets[labels]
        return F.normalize(rows if self.head is None else self.head(rows), dim=-1)


def text_targets(kind: str, captions: torch.Tensor, dropout: float) -> TextTargets:
    """The `loss.text_targets` kind of targets over (C, D) caption embeddings; a `head`'s random
    init is drawn from the caller's random stream (the run's seed)."""
    dim = captions.shape[1]
    return TextTargets(captions, learnable=kind == "learnable",
                       head=MlpHead(dim, dim, dropout) if kind == "head" else None)
