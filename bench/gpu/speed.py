"""gpu_check's three speed rates, on the same realistic JPEGs (photos.py, 250x250 and 1024x768):

- GPU only: the model on ready tensors already on the device, warmed up, batch 64 to 512 (what
  the device can take at most: training step with fused AdamW, and the inference pass);
- loader only: a DataLoader decoding and transforming the JPEGs with a val transform, 8 workers
  against all the cores: open_clip's PIL transform handing over float32 (before issue 25) or the
  model's own (clipcore.data.pixels: draft decoding, tensor resize, uint8);
- the pipeline's own: `stages.train` unfrozen (its last epoch's images/s, data loading in it)
  and embed's backbone-feature pass (clipcore.model.features.backbone_features).

Each reports (None: no verdict) and keeps its numbers; the pipeline's reports the goal, its
unfrozen training rate at least 0.7 of the GPU-only rate at batch 64."""
from __future__ import annotations

import contextlib
import time
from functools import partial
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from open_clip.transform import PreprocessCfg, image_transform_v2

from clipcore import paths
from clipcore.data.images import ImageFiles
from clipcore.data.pixels import ValPixels, collate_pixels
from clipcore.model.factory import build_model
from clipcore.model.features import autocast, backbone_features, cpu_cores
from clipcore.params import ModelParams
from clipcore.report.best import read_training_metrics

from .checks import Result
from .photos import SIZES, write_photos
from .runs import Machine, project, repository_params, stage

GOAL = 0.7  # the pipeline's unfrozen training rate against the GPU-only rate at its batch


def _scale(machine: Machine) -> dict:
    """How much each rate measures: unique photos, times each is listed, batches, steps."""
    if machine.quick:
        return {"photos": 16, "repeat": 2, "batches": (8, 16), "steps": 2, "loader_batch": 8}
    # 8,192 listed: a few seconds per rate at 2,000-10,000 images/s, worker start-up a small part.
    return {"photos": 256, "repeat": 32, "batches": (64, 128, 256, 512), "steps": 10,
            "loader_batch": 64}


def _model(machine: Machine):
    model = machine.model or {"model.name": "tiny", "model.pretrained": "none"}
    return build_model(ModelParams(model["model.name"], model["model.pretrained"], 512, 0.0),
                       machine.device)


