"""Fine-tuning: the head (and optionally the visual tower) trained with the `loss.name` loss
(clipcore.train.losses: the retrieval CLIP loss with its temperature and text targets by default),
validated by retrieval among the val images.

What a run writes per epoch (epoch 0 = the untouched base model, so the metrics show what
fine-tuning gained; with `model.head: mlp` a random head on it): clipcore.train.run_files. The
validation each epoch: clipcore.train.evaluation.

With a frozen backbone every image goes through the image tower once; the head then trains on
the stored features, so epoch 2 onwards costs a small fraction of epoch 1.
"""
from __future__ import annotations

import contextlib
import math
import random
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from clipcore import paths
from clipcore.model import distributed
from clipcore.model.factory import build_model
from clipcore.model.features import autocast
from clipcore.model.pixel_cache import PixelCache
from clipcore.params import Params, TrainParams
from clipcore.train import unfreezing
from clipcore.train.ema import WeightAverage
from clipcore.train.evaluation import evaluate, revisited_splits
from clipcore.train.losses import create_loss
from clipcore.train.resume import (
    TRAIN_FORMAT,
    checkpoint_to_resume,
    restore_rng,
    rng_state,
    run_settings,
)
from clipcore.train.run_files import METRIC_COLUMNS, RunFiles
from clipcore.train.sampling import EpochLoader, SeededImages, epoch_plan, make_batches
from clipcore.train.splits import BackboneFeatures, load_splits
from clipcore.train.validation_plan import learn_queries, plan_validation

ADAM_BETAS, ADAM_EPS = (0.9, 0.98), 1e-6  # CLIP's (and the seed's); the defaults are unstable for it
LOSS_SHOWN_EVERY = 20  # steps between updates of the progress bar's loss (each reads the device)


def train(params: Params, data_root: Path, prepared: Path = paths.PREPARED,
          on_epoch_end: Callable[[int, dict], None] | None = None) -> list[dict]:
    """Train for params.train.epochs epochs (continuing a checkpoint when train.resume is set);
    returns one metric row per epoch, epoch 0 included. Outputs go to clipcore.paths."""
    trainer = Trainer(params, Path(data_root), Path(prepared))
    files = RunFiles(writes=trainer.world.is_main, keep_checkpoints=params.train.keep_checkpoints)
    checkpoint = (checkpoint_to_resume(dict(trainer.model.base), trainer.signature,
                                       params.train.epochs) if params.train.resume else None)
    if checkpoint is None:
        files.start_over()
        history = [trainer.start()]
        files.write_epoch(trainer.model, 0, backbone_trained=False, checkpoint=None,
                          history=history)
        if params.model.head == "mlp" and trainer.world.is_main:
            print("epoch 0 is the base model under a random mlp head (model.head mlp), "
                  "not zero-shot CLIP")
    else:
        files.continue_after(checkpoint, trainer.model)
        trainer.restore(checkpoint)
        history = checkpoint["history"]
    with files.live(history) as log:
        for epoch in range(len(history), params.train.epochs + 1):
            history.append(trainer.train_epoch(epoch))
            with trainer.averaged():  # train.ema: model files and checkpoints hold the average
                files.write_epoch(trainer.model, epoch, backbone_trained=not trainer.frozen,
                                  checkpoint=lambda: trainer.checkpoint(epoch, history),
                                  history=history)
            log(history[-1])
            if on_epoch_end is not None:
                on_epoch_end(epoch, history[-1])
    return history


