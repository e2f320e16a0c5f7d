"""Training batches (train.sampler): random, or class-balanced P x K batches; and each epoch's
plan of them, where every image comes with the seed of its augmentation.

With few images per class, random batches rarely hold two images of one class (921 identities
x 5 images, batches of 64: about 2 same-class pairs per batch), so `same_class_positives` has
little to work with. A class-balanced batch is P = batch_size / K classes with K images each
(train.images_per_class), as in re-identification (P x K, Hermans et al. 2017): every image
has K - 1 positives in its batch.

Both samplers are torch batch samplers (lists of indices) that draw each epoch's order from the
run's seeded generator when iteration starts, as torch's RandomSampler does: a new order every
epoch, the same orders for the same seed, and a resumed run (which restores the generator from
its checkpoint) draws what the uninterrupted run drew.

An image's augmentation (random crop, flip) draws from a seed of its own, made from (seed, epoch,
its place in the epoch), never from the DataLoader worker that happens to decode it: how many
workers decode (train.num_workers, which may change on resume) or how many processes share a
batch changes no image.
"""
from __future__ import annotations

from collections import deque
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, Sampler

from clipcore.data.images import ImageFiles
from clipcore.errors import ClipcoreError
from clipcore.model.features import image_loader
from clipcore.params import TrainParams

Plan = list[list[tuple[int, int]]]  # an epoch's global batches of (image index, augmentation seed)


def make_batches(labels: Sequence[int], train: TrainParams,
                 generator: torch.Generator) -> Sampler[list[int]]:
    """The batch sampler that train.sampler names, over images with these class ids."""
    n = len(labels)
    if train.sampler == "class_balanced":
        return ClassBalancedBatchSampler(labels, train.batch_size, train.images_per_class,
                                         generator)
    # Drop a short last batch (a contrastive batch of one learns nothing), unless it's all.
    return BatchSampler(RandomSampler(range(n), generator=generator), train.batch_size,
                        drop_last=n > train.batch_size)


class ClassBalancedBatchSampler(Sampler[list[int]]):
    """Batches of P classes x K images: the P classes distinct, the K images of a class distinct
    (repeated only when the class has fewer than K). Classes and images are taken in turns from
    fresh random orders, so over an epoch every class and image comes up about equally often.
    An epoch has as many batches as random batching would have (len(labels) // batch_size, at
    least one), so the learning-rate schedule is the same."""

    def __init__(self, labels: Sequence[int], batch_size: int, images_per_class: int,
                 generator: torch.Generator):
        labels = [int(label) for label in labels]
        self.k = images_per_class
        self.p = batch_size // images_per_class
        self.images = {label: [] for label in sorted(set(labels))}
        for index, label in enumerate(labels):
            self.images[label].append(index)
        if len(self.images) < self.p:
            raise ClipcoreError(
                f"train.images_per_class: batches of {batch_size} with {self.k} images per "
                f"class need {self.p} classes, the training set has {len(self.images)}; "
                f"raise train.images_per_class or lower train.batch_size")
        self.batches = max(1, len(labels) // batch_size)
        self.generator = generator

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[list[int]]:
        # One draw from the run's generator per epoch, then a private stream for the epoch.
        seed = int(torch.empty((), dtype=torch.int64).random_(generator=self.generator))
        epoch = torch.Generator().manual_seed(seed)
        classes = _Turns(list(self.images), epoch)
        images = {label: _Turns(members, epoch) for label, members in self.images.items()}
        for _ in range(self.batches):
            yield [index for label in classes.take(self.p) for index in images[label].take(self.k)]


class _Turns:
    """Items handed out in random order, a fresh order each time one runs out."""

    def __init__(self, items: list[int], generator: torch.Generator):
        self.items, self.generator, self.pending = items, generator, deque()

    def take(self, n: int) -> list[int]:
        """n items, distinct while there are enough; an item met again is kept for next time."""
        taken, again = [], []
        while len(taken) < n:
            if not self.pending:
                order = torch.randperm(len(self.items), generator=self.generator).tolist()
                self.pending.extend(self.items[i] for i in order)
            item = self.pending.popleft()
            if item in taken and len(set(taken)) < len(self.items):
                again.append(item)
            else:
                taken.append(item)
        self.pending.extendleft(reversed(again))
        return taken


def epoch_plan(batches: Sampler[list[int]], seed: int, epoch: int) -> Plan:
    """The epoch's global batches (drawn from `batches` now), each image with its augmentation
    seed: the same on every process and for any number of DataLoader workers."""
    seeds = np.random.default_rng([seed, epoch])
    return [list(zip(batch, seeds.integers(2**63, size=len(batch)).tolist())) for batch in batches]


class SeededImages(ImageFiles):
    """ImageFiles read by (image index, augmentation seed) keys: each image's transform draws
    from torch's RNG seeded with its own seed, in a private RNG state, so the run's stream (which
    dropout draws from) moves the same whether images are decoded here or in workers."""

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        # The CPU generator only: torch.manual_seed would reseed the CUDA generators as well.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            return super().__getitem__(index)


class EpochLoader:
    """The training images' DataLoader of a run, made once: its workers (train.num_workers) start
    once and persist across the epochs. Each epoch's batches (its plan, or this process's shares
    of it) are set on its batch sampler before the epoch iterates it, so every epoch decodes the
    images and draws the augmentations a loader made for that epoch alone would."""

    def __init__(self, images: SeededImages, num_workers: int | str, device: torch.device):
        self._planned = _Planned()
        self._loader = image_loader(images, batch_sampler=self._planned, num_workers=num_workers,
                                    device=device, persistent=True)

    def epoch(self, batches: Sampler[list[tuple[int, int]]] | Plan) -> DataLoader:
        self._planned.batches = batches
        return self._loader


class _Planned(Sampler[list[tuple[int, int]]]):
    """A batch sampler that yields the batches it was last given."""

    def __init__(self):
        self.batches: Sampler[list[tuple[int, int]]] | Plan = []

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return iter(self.batches)
