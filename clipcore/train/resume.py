"""Training checkpoints (`weights_epoch_X.pth`): what a run needs to continue exactly where it
stopped, how to find the newest one that is complete, and whether it belongs to this run.

A checkpoint holds what training changed (never the untouched base weights), the optimizer and
scheduler, every RNG state and the metric rows so far, so a resumed run ends with the same
numbers as one that never stopped.
"""
from __future__ import annotations

import dataclasses
import random
import sys
from pathlib import Path

import numpy as np
import torch

from clipcore import paths
from clipcore.data.manifests import manifest_digests
from clipcore.errors import ClipcoreError
from clipcore.model.checkpoint import DamagedFile, load_file
from clipcore.params import Params, dotted

# /2: the signature holds every outcome-shaping setting; /3: the loss's state (text targets,
# class weights) under "loss"
TRAIN_FORMAT = "clipcore-train/3"
# Params that may change when a run resumes: they don't change what a training step computes
# (train.epochs stretches the schedule: see README, Resuming). Sections of the later stages
# and the data's location are no part of training; the data itself is compared by digest:
# which files in which split, and their bytes (prepare's per-file sha256).
MAY_CHANGE = ("train.epochs", "train.resume", "train.num_workers", "train.device",
              "train.keep_checkpoints")
NOT_TRAINING = ("demo.", "embed.", "retrieve.", "submit.", "data.root")
# data.val_queries and data.val_distractors (like train.val_top_k) changes no training step, only what validation
# measures; it is compared all the same: the checkpoint's metric rows were measured under its
# protocol, and a resumed run under another would mix two protocols in one training_metrics.csv,
# from which the best stage picks an epoch by val score.
# Keys added to the signature after checkpoints of TRAIN_FORMAT were written, with the value a
# checkpoint that doesn't record one was made with (before data.val_queries, every val image
# queried: its default; before data.val_distractors, none joined the gallery).
ADDED_LATER = {"data.val_queries": "", "data.val_distractors": "none"}
SPLIT_KEY = "data.split"  # sha256 of the train and val manifests' rows
CONTENT_KEY = "data.content"  # sha256 of their images' bytes
_ABSENT = "(not recorded)"
REQUIRED = ("epoch", "epochs", "base", "signature", "state", "loss", "optimizer", "scheduler",
            "rng", "history")


def rng_state(loader_generator: torch.Generator) -> dict:
    """Every RNG a training step draws from, in a form torch.load(weights_only=True) accepts."""
    _, key, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"key": torch.from_numpy(key.astype(np.int64)), "pos": pos,
                  "has_gauss": has_gauss, "gauss": gauss},
        "python": random.getstate(),
        "loader": loader_generator.get_state(),
    }


