"""The embed stage: each model file's embeddings of the query and gallery images.

Model files whose backbone did not train (epoch 0, and every epoch of a frozen run) share one
base model: its backbone features are computed once per image and each file's head is applied
to them, so N such epochs cost about one pass through the image tower.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from clipcore import paths
from clipcore.data.manifests import read_manifest
from clipcore.errors import ClipcoreError
from clipcore.files import write_atomic
from clipcore.model import distributed
from clipcore.model.checkpoint import load_model_file, load_model_params
from clipcore.model.factory import FineTunedCLIP, build_model
from clipcore.model.features import backbone_features
from clipcore.params import Params
from clipcore.retrieve.wise_ft import mix_weights

SPLITS = ("query", "gallery")


@dataclass(frozen=True)
class EmbedReport:
    files: list[Path]        # the embeddings files written, by epoch
    backbone_passes: int     # passes over the query and gallery images through an image tower
    images: dict[str, int]   # images per split


def embedding_model(model_file: Path, alpha: float, device: torch.device,
                    untouched: dict[str, FineTunedCLIP] | None = None) -> tuple[FineTunedCLIP, bool]:
    """A model file's model as embed.wise_ft_alpha wants it, and whether its backbone trained;
    `untouched` keeps each base's epoch-0 model for the next file on the same base. A file saved
    already mixed (best/model.pt) is taken as it is: mixing it again would move it further."""
    model, backbone_trained = load_model_file(model_file, device)
    if model.wise_ft_alpha != 1.0:
        if alpha not in (1.0, model.wise_ft_alpha):
            raise ClipcoreError(
                f"{model_file}: already WiSE-FT mixed at alpha {model.wise_ft_alpha}, not "
                f"{alpha}; mix a fine-tuned file ({paths.ALL_WEIGHTS}/model_epoch_X.pt) instead")
        return model, backbone_trained
    if alpha != 1.0:
        untouched = {} if untouched is None else untouched
        base = json.dumps(model.base, sort_keys=True)
        if base not in untouched:
            untouched[base] = build_model(load_model_params(model_file), device)
        mix_weights(model, untouched[base], alpha, backbone_trained)
    return model, backbone_trained


def embed_all(params: Params, data_root: Path, prepared: Path = paths.PREPARED) -> EmbedReport:
    """Write `embeddings/epoch_X.npz` for every `all_weights/model_epoch_X.pt`."""
    model_files = paths.epoch_files(paths.ALL_WEIGHTS, "model_epoch_*.pt")
    if not model_files:
        raise ClipcoreError(f"{paths.ALL_WEIGHTS}: no model_epoch_*.pt files (run dvc repro train)")
    # Several processes (train.processes): each embeds its share of the images, rank 0 writes.
    world = distributed.join(params.train.device)
    device = world.device
    frames = {split: read_manifest(prepared, split) for split in SPLITS}
    images = [Path(data_root) / p for split in SPLITS for p in frames[split]["path"]]
    sizes = [len(frames[split]) for split in SPLITS]
    names = {split: np.array([PurePosixPath(p).name for p in frame["path"]], dtype=str)
             for split, frame in frames.items()}

    shared: dict[str, torch.Tensor] = {}  # base identity -> features of query + gallery
    untouched: dict[str, FineTunedCLIP] = {}  # base identity -> epoch 0's model, for WiSE-FT
    alpha = params.embed.wise_ft_alpha
    written, passes = [], 0
    for model_file in model_files:
        model, backbone_trained = embedding_model(model_file, alpha, device, untouched)
        base = json.dumps(model.base, sort_keys=True)
        if backbone_trained or base not in shared:
            # Query and gallery in one pass: one loader start, decoding overlaps throughout.
            features = backbone_features(
                model, world.shard(images), batch_size=params.embed.batch_size,
                num_workers=params.embed.num_workers, desc=f"{model_file.name} query+gallery",
                tta=params.embed.tta)
            passes += 1
            if not backbone_trained:
                shared[base] = features
        else:
            features = shared[base]
        with torch.inference_mode():
            embeddings = world.gather_shards(model.embed_features(features).float(), len(images))
        query, gallery = np.split(embeddings.cpu().numpy(), [sizes[0]])
        target = paths.embeddings_path(paths.epoch_of(model_file))
        if world.is_main:
            write_atomic(target, lambda f: np.savez(
                f, query=query, gallery=gallery,
                query_names=names["query"], gallery_names=names["gallery"]))
        written.append(target)
    if world.is_main:  # only now: a run that stops halfway keeps the earlier run's files
        for stale in set(paths.epoch_files(paths.EMBEDDINGS, "epoch_*.npz")) - set(written):
            stale.unlink()
    return EmbedReport(written, passes, dict(zip(SPLITS, sizes)))
