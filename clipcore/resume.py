"""Training checkpoints (`weights_epoch_X.pth`): what a run needs to continue exactly where it
stopped, how to find the newest one that is complete, and whether it belongs to this run.

A checkpoint holds what training changed (never the untouched base weights), the optimizer and
scheduler, every RNG state and the metric rows so far, so a resumed run ends with the same
numbers as one that never stopped.
"""
from __future__ import annotations

import dataclasses
import hashlib
import random
import sys
from pathlib import Path

import numpy as np
import torch

from clipcore import paths
from clipcore.checkpoint import DamagedFile, load_file
from clipcore.errors import ClipcoreError
from clipcore.params import Params

TRAIN_FORMAT = "clipcore-train/2"  # /2: the signature holds every outcome-shaping setting
# Params that may change when a run resumes: they don't change what a training step computes
# (train.epochs stretches the schedule: see README, Resuming). Sections of the later stages
# and the data's location are no part of training; the data itself is compared by digest.
MAY_CHANGE = ("train.epochs", "train.resume", "train.num_workers", "train.device",
              "train.keep_checkpoints")
NOT_TRAINING = ("demo.", "embed.", "retrieve.", "submit.", "data.root")
SPLIT_KEY = "data.split"  # sha256 of the train and val manifests
_ABSENT = "(not recorded)"
REQUIRED = ("epoch", "epochs", "base", "signature", "state", "optimizer", "scheduler", "rng",
            "history")


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
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    numpy = state["numpy"]
    np.random.set_state(("MT19937", numpy["key"].numpy().astype(np.uint32), numpy["pos"],
                         numpy["has_gauss"], numpy["gauss"]))
    random.setstate(state["python"])
    loader_generator.set_state(state["loader"])


def run_settings(params: Params, prepared: Path) -> dict:
    """Every setting that shapes what training computes, as flat dotted keys, and the digest of
    the train/val manifests (the data and its split). Built from the params dataclasses, so a
    key added to params.yaml later is compared too unless listed in MAY_CHANGE/NOT_TRAINING."""
    settings = {key: value for key, value in _flatten(dataclasses.asdict(params)).items()
                if key not in MAY_CHANGE and not key.startswith(NOT_TRAINING)}
    digest = hashlib.sha256()
    for split in ("train", "val"):
        digest.update((Path(prepared) / f"{split}.csv").read_bytes())
    settings[SPLIT_KEY] = digest.hexdigest()
    return settings


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


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
    stored = checkpoint["signature"]
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
    was, value = stored.get(key, _ABSENT), now.get(key, _ABSENT)
    return f"{key}={was!r}, now {value!r}"
