"""Runs of the stages for gpu_check: each in a folder of its own (the demo data, manifests and a
params.yaml), each stage a subprocess whose output is kept in the check's log folder; and the
comparisons of two runs' metrics and embeddings."""
from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from clipcore import paths
from clipcore.data.manifests import prepare
from clipcore.demo.digits import write_demo
from clipcore.params import parse_params, with_overrides
from clipcore.report.best import read_training_metrics

REPO = Path(__file__).resolve().parents[2]
FP32_STAGE = Path(__file__).with_name("fp32_stage.py")
TINY = {"model.name": "tiny", "model.pretrained": "none", "model.dropout": 0.0,
        "train.augment": False, "data.root": "demo"}


@dataclass
class Machine:
    data: Path        # the digits demo and its manifests
    work: Path        # one folder per run below it (deleted at the end)
    logs: Path        # every stage's output, kept (--out)
    device: str       # cuda or cpu: where the device checks run
    gpus: int
    quick: bool       # the reduced form: tiny model, fewer images and steps
    runs: dict = field(default_factory=dict)  # name -> folder of a finished run, shared

    @property
    def model(self) -> dict:
        """ViT-B-32 itself on CUDA (random init: no weights there); the tiny model otherwise."""
        if self.device == "cuda" and not self.quick:
            return {"model.name": "ViT-B-32", "model.pretrained": "none"}
        return {}


def repository_params() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def write_data(folder: Path, quick: bool) -> Path:
    """The digits demo (quick: three digits) and its manifests under `folder`."""
    params = parse_params(repository_params())
    write_demo(folder / "demo", params.demo, params.seed,
               digits_kept=range(3) if quick else range(10))
    prepare(folder / "demo", folder / "prepared", params.data, params.seed)
    return folder


def project(machine: Machine, name: str, overrides: dict, data: Path | None = None,
            repeat: int = 1) -> Path:
    """A run folder as a stage sees it: `data`'s images (default the demo) linked as demo/, its
    manifests (train/query/gallery rows listed `repeat` times), params.yaml = the repository's
    with TINY, the machine's model and `overrides`."""
    data = data or machine.data
    folder = machine.work / name
    folder.mkdir()
    (folder / "demo").symlink_to(data / "demo")
    prepared = folder / paths.PREPARED
    shutil.copytree(data / "prepared", prepared)
    for split in ("train", "query", "gallery"):
        frame = pd.read_csv(prepared / f"{split}.csv", dtype=str, keep_default_na=False)
        pd.concat([frame] * repeat).to_csv(prepared / f"{split}.csv", index=False)
    raw = with_overrides(repository_params(), {**TINY, **machine.model, **overrides})
    (folder / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return folder


def stage(machine: Machine, folder: Path, name: str, fp32: bool = False) -> None:
    """`python -m stages.<name>` in `folder` (fp32: through fp32_stage.py, autocast off); its
    output goes to logs/<folder>_<name>.log."""
    command = [sys.executable, str(FP32_STAGE), name] if fp32 else [
        sys.executable, "-m", f"stages.{name}"]
    log = machine.logs / f"{folder.name}_{name}.log"
    with open(log, "w") as out:
        done = subprocess.run(command, cwd=folder, stdout=out, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONPATH": python_path()})
    if done.returncode:
        lines = log.read_text().strip().splitlines()
        raise RuntimeError(f"stages.{name} in {folder.name} failed "
                           f"({log.name}): {lines[-1] if lines else done.returncode}")


def python_path() -> str:
    """The repository first, then the caller's PYTHONPATH: on the GPU machine the carried
    wheels are installed there (docs/gpu.md), and every stage needs them."""
    return os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))


def trained(machine: Machine, frozen: bool, fp32: bool = False, processes: int = 1,
            embed: bool = False, device: str | None = None) -> Path:
    """The folder of a run on `device` (default the machine's) made once and shared by checks:
    2 epochs, frozen or not; fp32: through fp32_stage.py, autocast off (on the CPU, where there
    is none, it must give the plain run's numbers exactly)."""
    device = device or machine.device
    name = f"{device}_{'fp32' if fp32 else 'plain'}_{'frozen' if frozen else 'unfrozen'}_{processes}"
    if name not in machine.runs:
        folder = project(machine, name, {"train.device": device, "train.freeze_backbone": frozen,
                                         "train.epochs": 2, "train.processes": processes})
        stage(machine, folder, "train", fp32)
        machine.runs[name] = folder
    folder = machine.runs[name]
    if embed and not (folder / paths.embeddings_path(0)).exists():
        stage(machine, folder, "embed", fp32)
    return folder


def metric_gaps(a: Path, b: Path) -> dict[str, float]:
    """The largest difference between two runs' epochs: relative for the losses, in points for
    the val score."""
    gaps = {"train_loss": 0.0, "val_loss": 0.0, "score": 0.0}
    rows_a, rows_b = (read_training_metrics(run / paths.TRAINING_METRICS_CSV) for run in (a, b))
    if len(rows_a) != len(rows_b):
        raise RuntimeError(f"{len(rows_a)} epochs against {len(rows_b)}")
    for row_a, row_b in zip(rows_a, rows_b):
        for column in gaps:
            x, y = row_a[column], row_b[column]
            if math.isnan(x) and math.isnan(y):  # an empty cell in both (epoch 0's train_loss)
                continue
            gap = abs(x - y) if column == "score" else abs(x - y) / max(abs(y), 1e-12)
            # One run's cell empty, the other's not: as far apart as can be.
            gaps[column] = max(gaps[column], math.inf if math.isnan(gap) else gap)
    return gaps


def within(gaps: dict[str, float], loss: float, score: float) -> tuple[bool, str]:
    ok = max(gaps["train_loss"], gaps["val_loss"]) <= loss and gaps["score"] <= score
    return ok, (f"train_loss {gaps['train_loss']:.2e}, val_loss {gaps['val_loss']:.2e} "
                f"relative (<= {loss:g}), score {gaps['score']:.2f} points (<= {score:g})")


def lowest_cosine(a: Path, b: Path) -> float:
    """The lowest cosine between two runs' embeddings of one image (every epoch, split)."""
    lowest = 1.0
    for model_file in paths.epoch_files(a / paths.ALL_WEIGHTS, "model_epoch_*.pt"):
        epoch = paths.epoch_of(model_file)
        x, y = np.load(a / paths.embeddings_path(epoch)), np.load(b / paths.embeddings_path(epoch))
        for split in ("query", "gallery"):
            if x[f"{split}_names"].tolist() != y[f"{split}_names"].tolist():
                raise RuntimeError(f"epoch {epoch} {split}: other images or order")
            lowest = min(lowest, float((x[split] * y[split]).sum(axis=1).min()))
    return lowest