def _photos(machine: Machine, size: str) -> tuple[Path, list[Path]]:
    """The photo folder of `size` (made once) and its images as the rates list them."""
    key = f"photos_{size}"
    if key not in machine.runs:
        machine.runs[key] = write_photos(machine.work / key, size, _scale(machine)["photos"])
    folder = machine.runs[key]
    images = sorted((folder / "demo").rglob("*.jpg"))
    return folder, images * _scale(machine)["repeat"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rate(step, images: int, steps: int, device: torch.device) -> float:
    """images/s of `step` after a warm-up of 3 steps (kernels chosen, memory pooled)."""
    for _ in range(3):
        step()
    _sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return images * steps / (time.perf_counter() - started)


def check_gpu_only(machine: Machine) -> Result:
    rates = _gpu_only_rates(_model(machine), _scale(machine))
    machine.runs["gpu_only"] = rates
    cuda = machine.device == "cuda"
    if cuda:  # the model is gone: the stages that follow run in processes of their own
        torch.cuda.empty_cache()
    peak = f"; peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if cuda else ""
    words = "; ".join(f"{kind} " + ", ".join(f"{b}: {r:.0f}" for b, r in by_batch.items())
                      for kind, by_batch in rates.items())
    return None, f"{_name(machine)} images/s by batch: {words}{peak}", rates


def _gpu_only_rates(model, scale: dict) -> dict[str, dict[int, float]]:
    """Training steps (the visual tower and head, fused AdamW on CUDA, a cross-entropy over
    fixed random class directions) and inference passes on random images already on the
    device, per batch."""
    device, side = model.clip.logit_scale.device, model.clip.visual.image_size[0]
    model.set_backbone_trainable(True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-6,
                                  **({"fused": True} if trainable[0].is_cuda else {}))
    classes = F.normalize(torch.randn(10, model.embed_dim, device=device), dim=-1)

    def train_step(images: torch.Tensor, targets: torch.Tensor) -> None:
        with autocast(device):
            loss = F.cross_entropy(100 * model(images).float() @ classes.T, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def embed_step(images: torch.Tensor) -> None:
        with torch.inference_mode(), autocast(device):
            model.backbone_features(images)

    rates = {"train": {}, "embed": {}}
    for batch in scale["batches"]:
        images = torch.randn(batch, 3, side, side, device=device)
        targets = torch.arange(batch, device=device) % 10
        model.train()
        rates["train"][batch] = _rate(partial(train_step, images, targets), batch,
                                      scale["steps"], device)
        model.eval()
        rates["embed"][batch] = _rate(partial(embed_step, images), batch, scale["steps"],
                                      device)
    return rates


def loader_rate(images: list[Path], transform, workers: int, batch: int, pin: bool) -> float:
    """images/s of a DataLoader, from its first batch (worker start-up left out) to its last;
    the model's uint8 pixels stacked as image_loader stacks them (collate_pixels)."""
    collate = collate_pixels if isinstance(transform, ValPixels) else None
    loader = DataLoader(ImageFiles(images, transform), batch_size=batch, num_workers=workers,
                        pin_memory=pin, collate_fn=collate)
    seen, started = 0, None
    for pixels, _ in loader:
        if started is None:
            started = time.perf_counter()
            continue
        seen += len(pixels)
    return seen / (time.perf_counter() - started) if seen else float("nan")


def check_loader(machine: Machine) -> Result:
    model, scale = _model(machine), _scale(machine)
    cores = cpu_cores()
    counts = [0] if machine.quick else sorted({min(8, cores), cores})
    transforms = {"float32": image_transform_v2(PreprocessCfg(**model.clip.visual.preprocess_cfg),
                                                is_train=False),
                  "uint8": model.preprocess_val}
    rates = {}
    for size in SIZES:
        _, images = _photos(machine, size)
        for workers in counts:
            for kind, transform in transforms.items():
                rates[f"{size} {workers} workers {kind}"] = loader_rate(
                    images, transform, workers, scale["loader_batch"], machine.device == "cuda")
    words = "; ".join(f"{key}: {rate:.0f}" for key, rate in rates.items())
    return None, f"{cores} cores, images/s: {words}", rates


def check_pipeline(machine: Machine) -> Result:
    rates, batch = {}, _scale(machine)["batches"][0]  # 64 (--quick: 8)
    for size in SIZES:
        folder, _ = _photos(machine, size)
        run = project(machine, f"pipeline_{size}", {
            "train.device": machine.device, "train.freeze_backbone": False, "train.epochs": 2,
            "train.batch_size": batch, "train.keep_checkpoints": 1,
            # The default augmentation, as a real run decodes (TINY turns it off).
            "train.augment": repository_params()["train"]["augment"]}, data=folder, repeat=_scale(machine)["repeat"])
        stage(machine, run, "train")
        rows = read_training_metrics(run / paths.TRAINING_METRICS_CSV)
        rates[f"{size} train"] = rows[-1]["images_per_s"]
        rates[f"{size} embed"] = _embed_rate(machine, run)
    words = "; ".join(f"{key}: {rate:.0f}" for key, rate in rates.items())
    gpu_only = machine.runs.get("gpu_only", {}).get("train", {}).get(batch)
    if gpu_only is None:  # that check failed
        return None, f"images/s: {words} (no GPU-only rate at batch {batch})", rates
    shares = {size: rates[f"{size} train"] / gpu_only for size in SIZES}
    rates.update({f"{size} train share of GPU only": s for size, s in shares.items()})
    verdict = ", ".join(f"{size} {s:.2f}" for size, s in shares.items())
    met = "met" if min(shares.values()) >= GOAL else "not met"
    return None, (f"images/s: {words}; unfrozen train against GPU only at batch "
                  f"{batch}: {verdict} (goal >= {GOAL}: {met})"), rates


def _embed_rate(machine: Machine, run: Path) -> float:
    """Embed's feature pass over the run's query and gallery images with its params: model
    build left out (that is a per-file cost, not a rate)."""
    frames = [pd.read_csv(run / paths.PREPARED / f"{s}.csv") for s in ("query", "gallery")]
    images = [run / "demo" / p for frame in frames for p in frame["path"]]
    model = _model(machine)
    log = machine.logs / f"{run.name}_features.log"
    with open(log, "w") as out, contextlib.redirect_stderr(out):
        _sync(model.clip.logit_scale.device)
        started = time.perf_counter()
        backbone_features(model, images, batch_size=256, num_workers="auto", desc="features")
        _sync(model.clip.logit_scale.device)
    return len(images) / (time.perf_counter() - started)


def _name(machine: Machine) -> str:
    return (machine.model or {"model.name": "tiny"})["model.name"]
