"""Training checkpoints (`weights_epoch_X.pth`): what a run needs to continue exactly where it
stopped, and how to find the newest one that is complete.

A checkpoint holds what training changed (never the untouched base weights), the optimizer and
scheduler, every RNG state and the metric rows so far, so a resumed run ends with the same
numbers as one that never stopped.
"""
from __future__ import annotations

import random
import sys
from pathlib import Path

import numpy as np
import torch

from clipcore import paths
from clipcore.checkpoint import load_file
from clipcore.errors import ClipcoreError

TRAIN_FORMAT = "clipcore-train/1"
REQUIRED = ("epoch", "base", "signature", "state", "optimizer", "scheduler", "rng", "history")


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


def newest_checkpoint(folder: Path = paths.CHECKPOINTS) -> dict | None:
    """The newest checkpoint that reads back whole, or None when there is none.

    A newest file that is truncated or damaged (a run killed while the disk filled, say) is
    skipped with a warning and the one before it used: losing an epoch beats losing the run.
    """
    for path in reversed(paths.epoch_files(folder, "weights_epoch_*.pth")):
        try:
            data = load_file(path)
            missing = [key for key in REQUIRED if key not in data]
            if data.get("format") != TRAIN_FORMAT or missing:
                raise ClipcoreError(f"{path}: not a complete clipcore training checkpoint")
        except ClipcoreError as exc:
            print(f"warning: skipping {exc}", file=sys.stderr)
            continue
        return {**data, "path": path}
    return None


def check_compatible(checkpoint: dict, base: dict, signature: dict) -> None:
    """One-line error when the checkpoint can't continue this run (other base, other shapes)."""
    path = checkpoint["path"]
    if checkpoint["base"] != base:
        raise ClipcoreError(
            f"{path}: made on base weights {checkpoint['base']}, this run uses {base}; "
            f"set train.resume false to start over")
    for key, value in signature.items():
        was = checkpoint["signature"].get(key)
        if was != value:
            what = ("the classes in the train/val manifests changed" if key == "classes"
                    else f"made with {key}={was!r}, now {value!r}")
            raise ClipcoreError(f"{path}: {what}; set train.resume false to start over")
