"""The best epoch, picked by validation and never by test labels, kept in repository/best/: its
model file, its results file and a summary of what made it (params, data). With WiSE-FT
(embed.wise_ft_alpha < 1) the model file holds the mixed weights that made the results, not the
epoch's fine-tuned ones.

The rule: the highest val `score` in training_metrics.csv (the competition's 0-1000 score on the
val split); ties go to the earliest epoch, the least training that reaches that score. Without
val metrics (no val split, or no val query with a positive in the val gallery) every score is
empty: the last epoch is taken, and the summary says so.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from clipcore import paths
from clipcore.errors import ClipcoreError
from clipcore.files import file_sha256, write_atomic, write_text_atomic
from clipcore.model.checkpoint import save_model
from clipcore.params import Params
from clipcore.report.versus_base import compare_with_base
from clipcore.retrieve.embedding import embedding_model

# The params sections that made the model and its results (demo and submit don't: the data
# hashes cover the demo, and submitting changes no ranking).
MADE_BY = ("seed", "data", "model", "train", "loss", "embed", "retrieve")
VAL_COLUMNS = ("score", "top1", "top5", "top10", "precision_at_k", "map_at_k", "val_loss",
               "val_queries")
RULE_VAL = "highest val score (training_metrics.csv); ties: the earliest epoch"
RULE_NO_VAL = "no val metrics (no val split, or no val query with a positive): the last epoch"


@dataclass(frozen=True)
class Pick:
    epoch: int
    rule: str


def read_training_metrics(path: Path = paths.TRAINING_METRICS_CSV) -> list[dict]:
    """The train stage's rows by epoch: `epoch` an int, every other column a float (NaN: empty)."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except FileNotFoundError:
        raise ClipcoreError(f"{path}: not found (run `dvc repro train`)") from None
    if not rows or not {"epoch", "score"} <= set(rows[0]):
        raise ClipcoreError(f"{path}: no rows with epoch and score columns (run `dvc repro train`)")
    try:
        table = [{key: int(value) if key == "epoch" else _number(value)
                  for key, value in row.items()} for row in rows]
    except ValueError as exc:
        raise ClipcoreError(f"{path}: not a metrics table ({exc})") from None
    return sorted(table, key=lambda row: row["epoch"])


def read_test_metrics(path: Path = paths.RETRIEVAL_METRICS) -> dict[int, dict] | None:
    """The retrieve stage's test metrics by epoch; None when the test labels are unknown."""
    try:
        summary = json.loads(Path(path).read_text(encoding="utf-8"))
        epochs = summary["epochs"]
    except FileNotFoundError:
        raise ClipcoreError(f"{path}: not found (run `dvc repro retrieve`)") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise ClipcoreError(f"{path}: not the retrieve stage's metrics ({exc!r})") from None
    return {int(epoch): metrics for epoch, metrics in epochs.items()} or None


def pick(rows: list[dict]) -> Pick:
    """The epoch the val score picks (module docstring: the rule)."""
    scored = [row for row in rows if not math.isnan(row["score"])]
    if not scored:
        return Pick(rows[-1]["epoch"], RULE_NO_VAL)
    return Pick(max(scored, key=lambda row: (row["score"], -row["epoch"]))["epoch"], RULE_VAL)


def write_best(params: Params, prepared: Path = paths.PREPARED) -> dict:
    """Copy the val-picked epoch's model and results into repository/best/ with summary.json;
    returns the summary. Everything is checked before the first file is written."""
    rows = read_training_metrics()
    chosen = pick(rows)
    model, results = paths.model_path(chosen.epoch), paths.results_path(chosen.epoch)
    for source, stage in ((model, "train"), (results, "retrieve")):
        if not source.is_file():
            raise ClipcoreError(f"{source}: not found for the best epoch {chosen.epoch} "
                                f"(run `dvc repro {stage}`)")
    test = read_test_metrics()
    if test is not None and chosen.epoch not in test:
        raise ClipcoreError(f"{paths.RETRIEVAL_METRICS}: no epoch {chosen.epoch} "
                            f"(stale metrics: run `dvc repro retrieve`)")
    val = next(row for row in rows if row["epoch"] == chosen.epoch)
    summary = {
        "epoch": chosen.epoch,
        "picked_by": chosen.rule,
        "val": {column: _json_number(val.get(column, math.nan)) for column in VAL_COLUMNS},
        "test": None if test is None else test[chosen.epoch],
        "versus_base": compare_with_base(chosen.epoch),  # paired over the val queries
        "model": paths.BEST_MODEL.name,
        "results": paths.BEST_RESULTS.name,
        "made_from": {"model": str(model), "model_sha256": file_sha256(model),
                      "wise_ft_alpha": params.embed.wise_ft_alpha, "results": str(results)},
        "params": {section: _plain(getattr(params, section)) for section in MADE_BY},
        "data": {"root": params.data.root,
                 "manifests_sha256": {file.name: file_sha256(file)
                                      for file in sorted(Path(prepared).glob("*.csv"))}},
    }
    _write_model(model, params.embed.wise_ft_alpha, chosen.epoch)
    _copy(results, paths.BEST_RESULTS)
    write_text_atomic(paths.BEST_SUMMARY, json.dumps(summary, indent=2) + "\n")
    return summary


def _write_model(source: Path, alpha: float, epoch: int) -> None:
    """The model that made the results: the epoch's file itself, or at alpha < 1 its WiSE-FT mix
    as the embed stage made it (marked mixed, so that loading it does not mix it again)."""
    if alpha == 1.0:
        _copy(source, paths.BEST_MODEL)
        return
    mixed, backbone_trained = embedding_model(source, alpha, torch.device("cpu"))
    save_model(mixed, paths.BEST_MODEL, backbone_trained, epoch)


def _copy(source: Path, target: Path) -> None:
    with open(source, "rb") as f:
        write_atomic(target, lambda out: shutil.copyfileobj(f, out))


def read_summary(path: Path = paths.BEST_SUMMARY) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ClipcoreError(f"{path}: not found (run `dvc repro best`)") from None
    except ValueError as exc:
        raise ClipcoreError(f"{path}: not JSON ({exc})") from None


def _number(text: str) -> float:
    return math.nan if text == "" else float(text)


def _json_number(value: float) -> float | None:
    return None if math.isnan(value) else value  # JSON has no NaN


def _plain(section):
    return dataclasses.asdict(section) if dataclasses.is_dataclass(section) else section
