"""The one check to run on a GPU machine: does clipcore work there, and how fast is it next to a
bare open_clip loop. About 5 minutes on one GPU; each check prints PASS or FAIL with its numbers,
and the next check runs whatever happened; the exit status is 1 when any failed.

    python bench/gpu_check.py              # from the repository root, on the GPU machine
    python bench/gpu_check.py --repeat 8   # more images for the speed check

Every run goes through the stages' own code (`python -m stages.train`, `stages.embed`; several
processes through the same torchrun relaunch) on the digits demo, written to a temporary folder,
with the tiny model, dropout 0, no augmentation and the default worker setting (auto):

1. train frozen, 2 epochs: CUDA (bf16 autocast) against the CPU (fp32): every epoch's train and
   val loss within 2% and val score within 25 points (of 1000; one val query's top-1 is ~2).
2. train unfrozen, 1 epoch: the same.
3. embed, the frozen run's model files: CUDA against CPU embeddings, cosine >= 0.99 per image.
4. two processes against one, frozen train and embed: with 2+ GPUs on two GPUs (NCCL); with one
   GPU, on the CPU (gloo: NCCL needs a GPU per process); losses within 1e-3 (CPU: 1e-4)
   relative, embeddings cosine >= 0.999.
5. resume: the frozen CUDA run stopped after epoch 1 and resumed ends as the run that never
   stopped (same metrics to 1e-4); on CUDA its checkpoint holds one more GPU's RNG state than
   this machine has (saved on more GPUs).
6. speed: ViT-B-32 (random init unless OpenAI's weights are cached; the speed is the same) on
   CUDA, the tiny model without: train (visual tower trained) and embed images/s of the pipeline
   next to a bare open_clip loop on the same device, batch, images and workers; PASS at >= 0.7
   of the bare loop's speed (without CUDA the ratio is reported only).

Without CUDA everything runs on the CPU, slowly: checks 1-3 then compare the CPU with itself
(bf16 is not checked), 4 uses gloo, and 6 uses the tiny model.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
import yaml
from torch.utils.data import DataLoader

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from clipcore import paths  # noqa: E402
from clipcore.report.best import read_training_metrics  # noqa: E402
from clipcore.model.checkpoint import load_file, save_atomic  # noqa: E402
from clipcore.demo.digits import write_demo  # noqa: E402
from clipcore.retrieve.embedding import embed_all  # noqa: E402
from clipcore.errors import ClipcoreError  # noqa: E402
from clipcore.model.features import autocast, loader_workers  # noqa: E402
from clipcore.data.images import ImageFiles  # noqa: E402
from clipcore.data.manifests import prepare  # noqa: E402
from clipcore.model.factory import build_model  # noqa: E402
from clipcore.params import ModelParams, load_params, parse_params, with_overrides  # noqa: E402
from clipcore.stage import first_line  # noqa: E402
from clipcore.train.training import train  # noqa: E402

TINY = {"model.name": "tiny", "model.pretrained": "none", "model.dropout": 0.0,
        "train.augment": False, "data.root": "demo"}
SPEED_RATIO = 0.7  # pipeline images/s at least this share of the bare loop's


@dataclass
class Machine:
    data: Path        # the demo and its manifests
    work: Path        # one folder per run below it
    device: str       # cuda or cpu: where the device checks run
    gpus: int
    repeat: int
    runs: dict        # name -> folder of a finished run, shared between checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=0,
                        help="speed check: list each train/query/gallery image R times "
                             "(default 4 on CUDA, 1 on the CPU)")
    args = parser.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"  # never wait for a model hub
    cuda = torch.cuda.is_available()
    gpus = torch.cuda.device_count() if cuda else 0
    print(f"{gpus} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}" if cuda else
          f"no CUDA (torch {torch.__version__}): every check on the CPU, bf16 not checked",
          flush=True)
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp, quiet():
        machine = Machine(write_data(Path(tmp) / "data"), Path(tmp), "cuda" if cuda else "cpu",
                          gpus, args.repeat or (4 if cuda else 1), {})
        failed = 0
        for name, check in CHECKS:
            started = time.perf_counter()
            try:
                passed, numbers = check(machine)
            except Exception as exc:  # noqa: BLE001 - a failed check must not stop the others
                passed, numbers = False, first_line(exc)
            failed += passed is False
            verdict = {True: "PASS", False: "FAIL", None: "INFO"}[passed]
            print(f"{verdict} {name} ({time.perf_counter() - started:.0f} s): {numbers}",
                  file=sys.__stdout__, flush=True)
    print(f"{len(CHECKS) - failed} of {len(CHECKS)} checks passed" if failed else
          "all checks passed")
    sys.exit(1 if failed else 0)


@contextlib.contextmanager
def quiet():
    """The in-process runs' progress bars and notes kept off the console: only verdicts show."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def write_data(folder: Path) -> Path:
    params = parse_params(yaml.safe_load((REPO / "params.yaml").read_text()))
    write_demo(folder / "demo", params.demo, params.seed)
    prepare(folder / "demo", folder / "prepared", params.data, params.seed)
    return folder