class Trainer:
    """One training run's state: the model, the loss (and what it trains), optimizer and
    schedule, the training batches, and the backbone features of the backbone as it is now."""

    def __init__(self, params: Params, data_root: Path, prepared: Path):
        self.params = params
        self.world = distributed.join(params.train.device)  # one process: the plain path
        self.device = self.world.device
        _seed_everything(params.seed)
        classes, captions, self.train_split, self.val_split = load_splits(
            data_root, prepared, self.device)
        # Which images query (data.val_queries) and the distractors, once; a setting that leaves
        # validation no query, gallery or test image to use stops the run before the model is built.
        self.plan = plan_validation(params.data, self.val_split, self.train_split, data_root,
                                    prepared, self.device)
        self.model = build_model(params.model, self.device)
        self.model.image_crop = {"crop": params.data.crop, "crop_margin": params.data.crop_margin}
        self.frozen = unfreezing.backbone_frozen(params.train)
        # train.unlocked_blocks; unlocked before the optimizer is built, so that it holds the
        # blocks from the start even while train.frozen_epochs keeps them still.
        unfreezing.unlock(self.model, params.train)
        # What the loss trains (the CLIP loss's temperature and text targets, a classifier
        # loss's class weights) are its parameters.
        self.loss = create_loss(params, self.model, captions).to(self.device)
        # What a checkpoint must share with this run to continue it: every outcome-shaping
        # setting, the data split and the classes.
        self.signature = {**run_settings(params, prepared), "classes": classes}
        self.generator = torch.Generator().manual_seed(params.seed)
        # Every process draws the same global batches (each epoch's plan) and takes its share.
        self.batches = make_batches(self.train_split.labels.tolist(), params.train, self.generator)
        self.optimizer = make_optimizer(self.model, self.loss, params.train)
        self.ema = WeightAverage(self.model, params.train.ema) if params.train.ema else None
        self.scheduler = lr_schedule(
            self.optimizer, total_steps=len(self.batches) * params.train.epochs,
            warmup_fraction=params.train.warmup_fraction, schedule=params.train.schedule)
        # Val batches for val_loss: one fixed shuffle, so batches mix classes as in training.
        self.val_order = torch.randperm(len(self.val_split.paths),
                                        generator=torch.Generator().manual_seed(params.seed))
        # A backbone that trains: what validation revisits, decoded once (embed.pixel_cache_gib).
        pixels = None if self.frozen else (PixelCache(
            params.embed.pixel_cache_gib, paths.REPOSITORY, pin_memory=self.device.type == "cuda"),
            revisited_splits(self.val_split, self.train_split, self.plan))
        self.features = BackboneFeatures(self.model, self.world, params.embed.batch_size,
                                         params.train.num_workers, pixels)
        self.loader: EpochLoader | None = None  # the unfrozen epochs', made at the first one
        # auto: from the base model's features (no step yet; a resumed run restores later).
        learn_queries(self.plan, self.features, self.val_split, self.train_split)
        # Images (frozen: stored features) to embeddings; DDP with several processes.
        self.embed = self.world.trained(self.model, self.loss, self.frozen)

    def start(self) -> dict:
        """Before the first step: the head's input statistics and the class targets from the
        base model's features of the training images (the ones epoch 0's validation uses too);
        returns epoch 0's metric row."""
        train, loss = self.params.train, self.params.loss
        class_means = loss.name == "clip" and loss.target_init == "class_mean"
        if train.standardize_features or class_means:
            features = self.features(self.train_split)
            if train.standardize_features:
                self.model.head.set_feature_stats(features)
            if class_means:
                with torch.no_grad():
                    self.model.eval()
                    embeddings = self.model.embed_features(features).float()
                self.loss.targets.start_at_class_means(embeddings, self.train_split.labels)
        return self.evaluate(epoch=0, started=time.perf_counter())

    def train_epoch(self, epoch: int) -> dict:
        started = time.perf_counter()
        train = self.params.train
        self._enter_phase(epoch)
        self.model.train()
        self.loss.train()  # a text head's dropout
        self.world.seed_epoch(self.params.seed, epoch)
        plan = epoch_plan(self.batches, self.params.seed, epoch)
        shares = self.world.shard_batches(plan)
        if self.frozen:
            features = self.features(self.train_split)
            batches = ((features[index], index) for index in self._device_shares(shares))
        else:
            if self.loader is None:
                self.loader = EpochLoader(SeededImages(
                    self.train_split.paths, self.model.train_transform(train.augment)),
                    train.num_workers, self.device)
            batches = self.loader.epoch(shares)
        trainable = [p for group in self.optimizer.param_groups for p in group["params"]]
        # Losses summed on the device, read once per epoch (and for the progress bar every
        # LOSS_SHOWN_EVERY steps): a read per step would make a GPU wait on the host each step.
        total_loss = torch.zeros((), dtype=torch.float64, device=self.device)
        seen = mine = 0  # images of the whole batches; of this process's shares
        lr = float("nan")
        with tqdm(total=sum(map(len, plan)), unit="img",
                  desc=f"epoch {epoch}/{train.epochs}") as bar:
            for step, (batch, (inputs, index)) in enumerate(zip(plan, batches), start=1):
                # Pinned (the loader's) or already on the device: no wait for the device here.
                index = index.to(self.device, non_blocking=True)
                labels = self.train_split.labels[index]
                with autocast(self.device):
                    inputs = inputs.to(self.device, non_blocking=True)
                    embeddings = self.embed(inputs)
                embeddings, labels, rows = self.world.gather_batch(embeddings.float(), labels,
                                                                   len(batch))
                loss = self.loss(embeddings, labels, rows)
                self.optimizer.zero_grad(set_to_none=True)
                self.world.backward(loss)
                torch.nn.utils.clip_grad_norm_(trainable, train.grad_clip_norm)
                lr = self.optimizer.param_groups[0]["lr"]
                self.optimizer.step()
                self.scheduler.step()
                if self.ema is not None:
                    self.ema.update()
                if not self.frozen:
                    self.features.backbone_changed()
                if train.clamp_temperature:
                    self.model.clamp_logit_scale()
                # Each process's loss is its share of the batch loss: the shares sum to it.
                total_loss += loss.detach().double() * len(labels)
                seen += len(labels)
                mine += len(index)
                bar.update(len(labels))
                if step % LOSS_SHOWN_EVERY == 0 or step == len(plan):
                    # The mean loss of this process's images so far (all images: one process).
                    bar.set_postfix(loss=f"{total_loss.item() / mine:.4f}", refresh=False)
        images_per_s = seen / (time.perf_counter() - started)
        with self.averaged():
            row = self.evaluate(epoch, started)
        row.update(train_loss=self.world.sum(total_loss) / seen, lr=lr,
                   images_per_s=images_per_s)
        return row

    def _enter_phase(self, epoch: int) -> None:
        """train.frozen_epochs (LP-FT): the head alone trains, on stored features, up to that
        epoch; then the unlocked blocks join (a resumed run enters the phase of its epoch)."""
        frozen = unfreezing.backbone_frozen(self.params.train) or \
            epoch <= self.params.train.frozen_epochs
        if frozen == self.frozen:
            return
        self.frozen = frozen
        if frozen:
            self.model.set_backbone_trainable(False)
        else:
            unfreezing.unlock(self.model, self.params.train)
        self.features.backbone_changed()
        self.embed = self.world.trained(self.model, self.loss, self.frozen)

    def _device_shares(self, shares) -> list[torch.Tensor]:
        """This process's image positions of each step, on the device in one copy per epoch: a
        host index per step would make the GPU wait for the host every step (copy, then index
        the stored features)."""
        shares = [[i for i, _ in share] for share in shares]
        flat = torch.as_tensor([i for share in shares for i in share], dtype=torch.long,
                               device=self.device)
        return list(flat.split([len(share) for share in shares]))

    def evaluate(self, epoch: int, started: float) -> dict:
        """The epoch's metric row (clipcore.train.evaluation) with the model as it is now."""
        row = dict.fromkeys(METRIC_COLUMNS, float("nan"))
        row["epoch"] = epoch
        self.model.eval()
        self.loss.eval()
        row.update(evaluate(
            self.model, self.features, self.val_split, self.train_split, self.loss,
            self.val_order, self.params.train.batch_size, self.params.train.val_top_k,
            self.plan))
        row["seconds"] = time.perf_counter() - started
        return row

    @contextlib.contextmanager
    def averaged(self) -> Iterator[None]:
        """With train.ema the model holds the averaged weights inside (else as it is)."""
        if self.ema is None:
            yield
            return
        with self.ema.applied():
            self._backbone_swapped()
            try:
                yield
            finally:
                self._backbone_swapped()

    def _backbone_swapped(self) -> None:
        if not self.frozen:  # stored backbone features are of the other weights
            self.features.backbone_changed()

    def trained_state(self) -> dict[str, torch.Tensor]:
        """The model tensors training changes (never the frozen base weights)."""
        state = {**self.model.head_state(), "clip.logit_scale": self.model.clip.logit_scale}
        if not self.frozen:
            state.update(self.model.backbone_state())
        return {name: tensor.detach().cpu() for name, tensor in state.items()}

    def checkpoint(self, epoch: int, history: list[dict]) -> dict:
        """What weights_epoch_X.pth holds: what training changed, the optimizer, schedule and
        every RNG state, and the metric rows so far (clipcore.train.resume)."""
        return {
            "format": TRAIN_FORMAT, "epoch": epoch, "base": dict(self.model.base),
            "signature": self.signature, "state": self.trained_state(),
            "loss": {k: v.cpu() for k, v in self.loss.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_state(self.generator), "history": history,
            "epochs": self.params.train.epochs,
            **({"ema": self.ema.state()} if self.ema is not None else {}),
        }

    def restore(self, checkpoint: dict) -> None:
        """Continue where the checkpoint's run stopped. Its state replaces what `start` would
        compute (the head's statistics, the class targets): no pass over the images for it."""
        self.model.load_state_dict(checkpoint["state"], strict=False)
        # The loss holds the temperature too (saved averaged): loaded before the raw weights.
        self.loss.load_state_dict(checkpoint["loss"])
        if self.ema is not None:  # "state" is the average; the raw weights go on training
            self.ema.restore(checkpoint["ema"])
        self.features.backbone_changed()
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        restore_rng(checkpoint["rng"], self.generator)
        print(f"resuming after epoch {checkpoint['epoch']} from {checkpoint['path']}")


def make_optimizer(model, loss: nn.Module, train: TrainParams) -> torch.optim.Optimizer:
    """AdamW (train.optimizer adamw: decoupled weight decay) or Adam (adam: weight decay added to
    the gradient as L2, the seed's), with the head and what the loss trains with it (the CLIP
    loss's temperature and text targets) at train.lr, a classifier loss's class weights at
    train.lr * its class_lr_scale and, when it trains, the visual tower at
    train.lr * train.backbone_lr_scale; no weight decay on biases, norms and the temperature
    (parameters with fewer than 2 dimensions), nor on class weights: the losses normalise them,
    so decay would only shrink their norm and make Adam's steps turn them ever faster."""
    classifier = loss.class_lr_scale is not None
    head = [*model.head.parameters(), *([] if classifier else loss.parameters())]
    groups = unfreezing.decay_groups(head, train.lr, train.weight_decay)
    if classifier:
        groups.append({"params": list(loss.parameters()), "lr": train.lr * loss.class_lr_scale,
                       "weight_decay": 0.0})
    if model.backbone_trainable:
        # train.unlocked_blocks: the trainable blocks; train.layer_decay: per-block lrs.
        groups += unfreezing.backbone_groups(model.clip.visual,
                                             train.lr * train.backbone_lr_scale, train)
    optimizer = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam}[train.optimizer]
    groups = [g for g in groups if g["params"]]
    # On CUDA one fused kernel per step instead of one per tensor; the CPU keeps today's path.
    fused = {"fused": True} if groups[0]["params"][0].is_cuda else {}
    return optimizer(groups, betas=ADAM_BETAS, eps=ADAM_EPS, **fused)


def lr_schedule(optimizer, total_steps: int, warmup_fraction: float, schedule: str):
    """Linear warmup over warmup_fraction of all steps, then (train.schedule) cosine decay
    towards 0, or the constant lr."""
    warmup = int(warmup_fraction * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
