"""RetrievalClipLoss and TextTargets on hand-built embeddings with repeated classes."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from clipcore.model.factory import MlpHead
from clipcore.train.losses.clip import RetrievalClipLoss, TextTargets, text_targets

LN_100 = torch.tensor(math.log(100))
CLASSES, PER_CLASS, DIM = 4, 4, 512


@pytest.fixture
def batch():
    """4 classes x 4 images: labels, class text targets, and each image's target row."""
    generator = torch.Generator().manual_seed(0)
    targets = TextTargets(torch.randn(CLASSES, DIM, generator=generator), learnable=False)
    labels = torch.arange(CLASSES).repeat_interleave(PER_CLASS)
    return labels, targets, targets(labels)


def test_aligned_embeddings_reach_zero_only_with_same_class_positives(batch):
    labels, _, text = batch
    image = text.clone()  # every image sits exactly on its class caption
    multi = RetrievalClipLoss(same_class_positives=True)(image, text, labels, LN_100).item()
    plain = RetrievalClipLoss(same_class_positives=False)(image, text, labels, LN_100).item()
    print(f"aligned, 4 per class: same_class_positives {multi:.6f}, plain {plain:.6f}, "
          f"ln 4 = {math.log(4):.6f}")
    assert multi < 1e-4
    assert plain == pytest.approx(math.log(PER_CLASS), abs=1e-4)


def test_distinct_classes_make_both_losses_the_plain_clip_loss():
    generator = torch.Generator().manual_seed(1)
    image = F.normalize(torch.randn(8, DIM, generator=generator), dim=-1)
    text = F.normalize(torch.randn(8, DIM, generator=generator), dim=-1)
    labels = torch.arange(8)
    scale = torch.tensor(2.0)
    multi = RetrievalClipLoss(True)(image, text, labels, scale)
    plain = RetrievalClipLoss(False)(image, text, labels, scale)
    assert torch.allclose(multi, plain, atol=1e-6)


@pytest.mark.parametrize("same_class_positives", [True, False])
@pytest.mark.parametrize("log_scale", [0.0, math.log(100)])
def test_random_embeddings_give_finite_loss_and_gradients(batch, same_class_positives, log_scale):
    labels, _, _ = batch
    generator = torch.Generator().manual_seed(2)
    raw_image = torch.randn(len(labels), DIM, generator=generator, requires_grad=True)
    targets = TextTargets(torch.randn(CLASSES, DIM, generator=generator), learnable=True)
    scale = torch.tensor(log_scale, requires_grad=True)

    loss = RetrievalClipLoss(same_class_positives)(
        F.normalize(raw_image, dim=-1), targets(labels), labels, scale)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0
    for name, grad in [("image", raw_image.grad), ("targets", targets.targets.grad),
                       ("logit_scale", scale.grad)]:
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_same_class_positives_never_exceed_the_plain_loss(batch):
    labels, _, text = batch
    generator = torch.Generator().manual_seed(3)
    for _ in range(5):
        image = F.normalize(text + 0.5 * torch.randn(text.shape, generator=generator), dim=-1)
        multi = RetrievalClipLoss(True)(image, text, labels, LN_100)
        plain = RetrievalClipLoss(False)(image, text, labels, LN_100)
        assert multi <= plain


def test_frozen_targets_are_a_buffer_learnable_ones_train():
    initial = torch.randn(3, 8)
    frozen = TextTargets(initial, learnable=False)
    assert list(frozen.parameters()) == [] and "targets" in frozen.state_dict()
    rows = frozen(torch.tensor([2, 0, 2]))
    assert torch.allclose(rows, F.normalize(initial[[2, 0, 2]], dim=-1))

    learnable = TextTargets(initial, learnable=True)
    before = learnable.targets.detach().clone()
    optimizer = torch.optim.SGD(learnable.parameters(), lr=0.1)
    learnable(torch.tensor([1])).sum().backward()
    optimizer.step()
    changed = (learnable.targets.detach() != before).any(dim=1)
    assert changed.tolist() == [False, True, False]  # only the class in the batch moved
    assert torch.allclose(learnable(torch.arange(3)).norm(dim=1), torch.ones(3))


def test_a_text_head_trains_over_frozen_captions_with_dropout_per_row():
    """loss.text_targets head (the seed's): the caption embeddings stay, the head over them trains;
    in training its dropout differs between rows of one class, in eval it is off."""
    torch.manual_seed(0)
    captions = torch.randn(3, 8)
    targets = text_targets("head", captions, dropout=0.5)
    assert isinstance(targets.head, MlpHead)
    assert [name for name, _ in targets.named_parameters()] == ["head.linear.weight",
                                                               "head.linear.bias"]
    frozen, weight = targets.targets.clone(), targets.head.linear.weight.detach().clone()
    same_class = targets(torch.tensor([1, 1]))
    assert not torch.allclose(same_class[0], same_class[1])  # dropout drawn per row
    targets.eval()
    rows = targets(torch.tensor([2, 0, 2]))
    expected = F.normalize(F.gelu(targets.head.linear(F.normalize(captions, dim=-1))), dim=-1)
    assert torch.allclose(rows, expected[[2, 0, 2]])
    optimizer = torch.optim.SGD(targets.parameters(), lr=0.1)
    rows.sum().backward()
    optimizer.step()
    assert torch.equal(targets.targets, frozen) and not torch.equal(targets.head.linear.weight,
                                                                      weight)
