"""A training run's files, per epoch X (epoch 0 = the base model before any step, so the metrics
show what fine-tuning gained): `all_weights/model_epoch_X.pt` (what inference needs),
`checkpoints/weights_epoch_X.pth` (what resuming needs; X >= 1 only), a row of
`metrics/training_metrics.csv`, each val query's points in `metrics/val_query_scores.json` and a
dvclive step.

Rank 0 alone writes: the other processes hold the same weights and rows.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import sys
from pathlib import Path
from typing import Callable, Iterator

import torch

from clipcore import paths
from clipcore.errors import ClipcoreError
from clipcore.files import write_text_atomic
from clipcore.model.checkpoint import load_file, save_atomic, save_model
from clipcore.model.factory import FineTunedCLIP

METRIC_COLUMNS = ("epoch", "train_loss", "val_loss", "top1", "top5", "top10", "score",
                  "precision_at_k", "map_at_k", "val_queries", "val_unmatched", "lr", "seconds",
                  "images_per_s")


class RunFiles:
    """What a run writes, and what it removes and rewrites when it starts or resumes."""

    def __init__(self, writes: bool, keep_checkpoints: int):
        self.writes = writes  # rank 0
        self.keep_checkpoints = keep_checkpoints  # 0: all

    def start_over(self) -> None:
        """A fresh run: the epoch files of an earlier one are stale."""
        if self.writes:
            _remove_epoch_files()

    def write_epoch(self, model: FineTunedCLIP, epoch: int, backbone_trained: bool,
                    checkpoint: Callable[[], dict] | None, history: list[dict]) -> None:
        """model_epoch_X.pt, weights_epoch_X.pth (the dict `checkpoint` builds: only where it
        is written) and the metrics CSV so far; older checkpoints beyond keep_checkpoints go."""
        if not self.writes:
            return
        save_model(model, paths.model_path(epoch), backbone_trained=backbone_trained, epoch=epoch)
        if checkpoint is not None:
            save_atomic(checkpoint(), paths.checkpoint_path(epoch))
            _prune_checkpoints(self.keep_checkpoints)
        write_metrics(history)

    def continue_after(self, checkpoint: dict, model: FineTunedCLIP) -> None:
        """Resuming after the checkpoint's epoch: later epochs' files go (they train again), model
        files DVC deleted before the stage ran are rewritten, the metrics CSV holds its rows.
        `model` is the untouched base model; it ends holding some epoch's weights."""
        if not self.writes:
            return
        epoch = checkpoint["epoch"]
        _remove_epoch_files(after=epoch)
        _restore_model_files(model, epoch, checkpoint["state"])
        write_metrics(checkpoint["history"])

    @contextlib.contextmanager
    def live(self, history: list[dict]) -> Iterator[Callable[[dict], None]]:
        """dvclive's per-epoch log (rank 0): yields log(row). A fresh Live clears its folder
        (which DVC keeps: persist) and replays the rows so far. Without dvclive installed (a
        stage run outside DVC, e.g. on a machine that only trains) only that log is missing."""
        with (_live() if self.writes else contextlib.nullcontext()) as live:
            for row in history:
                _log(live, row)
            yield lambda row: _log(live, row)


def write_metrics(history: list[dict]) -> None:
    """training_metrics.csv and val_query_scores.json ({epoch: each val query's points}, in
    the same query order every epoch) of the rows so far."""
    write_metrics_csv(history, paths.TRAINING_METRICS_CSV)
    scores = {str(row["epoch"]): row["query_scores"] for row in history if "query_scores" in row}
    write_text_atomic(paths.VAL_QUERY_SCORES, json.dumps(scores) + "\n")


def write_metrics_csv(history: list[dict], path: Path) -> None:
    table = io.StringIO(newline="")
    writer = csv.writer(table)
    writer.writerow(METRIC_COLUMNS)
    for row in history:
        writer.writerow(["" if _missing(row[c]) else row[c] for c in METRIC_COLUMNS])
    write_text_atomic(path, table.getvalue())


def _live():
    try:
        from dvclive import Live
    except ImportError:
        print(f"note: dvclive is not installed: no per-epoch DVC metrics in {paths.TRAIN_LIVE} "
              f"(training_metrics.csv has them)", file=sys.stderr)
        return contextlib.nullcontext()
    return Live(str(paths.TRAIN_LIVE), dvcyaml=False, save_dvc_exp=False)


def _log(live, row: dict) -> None:
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


def _restore_model_files(model: FineTunedCLIP, upto: int,
                         upto_state: dict[str, torch.Tensor]) -> None:
    """Rewrite missing model files of epochs 0..upto from the untouched model and the
    checkpoints (epoch `upto`'s state is given: its checkpoint was just read)."""
    # The head's buffers (its input statistics) are set before the first step and never train:
    # any checkpoint's are epoch 0's too, so epoch 0 needs no pass over the training images.
    buffers = {f"head.{name}" for name, _ in model.head.named_buffers()}
    model.load_state_dict({k: v for k, v in upto_state.items() if k in buffers}, strict=False)
    for epoch in range(upto + 1):
        target = paths.model_path(epoch)
        if target.exists():
            continue
        state = {}
        if epoch > 0:
            try:
                state = (upto_state if epoch == upto
                         else load_file(paths.checkpoint_path(epoch))["state"])
            except (ClipcoreError, KeyError) as exc:
                print(f"warning: cannot rewrite {target}: {exc}", file=sys.stderr)
                continue
            model.load_state_dict(state, strict=False)
        # A checkpoint holds the tower exactly when it trained (train.frozen_epochs: not yet).
        trained = any(name.startswith("clip.visual.") for name in state)
        save_model(model, target, backbone_trained=trained, epoch=epoch)
