"""Fine-tuning: the head (and temperature, and optionally per-class text targets and the visual
tower) trained with the retrieval CLIP loss, validated by retrieval among the val images.

Writes, per epoch X (epoch 0 = the untouched base model, so the metrics show what fine-tuning
gained): `all_weights/model_epoch_X.pt` (what inference needs), `checkpoints/weights_epoch_X.pth`
(what resuming needs; X >= 1 only), a row of `metrics/training_metrics.csv` and a dvclive step.

With a frozen backbone every image goes through the image tower once; the head then trains on
the stored features, so epoch 2 onwards costs a small fraction of epoch 1.
"""
from __future__ import annotations

import contextlib
import csv
import io
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from dvclive import Live
from tqdm import tqdm

from clipcore import distributed, paths
from clipcore.checkpoint import load_file, save_atomic, save_model
from clipcore.errors import ClipcoreError
from clipcore.features import autocast, backbone_features, image_loader
from clipcore.files import write_text_atomic
from clipcore.loss import RetrievalClipLoss, TextTargets
from clipcore.manifests import read_manifest
from clipcore.model import build_model
from clipcore.params import Params, TrainParams
from clipcore.resume import (TRAIN_FORMAT, check_compatible, newest_checkpoint, restore_rng,
                             rng_state, run_settings)
from clipcore.sampling import make_batches
from clipcore.validation import train_joins_gallery, validation_metrics

METRIC_COLUMNS = ("epoch", "train_loss", "val_loss", "top1", "top5", "top10", "score",
                  "precision_at_k", "map_at_k", "val_queries", "val_unmatched", "lr", "seconds",
                  "images_per_s")
VALIDATION_COLUMNS = ("top1", "top5", "top10", "score", "precision_at_k", "map_at_k",
                      "val_queries", "val_unmatched")
ADAMW_BETAS, ADAMW_EPS = (0.9, 0.98), 1e-6  # CLIP's; the defaults are unstable for it


@dataclass(frozen=True)
class Split:
    paths: list[Path]
    labels: torch.Tensor  # class ids, on the training device


def train(params: Params, data_root: Path, prepared: Path = paths.PREPARED,
          on_epoch_end: Callable[[int, dict], None] | None = None) -> list[dict]:
    """Train for params.train.epochs epochs (continuing a checkpoint when train.resume is set);
    returns one metric row per epoch, epoch 0 included. Outputs go to clipcore.paths."""
    trainer = Trainer(params, Path(data_root), Path(prepared))
    history = trainer.resume() if params.train.resume else None
    if history is None:
        if trainer.world.is_main:
            _remove_epoch_files()
        history = [trainer.evaluate(epoch=0, started=time.perf_counter())]
        trainer.save(0, history)
    # dvclive from rank 0 only: the other processes hold the same rows.
    with (Live(str(paths.TRAIN_LIVE), dvcyaml=False, save_dvc_exp=False)
          if trainer.world.is_main else contextlib.nullcontext()) as live:
        # A fresh Live replays the rows so far: DVC clears this folder before the stage runs.
        for row in history:
            _log(live, row)
        for epoch in range(len(history), params.train.epochs + 1):
            history.append(trainer.train_epoch(epoch))
            trainer.save(epoch, history)
            _log(live, history[-1])
            if on_epoch_end is not None:
                on_epoch_end(epoch, history[-1])
    return history


