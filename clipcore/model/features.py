"""Backbone features: every image through the CLIP image tower once, in batches, with DataLoader
workers decoding files while the model runs.

A frozen backbone's features never change, so training and the embed stage compute them once
and apply the (cheap) head to them as often as they need: every epoch, every model file.
"""
from __future__ import annotations

import os
import random
import signal
import threading
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from clipcore.data.images import ImageFiles, UnreadableImage
from clipcore.data.pixels import collate_pixels
from clipcore.errors import ClipcoreError
from clipcore.model.factory import FineTunedCLIP
from clipcore.model.pixel_cache import PixelCache


def resolve_device(name: str) -> torch.device:
    """train.device (auto | cpu | cuda) -> a torch device; cuda where there is none: an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ClipcoreError(f"train.device is cuda but {_no_cuda()} (use auto or cpu)")
    return torch.device(name)


def device_note(name: str, device: torch.device) -> str:
    """The device a stage runs on, in words: the GPU's name, or why train.device auto chose
    the CPU (a CUDA that fails to start would otherwise mean a whole run on the CPU unsaid)."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)}), bf16 autocast"
    return "cpu, fp32" + (f" (train.device auto: {_no_cuda()})" if name == "auto" else "")


def _no_cuda() -> str:
    if torch.version.cuda is None:
        return "this torch is built without CUDA"
    try:
        torch.cuda.init()  # raises with the reason when CUDA cannot start
    except Exception as exc:  # noqa: BLE001 - any failure here is the reason to report
        return f"no usable CUDA GPU: {str(exc).strip().splitlines()[0]}"
    return "torch sees no CUDA device"


def cpu_cores() -> int:
    """The CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def loader_workers(setting: int | str, device: torch.device) -> int:
    """train.num_workers / embed.num_workers: a count as given; "auto" from this node's cores per
    process (torchrun's LOCAL_WORLD_SIZE) and the device. CUDA: all cores of the process but one
    (kept for the main process that feeds the GPU), as decoding must keep up with a GPU (one core
    decodes about 120 1024x768 JPEGs/s, ViT-B-32 in bf16 takes 10,000+ images/s). CPU: none up to 2
    cores per process, where a worker takes cores the model needs (ViT-B-32 unfrozen on 2
    cores: 0.91 of a bare loop with 0 workers, 0.78 with 1); one per 4 cores above that."""
    if setting != "auto":
        return int(setting)
    cores = cpu_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if device.type == "cuda":
        return max(1, cores - 1)
    return 0 if cores <= 2 else max(1, cores // 4)


def autocast(device: torch.device):
    """bf16 autocast on CUDA; none on CPU, where it barely helps and would change the numbers."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def seed_worker(worker_id: int) -> None:
    """DataLoader workers: numpy and random seeded from the worker's torch seed (which the
    loader derives from its generator), so what draws from them repeats run after run.
    (Training's augmentations draw from each image's own seed: clipcore.train.sampling.)"""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # forked under _Loader's handler


class _Loader(DataLoader):
    """A DataLoader that holds Ctrl-C back while it forks its workers: Python runs its at-fork
    handlers with a KeyboardInterrupt they raise printed and dropped, so a Ctrl-C that came then
    was lost and the run went on. Noted meanwhile, it is raised again once they have started."""

    def __iter__(self):
        if self.num_workers == 0 or threading.current_thread() is not threading.main_thread():
            return super().__iter__()
        caught = []
        previous = signal.signal(signal.SIGINT, lambda number, frame: caught.append(number))
        try:
            batches = super().__iter__()
        finally:
            signal.signal(signal.SIGINT, previous)
        if caught:  # to this process's own handler: KeyboardInterrupt, unless ignored
            signal.raise_signal(signal.SIGINT)
        return batches


def image_loader(images: Dataset, *, num_workers: int | str, device: torch.device,
                 batch_size: int | None = None, batch_sampler: Iterable | None = None,
                 persistent: bool = False) -> DataLoader:
    """(images, positions) batches of `images` (an ImageFiles, or training's SeededImages),
    decoded by `num_workers` workers (a count, or "auto": `loader_workers`), uint8 pixels
    stacked in their own memory order (`collate_pixels`); `persistent`: the workers stay between
    passes (a loader iterated again, every epoch) instead of starting anew.

    The loader draws its workers' seeds from a private generator, so reading images never moves
    the global RNG that dropout and training use.
    """
    workers = loader_workers(num_workers, device)
    return _Loader(
        images, batch_size=batch_size if batch_sampler is None else 1,
        batch_sampler=batch_sampler, shuffle=False, num_workers=workers,
        persistent_workers=persistent and workers > 0,
        pin_memory=device.type == "cuda", worker_init_fn=seed_worker, collate_fn=collate_pixels,
        generator=torch.Generator().manual_seed(0))


def backbone_features(model: FineTunedCLIP, paths: Sequence[Path], *, batch_size: int,
                      num_workers: int | str, desc: str, tta: str = "none",
                      pixels: PixelCache | None = None) -> torch.Tensor:
    """(N, feature_dim) float32 backbone features of the images, in order, on the model's device;
    with tta "flip", (N, 2, feature_dim): the image's and its mirror's (embed.tta).

    Images are read with the model's validation transform (no augmentation): the features stand
    for the image itself, whatever epoch or model file applies its head to them later. With
    `pixels` (made for this model's transform) they are decoded on the first pass over `paths`
    only, and later passes take the stored pixels.
    """
    device = model.clip.logit_scale.device

    def decode() -> DataLoader:
        return image_loader(ImageFiles(paths, model.preprocess_val), batch_size=batch_size,
                            num_workers=num_workers, device=device)

    loader = decode() if pixels is None else pixels.batches(paths, batch_size, decode)
    was_training = model.training
    model.eval()
    chunks = []
    try:
        with torch.inference_mode(), tqdm(total=len(paths), desc=desc, unit="img") as bar:
            for images, _ in loader:
                images = images.to(device, non_blocking=True)
                chunks.append(batch_features(model, images, tta))
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


def batch_features(model: FineTunedCLIP, images: torch.Tensor, tta: str = "none") -> torch.Tensor:
    """backbone_features of one batch of transformed images already on the model's device."""
    with autocast(images.device):
        features = model.backbone_features(images)
        if tta == "flip":  # the mirror of the network's input: one decode, two views
            features = torch.stack([features, model.backbone_features(images.flip(-1))], dim=1)
    return features
