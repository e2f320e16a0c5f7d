"""train.sampler: class-balanced P x K batches (structure, balance, seeding, a new order every
epoch) and the training run that uses them; random batches stay what they were."""
from __future__ import annotations

import contextlib
import math
from collections import Counter

import pytest
import torch
from conftest import photo_like
from PIL import Image
from torch.utils.data import BatchSampler, RandomSampler
from torchvision import transforms

from clipcore.data.manifests import read_manifest
from clipcore.model.factory import build_model
from clipcore.model.features import image_loader
from clipcore.errors import ClipcoreError
from clipcore.params import ModelParams, ParamsError
from clipcore.train.losses.clip import RetrievalClipLoss
from clipcore.train.sampling import (
    ClassBalancedBatchSampler,
    SeededImages,
    epoch_plan,
    make_batches,
)
from clipcore.train.training import train

# 10 classes of 5 images and one class of 3 (fewer than K).
LABELS = [c for c in range(10) for _ in range(5)] + [10] * 3
K, BATCH = 4, 12  # P = 3 classes per batch


def sampler(seed: int = 0, labels=LABELS) -> ClassBalancedBatchSampler:
    return ClassBalancedBatchSampler(labels, BATCH, K, torch.Generator().manual_seed(seed))


def test_batches_are_p_classes_of_k_images():
    batches = list(sampler())
    assert len(batches) == len(LABELS) // BATCH == 4
    for batch in batches:
        per_class = Counter(LABELS[i] for i in batch)
        assert len(batch) == BATCH and len(per_class) == BATCH // K
        assert set(per_class.values()) == {K}
        for label in per_class:
            members = [i for i in batch if LABELS[i] == label]
            # Distinct images, unless the class has fewer than K (class 10 has 3).
            assert len(set(members)) == min(K, LABELS.count(label))


def test_every_class_and_image_comes_up_about_equally_often():
    labels = [c for c in range(7) for _ in range(30)]  # 17 batches of 3 classes: 51 turns
    for batches in sampler(seed=3, labels=labels), sampler(seed=4, labels=labels):
        classes, images = Counter(), Counter()
        for batch in batches:  # one epoch
            classes.update({labels[i] for i in batch})
            images.update(batch)
        assert sorted(set(classes.values())) == [7, 8]  # 51 = 7 x 7 + 2
        for c in range(7):
            counts = [images[i] for i in range(30 * c, 30 * c + 30)]
            assert max(counts) - min(counts) <= 1


def test_a_new_order_every_epoch_the_same_for_the_same_seed():
    first, again, other = sampler(seed=1), sampler(seed=1), sampler(seed=2)
    epochs = [list(first) for _ in range(3)]
    assert epochs[0] != epochs[1] != epochs[2]
    assert [list(again) for _ in range(3)] == epochs
    assert list(other) != epochs[0]


def test_too_few_classes_or_a_batch_not_a_multiple_of_k_name_the_key(params_factory):
    with pytest.raises(ClipcoreError, match=r"train\.images_per_class.* need 3 classes"):
        sampler(labels=[0, 0, 0, 0, 1, 1, 1, 1])
    with pytest.raises(ParamsError, match=r"'train\.batch_size' \(10\) must be a multiple"):
        params_factory({"train.sampler": "class_balanced", "train.batch_size": 10,
                        "train.images_per_class": 4})


def test_class_balanced_batches_with_same_class_negatives_are_refused(params_factory):
    """Before, the run went on: each image's K - 1 same-class batch mates were its negatives."""
    with pytest.raises(ParamsError) as error:
        params_factory({"train.sampler": "class_balanced", "loss.same_class_positives": False})
    message = str(error.value)
    assert "\n" not in message
    assert "'train.sampler: class_balanced'" in message
    assert "'loss.same_class_positives: true'" in message
    params_factory({"train.sampler": "random", "loss.same_class_positives": False})  # the seed's


