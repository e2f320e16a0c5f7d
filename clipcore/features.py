"""Backbone features: every image through the CLIP image tower once, in batches, with DataLoader
workers decoding files while the model runs.

A frozen backbone's features never change, so training and the embed stage compute them once
and apply the (cheap) head to them as often as they need: every epoch, every model file.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from clipcore.errors import ClipcoreError
from clipcore.images import ImageFiles, UnreadableImage
from clipcore.model import FineTunedCLIP


def resolve_device(name: str) -> torch.device:
    """train.device (auto | cpu | cuda) -> a torch device; cuda where there is none: an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ClipcoreError("train.device is cuda but torch sees no CUDA device (use auto or cpu)")
    return torch.device(name)


def autocast(device: torch.device):
    """bf16 autocast on CUDA; none on CPU, where it barely helps and would change the numbers."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def seed_worker(worker_id: int) -> None:
    """DataLoader workers: numpy and random seeded from the worker's torch seed (which the
    loader derives from its generator), so augmentations repeat run after run."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def image_loader(paths: Sequence[Path], transform: Callable, *, num_workers: int,
                 device: torch.device, batch_size: int | None = None,
                 batch_sampler: Sampler | None = None,
                 generator: torch.Generator | None = None) -> DataLoader:
    """(images, positions) batches of the files in `paths`, decoded by `num_workers` workers.

    The loader draws its workers' seeds from `generator`; a private one by default, so reading
    images never moves the global RNG that dropout and training use.
    """
    return DataLoader(
        ImageFiles(paths, transform), batch_size=batch_size if batch_sampler is None else 1,
        batch_sampler=batch_sampler, shuffle=False, num_workers=num_workers,
        pin_memory=device.type == "cuda", worker_init_fn=seed_worker,
        generator=generator if generator is not None else torch.Generator().manual_seed(0))


def backbone_features(model: FineTunedCLIP, paths: Sequence[Path], *, batch_size: int,
                      num_workers: int, desc: str, tta: str = "none") -> torch.Tensor:
    """(N, feature_dim) float32 backbone features of the images, in order, on the model's device;
    with tta "flip", (N, 2, feature_dim): the image's and its mirror's (embed.tta).

    Images are read with the model's validation transform (no augmentation): the features stand
    for the image itself, whatever epoch or model file applies its head to them later.
    """
    device = model.clip.logit_scale.device
    loader = image_loader(paths, model.preprocess_val, batch_size=batch_size,
                          num_workers=num_workers, device=device)
    was_training = model.training
    model.eval()
    chunks = []
    try:
        with torch.inference_mode(), tqdm(total=len(paths), desc=desc, unit="img") as bar:
            for images, _ in loader:
                images = images.to(device, non_blocking=True)
                with autocast(device):
                    features = model.backbone_features(images)
                    if tta == "flip":  # the mirror of the network's input: one decode, two views
                        features = torch.stack(
                            [features, model.backbone_features(images.flip(-1))], dim=1)
                    chunks.append(features)
                bar.update(len(images))
    except UnreadableImage as exc:  # prepare checked every file: one changed since
        # From a worker, the message carries the worker's traceback: keep its last line.
        reason = str(exc).strip().splitlines()[-1].split("UnreadableImage: ", 1)[-1]
        raise ClipcoreError(f"{reason} (changed since prepare: run dvc repro prepare)") from None
    finally:
        model.train(was_training)
    if not chunks:
        return torch.zeros(0, model.head.feature_dim, device=device)
    # Outside inference mode: the result is an ordinary tensor that autograd may save.
    return torch.cat(chunks).float()