# --- runs of the stages ---------------------------------------------------------------------

def project(machine: Machine, name: str, overrides: dict, repeat: int = 1) -> Path:
    """A run folder as a stage sees it: demo data, manifests (train/query/gallery rows listed
    `repeat` times), params.yaml = the repository's with `overrides`."""
    folder = machine.work / name
    folder.mkdir()
    (folder / "demo").symlink_to(machine.data / "demo")
    prepared = folder / paths.PREPARED
    shutil.copytree(machine.data / "prepared", prepared)
    for split in ("train", "query", "gallery"):
        frame = pd.read_csv(prepared / f"{split}.csv", dtype=str, keep_default_na=False)
        pd.concat([frame] * repeat).to_csv(prepared / f"{split}.csv", index=False)
    raw = with_overrides(yaml.safe_load((REPO / "params.yaml").read_text()), overrides)
    (folder / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return folder


def stage(folder: Path, name: str) -> None:
    done = subprocess.run([sys.executable, "-m", f"stages.{name}"], cwd=folder,
                          env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True)
    if done.returncode:
        lines = done.stderr.strip().splitlines()
        raise RuntimeError(f"{folder.name}: stages.{name} failed: "
                           f"{lines[-1] if lines else done.returncode}")


def trained(machine: Machine, device: str, frozen: bool, processes: int = 1,
            embed: bool = False) -> Path:
    """The folder of a tiny run (frozen: 2 epochs, else 1), made once and shared by checks."""
    name = f"{device}_{'frozen' if frozen else 'unfrozen'}_{processes}"
    if name not in machine.runs:
        folder = project(machine, name, {**TINY, "train.device": device,
                                         "train.freeze_backbone": frozen,
                                         "train.epochs": 2 if frozen else 1,
                                         "train.processes": processes})
        stage(folder, "train")
        machine.runs[name] = folder
    folder = machine.runs[name]
    if embed and not (folder / paths.embeddings_path(0)).exists():
        stage(folder, "embed")
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


# --- the checks ------------------------------------------------------------------------------

def check_train(frozen: bool) -> Callable[[Machine], tuple[bool, str]]:
    def check(machine: Machine) -> tuple[bool, str]:
        gaps = metric_gaps(trained(machine, machine.device, frozen),
                           trained(machine, "cpu", frozen))
        return within(gaps, loss=0.02, score=25)
    return check


def check_embed(machine: Machine) -> tuple[bool, str]:
    lowest = lowest_cosine(trained(machine, machine.device, True, embed=True),
                           trained(machine, "cpu", True, embed=True))
    return lowest >= 0.99, f"lowest cosine {lowest:.5f} (>= 0.99)"


def check_processes(machine: Machine) -> tuple[bool, str]:
    device = "cuda" if machine.gpus >= 2 else "cpu"
    two = trained(machine, device, True, processes=2, embed=True)
    one = trained(machine, device, True, embed=True)
    ok, numbers = within(metric_gaps(two, one), loss=1e-3 if device == "cuda" else 1e-4,
                         score=2 if device == "cuda" else 1e-6)
    lowest = lowest_cosine(two, one)
    where = ("2 GPUs, NCCL" if device == "cuda" else
             "CPU, gloo" + (" (one GPU: NCCL needs a GPU per process)" if machine.gpus else ""))
    return ok and lowest >= 0.999, f"{where}: {numbers}; embeddings lowest cosine {lowest:.6f}"


def check_resume(machine: Machine) -> tuple[bool, str]:
    finished = trained(machine, machine.device, True)
    folder = machine.work / f"{finished.name}_resumed"
    shutil.copytree(finished, folder, symlinks=True)
    for path in (paths.checkpoint_path(2), paths.model_path(2)):  # stopped after epoch 1
        (folder / path).unlink()
    note = ""
    if machine.device == "cuda":  # saved where one more GPU was visible
        checkpoint = load_file(folder / paths.checkpoint_path(1))
        checkpoint["rng"]["cuda"].append(checkpoint["rng"]["cuda"][-1])
        save_atomic(checkpoint, folder / paths.checkpoint_path(1))
        note = f", checkpoint with {len(checkpoint['rng']['cuda'])} GPUs' RNG states"
    params = yaml.safe_load((folder / "params.yaml").read_text())
    params["train"]["resume"] = True
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    stage(folder, "train")
    ok, numbers = within(metric_gaps(folder, finished), loss=1e-4, score=1e-6)
    return ok, f"epochs 0-2 against the uninterrupted run{note}: {numbers}"


def check_speed(machine: Machine) -> tuple[bool | None, str]:
    cuda = machine.device == "cuda"
    model_name = "ViT-B-32" if cuda else "tiny"
    pretrained = cached_or_none(model_name) if cuda else "none"
    batch = 128 if cuda else 32
    folder = project(machine, "speed", {
        **TINY, "model.name": model_name, "model.pretrained": pretrained,
        "train.device": machine.device, "train.freeze_backbone": False, "train.epochs": 1,
        "train.batch_size": batch, "embed.batch_size": batch}, repeat=machine.repeat)
    with contextlib.chdir(folder):
        params = load_params()
        history = train(params, Path(params.data.root), paths.PREPARED)
        started = time.perf_counter()
        report = embed_all(params, Path(params.data.root), paths.PREPARED)
        embed_speed = (report.backbone_passes * sum(report.images.values())
                       / (time.perf_counter() - started))
        frames = {split: pd.read_csv(paths.PREPARED / f"{split}.csv")
                  for split in ("train", "query", "gallery")}
    root = folder / "demo"
    train_paths = [root / p for p in frames["train"]["path"]]
    embed_paths = [root / p for split in ("query", "gallery") for p in frames[split]["path"]]
    model = build_model(ModelParams(model_name, pretrained, 512, 0.0), machine.device)
    bare_train = bare_train_speed(model, train_paths, batch)
    bare_embed = bare_embed_speed(model, embed_paths, batch)
    ratios = (history[-1]["images_per_s"] / bare_train, embed_speed / bare_embed)
    peak = (f"; peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
            if cuda else "")
    numbers = (f"{model_name} {pretrained}, batch {batch}, "
               f"{loader_workers('auto', torch.device(machine.device))} workers (auto): "
               f"train {history[-1]['images_per_s']:.0f} images/s, bare {bare_train:.0f} "
               f"({ratios[0]:.2f}); embed {embed_speed:.0f} images/s, bare {bare_embed:.0f} "
               f"({ratios[1]:.2f}); " + (f"PASS at >= {SPEED_RATIO}{peak}" if cuda else
                                          "no verdict without CUDA"))
    return (min(ratios) >= SPEED_RATIO if cuda else None), numbers


def cached_or_none(model: str) -> str:
    """'openai' when its weights load without network, else 'none' (random init)."""
    try:
        build_model(ModelParams(model, "openai", 512, 0.0))
        return "openai"
    except ClipcoreError:
        return "none"


def bare_loader(model, images: list[Path], batch: int, transform) -> DataLoader:
    device = model.clip.logit_scale.device
    return DataLoader(ImageFiles(images, transform), batch_size=batch, shuffle=False,
                      num_workers=loader_workers("auto", device),
                      pin_memory=device.type == "cuda")


def bare_train_speed(model, images: list[Path], batch: int) -> float:
    """open_clip's image tower trained with AdamW on a cross-entropy over fixed random class
    directions: images/s over one pass, data loading included (as the trainer measures)."""
    clip, device = model.clip, model.clip.logit_scale.device
    clip.visual.requires_grad_(True)
    clip.visual.train()
    optimizer = torch.optim.AdamW(clip.visual.parameters(), lr=1e-5)
    classes = F.normalize(torch.randn(10, model.head.feature_dim, device=device), dim=-1)
    seen, started = 0, time.perf_counter()
    for images, index in bare_loader(model, images, batch, model.preprocess_val):
        images = images.to(device, non_blocking=True)
        with autocast(device):
            features = F.normalize(clip.encode_image(images), dim=-1)
            loss = F.cross_entropy(100 * features @ classes.T, index.to(device) % 10)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seen += len(images)
    _sync(device)
    return seen / (time.perf_counter() - started)


def bare_embed_speed(model, images: list[Path], batch: int) -> float:
    clip, device = model.clip, model.clip.logit_scale.device
    clip.eval()
    seen, started = 0, time.perf_counter()
    with torch.inference_mode():
        for images_, _ in bare_loader(model, images, batch, model.preprocess_val):
            with autocast(device):
                clip.encode_image(images_.to(device, non_blocking=True))
            seen += len(images_)
    _sync(device)
    return seen / (time.perf_counter() - started)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CHECKS = [
    ("train frozen, bf16 against fp32", check_train(frozen=True)),
    ("train unfrozen, bf16 against fp32", check_train(frozen=False)),
    ("embed, bf16 against fp32", check_embed),
    ("two processes against one", check_processes),
    ("resume", check_resume),
    ("speed against a bare open_clip loop", check_speed),
]

if __name__ == "__main__":
    main()