def test_an_images_augmentation_comes_from_its_own_seed(tmp_path):
    """Not from the worker or process that decodes it, nor from the run's random stream (which
    dropout draws from): each image of an epoch's plan carries a seed of its own."""
    path = tmp_path / "image.png"
    noise = torch.randint(0, 256, (40, 40, 3), generator=torch.Generator().manual_seed(0))
    Image.fromarray(noise.numpy().astype("uint8")).save(path)
    images = SeededImages([path], transforms.Compose([
        transforms.RandomResizedCrop(16), transforms.RandomHorizontalFlip(),
        transforms.ToTensor()]))
    torch.manual_seed(0)
    stream = torch.get_rng_state()
    first, position = images[(0, 7)]
    assert position == 0 and torch.equal(torch.get_rng_state(), stream)
    torch.manual_seed(1)  # another state of the run's stream: the same image
    assert torch.equal(images[(0, 7)][0], first)
    assert not torch.equal(images[(0, 8)][0], first)

    batches = [[3, 1], [0, 2]]
    plan = epoch_plan(batches, seed=42, epoch=1)
    assert [[index for index, _ in batch] for batch in plan] == batches
    assert epoch_plan(batches, seed=42, epoch=1) == plan  # the same wherever it is drawn
    seeds = [seed for batch in plan for _, seed in batch]
    assert len(set(seeds)) == 4
    assert not set(seeds) & {s for b in epoch_plan(batches, seed=42, epoch=2) for _, s in b}


def test_the_models_augmentation_is_the_same_for_any_worker_count(tmp_path):
    """The model's own augmentation (uint8 flips and crops, JPEG draft decoding): each image of
    the plan comes out the same from 0, 1 or 2 DataLoader workers, and again for the same seed."""
    model = build_model(ModelParams(name="tiny", pretrained="none", embed_dim=512, dropout=0.1))
    paths = []
    for i, size in enumerate([(1024, 768), (250, 250), (300, 900), (64, 48)]):
        paths.append(tmp_path / f"photo_{i}.jpg")
        photo_like(size, seed=i).save(paths[-1], quality=90)
    images = SeededImages(paths, model.train_transform(True))
    plan = epoch_plan([[0, 1, 2], [3, 0, 1]], seed=3, epoch=1)
    seen = {}
    for workers in (0, 1, 2):
        loader = image_loader(images, batch_sampler=plan, num_workers=workers,
                              device=torch.device("cpu"))
        seen[workers] = [pixels for pixels, _ in loader]
    assert all(b.dtype == torch.uint8 and b.shape[1:] == (3, 32, 32) for b in seen[0])
    for workers in (1, 2):
        assert all(torch.equal(a, b) for a, b in zip(seen[0], seen[workers]))
    assert torch.equal(images[plan[0][0]][0], seen[0][0][0])
    # Image 0 in both batches with different seeds: two different views of it.
    assert not torch.equal(seen[0][0][0], seen[0][1][1])


def test_random_sampler_is_unchanged(params_factory):
    params = params_factory()
    assert params.train.sampler == "random"
    today = BatchSampler(RandomSampler(range(len(LABELS)), generator=torch.Generator().manual_seed(5)),
                         params.train.batch_size, drop_last=len(LABELS) > params.train.batch_size)
    ours = make_batches(LABELS, params.train, torch.Generator().manual_seed(5))
    assert [list(ours) for _ in range(2)] == [list(today) for _ in range(2)]


@contextlib.contextmanager
def batch_labels():
    """The class ids of every training and val_loss batch that reaches the loss."""
    seen = []
    original = RetrievalClipLoss.forward

    def spy(self, embeddings, targets, labels, *args, **kwargs):
        seen.append(labels.tolist())
        return original(self, embeddings, targets, labels, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(RetrievalClipLoss, "forward", spy)
        yield seen


@pytest.mark.parametrize("frozen", [True, False])
def test_training_on_class_balanced_batches(tmp_path, params_factory, prepared_demo, frozen):
    # The demo's 10 digits: batches of 64 as 8 classes x 8 images.
    params = params_factory({
        "model.name": "tiny", "model.pretrained": "none", "train.num_workers": 0,
        "train.epochs": 1, "train.freeze_backbone": frozen, "train.sampler": "class_balanced",
        "train.images_per_class": 8})
    with contextlib.chdir(tmp_path), batch_labels() as seen:
        history = train(params, *prepared_demo)
    assert math.isfinite(history[1]["train_loss"]) and math.isfinite(history[1]["score"])
    n_train, n_val = (len(read_manifest(prepared_demo[1], split)) for split in ("train", "val"))
    val_batches = math.ceil(n_val / 64)  # epoch 0's val_loss comes first
    training = seen[val_batches:val_batches + n_train // 64]
    assert len(training) == n_train // 64 and len(seen) == 2 * val_batches + len(training)
    assert all(sorted(Counter(labels).values()) == [8] * 8 for labels in training)