def restore_rng(state: dict, loader_generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    torch.cuda.set_rng_state_all(cuda_states_that_fit(state["cuda"], visible))
    numpy = state["numpy"]
    np.random.set_state(("MT19937", numpy["key"].numpy().astype(np.uint32), numpy["pos"],
                         numpy["has_gauss"], numpy["gauss"]))
    random.setstate(state["python"])
    loader_generator.set_state(state["loader"])


def cuda_states_that_fit(saved: list[torch.Tensor], visible: int) -> list[torch.Tensor]:
    """A checkpoint holds one CUDA RNG state per GPU visible when it was saved; resumed where
    fewer are visible (another machine, CUDA_VISIBLE_DEVICES), the first ones, said."""
    if len(saved) > visible:
        print(f"resuming with {visible} of the {len(saved)} GPUs' random states the "
              f"checkpoint holds (fewer GPUs visible now)")
    return saved[:visible]


def run_settings(params: Params, prepared: Path) -> dict:
    """Every setting that shapes what training computes, as flat dotted keys, and the digests of
    the train/val manifests and their images (the data and its split). Built from the params
    dataclasses, so a key added to params.yaml later is compared too unless listed in
    MAY_CHANGE/NOT_TRAINING."""
    settings = {key: value for key, value in dotted(dataclasses.asdict(params)).items()
                if key not in MAY_CHANGE and not key.startswith(NOT_TRAINING)}
    digests = manifest_digests(prepared, ("train", "val"))
    settings[SPLIT_KEY], settings[CONTENT_KEY] = digests["split"], digests["content"]
    return settings


def checkpoint_to_resume(base: dict, signature: dict, epochs: int) -> dict | None:
    """train.resume: the newest complete checkpoint, checked to belong to this run (base
    weights, settings, data) and to end at most at train.epochs; None (said so) when there is
    none to resume."""
    checkpoint = newest_checkpoint()
    if checkpoint is None:
        print(f"train.resume: no checkpoint in {paths.CHECKPOINTS}, starting from epoch 0")
        return None
    check_compatible(checkpoint, base, signature)
    epoch, path = checkpoint["epoch"], checkpoint["path"]
    if epoch > epochs:
        raise ClipcoreError(f"{path}: training reached epoch {epoch} but train.epochs is "
                            f"{epochs}; raise it or set train.resume false")
    if checkpoint["epochs"] != epochs:
        print(f"train.epochs changed from {checkpoint['epochs']} to {epochs}: the warmup and "
              f"cosine schedule continues as that of a {epochs}-epoch run (docs/training.md, "
              f"Resuming)")
    return checkpoint


def newest_checkpoint(folder: Path = paths.CHECKPOINTS) -> dict | None:
    """The newest checkpoint that reads back whole, or None when the folder holds none.

    A damaged newest file (cut short or with changed bits: a crash, a full disk, a bad copy) is
    skipped with a warning and the one before it used: losing an epoch beats losing the run.
    Anything else (a foreign file, another format) stops the run, and so does a folder where no
    checkpoint loads: starting over would delete them all.
    """
    files = paths.epoch_files(folder, "weights_epoch_*.pth")
    for path in reversed(files):
        try:
            data = load_file(path)
        except DamagedFile as exc:
            print(f"warning: skipping {exc}; trying the epoch before", file=sys.stderr)
            continue
        if data.get("format") != TRAIN_FORMAT:
            raise ClipcoreError(f"{path}: not a training checkpoint this clipcore continues "
                                f"(format {data.get('format')!r}, expected {TRAIN_FORMAT!r}); "
                                f"nothing was deleted: set train.resume false to start over")
        missing = [key for key in REQUIRED if key not in data]
        if missing:
            raise ClipcoreError(f"{path}: incomplete training checkpoint (no {missing[0]!r} "
                                f"entry); nothing was deleted: set train.resume false to start over")
        return {**data, "path": path}
    if files:
        raise ClipcoreError(f"{folder}: none of the {len(files)} checkpoints loads (each is "
                            f"damaged, see the warnings); nothing was deleted: set train.resume "
                            f"false to start over")
    return None


def check_compatible(checkpoint: dict, base: dict, signature: dict) -> None:
    """One-line error naming every setting in which the checkpoint's run differs from this one
    (base weights, params, data split, classes): resuming it would mix two runs."""
    path = checkpoint["path"]
    if checkpoint["base"] != base:
        raise ClipcoreError(
            f"{path}: made on base weights {checkpoint['base']}, this run uses {base}; "
            f"set train.resume false to start over")
    stored = {**ADDED_LATER, **checkpoint["signature"]}
    differ = [key for key in sorted(set(signature) | set(stored))
              if stored.get(key, _ABSENT) != signature.get(key, _ABSENT)]
    if differ:
        raise ClipcoreError(
            f"{path}: made with {'; '.join(_difference(key, stored, signature) for key in differ)}"
            f"; set train.resume false to start over (nothing was deleted; on resume only "
            f"{', '.join(MAY_CHANGE)} may change)")


def _difference(key: str, stored: dict, now: dict) -> str:
    if key in (SPLIT_KEY, "classes"):  # long values: what changed says enough
        return f"other {key} (the train/val manifests changed)"
    if key == CONTENT_KEY:
        return f"other {key} (the bytes of training or val images changed)"
    was, value = stored.get(key, _ABSENT), now.get(key, _ABSENT)
    return f"{key}={was!r}, now {value!r}"
