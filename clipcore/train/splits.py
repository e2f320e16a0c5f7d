"""A training run's images: the train and val splits (image paths and class ids), and their
backbone features as the backbone is now."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from clipcore.data.manifests import read_manifest
from clipcore.errors import ClipcoreError
from clipcore.model.distributed import World
from clipcore.model.factory import FineTunedCLIP
from clipcore.model.features import backbone_features
from clipcore.model.pixel_cache import PixelCache


@dataclass(frozen=True)
class Split:
    name: str  # the manifest it comes from: train or val
    paths: list[Path]
    labels: torch.Tensor  # class ids, on the training device


def load_splits(data_root: Path, prepared: Path,
                device: torch.device) -> tuple[list[str], list[str], Split, Split]:
    """Class names, one caption per class, and the train and val splits with class ids."""
    frames = {split: read_manifest(prepared, split) for split in ("train", "val")}
    if len(frames["train"]) < 2:
        raise ClipcoreError(f"{prepared / 'train.csv'}: needs at least 2 training images, "
                            f"has {len(frames['train'])}")
    captions_by_class = pd.concat(frames.values()).groupby("label")["caption"].first()
    classes = [str(name) for name in captions_by_class.index]
    ids = {name: i for i, name in enumerate(classes)}

    def split(name: str) -> Split:
        frame = frames[name]
        return Split(name, [data_root / p for p in frame["path"]],
                     torch.tensor([ids[label] for label in frame["label"]], dtype=torch.long,
                                  device=device))

    return classes, list(captions_by_class), split("train"), split("val")


class BackboneFeatures:
    """Each split's backbone features as the backbone is now: computed on first use and kept
    until the trainer says the backbone changed (an optimizer step that trains it, a restored
    checkpoint). A frozen backbone never changes: its features serve the whole run, and the
    start of training and epoch 0's validation share one pass. A backbone that trains gets
    `pixels`, a cache and the names of the splits every validation revisits: those are decoded
    once per run, each later pass takes their stored pixels."""

    def __init__(self, model: FineTunedCLIP, world: World, batch_size: int,
                 num_workers: int | str, pixels: tuple[PixelCache, set[str]] | None = None):
        self.model, self.world = model, world
        self.pixels, self.revisited = pixels or (None, set())
        self.batch_size, self.num_workers = batch_size, num_workers
        self._features: dict[str, torch.Tensor] = {}

    def __call__(self, split: Split) -> torch.Tensor:
        if split.name not in self._features:
            # Each process computes its share of the images; every process gets them all.
            local = backbone_features(self.model, self.world.shard(split.paths),
                                      batch_size=self.batch_size, num_workers=self.num_workers,
                                      desc=f"{split.name} features",
                                      pixels=self.pixels if split.name in self.revisited else None)
            self._features[split.name] = self.world.gather_shards(local, len(split.paths))
        return self._features[split.name]

    def backbone_changed(self) -> None:
        self._features.clear()