class Trainer:
    """One training run: the model, text targets, optimizer and schedule, the data, and the
    backbone features of the backbone as it is now (for the whole run when frozen)."""

    def __init__(self, params: Params, data_root: Path, prepared: Path):
        self.params = params
        self.world = distributed.join(params.train.device)  # one process: the plain path
        self.device = self.world.device
        _seed_everything(params.seed)
        classes, captions, self.train_split, self.val_split = _load_splits(
            data_root, prepared, self.device)
        self.model = build_model(params.model, self.device)
        self.frozen = params.train.freeze_backbone
        self.model.set_backbone_trainable(not self.frozen)
        # Each class's caption through the text tower once per run, not per step.
        self.targets = TextTargets(self.model.caption_embeddings(captions),
                                   learnable=params.loss.text_targets == "learnable")
        self.targets.to(self.device)
        self.loss = RetrievalClipLoss(params.loss.same_class_positives)
        # What a checkpoint must share with this run to continue it: every outcome-shaping
        # setting, the data split and the classes.
        self.signature = {**run_settings(params, prepared), "classes": classes}
        self.generator = torch.Generator().manual_seed(params.seed)
        # Every process draws the same global batches and takes its share of each.
        self.batches = self.world.shard_batches(
            make_batches(self.train_split.labels.tolist(), params.train, self.generator))
        self.optimizer = make_optimizer(self.model, self.targets, params.train)
        self.scheduler = cosine_with_warmup(
            self.optimizer, total_steps=len(self.batches) * params.train.epochs,
            warmup_fraction=params.train.warmup_fraction)
        # Val batches for val_loss: one fixed shuffle, so batches mix classes as in training.
        self.val_order = torch.randperm(len(self.val_split.paths),
                                        generator=torch.Generator().manual_seed(params.seed))
        self.feature_cache: dict[str, torch.Tensor] = {}
        self.feature_step = 0  # the optimizer step the cached features were computed at
        self._start_from_base_features(params)

    def _start_from_base_features(self, params: Params) -> None:
        """Standardise the head's input and place the class targets, from the base model's
        features of the training images (the ones epoch 0's validation uses too)."""
        if not (params.train.standardize_features or params.loss.target_init == "class_mean"):
            return
        features = self.features("train", self.train_split)
        if params.train.standardize_features:
            self.model.head.set_feature_stats(features)
        if params.loss.target_init == "class_mean":
            with torch.no_grad():
                self.model.eval()
                embeddings = self.model.embed_features(features).float()
            self.targets.start_at_class_means(embeddings, self.train_split.labels)

    def train_epoch(self, epoch: int) -> dict:
        started = time.perf_counter()
        train = self.params.train
        self.model.train()
        self.world.seed_epoch(self.params.seed, epoch)
        if self.frozen:
            features = self.features("train", self.train_split)
            batches = ((features[index], index)
                       for index in map(torch.as_tensor, self.batches))
        else:
            batches = image_loader(
                self.train_split.paths, self.model.train_transform(train.augment),
                batch_sampler=self.batches, num_workers=train.num_workers, device=self.device,
                generator=self.generator)
        trainable = [p for group in self.optimizer.param_groups for p in group["params"]]
        total_loss, seen, lr = 0.0, 0, float("nan")
        images = min(len(self.train_split.paths), len(self.batches) * train.batch_size)
        with tqdm(total=images, unit="img", desc=f"epoch {epoch}/{train.epochs}") as bar:
            for inputs, index in batches:
                labels = self.train_split.labels[index.to(self.device)]
                with autocast(self.device):
                    inputs = inputs.to(self.device, non_blocking=True)
                    embeddings = (self.model.embed_features(inputs) if self.frozen
                                  else self.model(inputs))
                embeddings, labels, rows = self.world.gather_batch(embeddings.float(), labels)
                loss = self.loss(embeddings, self.targets(labels), labels,
                                 self.model.clip.logit_scale, rows=rows)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.world.sum_gradients(trainable)
                torch.nn.utils.clip_grad_norm_(trainable, train.grad_clip_norm)
                lr = self.optimizer.param_groups[0]["lr"]
                self.optimizer.step()
                self.scheduler.step()
                self.model.clamp_logit_scale()
                batch_loss = self.world.sum(loss)  # each process's share: the batch's loss
                total_loss += batch_loss * len(labels)
                seen += len(labels)
                bar.update(len(labels))
                bar.set_postfix(loss=f"{batch_loss:.4f}", refresh=False)
        images_per_s = seen / (time.perf_counter() - started)
        row = self.evaluate(epoch, started)
        row.update(train_loss=total_loss / seen, lr=lr, images_per_s=images_per_s)
        return row

    @torch.no_grad()
    def evaluate(self, epoch: int, started: float) -> dict:
        """val_loss, and retrieval with each val image as a query (clipcore.validation)."""
        row = dict.fromkeys(METRIC_COLUMNS, float("nan"))
        row["epoch"] = epoch
        if len(self.val_split.paths):
            self.model.eval()
            embeddings = self._embed("val", self.val_split)
            labels = self.val_split.labels
            row["val_loss"] = self._val_loss(embeddings, labels)
            val_labels, train_labels = labels.cpu().numpy(), self.train_split.labels.cpu().numpy()
            train = (self._embed("train", self.train_split).cpu().numpy()
                     if train_joins_gallery(val_labels, train_labels) else None)
            measures = validation_metrics(embeddings.cpu().numpy(), val_labels,
                                          self.params.train.val_top_k, train, train_labels)
            row.update({key: float(measures[key]) for key in VALIDATION_COLUMNS
                        if key in measures})
        row["seconds"] = time.perf_counter() - started
        return row

    def _embed(self, name: str, split: Split) -> torch.Tensor:
        return self.model.embed_features(self.features(name, split)).float()

    def _val_loss(self, embeddings: torch.Tensor, labels: torch.Tensor) -> float:
        total = 0.0
        for index in self.val_order.split(self.params.train.batch_size):
            index = index.to(self.device)
            total += self.loss(embeddings[index], self.targets(labels[index]), labels[index],
                               self.model.clip.logit_scale).item() * len(index)
        return total / len(labels)

    def features(self, name: str, split: Split) -> torch.Tensor:
        """A split's backbone features as the backbone is now, computed on first use and kept
        while it stays so: for the whole run when frozen; when it trains, until the next
        optimizer step (the start of training and epoch 0's validation share one pass)."""
        step = 0 if self.frozen else self.scheduler.last_epoch
        if step != self.feature_step:
            self.feature_cache, self.feature_step = {}, step
        if name not in self.feature_cache:
            self.feature_cache[name] = self._backbone_features(split, f"{name} features")
        return self.feature_cache[name]

    def _backbone_features(self, split: Split, desc: str) -> torch.Tensor:
        # Each process computes its share of the images; every process gets them all.
        local = backbone_features(self.model, self.world.shard(split.paths),
                                  batch_size=self.params.train.batch_size,
                                  num_workers=self.params.train.num_workers, desc=desc)
        return self.world.gather_shards(local, len(split.paths))

    def trained_state(self) -> dict[str, torch.Tensor]:
        """The model tensors training changes (never the frozen base weights)."""
        state = {**self.model.head_state(), "clip.logit_scale": self.model.clip.logit_scale}
        if not self.frozen:
            state.update(self.model.backbone_state())
        return {name: tensor.detach().cpu() for name, tensor in state.items()}

    def save(self, epoch: int, history: list[dict]) -> None:
        """model_epoch_X.pt, weights_epoch_X.pth (X >= 1) and the metrics CSV for this epoch
        (rank 0 writes; the other processes hold the same weights)."""
        if not self.world.is_main:
            return
        save_model(self.model, paths.model_path(epoch),
                   backbone_trained=epoch > 0 and not self.frozen, epoch=epoch)
        if epoch > 0:
            save_atomic({
                "format": TRAIN_FORMAT, "epoch": epoch, "base": dict(self.model.base),
                "signature": self.signature, "state": self.trained_state(),
                "text_targets": {k: v.cpu() for k, v in self.targets.state_dict().items()},
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng": rng_state(self.generator), "history": history,
                "epochs": self.params.train.epochs,
            }, paths.checkpoint_path(epoch))
            _prune_checkpoints(keep=self.params.train.keep_checkpoints)
        write_metrics_csv(history, paths.TRAINING_METRICS_CSV)

    def resume(self) -> list[dict] | None:
        """Load the newest complete checkpoint; its metric rows, or None: nothing to resume."""
        checkpoint = newest_checkpoint()
        if checkpoint is None:
            print(f"train.resume: no checkpoint in {paths.CHECKPOINTS}, starting from epoch 0")
            return None
        check_compatible(checkpoint, dict(self.model.base), self.signature)
        epoch, path = checkpoint["epoch"], checkpoint["path"]
        if epoch > self.params.train.epochs:
            raise ClipcoreError(f"{path}: training reached epoch {epoch} but train.epochs is "
                                f"{self.params.train.epochs}; raise it or set train.resume false")
        if checkpoint["epochs"] != self.params.train.epochs:
            print(f"train.epochs changed from {checkpoint['epochs']} to "
                  f"{self.params.train.epochs}: the warmup and cosine schedule continues as that "
                  f"of a {self.params.train.epochs}-epoch run (README, Resuming)")
        if self.world.is_main:  # rank 0 alone touches files
            _remove_epoch_files(after=epoch)
            self._restore_model_files(epoch, checkpoint["state"])
        self.model.load_state_dict(checkpoint["state"], strict=False)
        self.targets.load_state_dict(checkpoint["text_targets"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        restore_rng(checkpoint["rng"], self.generator)
        print(f"resuming after epoch {epoch} from {path}")
        history = checkpoint["history"]
        if self.world.is_main:
            write_metrics_csv(history, paths.TRAINING_METRICS_CSV)
        return history

    def _restore_model_files(self, upto: int, upto_state: dict[str, torch.Tensor]) -> None:
        """Rewrite missing model files (DVC deletes them before the stage runs) from the
        untouched model (epoch 0) and the earlier checkpoints (epoch `upto`'s state is given:
        its checkpoint was just read)."""
        for epoch in range(upto + 1):
            target = paths.model_path(epoch)
            if target.exists():
                continue
            if epoch > 0:
                try:
                    state = (upto_state if epoch == upto
                             else load_file(paths.checkpoint_path(epoch))["state"])
                except (ClipcoreError, KeyError) as exc:
                    print(f"warning: cannot rewrite {target}: {exc}", file=sys.stderr)
                    continue
                self.model.load_state_dict(state, strict=False)
            save_model(self.model, target, backbone_trained=epoch > 0 and not self.frozen,
                       epoch=epoch)


def make_optimizer(model, targets: TextTargets, train: TrainParams) -> torch.optim.AdamW:
    """AdamW with the head, temperature and text targets at train.lr and, when it trains, the
    visual tower at train.lr * train.backbone_lr_scale; no weight decay on biases, norms and
    the temperature (parameters with fewer than 2 dimensions)."""
    head = [*model.head.parameters(), model.clip.logit_scale, *targets.parameters()]
    groups = _decay_groups(head, train.lr, train.weight_decay)
    if model.backbone_trainable:
        groups += _decay_groups(model.clip.visual.parameters(),
                                train.lr * train.backbone_lr_scale, train.weight_decay)
    return torch.optim.AdamW([g for g in groups if g["params"]], betas=ADAMW_BETAS, eps=ADAMW_EPS)


def _decay_groups(parameters, lr: float, weight_decay: float) -> list[dict]:
    trainable = [p for p in parameters if p.requires_grad]
    matrices = [p for p in trainable if p.ndim >= 2]
    others = [p for p in trainable if p.ndim < 2]
    return [{"params": matrices, "lr": lr, "weight_decay": weight_decay},
            {"params": others, "lr": lr, "weight_decay": 0.0}]


def cosine_with_warmup(optimizer, total_steps: int, warmup_fraction: float):
    """Linear warmup over warmup_fraction of all steps, then cosine decay towards 0."""
    warmup = int(warmup_fraction * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def write_metrics_csv(history: list[dict], path: Path) -> None:
    table = io.StringIO(newline="")
    writer = csv.writer(table)
    writer.writerow(METRIC_COLUMNS)
    for row in history:
        writer.writerow(["" if _missing(row[c]) else row[c] for c in METRIC_COLUMNS])
    write_text_atomic(path, table.getvalue())


def _log(live: Live | None, row: dict) -> None:
    if live is None:  # not rank 0
        return
    for name in METRIC_COLUMNS[1:]:
        if not _missing(row[name]):  # epoch 0 has no train_loss; no val set, no val metrics
            live.log_metric(name, float(row[name]))
    live.next_step()


def _missing(value) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _remove_epoch_files(after: int = -1) -> None:
    """Model files and checkpoints of epochs > after: stale outputs of an earlier run (on
    resume: the epochs after the checkpoint, a damaged one included, which train again)."""
    for folder, pattern in ((paths.ALL_WEIGHTS, "model_epoch_*.pt"),
                            (paths.CHECKPOINTS, "weights_epoch_*.pth")):
        for path in paths.epoch_files(folder, pattern):
            if paths.epoch_of(path) > after:
                if after >= 0:
                    print(f"removing {path}: epoch {paths.epoch_of(path)} trains again")
                path.unlink()


def _prune_checkpoints(keep: int) -> None:
    """Keep the newest `keep` checkpoints (0: all); model files stay, they feed embed."""
    if keep:
        for path in paths.epoch_files(paths.CHECKPOINTS, "weights_epoch_*.pth")[:-keep]:
            path.unlink()


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _load_splits(data_root: Path, prepared: Path, device: torch.device):
    """Class names, one caption per class, and the train and val splits with class ids."""
    frames = {split: read_manifest(prepared, split) for split in ("train", "val")}
    if len(frames["train"]) < 2:
        raise ClipcoreError(f"{prepared / 'train.csv'}: needs at least 2 training images, "
                            f"has {len(frames['train'])}")
    captions_by_class = pd.concat(frames.values()).groupby("label")["caption"].first()
    classes = [str(name) for name in captions_by_class.index]
    ids = {name: i for i, name in enumerate(classes)}

    def split(frame) -> Split:
        return Split([data_root / p for p in frame["path"]],
                     torch.tensor([ids[label] for label in frame["label"]], dtype=torch.long,
                                  device=device))

    return classes, list(captions_by_class), split(frames["train"]), split(frames["val"])
